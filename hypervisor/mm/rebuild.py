"""Rebuilding a domain's typerefs from its roots, whatever order the roots come in.

`bulk_validate` (like the reference `PageTyping.apply_roots`) takes the roots
in the order given, and one of Xen's rules depends on that order: a
same-level ("linear") entry, say an L4 slot holding another L4 read-only
(`get_l4_linear_pagetable`; likewise L3 and L2), is accepted only if its
target is validated at that level already. Otherwise the entry types its
target one level down, which fails or, worse, succeeds with the wrong type.
A state reached through a history of pins and updates can hold such an entry
whose target is validated by a root that comes *later* in pfn order (a
second L4 pinned, then linked from the first): rebuilt in pfn order, it is
refused, although it is legal.

Whoever rebuilds from roots knows every page table's final level (the stream's
PFINFO types, or the old build's frame table), so the entries that must be
linear are known too: an entry of a level-L table onto a table of level L.
`linear_safe_order` moves each root whose tree holds such an entry after a
root whose tree validates the target (the first such root in the given
order), keeping the given order otherwise; `rebuild_from_roots` validates in
that order and reports failures against the given order. Without linear
entries the order is the given one, so nothing changes for ordinary trees.

Out of reach here: a linear entry whose target lies in the *same* root's tree
after it in depth-first order (no order of roots helps; the lazy strategy,
which reads every entry by its target's stream level, rebuilds that state).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import numpy as np

from hypervisor.mm.bulk import BulkResult, bulk_validate
from hypervisor.mm.frametable import FrameTable
from hypervisor.mm.pte import (
    ENTRIES_PER_TABLE,
    MFN_FIELD_BITS,
    PTE_PRESENT,
    XEN_L4_FIRST_SLOT,
    XEN_L4_LAST_SLOT,
)
from hypervisor.mm.typerefs import Root, RootFailure

_GUEST_L4_SLOTS = np.ones(ENTRIES_PER_TABLE, dtype=bool)
_GUEST_L4_SLOTS[XEN_L4_FIRST_SLOT : XEN_L4_LAST_SLOT + 1] = False
_MFN_MASK = np.uint64((1 << MFN_FIELD_BITS) - 1)
_U12 = np.uint64(12)


class _Tables:
    """Present guest entries of the upper-level tables, read with their final levels."""

    def __init__(self, mem: np.ndarray, tables: tuple[np.ndarray, np.ndarray]) -> None:
        self.mem2d = mem.reshape(-1, ENTRIES_PER_TABLE)
        self.n = self.mem2d.shape[0]
        mfns = np.asarray(tables[0], dtype=np.int64).reshape(-1)
        levels = np.asarray(tables[1], dtype=np.int64).reshape(-1)
        inside = (mfns >= 0) & (mfns < self.n)
        self.level = np.zeros(self.n, dtype=np.int8)
        self.level[mfns[inside]] = levels[inside]

    def entries(self, tables: np.ndarray, level: int) -> tuple[np.ndarray, np.ndarray]:
        """(source table, target mfn) of every present guest entry of `tables`."""
        e = self.mem2d[tables]
        present = (e & np.uint64(PTE_PRESENT)) != 0
        if level == 4:
            present &= _GUEST_L4_SLOTS
        rows, cols = np.nonzero(present)
        target = ((e[rows, cols] >> _U12) & _MFN_MASK).astype(np.int64)
        inside = target < self.n
        return tables[rows[inside]], target[inside]

    def linear_entries(self) -> list[tuple[int, int]]:
        """(source, target) of every entry onto another table of its own level."""
        found: list[tuple[int, int]] = []
        for level in (4, 3, 2):
            src, dst = self.entries(np.flatnonzero(self.level == level), level)
            same = (self.level[dst] == level) & (dst != src)  # a self-map needs no order
            found += zip(src[same].tolist(), dst[same].tolist(), strict=True)
        return found

    def tree(self, root: Root) -> set[int]:
        """The upper-level tables `root` validates: itself and its children, down to L2
        (an entry is a child when its target's final level is one below its own)."""
        members = {root.mfn} if root.level >= 2 else set()
        frontier = np.array([root.mfn], dtype=np.int64)
        for level in range(root.level, 2, -1):
            _, dst = self.entries(frontier, level)
            frontier = np.unique(dst[self.level[dst] == level - 1])
            members.update(frontier.tolist())
        return members


def linear_safe_order(mem: np.ndarray, roots: Sequence[Root],
                      tables: tuple[np.ndarray, np.ndarray]) -> list[int]:
    """Positions of `roots` in an order that validates each linear entry's target first.

    `tables` gives every page table's final level (mfns, levels). A root waits for
    the first root (in the given order) whose tree validates a target of a linear
    entry in its own tree; otherwise, and around cycles, the given order holds.
    """
    order = list(range(len(roots)))
    pt = _Tables(mem, tables)
    linear = pt.linear_entries()
    if not linear:
        return order
    trees = [pt.tree(r) for r in roots]
    provider: dict[int, int] = {}
    for i, tree in enumerate(trees):
        for mfn in tree:
            provider.setdefault(mfn, i)
    waits_for: list[set[int]] = [set() for _ in roots]
    for src, dst in linear:
        first = provider.get(dst)
        if first is None:
            continue  # nothing validates the target: the rebuild refuses it, as it should
        for i, tree in enumerate(trees):
            if src in tree and dst not in tree:
                waits_for[i].add(first)
    return _stable_topological(waits_for)


def _stable_topological(waits_for: list[set[int]]) -> list[int]:
    """Every node after what it waits for, smallest position first; a cycle's nodes
    are released in their given order."""
    n = len(waits_for)
    blocking = [0] * n
    released_by: list[list[int]] = [[] for _ in range(n)]
    for i, deps in enumerate(waits_for):
        for d in deps:
            blocking[i] += 1
            released_by[d].append(i)
    ready = [i for i in range(n) if not blocking[i]]
    heapq.heapify(ready)
    done = [False] * n
    out: list[int] = []
    while len(out) < n:
        if not ready:  # a cycle: take its first node as it comes
            ready = [next(i for i in range(n) if not done[i])]
        i = heapq.heappop(ready)
        if done[i]:
            continue
        done[i] = True
        out.append(i)
        for j in released_by[i]:
            blocking[j] -= 1
            if blocking[j] == 0 and not done[j]:
                heapq.heappush(ready, j)
    return out


def rebuild_from_roots(mem: np.ndarray, frames: FrameTable, domid: int, roots: Sequence[Root],
                       tables: tuple[np.ndarray, np.ndarray]) -> BulkResult:
    """`bulk_validate` in `linear_safe_order`; failures name positions in `roots`."""
    roots = list(roots)
    order = linear_safe_order(mem, roots, tables)
    result = bulk_validate(mem, frames, domid, [roots[i] for i in order])
    result.failures = sorted((RootFailure(order[f.index], f.root, f.rc) for f in result.failures),
                             key=lambda f: f.index)
    return result
