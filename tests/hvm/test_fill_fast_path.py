"""The HVM TLB-fill fast path answers exactly like the two-stage `_walk` it replaces."""

from __future__ import annotations

import numpy as np

from emulator.engine import PERM_R, PERM_W, PERM_X
from emulator.paging import ADDR_MASK
from hypervisor.hvm.ept import PERM_W as EPT_W
from hypervisor.hvm.ept import PERM_X as EPT_X
from hypervisor.hvm.ept import P2mAccess, P2mType
from hypervisor.hvm.mmu import LAPIC_GFN
from hypervisor.runner import boot_scenario
from hypervisor.scenario import load_scenario
from tests import SCENARIOS


def _reference(mmu, gva: int, access: str):
    """What `translate` answered before the fast path: `_walk`, then the TLB's rights."""
    result = mmu._walk(gva, access)
    if not isinstance(result, tuple):
        return result
    t, ept_perms, is_lapic = result
    perms = PERM_R
    if t.writable and t.dirty and ept_perms & EPT_W:
        perms |= PERM_W
    if t.executable and ept_perms & EPT_X and not is_lapic:
        perms |= PERM_X
    return t.ma, perms


def _addresses() -> list[int]:
    low = list(range(0, 40 << 20, (1 << 20) + 0x3000))  # RAM, beyond RAM
    return [*low, LAPIC_GFN << 12, 0xFFFF_8000_0000_0000, 0x0000_8000_0000_0000,
            0x7F_FFFF_F000, 0xFFFF_FFFF_FFFF_F000]


def _table_gfns(mmu, gva: int) -> list[int]:
    """Guest-physical frames of the four guest tables a walk of `gva` reads."""
    ept, mem = mmu.physmap.p2m.ept, mmu.memory.u64
    gfns = [(mmu.cr3() & ADDR_MASK) >> 12]
    for shift in (39, 30, 21):
        mfn = int(ept.walk(gfns[-1] << 12).mfn)
        gfns.append((int(mem[mfn * 512 + ((gva >> shift) & 511)]) & ADDR_MASK) >> 12)
    return gfns


def _read_only(ept, gfn: int) -> None:
    ept.set_entry(gfn, ept.walk(gfn << 12).mfn, P2mType.RAM_RO, P2mAccess.RWX)


def test_fast_fills_equal_walks_with_the_same_ad_bits() -> None:
    scenario = load_scenario(SCENARIOS / "hvm-memtouch.toml")
    hv = boot_scenario(scenario)
    hv.run(scenario.virtual_time_ns // 50)  # part-way: some memory populated, some not
    mmu = hv.domains[0].vcpus[0].mmu
    mem = hv.memory.u64
    # Second sweep: the LAPIC page mapped, a data page and the L1 table of another
    # address write-protected in EPT (a table access then needs write: a violation).
    ept = mmu.physmap.p2m.ept
    mapped = [gva for gva in _addresses() if isinstance(_reference(mmu, gva, "read"), tuple)]
    data, table = mapped[-1], mapped[0]
    compared = faults = 0
    for sweep in range(2):
        if sweep == 1:
            mmu.lapic_mapped = True
            _read_only(ept, data >> 12)
            _read_only(ept, _table_gfns(mmu, table)[3])
        for gva in _addresses():
            for access in ("read", "write", "fetch"):
                before = mem.copy()
                want = _reference(mmu, gva, access)
                after_reference = mem.copy()
                mem[:] = before
                got = mmu._fill(gva, access)
                assert got == want, (hex(gva), access)
                assert np.array_equal(mem, after_reference), (hex(gva), access)
                compared += 1
                faults += not isinstance(want, tuple)
    assert compared == 2 * 3 * len(_addresses()) and 0 < faults < compared
    assert mmu._fill(data, "read") == (int(ept.walk(data).mfn) << 12, PERM_R | PERM_X)
    assert mmu._fill(table, "read").paging_structure
