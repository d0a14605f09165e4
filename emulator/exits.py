"""Why a physical CPU stopped running guest code.

Each exit is a plain dataclass. The engine adapter produces them; the
hypervisor's single exit dispatcher consumes them. `rip` is always the address
of the instruction concerned (for a hypercall: the `vmcall` itself; for `hlt`
and port I/O: the instruction after it has been handled is the dispatcher's
business).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Exit:
    rip: int


@dataclass(frozen=True)
class BudgetExhausted(Exit):
    """The quantum's instruction budget ran out."""


@dataclass(frozen=True)
class Hypercall(Exit):
    """`vmcall` executed: the hypervisor emulates it and steps over its 3 bytes."""

    length: int


@dataclass(frozen=True)
class Syscall(Exit):
    """`syscall` executed at CPL 3 (the Xen PV ABI): `rip` is the instruction, which
    is 2 bytes long. Unicorn wrote neither rcx nor r11; RIP is already past it."""


@dataclass(frozen=True)
class Halt(Exit):
    """`hlt` executed; `rip` is the instruction after it."""


@dataclass(frozen=True)
class Cpuid(Exit):
    leaf: int
    subleaf: int
    length: int


@dataclass(frozen=True)
class PortIO(Exit):
    port: int
    size: int
    is_write: bool
    value: int  # value written (writes); 0 for reads


@dataclass(frozen=True)
class GuestException(Exit):
    """A fault or trap the guest raised: vector, error code, CR2 where relevant.

    `next_rip` is where execution continues for traps (int3, int n); faults
    restart at `rip`.
    """

    vector: int
    error_code: int | None
    cr2: int | None
    next_rip: int


@dataclass(frozen=True)
class MmuFault(Exit):
    """The MMU refused a translation. `reason` is whatever the MMU object recorded."""

    gva: int
    access: str  # "read" | "write" | "fetch"
    reason: object


@dataclass(frozen=True)
class InvalidOpcode(Exit):
    """An undefined instruction other than vmcall (ud2 and friends)."""


@dataclass(frozen=True)
class EngineError(Exit):
    """Unicorn stopped with an error the adapter cannot explain (e.g. a triple fault)."""

    message: str
