"""PV vCPUs: their first architectural state, VCPUOP_initialise and NEW_BASEPTR.

A PV vCPU starts in 64-bit mode on the hypervisor's GDT (the core's, mapped at
`GDT_VA` by the PV MMU) with CR3 at the base pointer the hypervisor holds; the
MMU walks from that base pointer, never from the CPU's CR3.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from hypervisor.core.hypervisor import GDT, KERNEL_CS, KERNEL_DS, until_done
from hypervisor.core.vcpu import BLOCKED, DOWN, RUNNABLE, TrapEntry, Vcpu
from hypervisor.lib.errno import EINVAL
from hypervisor.pv.mmu import GDT_VA
from hypervisor.stream.vcpu_context import VcpuGuestContext

if TYPE_CHECKING:
    from emulator.engine import PhysicalCpu
    from hypervisor.core.domain import Domain
    from hypervisor.core.hypervisor import Hypervisor

INITIAL_RFLAGS = 0x2
CR0_PE_PG = 0x8005_0033  # PE, MP, ET, NE, WP, AM, PG: what a 64-bit kernel runs with
CR4_PAE = 0x20
MXCSR_RESET = 0x1F80  # all SSE exceptions masked, as after a CPU reset


def start_pv_vcpu(hv: Hypervisor, v: Vcpu, regs: dict[str, int], base_ma: int) -> None:
    """Give a (built or restored) vCPU its first architectural state: 64-bit mode on the
    hypervisor GDT, translating through the L4 at `base_ma`."""
    def setup(cpu: PhysicalCpu) -> None:
        v.roots.kernel_ma = base_ma
        cpu.set_reg("cr4", CR4_PAE)
        cpu.set_reg("cr3", base_ma)  # the guest's view of its root
        cpu.set_reg("cr0", CR0_PE_PG)
        cpu.set_descriptor_table("gdtr", GDT_VA, len(GDT) - 1)
        cpu.set_reg("cs", KERNEL_CS)
        for seg in ("ss", "ds", "es"):
            cpu.set_reg(seg, KERNEL_DS)
        cpu.set_reg("mxcsr", MXCSR_RESET)
        for name, value in regs.items():
            cpu.set_reg(name, value)

    hv.start_vcpu_with(v, setup)


def initialise_vcpu(hv: Hypervisor, v: Vcpu, ctx: VcpuGuestContext) -> int:
    """VCPUOP_initialise: a second vCPU from a `vcpu_guest_context`."""
    base_ma = ctx.ctrlreg[3] & ~0xFFF
    if base_ma == 0 or base_ma >> 12 >= hv.memory.nr_frames:
        return -EINVAL
    # the CR3 reference changes the domain's type state: a lazy update's
    # validation (and its proof) completes first, as before a page-table hypercall
    finish_pending_typing(v.domain)
    rc = until_done(lambda: hv.typing.get_root_ref(base_ma >> 12, v.domain.domid))
    if rc:
        return rc
    r = ctx.user_regs
    regs = {name: getattr(r, name) for name in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip")}
    regs["rflags"] = (r.rflags | INITIAL_RFLAGS) & 0x3F7FD7 & ~(1 << 9)
    calling = hv.loaded[v.pcpu]
    start_pv_vcpu(hv, v, regs, base_ma)
    if calling is not None and calling is not v and calling.pcpu == v.pcpu:
        hv.switch_to(v.pcpu, calling)
    v.event_callback = ctx.event_callback_eip
    v.failsafe_callback = ctx.failsafe_callback_eip
    v.syscall_callback = ctx.syscall_callback_eip
    v.trap_table.update({t.vector: TrapEntry(t.vector, t.flags, t.cs, t.address)
                         for t in ctx.trap_ctxt if t.address})
    v.runstate = DOWN
    return 0


def set_base_pointer(hv: Hypervisor, v: Vcpu, base_ma: int) -> None:
    """NEW_BASEPTR: the vCPU now translates through another (referenced) L4.

    Its CR3 register follows, as Xen's emulated CR3 read would: the guest sees
    its new root, and a later save or live update, which load CR3 from the
    root, give back the register the guest had."""
    v.roots.kernel_ma = base_ma
    cpu = hv.switch_to(v.pcpu, v)
    cpu.set_reg("cr3", base_ma)
    cpu.flush_tlb()


def finish_pending_typing(dom: Domain) -> None:
    """A domain still being validated lazily is finished before its type state changes
    (its tables, pins, base pointers, or a new vCPU's CR3 reference)."""
    pending = dom.vcpus[0].mmu.pending_typing if dom.vcpus else None
    if pending is not None:
        pending.finish()



@dataclass(frozen=True, kw_only=True)
class PvVcpuState:
    """What Xen's `vcpu_guest_context` does not carry of a PV vCPU: HVLAB_DOMAIN's `vcpus`
    (written by `stream.plain`), saved and handed over by pv/save.py, read back by
    pv/restore.py."""

    runstate: str | None = None  # None (an image without it): VGCF_ONLINE decides
    timer_deadline_ns: int | None = None  # in the guest's own time
    upcalls: int = 0
    instructions: int = 0
    pcpu: int = 0  # where it ran (informative: a restored vCPU is placed afresh)

    def __post_init__(self) -> None:
        if self.runstate not in (None, RUNNABLE, BLOCKED, DOWN):
            raise ValueError(f"runstate {self.runstate!r}")


def save_pv_vcpu(v: Vcpu) -> PvVcpuState:
    deadline = v.timer_deadline_ns
    return PvVcpuState(
        runstate=v.runstate, upcalls=v.upcalls, instructions=v.instructions, pcpu=v.pcpu,
        timer_deadline_ns=None if deadline is None else deadline + v.domain.time_offset)


def restore_pv_vcpu(v: Vcpu, state: PvVcpuState, online: bool) -> None:
    """`state` onto a started vCPU whose context said `online` (VGCF_ONLINE)."""
    v.runstate = state.runstate or (RUNNABLE if online else DOWN)
    deadline = state.timer_deadline_ns
    v.timer_deadline_ns = None if deadline is None else deadline - v.domain.time_offset
    v.upcalls, v.instructions = state.upcalls, state.instructions
