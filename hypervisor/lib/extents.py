"""Runs of consecutive machine frames: ownership at memset speed.

Domains get their frames lowest-first, so a guest's pfn->mfn map is a handful
of runs of consecutive frames. Handing ownership over, claiming it and copying
frame-table rows by run costs O(runs) operations on contiguous slices instead
of O(frames) scattered ones: what makes a 64 GiB guest's ownership cheap.
"""

from __future__ import annotations

import numpy as np

# Below this many frames per run on average, scattered (fancy) indexing is as good.
_MIN_FRAMES_PER_RUN = 64
_CHUNK = 1 << 20


def runs_of(mfns: np.ndarray) -> np.ndarray | None:
    """(index, first mfn, count) rows of the consecutive runs in `mfns`, or None.

    None when the frames are not strictly increasing (a run could then overlap
    another) or are too fragmented for runs to pay.
    """
    m = np.asarray(mfns)
    m = m.view(np.int64) if m.dtype == np.uint64 else m.astype(np.int64, copy=False)
    if m.size == 0:
        return np.zeros((0, 3), dtype=np.int64)
    breaks = []
    for start in range(0, m.size - 1, _CHUNK):  # chunked: small, reused temporaries
        step = np.diff(m[start : start + _CHUNK + 1])
        if (step <= 0).any():
            return None
        breaks.append(np.flatnonzero(step != 1) + start + 1)
    starts = np.concatenate([[0], *breaks]).astype(np.int64)
    if m.size < _MIN_FRAMES_PER_RUN * starts.size:
        return None
    counts = np.diff(np.concatenate((starts, [m.size])))
    return np.stack([starts, m[starts], counts], axis=1)


def expand(runs: np.ndarray) -> np.ndarray:
    """The frame numbers a set of runs describes, in order (uint64)."""
    if runs.size == 0:
        return np.zeros(0, dtype=np.uint64)
    total = int(runs[:, 2].sum())
    out = np.empty(total, dtype=np.uint64)
    for index, first, count in runs.tolist():
        out[index : index + count] = np.arange(first, first + count, dtype=np.uint64)
    return out
