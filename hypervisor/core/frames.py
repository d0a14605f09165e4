"""The host frame allocator: which machine frames are free, deterministically.

Frames are handed out lowest-first so the same scenario always places the
same data at the same machine addresses (determinism across runs).
"""

from __future__ import annotations

import numpy as np

from emulator.addr import MFN
from hypervisor.lib.errors import HvlabError
from hypervisor.lib.extents import runs_of

_FIRST_WINDOW = 4096  # frames the search for free ones looks at first


class OutOfFrames(HvlabError):
    pass


class FrameAllocator:
    def __init__(self, nr_frames: int, reserved: int = 1) -> None:
        # frame 0 stays reserved so that MFN 0 never names a live page
        self.nr_frames = nr_frames
        self.free = np.ones(nr_frames, dtype=bool)
        self.free[:reserved] = False
        self._cursor = reserved

    @property
    def nr_free(self) -> int:
        return int(self.free.sum())

    def alloc(self, count: int, what: str = "frames") -> np.ndarray:
        """`count` free frames, lowest first (not necessarily contiguous)."""
        found = self._lowest_free(self._cursor, count)
        if found.size < count:
            found = self._lowest_free(0, count)
        if found.size < count:
            raise OutOfFrames(
                f"host memory exhausted: {what} need {count} frames, {self.nr_free} free"
            )
        self.free[found] = False
        self._cursor = int(found[-1]) + 1
        return found.astype(np.uint64)

    def _lowest_free(self, start: int, count: int) -> np.ndarray:
        """Up to `count` lowest free frames from `start`, looking through windows that
        double in size: a few frames cost a short look, not a pass over all memory."""
        parts, need, window = [], count, max(count, _FIRST_WINDOW)
        while need > 0 and start < self.nr_frames:
            part = np.flatnonzero(self.free[start : start + window])[:need] + start
            parts.append(part)
            need -= part.size
            start += window
            window *= 2
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def alloc_one(self, what: str = "frame") -> MFN:
        return MFN(int(self.alloc(1, what)[0]))

    def release(self, mfns: np.ndarray | list[int]) -> None:
        mfns = np.asarray(mfns, dtype=np.int64)
        if mfns.size == 0:
            return
        if self.free[mfns].any():
            raise ValueError("releasing a frame that is already free")
        self.free[mfns] = True
        self._cursor = min(self._cursor, int(mfns.min()))

    def mark_used(self, mfns: np.ndarray) -> None:
        """Claim frames that already hold data (restoring ownership after a live update)."""
        runs = runs_of(mfns)
        if runs is None:
            self.free[np.asarray(mfns, dtype=np.int64)] = False
            return
        for _index, first, count in sorted(runs.tolist(), key=lambda run: run[1]):
            self.free[first : first + count] = False
            if first <= self._cursor < first + count:
                # the search for free frames need not walk a run it knows is used
                self._cursor = first + count
