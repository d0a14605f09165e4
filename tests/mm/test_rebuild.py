"""Rebuilding typerefs from roots must not depend on the order the roots come in.

A linear (same-level, read-only) entry is legal only onto a table validated at
its level already; a state reached by pinning the target first and linking it
afterwards must rebuild whichever of the two roots is listed first.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hypervisor.mm.builds import PageType, get_build
from hypervisor.mm.bulk import bulk_validate
from hypervisor.mm.check import check_typerefs
from hypervisor.mm.frametable import FrameTable
from hypervisor.mm.layouts import build_random_tree
from hypervisor.mm.pte import PTE_ACCESSED, PTE_DIRTY, PTE_PRESENT, PTE_RW, make_pte
from hypervisor.mm.rebuild import plan_rebuild, rebuild_from_roots
from hypervisor.mm.typerefs import PageTyping, Root

DOM = 1
RO = PTE_PRESENT | PTE_ACCESSED
RW = PTE_PRESENT | PTE_RW | PTE_ACCESSED | PTE_DIRTY
A, B, PARENT, DATA = 10, 20, 30, 60  # the linking table, its target, the target's parent


class Tree:
    """A domain of 64 frames whose tables are given with their final levels."""

    def __init__(self) -> None:
        self.frames = FrameTable(64, get_build("4.19"))
        self.mem = np.zeros(64 * 512, dtype=np.uint64)
        self.frames.assign(range(1, 64), DOM)
        self.levels: dict[int, int] = {}

    def chain(self, top: int, level: int, slot: int = 0) -> None:
        """`top` (at `level`) -> one table per level below it -> a data page."""
        self.levels[top] = level
        table = top
        for lv in range(level - 1, 0, -1):
            child = top + level - lv
            self.mem[table * 512 + slot] = make_pte(child, RW)
            self.levels[child] = lv
            table = child
        self.mem[table * 512 + slot] = make_pte(DATA, RW)

    def link(self, source: int, target: int, slot: int) -> None:
        self.mem[source * 512 + slot] = make_pte(target, RO)

    @property
    def tables(self) -> tuple[np.ndarray, np.ndarray]:
        return np.array(list(self.levels)), np.array(list(self.levels.values()))

    def reference(self, roots: list[Root]):
        frames = self.frames.copy()
        assert PageTyping(frames, self.mem).apply_roots(roots, DOM) == []
        return frames.snapshot()


def _linked_roots(level: int, target_is_root: bool) -> tuple[Tree, Root, Root]:
    """Root A's table at `level` links (read-only) to table B of the same level, which
    is validated by its own pin, or as the child of another root's table."""
    t = Tree()
    t.chain(A, level)
    t.chain(B, level)
    t.link(A, B, slot=5)
    if target_is_root:
        provider = Root(B, level)
    else:
        t.levels[PARENT] = level + 1
        t.mem[PARENT * 512 + 3] = make_pte(B, RW)
        provider = Root(PARENT, level + 1, pinned=level + 1 < 4)
    linking = Root(A, level, pinned=level < 4 or target_is_root)
    return t, linking, provider


CASES = [(level, target_is_root) for level in (2, 3, 4) for target_is_root in (True, False)
         if level < 4 or target_is_root]


@pytest.mark.parametrize("level, target_is_root", CASES)
@pytest.mark.parametrize("linking_first", [True, False])
def test_a_linear_entry_rebuilds_in_either_root_order(level, target_is_root, linking_first):
    t, linking, provider = _linked_roots(level, target_is_root)
    expected = t.reference([provider, linking])  # the order the state was built in
    roots = [linking, provider] if linking_first else [provider, linking]
    result = rebuild_from_roots(t.mem, t.frames, DOM, roots, t.tables)
    assert result.ok, result.failures
    assert t.frames.snapshot() == expected
    assert t.frames.info(B).type == PageType(level) and t.frames.linear_pt_count[A] == 1
    pins = {r.mfn: r.level for r in roots if r.pinned}
    cr3s = [r.mfn for r in roots if not r.pinned]
    assert check_typerefs(t.mem, t.frames, DOM, pins, cr3s) == []


@pytest.mark.parametrize("level, target_is_root", CASES)
def test_in_the_given_order_the_validator_alone_refuses_or_mistypes(level, target_is_root):
    """What the ordering is for: the same roots, linking root first, straight into the
    validator do not give the old state."""
    t, linking, provider = _linked_roots(level, target_is_root)
    expected = t.reference([provider, linking])
    result = bulk_validate(t.mem, t.frames, DOM, [linking, provider])
    assert not result.ok or t.frames.snapshot() != expected


def test_the_plan_moves_only_linear_targets_first():
    t, linking, provider = _linked_roots(2, True)
    t.chain(40, 2)  # an unrelated pinned L2
    roots = [Root(40, 2), linking, provider]
    plan = plan_rebuild(t.mem, t.frames, roots, t.tables)
    assert (plan.first, plan.rest) == ([2], [0, 1])  # the target's own pin, then the rest
    t.mem[A * 512 + 5] = 0  # no linear entry left: the given order, nothing held
    plan = plan_rebuild(t.mem, t.frames, roots, t.tables)
    assert (plan.first, plan.rest) == ([], [0, 1, 2])


def test_a_target_no_root_validates_is_held():
    t, linking, provider = _linked_roots(3, False)
    plan = plan_rebuild(t.mem, t.frames, [linking, provider], t.tables)
    assert (plan.first, plan.rest) == ([Root(B, 3)], [0, 1])


def test_failures_are_reported_at_their_given_position():
    t, linking, provider = _linked_roots(2, True)
    t.mem[provider.mfn * 512 + 9] = make_pte(DATA, RW | (1 << 7))  # PSE in an L2: refused
    result = rebuild_from_roots(t.mem, t.frames, DOM, [linking, provider], t.tables)
    assert [(f.index, f.root) for f in result.failures] == [(0, linking), (1, provider)]


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), linear=st.sampled_from([0.3, 0.7, 1.0]),
       shuffle=st.randoms(use_true_random=False))
def test_any_root_order_rebuilds_the_state_the_roots_were_applied_in(seed, linear, shuffle):
    frames = FrameTable(160, get_build("4.19"))
    mem = np.zeros(160 * 512, dtype=np.uint64)
    tree = build_random_tree(frames, mem, DOM, seed, nr_pages=64, linear=linear)
    fresh = frames.copy()
    refused = {f.index for f in PageTyping(frames, mem).apply_roots(tree.roots, DOM)}
    accepted = [r for i, r in enumerate(tree.roots) if i not in refused]
    mfns = tree.p2m.astype(np.int64)
    types = frames.types(mfns)
    is_table = (types >= PageType.L1) & (types <= PageType.L4) & (frames.type_counts(mfns) > 0)
    tables = (mfns[is_table], types[is_table].astype(np.int64))
    shuffle.shuffle(accepted)
    result = rebuild_from_roots(mem, fresh, DOM, accepted, tables)
    assert result.ok, result.failures
    assert fresh.snapshot() == frames.snapshot()


# ---------------------------------------------------------- states only a history reaches
def _final_levels(frames: FrameTable) -> tuple[np.ndarray, np.ndarray]:
    """Every page table in use with its level, as the old build's frame table gives them."""
    types = frames.types()
    in_use = (types >= PageType.L1) & (types <= PageType.L4) & (frames.type_counts() > 0)
    return np.flatnonzero(in_use), types[in_use].astype(np.int64)


def _mod_entry(typing: PageTyping, level: int, table: int, slot: int, pte: int) -> None:
    mod = {2: typing.mod_l2_entry, 3: typing.mod_l3_entry, 4: typing.mod_l4_entry}[level]
    assert mod(table, slot, pte, DOM) == 0


def _linear_only(level: int, via_parent: bool) -> tuple[Tree, list[Root]]:
    """Through legal operations: pin A; validate B (its own pin, or its parent's); link B
    into A read-only; then unpin B / clear B's parent entry. Only A's linear entry keeps
    B a validated level-`level` table. Returns the tree (frame table as the history left
    it) and the roots still held."""
    t = Tree()
    t.chain(A, level)
    t.chain(B, level)
    typing = PageTyping(t.frames, t.mem)
    assert typing.pin_table(A, level, DOM) == 0
    if via_parent:
        t.mem[PARENT * 512 + 3] = make_pte(B, RW)
        assert typing.pin_table(PARENT, level + 1, DOM) == 0
    else:
        assert typing.pin_table(B, level, DOM) == 0
    _mod_entry(typing, level, A, 5, make_pte(B, RO))
    if via_parent:
        _mod_entry(typing, level + 1, PARENT, 3, 0)
    else:
        assert typing.unpin_table(B, DOM) == 0
    info = t.frames.info(B)
    assert (info.type, info.count, info.pinned, info.validated) == (PageType(level), 1, False,
                                                                      True)
    return t, [Root(A, level)] + ([Root(PARENT, level + 1)] if via_parent else [])


def _same_root(level: int) -> tuple[Tree, list[Root]]:
    """One pinned level-`level + 1` table R with two children of level `level`: the first
    (slot 1) links the second (slot 7) read-only, so depth first meets the linear entry
    before the table it needs is validated."""
    t = Tree()
    r, first, second = 40, 44, 50
    t.chain(first, level)
    t.chain(second, level)
    t.mem[r * 512 + 1] = make_pte(first, RW)
    t.mem[r * 512 + 7] = make_pte(second, RW)
    typing = PageTyping(t.frames, t.mem)
    assert typing.pin_table(r, level + 1, DOM) == 0
    _mod_entry(typing, level, first, 9, make_pte(second, RO))
    assert t.frames.linear_pt_count[first] == 1
    return t, [Root(r, level + 1)]


HISTORIES = ([pytest.param(lambda lv=lv: _linear_only(lv, False), id=f"L{lv}-unpinned")
              for lv in (2, 3, 4)]
             + [pytest.param(lambda lv=lv: _linear_only(lv, True), id=f"L{lv}-orphaned")
                for lv in (2, 3)]
             + [pytest.param(lambda lv=lv: _same_root(lv), id=f"L{lv}-same-root")
                for lv in (2, 3)])


def _fresh() -> FrameTable:
    frames = FrameTable(64, get_build("4.19"))
    frames.assign(range(1, 64), DOM)
    return frames


@pytest.mark.parametrize("history", HISTORIES)
def test_a_state_only_a_history_reaches_rebuilds_exactly(history):
    t, roots = history()
    rebuilt = _fresh()
    result = rebuild_from_roots(t.mem, rebuilt, DOM, roots, _final_levels(t.frames))
    assert result.ok, result.failures
    assert rebuilt.snapshot() == t.frames.snapshot(), t.frames.snapshot().differences(
        rebuilt.snapshot())
    pins = {r.mfn: r.level for r in roots}
    assert check_typerefs(t.mem, rebuilt, DOM, pins, []) == []


@pytest.mark.parametrize("history", HISTORIES)
def test_without_validating_targets_first_those_states_do_not_rebuild(history):
    """What the plan is for: the validator alone, in any order of these roots, refuses the
    state or reaches another one."""
    t, roots = history()
    for order in (roots, roots[::-1]):
        alone = _fresh()
        result = bulk_validate(t.mem, alone, DOM, order)
        assert not result.ok or alone.snapshot() != t.frames.snapshot()


@pytest.mark.parametrize("history", HISTORIES)
def test_a_hold_left_in_place_is_caught(history, monkeypatch):
    """The holds must go: kept (a planted bug), the checker and the comparison both see
    the extra pin."""
    t, roots = history()
    monkeypatch.setattr(PageTyping, "unpin_table", lambda self, mfn, domid: 0)
    rebuilt = _fresh()
    result = rebuild_from_roots(t.mem, rebuilt, DOM, roots, _final_levels(t.frames))
    held = plan_rebuild(t.mem, _fresh(), roots, _final_levels(t.frames)).holds
    assert held and result.ok and rebuilt.snapshot() != t.frames.snapshot()
    pins = {r.mfn: r.level for r in roots}
    problems = check_typerefs(t.mem, rebuilt, DOM, pins, [])
    assert {(d.mfn, d.field) for d in problems} >= {(held[0].mfn, "pinned"),
                                                    (held[0].mfn, "type count")}


def test_a_hold_that_fails_is_reported_against_the_root_reaching_it():
    t, roots = _linear_only(3, False)
    rebuilt = _fresh()
    t.mem[B * 512 + 9] = make_pte(DATA, RW | (1 << 7))  # B: a superpage L3 entry, refused
    result = rebuild_from_roots(t.mem, rebuilt, DOM, roots, _final_levels(t.frames))
    assert [(f.index, f.root) for f in result.failures] == [(0, roots[0])]
    assert not rebuilt.pinned(np.array([B]))[0]  # the refused hold left nothing behind


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), unpin=st.randoms(use_true_random=False),
       shuffle=st.randoms(use_true_random=False))
def test_after_unpinning_tables_still_in_use_any_root_order_rebuilds_the_state(
        seed, unpin, shuffle):
    """Random trees, then legal unpins of pinned tables something else still references
    (a parent, a CR3 or a linear entry): the rebuild from the remaining roots gives the
    same frame table, and the checker agrees."""
    frames = FrameTable(160, get_build("4.19"))
    mem = np.zeros(160 * 512, dtype=np.uint64)
    tree = build_random_tree(frames, mem, DOM, seed, nr_pages=64, linear=1.0)
    fresh = frames.copy()
    typing = PageTyping(frames, mem)
    refused = {f.index for f in typing.apply_roots(tree.roots, DOM)}
    roots = [r for i, r in enumerate(tree.roots) if i not in refused]
    for r in list(roots):
        if r.pinned and frames.info(r.mfn).count > 1 and unpin.random() < 0.7:
            assert typing.unpin_table(r.mfn, DOM) == 0
            roots.remove(r)
    shuffle.shuffle(roots)
    result = rebuild_from_roots(mem, fresh, DOM, roots, _final_levels(frames))
    assert result.ok, result.failures
    assert fresh.snapshot() == frames.snapshot()
    pins = {r.mfn: r.level for r in roots if r.pinned}
    assert check_typerefs(mem, fresh, DOM, pins, [r.mfn for r in roots if not r.pinned]) == []
