"""Builds, the frame table and the reference typing rules (hypervisor.mm.typerefs)."""

from __future__ import annotations

import numpy as np
import pytest

from hypervisor.mm.builds import BUILDS, UNDEFINED_TYPE, BuildError, PageType, get_build
from hypervisor.mm.check import check_typerefs
from hypervisor.mm.errors import EBUSY, EINVAL, EPERM, ERESTART, FrameTableError, errno_name
from hypervisor.mm.frametable import DOMID_INVALID, PGC_ALLOCATED, FrameTable
from hypervisor.mm.layouts import build_linux_like
from hypervisor.mm.pte import (
    INVALID_MFN_IN_PTE,
    PTE_ACCESSED,
    PTE_DIRTY,
    PTE_GLOBAL,
    PTE_NX,
    PTE_PCD,
    PTE_PRESENT,
    PTE_PSE,
    PTE_PWT,
    PTE_RW,
    make_pte,
)
from hypervisor.mm.typerefs import PageTyping, PreemptAfter, Root

DOM = 1
OTHER = 2
RO = PTE_PRESENT | PTE_ACCESSED
RW = PTE_PRESENT | PTE_RW | PTE_ACCESSED | PTE_DIRTY


class Machine:
    """64 frames: domain 1 owns 1..39, domain 2 owns 40..43, the rest are free."""

    def __init__(self, build: str = "4.19") -> None:
        self.frames = FrameTable(64, get_build(build))
        self.mem = np.zeros(64 * 512, dtype=np.uint64)
        self.frames.assign(range(1, 40), DOM)
        self.frames.assign(range(40, 44), OTHER)
        self.type_changes: list[int] = []
        self.typing = PageTyping(self.frames, self.mem, on_type_change=self.type_changes.append)

    def set(self, table: int, slot: int, mfn: int, flags: int) -> None:
        self.mem[table * 512 + slot] = make_pte(mfn, flags)

    def refused(self, op, rc: int) -> None:
        """`op()` is refused with `rc` and changes nothing."""
        snap, mem = self.frames.snapshot(), self.mem.copy()
        assert errno_name(op()) == errno_name(-rc)
        assert self.frames.snapshot() == snap, snap.differences(self.frames.snapshot())
        assert np.array_equal(self.mem, mem)

    def pin(self, mfn: int, level: int) -> int:
        return self.typing.pin_table(mfn, level, DOM)

    def tree(self) -> None:
        """L4 10 -> L3 11 -> L2 12 -> L1 13 -> data 20 (RW), 21 (RO)."""
        self.set(10, 0, 11, RW)
        self.set(11, 0, 12, RW)
        self.set(12, 0, 13, RW)
        self.set(13, 0, 20, RW)
        self.set(13, 1, 21, RO)


@pytest.fixture
def m() -> Machine:
    return Machine()


# ---------------------------------------------------------------------------
# Builds and layouts
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", sorted(BUILDS))
def test_layout_round_trips_ints_and_arrays(version: str) -> None:
    layout = get_build(version).type_info
    for t in PageType:
        word = layout.encode(t, 12345, pinned=True, validated=True, partial=False)
        info = layout.decode(word)
        assert (info.type, info.count, info.pinned, info.validated, info.partial) == (
            t, 12345, True, True, False)
    types = np.arange(len(PageType), dtype=np.uint8)
    counts = np.arange(len(PageType), dtype=np.uint64) * 7
    words = layout.encode(types, counts, validated=True)
    assert np.array_equal(layout.type_of(words), types)
    assert np.array_equal(layout.count_of(words), counts)
    assert layout.validated_of(words).all() and not layout.pinned_of(words).any()
    ints = [layout.encode(int(t), int(c), validated=True)
            for t, c in zip(types, counts, strict=True)]
    assert ints == words.tolist()


def test_builds_follow_xen_mm_h() -> None:
    current, old12, old4 = (get_build(v).type_info for v in ("4.19", "4.12", "4.4"))
    assert (current.type_shift, current.locked_bit, current.pinned_bit, current.validated_bit,
            current.partial_bit, current.count_width) == (61, 60, 59, 58, 56, 55)
    assert old12.count_width == 56 and old12.non_coherent_bit is None
    assert (old4.type_shift, old4.type_width, old4.locked_bit) == (60, 4, 55)
    assert old4.type_codes[PageType.SHARED] == 8


def test_unknown_build_is_one_clear_error() -> None:
    with pytest.raises(BuildError, match=r"unknown hypervisor build '9\.9'.*4\.12.*4\.19"):
        get_build("9.9")


def test_encode_refuses_a_count_the_field_cannot_hold() -> None:
    with pytest.raises(BuildError, match="55-bit"):
        get_build("4.19").type_info.encode(PageType.L1, 1 << 55)


@pytest.mark.parametrize("writer, reader", [
    (a, b) for a in sorted(BUILDS) for b in sorted(BUILDS) if a != b])
def test_a_build_misreads_another_builds_type_info(writer: str, reader: str) -> None:
    w, r = get_build(writer).type_info, get_build(reader).type_info
    # A frame table in the writer's layout: typical typed frames, plus words
    # using the bits where 4.12 and 4.19 differ (a count of 2**55, non_coherent).
    words = [w.encode(t, c, pinned=t.is_page_table, validated=True)
             for t in PageType for c in (0, 1, 3)]
    words.append(w.encode(PageType.WRITABLE, (1 << 55) if w.count_width > 55 else 1))
    if w.non_coherent_bit is not None:
        words.append(w.encode(PageType.WRITABLE, 1) | 1 << w.non_coherent_bit)
    arr = np.array(words, dtype=np.uint64)
    right = (w.type_of(arr), w.count_of(arr), w.pinned_of(arr))
    wrong = (r.type_of(arr), r.count_of(arr), r.pinned_of(arr))
    assert any(not np.array_equal(a, b) for a, b in zip(right, wrong, strict=True))


def test_the_old_4_bit_layout_misreads_most_typed_frames() -> None:
    new, old = get_build("4.19").type_info, get_build("4.4").type_info
    types = np.array([PageType.L1, PageType.L2, PageType.L4, PageType.WRITABLE], dtype=np.uint8)
    words = new.encode(types, np.ones(4, dtype=np.uint64), validated=True)
    assert (old.type_of(words) != types).all()
    assert UNDEFINED_TYPE in old.type_of(new.encode(np.array([PageType.SHARED], np.uint8), 1))


# ---------------------------------------------------------------------------
# Frame table
# ---------------------------------------------------------------------------


def test_frame_table_assign_and_accessors(m: Machine) -> None:
    f = m.frames
    assert f.owner_of(5) == DOM and f.owner_of(50) == DOMID_INVALID
    assert int(f.count_info[5]) == PGC_ALLOCATED | 1 and f.general_count(5) == 1
    assert f.page_type(5) == PageType.NONE and f.type_count(5) == 0
    assert not f.is_pinned(5) and not f.is_validated(5)
    with pytest.raises(FrameTableError, match="not free"):
        f.assign([5], 3)
    with pytest.raises(FrameTableError, match="outside the frame table"):
        f.type_count(64)
    snap = f.snapshot()
    f.type_info[3] = 1
    assert f.snapshot() != snap and snap.differences(f.snapshot()) == [("type_info", 3)]
    f.restore(snap)
    assert f.snapshot() == snap


def test_typing_refuses_memory_of_the_wrong_size() -> None:
    frames = FrameTable(8, get_build("4.19"))
    with pytest.raises(FrameTableError, match="holds 4 frames"):
        PageTyping(frames, np.zeros(4 * 512, dtype=np.uint64))


# ---------------------------------------------------------------------------
# Pins and get_page_type basics
# ---------------------------------------------------------------------------


def test_pin_validates_and_unpin_devalidates_recursively(m: Machine) -> None:
    m.tree()
    base = m.frames.snapshot()
    assert m.pin(10, 4) == 0
    f = m.frames
    assert [f.page_type(x) for x in (10, 11, 12, 13, 20)] == [
        PageType.L4, PageType.L3, PageType.L2, PageType.L1, PageType.WRITABLE]
    assert [f.type_count(x) for x in (10, 11, 12, 13, 20, 21)] == [1, 1, 1, 1, 1, 0]
    assert f.is_pinned(10) and not f.is_pinned(11)
    assert all(f.is_validated(x) for x in (10, 11, 12, 13, 20))
    # general refs: allocation + pin / parent entry
    assert [f.general_count(x) for x in (10, 11, 12, 13, 20, 21)] == [2, 2, 2, 2, 2, 2]
    assert check_typerefs(m.mem, f, DOM, {10: 4}, []) == []

    assert m.typing.unpin_table(10, DOM) == 0
    assert [f.type_count(x) for x in (10, 11, 12, 13, 20)] == [0] * 5
    assert not any(f.is_validated(x) for x in (10, 11, 12, 13))
    # Page tables keep their (stale) type; writable pages stay writable and validated.
    assert f.page_type(13) == PageType.L1 and f.page_type(20) == PageType.WRITABLE
    assert f.is_validated(20)
    assert [f.general_count(x) for x in range(1, 40)] == [1] * 39
    assert check_typerefs(m.mem, f, DOM, {}, []) == []
    assert base.differences(f.snapshot())  # stale types differ, counts do not


def test_pins_do_not_nest_and_unpinning_an_unpinned_frame_fails(m: Machine) -> None:
    assert m.pin(13, 1) == 0
    m.refused(lambda: m.pin(13, 1), EINVAL)
    assert m.typing.unpin_table(13, DOM) == 0
    m.refused(lambda: m.typing.unpin_table(13, DOM), EINVAL)


def test_pinning_someone_elses_or_a_free_frame_fails(m: Machine) -> None:
    m.refused(lambda: m.pin(40, 1), EINVAL)
    m.refused(lambda: m.pin(50, 1), EINVAL)
    m.refused(lambda: m.pin(64 + 5, 1), EINVAL)


def test_type_change_only_at_count_zero(m: Machine) -> None:
    m.set(13, 0, 20, RW)
    assert m.pin(13, 1) == 0  # 20 is writable now
    m.refused(lambda: m.pin(20, 1), EINVAL)  # count > 0 of another type
    m.refused(lambda: m.pin(13, 2), EINVAL)
    assert m.typing.unpin_table(13, DOM) == 0  # 20 back to count 0, still writable
    m.type_changes.clear()
    assert m.pin(20, 1) == 0  # now it may become an L1
    assert m.type_changes == [20]  # ... and Xen flushes TLBs for it
    assert m.frames.page_type(20) == PageType.L1


def test_general_refs_without_type_for_read_only_mappings(m: Machine) -> None:
    m.set(13, 0, 21, RO)
    m.set(13, 1, 21, RO)
    m.set(13, 2, 22, RW)
    m.set(13, 3, 22, RW)  # aliased writable mapping: two typerefs
    assert m.pin(13, 1) == 0
    assert m.frames.general_count(21) == 3 and m.frames.type_count(21) == 0
    assert m.frames.general_count(22) == 3 and m.frames.type_count(22) == 2


def test_page_tables_can_be_mapped_read_only_but_not_writable(m: Machine) -> None:
    assert m.pin(14, 1) == 0
    m.set(13, 0, 14, RO)
    assert m.pin(13, 1) == 0
    assert m.typing.unpin_table(13, DOM) == 0
    m.set(13, 0, 14, RW)
    m.refused(lambda: m.pin(13, 1), EBUSY)


def test_shared_l1_is_validated_once_and_counted_per_reference(m: Machine) -> None:
    m.set(13, 0, 20, RW)
    m.set(12, 0, 13, RW)
    m.set(12, 5, 13, RW)
    m.set(15, 9, 13, RW)
    assert m.pin(12, 2) == 0 and m.pin(15, 2) == 0
    assert m.frames.type_count(13) == 3
    assert m.frames.type_count(20) == 1  # the L1's entries took their refs once
    assert check_typerefs(m.mem, m.frames, DOM, {12: 2, 15: 2}, []) == []


# ---------------------------------------------------------------------------
# Flags, foreign frames, invalid frames
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("flag, rc", [
    (PTE_PCD, EINVAL), (PTE_PWT, EINVAL), (PTE_PSE, EINVAL), (PTE_GLOBAL, 0), (PTE_NX, 0)])
def test_l1_flags(m: Machine, flag: int, rc: int) -> None:
    m.set(13, 7, 20, RW | flag)
    if rc:
        m.refused(lambda: m.pin(13, 1), rc)
    else:
        assert m.pin(13, 1) == 0


@pytest.mark.parametrize("level", [2, 3, 4])
@pytest.mark.parametrize("flag", [PTE_PSE, PTE_GLOBAL, PTE_PCD])
def test_upper_level_flags(m: Machine, level: int, flag: int) -> None:
    table, child = {2: (12, 13), 3: (11, 12), 4: (10, 11)}[level]
    m.set(table, 3, child, RW | flag)
    m.refused(lambda: m.pin(table, level), EINVAL)


def test_foreign_free_and_invalid_frames(m: Machine) -> None:
    for target, rc in ((40, EBUSY), (50, EBUSY), (100, EPERM), (INVALID_MFN_IN_PTE, EINVAL)):
        m.mem[:] = 0
        m.set(13, 0, target, RO)
        m.refused(lambda: m.pin(13, 1), rc)
    m.mem[:] = 0
    m.set(12, 0, 40, RW)  # foreign frame as an L1
    m.refused(lambda: m.pin(12, 2), EINVAL)


def test_failure_midway_releases_everything(m: Machine) -> None:
    m.tree()
    m.set(13, 400, 20, RW | PTE_PCD)  # the very last entry validated is bad
    m.set(12, 1, 14, RW)
    m.set(14, 0, 22, RW)
    m.refused(lambda: m.pin(10, 4), EINVAL)


def test_hypervisor_l4_slots_take_no_refs_and_cannot_be_written(m: Machine) -> None:
    m.tree()
    m.set(10, 256, 40, RW | PTE_PSE)  # garbage in Xen's slots: ignored
    m.set(10, 271, 13, RW)
    assert m.pin(10, 4) == 0
    assert m.frames.type_count(13) == 1
    m.refused(lambda: m.typing.run_transaction(
        lambda: m.typing.mod_l4_entry(10, 260, make_pte(14, RW), DOM)), EINVAL)
    assert m.typing.run_transaction(
        lambda: m.typing.mod_l4_entry(10, 272, make_pte(14, RW), DOM)) == 0


# ---------------------------------------------------------------------------
# Linear page tables
# ---------------------------------------------------------------------------


def test_self_map_is_allowed_read_only_and_takes_no_refs(m: Machine) -> None:
    m.tree()
    m.set(10, 300, 10, RO)
    assert m.pin(10, 4) == 0
    assert m.frames.type_count(10) == 1 and m.frames.general_count(10) == 2
    assert check_typerefs(m.mem, m.frames, DOM, {10: 4}, []) == []
    assert m.typing.unpin_table(10, DOM) == 0
    m.set(10, 300, 10, RW)
    m.refused(lambda: m.pin(10, 4), EINVAL)


@pytest.mark.parametrize("level", [2, 3, 4])
def test_linear_entry_onto_another_validated_table(m: Machine, level: int) -> None:
    a, b = 15, 16  # two empty tables of `level`
    assert m.pin(b, level) == 0
    m.set(a, 0, b, RO)
    assert m.pin(a, level) == 0
    f = m.frames
    assert f.type_count(b) == 2 and f.general_count(b) == 3
    assert int(f.linear_pt_count[a]) == 1 and int(f.linear_pt_count[b]) == -1
    assert check_typerefs(m.mem, f, DOM, {a: level, b: level}, []) == []
    assert m.typing.unpin_table(a, DOM) == 0
    assert f.type_count(b) == 1 and int(f.linear_pt_count[b]) == 0
    assert int(f.linear_pt_count[a]) == 0
    m.set(a, 0, b, RW)  # linear entries must be read-only
    m.refused(lambda: m.pin(a, level), EINVAL)


def test_linear_target_must_already_be_validated(m: Machine) -> None:
    # 12 (to become an L2) maps L1 14 read-write; L2 15 has a linear entry to
    # 12 before 12 is validated: 12 is then typed as an L1, whose entry would
    # map the pinned L1 14 writable.
    assert m.pin(14, 1) == 0
    m.set(12, 0, 14, RW)
    m.set(15, 0, 12, RO)
    m.refused(lambda: m.pin(15, 2), EBUSY)
    assert m.pin(12, 2) == 0
    assert m.pin(15, 2) == 0


def test_linear_tables_do_not_chain(m: Machine) -> None:
    assert m.pin(17, 2) == 0
    m.set(16, 0, 17, RO)
    assert m.pin(16, 2) == 0  # 16 has a linear entry onto 17
    m.set(15, 0, 16, RO)
    m.refused(lambda: m.pin(15, 2), EINVAL)  # so 16 may not be a linear target


def test_a_linear_target_cannot_gain_linear_entries(m: Machine) -> None:
    assert m.pin(18, 2) == 0
    m.set(17, 0, 18, RO)
    assert m.pin(17, 2) == 0  # 18 is a linear target
    m.set(19, 0, 17, RO)  # 17 has linear entries: it may not be a target
    m.refused(lambda: m.pin(19, 2), EINVAL)
    # nor may the target 18 get a linear entry of its own (onto validated L2 16)
    assert m.pin(16, 2) == 0
    m.refused(lambda: m.typing.run_transaction(
        lambda: m.typing.mod_l2_entry(18, 1, make_pte(16, RO), DOM)), EINVAL)


# ---------------------------------------------------------------------------
# Page-table updates (mod_lN_entry)
# ---------------------------------------------------------------------------


def test_mod_l1_entry_moves_refs_and_fast_path_keeps_them(m: Machine) -> None:
    m.set(13, 0, 20, RW)
    assert m.pin(13, 1) == 0
    t = m.typing
    assert t.run_transaction(lambda: t.mod_l1_entry(13, 0, make_pte(21, RW), DOM)) == 0
    assert m.frames.type_count(20) == 0 and m.frames.general_count(20) == 1
    assert m.frames.type_count(21) == 1 and m.frames.general_count(21) == 2
    snap = m.frames.snapshot()
    # Only A/D/NX/G change: no new references.
    assert t.run_transaction(
        lambda: t.mod_l1_entry(13, 0, make_pte(21, RW | PTE_NX | PTE_GLOBAL), DOM)) == 0
    assert m.frames.snapshot() == snap
    m.refused(lambda: t.run_transaction(
        lambda: t.mod_l1_entry(13, 0, make_pte(13, RW), DOM)), EBUSY)
    assert t.run_transaction(lambda: t.mod_l1_entry(13, 0, 0, DOM)) == 0
    assert m.frames.type_count(21) == 0 and m.frames.general_count(21) == 1


def test_mod_l2_entry_validates_the_new_l1_and_devalidates_the_old(m: Machine) -> None:
    m.set(13, 0, 20, RW)
    m.set(14, 0, 21, RW)
    m.set(12, 0, 13, RW)
    assert m.pin(12, 2) == 0
    t = m.typing
    assert t.run_transaction(lambda: t.mod_l2_entry(12, 0, make_pte(14, RW), DOM)) == 0
    f = m.frames
    assert f.type_count(13) == 0 and not f.is_validated(13) and f.type_count(20) == 0
    assert f.type_count(14) == 1 and f.type_count(21) == 1
    assert check_typerefs(m.mem, f, DOM, {12: 2}, []) == []


# ---------------------------------------------------------------------------
# Preemption and continuation
# ---------------------------------------------------------------------------


def _linux(build: str, preempt=None) -> tuple[FrameTable, np.ndarray, PageTyping, list[Root]]:
    frames = FrameTable(3000, get_build(build))
    mem = np.zeros(3000 * 512, dtype=np.uint64)
    tree = build_linux_like(frames, mem, DOM, 2048, nr_processes=2, seed=5)
    return frames, mem, PageTyping(frames, mem, preempt_check=preempt), tree.roots


@pytest.mark.parametrize("build", sorted(BUILDS))
@pytest.mark.parametrize("budget", [0, 1, 7, 100])
def test_preempted_validation_ends_like_one_shot(build: str, budget: int) -> None:
    frames, mem, typing, roots = _linux(build)
    assert typing.apply_roots(roots, DOM) == []
    one_shot = frames.snapshot()

    frames, mem, _, roots = _linux(build)
    budget_check = PreemptAfter(budget)
    typing = PageTyping(frames, mem, preempt_check=budget_check)
    kernel_l4 = roots[0].mfn
    restarts = 0
    saw_partial = False
    while (rc := typing.pin_table(kernel_l4, 4, DOM)) == -ERESTART:
        restarts += 1
        saw_partial |= bool(frames.partial().any())
        assert frames.is_partial(kernel_l4) and frames.type_count(kernel_l4) == 1
        budget_check.reset()
    assert rc == 0 and restarts > 0 and saw_partial
    assert typing.apply_roots(roots[1:], DOM) == []
    assert frames.snapshot() == one_shot


def test_failed_continuation_tears_the_partial_validation_down(m: Machine) -> None:
    # L4 10 -> L3 11 -> L2s 12, 15; the second L2 has a bad entry.
    m.set(10, 0, 11, RW)
    m.set(11, 0, 12, RW)
    m.set(11, 1, 15, RW)
    for slot in range(6):
        m.set(12, slot, 20 + slot, RW)
    m.set(15, 0, 26, RW)
    m.set(15, 1, 27, RW | PTE_PCD)  # refused as an L2 entry
    before = m.frames.snapshot()
    budget = PreemptAfter(2)
    m.typing.preempt_check = budget
    rcs = []
    while True:
        rc = m.pin(10, 4)
        rcs.append(rc)
        if rc != -ERESTART:
            break
        budget.reset()
    assert rcs[0] == -ERESTART and rcs[-1] == -EINVAL
    f = m.frames
    assert not f.partial().any()
    assert np.array_equal(f.type_counts(), FrameTable(64, get_build("4.19")).type_counts())
    assert np.array_equal(f.count_info, np.frombuffer(before.count_info, np.uint64))
    assert np.array_equal(f.linear_pt_count, np.frombuffer(before.linear_pt_count, np.int16))
    assert check_typerefs(m.mem, f, DOM, {}, []) == []


def test_errno_names() -> None:
    assert errno_name(-EINVAL) == "-EINVAL" and errno_name(-ERESTART) == "-ERESTART"
    assert errno_name(0) == "0" and errno_name(-9999) == "-9999"
