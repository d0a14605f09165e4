"""Instruction tracing: every executed instruction of a pCPU, disassembled.

Tracing installs a Python code hook, which costs hundreds of nanoseconds per
instruction (DESIGN.md §2), so it is only ever attached on request.
"""

from __future__ import annotations

from collections.abc import Callable

from unicorn import UC_HOOK_CODE

from emulator.disasm import disassemble
from emulator.engine import GuestMemoryFault, PhysicalCpu

TraceSink = Callable[[PhysicalCpu, int, str], None]


def attach_tracer(cpu: PhysicalCpu, sink: TraceSink) -> None:
    """Call `sink(cpu, rip, text)` before each instruction `cpu` executes."""

    def on_code(_uc, address: int, size: int, _ud) -> None:
        try:
            code = cpu.read_virtual(address, size)
        except GuestMemoryFault:
            sink(cpu, address, "(unreadable)")
            return
        sink(cpu, address, disassemble(code, address)[0])

    cpu.uc.hook_add(UC_HOOK_CODE, on_code)
    cpu.flush_translations()  # code translated before the hook would bypass it
