"""Compiled (numba) loops of bulk validation: the passes numpy cannot do in one go.

numpy needs several full-size passes and a scattered `np.add.at` to count the
references of 16.8 M L1 entries; these loops read every entry once and count
it in place. They are compiled ahead of the first call, for the exact argument
types bulk validation passes (explicit signatures), when this module is
imported; with `cache=True` a later process loads the machine code from
numba's cache (`__pycache__`) instead of compiling again. `COMPILE_S` is what
the import spent doing that, so benchmarks can report it apart from the runs.

The kernels are pure functions of their arrays (no Python objects, no global
state): `tests/mm/test_bulk_kernels.py` checks each one against a plain
Python model.
"""

from __future__ import annotations

import time

import numpy as np

_started = time.perf_counter()

import numba  # noqa: E402  (timed: importing numba is part of the compile cost)

from hypervisor.mm.pte import MFN_FIELD_BITS, PTE_PRESENT, PTE_RW  # noqa: E402

_PRESENT = np.uint64(PTE_PRESENT)
_RW_SHIFT = np.uint64(PTE_RW.bit_length() - 1)
_ONE = np.uint64(1)
_MFN_SHIFT = np.uint64(12)
_MFN_MASK = np.uint64((1 << MFN_FIELD_BITS) - 1)

# Reference counters are uint32 until they could overflow, then uint64.
_COUNTERS = ("uint32", "uint64")
_COUNT_L1 = [f"UniTuple(int64, 2)(uint64[:, :], int64[::1], {acc}[::1], int64, uint64, "
             f"uint16[::1])" for acc in _COUNTERS]
_APPLY = [f"void({acc}[::1], uint64[::1], uint64[::1], uint64, uint64)" for acc in _COUNTERS]
_UNOWNED = [f"int64[::1]({acc}[::1], int64[::1])" for acc in _COUNTERS]
_MARK_OWNED = "int64[::1](int32[::1], uint64[::1], int64, uint64, boolean[::1])"
# Counter slots per bucket: 256 KiB of uint32 counters, which stay in the
# core's L2 cache while a bucket is counted, and an offset in a window fits
# the uint16 of the bucket buffer (half the traffic of a uint32 one).
WINDOW_BITS = 16
_WINDOW = 1 << WINDOW_BITS
_WINDOW_SHIFT = np.uint64(WINDOW_BITS)
_WINDOW_MASK = np.uint64(_WINDOW - 1)


def spill_capacity(entries: int, nr_slots: int) -> int:
    """Size of the bucket buffer `count_l1` wants for `entries` entries (a quarter spare)."""
    buckets = -(-nr_slots >> WINDOW_BITS) or 1
    return entries + entries // 4 + buckets * 64


@numba.njit(_COUNT_L1, cache=True, nogil=True)
def count_l1(mem2d, tables, acc, nr_frames, disallow, spill):
    """Count the references of the L1 entries of `tables` into `acc`.

    For each present entry with no `disallow` flag whose MFN is below
    `nr_frames`: acc[2 * mfn + rw] += 1 (rw: the entry's writable bit).
    Returns (present entries with a disallowed flag, present well-flagged
    entries whose MFN is not below nr_frames): those are not counted.

    Why buckets: the slots of a direct map are a random permutation, and one
    increment per slot straight into a counter array far larger than the
    caches misses on nearly every entry. So the entries are first sorted by
    slot >> WINDOW_BITS into `spill` (each bucket a fixed share of it, the
    slot's offset in its window as uint16), then counted bucket by bucket,
    each in a window of `acc` that stays in cache. An entry whose bucket is
    full is counted straight away (the result is the same, only slower).
    """
    limit = np.uint64(nr_frames)
    bad_flags = 0
    beyond = 0
    buckets = max((acc.size + _WINDOW - 1) >> WINDOW_BITS, 1)
    share = spill.size // buckets
    fill = np.arange(buckets) * share  # next free place of each bucket
    for i in range(tables.size):
        row = mem2d[tables[i]]
        for j in range(row.size):
            e = row[j]
            if (e & _PRESENT) == 0:
                continue
            if (e & disallow) != 0:
                bad_flags += 1
                continue
            mfn = (e >> _MFN_SHIFT) & _MFN_MASK
            if mfn >= limit:
                beyond += 1
                continue
            slot = (mfn << _ONE) | ((e >> _RW_SHIFT) & _ONE)
            b = slot >> _WINDOW_SHIFT
            if fill[b] < (b + 1) * share:
                spill[fill[b]] = np.uint16(slot & _WINDOW_MASK)
                fill[b] += 1
            else:
                acc[slot] += 1
    for b in range(buckets):
        window = acc[b << WINDOW_BITS:]
        for k in range(b * share, fill[b]):
            window[spill[k]] += 1
    return bad_flags, beyond


@numba.njit(_APPLY, cache=True, nogil=True)
def apply_refs(acc, count_info, type_info, count_mask, writable_word):
    """Add one pass's references to the frame table, frame by frame.

    acc[2m] general-only and acc[2m + 1] writable references of frame m: both
    go into count_info[m]; a frame with writable references becomes
    writable_word | (its type count + those references). `acc` is left all
    zero, so that it can count the next pass without a fresh (page-faulting)
    allocation.
    """
    for m in range(count_info.size):
        ro = np.uint64(acc[2 * m])
        rw = np.uint64(acc[2 * m + 1])
        acc[2 * m] = 0
        acc[2 * m + 1] = 0
        count_info[m] += ro + rw
        if rw != 0:
            type_info[m] = ((type_info[m] & count_mask) + rw) | writable_word


@numba.njit(_UNOWNED, cache=True, nogil=True)
def referenced_unowned(acc, frames):
    """The frames of `frames` (in order) that acc counts a reference to."""
    hit = np.empty(frames.size, np.int64)
    hits = 0
    for m in frames:
        if acc[2 * m] != 0 or acc[2 * m + 1] != 0:
            hit[hits] = m
            hits += 1
    return hit[:hits].copy()


@numba.njit(_MARK_OWNED, cache=True, nogil=True)
def mark_owned(owner, count_info, domid, count_mask, out):
    """out[m] = frame m belongs to `domid` and is allocated (general count
    non-zero); returns the frames m with out[m] False, ascending."""
    others = 0
    for m in range(owner.size):
        mine = owner[m] == domid and (count_info[m] & count_mask) != 0
        out[m] = mine
        others += not mine
    not_mine = np.empty(others, np.int64)
    others = 0
    for m in range(out.size):
        if not out[m]:
            not_mine[others] = m
            others += 1
    return not_mine


def warm_up() -> None:
    """Call every kernel once on tiny arrays, for every signature: a kernel's
    first call in a process also initialises numba's runtime (~30 ms here)."""
    for dtype in (np.uint32, np.uint64):
        acc = np.zeros(4, dtype)
        count_l1(np.zeros((1, 512), np.uint64), np.zeros(1, np.int64), acc, 2, _ONE,
                 np.zeros(64, np.uint16))
        referenced_unowned(acc, np.zeros(1, np.int64))
        apply_refs(acc, np.zeros(2, np.uint64), np.zeros(2, np.uint64), _ONE, _ONE)
    mark_owned(np.zeros(2, np.int32), np.zeros(2, np.uint64), 1, _ONE, np.zeros(2, np.bool_))


COMPILE_S = time.perf_counter() - _started


def compiled_from_cache() -> bool:
    """Whether this process loaded every kernel from numba's cache (none compiled here)."""
    return all(sum(k.stats.cache_misses.values()) == 0 and sum(k.stats.cache_hits.values()) > 0
               for k in (count_l1, apply_refs, referenced_unowned, mark_owned))
