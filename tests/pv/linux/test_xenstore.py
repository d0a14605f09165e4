"""The xenstore ring service (hypervisor.pv.linux.xenstore): Linux's boot requests, partial
messages, and random splits of the request stream."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from hypervisor.pv.linux import xenstore as xs

DOMID = 3
HOME = f"/local/domain/{DOMID}"


class Guest:
    """Linux's xenbus side of the ring: write req[], read rsp[]."""

    def __init__(self, start: int = 0) -> None:
        self.page = np.zeros(4096, dtype=np.uint8)
        self.kicks = 0
        self.store = xs.Xenstore(self.page, DOMID, self._kick)
        for offset in (xs.REQ_CONS, xs.REQ_PROD, xs.RSP_CONS, xs.RSP_PROD):
            self.set(offset, start)
        self.replies = b""

    def _kick(self) -> None:
        self.kicks += 1

    def get(self, offset: int) -> int:
        return int(self.page[offset:offset + 4].view(np.uint32)[0])

    def set(self, offset: int, value: int) -> None:
        self.page[offset:offset + 4].view(np.uint32)[0] = value & 0xFFFFFFFF

    def write(self, data: bytes) -> int:
        prod, cons = self.get(xs.REQ_PROD), self.get(xs.REQ_CONS)
        data = data[:xs.RING_SIZE - ((prod - cons) & 0xFFFFFFFF)]
        for i, b in enumerate(data):
            self.page[xs.REQ_OFFSET + (prod + i) % xs.RING_SIZE] = b
        self.set(xs.REQ_PROD, prod + len(data))
        return len(data)

    def read(self) -> None:
        cons, prod = self.get(xs.RSP_CONS), self.get(xs.RSP_PROD)
        self.replies += bytes(self.page[xs.RSP_OFFSET + (cons + i) % xs.RING_SIZE]
                              for i in range((prod - cons) & 0xFFFFFFFF))
        self.set(xs.RSP_CONS, prod)

    def send(self, data: bytes) -> None:
        """Write everything, servicing and reading replies whenever the ring is full."""
        while data:
            data = data[self.write(data):]
            self.store.service()
            self.read()

    def finish(self) -> list[tuple[int, int, int, bytes]]:
        for _ in range(64):  # replies larger than the ring come out in turns
            self.store.service()
            self.read()
        return parse(self.replies)


def request(msg_type: int, payload: bytes, req_id: int = 7, tx_id: int = 0) -> bytes:
    return xs.HEADER.pack(msg_type, req_id, tx_id, len(payload)) + payload


def parse(stream: bytes) -> list[tuple[int, int, int, bytes]]:
    out = []
    while stream:
        t, r, tx, n = xs.HEADER.unpack_from(stream)
        out.append((t, r, tx, stream[16:16 + n]))
        stream = stream[16 + n:]
    return out


def ask(guest: Guest, msg_type: int, payload: bytes, req_id: int = 7, tx_id: int = 0):
    guest.send(request(msg_type, payload, req_id, tx_id))
    replies = guest.finish()
    guest.replies = b""
    return replies


def test_linux_boot_conversation():
    guest = Guest()
    guest.store.write(f"{HOME}/memory/target", b"262144")
    # balloon: WATCH then READ
    assert ask(guest, xs.XS_WATCH, b"memory/target\0FFFF88800a\0", req_id=1) == [
        (xs.XS_WATCH, 1, 0, b"OK\0"),
        (xs.XS_WATCH_EVENT, 0, 0, b"memory/target\0FFFF88800a\0"),
    ]
    assert ask(guest, xs.XS_READ, b"memory/target\0") == [(xs.XS_READ, 7, 0, b"262144")]
    assert ask(guest, xs.XS_READ, b"memory/static-max\0") == [(xs.XS_ERROR, 7, 0, b"ENOENT\0")]
    # shutdown watcher: a read-only transaction that is aborted
    [(t, _, _, tx)] = ask(guest, xs.XS_TRANSACTION_START, b"\0")
    assert (t, tx) == (xs.XS_TRANSACTION_START, b"1\0")
    assert ask(guest, xs.XS_READ, b"control/shutdown\0", tx_id=1)[0][3] == b"ENOENT\0"
    assert ask(guest, xs.XS_TRANSACTION_END, b"F\0", tx_id=1) == [
        (xs.XS_TRANSACTION_END, 7, 1, b"OK\0")]
    assert ask(guest, xs.XS_WRITE, b"control/feature-poweroff\x001") == [
        (xs.XS_WRITE, 7, 0, b"OK\0")]
    assert guest.store.read("control/feature-poweroff") == b"1"
    # a write under a watched path fires the watch, relative to the domain as it was set
    assert ask(guest, xs.XS_WRITE, b"memory/target\x00131072")[1] == (
        xs.XS_WATCH_EVENT, 0, 0, b"memory/target\0FFFF88800a\0")
    # xenbus: directory of an absent backend, then of a present one
    assert ask(guest, xs.XS_DIRECTORY, b"device\0")[0][3] == b"ENOENT\0"
    guest.store.write("device/vif/0/state", b"1")
    guest.store.write("device/vbd/768/state", b"1")
    assert ask(guest, xs.XS_DIRECTORY, b"device\0")[0][3] == b"vbd\0vif\0"
    assert ask(guest, xs.XS_GET_DOMAIN_PATH, b"3\0")[0][3] == f"{HOME}\0".encode()
    assert ask(guest, xs.XS_UNWATCH, b"memory/target\0FFFF88800a\0")[0][3] == b"OK\0"
    assert ask(guest, xs.XS_UNWATCH, b"memory/target\0FFFF88800a\0")[0][3] == b"ENOENT\0"
    assert ask(guest, 99, b"")[0] == (xs.XS_ERROR, 7, 0, b"EINVAL\0")


def test_mkdir_rm_and_absolute_paths():
    guest = Guest()
    assert ask(guest, xs.XS_MKDIR, b"/tool/x\0")[0][3] == b"OK\0"
    assert ask(guest, xs.XS_DIRECTORY, b"/tool\0")[0][3] == b"x\0"
    assert ask(guest, xs.XS_DIRECTORY, b"/tool/x\0")[0][3] == b""
    assert ask(guest, xs.XS_RM, b"/tool\0")[0][3] == b"OK\0"
    assert ask(guest, xs.XS_READ, b"/tool/x\0")[0][3] == b"ENOENT\0"
    assert ask(guest, xs.XS_RM, b"/tool\0")[0][3] == b"ENOENT\0"
    assert ask(guest, xs.XS_READ, b"bad//path\0")[0][3] == b"EINVAL\0"


def test_transactions_commit_and_conflict():
    guest = Guest()
    ask(guest, xs.XS_TRANSACTION_START, b"\0")
    ask(guest, xs.XS_WRITE, b"data/a\x00in tx", tx_id=1)
    assert ask(guest, xs.XS_READ, b"data/a\0")[0][3] == b"ENOENT\0"  # isolated until commit
    assert ask(guest, xs.XS_TRANSACTION_END, b"T\0", tx_id=1)[0][3] == b"OK\0"
    assert guest.store.read("data/a") == b"in tx"
    ask(guest, xs.XS_TRANSACTION_START, b"\0")  # id 2
    ask(guest, xs.XS_WRITE, b"data/a\x00outside")
    ask(guest, xs.XS_WRITE, b"data/a\x00inside", tx_id=2)
    assert ask(guest, xs.XS_TRANSACTION_END, b"T\0", tx_id=2)[0][3] == b"EAGAIN\0"
    assert guest.store.read("data/a") == b"outside"
    assert ask(guest, xs.XS_READ, b"data/a\0", tx_id=9)[0][3] == b"ENOENT\0"


def test_partial_messages_are_consumed_and_buffered():
    """Linux writes header and payload separately and kicks only into an empty ring."""
    guest = Guest()
    message = request(xs.XS_READ, b"memory/target\0")
    guest.write(message[:16])
    guest.store.service()
    assert guest.get(xs.REQ_CONS) == guest.get(xs.REQ_PROD) == 16  # consumed, not left there
    guest.read()
    assert guest.replies == b""  # no reply to half a message
    guest.write(message[16:])
    guest.store.service()
    guest.read()
    assert parse(guest.replies) == [(xs.XS_ERROR, 7, 0, b"ENOENT\0")]


def test_oversized_message_is_a_protocol_error():
    guest = Guest()
    guest.write(xs.HEADER.pack(xs.XS_READ, 1, 0, 5000))
    guest.store.service()
    assert guest.store.state.protocol_errors == 1 and guest.store.state.partial == b""


def test_save_restore_copies():
    guest = Guest()
    ask(guest, xs.XS_WATCH, b"a\0t\0")
    saved = guest.store.save()
    other = xs.Xenstore(np.zeros(4096, dtype=np.uint8), DOMID, lambda: None)
    other.restore(saved)
    assert other.save() == saved
    other.write("b", b"1")
    assert "/local/domain/3/b" not in guest.store.state.nodes


paths = st.sampled_from(["memory/target", "control/shutdown", "device", "device/vif/0",
                         "/local/domain/3/cpu/0/availability", "/tool/x", "data"])
ops = st.one_of(
    st.tuples(st.just(xs.XS_READ), paths.map(lambda p: p.encode() + b"\0")),
    st.tuples(st.just(xs.XS_DIRECTORY), paths.map(lambda p: p.encode() + b"\0")),
    st.tuples(st.just(xs.XS_WRITE), st.tuples(paths, st.binary(max_size=40)).map(
        lambda pv: pv[0].encode() + b"\0" + pv[1])),
    st.tuples(st.just(xs.XS_WATCH), st.tuples(paths, st.sampled_from(["t1", "t2"])).map(
        lambda pt: f"{pt[0]}\0{pt[1]}\0".encode())),
    st.tuples(st.just(xs.XS_RM), paths.map(lambda p: p.encode() + b"\0")),
    st.tuples(st.just(xs.XS_MKDIR), paths.map(lambda p: p.encode() + b"\0")),
)


def replies_for(stream: bytes, cuts: list[int], start: int) -> list:
    guest = Guest(start)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    for a, b in zip(points, points[1:], strict=False):
        guest.send(stream[a:b])
    return guest.finish()


@settings(max_examples=60, deadline=None)
@given(st.lists(ops, min_size=1, max_size=40), st.lists(st.integers(0, 10**6), max_size=30),
       st.integers(0, 2**32 - 1))
def test_random_splits_give_the_same_replies(requests, cuts, start):
    stream = b"".join(request(t, p, req_id=i) for i, (t, p) in enumerate(requests))
    whole = replies_for(stream, [], 0)
    assert replies_for(stream, cuts, start) == whole
    # every request got exactly one direct reply, in order
    direct = [r for r in whole if r[0] != xs.XS_WATCH_EVENT]
    assert [r[1] for r in direct] == list(range(len(requests)))
