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
_COUNT_L1 = [f"UniTuple(int64, 2)(uint64[:, :], int64[::1], {acc}[::1], int64, uint64)"
             for acc in ("uint32", "uint64")]
_APPLY = [f"void({acc}[::1], uint64[::1], uint64[::1], uint64, uint64)"
          for acc in ("uint32", "uint64")]


@numba.njit(_COUNT_L1, cache=True, nogil=True)
def count_l1(mem2d, tables, acc, nr_frames, disallow):
    """Count the references of the L1 entries of `tables` into `acc`.

    For each present entry with no `disallow` flag whose MFN is below
    `nr_frames`: acc[2 * mfn + rw] += 1 (rw: the entry's writable bit).
    Returns (present entries with a disallowed flag, present well-flagged
    entries whose MFN is not below nr_frames): those are not counted.
    """
    limit = np.uint64(nr_frames)
    bad_flags = 0
    beyond = 0
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
            acc[(mfn << _ONE) | ((e >> _RW_SHIFT) & _ONE)] += 1
    return bad_flags, beyond


@numba.njit(_APPLY, cache=True, nogil=True)
def apply_refs(acc, count_info, type_info, count_mask, writable_word):
    """Add one pass's references to the frame table, frame by frame.

    acc[2m] general-only and acc[2m + 1] writable references of frame m: both
    go into count_info[m]; a frame with writable references becomes
    writable_word | (its type count + those references).
    """
    for m in range(count_info.size):
        ro = np.uint64(acc[2 * m])
        rw = np.uint64(acc[2 * m + 1])
        count_info[m] += ro + rw
        if rw != 0:
            type_info[m] = ((type_info[m] & count_mask) + rw) | writable_word


COMPILE_S = time.perf_counter() - _started


def compiled_from_cache() -> bool:
    """Whether this process loaded every kernel from numba's cache (none compiled here)."""
    return all(sum(k.stats.cache_misses.values()) == 0 and sum(k.stats.cache_hits.values()) > 0
               for k in (count_l1, apply_refs))
