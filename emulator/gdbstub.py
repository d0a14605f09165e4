"""The machine side of the GDB remote serial protocol (standard library only).

`GdbStub` speaks to one connected gdb over a socket: packet framing and
checksums, acknowledgements (until gdb asks for no-ack mode), the x86-64
target description (`qXfer:features:read:target.xml`), registers, memory,
breakpoints and write watchpoints, threads, stop replies, `monitor` commands,
detach and kill. It knows nothing of what it debugs: a `Target` answers.

The stub is driven from the target's side, which owns the run: every time the
guest stops the target calls `serve(stop)`, which answers gdb until gdb resumes
(continue or step), detaches or kills, and returns that decision. While the
guest runs a small thread watches the socket for gdb's interrupt byte (Ctrl-C)
and tells the target; in all-stop mode gdb sends nothing else meanwhile.

Threads are numbered from 1; `None` as a thread means "any".
"""

from __future__ import annotations

import select
import socket
import threading
from dataclasses import dataclass
from typing import Protocol

SIGINT, SIGTRAP, SIGKILL = 2, 5, 9
INTERRUPT = 0x03
PACKET_SIZE = 0x4000


@dataclass(frozen=True)
class Register:
    name: str
    bits: int
    type: str
    group: str


def _regs(names: str, bits: int, type_: str, group: str) -> list[Register]:
    return [Register(name, bits, type_, group) for name in names.split()]


# The x86-64 registers, in the order of `g` packets. Names and features are
# what gdb's amd64 support looks for; the system feature is hvlab's own.
CORE = (_regs("rax rbx rcx rdx rsi rdi", 64, "int64", "general")
        + [Register("rbp", 64, "data_ptr", "general"), Register("rsp", 64, "data_ptr", "general")]
        + _regs("r8 r9 r10 r11 r12 r13 r14 r15", 64, "int64", "general")
        + [Register("rip", 64, "code_ptr", "general"),
           Register("eflags", 32, "i386_eflags", "general")]
        + _regs("cs ss ds es fs gs", 32, "int32", "general")
        + _regs("st0 st1 st2 st3 st4 st5 st6 st7", 80, "i387_ext", "float")
        + _regs("fctrl fstat ftag fiseg fioff foseg fooff fop", 32, "int", "float"))
SSE = _regs(" ".join(f"xmm{i}" for i in range(16)), 128, "uint128", "vector") + \
    _regs("mxcsr", 32, "int", "vector")
SEGMENTS = _regs("fs_base gs_base", 64, "int", "system")
SYSTEM = _regs("cr0 cr2 cr3 cr4 efer", 64, "int", "system")
FEATURES = (("org.gnu.gdb.i386.core", CORE), ("org.gnu.gdb.i386.sse", SSE),
            ("org.gnu.gdb.i386.segments", SEGMENTS), ("org.hvlab.x86.system", SYSTEM))
REGISTERS: tuple[Register, ...] = tuple(r for _, regs in FEATURES for r in regs)
REGISTER_INDEX = {r.name: i for i, r in enumerate(REGISTERS)}

_EFLAGS_BITS = ((0, "CF"), (1, ""), (2, "PF"), (4, "AF"), (6, "ZF"), (7, "SF"), (8, "TF"),
                (9, "IF"), (10, "DF"), (11, "OF"), (14, "NT"), (16, "RF"), (17, "VM"),
                (18, "AC"), (19, "VIF"), (20, "VIP"), (21, "ID"))


def target_xml() -> str:
    """The target description gdb reads with qXfer:features:read:target.xml."""
    out = ['<?xml version="1.0"?>', '<!DOCTYPE target SYSTEM "gdb-target.dtd">',
           "<target>", "<architecture>i386:x86-64</architecture>"]
    regnum = 0
    for feature, regs in FEATURES:
        out.append(f'<feature name="{feature}">')
        if feature.endswith(".core"):
            out.append('<flags id="i386_eflags" size="4">')
            out += [f'<field name="{name}" start="{bit}" end="{bit}"/>'
                    for bit, name in _EFLAGS_BITS]
            out.append("</flags>")
        for r in regs:
            out.append(f'<reg name="{r.name}" bitsize="{r.bits}" type="{r.type}" '
                       f'regnum="{regnum}" group="{r.group}"/>')
            regnum += 1
        out.append("</feature>")
    out.append("</target>")
    return "\n".join(out)


class UnreadableMemory(Exception):
    """The target cannot read or write that address (gdb is told `E14`)."""


@dataclass(frozen=True)
class Stop:
    """Why the guest stopped: a signal in a thread, a watchpoint, or the end."""

    signal: int = SIGTRAP
    thread: int | None = None
    watch: int | None = None  # the watched address that was written
    exit_code: int | None = None  # the guest is finished: exited with this code
    killed_by: int | None = None  # the guest is finished: terminated by this signal


@dataclass(frozen=True)
class Resume:
    """What gdb asked for when it let the guest go."""

    action: str  # "continue" | "step" | "detach" | "kill"
    thread: int | None = None


class Target(Protocol):
    """What the stub needs from the machine being debugged."""

    def threads(self) -> list[int]: ...

    def thread_name(self, thread: int) -> str: ...

    def read_registers(self, thread: int) -> dict[str, int]:
        """Values by the names of REGISTERS (missing names read as 0)."""

    def write_register(self, thread: int, name: str, value: int) -> None: ...

    def read_memory(self, thread: int, address: int, length: int) -> bytes:
        """Raises UnreadableMemory where nothing is mapped."""

    def write_memory(self, thread: int, address: int, data: bytes) -> None: ...

    def insert_point(self, kind: str, address: int, length: int) -> bool:
        """kind: "software" | "hardware" | "write"; False if not supported."""

    def remove_point(self, kind: str, address: int, length: int) -> bool: ...

    def interrupt(self) -> None:
        """Called from the watcher thread when gdb sends Ctrl-C: stop soon."""

    def monitor(self, command: str) -> str: ...


_POINT_KINDS = {"0": "software", "1": "hardware", "2": "write"}


class GdbStub:
    def __init__(self, conn: socket.socket, target: Target) -> None:
        self.conn = conn
        self.target = target
        self.ack = True
        self._ack_off_after_reply = False
        self._buffer = b""
        self._running = False
        self._watcher: threading.Thread | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self.g_thread: int | None = None  # Hg: registers and memory
        self.c_thread: int | None = None  # Hc: step and continue
        self.closed = False

    # ------------------------------------------------------------ listening
    @staticmethod
    def listen(host: str, port: int) -> socket.socket:
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind((host, port))
        server.listen(1)
        return server

    def close(self) -> None:
        self._stop_watcher()
        if not self.closed:
            self.closed = True
            self.conn.close()
        self._wake_r.close()
        self._wake_w.close()

    # -------------------------------------------------------------- serving
    def serve(self, stop: Stop) -> Resume:
        """Answer gdb while the guest is stopped; returns how gdb let it go."""
        self._stop_watcher()
        try:
            return self._serve(stop)
        except OSError:  # gdb went away: carry on without a debugger
            self.closed = True
            return Resume("detach")

    def _serve(self, stop: Stop) -> Resume:
        if self._running:  # gdb is waiting for this stop since it resumed the guest
            self._running = False
            self._send(self._stop_reply(stop))
        while True:
            packet = self._receive()
            if packet is None:
                raise ConnectionResetError("gdb hung up")
            answer, resume = self._handle(packet, stop)
            if resume is not None and resume.action in ("continue", "step"):
                self._running = True
                self._start_watcher()
                return resume
            if answer is not None:
                self._send(answer)
                if self._ack_off_after_reply:  # gdb acknowledges that OK, then no more
                    self.ack = self._ack_off_after_reply = False
            if resume is not None:  # detach (answered OK) or kill (no answer)
                return resume

    def finish(self, stop: Stop) -> None:
        """The guest is finished (`W` or `X` packet), then the connection ends."""
        self._stop_watcher()
        if not self.closed and self._running:
            try:
                self._send(self._stop_reply(stop))
            except OSError:
                pass
        self.close()

    def _stop_reply(self, stop: Stop) -> str:
        if stop.exit_code is not None:
            return f"W{stop.exit_code & 0xFF:02x}"
        if stop.killed_by is not None:
            return f"X{stop.killed_by:02x}"
        reply = f"T{stop.signal:02x}"
        if stop.watch is not None:
            reply += f"watch:{stop.watch:x};"
        if stop.thread is not None:
            reply += f"thread:{stop.thread:x};"
            self.g_thread = stop.thread
        return reply

    def _thread(self, selected: int | None) -> int:
        threads = self.target.threads()
        return selected if selected in threads else threads[0]

    def _handle(self, packet: str, stop: Stop) -> tuple[str | None, Resume | None]:
        kind = packet[:1]
        if packet == "?":
            return self._stop_reply(stop), None
        if kind == "q" or kind == "Q":
            return self._query(packet), None
        if kind == "H":
            thread = _thread_id(packet[2:])
            if packet[1] == "g":
                self.g_thread = thread
            else:
                self.c_thread = thread
            return "OK", None
        if kind == "T":
            return ("OK" if _thread_id(packet[1:]) in self.target.threads() else "E01"), None
        if kind == "g":
            values = self.target.read_registers(self._thread(self.g_thread))
            return "".join(_le_hex(values.get(r.name, 0), r.bits) for r in REGISTERS), None
        if kind == "G":
            return self._write_all_registers(packet[1:]), None
        if kind == "p":
            index = int(packet[1:], 16)
            if index >= len(REGISTERS):
                return "E01", None
            r = REGISTERS[index]
            return _le_hex(self.target.read_registers(self._thread(self.g_thread))
                           .get(r.name, 0), r.bits), None
        if kind == "P":
            index_hex, value_hex = packet[1:].split("=", 1)
            index = int(index_hex, 16)
            if index >= len(REGISTERS):
                return "E01", None
            self.target.write_register(self._thread(self.g_thread), REGISTERS[index].name,
                                       int.from_bytes(bytes.fromhex(value_hex), "little"))
            return "OK", None
        if kind == "m":
            address, length = (int(x, 16) for x in packet[1:].split(","))
            try:
                data = self.target.read_memory(self._thread(self.g_thread), address, length)
            except UnreadableMemory:
                return "E14", None
            return data.hex(), None
        if kind in ("M", "X"):
            where, payload = packet[1:].split(":", 1)
            address, length = (int(x, 16) for x in where.split(","))
            data = bytes.fromhex(payload) if kind == "M" else payload.encode("latin-1")
            try:
                self.target.write_memory(self._thread(self.g_thread), address, data[:length])
            except UnreadableMemory:
                return "E14", None
            return "OK", None
        if kind in ("Z", "z"):
            point, where, size = packet[1:].split(";")[0].split(",")
            if point not in _POINT_KINDS:
                return "", None
            op = self.target.insert_point if kind == "Z" else self.target.remove_point
            done = op(_POINT_KINDS[point], int(where, 16), int(size, 16))
            return ("OK" if done else ""), None
        if kind in ("c", "s"):
            if len(packet) > 1:  # resume at another address
                self.target.write_register(self._thread(self.c_thread), "rip",
                                           int(packet[1:], 16))
            thread = self.c_thread if self.c_thread in self.target.threads() else None
            if kind == "s":
                thread = thread if thread is not None else self._thread(self.g_thread)
            return None, Resume("step" if kind == "s" else "continue", thread)
        if kind == "D":
            return "OK", Resume("detach")
        if kind == "k":
            return None, Resume("kill")
        return "", None  # unsupported: gdb falls back or says so

    def _query(self, packet: str) -> str:
        if packet.startswith("qSupported"):
            return (f"PacketSize={PACKET_SIZE:x};qXfer:features:read+;QStartNoAckMode+;"
                    "swbreak+;hwbreak+")
        if packet == "QStartNoAckMode":
            self._ack_off_after_reply = True
            return "OK"
        if packet.startswith("qXfer:features:read:"):
            annex, _, window = packet[len("qXfer:features:read:"):].partition(":")
            if annex != "target.xml":
                return "E00"
            offset, length = (int(x, 16) for x in window.split(","))
            data = target_xml()[offset : offset + length]
            return ("m" if offset + length < len(target_xml()) else "l") + data
        if packet == "qAttached":
            return "1"
        if packet == "qC":
            return f"QC{self._thread(self.g_thread):x}"
        if packet == "qfThreadInfo":
            return "m" + ",".join(f"{t:x}" for t in self.target.threads())
        if packet == "qsThreadInfo":
            return "l"
        if packet.startswith("qThreadExtraInfo,"):
            return self.target.thread_name(int(packet.split(",")[1], 16)).encode().hex()
        if packet.startswith("qRcmd,"):
            command = bytes.fromhex(packet[len("qRcmd,"):]).decode(errors="replace")
            text = self.target.monitor(command)
            return (text.encode().hex() if text else "OK") if text is not None else ""
        if packet == "qSymbol::":
            return "OK"
        return ""

    def _write_all_registers(self, payload: str) -> str:
        thread = self._thread(self.g_thread)
        pos = 0
        for r in REGISTERS:
            width = r.bits // 4
            chunk = payload[pos : pos + width]
            if len(chunk) < width:
                break
            if "x" not in chunk:
                self.target.write_register(thread, r.name,
                                           int.from_bytes(bytes.fromhex(chunk), "little"))
            pos += width
        return "OK"

    # ------------------------------------------------------- packet framing
    def _send(self, payload: str) -> None:
        data = _escape(payload)
        frame = b"$" + data + b"#" + f"{sum(data) & 0xFF:02x}".encode()
        while True:
            self.conn.sendall(frame)
            if not self.ack:
                return
            reply = self._read_byte()
            if reply != b"-":  # "-": gdb saw a bad checksum, send again
                if reply not in (b"+", b""):
                    self._buffer = reply + self._buffer  # a packet, not an ack: keep it
                return

    def _read_byte(self) -> bytes:
        if not self._buffer:
            try:
                self._buffer = self.conn.recv(PACKET_SIZE)
            except OSError:
                return b""
            if not self._buffer:
                return b""
        byte, self._buffer = self._buffer[:1], self._buffer[1:]
        return byte

    def _receive(self) -> str | None:
        """The next packet's payload (acknowledged), or None when gdb hung up."""
        while True:
            byte = self._read_byte()
            if byte == b"":
                return None
            if byte != b"$":
                continue  # acks, a stray Ctrl-C while already stopped
            body = bytearray()
            while (byte := self._read_byte()) != b"#":
                if byte == b"":
                    return None
                body += byte
            checksum = self._read_byte() + self._read_byte()
            if self.ack:
                ok = checksum and int(checksum, 16) == sum(body) & 0xFF
                self.conn.sendall(b"+" if ok else b"-")
                if not ok:
                    continue
            return _unescape(bytes(body)).decode("latin-1")

    # ------------------------------------------------ Ctrl-C while running
    def _start_watcher(self) -> None:
        self._watcher = threading.Thread(target=self._watch_for_interrupt, daemon=True,
                                         name="gdb-interrupt")
        self._watcher.start()

    def _stop_watcher(self) -> None:
        if self._watcher is not None:
            self._wake_w.send(b"!")
            self._watcher.join()
            self._watcher = None
            self._wake_r.recv(1)

    def _watch_for_interrupt(self) -> None:
        while True:
            ready, _, _ = select.select([self.conn, self._wake_r], [], [])
            if self._wake_r in ready:
                return
            try:
                data = self.conn.recv(PACKET_SIZE)
            except OSError:
                return
            if not data:
                self._buffer += data
                return
            if INTERRUPT in data:
                self.target.interrupt()
                data = data.replace(bytes([INTERRUPT]), b"")
            self._buffer += data


def _thread_id(text: str) -> int | None:
    if text in ("-1", "0", ""):
        return None
    return int(text, 16)


def _le_hex(value: int, bits: int) -> str:
    return (value & ((1 << bits) - 1)).to_bytes(bits // 8, "little").hex()


def _escape(payload: str) -> bytes:
    out = bytearray()
    for byte in payload.encode("latin-1"):
        if byte in b"#$}*":
            out += bytes([0x7D, byte ^ 0x20])
        else:
            out.append(byte)
    return bytes(out)


def _unescape(body: bytes) -> bytes:
    out = bytearray()
    it = iter(body)
    for byte in it:
        out.append(next(it) ^ 0x20 if byte == 0x7D else byte)
    return bytes(out)
