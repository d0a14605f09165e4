"""Rebuilding typerefs from roots must not depend on the order the roots come in.

A linear (same-level, read-only) entry is legal only onto a table validated at
its level already; a state reached by pinning the target first and linking it
afterwards must rebuild whichever of the two roots is listed first.
"""

from __future__ import annotations

import numpy as np
import pytest

from hypervisor.builds import PageType, get_build
from hypervisor.mm.bulk import bulk_validate
from hypervisor.mm.check import check_typerefs
from hypervisor.mm.frametable import FrameTable
from hypervisor.mm.pte import PTE_ACCESSED, PTE_DIRTY, PTE_PRESENT, PTE_RW, make_pte
from hypervisor.mm.rebuild import _stable_topological, linear_safe_order, rebuild_from_roots
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


def test_the_order_moves_only_roots_that_wait():
    t, linking, provider = _linked_roots(2, True)
    t.chain(40, 2)  # an unrelated pinned L2
    roots = [Root(40, 2), linking, provider]
    assert linear_safe_order(t.mem, roots, t.tables) == [0, 2, 1]
    t.link(A, B, slot=5)
    t.mem[A * 512 + 5] = 0  # no linear entry left: the given order
    assert linear_safe_order(t.mem, roots, t.tables) == [0, 1, 2]


def test_failures_are_reported_at_their_given_position():
    t, linking, provider = _linked_roots(2, True)
    t.mem[provider.mfn * 512 + 9] = make_pte(DATA, RW | (1 << 7))  # PSE in an L2: refused
    result = rebuild_from_roots(t.mem, t.frames, DOM, [linking, provider], t.tables)
    assert [(f.index, f.root) for f in result.failures] == [(0, linking), (1, provider)]


def test_a_cycle_keeps_the_given_order_and_everything_appears_once():
    assert _stable_topological([set(), {2}, {1}, {0}]) == [0, 3, 1, 2]
    assert _stable_topological([{1}, set(), {0}]) == [1, 0, 2]
