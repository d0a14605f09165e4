"""The exit dispatcher on its own: each exit reaches the right question of the domain's policy.

A real hypervisor with a real PV domain (pv-hello, booted, never run) whose policy is
replaced by a recorder; exits are handed to `ExitDispatcher.handle` directly.
"""

from __future__ import annotations

from typing import Any

import pytest

from emulator.exits import (
    BudgetExhausted,
    EngineError,
    GuestException,
    Halt,
    Hypercall,
    InvalidOpcode,
    MmuFault,
)
from emulator.paging import WalkFault
from hypervisor.core.hypercalls import Hypercall as Entry
from hypervisor.runner import boot_scenario
from hypervisor.scenario import load_scenario
from tests import SCENARIOS


class Recorder:
    """A policy that writes down what it is asked."""

    name = "recorder"

    def __init__(self, handles_memory_faults: bool = False) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.handles_memory_faults = handles_memory_faults
        self.hypercalls = {7: Entry("seven", lambda hv, v, a, *_: a + 7)}

    def exit_name(self, v, exit_) -> str:
        return f"rec-{type(exit_).__name__}"

    def halt(self, cpu, v) -> None:
        self.calls.append(("halt", v.vcpu_id))

    def exception(self, cpu, v, vector, error_code, cr2, return_rip, fault_rip) -> None:
        self.calls.append(("exception", (vector, error_code, cr2, return_rip, fault_rip)))

    def memory_fault(self, cpu, v, exit_) -> bool:
        self.calls.append(("memory_fault", exit_.gva))
        return self.handles_memory_faults

    def release(self, dom) -> list[int]:
        return []

    def handle_exit(self, cpu, v, exit_) -> bool:
        return False  # the dispatcher's own handling, which these tests watch

    def answer_cpuid(self, cpu, v, leaf) -> bool:
        return False


@pytest.fixture
def machine():
    hv = boot_scenario(load_scenario(SCENARIOS / "pv-hello.toml"))
    dom = hv.domains[0]
    v = dom.vcpus[0]
    cpu = hv.switch_to(v.pcpu, v)
    recorder = Recorder()
    dom.policy = recorder
    yield hv, cpu, v, recorder
    hv.teardown()


def test_every_exit_is_counted_under_the_policys_name(machine):
    hv, cpu, v, _ = machine
    hv.dispatcher.handle(cpu, v, BudgetExhausted(0x1000))
    hv.dispatcher.handle(cpu, v, Halt(0x1000))
    assert hv.exits["rec-BudgetExhausted"] == 1 and hv.exits["rec-Halt"] == 1


def test_a_hypercall_is_looked_up_in_the_policys_table_and_answers_in_rax(machine):
    hv, cpu, v, _ = machine
    cpu.set_reg("rax", 7)
    cpu.set_reg("rdi", 35)
    hv.dispatcher.handle(cpu, v, Hypercall(0x1000, 3))
    assert cpu.reg("rax") == 42


def test_a_hypercall_the_table_lacks_is_enosys(machine):
    hv, cpu, v, _ = machine
    cpu.set_reg("rax", 1)  # mmu_update: a PV hypercall, but not in this policy's table
    hv.dispatcher.handle(cpu, v, Hypercall(0x1000, 3))
    assert cpu.reg("rax") == (-38) & 0xFFFF_FFFF_FFFF_FFFF


def test_halt_and_exceptions_go_to_the_policy(machine):
    hv, cpu, v, rec = machine
    hv.dispatcher.handle(cpu, v, Halt(0x1003))
    hv.dispatcher.handle(cpu, v, GuestException(0x2000, 13, 0x18, None, 0x2000))
    hv.dispatcher.handle(cpu, v, InvalidOpcode(0x3000))
    assert rec.calls == [("halt", 0),
                         ("exception", (13, 0x18, None, 0x2000, 0x2000)),
                         ("exception", (6, None, None, 0x3000, 0x3000))]


def test_a_refused_fill_is_the_guests_page_fault_unless_the_policy_resolves_it(machine):
    hv, cpu, v, rec = machine
    hv.dispatcher.handle(cpu, v, MmuFault(0x4000, 0xDEAD000, "write",
                                          WalkFault(0xDEAD000, 0x7, 1)))
    assert rec.calls == [("memory_fault", 0xDEAD000),
                         ("exception", (14, 0x7, 0xDEAD000, 0x4000, 0x4000))]
    rec.calls.clear()
    rec.handles_memory_faults = True  # an EPT violation, say
    hv.dispatcher.handle(cpu, v, MmuFault(0x4000, 0xBEEF000, "read", object()))
    assert rec.calls == [("memory_fault", 0xBEEF000)]


def test_an_engine_error_crashes_the_domain_with_where(machine):
    hv, cpu, v, _ = machine
    hv.dispatcher.handle(cpu, v, EngineError(0x5000, "triple fault"))
    assert not v.domain.alive and v.domain.shutdown.reason == "crash"
    assert "triple fault at RIP 0x5000" in v.domain.crash_report


def test_the_pv_policy_crashes_a_domain_without_a_handler_and_names_the_fault():
    hv = boot_scenario(load_scenario(SCENARIOS / "pv-hello.toml"))
    try:
        v = hv.domains[0].vcpus[0]
        cpu = hv.switch_to(v.pcpu, v)
        v.trap_table.clear()
        rip = cpu.reg("rip")
        hv.dispatcher.handle(cpu, v, GuestException(rip, 0, None, rip, rip))  # a #DE
        report = hv.domains[0].crash_report
        assert report is not None
        assert f"unhandled #DE: no trap-table entry at RIP {rip:#x} <xen_entry>" in report
        assert hv.exits["exception"] == 1
    finally:
        hv.teardown()
