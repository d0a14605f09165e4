"""The compiled loops of bulk validation against plain-Python models of them.

Each kernel is run on random inputs (hypothesis) and compared with a model
that says, entry by entry, what it must compute. A planted off-by-one in the
counting kernel (recompiled from its own source) must be caught by the same
comparison.
"""

from __future__ import annotations

import inspect

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hypervisor.mm import bulk, bulk_kernels
from hypervisor.mm.bulk_kernels import (
    WINDOW_BITS,
    apply_refs,
    count_l1,
    mark_owned,
    referenced_unowned,
    spill_capacity,
)
from hypervisor.mm.pte import L1_DISALLOW_MASK, MFN_FIELD_BITS, PTE_PRESENT, PTE_RW

# Bits 3, 4 and 7 are disallowed in L1 entries.
FLAG_BITS = [PTE_PRESENT, PTE_RW, 1 << 3, 1 << 4, 1 << 5, 1 << 7, 1 << 8, 1 << 63]


# --- models --------------------------------------------------------------------


def count_l1_model(mem2d, tables, acc, nr_frames, disallow):
    bad = beyond = 0
    for t in tables:
        for e in (int(x) for x in mem2d[t]):
            if not e & PTE_PRESENT:
                continue
            if e & disallow:
                bad += 1
                continue
            mfn = (e >> 12) & ((1 << MFN_FIELD_BITS) - 1)
            if mfn >= nr_frames:
                beyond += 1
                continue
            acc[2 * mfn + (1 if e & PTE_RW else 0)] += 1
    return bad, beyond


# --- inputs --------------------------------------------------------------------


@st.composite
def l1_inputs(draw):
    """Tables of entries pointing anywhere in (and a little past) the frames.

    nr_frames goes past one bucket's window (2**WINDOW_BITS counter slots) so
    that several buckets are filled; the bucket buffer is sometimes too small,
    so that full buckets fall back to counting straight away. The arrays come
    from a drawn seed (hypothesis lists of 100 k numbers would be slow).
    """
    nr_frames = draw(st.sampled_from([1, 7, 300, (1 << WINDOW_BITS) // 2 + 5,
                                      3 * (1 << WINDOW_BITS) + 11]))
    rows = draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    mfns = rng.integers(0, nr_frames + 3, (rows, 512), dtype=np.uint64, endpoint=True)
    flag_odds = draw(st.sampled_from([0.02, 0.5, 0.95]))
    flags = np.zeros((rows, 512), np.uint64)
    for bit in FLAG_BITS:
        odds = 0.9 if bit == PTE_PRESENT else flag_odds
        flags |= np.where(rng.random((rows, 512)) < odds, np.uint64(bit), np.uint64(0))
    mem2d = (mfns << np.uint64(12)) | flags
    tables = np.array(draw(st.lists(st.integers(0, rows - 1), max_size=6)), dtype=np.int64)
    dtype = draw(st.sampled_from([np.uint32, np.uint64]))
    acc = rng.integers(0, 5, 2 * nr_frames).astype(dtype)
    full = spill_capacity(tables.size * 512, acc.size)
    spill = np.zeros(draw(st.sampled_from([0, 1, full // 3, full])), np.uint16)
    return mem2d, tables, acc, nr_frames, spill


def check_count_l1(kernel, mem2d, tables, acc, nr_frames, spill) -> None:
    expected = acc.astype(np.int64)
    want = count_l1_model(mem2d, tables, expected, nr_frames, L1_DISALLOW_MASK)
    got = kernel(mem2d, tables, acc, nr_frames, np.uint64(L1_DISALLOW_MASK), spill)
    assert tuple(got) == want
    np.testing.assert_array_equal(acc.astype(np.int64), expected)


# --- the kernels ------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(l1_inputs())
def test_count_l1_counts_what_the_model_counts(inputs) -> None:
    check_count_l1(count_l1, *inputs)


def _planted(old: str, new: str):
    """count_l1 compiled from its own source with `old` replaced by `new`."""
    source = inspect.getsource(bulk_kernels.count_l1.py_func)
    source = source[source.index("def count_l1"):]  # without the caching decorator
    assert source.count(old) == 1
    namespace = dict(vars(bulk_kernels))
    exec(source.replace(old, new), namespace)  # noqa: S102 (our own source, mutated)
    return numba.njit(namespace["count_l1"])


@pytest.mark.parametrize("old,new", [
    ("for j in range(row.size):", "for j in range(row.size - 1):"),  # misses an entry
    ("for k in range(b * share, fill[b]):", "for k in range(b * share + 1, fill[b]):"),
    ("window = acc[b << WINDOW_BITS:]", "window = acc[(b << WINDOW_BITS) + 1:]"),
])
def test_a_planted_off_by_one_in_count_l1_is_caught(old, new) -> None:
    mutant = _planted(old, new)
    rng = np.random.default_rng(7)
    caught = 0
    for _ in range(20):
        nr_frames = int(rng.choice([300, 3 * (1 << WINDOW_BITS) + 11]))
        mem2d = ((rng.integers(0, nr_frames, (2, 512)).astype(np.uint64) << np.uint64(12))
                 | np.uint64(PTE_PRESENT) | (rng.integers(0, 2, (2, 512)).astype(np.uint64)
                                             << np.uint64(1)))
        tables = np.array([0, 1], np.int64)
        acc = np.zeros(2 * nr_frames, np.uint32)
        spill = np.zeros(spill_capacity(1024, acc.size), np.uint16)
        try:
            check_count_l1(mutant, mem2d, tables, acc, nr_frames, spill)
        except AssertionError:
            caught += 1
    assert caught > 0


@settings(max_examples=60, deadline=None)
@given(data=st.data(), n=st.integers(1, 40), dtype=st.sampled_from([np.uint32, np.uint64]))
def test_apply_refs_adds_references_and_leaves_the_counter_zero(data, n, dtype) -> None:
    acc = np.array(data.draw(st.lists(st.integers(0, 3), min_size=2 * n, max_size=2 * n)),
                   dtype=dtype)
    words = st.lists(st.integers(0, 2**64 - 1), min_size=n, max_size=n)
    count_info = np.array(data.draw(words), dtype=np.uint64)
    type_info = np.array(data.draw(words), dtype=np.uint64)
    count_mask, writable = (1 << 16) - 1, 7 << 60
    want_ci, want_ti = count_info.copy(), type_info.copy()
    for m in range(n):
        ro, rw = int(acc[2 * m]), int(acc[2 * m + 1])
        want_ci[m] = (int(count_info[m]) + ro + rw) % 2**64
        if rw:
            want_ti[m] = (((int(type_info[m]) & count_mask) + rw) | writable) % 2**64
    apply_refs(acc, count_info, type_info, np.uint64(count_mask), np.uint64(writable))
    np.testing.assert_array_equal(count_info, want_ci)
    np.testing.assert_array_equal(type_info, want_ti)
    assert not acc.any()


@settings(max_examples=60, deadline=None)
@given(data=st.data(), n=st.integers(1, 60))
def test_ownership_kernels_match_their_models(data, n) -> None:
    owner = np.array(data.draw(st.lists(st.integers(0, 3), min_size=n, max_size=n)), np.int32)
    count_info = np.array(data.draw(st.lists(st.sampled_from([0, 1, 2, 1 << 63, 1 << 57]),
                                             min_size=n, max_size=n)), np.uint64)
    count_mask = (1 << 57) - 1
    mine = np.ones(n, dtype=bool)
    not_mine = mark_owned(owner, count_info, 1, np.uint64(count_mask), mine)
    want = [int(o) == 1 and (int(c) & count_mask) != 0 for o, c in zip(owner, count_info,
                                                                        strict=True)]
    assert mine.tolist() == want
    assert not_mine.tolist() == [m for m in range(n) if not want[m]]
    acc = np.array(data.draw(st.lists(st.integers(0, 1), min_size=2 * n, max_size=2 * n)),
                   np.uint32)
    hit = referenced_unowned(acc, not_mine)
    assert hit.tolist() == [m for m in not_mine.tolist() if acc[2 * m] or acc[2 * m + 1]]


# --- the kept buffers ----------------------------------------------------------------


def test_a_counter_not_given_back_is_never_handed_out_again() -> None:
    scratch = bulk._Scratch()
    scratch.prepare(100, 512)
    counter = scratch.take("counter", 200, np.uint32)
    assert not counter.any()
    counter[5] = 9  # a failed pass: dirty, not given back
    again = scratch.take("counter", 200, np.uint32)
    assert not np.shares_memory(again, counter) and not again.any()
    scratch.give_back("counter", again)
    assert np.shares_memory(scratch.take("counter", 150, np.uint32), again)
    scratch.give_back("counter", again)
    scratch.release()
    assert not np.shares_memory(scratch.take("counter", 150, np.uint32), again)
