"""Virtual CPUs: what the hypervisor keeps for each, apart from the CPU registers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hypervisor.core.domain import Domain

REGISTERS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
             "rip", "rflags", "cr0", "cr2", "cr3", "cr4", "cs", "ss", "ds", "es",
             "fs_base", "gs_base", "mxcsr", *(f"xmm{i}" for i in range(16)))

DOWN, RUNNABLE, BLOCKED = "down", "runnable", "blocked"


@dataclass(frozen=True)
class TrapEntry:
    vector: int
    flags: int
    cs: int
    address: int

    @property
    def masks_events(self) -> bool:
        return bool(self.flags & 4)  # Xen's TI_GET_IF: an "interrupt gate"


@dataclass(frozen=True)
class VcpuState:
    """Pure data: a vCPU as the hypervisor and the CPU hold it (what a live update's
    proof compares); the timer deadline is in the guest's own time."""

    vcpu_id: int
    runstate: str
    registers: dict[str, int]
    base_ma: int
    user_base_ma: int
    timer_deadline_ns: int | None
    trap_table: tuple[TrapEntry, ...]
    event_callback: int
    failsafe_callback: int
    syscall_callback: int
    instructions: int
    upcalls: int


@dataclass
class Vcpu:
    domain: Domain
    vcpu_id: int
    mmu: Any  # the kind's TLB-fill policy: a PvMmu or an HvmMmu (translate, lookup)
    pcpu: int = 0
    runstate: str = DOWN
    context: object | None = None  # the engine's saved architectural state
    trap_table: dict[int, TrapEntry] = field(default_factory=dict)
    event_callback: int = 0
    failsafe_callback: int = 0
    syscall_callback: int = 0
    timer_deadline_ns: int | None = None
    yield_requested: bool = False
    instructions: int = 0  # instructions this vCPU has executed
    upcalls: int = 0
    hvm: Any = None  # an HvmVcpu (vLAPIC, posted interrupts, sources) for HVM vCPUs
    xen: Any = None  # a XenVcpu: Xen's PV ABI at CPL 3 (hypervisor/pv/xen) when set

    @property
    def name(self) -> str:
        return f"{self.domain.name}/v{self.vcpu_id}"

    @property
    def roots(self) -> Any:
        """A PV vCPU's page-table roots (hypervisor/pv/base_pointers.py); an HVM vCPU
        has none (its root is its CR3 register)."""
        return self.mmu.roots

    @property
    def runnable(self) -> bool:
        return self.runstate == RUNNABLE and self.domain.alive

    def save(self, registers: dict[str, int]) -> VcpuState:
        """This vCPU's state, with the `registers` read from its CPU context."""
        offset = self.domain.time_offset
        deadline = None if self.timer_deadline_ns is None else self.timer_deadline_ns + offset
        # an HVM vCPU's base pointer is its CR3 register (in `registers`)
        roots = getattr(self.mmu, "roots", None)
        kernel_ma, user_ma = (0, 0) if roots is None else (roots.kernel_ma, roots.user_ma)
        return VcpuState(self.vcpu_id, self.runstate, registers, kernel_ma, user_ma, deadline,
                         tuple(entry for _, entry in sorted(self.trap_table.items())),
                         self.event_callback, self.failsafe_callback, self.syscall_callback,
                         self.instructions, self.upcalls)

    def block(self) -> None:
        self.runstate = BLOCKED

    def wake(self) -> None:
        if self.runstate == BLOCKED:
            self.runstate = RUNNABLE
