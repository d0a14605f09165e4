"""capstone decoding of guest instructions, for exits, reports and traces."""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import capstone
from capstone import x86_const as cx


@lru_cache(maxsize=2)
def _decoder(detail: bool) -> capstone.Cs:
    cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    cs.detail = detail
    return cs


def disassemble(code: bytes, address: int) -> tuple[str, int]:
    """Text and length of the first instruction in `code`, or ('(bad)', 0)."""
    for insn in _decoder(False).disasm(code, address, 1):
        return f"{insn.mnemonic} {insn.op_str}".strip(), insn.size
    return "(bad)", 0


def disassemble_with(read: Callable[[int, int], bytes], gva: int) -> str:
    """The instruction at `gva`, read with `read(gva, size)` (which may raise)."""
    for size in (15, 0x1000 - (gva & 0xFFF)):  # an instruction may end at a page edge
        try:
            return disassemble(read(gva, min(size, 15)), gva)[0]
        except Exception:  # noqa: BLE001 - any unreadable byte means "cannot show it"
            continue
    return "(unmapped)"


_IMPLICIT_STACK_WRITES = {"push", "call", "pushfq", "pushf"}
_IMPLICIT_STACK_READS = {"pop", "ret", "retf", "popfq", "popf", "iretq", "iret", "leave"}


def data_addresses(code: bytes, rip: int, reg: Callable[[str], int]) -> list[int]:
    """Linear addresses the instruction at `rip` may access as data.

    Explicit memory operands (base + index*scale + disp, RIP-relative, FS/GS
    based) and the implicit stack and string accesses. `reg(name)` reads a
    register by its capstone name.
    """
    addresses: list[int] = []
    for insn in _decoder(True).disasm(code, rip, 1):
        for op in insn.operands:
            if op.type != cx.X86_OP_MEM:
                continue
            mem = op.mem
            ea = mem.disp
            if mem.base == cx.X86_REG_RIP:
                ea += rip + insn.size
            elif mem.base != 0:
                ea += reg(insn.reg_name(mem.base))
            if mem.index != 0:
                ea += reg(insn.reg_name(mem.index)) * mem.scale
            if mem.segment in (cx.X86_REG_FS, cx.X86_REG_GS):
                ea += reg(insn.reg_name(mem.segment) + "_base")
            addresses.append(ea & 0xFFFF_FFFF_FFFF_FFFF)
        mnemonic = insn.mnemonic
        rsp = reg("rsp")
        if mnemonic in _IMPLICIT_STACK_WRITES:
            addresses.append((rsp - 8) & 0xFFFF_FFFF_FFFF_FFFF)
        elif mnemonic in _IMPLICIT_STACK_READS:
            addresses.append(rsp)
        if mnemonic.startswith(("movs", "lods", "cmps", "outs")):
            addresses.append(reg("rsi"))
        if mnemonic.startswith(("movs", "stos", "scas", "cmps", "ins")):
            addresses.append(reg("rdi"))
    return addresses
