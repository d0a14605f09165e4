"""capstone decoding of guest instructions, for exits, reports and traces."""

from __future__ import annotations

from functools import lru_cache

import capstone

from emulator.engine import GuestMemoryFault, PhysicalCpu


@lru_cache(maxsize=1)
def _decoder() -> capstone.Cs:
    cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    cs.detail = False
    return cs


def disassemble(code: bytes, address: int) -> tuple[str, int]:
    """Text and length of the first instruction in `code`, or ('(bad)', 0)."""
    for insn in _decoder().disasm(code, address, 1):
        return f"{insn.mnemonic} {insn.op_str}".strip(), insn.size
    return "(bad)", 0


def disassemble_at(cpu: PhysicalCpu, gva: int) -> str:
    """The instruction at guest-virtual `gva`, read through the MMU."""
    code = b""
    for size in (15, 4096 - (gva & 0xFFF)):  # retry up to the page end if 15 crosses a hole
        try:
            code = cpu.read_virtual(gva, min(size, 15))
            break
        except GuestMemoryFault:
            continue
    if not code:
        return "(unmapped)"
    text, _ = disassemble(code, gva)
    return text
