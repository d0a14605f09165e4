"""The PV answers to the core's questions (`hypervisor/core/policy.py`): Xen's PV ABI,
the kernel in ring 3 (docs/pv-abi.md).

Every exit of a PV vCPU means what it means to a ring-3 kernel on Xen and goes to
`xen/support.XenPvSupport`: a kernel-mode `syscall` is a hypercall (the table in
`xen/hypercalls.py`), privileged instructions are emulated, faults bounce through
the trap table, events through the event callback (entered on the next run, events
masked), a vCPU sleeps in SCHEDOP_block or SCHEDOP_poll and arms one one-shot timer
(VIRQ_TIMER). Xen's GDT page and read-only M2P are this build's pages. Its page
tables carry PV page types, so the type invariant is checked for it.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from hypervisor.core.dispatch import EXIT_NAMES
from hypervisor.core.evtchn import VIRQ_TIMER
from hypervisor.pv.xen.hypercalls import PV_HYPERCALLS
from hypervisor.pv.xen.poll import stop_polling
from hypervisor.pv.xen.priv_ops import answer_cpuid
from hypervisor.pv.xen.support import XenPvSupport

if TYPE_CHECKING:
    from emulator.engine import PhysicalCpu
    from emulator.exits import Exit, MmuFault
    from hypervisor.core.domain import Domain
    from hypervisor.core.hypervisor import Hypervisor
    from hypervisor.core.vcpu import Vcpu
    from hypervisor.mm.check import Difference


class PvPolicy:
    """PV domains on one hypervisor."""

    name = "pv"
    hypercalls = PV_HYPERCALLS

    def __init__(self, hv: Hypervisor) -> None:
        self.hv = hv
        self.support = XenPvSupport(hv)

    # ------------------------------------------------------------ running
    def enter(self, cpu: PhysicalCpu, v: Vcpu, now: int, budget: int) -> int:
        if v.xen.polling:  # woken by an event, not by the poll: the poll is over
            stop_polling(v)
        if v.event_callback and v.domain.events.upcall_deliverable(v.vcpu_id):
            self.deliver_upcall(cpu, v)
        return budget

    def deliver_upcall(self, cpu: PhysicalCpu, v: Vcpu) -> None:
        self.support.deliver_upcall(cpu, v)

    def on_time(self, v: Vcpu, now: int) -> None:
        if v.timer_deadline_ns is not None and v.timer_deadline_ns <= now and v.domain.alive:
            v.timer_deadline_ns = None
            v.domain.events.raise_virq(v.vcpu_id, VIRQ_TIMER)
        deadline = v.xen.poll_deadline_ns
        if deadline is not None and deadline <= now:
            stop_polling(v)  # SCHEDOP_poll's timeout
            v.wake()

    def next_deadline(self, v: Vcpu) -> int | None:
        deadlines = [d for d in (v.timer_deadline_ns, v.xen.poll_deadline_ns) if d is not None]
        return min(deadlines) if deadlines else None

    # -------------------------------------------------------------- exits
    def exit_name(self, v: Vcpu, exit_: Exit) -> str:
        return EXIT_NAMES[type(exit_)]

    def handle_exit(self, cpu: PhysicalCpu, v: Vcpu, exit_: Exit) -> bool:
        self.support.handle(cpu, v, exit_)
        return True  # every one: the core's generic handling below never runs for PV

    def halt(self, cpu: PhysicalCpu, v: Vcpu) -> None:
        """`hlt` completing at CPL 3 cannot happen on Xen (it is a #GP): a crash report."""
        self.support.crash(cpu, v, cpu.reg("rip"), "hlt completed at CPL 3")

    def exception(self, cpu: PhysicalCpu, v: Vcpu, vector: int, error_code: int | None,
                  cr2: int | None, return_rip: int, fault_rip: int) -> None:
        """Bounce the fault through the guest's trap table (Xen's pv_inject_event)."""
        self.support.inject(cpu, v, vector, error_code, return_rip, fault_rip, cr2=cr2)

    def memory_fault(self, cpu: PhysicalCpu, v: Vcpu, exit_: MmuFault) -> bool:
        return False  # a refused PV walk is the guest's page fault (or a ptwr write)

    def answer_cpuid(self, cpu: PhysicalCpu, v: Vcpu, leaf: int) -> bool:
        answer_cpuid(cpu)
        return True

    # --------------------------------------------------- state and reports
    def check_typerefs(self, dom: Domain) -> list[Difference]:
        """Every frame's type state recomputed from the domain's tables, pins and CR3s."""
        from hypervisor.mm.check import check_typerefs

        ft = self.hv.frame_table
        owned = ft.frames_of(dom.domid)
        pinned = owned[ft.pinned(owned)]
        pins = {int(m): int(ft.page_type(int(m))) for m in pinned}
        cr3s = [mfn for v in dom.vcpus for mfn in v.roots.referenced()]
        return check_typerefs(self.hv.memory.u64, ft, dom.domid, pins, cr3s)

    def release(self, dom: Domain) -> list[int]:
        return [int(m) for m in self.support.own_frames()]  # Xen's GDT page, the M2P

    def describe(self, dom: Domain) -> dict[str, Any]:
        """The kernel file and what Xen's ABI did for the domain (summed over vCPUs)."""
        hypercalls: Counter[str] = Counter()
        totals: Counter[str] = Counter()
        for v in dom.vcpus:
            hypercalls.update(v.xen.hypercalls)
            totals.update(privops=v.xen.privops, forced_cpuids=v.xen.forced_cpuids,
                          ptwr=v.xen.ptwr, bounces=v.xen.bounces)
        return {"xen_pv": {"kernel": dom.kernel_file,
                           "hypercalls": dict(sorted(hypercalls.items())),
                           **{k: totals[k] for k in ("privops", "forced_cpuids", "ptwr",
                                                     "bounces")}}}

    def describe_vcpu(self, v: Vcpu) -> dict[str, Any]:
        return {}


def pv_policy(hv: Hypervisor) -> PvPolicy:
    """The hypervisor's PV policy (made on first use)."""
    policy = hv.policy_for(PvPolicy.name, PvPolicy)
    assert isinstance(policy, PvPolicy)
    return policy
