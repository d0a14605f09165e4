"""Incremental (lazy) typeref reconstruction ends exactly where a full walk ends."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hypervisor.mm.builds import BUILDS, PageType, get_build
from hypervisor.mm.bulk import bulk_validate
from hypervisor.mm.check import check_typerefs
from hypervisor.mm.frametable import FrameTable, FrameTableSnapshot
from hypervisor.mm.incremental import (
    PTES_PER_TABLE,
    HandoverTableError,
    IncrementalTyping,
    IncrementalTypingError,
    SweepStep,
)
from hypervisor.mm.layouts import anonymous_memory, build_linux_like, build_random_tree
from hypervisor.mm.pte import (
    PTE_ACCESSED,
    PTE_DIRTY,
    PTE_PCD,
    PTE_PRESENT,
    PTE_PSE,
    PTE_RW,
    XEN_L4_FIRST_SLOT,
    XEN_L4_LAST_SLOT,
    make_pte,
)
from hypervisor.mm.typerefs import PageTyping, Root, RootFailure

DOM = 1
OTHER = 2
RO = PTE_PRESENT | PTE_ACCESSED
RW = PTE_PRESENT | PTE_RW | PTE_ACCESSED | PTE_DIRTY
ALL_BUILDS = sorted(BUILDS)
GUEST_L4 = np.ones(512, dtype=bool)
GUEST_L4[XEN_L4_FIRST_SLOT : XEN_L4_LAST_SLOT + 1] = False


# ---------------------------------------------------------------------------
# Cases: a machine typed by the reference (or bulk), and a fresh copy of it
# ---------------------------------------------------------------------------


@dataclass
class Case:
    expected: FrameTableSnapshot  # what the full walk left
    frames: FrameTable  # the same machine, untyped: incremental typing starts here
    mem: np.ndarray
    tables: dict[int, int]
    pins: dict[int, int]
    cr3: list[int]

    def start(self) -> IncrementalTyping:
        return IncrementalTyping(self.mem, self.frames, DOM, self.tables, self.pins, self.cr3)


def _case(frames: FrameTable, mem: np.ndarray, roots: list[Root], *, use_bulk: bool) -> Case:
    """Type a copy of `frames` from `roots`; the stream is what that state says."""
    fresh = frames.copy()
    if use_bulk:
        failures: list[RootFailure] = bulk_validate(mem, frames, DOM, roots).failures
    else:
        failures = PageTyping(frames, mem).apply_roots(roots, DOM)
    failed = {f.index for f in failures}
    ok = [r for i, r in enumerate(roots) if i not in failed]
    types, counts = frames.types(), frames.type_counts()
    is_table = (types >= PageType.L1) & (types <= PageType.L4) & (counts > 0)
    tables = {int(m): int(types[m]) for m in np.flatnonzero(is_table)}
    return Case(frames.snapshot(), fresh, mem, tables,
                {r.mfn: r.level for r in ok if r.pinned}, [r.mfn for r in ok if not r.pinned])


def _random_case(build: str, seed: int, hostile: float, linear: float) -> Case:
    frames = FrameTable(160, get_build(build))
    mem = np.zeros(160 * 512, dtype=np.uint64)
    tree = build_random_tree(frames, mem, DOM, seed, nr_pages=64, hostile=hostile,
                             linear=linear, foreign_domid=OTHER)
    return _case(frames, mem, tree.roots, use_bulk=False)


def _linux_case(build: str, pages: int, seed: int, *, anonymous: bool = False) -> Case:
    n = pages + 1024
    frames = FrameTable(n, get_build(build))
    mem = anonymous_memory(n) if anonymous else np.zeros(n * 512, dtype=np.uint64)
    tree = build_linux_like(frames, mem, DOM, pages, nr_processes=3, seed=seed,
                            pin_process_l1s=True)
    return _case(frames, mem, tree.roots, use_bulk=True)


# ---------------------------------------------------------------------------
# An independent recount: references of the roots and of the validated tables
# ---------------------------------------------------------------------------


def _present(case: Case, table: int) -> tuple[np.ndarray, np.ndarray]:
    e = case.mem[table * 512 : (table + 1) * 512]
    present = (e & np.uint64(PTE_PRESENT)) != 0
    if case.tables[table] == 4:
        present &= GUEST_L4
    e = e[present]
    return e, ((e >> np.uint64(12)) & np.uint64((1 << 40) - 1)).astype(np.int64)


class Recount:
    """What every frame's general and type counts must be, given which tables are validated."""

    def __init__(self, case: Case, base_general: np.ndarray) -> None:
        self.case = case
        self.base = base_general
        n = case.frames.nr_frames
        self.general = np.zeros(n, dtype=np.int64)
        self.typed = np.zeros(n, dtype=np.int64)
        for m in [*case.pins, *case.cr3]:
            self.general[m] += 1
            self.typed[m] += 1
        self.counted: set[int] = set()

    def check(self, typing: IncrementalTyping) -> None:
        frames = self.case.frames
        stream = np.array(sorted(self.case.tables), dtype=np.int64)
        validated = stream[frames.validated(stream)]
        assert self.counted <= set(validated.tolist()), "a table lost its validation"
        for t in validated.tolist():
            if t in self.counted:
                continue
            self.counted.add(t)
            e, target = _present(self.case, t)
            if self.case.tables[t] == 1:  # every mapping a general ref, writable ones a type ref
                np.add.at(self.general, target, 1)
                np.add.at(self.typed, target[(e & np.uint64(PTE_RW)) != 0], 1)
            else:  # both refs on the target, except for a self-map
                np.add.at(self.general, target[target != t], 1)
                np.add.at(self.typed, target[target != t], 1)
        general = frames.general_counts().astype(np.int64) - self.base
        assert np.array_equal(general, self.general), np.flatnonzero(general != self.general)[:5]
        typed = frames.type_counts().astype(np.int64)
        assert np.array_equal(typed, self.typed), np.flatnonzero(typed != self.typed)[:5]
        # No page table of the stream is ever mappable writable while lazy mode is on.
        if not typing.done:
            assert not typing.may_map_writable_many(stream).any()
            assert not typing.may_map_writable(int(stream[0]))
        # What validated L1s map writable is writable data, and mappable so.
        rw_targets = [target[(e & np.uint64(PTE_RW)) != 0] for t in self.counted
                      if self.case.tables[t] == 1 for e, target in [_present(self.case, t)]]
        if rw_targets:
            assert typing.may_map_writable_many(np.concatenate(rw_targets)).all()


def _walk(case: Case, typing: IncrementalTyping, pick) -> list[int]:
    """A walk from a root down through present entries onto page tables (linear ones too)."""
    roots = sorted(case.pins) + case.cr3
    path = [roots[pick(len(roots))]]
    while len(path) < 4 and case.tables[path[-1]] > 1:
        _, target = _present(case, path[-1])
        onward = [int(t) for t in target if int(t) in case.tables]
        if not onward:
            break
        path.append(onward[pick(len(onward))])
    return path


def _run(case: Case, pick, *, steps_between_checks: int = 1) -> IncrementalTyping:
    """Random interleaving of walks and sweeps until done, checking the invariants."""
    base = case.frames.general_counts().astype(np.int64)
    before_general = int(base.sum())
    typing = case.start()
    recount = Recount(case, base)
    recount.check(typing)
    swept = 0
    step = 0
    while not typing.done:
        if pick(3) == 0:
            path = _walk(case, typing, pick)
            was = sum(not typing.is_validated(m) for m in set(path))
            assert typing.validate_path(path) == was
            assert all(typing.is_validated(m) for m in path)
        else:
            budget = [1, 100, 496, 512, 513, 2000, 1 << 20][pick(7)]
            pending = typing.pending
            if pick(2):
                result = typing.sweep(budget)
                assert result.ptes < budget + 512
            else:
                result = typing.sweep(budget_tables=1 + pick(4))
            swept += result.tables
            assert typing.pending == pending - result.tables or typing.done
        step += 1
        if step % steps_between_checks == 0 or typing.done:
            recount.check(typing)

    snap = case.frames.snapshot()
    assert snap == case.expected, case.expected.differences(snap)[:10]
    assert check_typerefs(case.mem, case.frames, DOM, case.pins, case.cr3) == []
    # Counters add up.
    assert typing.pending == 0 and typing.sweep(1) == SweepStep(0, 0)
    assert typing.pages_validated == len(case.tables)
    assert typing.fill_validations + swept == typing.pages_validated
    assert typing.ptes_examined == sum(PTES_PER_TABLE[lvl] for lvl in case.tables.values())
    added = (int(case.frames.general_counts().astype(np.int64).sum()) - before_general
             + int(case.frames.type_counts().astype(np.int64).sum()))
    assert typing.refs_taken == added
    return typing


# ---------------------------------------------------------------------------
# Equality with the full walk
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("build", ALL_BUILDS)
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), hostile=st.sampled_from([0.0, 0.1]),
       linear=st.sampled_from([0.0, 0.5, 1.0]), schedule=st.integers(0, 2**32 - 1))
def test_random_trees_end_as_the_reference_leaves_them(build, seed, hostile, linear,
                                                        schedule) -> None:
    case = _random_case(build, seed, hostile, linear)
    rng = np.random.default_rng(schedule)  # the interleaving of walks and sweeps
    _run(case, lambda k: int(rng.integers(0, k)))


@pytest.mark.parametrize("build", ALL_BUILDS)
def test_random_trees_with_linear_entries(build: str) -> None:
    # The reference refuses most linear entries onto other tables (their target
    # must be validated first), so go through seeds until enough were accepted.
    with_linear = 0
    for seed in range(60):
        case = _random_case(build, seed, 0.0, 1.0)
        rng = np.random.default_rng(seed)
        _run(case, lambda k, rng=rng: int(rng.integers(0, k)))
        with_linear += bool(case.frames.linear_pt_count.any())
    assert with_linear >= 10


@pytest.mark.parametrize("build", ALL_BUILDS)
@pytest.mark.parametrize("seed", [3, 11])
def test_linux_like_guests_end_as_bulk_leaves_them(build: str, seed: int) -> None:
    case = _linux_case(build, 16384, seed)
    rng = np.random.default_rng(seed)
    typing = _run(case, lambda k: int(rng.integers(0, k)), steps_between_checks=5)
    assert typing.fill_validations > 0 and typing.sweeper_steps > 0


def test_a_1gib_guest_by_quanta() -> None:
    case = _linux_case("4.19", 1 << 18, 5, anonymous=True)
    typing = case.start()
    start = time.perf_counter()
    steps = 0
    while not typing.done:
        step = typing.sweep(4096)  # tables until the charge reaches the budget
        assert step.ptes < 4096 + 512 and (step.ptes >= 4096 or typing.done)
        steps += 1
    elapsed = time.perf_counter() - start
    assert case.frames.snapshot() == case.expected
    assert steps == typing.sweeper_steps and typing.ptes_examined > 262144
    print(f"\n1 GiB: {typing.ptes_examined} PTEs swept in {steps} quanta, {elapsed:.3f} s")


def test_the_sweeper_goes_top_down_then_by_mfn() -> None:
    case = _linux_case("4.19", 4096, 1)
    typing = case.start()
    order = []
    while not typing.done:
        before = {m for m in case.tables if typing.is_validated(m)}
        step = typing.sweep(1)
        new = [m for m in case.tables if typing.is_validated(m) and m not in before]
        assert step == SweepStep(1, PTES_PER_TABLE[case.tables[new[0]]]) and len(new) == 1
        order += new
    assert order == sorted(case.tables, key=lambda m: (-case.tables[m], m))


# ---------------------------------------------------------------------------
# Hand-built machines
# ---------------------------------------------------------------------------


class Small:
    """64 frames; domain 1 owns 1..39, domain 2 owns 40..43."""

    def __init__(self, build: str = "4.19") -> None:
        self.frames = FrameTable(64, get_build(build))
        self.mem = np.zeros(64 * 512, dtype=np.uint64)
        self.frames.assign(range(1, 40), DOM)
        self.frames.assign(range(40, 44), OTHER)

    def set(self, table: int, slot: int, mfn: int, flags: int) -> None:
        self.mem[table * 512 + slot] = make_pte(mfn, flags)

    def typing(self, tables, pins=None, cr3=()) -> IncrementalTyping:
        return IncrementalTyping(self.mem, self.frames, DOM, tables, pins or {}, list(cr3))

    def reference(self, roots: list[Root]) -> FrameTableSnapshot:
        frames = self.frames.copy()
        assert PageTyping(frames, self.mem).apply_roots(roots, DOM) == []
        return frames.snapshot()


def test_a_fill_validates_the_tables_of_its_walk() -> None:
    s = Small()
    s.set(10, 0, 11, RW)  # L4 10 -> L3 11 -> L2 12 -> L1 13 -> data 20 (RW), 21 (RO)
    s.set(11, 0, 12, RW)
    s.set(12, 0, 13, RW)
    s.set(13, 0, 20, RW)
    s.set(13, 1, 21, RO)
    s.set(10, XEN_L4_FIRST_SLOT + 3, 21, RW | PTE_PSE)  # Xen's slots: not the guest's, ignored
    expected = s.reference([Root(10, 4, pinned=False)])
    typing = s.typing({10: 4, 11: 3, 12: 2, 13: 1}, cr3=[10])
    assert s.frames.type_count(10) == 1 and not typing.is_validated(10)
    assert s.frames.type_count(11) == 0  # referenced only once 10 is validated
    assert not typing.may_map_writable_many([10, 11, 12, 13]).any()
    assert typing.may_map_writable(20) and typing.may_map_writable(21)
    assert not typing.may_map_writable(-1) and not typing.may_map_writable(64)
    assert typing.validate_path([10, 11]) == 2 and typing.pending == 2
    assert s.frames.type_count(12) == 1 and s.frames.info(12).type == PageType.L2
    assert typing.validate_path([10, 11, 12, 13]) == 2
    assert typing.validate_path([10, 11, 12, 13]) == 0
    assert typing.done and typing.fill_validations == 4 and typing.sweeper_steps == 0
    assert s.frames.snapshot() == expected
    assert s.frames.info(20).type == PageType.WRITABLE and typing.may_map_writable(20)
    assert not typing.may_map_writable(13)  # a validated L1 still cannot be mapped writable
    assert typing.counters == {"fill_validations": 4, "sweeper_steps": 0, "ptes_examined": 2032,
                               "pages_validated": 4, "refs_taken": 2 + 2 * 3 + 3,
                               "tables_released": 0, "pending": 0}


def test_a_linear_entry_may_be_taken_before_its_target_is_validated() -> None:
    s = Small()
    s.set(30, 0, 31, RW)  # L3 30: slot 0 -> L2 31, slot 1 -> L2 32
    s.set(30, 1, 32, RW)
    s.set(32, 5, 31, RO)  # 32 maps 31 linearly
    s.set(32, 6, 32, RO)  # and itself
    s.set(31, 0, 33, RW)
    expected = s.reference([Root(30, 3), Root(32, 2)])
    typing = s.typing({30: 3, 31: 2, 32: 2, 33: 1}, {30: 3, 32: 2})
    assert typing.validate_table(32)  # before 30 and 31: its linear entry types 31 as an L2
    assert s.frames.info(31).type == PageType.L2 and s.frames.type_count(31) == 1
    assert typing.validate_table(30)
    assert s.frames.type_count(31) == 2 and not typing.is_validated(31)
    assert s.frames.linear_pt_count[32] == 1 and s.frames.linear_pt_count[31] == -1
    assert not typing.validate_table(32)
    typing.finish()
    assert typing.done and s.frames.snapshot() == expected


def test_the_stream_types_decide_where_a_full_walk_depends_on_root_order() -> None:
    s = Small()
    s.set(20, 0, 22, RW)  # L2 20 -> L1 22, and a linear entry onto L2 21
    s.set(20, 1, 21, RO)
    s.set(21, 0, 23, RW)  # L2 21 -> L1 23
    expected = s.reference([Root(21, 2), Root(20, 2)])  # the order the old build saw
    frames = s.frames.copy()
    walked = bulk_validate(s.mem, frames, DOM, [Root(20, 2), Root(21, 2)])
    assert [(f.index, f.root.mfn) for f in walked.failures] == [(1, 21)]  # 21 became an L1
    typing = s.typing({20: 2, 21: 2, 22: 1, 23: 1}, {20: 2, 21: 2})
    typing.finish()
    assert s.frames.snapshot() == expected


@pytest.mark.parametrize("first", [20, 21])
def test_linear_entries_and_uses_together_are_refused_in_either_order(first: int) -> None:
    s = Small()
    s.set(20, 0, 22, RO)  # L2 20 maps L2 22 linearly ...
    s.set(21, 0, 20, RO)  # ... and L2 21 maps 20 linearly: 20 would be both
    typing = s.typing({20: 2, 21: 2, 22: 2}, {20: 2, 21: 2, 22: 2})
    typing.validate_table(first)
    snap = s.frames.snapshot()
    with pytest.raises(HandoverTableError, match="both have linear entries and be the target"):
        typing.validate_table(41 - first)
    assert s.frames.snapshot() == snap and typing.pending == 2


def _bad_table(s: Small) -> None:
    s.set(12, 0, 13, RW)
    s.set(13, 0, 20, RW)


@pytest.mark.parametrize("slot_entry, level, match", [
    ((13, 1, 12, RW), 1, r"L1 table 0xd slot 1 .*maps the L2 page table 0xc writable"),
    ((13, 1, 20, RW | PTE_PCD), 1, "flags 0x10 are not allowed in an L1 entry"),
    ((13, 1, 41, RO), 1, "owned by domain 2"),
    ((13, 1, 50, RO), 1, "owned by nobody"),
    ((13, 1, 70, RO), 1, "outside the frame table"),
    ((12, 1, 21, RW), 2, r"maps mfn 0x15, which the stream lists as not a page table"),
    ((12, 1, 14, RW | PTE_PSE), 2, "flags 0x80 are not allowed in an L2 entry"),
    ((12, 1, 12, RW), 2, "self-map must be read-only"),
    ((12, 1, 15, RW), 2, "linear entry onto L2 table 0xf must be read-only"),
])
def test_a_stream_the_rules_refuse_is_one_clear_error(slot_entry, level, match) -> None:
    s = Small()
    _bad_table(s)
    table, slot, mfn, flags = slot_entry
    s.set(table, slot, mfn, flags)
    typing = s.typing({12: 2, 13: 1, 15: 2}, {table: level, 15: 2})
    snap = s.frames.snapshot()
    with pytest.raises(HandoverTableError, match=match):
        typing.validate_table(table)
    assert s.frames.snapshot() == snap
    with pytest.raises(HandoverTableError, match=match):
        typing.finish()  # the sweeper meets it too (after validating the L2 15)
    assert not typing.done and not typing.is_validated(table)


def test_an_entry_onto_a_frame_typed_otherwise_is_refused() -> None:
    s = Small()
    s.set(13, 0, 20, RW)
    s.frames.type_info[20] = s.frames.layout.encode(PageType.SEG_DESC, 1, validated=True)
    typing = s.typing({13: 1}, {13: 1})
    with pytest.raises(HandoverTableError, match="already typed SEG_DESC, not WRITABLE"):
        typing.validate_table(13)


def test_tables_nothing_references_are_released() -> None:
    s = Small()
    _bad_table(s)
    s.set(14, 0, 21, RW)  # L1 14: listed by the stream, referenced by nothing
    s.set(15, 0, 16, RO)  # L2s 15 and 16 map each other linearly, and nothing else does
    s.set(16, 0, 15, RO)
    expected = s.reference([Root(12, 2)])
    typing = s.typing({12: 2, 13: 1, 14: 1, 15: 2, 16: 2}, {12: 2})
    assert not typing.may_map_writable_many([14, 15, 16]).any()
    with pytest.raises(IncrementalTypingError, match="referenced by no root"):
        typing.validate_table(14)
    assert typing.finish() == SweepStep(2, 1024)
    assert typing.done and typing.pending == 0 and typing.pages_validated == 2
    assert typing.tables_released == 3
    assert s.frames.snapshot() == expected
    assert typing.may_map_writable_many([14, 15, 16]).all()  # no longer page tables


def test_stream_tables_may_come_as_arrays() -> None:
    case = _linux_case("4.4", 2048, 2)
    mfns = np.array(list(case.tables), dtype=np.int64)
    levels = np.array(list(case.tables.values()), dtype=np.int64)
    typing = IncrementalTyping(case.mem, case.frames, DOM, (mfns, levels), case.pins, case.cr3)
    typing.finish()
    assert case.frames.snapshot() == case.expected


def test_set_up_ahead_then_roots_at_the_pause_ends_where_a_full_walk_ends() -> None:
    """Tables and pins are known before a live update's pause, CR3s only at it."""
    case = _linux_case("4.19", 2048, 3)
    typing = IncrementalTyping(case.mem, case.frames, DOM, case.tables, case.pins, None)
    with pytest.raises(IncrementalTypingError, match="before the roots' references"):
        typing.sweep(512)
    typing.take_root_refs(case.cr3)
    with pytest.raises(IncrementalTypingError, match="taken already"):
        typing.take_root_refs(case.cr3)
    typing.finish()
    assert case.frames.snapshot() == case.expected


# ---------------------------------------------------------------------------
# Misuse: one clear error, nothing changed
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("tables, pins, cr3, error, match", [
    ({12: 5}, {}, [], IncrementalTypingError, "level 5, not 1..4"),
    ({99: 1}, {}, [], IncrementalTypingError, "outside the frame table"),
    ({41: 1}, {}, [], HandoverTableError, "not an allocated frame of domain 1.*domain 2"),
    (([12, 12], [2, 1]), {}, [], IncrementalTypingError, "listed as L2 and L1"),
    (([12, 13], [2]), {}, [], IncrementalTypingError, "2 mfns but 1 levels"),
    ({12: 2, 13: 1}, {12: 3}, [], HandoverTableError, "pinned as L3 but .* L2"),
    ({12: 2, 13: 1}, {20: 1}, [], HandoverTableError, "not a page table"),
    ({12: 2, 13: 1}, {}, [12], HandoverTableError, "CR3 mfn 0xc is L2"),
    ({12: 2, 13: 1}, {}, [0], HandoverTableError, "CR3 mfn 0x0 is not an allocated frame"),
])
def test_bad_construction(tables, pins, cr3, error, match) -> None:
    s = Small()
    _bad_table(s)
    snap = s.frames.snapshot()
    with pytest.raises(error, match=match):
        s.typing(tables, pins, cr3)
    assert s.frames.snapshot() == snap


def test_tables_must_start_untyped() -> None:
    s = Small()
    _bad_table(s)
    s.typing({12: 2, 13: 1}, {12: 2})
    snap = s.frames.snapshot()
    with pytest.raises(IncrementalTypingError, match="0xc of domain 1 is already typed"):
        s.typing({12: 2, 13: 1}, {12: 2})
    assert s.frames.snapshot() == snap


def test_bad_calls() -> None:
    s = Small()
    _bad_table(s)
    s.set(10, 0, 12, RW)  # L3 10 -> L2 12 -> L1 13; L2 14 is referenced by nothing
    typing = s.typing({10: 3, 12: 2, 13: 1, 14: 2}, {10: 3})
    snap = s.frames.snapshot()
    for call, match in [
        (lambda: typing.validate_table(20), "0x14 is not a page table of domain 1"),
        (lambda: typing.validate_table(70), "outside the frame table"),
        (lambda: typing.validate_table(13), "referenced by no root and no validated table"),
        (lambda: typing.validate_path([10, 13]), r"nor by an entry of 0xa"),
        (lambda: typing.validate_path([10, 12, 20]), "not a page table"),
        (lambda: typing.sweep(), "needs budget_ptes or budget_tables"),
        (lambda: typing.sweep(0), "budget_ptes must be a positive integer"),
        (lambda: typing.sweep(budget_tables=-1), "budget_tables must be a positive"),
        (lambda: typing.sweep(1.5), "budget_ptes must be a positive integer"),
        (lambda: typing.is_validated(-3), "outside the frame table"),
    ]:
        with pytest.raises(IncrementalTypingError, match=match):
            call()
        assert s.frames.snapshot() == snap
    assert typing.validate_path([10, 12, 13]) == 3
    assert typing.sweep(budget_tables=5) == SweepStep(0, 0) and typing.done  # 14 released


@pytest.mark.slow
@pytest.mark.parametrize("gib", [1, 16])
def test_bench_sweep_vs_bulk(gib: int) -> None:
    """Benchmark (run with -m slow): prints times, asserts only equality."""
    pages = gib << 18
    n = pages + 1024
    frames = FrameTable(n, get_build("4.19"))
    mem = anonymous_memory(n)
    tree = build_linux_like(frames, mem, DOM, pages, nr_processes=8, seed=1)
    fresh = frames.copy()
    start = time.perf_counter()
    case = _case(frames, mem, tree.roots, use_bulk=True)
    bulk_s = time.perf_counter() - start
    case.frames = fresh
    start = time.perf_counter()
    typing = case.start()
    setup_s = time.perf_counter() - start
    start = time.perf_counter()
    while not typing.done:
        typing.sweep(1 << 16)
    sweep_s = time.perf_counter() - start
    assert fresh.snapshot() == case.expected
    print(f"\n{gib} GiB: bulk (with stream extraction) {bulk_s:.3f} s; lazy set-up "
          f"{setup_s * 1e3:.2f} ms, sweep {sweep_s:.3f} s in {typing.sweeper_steps} quanta "
          f"({typing.ptes_examined / 1e6:.1f} M PTEs)")
