"""The PV console ring (io/console.h `xencons_interface`), as a pure state machine.

The guest writes its output into out[] and advances out_prod; the backend
copies out[out_cons .. out_prod) to the domain's console and advances
out_cons. Input goes the other way through in[]. The indexes are free-running
u32 counters, masked by the ring size. The page is a numpy u8 view of the
guest's console frame; `emit` receives output bytes, `notify` signals the
console event channel after the backend moved an index.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

IN_OFFSET, IN_SIZE = 0, 1024
OUT_OFFSET, OUT_SIZE = 1024, 2048
IN_CONS, IN_PROD, OUT_CONS, OUT_PROD = 3072, 3076, 3080, 3084
U32 = 0xFFFFFFFF


@dataclass
class ConsoleRingState:
    pending_input: bytes = b""  # input not yet fitting into in[]
    drained: int = 0  # output bytes copied to the console
    ring_errors: int = 0  # times the guest's out_prod ran more than a ring ahead


class ConsoleRing:
    def __init__(self, page: np.ndarray, emit: Callable[[bytes], None],
                 notify: Callable[[], None]) -> None:
        if page.dtype != np.uint8 or page.size < 4096:
            raise ValueError("the console ring needs a 4096-byte uint8 page view")
        self.page = page
        self.emit = emit
        self.notify = notify
        self.state = ConsoleRingState()

    def save(self) -> ConsoleRingState:
        return ConsoleRingState(self.state.pending_input, self.state.drained,
                                self.state.ring_errors)

    def restore(self, state: ConsoleRingState) -> None:
        self.state = ConsoleRingState(state.pending_input, state.drained, state.ring_errors)

    def _get(self, offset: int) -> int:
        return int(self.page[offset:offset + 4].view(np.uint32)[0])

    def _put(self, offset: int, value: int) -> None:
        self.page[offset:offset + 4].view(np.uint32)[0] = value & U32

    def _copy_out(self, base: int, size: int, start: int, count: int) -> bytes:
        first = start % size
        head = min(count, size - first)
        data = self.page[base + first:base + first + head].tobytes()
        return data + self.page[base:base + count - head].tobytes()

    def drain(self) -> int:
        """Copy everything the guest produced to the console; the number of bytes copied."""
        cons, prod = self._get(OUT_CONS), self._get(OUT_PROD)
        count = (prod - cons) & U32
        if count == 0:
            return 0
        if count > OUT_SIZE:  # a guest bug: resynchronise, as a console daemon would
            self.state.ring_errors += 1
            self._put(OUT_CONS, prod)
            self.notify()
            return 0
        data = self._copy_out(OUT_OFFSET, OUT_SIZE, cons, count)
        self._put(OUT_CONS, prod)
        self.state.drained += count
        self.emit(data)
        self.notify()
        return count

    def send_input(self, data: bytes = b"") -> int:
        """Queue `data` for the guest and move what fits into in[]; bytes moved."""
        pending = self.state.pending_input + data
        cons, prod = self._get(IN_CONS), self._get(IN_PROD)
        used = (prod - cons) & U32
        room = max(IN_SIZE - used, 0)
        moved = pending[:room]
        for i, byte in enumerate(moved):
            self.page[IN_OFFSET + (prod + i) % IN_SIZE] = byte
        self.state.pending_input = pending[len(moved):]
        if moved:
            self._put(IN_PROD, prod + len(moved))
            self.notify()
        return len(moved)
