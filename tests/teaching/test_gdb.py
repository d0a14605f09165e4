"""`hvlab run --gdb`: the real gdb against hvlab, the protocol, a run gdb leaves unchanged."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from emulator.engine import PhysicalCpu
from emulator.gdbstub import REGISTERS, GdbStub, Resume, Stop, target_xml
from hypervisor.cli import main
from hypervisor.core.elf import load_kernel
from hypervisor.debug.gdb import GdbSession
from hypervisor.runner import boot_scenario, describe, run_scenario
from hypervisor.scenario import load_scenario
from tests import ROOT

GUESTS = ROOT / "scenarios" / "guests"
CHECK_VALUE = load_kernel(GUESTS / "pv_hello.elf").symbols["check_value"]
GDB = shutil.which("gdb")
needs_gdb = pytest.mark.skipif(GDB is None, reason="gdb is not installed")


def _without_wall(result: dict) -> dict:
    return {k: v for k, v in result.items() if "wall" not in k}


def _start_hvlab(scenario: str) -> tuple[subprocess.Popen, int]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "hypervisor.cli", "run", str(ROOT / "scenarios" / scenario),
         "--gdb", "127.0.0.1:0", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    assert proc.stderr is not None
    line = proc.stderr.readline()
    match = re.search(r"waiting for gdb on 127\.0\.0\.1:(\d+)", line)
    assert match, line
    return proc, int(match.group(1))


def _gdb(port: int, elf: str, *commands: str) -> subprocess.Popen:
    args = [GDB or "gdb", "-batch", "-nx", "-ex", f"target remote 127.0.0.1:{port}"]
    for command in commands:
        args += ["-ex", command]
    return subprocess.Popen([*args, elf], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=GUESTS)


def _finish(proc: subprocess.Popen) -> tuple[dict, str]:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return json.loads(out), err


@needs_gdb
def test_gdb_breaks_reads_steps_and_the_guest_finishes_as_without_it():
    proc, port = _start_hvlab("pv-hello.toml")
    gdb = _gdb(port, "pv_hello.elf", "break check_value", "continue", "info registers",
               "x/2i $pc", "stepi", "info threads", "continue")
    out = gdb.communicate(timeout=120)[0]
    result, _ = _finish(proc)

    assert "Breakpoint 1, check_value () at lib/check.s:34" in out  # debug info (-g)
    assert re.search(rf"^rip\s+{CHECK_VALUE:#x}\s+{CHECK_VALUE:#x} <check_value>", out, re.M)
    assert re.search(r"^rsp\s+0xffffffff8000eff8", out, re.M)  # Xen's boot stack, one call in
    # a kernel in ring 3 on Xen's flat selector
    assert re.search(r"^cr3\s+0x[0-9a-f]+", out, re.M) and re.search(r"^cs\s+0xe033\b", out,
                                                                      re.M)
    assert re.search(rf"=> {CHECK_VALUE:#x} <check_value>:\s+push\s+%rbx\n"
                     rf"\s+{CHECK_VALUE + 1:#x} <check_value\+1>:\s+push\s+%r12", out)
    assert "check_value () at lib/check.s:35" in out  # stepi ran exactly `push rbx`
    assert "hello vCPU 0" in out  # the vCPU as a thread
    assert out.count("Breakpoint 1, check_value ()") == 2  # the second check
    hello = result["domains"][0]
    assert hello["shutdown"]["reason"] == "poweroff" and hello["shutdown"]["code"] == 0
    # virtual time stood still while gdb held the guest: the same run as without gdb
    plain = run_scenario(load_scenario(ROOT / "scenarios" / "pv-hello.toml"))
    assert _without_wall(result) == _without_wall(plain)


@needs_gdb
def test_gdb_watchpoint_physical_memory_and_exit_status():
    proc, port = _start_hvlab("pv-hello.toml")
    gdb = _gdb(port, "pv_hello.elf", "watch *(long *)&start_info", "continue",
               "x/4xb 0xffffffff80001000", "monitor phys", "x/4xb 0x1000", "monitor virt",
               "delete", "continue")
    out = gdb.communicate(timeout=120)[0]
    result, _ = _finish(proc)

    assert "Hardware watchpoint 1: *(long *)&start_info" in out
    start_info = boot_scenario(load_scenario(ROOT / "scenarios" / "pv-hello.toml")).domains[
        0].start_info_va - (1 << 64)  # rsi = start_info, as gdb prints a long
    assert re.search(rf"Old value = 0\nNew value = {start_info}", out)
    virt, phys = re.findall(r":\s+((?:0x[0-9a-f]{2}\s*){4})\n", out)[:2]
    assert virt == phys  # VIRT_BASE maps pseudo-physical frame 0
    assert "memory addresses are now guest-physical" in out
    assert "[Inferior 1 (Remote target) exited normally]" in out
    plain = run_scenario(load_scenario(ROOT / "scenarios" / "pv-hello.toml"))
    assert _without_wall(result) == _without_wall(plain)


@needs_gdb
def test_gdb_ctrl_c_interrupts_a_spinning_guest_and_kill_ends_the_run():
    proc, port = _start_hvlab("pv-spin.toml")
    gdb = _gdb(port, "pv_spin.elf", "break spin_loop", "continue", "delete", "continue",
               "x/i $pc", "monitor where", "kill")
    assert gdb.stdout is not None
    seen = ""
    while "Breakpoint 1, spin_loop" not in seen:  # the guest is in its loop of seconds
        line = gdb.stdout.readline()
        assert line, seen
        seen += line
    time.sleep(0.5)
    gdb.send_signal(signal.SIGINT)
    out = seen + gdb.communicate(timeout=120)[0]
    result, _ = _finish(proc)

    assert "Program received signal SIGINT, Interrupt." in out
    assert re.search(r"=> 0xffffffff800010[0-9a-f]{2} <spin_loop(\+\d+)?>", out), out
    assert "1: spin vCPU 0" in out
    assert "[Inferior 1 (Remote target) killed]" in out
    assert result["stop"] == "killed by gdb"
    assert result["domains"][0]["shutdown"] is None


# ----------------------------------------------------------------- in-process


class _Script:
    """Stands in for the socket side: answers each stop with the next decision."""

    def __init__(self, session: GdbSession, decisions: list[Resume]) -> None:
        self.session = session
        self.decisions = decisions
        self.stops: list[tuple[Stop, int]] = []
        self.g_thread = 1

    def serve(self, stop: Stop) -> Resume:
        rip = self.session.read_registers(stop.thread or 1)["rip"]
        self.stops.append((stop, rip))
        return self.decisions.pop(0) if self.decisions else Resume("detach")

    def finish(self, stop: Stop) -> None:
        self.stops.append((stop, 0))

    def close(self) -> None:
        pass


def _scripted_run(decide, scenario: str = "pv-hello.toml") -> tuple[dict, _Script]:
    sc = load_scenario(ROOT / "scenarios" / scenario)
    hv = boot_scenario(sc)
    session = GdbSession(hv, lambda s: _Script(s, []))  # type: ignore[arg-type, return-value]
    script = session.stub
    assert isinstance(script, _Script)
    decide(session, script)
    session.hold_before_start()
    stop = hv.run(sc.virtual_time_ns)
    session.finish(stop)
    return describe(hv, sc, stop, 0.0), script


def _break_and_step(session: GdbSession, script: _Script) -> None:
    check_value = CHECK_VALUE
    session.insert_point("software", check_value, 1)
    serve = script.serve

    def as_gdb_does(stop: Stop) -> Resume:
        resume = serve(stop)
        if script.stops[-1][1] == check_value:  # gdb steps over its breakpoint
            session.remove_point("software", check_value, 1)
        return resume

    script.serve = as_gdb_does  # type: ignore[method-assign]
    script.decisions += [Resume("continue"), Resume("step", 1), Resume("step", 1),
                         Resume("continue")]


def test_debug_stops_leave_the_run_unchanged_in_process():
    plain = _without_wall(run_scenario(load_scenario(ROOT / "scenarios" / "pv-hello.toml")))
    result, script = _scripted_run(_break_and_step)
    rips = [rip for _, rip in script.stops[:5]]
    assert rips[1:4] == [CHECK_VALUE, CHECK_VALUE + 1, CHECK_VALUE + 3]  # push rbx, push r12
    assert _without_wall(result) == plain


def test_a_planted_miscount_of_stopped_instructions_is_caught(monkeypatch):
    plain = _without_wall(run_scenario(load_scenario(ROOT / "scenarios" / "pv-hello.toml")))
    monkeypatch.setattr(PhysicalCpu, "_uncount_stopped_instruction", lambda self: None)
    result, _ = _scripted_run(_break_and_step)
    assert _without_wall(result)["instructions"] != plain["instructions"]


def test_registers_written_by_gdb_reach_the_guest():
    def at_first_check(session: GdbSession, script: _Script) -> None:
        session.insert_point("software", CHECK_VALUE, 1)

        def serve(stop: Stop) -> Resume:
            regs = session.read_registers(1)
            if regs["rip"] == CHECK_VALUE:  # check 1: the start_info magic
                session.write_register(1, "rdi", regs["rdi"] + 1)
                return Resume("detach")
            return Resume("continue")

        script.serve = serve  # type: ignore[method-assign]

    result, _ = _scripted_run(at_first_check)
    hello = result["domains"][0]
    assert hello["shutdown"]["code"] == 1 and "FAILED" in hello["console"]


# ------------------------------------------------------------------ protocol


class _Machine:
    """A tiny target: 64 bytes of memory at 0x1000, registers in a dict."""

    def __init__(self) -> None:
        self.memory = bytearray(range(64))
        self.regs = {"rip": 0x1000, "rsp": 0x2000}
        self.points: list[tuple[str, int, int]] = []

    def threads(self):
        return [1, 2]

    def thread_name(self, thread):
        return f"cpu {thread}"

    def read_registers(self, thread):
        return dict(self.regs)

    def write_register(self, thread, name, value):
        self.regs[name] = value

    def read_memory(self, thread, address, length):
        from emulator.gdbstub import UnreadableMemory

        if not 0x1000 <= address <= address + length <= 0x1040:
            raise UnreadableMemory(hex(address))
        return bytes(self.memory[address - 0x1000 : address - 0x1000 + length])

    def write_memory(self, thread, address, data):
        self.memory[address - 0x1000 : address - 0x1000 + len(data)] = data

    def insert_point(self, kind, address, length):
        self.points.append((kind, address, length))
        return kind != "write"

    def remove_point(self, kind, address, length):
        return True

    def interrupt(self):
        pass

    def monitor(self, command):
        return f"did {command}\n"


def _frame(body: bytes) -> bytes:
    return b"$" + body + b"#" + f"{sum(body) & 0xFF:02x}".encode()


class _Client:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def ask(self, body: bytes, ack: bool = True) -> bytes:
        self.sock.sendall(_frame(body))
        return self.reply(ack)

    def reply(self, ack: bool = True) -> bytes:
        while not (m := re.search(rb"\$([^#]*)#([0-9a-f]{2})", self.buf, re.S)):
            self.buf += self.sock.recv(65536)
        self.buf = self.buf[m.end():]
        assert int(m.group(2), 16) == sum(m.group(1)) & 0xFF
        if ack:
            self.sock.sendall(b"+")
        return m.group(1)


def test_protocol_framing_registers_memory_and_points():
    import threading

    ours, theirs = socket.socketpair()
    machine = _Machine()
    stub = GdbStub(ours, machine)  # type: ignore[arg-type]
    result: list[Resume] = []
    server = threading.Thread(target=lambda: result.append(stub.serve(Stop(5, 1))))
    server.start()
    client = _Client(theirs)
    assert b"qXfer:features:read+" in client.ask(b"qSupported:multiprocess+")
    assert client.ask(b"?") == b"T05thread:1;"
    theirs.sendall(_frame(b"m1000,4")[:-2] + b"00")  # a bad checksum is refused ...
    assert client.buf + theirs.recv(1) == b"-"
    assert client.ask(b"m1000,4") == b"00010203"  # ... and the packet sent again works
    assert client.ask(b"m2000,4") == b"E14"
    assert client.ask(b"X1002,2:" + bytes([0x7D, 0x23 ^ 0x20, 0x41])) == b"OK"  # escaped '#'
    assert machine.memory[2:4] == b"#A"
    g = client.ask(b"g")
    rip_at = sum(r.bits for r in REGISTERS[: [r.name for r in REGISTERS].index("rip")]) // 4
    assert g[rip_at : rip_at + 16] == b"0010000000000000"
    assert client.ask(b"P10=0020000000000000") == b"OK" and machine.regs["rip"] == 0x2000
    assert client.ask(b"Z0,1234,1") == b"OK" and client.ask(b"Z2,1000,8") == b""
    assert client.ask(b"Z3,1000,8") == b""  # read watchpoints: not offered
    assert client.ask(b"qRcmd," + b"phys".hex().encode()) == b"did phys\n".hex().encode()
    assert client.ask(b"qfThreadInfo") == b"m1,2" and client.ask(b"qsThreadInfo") == b"l"
    xml = b""
    while True:
        chunk = client.ask(b"qXfer:features:read:target.xml:%x,200" % len(xml))
        xml += chunk[1:]
        if chunk[:1] == b"l":
            break
    assert xml.decode() == target_xml() and "org.gnu.gdb.i386.core" in target_xml()
    assert client.ask(b"QStartNoAckMode") == b"OK"
    assert client.ask(b"qC", ack=False) == b"QC1"
    theirs.sendall(_frame(b"s"))
    server.join(timeout=10)
    assert result == [Resume("step", 1)]
    stub.close()
    theirs.close()


def test_bad_gdb_endpoint_is_a_usage_error(capsys):
    assert main(["run", str(ROOT / "scenarios" / "pv-hello.toml"), "--gdb", "nowhere"]) == 2
    assert "HOST:PORT" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert main(["run", str(ROOT / "scenarios" / "pv-hello.toml"),
                     "--gdb", f"127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hvlab: --gdb") and err.count("\n") == 1


def _stop_often(symbol_address: int, watch: int | None = None):
    """Break at an address (both vCPUs), step a few times each hit, watch a variable."""
    def decide(session: GdbSession, script: _Script) -> None:
        session.insert_point("software", symbol_address, 1)
        if watch is not None:
            session.insert_point("write", watch, 8)
        hits = [0]

        def serve(stop: Stop) -> Resume:
            script.stops.append((stop, 0))
            if len(script.stops) > 150:  # enough: let the rest run undisturbed
                return Resume("detach")
            hits[0] += 1
            return Resume("step", stop.thread) if hits[0] % 3 else Resume("continue")

        script.serve = serve  # type: ignore[method-assign]

    return decide


@pytest.mark.parametrize("scenario, elf, symbol, variable", [
    ("hvm-lapic.toml", "hvm_lapic.elf", "timer_handler", None),
    ("pv-smp.toml", "pv_smp.elf", "event_upcall", "counter"),
])
def test_stops_in_smp_and_hvm_guests_leave_the_run_unchanged(scenario, elf, symbol, variable):
    from hypervisor.core.elf import load_kernel

    symbols = load_kernel(GUESTS / elf).symbols
    plain = _without_wall(run_scenario(load_scenario(ROOT / "scenarios" / scenario)))
    result, script = _scripted_run(
        _stop_often(symbols[symbol], symbols[variable] if variable else None), scenario)
    assert len(script.stops) > 20
    assert {s.thread for s, _ in script.stops if s.thread} == {1, 2}  # both vCPUs stopped
    if variable:
        assert any(s.watch == symbols[variable] for s, _ in script.stops)
    assert _without_wall(result) == plain


def test_points_reinserted_at_every_stop_and_a_watch_set_mid_run_leave_hvm_unchanged():
    """As gdb does: every stop removes all points and resuming inserts them again."""
    from hypervisor.core.elf import load_kernel

    symbols = load_kernel(GUESTS / "hvm_lapic.elf").symbols
    handler, ticks = symbols["timer_handler"], symbols["percpus"] + 0x10  # vCPU 0's count
    plain = _without_wall(run_scenario(load_scenario(ROOT / "scenarios" / "hvm-lapic.toml")))

    def decide(session: GdbSession, script: _Script) -> None:
        points = [("software", handler, 1)]
        session.insert_point(*points[0])

        def serve(stop: Stop) -> Resume:
            script.stops.append((stop, 0))
            for point in points:
                session.remove_point(*point)
            if len(script.stops) == 10:
                points.append(("write", ticks, 8))
            if len(script.stops) > 80:
                return Resume("detach")
            for point in points:
                session.insert_point(*point)
            return Resume("step", stop.thread) if len(script.stops) % 2 else Resume("continue")

        script.serve = serve  # type: ignore[method-assign]

    result, script = _scripted_run(decide, "hvm-lapic.toml")
    watched = [s for s, _ in script.stops[10:] if s.watch is not None]
    assert watched and all(s.watch == ticks and s.thread == 1 for s in watched)
    assert _without_wall(result) == plain
