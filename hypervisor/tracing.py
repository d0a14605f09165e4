"""`hvlab trace`: disassembled execution per vCPU, with exits annotated.

Filters keep what a student looks for: one domain, one vCPU, a RIP range
(numbers or the guest's ELF symbols), a window of virtual time. Lines can
show the nearest symbol, chosen registers and the data addresses the
instruction touches, as text or as one JSON object per line (`jsonl`).

A Python code hook per instruction is costly, so a RIP range is given to the
engine as the hook's own range and nothing outside it calls back at all.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, TextIO

from emulator.disasm import data_addresses, disassemble_with
from emulator.engine import GPRS, PhysicalCpu
from emulator.exits import Exit
from hypervisor.lib.errors import HvlabError

if TYPE_CHECKING:
    from hypervisor.core.hypervisor import Hypervisor
    from hypervisor.core.vcpu import Vcpu

TRACEABLE_REGISTERS = frozenset((*GPRS, "rip", "rflags", "cr0", "cr2", "cr3", "cr4",
                                 "fs_base", "gs_base"))
FORMATS = ("text", "jsonl")


class Symbols:
    """A guest kernel's ELF symbols: the nearest one at or below an address."""

    def __init__(self, symbols: dict[str, int]) -> None:
        pairs = sorted((addr, name) for name, addr in symbols.items() if addr)
        self.addresses = [a for a, _ in pairs]
        self.names = [n for _, n in pairs]
        self.by_name = dict(symbols)

    def describe(self, address: int) -> str | None:
        i = bisect.bisect_right(self.addresses, address) - 1
        if i < 0:
            return None
        offset = address - self.addresses[i]
        return self.names[i] if offset == 0 else f"{self.names[i]}+{offset:#x}"

    def extent(self, name: str) -> tuple[int, int] | None:
        """[first, last] address of symbol `name`: up to the next symbol."""
        if name not in self.by_name:
            return None
        first = self.by_name[name]
        i = bisect.bisect_right(self.addresses, first)
        last = self.addresses[i] - 1 if i < len(self.addresses) else first
        return first, last


@dataclass
class TraceOptions:
    domain: str | None = None
    vcpu: int | None = None
    rip: tuple[int, int] | None = None  # inclusive
    window: tuple[int, int | None] = (0, None)  # virtual ns [from, to)
    registers: tuple[str, ...] = ()
    memory: bool = False
    format: str = "text"
    symbols: dict[str, Symbols] = field(default_factory=dict)  # by domain name


def parse_rip_range(text: str, symbols: list[Symbols]) -> tuple[int, int]:
    """LO-HI (numbers or symbols, inclusive), or one symbol: its whole extent."""
    def one(part: str) -> tuple[int, int]:
        for table in symbols:
            if (found := table.extent(part)) is not None:
                return found
        try:
            value = int(part, 0)
        except ValueError:
            raise HvlabError(f"--rip {text}: {part!r} is neither a number nor a guest "
                             "symbol") from None
        return value, value

    lo_text, sep, hi_text = text.partition("-")
    lo, hi = one(lo_text)
    if sep:
        hi = one(hi_text)[0]
    if hi < lo:
        raise HvlabError(f"--rip {text}: the range ends before it starts")
    return lo, hi


def parse_registers(text: str | None) -> tuple[str, ...]:
    if not text:
        return ()
    names = tuple(n.strip().lower() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in TRACEABLE_REGISTERS]
    if unknown:
        raise HvlabError(f"--regs: unknown register {unknown[0]!r} "
                         f"(one of {', '.join(sorted(TRACEABLE_REGISTERS))})")
    return names


class Tracer:
    def __init__(self, hv: Hypervisor, out: TextIO, limit: int,
                 options: TraceOptions | None = None) -> None:
        self.hv = hv
        self.out = out
        self.limit = limit
        self.options = options or TraceOptions()
        self.lines = 0
        begin, end = self.options.rip or (1, 0)  # (1, 0): every address
        for cpu in hv.pcpus:
            cpu.trace_instructions(partial(self._instruction, cpu), begin, end)

    @property
    def exhausted(self) -> bool:
        return self.lines >= self.limit

    def _emit(self, text: str) -> None:
        if self.lines < self.limit:
            self.out.write(text + "\n")
        elif self.lines == self.limit:
            note = f"... trace limit of {self.limit} lines reached"
            self.out.write((json.dumps({"note": note}) if self.jsonl else note) + "\n")
        self.lines += 1

    @property
    def jsonl(self) -> bool:
        return self.options.format == "jsonl"

    def _wanted(self, v: Vcpu | None, now: int) -> bool:
        o = self.options
        if v is None:
            return o.domain is None and o.vcpu is None
        if o.domain is not None and v.domain.name != o.domain:
            return False
        if o.vcpu is not None and v.vcpu_id != o.vcpu:
            return False
        start, stop = o.window
        return now >= start and (stop is None or now < stop)

    def _symbol(self, v: Vcpu | None, rip: int) -> str | None:
        table = self.options.symbols.get(v.domain.name) if v is not None else None
        return table.describe(rip) if table is not None else None

    def _instruction(self, cpu: PhysicalCpu, rip: int) -> None:
        if self.lines > self.limit:
            return  # past the limit: nothing more is printed, so decode nothing
        v = self.hv.loaded[cpu.index]
        # the counting hook ran first: this instruction is already counted
        now = cpu.tsc() - 1 - (v.domain.time_offset if v is not None else 0)
        if not self._wanted(v, now):
            return
        text = disassemble_with(cpu.read_virtual, rip)
        name = v.name if v is not None else f"pcpu{cpu.index}"
        regs = {r: cpu.reg(r) for r in self.options.registers}
        memory = self._data_addresses(cpu, rip) if self.options.memory else None
        symbol = self._symbol(v, rip)
        if self.jsonl:
            record: dict[str, Any] = {"t": now, "vcpu": name, "pcpu": cpu.index, "rip": rip,
                                      "symbol": symbol, "insn": text}
            if regs:
                record["regs"] = regs
            if memory is not None:
                record["mem"] = memory
            self._emit(json.dumps(record))
            return
        line = f"{name:>12} p{cpu.index} {rip:#018x}  {text:<34}"
        if symbol:
            line += f" <{symbol}>"
        if regs:
            line += "  " + " ".join(f"{r}={val:#x}" for r, val in regs.items())
        if memory:
            line += "  mem " + ",".join(f"{a:#x}" for a in memory)
        self._emit(f"{now:>10} {line.rstrip()}")

    @staticmethod
    def _data_addresses(cpu: PhysicalCpu, rip: int) -> list[int]:
        try:
            code = cpu.read_virtual(rip, 15 if (rip & 0xFFF) <= 0xFF1 else 0x1000 - (rip & 0xFFF))
        except Exception:  # noqa: BLE001 - an unreadable instruction touches nothing we can show
            return []
        return data_addresses(code, rip, cpu.reg_by_capstone_name)

    def exit(self, v: Vcpu, exit_: Exit) -> None:
        now = self.hv.vcpu_time(v.domain) - v.domain.time_offset
        rip = self.options.rip
        if not self._wanted(v, now) or (rip is not None and not rip[0] <= exit_.rip <= rip[1]):
            return
        fields = {k: val for k, val in vars(exit_).items() if k != "rip"}
        if self.jsonl:
            self._emit(json.dumps({"t": now, "vcpu": v.name, "rip": exit_.rip,
                                   "exit": type(exit_).__name__,
                                   **{k: _plain(val) for k, val in fields.items()}}))
            return
        detail = " ".join(f"{k}={val:#x}" if isinstance(val, int) and not isinstance(val, bool)
                          else f"{k}={val}" for k, val in fields.items())
        self._emit(f"{now:>10} {v.name:>12}    -- exit {type(exit_).__name__} {detail}".rstrip())


def _plain(value: object) -> object:
    return value if isinstance(value, int | str | bool | float | type(None)) else str(value)
