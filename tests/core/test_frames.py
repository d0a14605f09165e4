"""The host frame allocator: lowest-first, whatever the search looks through."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from hypervisor.core.frames import FrameAllocator, OutOfFrames

NR_FRAMES = 20_000  # several of the allocator's search windows


class Reference:
    """The allocator's rule spelled out on a plain set: lowest free from the cursor,
    else lowest free from 0."""

    def __init__(self, nr_frames: int) -> None:
        self.free = set(range(1, nr_frames))
        self.cursor = 1

    def alloc(self, count: int) -> list[int] | None:
        found = sorted(m for m in self.free if m >= self.cursor)[:count]
        if len(found) < count:
            found = sorted(self.free)[:count]
        if len(found) < count:
            return None
        self.free -= set(found)
        self.cursor = found[-1] + 1
        return found

    def release(self, mfns: list[int]) -> None:
        self.free |= set(mfns)
        self.cursor = min([self.cursor, *mfns])

    def mark_used(self, mfns: list[int]) -> None:
        self.free -= set(mfns)


operations = st.lists(st.one_of(
    st.tuples(st.just("alloc"), st.integers(1, 9000)),
    st.tuples(st.just("release"), st.integers(0, 10**6)),
    st.tuples(st.just("mark_used"), st.integers(1, NR_FRAMES - 1), st.integers(1, 7000)),
), max_size=12)


@settings(max_examples=60, deadline=None)
@given(operations)
def test_the_allocator_follows_its_rule(ops) -> None:
    frames, ref = FrameAllocator(NR_FRAMES), Reference(NR_FRAMES)
    held: list[int] = []
    for op in ops:
        if op[0] == "alloc":
            expected = ref.alloc(op[1])
            if expected is None:
                try:
                    frames.alloc(op[1])
                except OutOfFrames:
                    continue
                raise AssertionError("allocated more frames than were free")
            got = frames.alloc(op[1]).tolist()
            assert got == expected
            held += got
        elif op[0] == "release" and held:
            start = op[1] % len(held)
            chunk, held = held[start : start + 500], held[:start] + held[start + 500 :]
            frames.release(np.array(chunk, dtype=np.uint64))
            ref.release(chunk)
        elif op[0] == "mark_used":
            first, count = op[1], min(op[2], NR_FRAMES - op[1])
            free = [m for m in range(first, first + count) if m in ref.free]
            frames.mark_used(np.array(free, dtype=np.uint64))
            ref.mark_used(free)
            held += free
        assert frames.nr_free == len(ref.free)
