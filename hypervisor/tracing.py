"""`hvlab trace`: disassembled execution per vCPU, with exits annotated."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, TextIO

from emulator.disasm import disassemble_with
from emulator.engine import PhysicalCpu
from emulator.exits import Exit

if TYPE_CHECKING:
    from hypervisor.core.hypervisor import Hypervisor
    from hypervisor.core.vcpu import Vcpu


class Tracer:
    def __init__(self, hv: Hypervisor, out: TextIO, limit: int) -> None:
        self.hv = hv
        self.out = out
        self.limit = limit
        self.lines = 0
        for cpu in hv.pcpus:
            cpu.trace_instructions(partial(self._instruction, cpu))

    @property
    def exhausted(self) -> bool:
        return self.lines >= self.limit

    def _emit(self, text: str) -> None:
        if self.lines < self.limit:
            self.out.write(text + "\n")
        elif self.lines == self.limit:
            self.out.write(f"... trace limit of {self.limit} lines reached\n")
        self.lines += 1

    def _instruction(self, cpu: PhysicalCpu, rip: int) -> None:
        if self.lines > self.limit:
            return  # past the limit: nothing more is printed, so decode nothing
        text = disassemble_with(cpu.read_virtual, rip)
        v = self.hv.loaded[cpu.index]
        name = v.name if v is not None else f"pcpu{cpu.index}"
        self._emit(f"{name:>12} p{cpu.index} {rip:#018x}  {text}")

    def exit(self, v: Vcpu, exit_: Exit) -> None:
        fields = {k: val for k, val in vars(exit_).items() if k != "rip"}
        detail = " ".join(f"{k}={val:#x}" if isinstance(val, int) and not isinstance(val, bool)
                          else f"{k}={val}" for k, val in fields.items())
        self._emit(f"{v.name:>12}    -- exit {type(exit_).__name__} {detail}".rstrip())
