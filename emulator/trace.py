"""Instruction tracing: every executed instruction of a pCPU, disassembled.

Tracing installs a Python code hook, which costs hundreds of nanoseconds per
instruction (DESIGN.md §2), so it is only ever attached on request.
"""

from __future__ import annotations

from collections.abc import Callable

from unicorn import UC_HOOK_CODE

from emulator.disasm import disassemble, disassemble_with
from emulator.engine import GuestMemoryFault, PhysicalCpu

TraceSink = Callable[[PhysicalCpu, int, str], None]


def _decode(cpu: PhysicalCpu, address: int, size: int) -> str:
    try:
        return disassemble(cpu.read_virtual(address, size), address)[0]
    except GuestMemoryFault:
        return "(unreadable)"


def attach_tracer(cpu: PhysicalCpu, sink: TraceSink) -> None:
    """Call `sink(cpu, rip, text)` before each instruction `cpu` executes."""

    def on_code(_uc, address: int, size: int, _ud) -> None:
        # unicorn reports a nonsense size for an instruction it cannot decode (vmcall)
        sink(cpu, address, disassemble_with(cpu.read_virtual, address)
             if not 0 < size <= 15 else _decode(cpu, address, size))

    cpu.uc.hook_add(UC_HOOK_CODE, on_code)
    cpu.flush_translations()  # code translated before the hook would bypass it
