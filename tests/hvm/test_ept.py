"""EPT tables in host memory and the HVM P2M (hypervisor/hvm/ept.py, hypervisor/hvm/p2m.py)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hypervisor.hvm.ept import (
    DEFAULT_ACCESS,
    EPT_LAYOUTS,
    INVALID_MFN,
    EptError,
    EptLayout,
    EptTables,
    P2mAccess,
    P2mType,
)
from hypervisor.hvm.p2m import P2M, P2MError

LAYOUTS = sorted(EPT_LAYOUTS)
GIB_PAGES = 512 * 512
UNBACKED = {
    P2mType.INVALID,
    P2mType.MMIO_DM,
    P2mType.POPULATE_ON_DEMAND,
    P2mType.RAM_PAGED,
    P2mType.RAM_PAGING_IN,
}
# Hand table of Xen's ept_p2m_type_to_flags (no PML) and access restrictions.
TYPE_PERMS = {
    P2mType.RAM_RW: 0b111,
    P2mType.RAM_LOGDIRTY: 0b101,
    P2mType.RAM_RO: 0b101,
    P2mType.MMIO_DIRECT: 0b111,
    P2mType.GRANT_MAP_RW: 0b011,
    P2mType.GRANT_MAP_RO: 0b001,
    P2mType.RAM_SHARED: 0b101,
    P2mType.MAP_FOREIGN: 0b011,
    P2mType.IOREQ_SERVER: 0b001,
}
ACCESS_PERMS = {a: int(a) for a in P2mAccess if a <= P2mAccess.RWX}
ACCESS_PERMS |= {P2mAccess.RX2RW: 0b101, P2mAccess.N2RWX: 0}


class Frames:
    """Host memory plus a frame allocator that remembers what it handed out."""

    def __init__(self, n_frames: int = 2048, limit: int | None = None) -> None:
        self.mem = np.zeros(n_frames * 512, dtype=np.uint64)
        self.free = list(range(n_frames - 1, 0, -1))  # frame 0 never handed out
        self.used: set[int] = set()
        self.limit = limit

    def alloc(self) -> int:
        if self.limit is not None and len(self.used) >= self.limit:
            raise MemoryError("test allocator: out of frames")
        f = self.free.pop()
        self.mem[f * 512 : (f + 1) * 512] = 0
        self.used.add(f)
        return f

    def release(self, f: int) -> None:
        assert f in self.used, f"frame {f} freed but not allocated"
        self.used.remove(f)
        self.free.append(f)

    def build(self, layout: str, mfn, typ, acc, **kw) -> EptTables:
        return EptTables.build(
            self.mem, EPT_LAYOUTS[layout], mfn, typ, acc, self.alloc, self.release, **kw
        )


# -- random P2Ms ------------------------------------------------------------------------

BLOCK_KINDS = ["empty", "ram", "pod", "mixed", "broken_run", "misaligned", "uniform_type"]


def make_p2m(kinds: list[str], tail: int, seed: int):
    """P2M arrays from one kind per 2 MiB block (+ a partial tail block of mixed pages)."""
    rng = np.random.default_rng(seed)
    n = 512 * len(kinds) + tail
    mfn = np.full(n, INVALID_MFN, dtype=np.uint64)
    typ = np.full(n, P2mType.INVALID, dtype=np.uint8)
    acc = np.full(n, DEFAULT_ACCESS, dtype=np.uint8)
    all_types = np.array([int(t) for t in P2mType], dtype=np.uint8)
    all_access = np.array([int(a) for a in P2mAccess], dtype=np.uint8)

    def mixed(lo: int, hi: int) -> None:
        typ[lo:hi] = rng.choice(all_types, hi - lo)
        acc[lo:hi] = rng.choice(all_access, hi - lo)
        mfn[lo:hi] = rng.integers(0, 1 << 40, hi - lo, dtype=np.uint64)

    for b, kind in enumerate(kinds):
        lo, hi = b * 512, (b + 1) * 512
        base = np.uint64(int(rng.integers(1, 1 << 20)) * 512)
        run = base + np.arange(512, dtype=np.uint64)
        if kind == "ram":
            typ[lo:hi], acc[lo:hi], mfn[lo:hi] = int(rng.choice([0, 2, 3, 5])), 7, run
        elif kind == "pod":
            typ[lo:hi], acc[lo:hi] = P2mType.POPULATE_ON_DEMAND, int(rng.choice(all_access))
        elif kind == "mixed":
            mixed(lo, hi)
        elif kind == "broken_run":  # contiguous RAM, one page of another type
            typ[lo:hi], acc[lo:hi], mfn[lo:hi] = P2mType.RAM_RW, 7, run
            typ[lo + int(rng.integers(512))] = P2mType.RAM_RO
        elif kind == "misaligned":  # contiguous but not 2 MiB-aligned in host memory
            typ[lo:hi], acc[lo:hi], mfn[lo:hi] = P2mType.RAM_RW, 7, run + np.uint64(1)
        elif kind == "uniform_type":  # one type, scattered frames
            typ[lo:hi], acc[lo:hi] = P2mType.RAM_RW, 7
            mfn[lo:hi] = rng.permutation(run)
    mixed(512 * len(kinds), n)
    unbacked = np.isin(typ, [int(t) for t in UNBACKED])
    mfn[unbacked] = INVALID_MFN
    acc[typ == P2mType.INVALID] = DEFAULT_ACCESS
    return mfn, typ, acc


def expected_levels(mfn, typ, acc) -> list[int]:
    """Plain reference: the leaf level each gfn should get (0 unmapped), P2Ms < 1 GiB."""
    n = len(typ)
    levels = [0 if typ[g] == P2mType.INVALID else 1 for g in range(n)]
    for lo in range(0, n - 511, 512):
        t0, a0, m0 = int(typ[lo]), int(acc[lo]), int(mfn[lo])
        same = all(int(typ[lo + i]) == t0 and int(acc[lo + i]) == a0 for i in range(512))
        contiguous = t0 in UNBACKED or (
            m0 % 512 == 0 and all(int(mfn[lo + i]) == m0 + i for i in range(512))
        )
        if same and contiguous and t0 != P2mType.INVALID:
            levels[lo : lo + 512] = [2] * 512
    return levels


def assert_translates(ept: EptTables, mfn, typ, acc, levels=None) -> None:
    n = len(typ)
    gfns = np.arange(n + 700)  # a bit past the end: unmapped
    got = ept.lookup_many(gfns)
    np.testing.assert_array_equal(got.mfn[:n], mfn)
    np.testing.assert_array_equal(got.p2m_type[:n], typ)
    np.testing.assert_array_equal(got.access[:n], acc)
    assert (got.p2m_type[n:] == P2mType.INVALID).all() and (got.level[n:] == 0).all()
    perms = [
        TYPE_PERMS.get(P2mType(int(t)), 0) & ACCESS_PERMS[P2mAccess(int(a))]
        for t, a in zip(typ, acc, strict=True)
    ]
    np.testing.assert_array_equal(got.perms[:n], perms)
    if levels is not None:
        np.testing.assert_array_equal(got.level[:n], levels)
    # Single walks read the same tables.
    sample = range(0, n, max(1, n // 300))
    for g in sample:
        w = ept.walk(g << 12 | 0xABC)
        if typ[g] == P2mType.INVALID:
            assert w is None
            continue
        assert w is not None
        assert (w.mfn, w.p2m_type, w.access) == (int(mfn[g]), int(typ[g]), int(acc[g]))
        assert (w.level, w.perms) == (int(got.level[g]), int(got.perms[g]))


p2m_blocks = st.lists(st.sampled_from(BLOCK_KINDS), min_size=0, max_size=5)


@pytest.mark.parametrize("layout", LAYOUTS)
@settings(max_examples=25, deadline=None)
@given(kinds=p2m_blocks, tail=st.integers(0, 511), seed=st.integers(0, 2**32 - 1))
def test_random_p2m_round_trips_through_ept(layout, kinds, tail, seed) -> None:
    frames = Frames()
    mfn, typ, acc = make_p2m(kinds, tail, seed)
    ept = frames.build(layout, mfn, typ, acc)
    assert_translates(ept, mfn, typ, acc, expected_levels(mfn, typ, acc))
    # Tables are exactly the ones the build allocated; destroy gives all back.
    assert set(ept.frames) == frames.used
    ept.destroy()
    assert frames.used == set()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_one_gib_guest_uses_1g_2m_and_4k_leaves(layout) -> None:
    frames = Frames()
    n = GIB_PAGES + 3 * 512
    mfn = np.full(n, INVALID_MFN, dtype=np.uint64)
    typ = np.full(n, P2mType.RAM_RW, dtype=np.uint8)
    acc = np.full(n, P2mAccess.RWX, dtype=np.uint8)
    mfn[:GIB_PAGES] = np.arange(GIB_PAGES, dtype=np.uint64) + 3 * GIB_PAGES  # 1G-aligned
    mfn[GIB_PAGES : GIB_PAGES + 512] = np.arange(512, dtype=np.uint64) + 5 * 512
    typ[GIB_PAGES + 512 : GIB_PAGES + 1024] = P2mType.POPULATE_ON_DEMAND
    mfn[GIB_PAGES + 1024 :] = np.arange(512, dtype=np.uint64)[::-1] + 7 * 512
    ept = frames.build(layout, mfn, typ, acc)
    levels = np.array([3] * GIB_PAGES + [2] * 1024 + [1] * 512)
    assert_translates(ept, mfn, typ, acc, levels)
    assert len(ept.frames) == 4  # root, one L3 table, one L2 table, one L1 table

    # Same P2M with 2 MiB leaves at most: the first GiB becomes 512 2M leaves.
    ept2 = frames.build(layout, mfn, typ, acc, max_leaf_level=2)
    levels[:GIB_PAGES] = 2
    assert_translates(ept2, mfn, typ, acc, levels)
    ept.destroy()
    ept2.destroy()
    assert frames.used == set()


def test_one_gib_of_scattered_frames_maps_every_page() -> None:
    frames = Frames(n_frames=1024)
    rng = np.random.default_rng(7)
    mfn = rng.permutation(GIB_PAGES).astype(np.uint64) + 4096
    typ = np.zeros(GIB_PAGES, dtype=np.uint8)
    acc = np.full(GIB_PAGES, 7, dtype=np.uint8)
    ept = frames.build("4.19", mfn, typ, acc)
    got = ept.lookup_many(np.arange(GIB_PAGES))
    np.testing.assert_array_equal(got.mfn, mfn)
    assert (got.level == 1).all()
    assert len(ept.frames) == 1 + 1 + 1 + 512


# -- raw entry bits -----------------------------------------------------------------------


def test_layouts_put_software_bits_where_xen_does() -> None:
    new, old = EPT_LAYOUTS["4.19"], EPT_LAYOUTS["4.12"]
    assert (new.type_shift, new.type_width, new.access_shift, new.recalc_bit) == (52, 6, 59, 10)
    assert (old.type_shift, old.type_width, old.access_shift, old.recalc_bit) == (52, 6, 58, 10)
    # 4 KiB ram_rw, rwx: R|W|X, WB(6)<<3, ipat, mfn<<12, type 0, access 7, suppress-#VE.
    assert new.encode_leaf(0x12345, P2mType.RAM_RW, P2mAccess.RWX) == 0xB800_0000_1234_5077
    assert old.encode_leaf(0x12345, P2mType.RAM_RW, P2mAccess.RWX) == 0x9C00_0000_1234_5077
    # 2 MiB log-dirty, access rw: R|X from the type, W|R from access -> R only; sp bit 7.
    e = 0x8000_0000_0000_0000 | (3 << 59) | (2 << 52) | (0x400 << 12) | 0x80 | 0x70 | 0x1
    assert new.encode_leaf(0x400, P2mType.RAM_LOGDIRTY, P2mAccess.RW, level=2) == e
    # PoD: nothing present, no frame, no memory type; type 6 in bits 52-57.
    assert new.encode_leaf(0, P2mType.POPULATE_ON_DEMAND, P2mAccess.RWX) == (
        (1 << 63) | (7 << 59) | (6 << 52)
    )
    # MMIO direct: UC (0) with ipat, rwx; recalc bit 10 when asked.
    assert old.encode_leaf(0xFEE00, P2mType.MMIO_DIRECT, P2mAccess.RWX, recalc=True) == (
        (1 << 63) | (7 << 58) | (5 << 52) | (0xFEE00 << 12) | (1 << 10) | 0x40 | 0x7
    )
    assert new.encode_leaf(123, P2mType.INVALID, P2mAccess.N) == 0
    fields = new.decode_entry(0xB800_0000_1234_5077)
    assert fields == (7, 6, 1, 0, 0, 0, 0, 0x12345, P2mType.RAM_RW, P2mAccess.RWX, 1)
    arr = new.decode(np.array([0xB800_0000_1234_5077, e], dtype=np.uint64))
    assert list(arr.p2m_type) == [0, 2] and list(arr.access) == [7, 3]
    assert list(arr.superpage) == [False, True] and list(arr.mfn) == [0x12345, 0x400]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tables_in_host_memory_have_hardware_format(layout) -> None:
    frames = Frames()
    mfn = np.arange(1024, dtype=np.uint64) + 512 * 9
    typ = np.zeros(1024, dtype=np.uint8)
    typ[512 + 1] = P2mType.RAM_RO  # second 2M block needs 4K entries
    acc = np.full(1024, 7, dtype=np.uint8)
    ept = frames.build(layout, mfn, typ, acc)
    root = ept.root_mfn
    assert ept.eptp == (root << 12) | (3 << 3) | 6
    mem = frames.mem
    l4e = int(mem[root * 512])
    assert l4e & 0xFFF == 0x007 and (l4e >> 63) == 0
    l3 = (l4e >> 12) & ((1 << 40) - 1)
    l3e = int(mem[l3 * 512])
    l2 = (l3e >> 12) & ((1 << 40) - 1)
    ram_bits = 1 << 63 | 7 << EPT_LAYOUTS[layout].access_shift | 0x77
    assert int(mem[l2 * 512]) == ram_bits | 0x80 | (512 * 9) << 12  # 2M leaf
    l1 = (int(mem[l2 * 512 + 1]) >> 12) & ((1 << 40) - 1)
    assert int(mem[l2 * 512 + 1]) == l1 << 12 | 7
    assert int(mem[l1 * 512]) == ram_bits | (512 * 10) << 12
    ro = int(mem[l1 * 512 + 1])
    assert ro == (ram_bits & ~2) | 3 << 52 | (512 * 10 + 1) << 12
    assert not mem[l2 * 512 + 2 : l2 * 512 + 512].any()


def test_a_build_cannot_read_the_other_builds_entries() -> None:
    """Same p2m-type bits in both layouts, but access moved by one bit (Xen 4.20's move):
    reading the old tables with the new layout loses execute permission on all RAM, and
    the new tables read by the old layout give access values that do not exist."""
    frames = Frames()
    mfn = np.arange(2048, dtype=np.uint64) + 512 * 4
    typ = np.tile(np.array([0, 2, 3, 5], dtype=np.uint8), 512)
    acc = np.full(2048, P2mAccess.RWX, dtype=np.uint8)
    old = frames.build("4.12", mfn, typ, acc)
    misread = EptTables.from_eptp(
        frames.mem, old.eptp, EPT_LAYOUTS["4.19"], frames.alloc, frames.release
    )
    assert misread.frames == old.frames
    got = misread.lookup_many(np.arange(2048))
    np.testing.assert_array_equal(got.p2m_type, typ)
    assert (got.access == P2mAccess.RW).all()  # rwx at 58-61 read from 59-62
    rederived = [
        TYPE_PERMS.get(P2mType(int(t)), 0) & ACCESS_PERMS[P2mAccess(int(a))]
        for t, a in zip(got.p2m_type, got.access, strict=True)
    ]
    assert not any(p & 4 for p in rederived)  # a rebuild from these bits: nothing executes
    assert (got.perms & 4).all()  # while the hardware bits still allow it

    new = frames.build("4.19", mfn, typ, acc)
    back = EptTables.from_eptp(
        frames.mem, new.eptp, EPT_LAYOUTS["4.12"], frames.alloc, frames.release
    )
    accesses = set(back.lookup_many(np.arange(2048)).access.tolist())
    assert accesses == {0b1110} and 0b1110 not in set(P2mAccess)
    # The P2M is what survives: rebuilding in the new layout gives the right answer.
    p2m = P2M(2048)
    p2m.set_range(0, mfn, typ, acc)
    rebuilt = p2m.build_ept(EPT_LAYOUTS["4.19"], frames.mem, frames.alloc, frames.release)
    np.testing.assert_array_equal(rebuilt.lookup_many(np.arange(2048)).access, acc)
    # Adopting needs only hardware bits, so the new build can free the old tables.
    misread.destroy()
    back.destroy()
    rebuilt.destroy()
    assert frames.used == set()


# -- updates ----------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_set_entry_splits_a_1g_superpage_and_keeps_the_rest(layout) -> None:
    frames = Frames()
    mfn = np.arange(GIB_PAGES, dtype=np.uint64) + GIB_PAGES
    typ = np.zeros(GIB_PAGES, dtype=np.uint8)
    acc = np.full(GIB_PAGES, 7, dtype=np.uint8)
    ept = frames.build(layout, mfn, typ, acc)
    assert ept.walk(0).level == 3
    gen = ept.generation
    g = 3 * 512 + 17
    ept.set_entry(g, 0x777, P2mType.RAM_RO, P2mAccess.RX)
    assert ept.generation > gen
    mfn[g], typ[g], acc[g] = 0x777, P2mType.RAM_RO, P2mAccess.RX
    levels = np.full(GIB_PAGES, 2)
    levels[3 * 512 : 4 * 512] = 1
    assert_translates(ept, mfn, typ, acc, levels)
    assert len(ept.frames) == 4  # root, L3, new L2 from the split, new L1 from the split
    # The split tables hold exactly the entries a fresh encoding would give.
    lay = EPT_LAYOUTS[layout]
    (l2,) = [f for f, lv in ept.frames.items() if lv == 2]
    (l1,) = [f for f, lv in ept.frames.items() if lv == 1]
    l2_want = [lay.encode_leaf(GIB_PAGES + 512 * i, 0, 7, level=2) for i in range(512)]
    l2_want[3] = l1 << 12 | 7
    np.testing.assert_array_equal(frames.mem[l2 * 512 : (l2 + 1) * 512], l2_want)
    l1_want = [lay.encode_leaf(int(mfn[g0]), typ[g0], acc[g0]) for g0 in range(1536, 2048)]
    np.testing.assert_array_equal(frames.mem[l1 * 512 : (l1 + 1) * 512], l1_want)
    # Setting what a superpage already says splits nothing.
    ept.set_entry(9 * 512 + 1, int(mfn[9 * 512 + 1]), P2mType.RAM_RW, P2mAccess.RWX)
    assert len(ept.frames) == 4 and ept.walk((9 * 512 + 1) << 12).level == 2
    # Unmapping in a PoD-free hole that has no tables needs no frames either.
    ept.set_entry(5 * GIB_PAGES, 0, P2mType.INVALID, P2mAccess.RWX)
    assert len(ept.frames) == 4
    ept.destroy()
    assert frames.used == set()


@pytest.mark.parametrize("layout", LAYOUTS)
@settings(max_examples=20, deadline=None)
@given(
    kinds=p2m_blocks,
    seed=st.integers(0, 2**32 - 1),
    ops=st.lists(
        st.tuples(
            st.integers(0, 5 * 512 + 100),
            st.sampled_from(list(P2mType)),
            st.sampled_from(list(P2mAccess)),
            st.integers(0, (1 << 40) - 1),
        ),
        max_size=12,
    ),
)
def test_set_entries_match_a_model(layout, kinds, seed, ops) -> None:
    frames = Frames()
    mfn, typ, acc = make_p2m(kinds, 100, seed)
    n = 5 * 512 + 101
    pad = n - len(typ)
    mfn = np.concatenate([mfn, np.full(pad, INVALID_MFN, dtype=np.uint64)])
    typ = np.concatenate([typ, np.full(pad, P2mType.INVALID, dtype=np.uint8)])
    acc = np.concatenate([acc, np.full(pad, DEFAULT_ACCESS, dtype=np.uint8)])
    ept = frames.build(layout, mfn, typ, acc)
    for g, t, a, m in ops:
        ept.set_entry(g, m, t, a)
        mfn[g] = INVALID_MFN if t in UNBACKED else m
        typ[g] = t
        acc[g] = DEFAULT_ACCESS if t == P2mType.INVALID else a
    assert_translates(ept, mfn, typ, acc)
    assert set(ept.frames) == frames.used
    ept.destroy()
    assert frames.used == set()


def test_running_out_of_frames_changes_nothing() -> None:
    frames = Frames()
    mfn = np.arange(GIB_PAGES, dtype=np.uint64) + GIB_PAGES
    typ = np.zeros(GIB_PAGES, dtype=np.uint8)
    acc = np.full(GIB_PAGES, 7, dtype=np.uint8)
    frames.limit = 1  # the root only
    with pytest.raises(MemoryError):
        frames.build("4.19", mfn, typ, acc)
    assert frames.used == set()
    frames.limit = 3  # a split of the 1G leaf down to 4K needs two more
    ept = frames.build("4.19", mfn, typ, acc)
    before = frames.mem.copy()
    with pytest.raises(MemoryError):
        ept.set_entry(5, 1, P2mType.RAM_RW, P2mAccess.RWX)
    np.testing.assert_array_equal(frames.mem, before)
    assert set(ept.frames) == frames.used and len(frames.used) == 2


def test_bad_input_is_refused_cleanly() -> None:
    frames = Frames()
    ok = (np.arange(4, dtype=np.uint64), np.zeros(4, np.uint8), np.full(4, 7, np.uint8))
    with pytest.raises(EptError, match="unknown p2m type 16"):
        frames.build("4.19", ok[0], np.full(4, 16), ok[2])
    with pytest.raises(EptError, match="unknown p2m access 10"):
        frames.build("4.19", ok[0], ok[1], np.full(4, 10))
    with pytest.raises(EptError, match="needs an mfn"):
        frames.build("4.19", np.full(4, INVALID_MFN, dtype=np.uint64), ok[1], ok[2])
    with pytest.raises(EptError, match="one length"):
        frames.build("4.19", ok[0][:3], ok[1], ok[2])
    assert frames.used == set()
    with pytest.raises(EptError, match="used by the CPU"):
        EptLayout("bad", type_shift=48, type_width=6, access_shift=58, access_width=4,
                  recalc_bit=10)
    with pytest.raises(EptError, match="overlap"):
        EptLayout("bad", type_shift=52, type_width=6, access_shift=56, access_width=4,
                  recalc_bit=10)
    ept = frames.build("4.19", *ok)
    before = frames.mem.copy()
    with pytest.raises(EptError, match="40-bit"):
        ept.set_entry(1, 1 << 40, P2mType.RAM_RW, P2mAccess.RWX)
    with pytest.raises(EptError, match="beyond"):
        ept.set_entry(1 << 36, 1, P2mType.RAM_RW, P2mAccess.RWX)
    with pytest.raises(EptError, match="not a write-back 4-level EPTP"):
        EptTables.from_eptp(frames.mem, ept.root_mfn << 12, EPT_LAYOUTS["4.19"],
                            frames.alloc, frames.release)
    np.testing.assert_array_equal(frames.mem, before)
    assert ept.walk(1 << 48) is None
    ept.destroy()
    with pytest.raises(EptError, match="destroyed"):
        ept.walk(0)


# -- P2M --------------------------------------------------------------------------------


def ram_p2m(n: int = 2048) -> P2M:
    p2m = P2M(n)
    p2m.set_range(0, np.arange(n, dtype=np.uint64) + 512 * 8, P2mType.RAM_RW)
    return p2m


@pytest.mark.parametrize("layout", LAYOUTS)
def test_logdirty_round_trip(layout) -> None:
    frames = Frames()
    p2m = ram_p2m()
    ept = p2m.build_ept(EPT_LAYOUTS[layout], frames.mem, frames.alloc, frames.release)
    p2m.enable_logdirty()
    assert (p2m.types == P2mType.RAM_LOGDIRTY).all()
    w = ept.walk(700 << 12)
    assert (w.p2m_type, w.perms, w.level) == (P2mType.RAM_LOGDIRTY, 0b101, 2)
    p2m.mark_dirty(700)
    p2m.mark_dirty(3)
    p2m.mark_dirty(700)
    w = ept.walk(700 << 12)
    assert (w.p2m_type, w.perms, w.level, w.mfn) == (P2mType.RAM_RW, 0b111, 1, 512 * 8 + 700)
    assert ept.walk(701 << 12).p2m_type == P2mType.RAM_LOGDIRTY  # split, neighbour kept
    assert_translates(ept, p2m.mfns, p2m.types, p2m.accesses)
    assert p2m.take_dirty().tolist() == [3, 700]
    assert ept.walk(700 << 12).p2m_type == P2mType.RAM_LOGDIRTY  # write-protected again
    assert p2m.take_dirty().tolist() == []
    p2m.mark_dirty(1500)
    p2m.disable_logdirty()
    assert (p2m.types == P2mType.RAM_RW).all()
    assert_translates(ept, p2m.mfns, p2m.types, p2m.accesses)
    with pytest.raises(P2MError, match="not enabled"):
        p2m.mark_dirty(1)
    p2m.drop_ept()
    assert frames.used == set()


def test_pod_populate() -> None:
    frames = Frames()
    p2m = P2M(1024)
    p2m.mark_pod(0, 1024)
    assert p2m.pod_entries == 1024
    ept = p2m.build_ept(EPT_LAYOUTS["4.19"], frames.mem, frames.alloc, frames.release)
    w = ept.walk(600 << 12)
    assert (w.p2m_type, w.mfn, w.perms, w.level) == (
        P2mType.POPULATE_ON_DEMAND, INVALID_MFN, 0, 2
    )
    p2m.populate(600, 0x4242)
    assert p2m.pod_entries == 1023
    assert p2m.lookup(600).p2m_type == P2mType.RAM_RW
    w = ept.walk(600 << 12 | 5)
    assert (w.p2m_type, w.mfn, w.perms, w.level) == (P2mType.RAM_RW, 0x4242, 7, 1)
    assert ept.walk(601 << 12).p2m_type == P2mType.POPULATE_ON_DEMAND
    before = p2m.save()
    with pytest.raises(P2MError, match="not populate-on-demand"):
        p2m.populate(600, 0x4343)
    with pytest.raises(P2MError, match="maps no frame"):
        p2m.set_entry(601, 5, P2mType.POPULATE_ON_DEMAND)
    with pytest.raises(P2MError, match="outside this P2M"):
        p2m.populate(1024, 1)
    assert p2m.save() == before
    assert_translates(ept, p2m.mfns, p2m.types, p2m.accesses)


def test_p2m_state_round_trip_and_rebuild_in_another_layout() -> None:
    frames = Frames()
    mfn, typ, acc = make_p2m(["ram", "mixed", "pod", "empty"], 37, seed=11)
    p2m = P2M(len(typ))
    p2m.set_range(0, mfn, typ, acc)
    old_ept = p2m.build_ept(EPT_LAYOUTS["4.12"], frames.mem, frames.alloc, frames.release)
    p2m.enable_logdirty()
    p2m.mark_dirty(int(np.flatnonzero(p2m.types == P2mType.RAM_LOGDIRTY)[0]))
    state = p2m.save()
    assert all(isinstance(v, bytes | int | bool) for v in vars(state).values())
    restored = P2M.restore(state)
    assert restored.ept is None and restored.logdirty
    for name in ("mfns", "types", "accesses"):
        np.testing.assert_array_equal(getattr(restored, name), getattr(p2m, name))
    assert restored.save() == state
    new_ept = restored.build_ept(EPT_LAYOUTS["4.19"], frames.mem, frames.alloc, frames.release)
    a, b = old_ept.lookup_many(np.arange(len(typ))), new_ept.lookup_many(np.arange(len(typ)))
    for field in ("mfn", "p2m_type", "access", "level", "perms"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert restored.take_dirty().size == 1
    with pytest.raises(P2MError, match="mfn must be"):
        P2M.restore(P2M.State(2, b"\0" * 15, b"\0\0", b"\7\7", False, b"\0"))
    with pytest.raises(P2MError, match="unknown p2m type"):
        P2M.restore(P2M.State(1, b"\0" * 8, b"\x20", b"\7", False, b"\0"))
    with pytest.raises(P2MError, match="dirty bits without"):
        P2M.restore(P2M.State(1, b"\0" * 8, b"\0", b"\7", False, b"\1"))


def test_p2m_bulk_update_with_ept_attached_keeps_eptp() -> None:
    frames = Frames()
    p2m = ram_p2m(GIB_PAGES)
    ept = p2m.build_ept(EPT_LAYOUTS["4.19"], frames.mem, frames.alloc, frames.release)
    eptp = ept.eptp
    rng = np.random.default_rng(3)
    scattered = rng.permutation(8192).astype(np.uint64) + 1_000_000
    p2m.set_range(4096, scattered, P2mType.RAM_RW, P2mAccess.RX)  # above the threshold
    p2m.set_range(100, np.arange(3, dtype=np.uint64) + 9, [0, 3, 5])  # below it
    assert ept.eptp == eptp
    assert_translates(ept, p2m.mfns, p2m.types, p2m.accesses)
    assert set(ept.frames) == frames.used
    with pytest.raises(P2MError, match="run past"):
        p2m.set_range(GIB_PAGES - 1, np.arange(2, dtype=np.uint64), P2mType.RAM_RW)
    with pytest.raises(P2MError, match="already has EPT"):
        p2m.build_ept(EPT_LAYOUTS["4.19"], frames.mem, frames.alloc, frames.release)
    p2m.drop_ept()
    assert frames.used == set()
