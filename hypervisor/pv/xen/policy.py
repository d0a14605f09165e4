"""The answers for a PV domain on Xen's own ABI at CPL 3 (a Linux kernel): a PV policy
whose exits, `cpuid` and event upcalls go through `support.XenPvSupport`.

It is still a PV domain (page types, event channels, timers, the type check, the
report's "pv"); what differs is that every exit means what it means to a ring-3
kernel on Xen (syscall hypercalls, emulated privileged instructions, bounces through
the trap table), and that Xen's GDT page and read-only M2P are this build's pages.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from hypervisor.pv.policy import PvPolicy
from hypervisor.pv.xen.poll import stop_polling
from hypervisor.pv.xen.priv_ops import answer_cpuid
from hypervisor.pv.xen.support import XenPvSupport

if TYPE_CHECKING:
    from emulator.engine import PhysicalCpu
    from emulator.exits import Exit
    from hypervisor.core.domain import Domain
    from hypervisor.core.hypervisor import Hypervisor
    from hypervisor.core.vcpu import Vcpu

POLICY_KEY = "pv-xen-abi"  # one of these per hypervisor, beside the plain PV policy


class XenPvPolicy(PvPolicy):
    def __init__(self, hv: Hypervisor) -> None:
        super().__init__(hv)
        self.support = XenPvSupport(hv)

    def enter(self, cpu: PhysicalCpu, v: Vcpu, now: int, budget: int) -> int:
        if v.xen.polling:  # woken by an event, not by the poll: the poll is over
            stop_polling(v)
        return super().enter(cpu, v, now, budget)

    def on_time(self, v: Vcpu, now: int) -> None:
        super().on_time(v, now)
        deadline = v.xen.poll_deadline_ns
        if deadline is not None and deadline <= now:
            stop_polling(v)  # SCHEDOP_poll's timeout
            v.wake()

    def next_deadline(self, v: Vcpu) -> int | None:
        deadlines = [d for d in (v.timer_deadline_ns, v.xen.poll_deadline_ns) if d is not None]
        return min(deadlines) if deadlines else None

    def handle_exit(self, cpu: PhysicalCpu, v: Vcpu, exit_: Exit) -> bool:
        self.support.handle(cpu, v, exit_)
        return True

    def answer_cpuid(self, cpu: PhysicalCpu, v: Vcpu, leaf: int) -> bool:
        answer_cpuid(cpu)
        return True

    def deliver_upcall(self, cpu: PhysicalCpu, v: Vcpu) -> None:
        self.support.deliver_upcall(cpu, v)

    def release(self, dom: Domain) -> list[int]:
        return [int(m) for m in self.support.own_frames()]  # Xen's GDT page, the M2P

    def describe(self, dom: Domain) -> dict[str, Any]:
        """The kernel file and what Xen's CPL-3 ABI did for the domain (summed over vCPUs)."""
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


def xen_pv_policy(hv: Hypervisor) -> XenPvPolicy:
    """The hypervisor's policy for domains on Xen's ABI at CPL 3 (made on first use)."""
    policy = hv.policy_for(POLICY_KEY, XenPvPolicy)
    assert isinstance(policy, XenPvPolicy)
    return policy
