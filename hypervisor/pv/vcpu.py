"""PV vCPUs: NEW_BASEPTR, finishing a lazy update's validation first, and what Xen's
context does not carry of a vCPU (saved, handed over, restored).

A PV vCPU runs in ring 3 on Xen's ABI: its first state and VCPUOP_initialise are
Xen's (`hypervisor/pv/xen/support.py`, `vcpu_init.py`); its MMU walks from the base
pointer the hypervisor holds, never from the CPU's CR3.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from hypervisor.core.vcpu import BLOCKED, DOWN, RUNNABLE, Vcpu

if TYPE_CHECKING:
    from hypervisor.core.domain import Domain
    from hypervisor.core.hypervisor import Hypervisor


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
