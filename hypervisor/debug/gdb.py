"""hvlab's side of a gdb connection: the hypervisor as a `Target` of emulator/gdbstub.py.

Every vCPU of every domain is a gdb thread. Registers come from the engine the
vCPU is loaded on, or from its saved context. Memory addresses are guest-virtual
and go through hvlab's own page walk of the thread's vCPU (the PV base pointer
the hypervisor holds, or the HVM guest's CR3 then EPT), never setting Accessed
or Dirty bits; `monitor phys` switches to guest-physical addresses (a PV
domain's pseudo-physical frames, an HVM domain's GPAs) and `monitor virt` back.

Breakpoints are code hooks on every physical CPU; a vCPU resuming at a
breakpoint runs that instruction first (as x86's resume flag lets a debug
register breakpoint pass once). `stepi` lowers the instruction counter's limit
of the stepping vCPU's CPU so one instruction of that vCPU runs; write
watchpoints hook the machine range the addresses map to when they are set. A
stop is served inside the engine's run with the budget kept, so virtual time
stands still while gdb holds the guest and the run is the same as without gdb.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, TextIO

from emulator.addr import PAGE_SIZE
from emulator.engine import DebugStop, PhysicalCpu
from emulator.gdbstub import SIGINT, SIGTRAP, GdbStub, Resume, Stop, UnreadableMemory
from emulator.paging import ADDR_MASK, WalkFault, walk
from hypervisor.lib.errors import HvlabError

if TYPE_CHECKING:
    from hypervisor.core.hypervisor import Hypervisor
    from hypervisor.core.vcpu import Vcpu

SIGABRT, SIGALRM = 6, 14
_ENGINE_NAME = {"eflags": "rflags"}  # gdb's name -> the engine's, where they differ

MONITOR_HELP = ("monitor phys   memory addresses are guest-physical\n"
                "monitor virt   memory addresses are guest-virtual (the default)\n"
                "monitor where  which vCPU runs where, and the address mode\n")


class GdbKilled(Exception):
    """gdb killed the guest: the run ends here."""


def parse_endpoint(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise HvlabError(f"--gdb {text}: expected HOST:PORT, e.g. 127.0.0.1:1234")
    return host, int(port)


class GdbSession:
    """One gdb client debugging a hypervisor's guests for the length of a run."""

    def __init__(self, hv: Hypervisor, stub_for: Callable[[GdbSession], GdbStub]) -> None:
        self.hv = hv
        self.physical = False
        self.stub = stub_for(self)
        self.breakpoints: dict[tuple[str, int], list[tuple[PhysicalCpu, int]]] = {}
        # (address, length) -> hooks, and the machine pieces' guest-virtual starts
        self.watches: dict[tuple[int, int], list[tuple[PhysicalCpu, int]]] = {}
        self.watched: list[tuple[int, int, int]] = []  # (first ma, last ma, its va)
        self.resume_at: dict[int, int] = {}  # id(vCPU) -> the RIP it resumes at
        self.attached = True
        for cpu in hv.pcpus:
            cpu.on_debug_stop = self._make_stop_handler(cpu)

    @classmethod
    def wait_for_client(cls, hv: Hypervisor, endpoint: str, announce: TextIO) -> GdbSession:
        """Listen on HOST:PORT, say where, and accept one gdb (port 0: any free port)."""
        host, port = parse_endpoint(endpoint)
        try:
            server = GdbStub.listen(host, port)
        except OSError as err:
            raise HvlabError(f"--gdb {endpoint}: cannot listen ({err.strerror or err})") from None
        with server:
            bound_host, bound_port = server.getsockname()[:2]
            announce.write(f"hvlab: waiting for gdb on {bound_host}:{bound_port} "
                           f"(target remote {bound_host}:{bound_port})\n")
            announce.flush()
            conn, _ = server.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(hv, lambda session: GdbStub(conn, session))

    # ------------------------------------------------------------ the run
    def hold_before_start(self) -> None:
        """The first stop, before any instruction: gdb looks and sets breakpoints."""
        self._apply(self.stub.serve(Stop(SIGTRAP, self._first_runnable())))

    def finish(self, stop_reason: str) -> None:
        """The run is over: tell gdb how the guests ended and hang up."""
        self._forget_hooks()
        if self.attached:
            self.stub.finish(self._end_stop(stop_reason))
            self.attached = False

    def _end_stop(self, stop_reason: str) -> Stop:
        ends = [d.shutdown for d in self.hv.domains if d.shutdown is not None]
        if stop_reason == "shutdown" and ends:
            if any(e.reason == "crash" for e in ends):
                return Stop(killed_by=SIGABRT)
            return Stop(exit_code=next((e.code for e in ends if e.code), 0) or 0)
        return Stop(killed_by=SIGALRM)  # the virtual time limit (or nothing left to run)

    def _make_stop_handler(self, cpu: PhysicalCpu) -> Callable[[DebugStop], None]:
        def on_stop(stop: DebugStop) -> None:
            for other in self.hv.pcpus:  # a Ctrl-C is answered by whichever stop came first
                other.cancel_debug_stop()
            self._cancel_steps()
            v = self.hv.loaded[cpu.index]
            thread = self._thread_of(v) if v is not None else None
            if stop.kind == "interrupt":
                event = Stop(SIGINT, thread)
            elif stop.kind == "write":
                event = Stop(SIGTRAP, thread, watch=self._watched_va(stop.address))
            else:
                event = Stop(SIGTRAP, thread)
            self._apply(self.stub.serve(event))

        return on_stop

    def _apply(self, resume: Resume) -> None:
        if resume.action in ("continue", "step"):
            # every vCPU goes on with the instruction it stopped before: a breakpoint
            # there does not fire again (x86's resume flag), a step runs exactly it
            self.resume_at = {id(v): self._register_reader(v)("rip")
                              for v in self._vcpus() if v.context is not None}
        if resume.action == "step":
            self._step(self._vcpu(resume.thread or self._first_runnable()))
        elif resume.action == "detach":
            self._detach()
        elif resume.action == "kill":
            self._detach()
            raise GdbKilled()

    def _detach(self) -> None:
        self._forget_hooks()
        for cpu in self.hv.pcpus:
            cpu.on_debug_stop = None
            cpu.cancel_debug_stop()
        if self.attached:
            self.stub.close()
            self.attached = False

    def _forget_hooks(self) -> None:
        self._cancel_steps()
        for hooks in [*self.breakpoints.values(), *self.watches.values()]:
            for cpu, handle in hooks:
                cpu.remove_hook(handle)
        self.breakpoints.clear()
        self.watches.clear()
        self.watched.clear()

    # ------------------------------------------------------------ threads
    def _vcpus(self) -> list[Vcpu]:
        return [v for d in self.hv.domains for v in d.vcpus]

    def _vcpu(self, thread: int) -> Vcpu:
        return self._vcpus()[thread - 1]

    def _thread_of(self, v: Vcpu) -> int:
        return next(i for i, w in enumerate(self._vcpus(), 1) if w is v)

    def _first_runnable(self) -> int:
        return next((i for i, v in enumerate(self._vcpus(), 1) if v.runnable), 1)

    def threads(self) -> list[int]:
        return list(range(1, len(self._vcpus()) + 1))

    def thread_name(self, thread: int) -> str:
        v = self._vcpu(thread)
        return f"{v.domain.name} vCPU {v.vcpu_id} ({v.runstate}, pCPU {v.pcpu})"

    # ---------------------------------------------------------- registers
    def read_registers(self, thread: int) -> dict[str, int]:
        from emulator.gdbstub import REGISTERS

        v = self._vcpu(thread)
        if v.context is None:
            return {}  # never started: all zero
        read = self._register_reader(v)
        return {r.name: read(_ENGINE_NAME.get(r.name, r.name)) for r in REGISTERS}

    def _register_reader(self, v: Vcpu) -> Callable[[str], int]:
        if self.hv.loaded[v.pcpu] is v:
            return self.hv.pcpus[v.pcpu].reg
        ctx = v.context
        return lambda name: PhysicalCpu.context_reg(ctx, name)

    def write_register(self, thread: int, name: str, value: int) -> None:
        v = self._vcpu(thread)
        if v.context is None:
            return
        name = _ENGINE_NAME.get(name, name)
        if self.hv.loaded[v.pcpu] is v:
            self.hv.pcpus[v.pcpu].set_reg(name, value)
        else:
            PhysicalCpu.set_context_reg(v.context, name, value)

    # ------------------------------------------------------------- memory
    def _machine_address(self, v: Vcpu, address: int, access: str) -> int | None:
        """Where `address` (virtual or physical, as set by `monitor`) is in host memory."""
        dom = v.domain
        if self.physical:
            if dom.hvm is not None:
                return dom.hvm.physmap.gpa_to_ma(address)
            pfn = address >> 12
            if pfn >= dom.nr_pages:
                return None
            return int(dom.p2m[pfn]) * PAGE_SIZE + (address & 0xFFF)
        if dom.hvm is not None:
            physmap = dom.hvm.physmap
            cr3 = self._register_reader(v)("cr3") & ADDR_MASK
            root = physmap.gpa_to_ma(cr3)
            if root is None:
                return None
            t = walk(self.hv.memory.u64, root, address & ~0xFFF, access,
                     table_to_ma=physmap.gpa_to_ma, set_accessed=False)
        else:
            t = walk(self.hv.memory.u64, v.roots.kernel_ma, address & ~0xFFF, access,
                     set_accessed=False)
        if isinstance(t, WalkFault):
            return None
        return t.ma + (address & 0xFFF)

    def _pieces(self, v: Vcpu, address: int, length: int, access: str):
        """(machine address, guest address, size) of each page the range touches."""
        while length > 0:
            size = min(length, PAGE_SIZE - (address & 0xFFF))
            ma = self._machine_address(v, address, access)
            if ma is None or ma + size > self.hv.memory.size:
                raise UnreadableMemory(f"{address:#x}")
            yield ma, address, size
            address += size
            length -= size

    def read_memory(self, thread: int, address: int, length: int) -> bytes:
        v = self._vcpu(thread)
        return b"".join(self.hv.memory.read(ma, size)
                        for ma, _, size in self._pieces(v, address, length, "read"))

    def write_memory(self, thread: int, address: int, data: bytes) -> None:
        v = self._vcpu(thread)
        pieces = list(self._pieces(v, address, len(data), "read"))  # all mapped, or none written
        pos = 0
        for ma, _, size in pieces:
            self.hv.memory.write(ma, data[pos : pos + size])
            pos += size
        for cpu in self.hv.pcpus:  # the bytes may be code already translated
            cpu.flush_translations()

    # ------------------------------------------- breakpoints and watches
    def insert_point(self, kind: str, address: int, length: int) -> bool:
        if kind in ("software", "hardware"):
            if (kind, address) not in self.breakpoints:
                self.breakpoints[(kind, address)] = [
                    (cpu, cpu.stop_before(address, address, partial(self._breaks, cpu)))
                    for cpu in self.hv.pcpus]
            return True
        if kind == "write":
            if (address, length) in self.watches:
                return True
            v = self._vcpu(self.stub.g_thread or self._first_runnable())
            hooks = []
            for ma, va, size in self._pieces(v, address, length, "read"):
                self.watched.append((ma, ma + size - 1, va))
                hooks += [(cpu, cpu.stop_after_write(ma, ma + size - 1))
                          for cpu in self.hv.pcpus]
            self.watches[(address, length)] = hooks
            return True
        return False

    def remove_point(self, kind: str, address: int, length: int) -> bool:
        if kind in ("software", "hardware"):
            for cpu, handle in self.breakpoints.pop((kind, address), []):
                cpu.remove_hook(handle)
            return True
        if kind == "write":
            for cpu, handle in self.watches.pop((address, length), []):
                cpu.remove_hook(handle)
            end = address + length
            self.watched = [w for w in self.watched if not address <= w[2] < end]
            return True
        return False

    def _first_after_resume(self, v: Vcpu | None, address: int) -> bool:
        """Is this `v`'s first instruction since gdb let it go (consumes the answer)?"""
        return v is not None and self.resume_at.pop(id(v), None) == address

    def _breaks(self, cpu: PhysicalCpu, address: int) -> bool:
        return not self._first_after_resume(self.hv.loaded[cpu.index], address)

    def _watched_va(self, ma: int) -> int:
        return next((va + ma - first for first, last, va in self.watched
                     if first <= ma <= last), ma)

    def _step(self, v: Vcpu) -> None:
        cpu = self.hv.pcpus[v.pcpu]
        cpu.single_step(lambda: self.hv.loaded[cpu.index] is v)

    def _cancel_steps(self) -> None:
        for cpu in self.hv.pcpus:
            cpu.cancel_step()

    # ------------------------------------------------------ the rest
    def interrupt(self) -> None:
        for cpu in self.hv.pcpus:
            cpu.request_debug_stop()

    def monitor(self, command: str) -> str:
        words = command.split()
        if words == ["phys"]:
            self.physical = True
            return "memory addresses are now guest-physical\n"
        if words == ["virt"]:
            self.physical = False
            return "memory addresses are now guest-virtual\n"
        if words == ["where"]:
            lines = [f"{i}: {self.thread_name(i)}" for i in self.threads()]
            mode = "guest-physical" if self.physical else "guest-virtual"
            return "\n".join([*lines, f"memory addresses: {mode}"]) + "\n"
        return f"unknown monitor command {command!r}\n{MONITOR_HELP}"

