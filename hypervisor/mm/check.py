"""An independent check of a domain's typerefs against the typeref invariant.

`check_typerefs` recomputes, from the page tables reachable from the pins and
CR3s alone, what every frame's type, type count and pinned bit must be
(docs/design.md §3):

    type count = pinned (1) + CR3 / user-CR3 references
                 + referencing parent entries (self-maps not counted)
                 + writable L1 entries mapping the frame + GDT/LDT uses

and compares it with the frame table. It shares no code with `typerefs` or
`bulk` (only the entry format): a table's entries are read level by level, an
entry at level L pointing at another table of level L is a linear entry (one
reference of type L), anything else is a child of type L-1. A frame asked to be
two types (two page-table levels, or a page table and writable) is reported:
no frame may be both a page table and writable. One case needs the recorded
type: a table that only linear entries keep alive (see
`_with_linear_only_tables`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from hypervisor.mm.builds import UNDEFINED_TYPE, PageType
from hypervisor.mm.frametable import FrameTable
from hypervisor.mm.pte import (
    ENTRIES_PER_TABLE,
    MFN_FIELD_BITS,
    PTE_PRESENT,
    PTE_RW,
    XEN_L4_FIRST_SLOT,
    XEN_L4_LAST_SLOT,
)

_WRITABLE_BIT = 1 << int(PageType.WRITABLE)
_SEG_DESC_BIT = 1 << int(PageType.SEG_DESC)


@dataclass(frozen=True)
class Difference:
    """Frame `mfn`'s `field` is `actual` where the invariant says `expected`."""

    mfn: int
    field: str
    expected: object
    actual: object

    def __str__(self) -> str:
        return f"mfn {self.mfn:#x}: {self.field} is {self.actual!r}, expected {self.expected!r}"


def _names(claims: int) -> str:
    return " and ".join(PageType(t).name for t in range(8) if claims >> t & 1)


def check_typerefs(
    mem: np.ndarray,
    frames: FrameTable,
    domid: int,
    pins: Mapping[int, int],
    cr3_refs: Sequence[int],
    *,
    seg_desc_refs: Mapping[int, int] | None = None,
) -> list[Difference]:
    """Every difference between the frame table and the invariant; [] if clean.

    `pins` maps pinned frames to their level, `cr3_refs` lists every vCPU's CR3
    and user CR3 (one entry per reference), `seg_desc_refs` counts GDT/LDT uses.
    """
    n = frames.nr_frames
    mem2d = frames.check_mem(mem)
    diffs: list[Difference] = []
    expected = np.zeros(n, dtype=np.int64)  # expected type count
    claims = np.zeros(n, dtype=np.uint8)  # bit t: some reference wants PageType(t)
    referenced_out_of_range: set[int] = set()

    def want(mfns: np.ndarray, type_bit: int) -> np.ndarray:
        inside = (mfns >= 0) & (mfns < n)
        if not inside.all():
            referenced_out_of_range.update(int(m) for m in mfns[~inside])
            mfns = mfns[inside]
        np.add.at(expected, mfns, 1)
        claims[mfns] |= np.uint8(type_bit)
        return mfns

    pinned_expected = np.zeros(n, dtype=bool)
    by_level: dict[int, list[int]] = {1: [], 2: [], 3: [], 4: []}
    for mfn, level in pins.items():
        if not 1 <= level <= 4:
            diffs.append(Difference(int(mfn), "pin level", "1..4", level))
            continue
        by_level[level].append(int(mfn))
    for level, mfns in by_level.items():
        inside = [m for m in mfns if 0 <= m < n]
        pinned_expected[inside] = True
        want(np.array(mfns, dtype=np.int64), 1 << level)
    want(np.array(list(cr3_refs), dtype=np.int64), 1 << 4)
    for mfn, uses in (seg_desc_refs or {}).items():
        for _ in range(uses):
            want(np.array([mfn], dtype=np.int64), _SEG_DESC_BIT)

    # Tables of each level: the roots of that level plus the children found one
    # level up. Read the top level first so same-level targets are known.
    tables = {lvl: np.unique(np.array(m, dtype=np.int64)) for lvl, m in by_level.items()}
    tables[4] = np.unique(np.concatenate([tables[4], np.array(list(cr3_refs), np.int64)]))
    guest_l4 = np.ones(ENTRIES_PER_TABLE, dtype=bool)
    guest_l4[XEN_L4_FIRST_SLOT : XEN_L4_LAST_SLOT + 1] = False
    mfn_mask = np.uint64((1 << MFN_FIELD_BITS) - 1)
    def read(t: np.ndarray, level: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(table row, entry, target) of every present guest entry of tables `t`."""
        entries = mem2d[t]
        present = (entries & np.uint64(PTE_PRESENT)) != 0
        if level == 4:
            present &= guest_l4
        rows, cols = np.nonzero(present)
        e = entries[rows, cols]
        return rows, e, ((e >> np.uint64(12)) & mfn_mask).astype(np.int64)

    for level in (4, 3, 2, 1):
        t = tables[level]
        t = t[(t >= 0) & (t < n)]
        if t.size == 0:
            continue
        if level > 1:
            t = _with_linear_only_tables(frames, domid, t, level, read)
        rows, e, target = read(t, level)
        if level == 1:
            want(target[(e & np.uint64(PTE_RW)) != 0], _WRITABLE_BIT)
            continue
        is_self = target == t[rows]
        same_level = np.isin(target, t) & ~is_self
        want(target[same_level], 1 << level)  # linear entries
        children = want(target[~same_level & ~is_self], 1 << (level - 1))
        tables[level - 1] = np.unique(np.concatenate([tables[level - 1], children]))

    for m in sorted(referenced_out_of_range):
        diffs.append(Difference(m, "mfn", f"< {n:#x}", m))

    # Compare with the frame table, for the domain's frames and every frame the
    # domain's tables reference.
    check = np.flatnonzero((frames.owner == domid) | (claims != 0))
    layout = frames.layout
    ti = frames.type_info[check]
    actual_type = layout.type_of(ti)
    actual_count = layout.count_of(ti).astype(np.int64)
    actual_pinned = layout.pinned_of(ti)
    exp_count = expected[check]
    exp_claims = claims[check]
    single = (exp_claims & (exp_claims - 1)) == 0  # at most one type wanted
    exp_type = np.zeros(check.size, dtype=np.int64)
    nz = exp_claims != 0
    exp_type[nz & single] = np.log2(exp_claims[nz & single]).astype(np.int64)

    owner = frames.owner[check]
    for i in np.flatnonzero(nz & (owner != domid)):
        diffs.append(Difference(int(check[i]), "owner", domid, int(owner[i])))
    for i in np.flatnonzero(~single):
        c = int(exp_claims[i])
        field = ("page table and writable" if c & _WRITABLE_BIT and c & 0b11110
                 else "type")
        diffs.append(Difference(int(check[i]), field, _names(c), _type_name(actual_type[i])))
    for i in np.flatnonzero(exp_count != actual_count):
        diffs.append(Difference(int(check[i]), "type count", int(exp_count[i]),
                                int(actual_count[i])))
    wrong_type = nz & single & (actual_type != exp_type)
    for i in np.flatnonzero(wrong_type):
        diffs.append(Difference(int(check[i]), "type", PageType(int(exp_type[i])).name,
                                _type_name(actual_type[i])))
    unvalidated = nz & (actual_count > 0) & ~layout.validated_of(ti)
    for i in np.flatnonzero(unvalidated):
        diffs.append(Difference(int(check[i]), "validated", True, False))
    partial = layout.partial_of(ti)
    for i in np.flatnonzero(partial):
        diffs.append(Difference(int(check[i]), "partial", False, True))
    exp_pinned = pinned_expected[check]
    for i in np.flatnonzero(exp_pinned != actual_pinned):
        diffs.append(Difference(int(check[i]), "pinned", bool(exp_pinned[i]),
                                bool(actual_pinned[i])))
    return diffs


def _with_linear_only_tables(frames: FrameTable, domid: int, tables: np.ndarray, level: int,
                             read) -> np.ndarray:
    """`tables` plus the level-`level` tables only linear entries keep alive.

    Once its pin or parent goes, a table can stay validated because a read-only
    same-level entry still references it. The page tables alone cannot tell such
    an entry from one onto a child one level down, so here (and only here) the
    recorded type decides: a read-only target recorded as a validated, in-use
    table of this level is taken as one.
    """
    known = np.unique(tables)
    frontier = known
    layout = frames.layout
    while frontier.size:
        _, e, target = read(frontier, level)
        cand = target[((e & np.uint64(PTE_RW)) == 0) & (target >= 0) & (target < frames.nr_frames)]
        cand = np.setdiff1d(np.unique(cand), known)
        ti = frames.type_info[cand]
        keep = ((layout.type_of(ti) == level) & (layout.count_of(ti) > 0)
                & layout.validated_of(ti) & (frames.owner[cand] == domid))
        frontier = cand[keep]
        known = np.union1d(known, frontier)
    return known


def _type_name(code: int) -> str:
    return "undefined" if code == UNDEFINED_TYPE else PageType(int(code)).name
