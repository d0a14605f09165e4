"""Typeref reconstruction one page table at a time: the live update's `lazy` strategy.

After a live update the new build knows, from the hand-over stream, each
domain's frames, which of them are page tables and at which level (PFINFO
L1..L4, *_PIN for pinned ones) and every vCPU's CR3 / user CR3, but its frame
table holds no types. Instead of validating every tree before the guests resume
(`full-walk`, i.e. `bulk.bulk_validate`), `IncrementalTyping` takes the roots'
own references at once and validates tables one at a time afterwards: the MMU
validates the not-yet-validated tables of a walk before it fills a TLB entry
through them (`validate_path`: faults become typerefs) and a background sweeper
validates the rest under a budget per quantum (`sweep`). Until nothing is left,
no frame the stream lists as a page table may be mapped writable
(`may_map_writable`).

Validating one table T of stream level L means: check each present entry (guest
slots only in an L4) as `get_page_from_lNe` would, take the references the entry
holds (L1: a general reference, plus a PGT_writable type reference if RW; L2..L4:
a general reference and a type reference of the target's type), *without*
validating the targets, and set T's PGT_validated. A target whose type count goes
0 -> 1 is typed but left unvalidated (pending); it is validated when a walk or
the sweeper reaches it. One table's work is a handful of numpy passes over its
512 entries, and the sweeper validates a run of same-level tables in one pass.

Why the end state is byte-identical to `bulk_validate` / `PageTyping.apply_roots`
from the same roots (whenever those accept every root, which a stream taken
from a validated state guarantees):

- a successful apply only ever adds references, so each frame's final type,
  type count and general count are sums over the roots and the present entries
  of the tables it validated, whatever their order. Those tables are exactly
  the stream's page tables (every validated table is referenced, and nothing
  else is validated), and the sums do not depend on the order here either;
- the only order-dependent rule is how an entry of a level-L table is read: it
  types its target as L-1, or it is a linear entry onto a table validated
  earlier as L. In a successful apply a frame's type never changes, so the
  target's *final* type decides: L-1 means a child, L means linear. The stream
  gives the final types, so each entry here is read exactly as the reference
  read it, without needing the reference's depth-first order. A linear
  reference is taken before its target is validated (when T comes first); the
  frame-table effect (general +1, type +1, linear_pt_count of both tables) is
  the same, and the target stays unmappable-writable until it is validated;
- "a table may not both have linear entries and be the target of one" is a
  property of the final state: it is checked whichever of the two comes first;
- validated pages get nr_validated_ptes = partial_flags = 0 and keep their
  linear_pt_count sum, as the reference leaves them.

A state reached through a history of updates can be one that no apply in the
roots' order produces (say an L2 pinned first that maps an L2 pinned later
linearly): a full walk then reads that entry as a child and refuses or retypes
something, while this module, reading each entry by its target's stream type,
rebuilds the old state.

A table whose validation would fail means the stream does not describe a state
Xen could be in (a bug in the old build or a corrupt stream): HandoverTableError
names the table, slot, entry and rule; nothing is changed by the failed batch.

Sweep order (deterministic): level 4 down to 1, each level by ascending MFN.
Top-down means a table's parents are validated before the sweeper reaches it,
so its references are all counted. A table with type count 0 when the sweeper
passes it (referenced only by linear entries of a same-level table not yet
validated, or by nothing) is looked at again once the pass is over; tables still
at count 0 when nothing else is left are referenced by nothing, are *released*
(left untyped, as the reference never reaches them) and no longer count as page
tables.

Contract with the rest of the hypervisor while lazy mode is on: the reference
rules (`PageTyping`, `pv_mmu`) see a pending table as "being validated by
nobody" and cannot take over its validation, and a pending L1's writable
mappings are not counted yet. So before any operation that changes typing
(mmu_update, mmuext_op pins/unpins/base pointers) the caller runs `finish()`;
TLB fills need only `validate_path`, and `may_map_writable` on every fill.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from hypervisor.mm.builds import UNDEFINED_TYPE, PageType
from hypervisor.mm.errors import MmError
from hypervisor.mm.frametable import DOMID_INVALID, DOMID_IO, PGC_COUNT_MASK, FrameTable
from hypervisor.mm.pte import (
    ENTRIES_PER_TABLE,
    L1_DISALLOW_MASK,
    LN_DISALLOW_MASK,
    MFN_FIELD_BITS,
    PTE_PRESENT,
    PTE_RW,
    XEN_L4_FIRST_SLOT,
    XEN_L4_LAST_SLOT,
)

_GUEST_L4_SLOTS = np.ones(ENTRIES_PER_TABLE, dtype=bool)
_GUEST_L4_SLOTS[XEN_L4_FIRST_SLOT : XEN_L4_LAST_SLOT + 1] = False
# Entries a validation reads (and the sweeper's budget charges): an L4's Xen
# slots are skipped, as in promote_l4_table.
PTES_PER_TABLE = {4: int(_GUEST_L4_SLOTS.sum()), 3: ENTRIES_PER_TABLE, 2: ENTRIES_PER_TABLE,
                  1: ENTRIES_PER_TABLE}
# Tables per vectorised batch: 1 M entries (8 MiB), so temporaries stay small.
_BATCH_TABLES = 2048
_INT16 = np.iinfo(np.int16)
_U12 = np.uint64(12)
_MFN_MASK = np.uint64((1 << MFN_FIELD_BITS) - 1)
_P, _RW = np.uint64(PTE_PRESENT), np.uint64(PTE_RW)


class IncrementalTypingError(MmError):
    """IncrementalTyping was given or asked something it cannot do."""


class HandoverTableError(IncrementalTypingError):
    """The hand-over stream describes page tables or roots Xen's rules refuse."""


@dataclass(frozen=True)
class SweepStep:
    """What one `sweep` call did: tables validated and PTEs examined."""

    tables: int
    ptes: int


@dataclass
class _Plan:
    """The frame-table changes of one validated batch, decided before any is made."""

    general: tuple[np.ndarray, np.ndarray]  # (unique mfns, general references added)
    typed: list[tuple[np.ndarray, np.ndarray, PageType]]  # (mfns, type refs added, type)
    linear_entries: tuple[np.ndarray, np.ndarray]  # (tables, linear entries they gain)
    linear_uses: tuple[np.ndarray, np.ndarray]  # (tables, linear uses they gain)


def _count_unique(mfns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    uniq, counts = np.unique(mfns, return_counts=True)
    return uniq, counts.astype(np.int64)


class IncrementalTyping:
    """One domain's typerefs, rebuilt table by table from the hand-over stream.

    `tables` gives every page-table frame's level (a mapping mfn -> 1..4, or a
    pair of arrays (mfns, levels)), `pins` the pinned ones (mfn -> level, which
    must be the table's level) and `cr3_refs` one L4 per CR3 / user-CR3
    reference. The domain's page tables must be untyped in `frames` (fresh
    after a live update). The roots' references (pin: general + type + pinned
    bit; CR3: general + type) are taken here; everything else by validation.
    With `cr3_refs` None the set-up is done ahead (tables and pins are known
    before the pause, CR3s only at it) and the roots wait for `take_root_refs`.
    """

    def __init__(
        self,
        mem: np.ndarray,
        frames: FrameTable,
        domid: int,
        tables: Mapping[int, int] | tuple[np.ndarray, np.ndarray],
        pins: Mapping[int, int],
        cr3_refs: Sequence[int] | None,
    ) -> None:
        self.frames = frames
        self.mem2d = frames.check_mem(mem)
        self.domid = int(domid)
        self.layout = frames.layout
        self.n = frames.nr_frames
        layout = self.layout
        self._count_mask = np.uint64(layout.count_mask)
        self._validated_bit = np.uint64(1 << layout.validated_bit)
        self._type_shift = layout.type_shift
        self._type_field = (1 << layout.type_width) - 1
        self._writable_code = layout.type_codes[PageType.WRITABLE]
        self._writable_word = np.uint64(layout.encode(PageType.WRITABLE, 0, validated=True))
        self._pt_codes = frozenset(layout.type_codes[t] for t in (1, 2, 3, 4))

        mfns, levels = self._table_arrays(tables)
        self._check_fresh_tables(mfns)
        # Frame -> stream level (0: not a page table).
        self._level = np.zeros(self.n, dtype=np.int8)
        self._level[mfns] = levels
        order = np.lexsort((mfns, -levels))
        self._queue = mfns[order]
        self._queue_level = levels[order]
        # Queue position where each level's run ends (the queue goes 4, 3, 2, 1).
        self._level_end = {lvl: int(np.searchsorted(-self._queue_level, -lvl, side="right"))
                           for lvl in (4, 3, 2, 1)}
        self._cursor = 0
        self._left = int(self._queue.size)

        self.fill_validations = 0
        self.sweeper_steps = 0
        self.ptes_examined = 0
        self.pages_validated = 0
        self.refs_taken = 0
        self.tables_released = 0  # listed by the stream, referenced by nothing: left untyped
        self._pins = self._checked_pins(pins)
        self._roots_taken = False
        if cr3_refs is not None:
            self.take_root_refs(cr3_refs)

    # ------------------------------------------------------------------
    # Set-up
    # ------------------------------------------------------------------

    def _table_arrays(self, tables: Mapping[int, int] | tuple[np.ndarray, np.ndarray]
                      ) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(tables, Mapping):
            mfns = np.fromiter((int(m) for m in tables.keys()), dtype=np.int64, count=len(tables))
            levels = np.fromiter((int(v) for v in tables.values()), dtype=np.int64,
                                 count=len(tables))
        else:
            try:
                raw_mfns, raw_levels = tables
            except (TypeError, ValueError):
                raise IncrementalTypingError(
                    "tables must be a mapping mfn -> level or a pair (mfns, levels)") from None
            mfns = np.asarray(raw_mfns, dtype=np.int64).reshape(-1)
            levels = np.asarray(raw_levels, dtype=np.int64).reshape(-1)
            if mfns.shape != levels.shape:
                raise IncrementalTypingError(
                    f"tables: {mfns.size} mfns but {levels.size} levels")
        bad = np.flatnonzero((levels < 1) | (levels > 4))
        if bad.size:
            i = int(bad[0])
            raise IncrementalTypingError(
                f"tables: mfn {int(mfns[i]):#x} has level {int(levels[i])}, not 1..4")
        self._check_owned(mfns, "page table")
        order = np.argsort(mfns, kind="stable")
        m, lv = mfns[order], levels[order]
        dup = np.flatnonzero(m[1:] == m[:-1])
        if dup.size:
            i = int(dup[0])
            if lv[i] != lv[i + 1]:
                raise IncrementalTypingError(
                    f"tables: mfn {int(m[i]):#x} is listed as L{int(lv[i])} and L{int(lv[i + 1])}")
            keep = np.ones(m.size, dtype=bool)
            keep[dup + 1] = False
            m, lv = m[keep], lv[keep]
        return m, lv

    def _check_owned(self, mfns: np.ndarray, what: str) -> None:
        outside = mfns[(mfns < 0) | (mfns >= self.n)]
        if outside.size:
            raise IncrementalTypingError(
                f"{what} mfn {int(outside[0]):#x} is outside the frame table "
                f"(0..{self.n - 1:#x})")
        not_ours = mfns[~self._owned(mfns)]
        if not_ours.size:
            m = int(not_ours[0])
            raise HandoverTableError(
                f"{what} mfn {m:#x} is not an allocated frame of domain {self.domid} "
                f"(owner {self._owner_name(m)})")

    def _check_fresh_tables(self, mfns: np.ndarray) -> None:
        """The stream's tables must be untyped: nothing may have validated them yet."""
        f = self.frames
        ti = f.type_info[mfns]
        layout = self.layout
        busy = ((layout.count_of(ti) != 0) | layout.validated_of(ti) | layout.partial_of(ti)
                | layout.pinned_of(ti) | layout.locked_of(ti)
                | (layout.type_of(ti) == UNDEFINED_TYPE)
                | (f.linear_pt_count[mfns] != 0) | (f.nr_validated_ptes[mfns] != 0)
                | (f.partial_flags[mfns] != 0))
        if busy.any():
            m = int(mfns[np.argmax(busy)])
            raise IncrementalTypingError(
                f"page table {m:#x} of domain {self.domid} is already typed "
                f"(type_info {int(f.type_info[m]):#018x}, linear_pt_count "
                f"{int(f.linear_pt_count[m])}): incremental typing starts from untyped tables")

    def _checked_pins(self, pins: Mapping[int, int]) -> np.ndarray:
        pin_mfns = np.fromiter((int(m) for m in pins.keys()), dtype=np.int64, count=len(pins))
        pin_levels = np.fromiter((int(v) for v in pins.values()), dtype=np.int64,
                                 count=len(pins))
        self._check_owned(pin_mfns, "pinned")
        wrong = np.flatnonzero(self._level[pin_mfns] != pin_levels)
        if wrong.size:
            i = int(wrong[0])
            m = int(pin_mfns[i])
            raise HandoverTableError(
                f"mfn {m:#x} is pinned as L{int(pin_levels[i])} but the stream lists it as "
                f"{self._level_name(m)}")
        return pin_mfns

    def take_root_refs(self, cr3_refs: Sequence[int]) -> None:
        """The pins' and CR3s' own references, once, before anything is validated."""
        if self._roots_taken:
            raise IncrementalTypingError("the roots' references are taken already")
        pin_mfns = self._pins
        cr3 = np.asarray([int(m) for m in cr3_refs], dtype=np.int64)
        self._check_owned(cr3, "CR3")
        not_l4 = cr3[self._level[cr3] != 4]
        if not_l4.size:
            m = int(not_l4[0])
            raise HandoverTableError(
                f"CR3 mfn {m:#x} is {self._level_name(m)} in the stream, not an L4 table")
        self._roots_taken = True
        mfns, refs = _count_unique(np.concatenate([pin_mfns, cr3]))
        if mfns.size == 0:
            return
        # The tables are untyped (checked at set-up): each root table becomes its
        # level with one type reference per root, unvalidated.
        pinned = np.isin(mfns, pin_mfns)
        f = self.frames
        f.count_info[mfns] += refs.astype(np.uint64)
        f.type_info[mfns] = self.layout.encode(self._level[mfns].astype(np.uint8),
                                               refs.astype(np.uint64), pinned=pinned)
        self.refs_taken += 2 * int(refs.sum())

    def _check_roots_taken(self) -> None:
        if not self._roots_taken:
            raise IncrementalTypingError("validation before the roots' references "
                                         "(take_root_refs)")

    # ------------------------------------------------------------------
    # Queries
    # ------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Page tables neither validated nor released yet."""
        return self._left

    @property
    def done(self) -> bool:
        """Nothing left: the frame table is what a full walk would have made."""
        return self._left == 0

    @property
    def counters(self) -> dict[str, int]:
        return {"fill_validations": self.fill_validations, "sweeper_steps": self.sweeper_steps,
                "ptes_examined": self.ptes_examined, "pages_validated": self.pages_validated,
                "refs_taken": self.refs_taken, "tables_released": self.tables_released,
                "pending": self.pending}

    def level_of(self, mfn: int) -> int:
        """The stream level of `mfn` (0: not a page table)."""
        return int(self._level[self._check_mfn(mfn)])

    def is_validated(self, mfn: int) -> bool:
        """Whether `mfn` is a validated page table (of any level)."""
        ti = int(self.frames.type_info[self._check_mfn(mfn)])
        code = (ti >> self._type_shift) & self._type_field
        return bool(ti & int(self._validated_bit)) and code in self._pt_codes

    def may_map_writable(self, mfn: int) -> bool:
        """May the MMU map `mfn` writable? Never a stream page table while lazy mode is on,
        never a frame typed other than writable with references, never one outside the
        frame table."""
        if not 0 <= mfn < self.n:
            return False
        if self._left and self._level[mfn]:
            return False
        ti = int(self.frames.type_info[mfn])
        return not ti & int(self._count_mask) or (
            (ti >> self._type_shift) & self._type_field) == self._writable_code

    def may_map_writable_many(self, mfns: np.ndarray | Sequence[int]) -> np.ndarray:
        """`may_map_writable` of every frame in `mfns` (a bool array)."""
        m = np.asarray(mfns, dtype=np.int64)
        inside = (m >= 0) & (m < self.n)
        safe = np.where(inside, m, 0)
        ti = self.frames.type_info[safe]
        ok = inside & (((ti & self._count_mask) == 0)
                       | (self.layout.type_of(ti) == PageType.WRITABLE))
        if self._left:
            ok &= self._level[safe] == 0
        return ok

    # ------------------------------------------------------------------
    # Validation on a walk
    # ------------------------------------------------------------------

    def validate_table(self, mfn: int) -> bool:
        """Validate one page table; False if it already was. Its type count must be > 0
        (a root, or referenced by a validated table)."""
        m = self._stream_table(mfn)
        if self._validated(m):
            return False
        self._check_referenced(m, None)
        self._validate_batch(np.array([m], dtype=np.int64), int(self._level[m]))
        return True

    def validate_path(self, mfns: Sequence[int]) -> int:
        """Validate the tables of a walk, top-down; how many were not validated before.

        Each table must be validated already, referenced, or referenced by an entry of
        the table before it. A hand-over error on the way leaves the tables above it
        validated (each table's validation is all or nothing).
        """
        self._check_roots_taken()
        path = [self._stream_table(m) for m in mfns]
        for i, m in enumerate(path):
            if not self._validated(m) and not self._type_count(m):
                if i == 0 or not self._references(path[i - 1], m):
                    self._check_referenced(m, path[i - 1] if i else None)
        newly = 0
        for m in path:
            if not self._validated(m):
                self._check_referenced(m, None)
                self._validate_batch(np.array([m], dtype=np.int64), int(self._level[m]))
                newly += 1
        self.fill_validations += newly
        return newly

    def _check_mfn(self, mfn: int) -> int:
        if not 0 <= mfn < self.n:
            raise IncrementalTypingError(
                f"mfn {mfn:#x} is outside the frame table (0..{self.n - 1:#x})")
        return int(mfn)

    def _stream_table(self, mfn: int) -> int:
        m = self._check_mfn(int(mfn))
        if not self._level[m]:
            raise IncrementalTypingError(
                f"mfn {m:#x} is not a page table of domain {self.domid} in the hand-over stream")
        return m

    def _validated(self, m: int) -> bool:
        return bool(int(self.frames.type_info[m]) & int(self._validated_bit))

    def _type_count(self, m: int) -> int:
        return int(self.frames.type_info[m]) & int(self._count_mask)

    def _check_referenced(self, m: int, parent: int | None) -> None:
        ti = int(self.frames.type_info[m])
        if not ti & int(self._count_mask):
            via = f" (nor by an entry of {parent:#x}, the table above it)" if parent is not None \
                else ""
            raise IncrementalTypingError(
                f"page table {m:#x} is referenced by no root and no validated table yet{via}: "
                f"only referenced tables are validated")
        code = (ti >> self._type_shift) & self._type_field
        if code != self.layout.type_codes[int(self._level[m])] or self.layout.partial_of(ti):
            raise IncrementalTypingError(
                f"page table {m:#x} (L{int(self._level[m])}) has type_info {ti:#018x}: "
                f"something other than incremental typing typed it")

    def _references(self, parent: int, child: int) -> bool:
        """Whether a present (guest) entry of table `parent` points at `child`."""
        e = self.mem2d[parent]
        hit = ((e & _P) != 0) & (((e >> _U12) & _MFN_MASK) == np.uint64(child))
        if self._level[parent] == 4:
            hit &= _GUEST_L4_SLOTS
        return bool(hit.any()) and self._level[parent] > 1

    # ------------------------------------------------------------------
    # The sweeper
    # ------------------------------------------------------------------

    def sweep(self, budget_ptes: int | None = None, *, budget_tables: int | None = None
              ) -> SweepStep:
        """Validate pending tables in sweep order until a budget is used up.

        `budget_ptes` charges each table the entries it reads (512; 496 for an L4);
        tables are taken while the charge so far is below the budget, so a step
        validates at least one table if any is pending. `budget_tables` caps the
        number of tables. Give either or both.
        """
        for name, value in (("budget_ptes", budget_ptes), ("budget_tables", budget_tables)):
            if value is not None and (isinstance(value, bool)
                                      or not isinstance(value, int | np.integer) or value < 1):
                raise IncrementalTypingError(f"{name} must be a positive integer, got {value!r}")
        if budget_ptes is None and budget_tables is None:
            raise IncrementalTypingError("sweep needs budget_ptes or budget_tables")
        self._check_roots_taken()
        if self.done:
            return SweepStep(0, 0)
        self.sweeper_steps += 1
        max_ptes = float("inf") if budget_ptes is None else int(budget_ptes)
        max_tables = float("inf") if budget_tables is None else int(budget_tables)
        tables = ptes = 0
        while tables < max_tables and ptes < max_ptes and not self.done:
            batch, level = self._next_batch(max_tables - tables, max_ptes - ptes)
            if batch.size == 0:
                continue
            self._validate_batch(batch, level)
            tables += batch.size
            ptes += batch.size * PTES_PER_TABLE[level]
        return SweepStep(tables, ptes)

    def finish(self) -> SweepStep:
        """Validate everything left (before typing hypercalls, or to end lazy mode)."""
        tables = ptes = 0
        while not self.done:
            step = self.sweep(budget_tables=max(1, self._queue.size))
            tables, ptes = tables + step.tables, ptes + step.ptes
        return SweepStep(tables, ptes)

    def _allowed(self, level: int, max_tables: float, max_ptes: float) -> int:
        """How many tables of `level` fit the remaining budget (at least one)."""
        by_ptes = -(-max_ptes // PTES_PER_TABLE[level]) if max_ptes != float("inf") else max_ptes
        return int(max(1, min(max_tables, by_ptes, _BATCH_TABLES)))

    def _next_batch(self, max_tables: float, max_ptes: float) -> tuple[np.ndarray, int]:
        """The next run of same-level tables to validate (possibly empty: call again)."""
        q = self._queue
        if self._cursor < q.size:
            level = int(self._queue_level[self._cursor])
            end = min(self._level_end[level], self._cursor + _BATCH_TABLES)
            seg = q[self._cursor : end]
            need = np.flatnonzero(self._needs_validation(seg))
            take = need[: self._allowed(level, max_tables, max_ptes)]
            # Tables passed at count 0 are picked up by the tail pass below.
            self._cursor += int(take[-1]) + 1 if take.size < need.size else seg.size
            return seg[take], level
        # Every table was passed once: validate what got referenced since, then
        # release what nothing references.
        need = np.flatnonzero(self._needs_validation(q))
        if need.size == 0:
            self.tables_released = int(np.count_nonzero(~self.frames.validated(q)))
            self._left = 0
            return np.empty(0, np.int64), 0
        level = int(self._queue_level[need[0]])
        need = need[self._queue_level[need] == level]
        return q[need[: self._allowed(level, max_tables, max_ptes)]], level

    def _needs_validation(self, mfns: np.ndarray) -> np.ndarray:
        ti = self.frames.type_info[mfns]
        return ((ti & self._validated_bit) == 0) & ((ti & self._count_mask) != 0)

    # ------------------------------------------------------------------
    # Validating a batch of same-level tables
    # ------------------------------------------------------------------

    def _validate_batch(self, tables: np.ndarray, level: int) -> None:
        entries = self.mem2d[tables]
        if level == 1:
            plan = self._plan_l1(tables, entries)
        else:
            plan = self._plan_upper(tables, entries, level)
        self._commit(plan, tables)
        self.pages_validated += tables.size
        self._left -= tables.size
        self.ptes_examined += tables.size * PTES_PER_TABLE[level]

    def _owned(self, mfns: np.ndarray) -> np.ndarray:
        inside = (mfns >= 0) & (mfns < self.n)
        safe = np.where(inside, mfns, 0)
        return (inside & (self.frames.owner[safe] == self.domid)
                & ((self.frames.count_info[safe] & np.uint64(PGC_COUNT_MASK)) != 0))

    def _present(self, tables: np.ndarray, entries: np.ndarray, level: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(source table, slot, entry, target mfn) of every present guest entry."""
        present = (entries & _P) != 0
        if level == 4:
            present &= _GUEST_L4_SLOTS
        rows, cols = np.nonzero(present)
        e = entries[rows, cols]
        return tables[rows], cols, e, ((e >> _U12) & _MFN_MASK).astype(np.int64)

    def _plan_l1(self, tables: np.ndarray, entries: np.ndarray) -> _Plan:
        src, slot, e, target = self._present(tables, entries, 1)
        ok = ((e & np.uint64(L1_DISALLOW_MASK)) == 0) & self._owned(target)
        rw = (e & _RW) != 0
        safe = np.where(ok, target, 0)
        ok &= ~(rw & (self._level[safe] != 0))  # writable mappings of page tables
        self._refuse_first(~ok, src, slot, e, 1)
        writable, wrefs = _count_unique(target[rw])
        self._check_types(writable, PageType.WRITABLE, src, slot, e, target, rw, 1)
        return _Plan(general=_count_unique(target), typed=[(writable, wrefs, PageType.WRITABLE)],
                     linear_entries=(np.empty(0, np.int64), np.empty(0, np.int64)),
                     linear_uses=(np.empty(0, np.int64), np.empty(0, np.int64)))

    def _plan_upper(self, tables: np.ndarray, entries: np.ndarray, level: int) -> _Plan:
        src, slot, e, target = self._present(tables, entries, level)
        owned = self._owned(target)
        rw = (e & _RW) != 0
        is_self = target == src
        target_level = self._level[np.where(owned, target, 0)]
        child = owned & ~is_self & (target_level == level - 1)
        linear = owned & ~is_self & (target_level == level)
        ok = (((e & np.uint64(LN_DISALLOW_MASK)) == 0)
              & ((is_self & ~rw) | child | (linear & ~rw)))
        self._refuse_first(~ok, src, slot, e, level)
        children, crefs = _count_unique(target[child])
        used, urefs = _count_unique(target[linear])
        self._check_types(children, PageType(level - 1), src, slot, e, target, child, level)
        self._check_types(used, PageType(level), src, slot, e, target, linear, level)
        having, hrefs = _count_unique(src[linear])
        self._check_linear(having, hrefs, used, urefs, src, slot, e, target, linear, level)
        refs = np.concatenate([target[child], target[linear]])
        return _Plan(general=_count_unique(refs),
                     typed=[(children, crefs, PageType(level - 1)), (used, urefs, PageType(level))],
                     linear_entries=(having, hrefs), linear_uses=(used, urefs))

    def _check_types(self, mfns: np.ndarray, want: PageType, src: np.ndarray, slot: np.ndarray,
                     e: np.ndarray, target: np.ndarray, which: np.ndarray, level: int) -> None:
        """Frames taking `want` type references must have no references of another type."""
        if mfns.size == 0:
            return
        ti = self.frames.type_info[mfns]
        count = ti & self._count_mask
        clash = (count != 0) & (self.layout.type_of(ti) != want)
        if clash.any():
            bad = mfns[clash]
            self._refuse_first(which & np.isin(target, bad), src, slot, e, level,
                               f"its target is already typed {self._type_name(int(bad[0]))}, "
                               f"not {want.name}")

    def _check_linear(self, having: np.ndarray, hrefs: np.ndarray, used: np.ndarray,
                      urefs: np.ndarray, src: np.ndarray, slot: np.ndarray, e: np.ndarray,
                      target: np.ndarray, linear: np.ndarray, level: int) -> None:
        """No table may both have linear entries and be the target of one (in either order)."""
        if having.size == 0:
            return
        lpc = self.frames.linear_pt_count
        h0, u0 = lpc[having].astype(np.int64), lpc[used].astype(np.int64)
        both = np.intersect1d(having, used)
        bad_having = having[(h0 < 0) | (h0 + hrefs > _INT16.max) | np.isin(having, both)]
        bad_used = used[(u0 > 0) | (u0 - urefs < _INT16.min)]
        if bad_having.size or bad_used.size:
            culprit = linear & (np.isin(src, bad_having) | np.isin(target, bad_used))
            self._refuse_first(culprit, src, slot, e, level,
                               "a table may not both have linear entries and be the target of "
                               "one (or its linear count overflows)")

    def _refuse_first(self, bad: np.ndarray, src: np.ndarray, slot: np.ndarray, e: np.ndarray,
                      level: int, reason: str | None = None) -> None:
        if not bad.any():
            return
        i = int(np.argmax(bad))
        entry = int(e[i])
        raise HandoverTableError(
            f"hand-over stream, domain {self.domid}: L{level} table {int(src[i]):#x} slot "
            f"{int(slot[i])} ({entry:#018x}): "
            f"{reason or self._why_refused(int(src[i]), entry, level)}")

    def _why_refused(self, table: int, entry: int, level: int) -> str:
        """The rule one entry breaks (the vectorised checks found that it breaks one)."""
        mask = L1_DISALLOW_MASK if level == 1 else LN_DISALLOW_MASK
        if entry & mask:
            return f"flags {entry & mask:#x} are not allowed in an L{level} entry"
        target = (entry >> 12) & ((1 << MFN_FIELD_BITS) - 1)
        if target >= self.n:
            return f"it maps mfn {target:#x}, outside the frame table"
        if not self._owned(np.array([target]))[0]:
            return f"it maps mfn {target:#x}, owned by {self._owner_name(target)}"
        if level == 1:
            return f"it maps the {self._level_name(target)} page table {target:#x} writable"
        if target == table:
            return "a self-map must be read-only"
        if self._level[target] == level:
            return f"the linear entry onto L{level} table {target:#x} must be read-only"
        return (f"it maps mfn {target:#x}, which the stream lists as "
                f"{self._level_name(target)}; an L{level} entry needs an L{level - 1} table "
                f"(or a read-only L{level} one: a linear entry)")

    def _commit(self, plan: _Plan, tables: np.ndarray) -> None:
        f = self.frames
        mfns, refs = plan.general
        f.count_info[mfns] += refs.astype(np.uint64)
        self.refs_taken += int(refs.sum())
        for typed, trefs, ptype in plan.typed:
            if typed.size == 0:
                continue
            add = trefs.astype(np.uint64)
            ti = f.type_info[typed]
            if ptype == PageType.WRITABLE:
                # Typed at count 0 (validated at once) or counted up: either way
                # writable|validated|(count + added), as get_page_type leaves it.
                new = ((ti & self._count_mask) + add) | self._writable_word
            else:
                fresh = self.layout.encode(np.full(typed.size, ptype, dtype=np.uint8), add)
                new = np.where((ti & self._count_mask) == 0, fresh, ti + add)
            f.type_info[typed] = new
            self.refs_taken += int(trefs.sum())
        having, hrefs = plan.linear_entries
        if having.size:
            f.linear_pt_count[having] = (f.linear_pt_count[having] + hrefs).astype(np.int16)
        used, urefs = plan.linear_uses
        if used.size:
            f.linear_pt_count[used] = (f.linear_pt_count[used] - urefs).astype(np.int16)
        f.type_info[tables] |= self._validated_bit

    # ------------------------------------------------------------------
    # Names for messages
    # ------------------------------------------------------------------

    def _level_name(self, mfn: int) -> str:
        level = int(self._level[mfn]) if 0 <= mfn < self.n else 0
        return f"L{level}" if level else "not a page table"

    def _owner_name(self, mfn: int) -> str:
        owner = int(self.frames.owner[mfn])
        if owner == DOMID_INVALID or not int(self.frames.count_info[mfn]) & PGC_COUNT_MASK:
            return "nobody (a free frame)"
        if owner == DOMID_IO:
            return "DOMID_IO (I/O memory)"
        return f"domain {owner}"

    def _type_name(self, mfn: int) -> str:
        code = int(self.frames.types(np.array([mfn]))[0])
        return "undefined" if code == UNDEFINED_TYPE else PageType(code).name


__all__ = [
    "HandoverTableError",
    "IncrementalTyping",
    "IncrementalTypingError",
    "PTES_PER_TABLE",
    "SweepStep",
]
