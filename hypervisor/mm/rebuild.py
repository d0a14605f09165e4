"""Rebuilding a domain's typerefs from its roots, whatever the history that led there.

`bulk_validate` (like the reference `PageTyping.apply_roots`) takes the roots
in the order given, and one of Xen's rules depends on that order: a
same-level ("linear") entry, say an L4 slot holding another L4 read-only
(`get_l4_linear_pagetable`; likewise L3 and L2), is accepted only if its
target is validated at that level already. Otherwise the entry types its
target one level down, which fails or, worse, succeeds with the wrong type.
A state reached through a history of pins and updates can hold such an entry
whose target no order of the roots validates first: it is pinned later in
pfn order, or validated later inside the same root's tree, or validated by
nothing but the linear entries themselves (pin A; pin B; link B into A
read-only; unpin B: B stays a validated L4, held by A's entry alone).

Whoever rebuilds from roots knows every page table's final level (the stream's
PFINFO types, or the old build's frame table), so the entries that must be
linear are known too: an entry of a level-L table onto a table of level L, in
a table the roots reach (through children and linear entries).
`rebuild_from_roots` validates each such target first, as a level-L table of
its own: by the given root that pins it at that level (or takes it as a CR3)
if there is one, else by a temporary pin, a *hold*. Targets go in ascending
level: a target's tree holds only lower levels, so the targets of linear
entries inside it are validated before it. Then the other roots, in the given
order; then each hold is unpinned, which drops one reference: the linear
entry that needed it still references the table, so nothing is devalidated
and every count ends exact (a successful rebuild only adds references, so the
frame table is the one the reference reaches in any order that validates
targets first).

Without linear entries (the common case) the roots go straight to
`bulk_validate` in the given order: nothing is read beyond one scan of the
upper-level tables. Failures name positions in the given roots; a hold that
fails is reported against the first root that reaches a linear entry onto it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from hypervisor.mm.bulk import BulkResult, bulk_validate
from hypervisor.mm.errors import MmError
from hypervisor.mm.frametable import FrameTable
from hypervisor.mm.pte import (
    ENTRIES_PER_TABLE,
    MFN_FIELD_BITS,
    PTE_PRESENT,
    XEN_L4_FIRST_SLOT,
    XEN_L4_LAST_SLOT,
)
from hypervisor.mm.typerefs import PageTyping, Root, RootFailure

_GUEST_L4_SLOTS = np.ones(ENTRIES_PER_TABLE, dtype=bool)
_GUEST_L4_SLOTS[XEN_L4_FIRST_SLOT : XEN_L4_LAST_SLOT + 1] = False
_MFN_MASK = np.uint64((1 << MFN_FIELD_BITS) - 1)
_U12 = np.uint64(12)
_EMPTY = np.empty(0, np.int64)


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

    def _linear(self, src: np.ndarray, dst: np.ndarray, level: int) -> np.ndarray:
        # a self-map is validated with its own table: it needs nothing first
        return (self.level[dst] == level) & (dst != src)

    def any_linear(self) -> bool:
        """Does any table with a final level hold an entry onto a table of its level?"""
        for level in (4, 3, 2):
            src, dst = self.entries(np.flatnonzero(self.level == level), level)
            if self._linear(src, dst, level).any():
                return True
        return False

    def reach(self, starts: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """From the tables `starts`, through children and linear entries: (the upper-level
        tables reached, as a mask; the source and target of every linear entry met)."""
        seen = np.zeros(self.n, dtype=bool)
        frontier = np.unique(np.array([m for m in starts if 0 <= m < self.n], dtype=np.int64))
        frontier = frontier[self.level[frontier] >= 2]
        seen[frontier] = True
        sources: list[np.ndarray] = []
        targets: list[np.ndarray] = []
        while frontier.size:
            found = []
            for level in (4, 3, 2):
                src, dst = self.entries(frontier[self.level[frontier] == level], level)
                linear = self._linear(src, dst, level)
                sources.append(src[linear])
                targets.append(dst[linear])
                child = (self.level[dst] == level - 1) & (level > 2)  # L1s hold no tables
                found.append(dst[linear | child])
            frontier = np.unique(np.concatenate(found))
            frontier = frontier[~seen[frontier]]
            seen[frontier] = True
        return (seen, np.concatenate(sources or [_EMPTY]), np.concatenate(targets or [_EMPTY]))


@dataclass(frozen=True)
class RebuildPlan:
    """What `rebuild_from_roots` validates, in order: `first` (each a linear entry's
    target: a given root's position, or a hold to unpin afterwards), then `rest` (given
    positions)."""

    first: list[int | Root]
    rest: list[int]

    @property
    def holds(self) -> list[Root]:
        return [x for x in self.first if isinstance(x, Root)]


def plan_rebuild(mem: np.ndarray, frames: FrameTable, roots: Sequence[Root],
                 tables: tuple[np.ndarray, np.ndarray]) -> RebuildPlan:
    """Which linear entries' targets to validate before the roots, and by what.

    `tables` gives every page table's final level (mfns, levels). A target already
    validated at its level in `frames` needs nothing.
    """
    given = list(range(len(roots)))
    pt = _Tables(mem, tables)
    if not pt.any_linear():
        return RebuildPlan([], given)
    _, _, dst = pt.reach([r.mfn for r in roots])
    targets = np.unique(dst)
    done = (frames.type_counts(targets) > 0) & (frames.types(targets) == pt.level[targets])
    targets = targets[~done]
    first: list[int | Root] = []
    taken: set[int] = set()
    for level, mfn in sorted(zip(pt.level[targets].tolist(), targets.tolist(), strict=True)):
        own = next((i for i, r in enumerate(roots)
                    if r.mfn == mfn and r.level == level and i not in taken), None)
        if own is None:
            first.append(Root(mfn, level, pinned=True))
        else:
            first.append(own)
            taken.add(own)
    return RebuildPlan(first, [i for i in given if i not in taken])


def rebuild_from_roots(mem: np.ndarray, frames: FrameTable, domid: int, roots: Sequence[Root],
                       tables: tuple[np.ndarray, np.ndarray]) -> BulkResult:
    """`bulk_validate` with every linear entry's target validated first (`plan_rebuild`);
    failures name positions in `roots`."""
    roots = list(roots)
    plan = plan_rebuild(mem, frames, roots, tables)
    if not plan.first:
        return bulk_validate(mem, frames, domid, roots)
    order = plan.first + plan.rest
    result = bulk_validate(mem, frames, domid,
                           [x if isinstance(x, Root) else roots[x] for x in order])
    refused = {f.index for f in result.failures}
    refused_holds = {x.mfn for x in (order[i] for i in refused) if isinstance(x, Root)}
    blame = _first_reaching(mem, roots, tables, refused_holds)
    failures: dict[int, RootFailure] = {}
    for f in result.failures:
        at = order[f.index]
        index = at if isinstance(at, int) else blame[at.mfn]
        failures.setdefault(index, RootFailure(index, roots[index], f.rc))
    result.failures = sorted(failures.values(), key=lambda f: f.index)
    typing = PageTyping(frames, mem)
    for i, hold in reversed(list(enumerate(plan.first))):
        if isinstance(hold, Root) and i not in refused:
            rc = typing.unpin_table(hold.mfn, domid)
            if rc:
                raise MmError(f"rebuild: dropping the hold on L{hold.level} mfn {hold.mfn:#x} "
                              f"failed ({rc})")
    return result


def _first_reaching(mem: np.ndarray, roots: Sequence[Root],
                    tables: tuple[np.ndarray, np.ndarray], targets: set[int]) -> dict[int, int]:
    """For each of `targets`, the first root whose tables hold a linear entry onto it."""
    first: dict[int, int] = {}
    pt = _Tables(mem, tables) if targets else None
    for i, root in enumerate(roots):
        if pt is None or len(first) == len(targets):
            break
        _, _, dst = pt.reach([root.mfn])
        for mfn in targets.intersection(dst.tolist()):
            first.setdefault(mfn, i)
    if len(first) < len(targets):
        raise MmError(f"rebuild: no root reaches a linear entry onto mfn "
                      f"{min(targets - first.keys()):#x}")
    return first
