"""Vectorised reconstruction of a PV domain's typerefs from its roots.

`bulk_validate` writes exactly the frame table `PageTyping.apply_roots` would
(pinning the same roots in the same order), but in passes over whole levels
at once: read every entry of every table to validate at level L, mask the
present ones, check their flags, extract the MFNs, count the references, then
go down a level. A 64 GiB guest (16.8 M L1 entries) takes about 0.15 s.

The reference visits entries depth first, and three rules depend on that order:
which of two conflicting references types a frame first, whether the target of
a linear entry is already validated, and which of two linear uses of a table
comes first. The bulk pass gives every reference its depth-first position as a
key (root number, then the slot at each level, 10 bits per level, a slot stored
as slot + 1 so that an entry sorts after the entry that led to its table) and
decides these rules by comparing keys. A root fails at the smallest key of a
failing reference, with that reference's errno.

One case is not attributed by keys: a frame referenced as page tables of two
different levels (its contents would be read at both). Then the first root
involved is handed to the reference implementation, which decides it exactly;
that only happens for trees the rules refuse anyway.

Cost: the bulk of a large guest is its L1 entries (16.8 M at 64 GiB). They
are read, classified and counted in one compiled pass (`bulk_kernels.count_l1`,
which buckets the references so that counting stays in cache), and the counts
go into the frame table in another (`bulk_kernels.apply_refs`); the upper
levels are few and stay numpy. The big per-pass buffers (reference counter,
bucket buffer, the domain's frame mask) are kept for the next pass and call,
and `prepare` can fault them in ahead of time, so that a validation does not
pay their first touch. The frame table is decoded only where its words are
non-zero, and the checks look at candidate frames only. `BulkResult.phases`
says where the time went.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import ModuleType

import numpy as np

from hypervisor.mm.builds import UNDEFINED_TYPE, PageType
from hypervisor.mm.errors import EBUSY, EINVAL, EPERM, ERESTART, MmError
from hypervisor.mm.frametable import DOMID_IO, PGC_COUNT_MASK, FrameTable
from hypervisor.mm.pte import (
    ENTRIES_PER_TABLE,
    INVALID_MFN_IN_PTE,
    MFN_FIELD_BITS,
    PTE_PRESENT,
    PTE_RW,
    XEN_L4_FIRST_SLOT,
    XEN_L4_LAST_SLOT,
    disallow_mask,
)
from hypervisor.mm.typerefs import PageTyping, Root, RootFailure

_ROOT_SHIFT = 40
_LEVEL_BITS = 10
_MAX_ROOTS = 1 << (63 - _ROOT_SHIFT)
_NO_KEY = np.iinfo(np.int64).max
_U12 = np.uint64(12)
_MFN_MASK = np.uint64((1 << MFN_FIELD_BITS) - 1)
# L1 tables per vectorised step of the (rare) refusal scans: 1 M entries (8 MiB),
# so temporaries stay small.
_L1_CHUNK = 2048
# The reference counter is uint32 until a pass has counted more references than
# that could hold; then it is widened to uint64 (exact either way, and half the
# memory and page faults in practice).
_WIDEN_AT = np.iinfo(np.uint32).max
PHASES = ("setup", "classify", "count", "check", "write_back")

_GUEST_L4_SLOTS = np.ones(ENTRIES_PER_TABLE, dtype=bool)
_GUEST_L4_SLOTS[XEN_L4_FIRST_SLOT : XEN_L4_LAST_SLOT + 1] = False


class BulkPreconditionError(MmError):
    """The frame table is not in a state bulk validation starts from."""


@dataclass
class BulkResult:
    """Refused roots (as `PageTyping.apply_roots` reports them) and how they were found."""

    failures: list[RootFailure]
    passes: int = 0
    reference_roots: int = 0  # roots decided by the reference implementation
    # Seconds per phase (PHASES), summed over the passes: setup (checks, decoding
    # the frame table, marking the domain's frames), classify (the L4-L2
    # entries: present, flags, targets), count (the L1 entries: read, classified
    # and counted in one compiled pass), check (refusals), write_back.
    phases: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    # The same in CPU seconds of the calling thread (on a shared machine the
    # wall times include other processes' turns).
    cpu_phases: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))

    @property
    def ok(self) -> bool:
        return not self.failures


@dataclass
class _Delta:
    """What one successful pass adds to the frame table."""

    typed_mfns: np.ndarray  # page-table frames referenced in the pass
    typed_level: np.ndarray  # their type (1..4)
    typed_count: np.ndarray  # type references added
    fresh: np.ndarray  # bool: validated in this pass (was at type count 0)
    pinned_mfns: np.ndarray
    refs: np.ndarray  # 2 * nr_frames: [2m] general-only, [2m+1] writable references
    linear_delta: tuple[np.ndarray, np.ndarray]  # (mfns, linear_pt_count change)


class _Clock:
    """Charges the time since the last lap to a phase."""

    def __init__(self, phases: dict[str, float], cpu_phases: dict[str, float]) -> None:
        self.phases, self.cpu_phases = phases, cpu_phases
        self.last, self.last_cpu = time.perf_counter(), time.thread_time()

    def lap(self, phase: str) -> None:
        now, now_cpu = time.perf_counter(), time.thread_time()
        self.phases[phase] += now - self.last
        self.cpu_phases[phase] += now_cpu - self.last_cpu
        self.last, self.last_cpu = now, now_cpu


@dataclass
class _Outcome:
    delta: _Delta | None
    failed_root: int = -1  # index into the pass's roots
    rc: int = 0
    use_reference: bool = False


def bulk_validate(
    mem: np.ndarray, frames: FrameTable, domid: int, roots: Sequence[Root]
) -> BulkResult:
    """Pin / CR3-reference `roots` in order, like `PageTyping.apply_roots`, vectorised.

    The domain's frames must not be mid-validation (no PGT_partial). Refused
    roots are left out and reported; the frame table ends exactly as the
    reference leaves it.
    """
    roots = list(roots)
    if len(roots) >= _MAX_ROOTS:
        raise BulkPreconditionError(f"{len(roots)} roots: at most {_MAX_ROOTS - 1} fit a key")
    result = BulkResult(failures=[])
    clock = _Clock(result.phases, result.cpu_phases)
    nonzero: np.ndarray | None = _check_preconditions(frames, mem, domid)
    start = 0
    while start < len(roots):
        batch = roots[start:]
        outcome = _Pass(mem, frames, domid, batch, clock, nonzero).run()
        result.passes += 1
        if outcome.delta is not None:
            _apply(frames, outcome.delta)
            clock.lap("write_back")
            break
        bad = outcome.failed_root
        if bad > 0:  # everything before the failing root is clean: apply it
            # (a failed pass changed nothing: its non-zero words still hold)
            prefix = _Pass(mem, frames, domid, batch[:bad], clock, nonzero).run()
            result.passes += 1
            if prefix.delta is None:
                raise MmError("bulk validation: a clean prefix failed on its own")
            _apply(frames, prefix.delta)
            clock.lap("write_back")
        nonzero = None  # the frame table has changed (or may, by the reference)
        root = batch[bad]
        rc = outcome.rc
        if outcome.use_reference:
            rc = _reference_root(mem, frames, domid, root)
            result.reference_roots += 1
        if rc:
            result.failures.append(RootFailure(start + bad, root, rc))
        start += bad + 1
    return result


def _reference_root(mem: np.ndarray, frames: FrameTable, domid: int, root: Root) -> int:
    typing = PageTyping(frames, mem)
    if root.pinned:
        rc = typing.pin_table(root.mfn, root.level, domid)
    else:
        rc = typing.get_root_ref(root.mfn, domid)
    if rc == -ERESTART:
        raise MmError("the non-preemptible reference was preempted")
    return rc


def _check_preconditions(frames: FrameTable, mem: np.ndarray, domid: int) -> np.ndarray:
    """Raise BulkPreconditionError if bulk cannot start; else the frames with a
    non-zero type_info word."""
    frames.check_mem(mem)
    layout = frames.layout
    # A zero word is no type, count 0, no flags (in every build): only the
    # non-zero words need a look.
    nonzero = np.flatnonzero(frames.type_info)
    nz = nonzero
    ti = frames.type_info[nz[frames.owner[nz] == domid]]
    busy = np.uint64((1 << layout.partial_bit) | (1 << layout.locked_bit))
    if ti.size and int(np.bitwise_or.reduce(ti & busy)):
        raise BulkPreconditionError(f"domain {domid} has frames mid-validation or locked")
    types = layout.type_of(ti)
    if (types == UNDEFINED_TYPE).any():
        raise BulkPreconditionError(
            f"domain {domid} has type_info words build {frames.build.version} cannot decode"
        )
    stale = (types >= PageType.L1) & (types <= PageType.L4) & (layout.count_of(ti) == 0)
    if stale.any() and layout.validated_of(ti[stale]).any():
        raise BulkPreconditionError(f"domain {domid} has page tables validated at type count 0")
    return nonzero


def _first_per_frame(mfns: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique frames and the smallest key referencing each."""
    order = np.lexsort((keys, mfns))
    m, k = mfns[order], keys[order]
    first = np.ones(m.size, dtype=bool)
    first[1:] = m[1:] != m[:-1]
    return m[first], k[first]


def kernels() -> ModuleType:
    """`mm.bulk_kernels`, imported on first use: importing numba and loading the
    compiled kernels takes ~0.4 s, which only a bulk validation should pay."""
    from hypervisor.mm import bulk_kernels

    return bulk_kernels


class _Scratch:
    """The big buffers of a pass, kept for the next pass and the next call.

    At 64 GiB a pass counts into 134 MB, buckets through 42 MB and marks 17 MB
    of frames: allocated afresh, their first touch (page faults, zeroing) cost
    more than the work. `take(name, ...)` hands out the kept buffer of that
    name (or a fresh one) and `give_back` keeps it again. "counter" buffers
    must come back all zero (`apply_refs` leaves them so); a pass that fails
    simply does not give its counter back. Thread-safe: a second concurrent
    pass gets fresh buffers.
    """

    ZEROED = ("counter",)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kept: dict[str, np.ndarray] = {}

    def take(self, name: str, size: int, dtype: type) -> np.ndarray:
        with self._lock:
            buf = self._kept.pop(name, None)
        if buf is None or buf.size < size or buf.dtype != dtype:
            return np.zeros(size, dtype) if name in self.ZEROED else np.empty(size, dtype)
        return buf[:size]

    def give_back(self, name: str, buf: np.ndarray) -> None:
        base = buf if buf.base is None else buf.base
        if not isinstance(base, np.ndarray) or base.ndim != 1 or base.dtype != buf.dtype:
            return
        with self._lock:
            kept = self._kept.get(name)
            if kept is None or kept.size < base.size:
                self._kept[name] = base

    def prepare(self, nr_frames: int, l1_entries: int) -> None:
        """Allocate and touch the buffers a pass over `nr_frames` frames needs;
        load and warm up the kernels."""
        kernels().warm_up()
        spill = kernels().spill_capacity(l1_entries, 2 * nr_frames)
        for name, size, dtype in (("counter", 2 * nr_frames, np.uint32),
                                  ("spill", spill, np.uint16),
                                  ("mine", nr_frames, np.bool_)):
            buf = self.take(name, size, dtype)
            buf.fill(0)  # the first touch happens here, not in a pass
            self.give_back(name, buf)

    def release(self) -> None:
        with self._lock:
            self._kept.clear()


_SCRATCH = _Scratch()


def prepare(nr_frames: int, l1_entries: int) -> None:
    """Load the compiled kernels and pre-fault the buffers bulk validation of
    `l1_entries` L1 entries over `nr_frames` frames will use (e.g. while a live
    update still copies memory), so that the validation itself pays neither."""
    _SCRATCH.prepare(nr_frames, l1_entries)


def release_buffers() -> None:
    """Drop the buffers kept between calls (the memory goes back to the system)."""
    _SCRATCH.release()


class _Pass:
    """One depth-first-equivalent pass over `roots`, from the current frame table."""

    def __init__(self, mem: np.ndarray, frames: FrameTable, domid: int,
                 roots: Sequence[Root], clock: _Clock, nonzero: np.ndarray | None) -> None:
        self.frames = frames
        self.mem2d = frames.check_mem(mem)
        self.domid = domid
        self.roots = roots
        self.clock = clock
        self.n = n = frames.nr_frames
        layout = frames.layout
        # Type and "typed" of every frame, decoded where the word is non-zero.
        self.nonzero = np.flatnonzero(frames.type_info) if nonzero is None else nonzero
        words = frames.type_info[self.nonzero]
        zero_type = int(layout.type_of(np.zeros(1, np.uint64))[0])
        self.t0 = (np.zeros(n, np.uint8) if zero_type == 0
                   else np.full(n, zero_type, np.uint8))
        self.t0[self.nonzero] = layout.type_of(words)
        self.typed0 = np.zeros(n, dtype=bool)
        self.typed0[self.nonzero] = (words & np.uint64(layout.count_mask)) != 0
        # Frames this domain may reference: its own, allocated.
        # (Kept for the next pass; given back when this pass is done with it.)
        self.mine = _SCRATCH.take("mine", n, np.bool_)
        self.not_mine = kernels().mark_owned(frames.owner, frames.count_info, domid,
                                   np.uint64(PGC_COUNT_MASK), self.mine)
        self.owner = frames.owner
        # References taken in the pass: acc[2m] general-only, acc[2m+1] general
        # and writable, so one np.add.at counts an L1 entry of either kind.
        self.acc: np.ndarray = _SCRATCH.take("counter", 2 * n, np.uint32)
        self.counted = 0
        # Frame -> level it is validated at in this pass (0: none); the key of its
        # first (validating) reference is in the sorted claim_mfns/claim_keys.
        self.claim = np.zeros(self.n, dtype=np.int8)
        self.claim_mfns = np.empty(0, np.int64)
        self.claim_keys = np.empty(0, np.int64)
        self.fail_keys: list[np.ndarray] = []
        self.fail_rcs: list[np.ndarray] = []
        self.conflict_keys: list[np.ndarray] = []
        self.typed: list[tuple[np.ndarray, int, np.ndarray, np.ndarray]] = []
        self.linear_events: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.pinned_mfns = np.empty(0, np.int64)

    # --- bookkeeping ----------------------------------------------------------

    def _fail(self, keys: np.ndarray, rc: int | np.ndarray) -> None:
        if keys.size:
            self.fail_keys.append(keys.astype(np.int64))
            self.fail_rcs.append(np.broadcast_to(np.asarray(rc, dtype=np.int64), keys.shape))

    def _owned(self, mfns: np.ndarray) -> np.ndarray:
        ok = (mfns >= 0) & (mfns < self.n)
        return ok & self.mine[np.where(ok, mfns, 0)]

    def _reserve(self, references: int) -> None:
        """Make room for up to `references` more counts (widening the counter if needed)."""
        self.counted += references
        if self.counted > _WIDEN_AT and self.acc.dtype != np.uint64:
            self.acc = self.acc.astype(np.uint64)

    def _count(self, slots: np.ndarray) -> None:
        """One reference per accumulator slot in `slots` (int64)."""
        self._reserve(slots.size)
        # (a 1 of the accumulator's own type: a Python int takes numpy's slow path)
        np.add.at(self.acc, slots, self.acc.dtype.type(1))

    def _general_refs(self, mfns: np.ndarray) -> None:
        self._count(2 * mfns)

    def _claim_key(self, mfns: np.ndarray) -> np.ndarray:
        """First-reference keys of claimed frames (_NO_KEY for unclaimed ones)."""
        if self.claim_mfns.size == 0:
            return np.full(mfns.shape, _NO_KEY, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.claim_mfns, mfns), self.claim_mfns.size - 1)
        return np.where(self.claim_mfns[pos] == mfns, self.claim_keys[pos], _NO_KEY)

    def _add_claims(self, mfns: np.ndarray, keys: np.ndarray, level: int) -> None:
        self.claim[mfns] = level
        all_m = np.concatenate([self.claim_mfns, mfns])
        order = np.argsort(all_m, kind="stable")
        self.claim_mfns = all_m[order]
        self.claim_keys = np.concatenate([self.claim_keys, keys])[order]

    # --- the pass ---------------------------------------------------------------

    def run(self) -> _Outcome:
        self.clock.lap("setup")
        refs = self._root_refs()
        for level in (4, 3, 2, 1):
            mfns, keys = refs[level]
            down = self._level(level, mfns, keys)
            if level > 1:
                below = refs[level - 1]
                refs[level - 1] = (np.concatenate([below[0], down[0]]),
                                   np.concatenate([below[1], down[1]]))
        self._check_linear()
        _SCRATCH.give_back("mine", self.mine)
        outcome = self._outcome()
        self.clock.lap("check")
        return outcome

    def _root_refs(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        r = len(self.roots)
        mfns = np.array([x.mfn for x in self.roots], dtype=np.int64)
        levels = np.array([x.level for x in self.roots], dtype=np.int64)
        pinned = np.array([x.pinned for x in self.roots], dtype=bool)
        keys = np.arange(r, dtype=np.int64) << _ROOT_SHIFT
        ok = self._owned(mfns)
        self._fail(keys[~ok], -EINVAL)  # get_page fails
        self._general_refs(mfns[ok])
        # Pins do not nest: an already pinned frame, or a second pin in this pass.
        pin = ok & pinned
        pre_pinned = np.zeros(r, dtype=bool)
        pre_pinned[pin] = self.frames.pinned(mfns[pin])
        self._fail(keys[pin & pre_pinned], -EINVAL)
        first_pin = np.zeros(r, dtype=bool)
        cand = np.flatnonzero(pin & ~pre_pinned)
        _, first_idx = np.unique(mfns[cand], return_index=True)
        first_pin[cand[first_idx]] = True
        self._fail(keys[pin & ~pre_pinned & ~first_pin], -EINVAL)
        self.pinned_mfns = mfns[first_pin]
        return {lvl: (mfns[ok & (levels == lvl)], keys[ok & (levels == lvl)])
                for lvl in (1, 2, 3, 4)}

    def _level(self, level: int, mfns: np.ndarray, keys: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
        """Type `mfns` as `level` (refs with `keys`); validate the fresh ones.

        Returns the references their entries make for type level-1.
        """
        empty = (np.empty(0, np.int64), np.empty(0, np.int64))
        if mfns.size == 0:
            return empty
        frames_u, first_key = _first_per_frame(mfns, keys)
        typed0, t0 = self.typed0[frames_u], self.t0[frames_u]
        other = typed0 & (t0 != level)
        fresh = ~typed0
        self._fail(first_key[other], -EINVAL)
        # A frame validated at another level in this pass: the depth-first
        # order decides which use wins; leave it to the reference.
        clash = fresh & (self.claim[frames_u] != 0)
        if clash.any():
            self.conflict_keys.append(np.minimum(first_key[clash],
                                                 self._claim_key(frames_u[clash])))
        claim_now = fresh & ~clash
        self._add_claims(frames_u[claim_now], first_key[claim_now], level)
        # (Frames of another type make the pass fail, so counting them is harmless.)
        self.typed.append((frames_u, level,
                           np.bincount(np.searchsorted(frames_u, mfns), minlength=frames_u.size),
                           fresh))

        tables, tkeys = frames_u[fresh], first_key[fresh]
        if tables.size == 0:
            return empty
        if level == 1:
            self._l1_entries(tables, tkeys)
            return empty
        return self._upper_entries(level, tables, tkeys)

    def _upper_entries(self, level: int, tables: np.ndarray, tkeys: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
        entries = self.mem2d[tables]
        present = (entries & np.uint64(PTE_PRESENT)) != 0
        if level == 4:
            present &= _GUEST_L4_SLOTS
        rows, cols = np.nonzero(present)
        e = entries[rows, cols]
        ekeys = tkeys[rows] | ((cols.astype(np.int64) + 1) << (_LEVEL_BITS * (level - 1)))
        src = tables[rows]
        bad_flags = (e & np.uint64(disallow_mask(level))) != 0
        self._fail(ekeys[bad_flags], -EINVAL)
        target = ((e >> _U12) & _MFN_MASK).astype(np.int64)
        owned = self._owned(target)
        self._fail(ekeys[~bad_flags & ~owned], -EINVAL)
        ok = ~bad_flags & owned
        rw = (e & np.uint64(PTE_RW)) != 0
        is_self = ok & (target == src)
        self._fail(ekeys[is_self & rw], -EINVAL)  # a writable self-map
        refs = ok & ~is_self
        self._general_refs(target[refs])

        # Same-level target typed before this entry (earlier in this pass, or
        # already): the entry is a linear one; otherwise it types its target
        # one level down.
        safe = np.where(refs, target, 0)
        before = (self.claim[safe] == level) & (self._claim_key(safe) < ekeys)
        before |= self.typed0[safe] & (self.t0[safe] == level)
        linear = refs & before
        self._fail(ekeys[linear & rw], -EINVAL)
        lin = linear & ~rw
        if lin.any():
            self.linear_events.append((src[lin], target[lin], ekeys[lin]))
            self.typed.append((target[lin], level, np.ones(int(lin.sum()), np.int64),
                               np.zeros(int(lin.sum()), bool)))
        down = refs & ~linear
        return target[down], ekeys[down]

    # --- L1 entries: the bulk of the work ----------------------------------------

    def _l1_entries(self, tables: np.ndarray, tkeys: np.ndarray) -> None:
        dis = disallow_mask(1)
        self.clock.lap("classify")  # the upper levels
        # Read, classified and counted in one compiled pass (bulk_kernels).
        entries = tables.size * ENTRIES_PER_TABLE
        self._reserve(entries)
        k = kernels()
        spill = _SCRATCH.take("spill", k.spill_capacity(entries, self.acc.size), np.uint16)
        bad_flags, out_of_range = k.count_l1(self.mem2d, np.ascontiguousarray(tables, np.int64),
                                             self.acc, self.n, np.uint64(dis), spill)
        _SCRATCH.give_back("spill", spill)
        self.clock.lap("count")
        if bad_flags:
            self._fail(self._l1_bad_flag_keys(tables, tkeys), -EINVAL)
        if out_of_range:
            keys, target, _ = self._l1_scan(tables, tkeys, lambda t, rw: t >= self.n)
            self._fail(keys, np.where(target == INVALID_MFN_IN_PTE, -EINVAL, -EPERM))
        # Referenced frames that are not the domain's: free, someone else's, I/O.
        hit = kernels().referenced_unowned(self.acc, self.not_mine)
        if hit.size:
            refused = np.zeros(self.n, dtype=bool)
            refused[hit] = True
            keys, target, _ = self._l1_scan(
                tables, tkeys, lambda t, rw: (t < self.n) & refused[np.minimum(t, self.n - 1)])
            io = (self.owner[target] == DOMID_IO) & ((self.frames.count_info[target]
                                                   & np.uint64(PGC_COUNT_MASK)) != 0)
            self._fail(keys, np.where(io, -EPERM, -EBUSY))
        self._writable_conflicts(tables, tkeys)

    def _l1_bad_flag_keys(self, tables: np.ndarray, tkeys: np.ndarray) -> np.ndarray:
        """Keys of the present L1 entries with a flag Xen disallows."""
        out = []
        dis = np.uint64(disallow_mask(1))
        for start in range(0, tables.size, _L1_CHUNK):
            e = self.mem2d[tables[start : start + _L1_CHUNK]]
            rows, cols = np.nonzero(((e & np.uint64(PTE_PRESENT)) != 0) & ((e & dis) != 0))
            out.append(tkeys[start + rows] | (cols.astype(np.int64) + 1))
        return np.concatenate(out)

    def _l1_scan(self, tables: np.ndarray, tkeys: np.ndarray, want
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Keys, targets and RW bits of the well-flagged present L1 entries `want` picks."""
        out_k, out_t, out_rw = [], [], []
        for start in range(0, tables.size, _L1_CHUNK):
            e = self.mem2d[tables[start : start + _L1_CHUNK]]
            ok = ((e & np.uint64(PTE_PRESENT)) != 0) & ((e & np.uint64(disallow_mask(1))) == 0)
            target = ((e >> _U12) & _MFN_MASK).astype(np.int64)
            rw = (e & np.uint64(PTE_RW)) != 0
            rows, cols = np.nonzero(ok & want(target, rw))
            out_k.append(tkeys[start + rows] | (cols.astype(np.int64) + 1))
            out_t.append(target[rows, cols])
            out_rw.append(rw[rows, cols])
        return np.concatenate(out_k), np.concatenate(out_t), np.concatenate(out_rw)

    def _writable_conflicts(self, tables: np.ndarray, tkeys: np.ndarray) -> None:
        """Writable mappings of frames that are (or become) another type."""
        # Candidates: frames typed in this pass, and frames already typed as
        # something other than writable (all have a non-zero type word).
        nz = self.nonzero
        cand = np.union1d(self.claim_mfns,
                          nz[self.typed0[nz] & (self.t0[nz] != PageType.WRITABLE)])
        hit = cand[self.acc[2 * cand + 1] > 0]
        if hit.size == 0:
            return
        conflict = np.zeros(self.n, dtype=bool)
        conflict[hit] = True
        keys, target, _ = self._l1_scan(
            tables, tkeys, lambda t, rw: rw & (t < self.n) & conflict[np.minimum(t, self.n - 1)])
        frames_w, kw = _first_per_frame(target, keys)
        claimed = self.claim[frames_w] != 0
        kt = np.where(claimed, self._claim_key(frames_w), -1)
        # Whichever comes second in depth-first order is refused.
        self._fail(np.where(kw < kt, kt, kw), np.where(kw < kt, -EINVAL, -EBUSY))

    # --- linear page tables -----------------------------------------------------

    def _check_linear(self) -> None:
        """No table may both have linear entries and be the target of one."""
        empty = np.empty(0, np.int64)
        self.linear = (empty, empty)
        if not self.linear_events:
            return
        src = np.concatenate([x[0] for x in self.linear_events])
        dst = np.concatenate([x[1] for x in self.linear_events])
        keys = np.concatenate([x[2] for x in self.linear_events])
        involved = np.unique(np.concatenate([src, dst]))
        si, di = np.searchsorted(involved, src), np.searchsorted(involved, dst)
        lpc0 = self.frames.linear_pt_count[involved].astype(np.int64)
        # First key at which each table gains a linear entry / becomes a linear
        # target (-1: it already is one).
        as_source = np.where(lpc0 > 0, -1, _NO_KEY)
        as_target = np.where(lpc0 < 0, -1, _NO_KEY)
        np.minimum.at(as_source, si, keys)
        np.minimum.at(as_target, di, keys)
        bad = (as_target[si] < keys) | (as_source[di] < keys)
        self._fail(keys[bad], -EINVAL)
        delta = (np.bincount(si, minlength=involved.size)
                 - np.bincount(di, minlength=involved.size))
        if (np.abs(lpc0 + delta) > np.iinfo(np.int16).max).any():
            self.conflict_keys.append(keys[:1])  # overflow: let the reference decide
        self.linear = (involved, delta)

    # --- result -------------------------------------------------------------------

    def _outcome(self) -> _Outcome:
        fail_key = fail_rc = None
        if self.fail_keys:
            keys = np.concatenate(self.fail_keys)
            rcs = np.concatenate(self.fail_rcs)
            i = int(np.argmin(keys))
            fail_key, fail_rc = int(keys[i]), int(rcs[i])
        conflict_key = None
        if self.conflict_keys:
            conflict_key = int(np.concatenate(self.conflict_keys).min())
        if conflict_key is not None and (fail_key is None or conflict_key >> _ROOT_SHIFT
                                         <= fail_key >> _ROOT_SHIFT):
            return _Outcome(None, conflict_key >> _ROOT_SHIFT, use_reference=True)
        if fail_key is not None:
            assert fail_rc is not None
            return _Outcome(None, fail_key >> _ROOT_SHIFT, fail_rc)
        return _Outcome(self._delta())

    def _delta(self) -> _Delta:
        if self.typed:
            mfns = np.concatenate([t[0] for t in self.typed])
            levels = np.concatenate([np.full(t[0].size, t[1], np.int64) for t in self.typed])
            counts = np.concatenate([t[2] for t in self.typed])
            fresh = np.concatenate([t[3] for t in self.typed])
        else:
            mfns = levels = counts = np.empty(0, np.int64)
            fresh = np.empty(0, bool)
        # Merge the per-level lists (a frame appears once per kind of reference).
        order = np.argsort(mfns, kind="stable")
        mfns, levels, counts, fresh = mfns[order], levels[order], counts[order], fresh[order]
        uniq, start = np.unique(mfns, return_index=True)
        return _Delta(
            typed_mfns=uniq,
            typed_level=levels[start],
            typed_count=np.add.reduceat(counts, start) if uniq.size else counts,
            fresh=np.logical_or.reduceat(fresh, start) if uniq.size else fresh,
            pinned_mfns=self.pinned_mfns,
            refs=self.acc,
            linear_delta=self.linear,
        )


def _apply(frames: FrameTable, d: _Delta) -> None:
    """Write one successful pass into the frame table."""
    layout = frames.layout
    # General references (both kinds) into count_info; writable data frames
    # typed at count 0 (validated at once) or counted up. Either way the word
    # becomes writable|validated|(count + added): a frame with writable
    # references already is exactly that. One compiled pass over the frames.
    kernels().apply_refs(d.refs, frames.count_info, frames.type_info,
                         np.uint64(layout.count_mask),
                         np.uint64(layout.encode(PageType.WRITABLE, 0, validated=True)))
    _SCRATCH.give_back("counter", d.refs)  # apply_refs left it zero
    m = d.typed_mfns
    if m.size:
        ti = frames.type_info[m]
        add = d.typed_count.astype(np.uint64)
        fresh_ti = layout.encode(d.typed_level.astype(np.uint8), add, validated=True)
        frames.type_info[m] = np.where(d.fresh, fresh_ti, ti + add)
        validated_now = m[d.fresh]
        frames.nr_validated_ptes[validated_now] = 0
        frames.partial_flags[validated_now] = 0
        frames.linear_pt_count[validated_now] = 0
    if d.pinned_mfns.size:
        frames.type_info[d.pinned_mfns] |= np.uint64(1 << layout.pinned_bit)
    lm, ldelta = d.linear_delta
    if lm.size:
        frames.linear_pt_count[lm] = (frames.linear_pt_count[lm].astype(np.int64)
                                      + ldelta).astype(np.int16)
