"""The PV console ring backend (hypervisor.pv.linux.console_ring), without a CPU."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from hypervisor.pv.linux import console_ring as cr


class Guest:
    """The guest's side of the ring (hvc_xen): write out[], read in[]."""

    def __init__(self, start: int = 0) -> None:
        self.page = np.zeros(4096, dtype=np.uint8)
        self.out: list[bytes] = []
        self.kicks = 0
        self.ring = cr.ConsoleRing(self.page, self.out.append, self._kick)
        for offset in (cr.IN_CONS, cr.IN_PROD, cr.OUT_CONS, cr.OUT_PROD):
            self.set(offset, start)

    def _kick(self) -> None:
        self.kicks += 1

    def get(self, offset: int) -> int:
        return int(self.page[offset:offset + 4].view(np.uint32)[0])

    def set(self, offset: int, value: int) -> None:
        self.page[offset:offset + 4].view(np.uint32)[0] = value & 0xFFFFFFFF

    def write(self, data: bytes) -> int:
        prod, cons = self.get(cr.OUT_PROD), self.get(cr.OUT_CONS)
        room = cr.OUT_SIZE - ((prod - cons) & 0xFFFFFFFF)
        data = data[:room]
        for i, b in enumerate(data):
            self.page[cr.OUT_OFFSET + (prod + i) % cr.OUT_SIZE] = b
        self.set(cr.OUT_PROD, prod + len(data))
        return len(data)

    def read_input(self) -> bytes:
        cons, prod = self.get(cr.IN_CONS), self.get(cr.IN_PROD)
        data = bytes(self.page[cr.IN_OFFSET + (cons + i) % cr.IN_SIZE]
                     for i in range((prod - cons) & 0xFFFFFFFF))
        self.set(cr.IN_CONS, prod)
        return data


def test_output_is_drained_in_order_across_the_wrap_and_the_u32_overflow():
    guest = Guest(start=0xFFFFFF00)  # indexes wrap past 2**32 during the test
    text = b"".join(b"line %d of the boot log\n" % i for i in range(400))
    sent = 0
    while sent < len(text):
        sent += guest.write(text[sent:sent + 700])
        guest.ring.drain()
    assert b"".join(guest.out) == text
    assert guest.ring.state.drained == len(text)
    assert guest.get(cr.OUT_CONS) == guest.get(cr.OUT_PROD)
    assert guest.ring.drain() == 0  # nothing new: no output, no kick
    kicks = guest.kicks
    guest.ring.drain()
    assert guest.kicks == kicks


def test_a_producer_more_than_a_ring_ahead_is_counted_and_skipped():
    guest = Guest()
    guest.set(cr.OUT_PROD, cr.OUT_SIZE + 1)
    assert guest.ring.drain() == 0 and guest.out == []
    assert guest.ring.state.ring_errors == 1
    assert guest.get(cr.OUT_CONS) == cr.OUT_SIZE + 1


def test_input_waits_for_room():
    guest = Guest(start=0xFFFFFFF0)
    data = bytes(range(256)) * 6  # 1536 bytes, more than in[] holds
    assert guest.ring.send_input(data) == cr.IN_SIZE
    assert guest.ring.send_input() == 0  # still full
    got = guest.read_input()
    assert guest.ring.send_input() == len(data) - cr.IN_SIZE
    got += guest.read_input()
    assert got == data and guest.ring.state.pending_input == b""


def test_save_restore_round_trip():
    guest = Guest()
    guest.ring.send_input(b"x" * 2000)
    saved = guest.ring.save()
    other = cr.ConsoleRing(np.zeros(4096, dtype=np.uint8), print, lambda: None)
    other.restore(saved)
    assert other.save() == saved


@given(st.lists(st.binary(min_size=1, max_size=300), max_size=30), st.integers(0, 2**32 - 1))
def test_any_writes_arrive_unchanged(chunks, start):
    guest = Guest(start)
    for chunk in chunks:
        sent = 0
        while sent < len(chunk):
            sent += guest.write(chunk[sent:])
            guest.ring.drain()
    assert b"".join(guest.out) == b"".join(chunks)
