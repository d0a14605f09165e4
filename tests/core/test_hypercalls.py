"""The hypercall tables and the call path, without a guest making the calls."""

from __future__ import annotations

import pytest

from hypervisor.core import hypercalls
from hypervisor.core.hypercalls import (
    COMMON,
    HYPERVISOR_CONSOLE_IO,
    HYPERVISOR_EVENT_CHANNEL_OP,
    HYPERVISOR_MMU_UPDATE,
    HYPERVISOR_SCHED_OP,
    HYPERVISOR_XEN_VERSION,
    SCHEDOP_BLOCK,
    SCHEDOP_YIELD,
    GuestAccessError,
    Hypercall,
    call,
)
from hypervisor.hvm.hypercalls import HVM_HYPERCALLS
from hypervisor.lib.errno import EFAULT, ENOSYS
from hypervisor.pv.xen.hypercalls import PV_HYPERCALLS
from hypervisor.runner import boot_scenario
from hypervisor.scenario import load_scenario
from tests import SCENARIOS


@pytest.fixture
def pv():
    hv = boot_scenario(load_scenario(SCENARIOS / "pv-hello.toml"))
    yield hv, hv.domains[0].vcpus[0]
    hv.teardown()


def test_call_runs_the_entry_and_maps_a_missing_one_and_a_bad_pointer():
    def raises(hv, v, *_):
        raise GuestAccessError("0x1000")

    table = {1: Hypercall("one", lambda hv, v, a, b, *_: a - b), 2: Hypercall("bad", raises)}
    assert call(table, None, None, 1, (50, 8, 0, 0, 0)) == 42
    assert call(table, None, None, 2, (0,) * 5) == -EFAULT
    assert call(table, None, None, 3, (0,) * 5) == -ENOSYS


def test_each_kind_has_the_common_calls_and_only_pv_has_the_pv_mmu():
    assert COMMON.keys() <= PV_HYPERCALLS.keys()  # Xen's PV ABI: its own console, sched ...
    assert PV_HYPERCALLS[HYPERVISOR_MMU_UPDATE].name == "mmu_update"
    assert set(HVM_HYPERCALLS) == {HYPERVISOR_XEN_VERSION, HYPERVISOR_CONSOLE_IO,
                                   HYPERVISOR_SCHED_OP}
    assert HYPERVISOR_EVENT_CHANNEL_OP not in HVM_HYPERCALLS
    assert all(isinstance(e, Hypercall) and e.name for e in PV_HYPERCALLS.values())


def test_xen_version_answers_the_build(pv):
    hv, v = pv
    assert call(PV_HYPERCALLS, hv, v, HYPERVISOR_XEN_VERSION, (0,) * 5) == (4 << 16) | 19


def test_console_io_from_an_unmapped_buffer_is_efault_and_writes_nothing(pv):
    hv, v = pv
    before = bytes(v.domain.console)
    args = (hypercalls.CONSOLEIO_WRITE, 8, 0xFFFF_F000_0000_0000, 0, 0)
    assert call(PV_HYPERCALLS, hv, v, HYPERVISOR_CONSOLE_IO, args) == -EFAULT
    assert bytes(v.domain.console) == before


def test_hvm_sched_op_yields_but_never_blocks_on_events(pv):
    hv, v = pv  # the handler does not look at the kind: the table decides
    sched = HVM_HYPERCALLS[HYPERVISOR_SCHED_OP].handler
    assert sched(hv, v, SCHEDOP_YIELD, 0) == 0 and v.yield_requested
    assert sched(hv, v, SCHEDOP_BLOCK, 0) == -ENOSYS
    assert call(PV_HYPERCALLS, hv, v, HYPERVISOR_SCHED_OP, (SCHEDOP_BLOCK, 0, 0, 0, 0)) == 0


def test_recipe_a_new_hypercall_is_one_handler_and_one_table_entry(pv, monkeypatch):
    """README "How do I add a hypercall": write the handler, add it to the kind's table
    (here PV_HYPERCALLS in hypervisor/pv/xen/hypercalls.py). The dispatcher finds it
    when the PV kernel's `syscall` (its hypercall page's stub) exits."""
    from emulator.exits import Syscall
    from hypervisor.pv.xen import hypercalls as pv_table

    hv, v = pv

    def domain_pages(hv, v, *_):  # a trivial hypercall: the caller's domain size
        return v.domain.nr_pages

    monkeypatch.setitem(pv_table.PV_HYPERCALLS, 40, Hypercall("domain_pages", domain_pages))
    cpu = hv.switch_to(v.pcpu, v)
    cpu.set_reg("rax", 40)
    hv.dispatcher.handle(cpu, v, Syscall(cpu.reg("rip")))
    assert cpu.reg("rax") == v.domain.nr_pages > 0
    assert v.xen.hypercalls["domain_pages"] == 1
    cpu.set_reg("rax", 40)  # an HVM guest's table does not have it
    assert call(HVM_HYPERCALLS, hv, v, 40, (0,) * 5) == -ENOSYS
