"""Two-stage translation: the guest's tables in guest-physical space, every step through EPT."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emulator.engine import PERM_R, PERM_W, PERM_X
from emulator.memory import HostMemory
from emulator.paging import NX, RW, A, D, P, Translation, WalkFault
from hypervisor.core.frames import FrameAllocator
from hypervisor.hvm.builder import LAPIC_GPA, build_hvm_memory, plan_hvm_layout
from hypervisor.hvm.ept import P2mType
from hypervisor.hvm.mmu import EptViolation, HvmMmu
from hypervisor.hvm.physmap import GuestPhysmap, ept_layout_for
from tests.hvm.test_memory import fake_kernel

MB = 1 << 20
LAPIC_MA = 64 * MB  # where the MMIO window would be: right above host RAM
ADDR = 0x000F_FFFF_FFFF_F000


class Guest:
    """An HVM domain's memory as the builder leaves it, and an MMU over it."""

    def __init__(self, build: str = "4.19", pod: bool = False, dom_mb: int = 8) -> None:
        self.mem = HostMemory(64 * MB)
        self.frames = FrameAllocator(self.mem.nr_frames)
        kernel = fake_kernel()
        nr_pages = dom_mb * MB >> 12
        self.layout = plan_hvm_layout(kernel, nr_pages, 1, "t")
        self.pm = GuestPhysmap(self.mem, self.frames, nr_pages, ept_layout_for(build),
                               "domain t", pod=pod, prepopulate=self.layout.builder_gfns)
        build_hvm_memory(self.mem, kernel, self.layout, self.pm.gpa_to_ma)
        self.cr3 = self.layout.page_tables
        self.resolved: list[EptViolation] = []
        self.mmu = HvmMmu(self.mem, self.pm, lambda: self.cr3, LAPIC_MA, resolve=self.resolve)

    def resolve(self, violation: EptViolation) -> bool:
        self.resolved.append(violation)
        if violation.p2m_type == P2mType.POPULATE_ON_DEMAND:
            self.pm.populate(violation.gfn)
            return True
        return False

    def entry_ma(self, gva: int, level: int) -> int:
        """Machine address of the guest entry for `gva` at `level` (4..1)."""
        table = self.cr3
        for lv in (4, 3, 2, 1):
            ma = self.pm.gpa_to_ma(table) + 8 * ((gva >> (12 + 9 * (lv - 1))) & 511)
            if lv == level:
                return ma
            table = int(self.mem.u64[ma >> 3]) & ADDR
        raise AssertionError

    def entry(self, gva: int, level: int) -> int:
        return int(self.mem.u64[self.entry_ma(gva, level) >> 3])

    def set_entry(self, gva: int, level: int, value: int) -> None:
        self.mem.u64[self.entry_ma(gva, level) >> 3] = np.uint64(value)


@pytest.mark.parametrize("build", ["4.12", "4.19"])
def test_two_stage_walk_gives_the_p2m_frame_and_sets_accessed_and_dirty(build):
    g = Guest(build)
    gva = 0x300000 + 0x123
    assert all(not g.entry(gva, lv) & (A | D) for lv in (4, 3, 2, 1))
    ma, perms = g.mmu.translate(gva, "read")
    assert ma == g.pm.gpa_to_ma(gva & ~0xFFF)
    assert perms == PERM_R | PERM_X  # no write before the guest's D bit is set
    assert all(g.entry(gva, lv) & A for lv in (4, 3, 2, 1))
    assert not g.entry(gva, 1) & D
    ma, perms = g.mmu.translate(gva, "write")
    assert perms == PERM_R | PERM_W | PERM_X and g.entry(gva, 1) & D
    t = g.mmu.lookup(gva, "read")
    assert isinstance(t, Translation) and t.ma == ma


@settings(max_examples=40, deadline=None)
@given(st.integers(min_value=0, max_value=(8 * MB >> 12) - 1), st.sampled_from(["4.12", "4.19"]))
def test_every_ram_page_translates_to_its_p2m_frame(gfn, build):
    g = _guests[build]
    ma, _ = g.mmu.translate(gfn << 12, "read")
    assert ma == int(g.pm.p2m.mfns[gfn]) << 12


_guests = {b: Guest(b) for b in ("4.12", "4.19")}


def test_permissions_are_the_guests_and_epts_together():
    g = Guest()
    gva = 0x200000
    g.set_entry(gva, 1, g.entry(gva, 1) & ~RW | D)  # guest: read-only (already dirty)
    g.set_entry(gva + 0x1000, 1, g.entry(gva + 0x1000, 1) | NX | D)  # guest: no execute
    assert g.mmu.translate(gva, "read")[1] == PERM_R | PERM_X
    assert g.mmu.translate(gva + 0x1000, "read")[1] == PERM_R | PERM_W
    assert g.mmu.translate(gva, "write") is None
    fault = g.mmu.last_fault
    assert isinstance(fault, WalkFault) and fault.error_code == 0b11  # present, write
    # EPT read-only (log-dirty): the guest may write, EPT may not
    g.pm.enable_logdirty()
    tables = g.layout.page_tables >> 12
    for gfn in range(tables, tables + g.layout.nr_pt_pages):  # as after their A/D faults
        g.pm.mark_dirty(gfn)
    gva2 = 0x400000
    g.set_entry(gva2, 1, g.entry(gva2, 1) | A | D)
    assert g.mmu.translate(gva2, "read")[1] == PERM_R | PERM_X
    assert g.mmu.translate(gva2, "write") is None
    v = g.mmu.last_fault
    assert isinstance(v, EptViolation)
    assert (v.gpa, v.access, v.p2m_type, v.paging_structure) == \
        (gva2, "write", P2mType.RAM_LOGDIRTY, False)


def test_log_dirty_page_tables_fault_as_writes_because_of_ad_updates():
    g = Guest()
    g.pm.enable_logdirty()
    assert g.mmu.translate(0x500000, "read") is None
    v = g.mmu.last_fault
    assert isinstance(v, EptViolation) and v.paging_structure and v.access == "write"
    assert v.gfn == g.cr3 >> 12  # the L4 itself comes first
    assert g.mmu.needs_flush()  # log-dirty took rights away: TLBs must forget
    assert not g.mmu.needs_flush()


def test_pod_pages_and_pod_tables_are_violations_that_resolve_populates():
    g = Guest(pod=True)
    gva = 0x600000
    assert g.mmu.translate(gva, "read") is None
    v = g.mmu.last_fault
    assert isinstance(v, EptViolation) and v.p2m_type == P2mType.POPULATE_ON_DEMAND
    assert not v.paging_structure and v.gpa == gva
    # the hypervisor's own accesses serve PoD through `resolve`
    t = g.mmu.lookup(gva, "write")
    assert isinstance(t, Translation) and g.resolved[-1].gfn == gva >> 12
    assert g.pm.p2m_type(gva >> 12) is P2mType.RAM_RW
    assert g.mmu.translate(gva, "read") is not None
    # a guest table in a PoD page: the walker's access is the violation
    table_gpa = 0x400000  # 4-6 MiB is still all PoD
    g.set_entry(0x40000000, 3, table_gpa | P | RW)  # L3[1] -> an L2 in a PoD page
    assert g.mmu.translate(0x40000000, "read") is None
    v = g.mmu.last_fault
    assert v.paging_structure and v.gfn == table_gpa >> 12 and v.access == "read"


def test_unmapped_guest_physical_addresses_are_genuine_violations():
    g = Guest()
    g.set_entry(0x1000, 1, 0x7FFF0000 | P | RW)
    assert g.mmu.translate(0x1000, "read") is None
    v = g.mmu.last_fault
    assert isinstance(v, EptViolation) and v.p2m_type is None and v.gpa == 0x7FFF0000
    assert "nothing mapped there" in v.describe()
    assert isinstance(g.mmu.lookup(0x1000, "read"), WalkFault)  # resolve said no
    assert g.mmu.peek(0x1000, 8) is None


def test_the_lapic_page_exits_once_then_maps_the_mmio_window_never_executable():
    g = Guest()
    assert g.mmu.translate(LAPIC_GPA + 0x20, "read") is None
    assert g.mmu.last_fault.lapic
    g.mmu.lapic_mapped = True
    ma, perms = g.mmu.translate(LAPIC_GPA + 0x20, "write")
    assert ma == LAPIC_MA and perms == PERM_R | PERM_W
    assert g.mmu.translate(LAPIC_GPA, "fetch") is None and g.mmu.last_fault.lapic
    # the hypervisor never reads or writes the LAPIC page as memory
    assert isinstance(g.mmu.lookup(LAPIC_GPA, "read"), WalkFault)


def test_guest_page_faults_are_walk_faults_with_the_error_code():
    g = Guest()
    assert g.mmu.translate(0x1_0000_0000, "write") is None  # L3[4] not present
    fault = g.mmu.last_fault
    assert isinstance(fault, WalkFault) and fault.error_code == 0b10  # not present, write
    assert g.mmu.translate(0xFFFF_8000_0000_0000 - 0x1000, "read") is None  # non-canonical
