"""The PV TLB-fill fast path: the same answers as `paging.walk`, and no stale cached walks."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from emulator.engine import PERM_R, PERM_W, PERM_X, PhysicalCpu
from emulator.memory import HostMemory
from emulator.paging import ACCESSED, DIRTY, NX, PRESENT, PSE, RW, Translation, WalkFault, walk
from hypervisor.pv.mmu import PvMmu

FRAMES = 64
L4, L3, L2, L1, L1_OTHER = 1, 2, 3, 4, 5
DATA, DATA_OTHER = 20, 21
GVA = 0x0000_0040_0060_3000  # L4 slot 0, L3 slot 1, L2 slot 3, L1 slot 3


def _entry(mfn: int, flags: int = PRESENT | RW) -> int:
    return (mfn << 12) | flags


def _set(memory: HostMemory, table: int, slot: int, value: int) -> None:
    memory.u64[table * 512 + slot] = value


def _tree() -> tuple[HostMemory, PvMmu]:
    memory = HostMemory(FRAMES * 4096)
    _set(memory, L4, (GVA >> 39) & 511, _entry(L3))
    _set(memory, L3, (GVA >> 30) & 511, _entry(L2))
    _set(memory, L2, (GVA >> 21) & 511, _entry(L1))
    _set(memory, L1, (GVA >> 12) & 511, _entry(DATA))
    _set(memory, L1_OTHER, (GVA >> 12) & 511, _entry(DATA_OTHER))
    mmu = PvMmu(memory, gdt_ma=0)
    mmu.roots.kernel_ma = L4 << 12
    return memory, mmu


def _point_l2_at_other_l1(memory: HostMemory) -> None:
    _set(memory, L2, (GVA >> 21) & 511, _entry(L1_OTHER))


def test_a_flush_forgets_the_cached_upper_levels() -> None:
    memory, mmu = _tree()
    assert mmu.translate(GVA, "read") == (DATA << 12, PERM_R | PERM_X)
    _point_l2_at_other_l1(memory)
    mmu.flush()
    assert mmu.translate(GVA, "read") == (DATA_OTHER << 12, PERM_R | PERM_X)


def test_a_tlb_flush_of_the_cpu_flushes_its_mmu() -> None:
    memory, mmu = _tree()
    cpu = PhysicalCpu(0, memory)
    cpu.mmu = mmu
    assert cpu.read_virtual(GVA, 8) == bytes(8)
    memory.u64[DATA_OTHER * 512] = 0x1122334455667788
    _point_l2_at_other_l1(memory)
    cpu.flush_tlb()
    assert cpu.read_virtual(GVA, 8) == (0x1122334455667788).to_bytes(8, "little")


def test_a_new_root_never_uses_the_old_roots_walks() -> None:
    memory, mmu = _tree()
    assert mmu.translate(GVA, "read") == (DATA << 12, PERM_R | PERM_X)
    # A second tree sharing nothing above L1: L4' -> L3' -> L2' -> L1_OTHER.
    _set(memory, 10, (GVA >> 39) & 511, _entry(11))
    _set(memory, 11, (GVA >> 30) & 511, _entry(12))
    _set(memory, 12, (GVA >> 21) & 511, _entry(L1_OTHER))
    mmu.roots.kernel_ma = 10 << 12
    assert mmu.translate(GVA, "read") == (DATA_OTHER << 12, PERM_R | PERM_X)
    mmu.roots.kernel_ma = L4 << 12
    assert mmu.translate(GVA, "read") == (DATA << 12, PERM_R | PERM_X)


def test_without_the_cache_every_fill_walks_afresh() -> None:
    memory, mmu = _tree()
    mmu.cache_walks = False
    mmu.translate(GVA, "read")
    _point_l2_at_other_l1(memory)
    assert mmu.translate(GVA, "read") == (DATA_OTHER << 12, PERM_R | PERM_X)


def test_a_plugged_writable_mapping_rule_turns_the_cache_off() -> None:
    from hypervisor.core.seams import Seams
    from hypervisor.runner import boot_scenario
    from hypervisor.scenario import load_scenario
    from tests import SCENARIOS

    scenario = load_scenario(SCENARIOS / "pv-hello.toml")
    own = boot_scenario(scenario)
    plugged = boot_scenario(scenario, seams=Seams(writable_mapping=lambda typing, mfn: 0))
    assert all(v.mmu.cache_walks for d in own.domains for v in d.vcpus)
    assert not any(v.mmu.cache_walks for d in plugged.domains for v in d.vcpus)


def test_an_unflushed_cache_is_what_the_flush_is_for() -> None:
    """Without a flush the cached L2 entry is used (hardware may do the same): this is
    the staleness the flushes above exist to prevent, shown to be observable."""
    memory, mmu = _tree()
    mmu.translate(GVA, "read")
    _point_l2_at_other_l1(memory)
    assert mmu.translate(GVA, "read") == (DATA << 12, PERM_R | PERM_X)


FLAG_BITS = st.sampled_from([PRESENT, RW, ACCESSED, DIRTY, NX, PSE])


@settings(max_examples=150, deadline=None)
@given(flags=st.lists(st.lists(FLAG_BITS, max_size=6), min_size=4, max_size=4),
       accesses=st.lists(st.sampled_from(["read", "write", "fetch"]), min_size=1, max_size=6),
       flush_between=st.booleans())
def test_the_fast_path_answers_like_the_walker(flags, accesses, flush_between) -> None:
    """Any mix of entry flags, any sequence of accesses: same result, same A/D bits."""
    fast_mem, mmu = _tree()
    ref_mem = HostMemory(FRAMES * 4096)
    for table, slot_shift, target in ((L4, 39, L3), (L3, 30, L2), (L2, 21, L1), (L1, 12, DATA)):
        bits = 0
        for b in flags[(L4, L3, L2, L1).index(table)]:
            bits |= b
        _set(fast_mem, table, (GVA >> slot_shift) & 511, _entry(target, bits))
    ref_mem.u64[:] = fast_mem.u64
    for access in accesses:
        got = mmu.translate(GVA | 0x18, access)
        want = walk(ref_mem.u64, L4 << 12, GVA | 0x18, access)
        if isinstance(want, WalkFault):
            assert got is None and mmu.last_fault == want
        else:
            assert isinstance(want, Translation)
            perms = PERM_R | (PERM_W if want.writable and want.dirty else 0) | (
                PERM_X if want.executable else 0)
            assert got == (want.ma, perms)
        assert np.array_equal(fast_mem.u64, ref_mem.u64)
        if flush_between:
            mmu.flush()


def test_a_page_table_hypercall_empties_every_vcpus_cache() -> None:
    """After mmu_update / mmuext_op, a guest may flush with a native mov cr3 the
    hypervisor never sees: no vCPU of the domain may keep walks from before."""
    from hypervisor.core.hypercalls import HYPERVISOR_MMUEXT_OP, call
    from hypervisor.mm.frametable import DOMID_SELF
    from hypervisor.pv.xen.hypercalls import PV_HYPERCALLS
    from hypervisor.runner import boot_scenario
    from hypervisor.scenario import load_scenario
    from tests import SCENARIOS

    scenario = load_scenario(SCENARIOS / "pv-smp.toml")
    hv = boot_scenario(scenario)
    hv.run(scenario.virtual_time_ns // 20)
    vcpus = hv.domains[0].vcpus
    assert len(vcpus) >= 2
    assert any(v.mmu._upper for v in vcpus)  # the guest's own fills left walks cached
    assert call(PV_HYPERCALLS, hv, vcpus[0], HYPERVISOR_MMUEXT_OP, (0, 0, 0, DOMID_SELF)) == 0
    assert not any(v.mmu._upper for v in vcpus)
