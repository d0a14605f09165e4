"""A minimal xenstore service on a domain's store ring (io/xs_wire.h), as a pure state machine.

The store is an in-memory tree of nodes (path -> value). Requests arrive as
`xsd_sockmsg` headers {type, req_id, tx_id, len} followed by `len` payload
bytes in the req[] ring; replies go into rsp[] with the same framing. Linux
writes a header and its payload separately and kicks only when the ring was
empty, so `service` consumes whatever bytes are there, complete message or
not, and keeps the partial message until the rest arrives. Replies that do
not fit into rsp[] wait for the guest to make room.

Operations: DIRECTORY, READ, WRITE, MKDIR, RM, WATCH (answered "OK" and at once
a WATCH_EVENT, as xenstored does), UNWATCH, TRANSACTION_START/END (a
transaction works on its own copy of the tree; "T" commits it, "F" drops it)
and GET_DOMAIN_PATH. Anything else, and any missing node, is an ERROR reply
naming the errno ("ENOENT", "EINVAL", ...).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

XS_DIRECTORY = 1
XS_READ = 2
XS_WATCH = 4
XS_UNWATCH = 5
XS_TRANSACTION_START = 6
XS_TRANSACTION_END = 7
XS_GET_DOMAIN_PATH = 10
XS_WRITE = 11
XS_MKDIR = 12
XS_RM = 13
XS_WATCH_EVENT = 15
XS_ERROR = 16

HEADER = struct.Struct("<IIII")  # type, req_id, tx_id, len
XENSTORE_PAYLOAD_MAX = 4096
RING_SIZE = 1024
REQ_OFFSET, RSP_OFFSET = 0, 1024
REQ_CONS, REQ_PROD, RSP_CONS, RSP_PROD = 2048, 2052, 2056, 2060
U32 = 0xFFFFFFFF


class XsError(Exception):
    """A request the store refuses: the reply is ERROR with this errno name."""

    def __init__(self, errno_name: str) -> None:
        super().__init__(errno_name)
        self.errno_name = errno_name


@dataclass
class XenstoreState:
    domid: int
    nodes: dict[str, bytes] = field(default_factory=lambda: {"/": b""})
    watches: list[tuple[str, str]] = field(default_factory=list)  # (path as given, token)
    # id -> (generation at its start, its own copy of the tree)
    transactions: dict[int, tuple[int, dict[str, bytes]]] = field(default_factory=dict)
    next_transaction: int = 1
    generation: int = 0  # bumped by every change outside a transaction
    partial: bytes = b""  # request bytes consumed from the ring, not yet a whole message
    unsent: bytes = b""  # replies waiting for room in rsp[]
    requests: int = 0
    protocol_errors: int = 0


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


def _is_under(path: str, top: str) -> bool:
    return path == top or top == "/" or path.startswith(top + "/")


class Xenstore:
    def __init__(self, page: np.ndarray, domid: int, notify: Callable[[], None]) -> None:
        if page.dtype != np.uint8 or page.size < 4096:
            raise ValueError("the xenstore ring needs a 4096-byte uint8 page view")
        self.page = page
        self.notify = notify
        self.state = XenstoreState(domid)

    # --- state ---------------------------------------------------------------

    @staticmethod
    def _copy(s: XenstoreState) -> XenstoreState:
        return XenstoreState(s.domid, dict(s.nodes), list(s.watches),
                             {k: (gen, dict(tree)) for k, (gen, tree) in s.transactions.items()},
                             s.next_transaction, s.generation, s.partial, s.unsent, s.requests,
                             s.protocol_errors)

    def save(self) -> XenstoreState:
        return self._copy(self.state)

    def restore(self, state: XenstoreState) -> None:
        self.state = self._copy(state)

    @property
    def home(self) -> str:
        return f"/local/domain/{self.state.domid}"

    def absolute(self, path: str) -> str:
        if not path or "//" in path or (path != "/" and path.endswith("/")):
            raise XsError("EINVAL")
        return path if path.startswith("/") else f"{self.home}/{path}"

    # --- the tree --------------------------------------------------------------

    def write(self, path: str, value: bytes, nodes: dict[str, bytes] | None = None) -> None:
        """Create or set a node (and any missing parents, empty), as the toolstack would."""
        nodes = self.state.nodes if nodes is None else nodes
        path = self.absolute(path)
        missing = []
        parent = path
        while parent not in nodes:
            missing.append(parent)
            parent = _parent(parent)
        for node in reversed(missing):
            nodes[node] = b""
        nodes[path] = value

    def read(self, path: str, nodes: dict[str, bytes] | None = None) -> bytes:
        nodes = self.state.nodes if nodes is None else nodes
        path = self.absolute(path)
        if path not in nodes:
            raise XsError("ENOENT")
        return nodes[path]

    def children(self, path: str, nodes: dict[str, bytes] | None = None) -> list[str]:
        nodes = self.state.nodes if nodes is None else nodes
        path = self.absolute(path)
        if path not in nodes:
            raise XsError("ENOENT")
        prefix = "/" if path == "/" else path + "/"
        return sorted(n[len(prefix):] for n in nodes
                      if n.startswith(prefix) and n != path and "/" not in n[len(prefix):])

    def remove(self, path: str, nodes: dict[str, bytes]) -> None:
        path = self.absolute(path)
        if path not in nodes:
            raise XsError("ENOENT")
        if path == "/":
            raise XsError("EINVAL")
        for node in [n for n in nodes if _is_under(n, path)]:
            del nodes[node]

    # --- the ring --------------------------------------------------------------

    def _get(self, offset: int) -> int:
        return int(self.page[offset:offset + 4].view(np.uint32)[0])

    def _put(self, offset: int, value: int) -> None:
        self.page[offset:offset + 4].view(np.uint32)[0] = value & U32

    def service(self) -> bool:
        """Consume the request ring, answer every whole message, fill the reply ring.

        Returns whether anything moved (and the guest was notified).
        """
        moved = self._consume_requests()
        while len(self.state.partial) >= HEADER.size:
            msg_type, req_id, tx_id, length = HEADER.unpack_from(self.state.partial)
            if length > XENSTORE_PAYLOAD_MAX:  # a broken guest: drop what it sent
                self.state.protocol_errors += 1
                self.state.partial = b""
                break
            if len(self.state.partial) < HEADER.size + length:
                break
            payload = self.state.partial[HEADER.size:HEADER.size + length]
            self.state.partial = self.state.partial[HEADER.size + length:]
            self.state.requests += 1
            self.state.unsent += self.handle(msg_type, req_id, tx_id, payload)
        moved |= self._produce_replies()
        if moved:
            self.notify()
        return moved

    def _consume_requests(self) -> bool:
        cons, prod = self._get(REQ_CONS), self._get(REQ_PROD)
        count = (prod - cons) & U32
        if count == 0:
            return False
        if count > RING_SIZE:
            self.state.protocol_errors += 1
            self._put(REQ_CONS, prod)
            return True
        first = cons % RING_SIZE
        head = min(count, RING_SIZE - first)
        data = (self.page[REQ_OFFSET + first:REQ_OFFSET + first + head].tobytes()
                + self.page[REQ_OFFSET:REQ_OFFSET + count - head].tobytes())
        self.state.partial += data
        self._put(REQ_CONS, prod)
        return True

    def _produce_replies(self) -> bool:
        if not self.state.unsent:
            return False
        cons, prod = self._get(RSP_CONS), self._get(RSP_PROD)
        room = RING_SIZE - ((prod - cons) & U32)
        out = self.state.unsent[:max(room, 0)]
        for i, byte in enumerate(out):
            self.page[RSP_OFFSET + (prod + i) % RING_SIZE] = byte
        self.state.unsent = self.state.unsent[len(out):]
        if out:
            self._put(RSP_PROD, prod + len(out))
        return bool(out)

    # --- requests ----------------------------------------------------------------

    @staticmethod
    def message(msg_type: int, req_id: int, tx_id: int, payload: bytes) -> bytes:
        return HEADER.pack(msg_type, req_id, tx_id, len(payload)) + payload

    def handle(self, msg_type: int, req_id: int, tx_id: int, payload: bytes) -> bytes:
        """The reply bytes (one or more messages) to one request."""
        try:
            reply, events = self._dispatch(msg_type, tx_id, payload)
        except XsError as err:
            return self.message(XS_ERROR, req_id, tx_id, err.errno_name.encode() + b"\0")
        out = self.message(msg_type, req_id, tx_id, reply)
        for path, token in events:
            out += self.message(XS_WATCH_EVENT, 0, 0, f"{path}\0{token}\0".encode())
        return out

    @staticmethod
    def _args(payload: bytes, count: int) -> list[str]:
        """`count` NUL-terminated strings (the last NUL may be missing)."""
        parts = payload.removesuffix(b"\0").split(b"\0")
        if len(parts) < count:
            raise XsError("EINVAL")
        return [p.decode("utf-8", "replace") for p in parts[:count]]

    def _tree(self, tx_id: int) -> dict[str, bytes]:
        if tx_id == 0:
            return self.state.nodes
        if tx_id not in self.state.transactions:
            raise XsError("ENOENT")
        return self.state.transactions[tx_id][1]

    def _changed(self, tx_id: int, path: str) -> list[tuple[str, str]]:
        """After a change to `path`: watch events now, or none until the transaction commits."""
        if tx_id:
            return []
        self.state.generation += 1  # a transaction begun before this must retry
        return self._fired(self.absolute(path))

    def _fired(self, changed: str) -> list[tuple[str, str]]:
        """(path as the watcher sees it, token) for every watch covering `changed`."""
        events = []
        for path, token in self.state.watches:
            top = self.absolute(path)
            if _is_under(changed, top):
                shown = changed
                if not path.startswith("/"):
                    shown = changed[len(self.home) + 1:]
                events.append((shown, token))
        return events

    def _dispatch(self, msg_type: int, tx_id: int, payload: bytes
                  ) -> tuple[bytes, list[tuple[str, str]]]:
        ok = b"OK\0"
        if msg_type == XS_READ:
            (path,) = self._args(payload, 1)
            return self.read(path, self._tree(tx_id)), []
        if msg_type == XS_DIRECTORY:
            (path,) = self._args(payload, 1)
            return b"".join(c.encode() + b"\0" for c in self.children(path, self._tree(tx_id))), []
        if msg_type == XS_WRITE:
            path_bytes, _, value = payload.partition(b"\0")
            path = path_bytes.decode("utf-8", "replace")
            self.write(path, value, self._tree(tx_id))
            return ok, self._changed(tx_id, path)
        if msg_type == XS_MKDIR:
            (path,) = self._args(payload, 1)
            tree = self._tree(tx_id)
            if self.absolute(path) in tree:
                return ok, []
            self.write(path, b"", tree)
            return ok, self._changed(tx_id, path)
        if msg_type == XS_RM:
            (path,) = self._args(payload, 1)
            self.remove(path, self._tree(tx_id))
            return ok, self._changed(tx_id, path)
        if msg_type == XS_WATCH:
            path, token = self._args(payload, 2)
            self.absolute(path)  # validates
            if (path, token) in self.state.watches:
                raise XsError("EEXIST")
            self.state.watches.append((path, token))
            return ok, [(path, token)]
        if msg_type == XS_UNWATCH:
            path, token = self._args(payload, 2)
            if (path, token) not in self.state.watches:
                raise XsError("ENOENT")
            self.state.watches.remove((path, token))
            return ok, []
        if msg_type == XS_TRANSACTION_START:
            tx = self.state.next_transaction
            self.state.next_transaction += 1
            self.state.transactions[tx] = (self.state.generation, dict(self.state.nodes))
            return f"{tx}\0".encode(), []
        if msg_type == XS_TRANSACTION_END:
            (verdict,) = self._args(payload, 1)
            if tx_id not in self.state.transactions or verdict not in ("T", "F"):
                raise XsError("ENOENT" if tx_id not in self.state.transactions else "EINVAL")
            started, tree = self.state.transactions.pop(tx_id)
            events: list[tuple[str, str]] = []
            if verdict == "T" and started != self.state.generation:
                raise XsError("EAGAIN")  # the store changed meanwhile: the guest retries
            if verdict == "T":
                changed = sorted(p for p in set(tree) | set(self.state.nodes)
                                 if tree.get(p) != self.state.nodes.get(p))
                self.state.nodes = tree
                self.state.generation += 1
                for path in changed:
                    events += self._fired(path)
            return ok, events
        if msg_type == XS_GET_DOMAIN_PATH:
            (domid,) = self._args(payload, 1)
            if not domid.isdigit():
                raise XsError("EINVAL")
            return f"/local/domain/{int(domid)}\0".encode(), []
        raise XsError("EINVAL")
