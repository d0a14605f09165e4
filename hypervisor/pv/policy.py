"""The PV answers to the core's questions (`hypervisor/core/policy.py`).

A PV guest takes faults through the trap table it registered
(set_trap_table), events through its event callback (the upcall, entered on
the next run with events masked), sleeps in `hlt` until an event is pending
and arms one one-shot timer (set_timer_op, VIRQ_TIMER). Its page tables carry
PV page types, so the type invariant is checked for it.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

from emulator.addr import PAGE_SIZE
from emulator.interrupts import GATE_TRAP, DeliveryError, Gate, deliver
from hypervisor.core.dispatch import EXIT_NAMES, fault_report
from hypervisor.core.evtchn import VCPU_INFO_SIZE, VIRQ_TIMER
from hypervisor.core.hypervisor import KERNEL_CS
from hypervisor.core.vcpu import BLOCKED, Vcpu
from hypervisor.pv.hypercalls import PV_HYPERCALLS

if TYPE_CHECKING:
    from emulator.engine import PhysicalCpu
    from emulator.exits import Exit, MmuFault
    from hypervisor.core.domain import Domain
    from hypervisor.core.hypervisor import Hypervisor
    from hypervisor.mm.check import Difference

VCPU_INFO_CR2 = 16  # offset of arch.cr2 in vcpu_info


class PvPolicy:
    """PV domains on one hypervisor."""

    name = "pv"
    hypercalls = PV_HYPERCALLS

    def __init__(self, hv: Hypervisor) -> None:
        self.hv = hv

    # ------------------------------------------------------------ running
    def enter(self, cpu: PhysicalCpu, v: Vcpu, now: int, budget: int) -> int:
        if v.event_callback and v.domain.events.upcall_deliverable(v.vcpu_id):
            self.deliver_upcall(cpu, v)
        return budget

    def deliver_upcall(self, cpu: PhysicalCpu, v: Vcpu) -> None:
        """Enter the guest's event callback, events masked, as Xen's upcall does."""
        v.domain.events.bits.set_upcall_mask(v.vcpu_id, True)
        try:
            deliver(cpu, Gate(KERNEL_CS, v.event_callback, GATE_TRAP, True), cpu.reg("rip"),
                    None)
        except DeliveryError as err:
            self.hv.crash_domain(v.domain, f"{v.name}: event upcall failed: {err}")
            return
        v.upcalls += 1

    def on_time(self, v: Vcpu, now: int) -> None:
        if v.timer_deadline_ns is not None and v.timer_deadline_ns <= now and v.domain.alive:
            v.timer_deadline_ns = None
            v.domain.events.raise_virq(v.vcpu_id, VIRQ_TIMER)

    def next_deadline(self, v: Vcpu) -> int | None:
        return v.timer_deadline_ns

    # -------------------------------------------------------------- exits
    def exit_name(self, v: Vcpu, exit_: Exit) -> str:
        return EXIT_NAMES[type(exit_)]

    def halt(self, cpu: PhysicalCpu, v: Vcpu) -> None:
        if not v.domain.events.bits.upcall_pending(v.vcpu_id):
            v.runstate = BLOCKED

    def exception(self, cpu: PhysicalCpu, v: Vcpu, vector: int, error_code: int | None,
                  cr2: int | None, return_rip: int, fault_rip: int) -> None:
        """Bounce the fault to the handler the guest registered (Xen's trap bounce)."""
        entry = v.trap_table.get(vector)
        if entry is None:
            self.hv.crash_domain(v.domain, fault_report(cpu, v, vector, error_code, cr2,
                                                        fault_rip, "no handler"))
            return
        if vector == 14 and cr2 is not None:
            cpu.set_reg("cr2", cr2)
            ma = v.domain.shared_info_mfn * PAGE_SIZE + VCPU_INFO_SIZE * v.vcpu_id + VCPU_INFO_CR2
            self.hv.memory.write(ma, struct.pack("<Q", cr2))
        try:
            deliver(cpu, Gate(KERNEL_CS, entry.address, GATE_TRAP, True), return_rip, error_code)
        except DeliveryError as err:
            self.hv.crash_domain(v.domain, fault_report(cpu, v, vector, error_code, cr2,
                                                        fault_rip, str(err)))
            return
        if entry.masks_events:
            v.domain.events.bits.set_upcall_mask(v.vcpu_id, True)

    def memory_fault(self, cpu: PhysicalCpu, v: Vcpu, exit_: MmuFault) -> bool:
        return False  # a refused PV walk is the guest's page fault

    def handle_exit(self, cpu: PhysicalCpu, v: Vcpu, exit_: Exit) -> bool:
        return False

    def answer_cpuid(self, cpu: PhysicalCpu, v: Vcpu, leaf: int) -> bool:
        return False

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
        return []  # PV page tables are guest frames: they stay

    def describe(self, dom: Domain) -> dict[str, Any]:
        return {}

    def describe_vcpu(self, v: Vcpu) -> dict[str, Any]:
        return {}


def pv_policy(hv: Hypervisor) -> PvPolicy:
    """The hypervisor's PV policy (made on first use)."""
    policy = hv.policy_for(PvPolicy.name, PvPolicy)
    assert isinstance(policy, PvPolicy)
    return policy
