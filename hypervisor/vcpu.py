"""Virtual CPUs: what the hypervisor keeps for each, apart from the CPU registers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hypervisor.mmu import PvMmu

if TYPE_CHECKING:
    from hypervisor.domain import Domain
    from hypervisor.hvm.vcpu import HvmVcpu

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


@dataclass
class VcpuState:
    """Pure data: everything needed to recreate a vCPU (registers included)."""

    vcpu_id: int
    runstate: str
    registers: dict[str, int]
    base_ma: int
    user_base_ma: int
    timer_deadline_ns: int | None
    trap_table: dict[int, TrapEntry]
    event_callback: int
    failsafe_callback: int
    syscall_callback: int
    instructions: int


@dataclass
class Vcpu:
    domain: Domain
    vcpu_id: int
    mmu: PvMmu  # an HvmMmu (same translate/lookup protocol) for HVM vCPUs
    pcpu: int = 0
    runstate: str = DOWN
    context: object | None = None  # the engine's saved architectural state
    trap_table: dict[int, TrapEntry] = field(default_factory=dict)
    event_callback: int = 0
    failsafe_callback: int = 0
    syscall_callback: int = 0
    user_base_ma: int = 0
    timer_deadline_ns: int | None = None
    yield_requested: bool = False
    instructions: int = 0  # instructions this vCPU has executed
    upcalls: int = 0
    hvm: HvmVcpu | None = None  # vLAPIC, posted interrupts, sources (HVM vCPUs only)

    @property
    def name(self) -> str:
        return f"{self.domain.name}/v{self.vcpu_id}"

    @property
    def runnable(self) -> bool:
        return self.runstate == RUNNABLE and self.domain.alive

    def block(self) -> None:
        self.runstate = BLOCKED

    def wake(self) -> None:
        if self.runstate == BLOCKED:
            self.runstate = RUNNABLE
