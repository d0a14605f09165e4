"""Exact instruction counts at one native call per translated block, not per instruction.

The per-instruction counting hook (native_counter.py) makes unicorn call out
before every guest instruction: ~8 ns each, most of a compute-bound run (a
loop of register and load instructions: ~890 MIPS bare, ~100 with it, ~700
with a block hook). Here a native *block* hook adds the block's instruction
count when the block starts, and the engine settles the count exactly
whenever a run stops inside a block. The two schemes give the same counts.

Where a block's count comes from: unicorn's edge-generated hook is told
(pc, icount, size) of every block QEMU translates for execution (after the
engine's first one); the count goes into an open-addressing table
(pc, size) -> icount that the block hook probes. A block the table does not
know (one whose entry is in doubt, or dropped from a full table) makes the
hook stop the run *before* the block (its call precedes the block's
exit-request check, so nothing of it runs); the engine drops every
translation, and the block's new translation tells its count.

A block can also be left midway without any exit: a guest write to the
code of the block that is running (Linux's `text_poke_early` copying into
kernel text) makes QEMU restore the CPU to the writing instruction and go on
with a one-instruction block there. The per-instruction hook had counted the
instructions up to and including that write, and counts the write again in
the new block; a block that starts inside the last one (at its start, too)
and ends before the last one did can only be such a restart (a branch into
a block, or back to its start, translates to the same end), so the hook stops before it and the engine
settles the last block's count up to the write.

Code changes under the same (pc, size) (Linux patching retpolines into
`lfence; jmp *%rax`, another process's code at the same address) may change
the count: a translation whose count disagrees with the table's marks the
entry unknown and asks for every translation to be dropped and the table
cleared, so no stale block can run with a wrong count.

The hook (System V: uc in rdi, address in rsi, size in edx, the counter
block in rcx; offsets are `_CounterBlock`'s):

        mov edx, edx                ; size is a u32
        mov r8, rsi / shr r8, 2 / mov r9, rsi / shr r9, 17
        xor r8, r9 / xor r8, rdx    ; hash = (pc >> 2) ^ (pc >> 17) ^ size
    probe:
        and r8, [rcx+40]            ; & mask
        mov r9, r8 / shl r9, 4 / add r9, [rcx+32]   ; the entry: u64 pc, u32 size, u32 count
        mov eax, [r9+8] / test eax, eax / jz unknown  ; empty slot
        cmp eax, edx / jne next / cmp rsi, [r9] / jne next
        mov eax, [r9+12] / cmp eax, -1 / je unknown   ; entry in doubt
        mov r10, rsi / sub r10, [rcx+48] / jb counted   ; starts inside the last block,
        cmp r10, [rcx+64] / jae counted                 ; and ends before it did:
        add r10, rdx / cmp r10, [rcx+64] / jae counted  ; the last block was left
        mov byte [rcx+72], 3 / jmp [rcx+16]             ; midway (see below)
    counted:
        mov r10, [rcx]              ; executed so far
        mov [rcx+48], rsi / mov [rcx+56], r10 / mov [rcx+64], rdx  ; block pc, base, size
        add rax, r10 / cmp rax, [rcx+8] / ja over_budget
        mov [rcx], rax / ret
    next:  inc r8 / jmp probe
    unknown:      mov byte [rcx+72], 2 / jmp hold
    over_budget:  mov byte [rcx+72], 1
    hold: mov [rcx+48], rsi / mov [rcx+64], rdx / mov r10, [rcx] / mov [rcx+56], r10
          jmp [rcx+16]              ; tail-call uc_emu_stop(uc): the block does not run
"""

from __future__ import annotations

import bisect
import ctypes
from collections.abc import Callable
from functools import lru_cache

import capstone
import numpy as np
from unicorn import UC_HOOK_BLOCK, UC_HOOK_EDGE_GENERATED

from emulator.native_counter import NativeCounter, add_native_hook, executable_page

_CODE = bytes.fromhex(
    "89d24989f049c1e8024989f149c1e9114d31c84931d04c2341284d89c149c1e1044c0349"
    "20418b410885c0745239d07549493b317544418b410c83f8ff74404989f24c2b51307216"
    "4c3b514073104901d24c3b51407307c6414803ff61104c8b11488971304c895138488951"
    "404c01d0483b4108770f488901c349ffc0eb97c6414802eb04c641480148897130488951"
    "404c8b114c895138ff6110"
)

HELD_OVER_BUDGET, HELD_UNKNOWN, HELD_RESTART = 1, 2, 3
_IN_DOUBT = 0xFFFF_FFFF
MAX_INSTRUCTION = 15
TABLE_BITS = 18  # 256 Ki entries, 4 MiB: a Linux boot translates far fewer blocks


class _UcTb(ctypes.Structure):  # unicorn's uc_tb
    _fields_ = [("pc", ctypes.c_uint64), ("icount", ctypes.c_uint16), ("size", ctypes.c_uint16)]


_EDGE_CFUNC = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(_UcTb),
                               ctypes.POINTER(_UcTb), ctypes.c_void_p)


@lru_cache(maxsize=1)
def _decoder() -> capstone.Cs:
    return capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)


@lru_cache(maxsize=65536)
def instruction_offsets(code: bytes, size: int) -> tuple[int, ...]:
    """Offsets of the instructions a block of `size` bytes starting `code` holds.

    `code` may run past the block: QEMU ends a block's bytes where it stopped
    decoding, which is inside an instruction it refused at translation (a
    privileged `mov cr` at CPL 3 faults before its ModRM byte is read). An
    instruction capstone cannot decode counts as one instruction where it starts.
    """
    offsets = []
    end = 0
    for offset, length, _mnemonic, _ops in _decoder().disasm_lite(code, 0):
        if offset >= size:
            break
        offsets.append(offset)
        end = offset + length
    if end < size and (not offsets or offsets[-1] < end):
        offsets.append(end)  # an undecodable instruction ends the block
    return tuple(offsets)


class BlockCounter:
    """The block hook, its table, and the settling of counts inside a block."""

    _entry = 0

    def __init__(self, counter: NativeCounter,
                 read_code: Callable[[int, int], bytes | None]) -> None:
        self.counter = counter
        self.read_code = read_code  # (gva, size) -> the bytes the TLB maps there, or None
        self.table = np.zeros((1 << TABLE_BITS, 2), dtype=np.uint64)
        self.used = 0
        block = counter.block
        block.table = self.table.ctypes.data
        block.mask = (1 << TABLE_BITS) - 1
        self.flush_wanted = False  # a count in doubt: drop every translation
        self.ignore_translations = False
        self._handles: list[int] = []
        self._edge = _EDGE_CFUNC(self._on_translated)
        if not BlockCounter._entry:
            BlockCounter._entry = executable_page(_CODE)

    def install(self, uc) -> None:
        block_hook = add_native_hook(uc, UC_HOOK_BLOCK, self._entry, self.counter.user_data)
        self._handles.append(block_hook)
        fn = ctypes.cast(self._edge, ctypes.c_void_p).value
        self._handles.append(add_native_hook(uc, UC_HOOK_EDGE_GENERATED, fn or 0, 0))

    @property
    def handles(self) -> list[int]:
        return list(self._handles)

    # ------------------------------------------------------------------ table
    def _slot(self, pc: int, size: int) -> int:
        mask = (1 << TABLE_BITS) - 1
        index = ((pc >> 2) ^ (pc >> 17) ^ size) & mask
        table = self.table
        while True:
            entry_size = int(table[index, 1]) & 0xFFFF_FFFF
            if entry_size == 0 or (entry_size == size and int(table[index, 0]) == pc):
                return index
            index = (index + 1) & mask

    def learn(self, pc: int, size: int, count: int) -> None:
        """Record that the block of `size` bytes at `pc` holds `count` instructions."""
        if size == 0 or count == 0:
            return
        index = self._slot(pc, size)
        known = int(self.table[index, 1])
        if known == 0:
            if self.used * 2 >= len(self.table):  # keep probes short: start over
                self.flush_wanted = True
                return
            self.used += 1
            self.table[index, 0] = pc
            self.table[index, 1] = size | count << 32
        elif known >> 32 != count:
            self.table[index, 1] = size | _IN_DOUBT << 32
            self.flush_wanted = True

    def clear(self) -> None:
        self.table[:] = 0
        self.used = 0
        self.flush_wanted = False

    def _on_translated(self, _uc, tb, _prev, _ud) -> None:
        if not self.ignore_translations:
            self.learn(tb[0].pc, tb[0].size, tb[0].icount)

    # ------------------------------------------------------------- settling
    def offsets(self, pc: int, size: int) -> tuple[int, ...] | None:
        """Instruction offsets of the block at `pc` as the TLB maps it now, or None."""
        code = self.read_code(pc, size + MAX_INSTRUCTION) or self.read_code(pc, size)
        if code is None:
            return None
        offsets = instruction_offsets(code, size)
        told = self.count_of(pc, size)
        if told is not None and told != len(offsets):  # capstone and QEMU disagree
            return None
        return offsets

    def count_of(self, pc: int, size: int) -> int | None:
        """The count unicorn told for the block, if the table holds one."""
        entry = self.table[self._slot(pc, size)]
        count = int(entry[1]) >> 32
        return count if int(entry[1]) and count != _IN_DOUBT else None

    def count_through(self, rip: int) -> int | None:
        """The exact count once the instruction at `rip` of the current block has started.

        None when `rip` lies outside the current block (the block ran to its
        end, or the run stopped before a block that never started).
        """
        block = self.counter.block
        pc, size = int(block.block_pc), int(block.block_size)
        if not pc <= rip < pc + size:
            return None
        offsets = self.offsets(pc, size)
        if offsets is None:
            code = self.read_code(pc, size)
            raise RuntimeError(f"cannot decode the block at {pc:#x} ({size} bytes: "
                               f"{code.hex() if code else 'unmapped'}) to count its instructions")
        index = bisect.bisect_left(offsets, rip - pc)
        if index == len(offsets) or offsets[index] != rip - pc:
            raise RuntimeError(f"{rip:#x} is not an instruction boundary of the block at {pc:#x}")
        return int(block.block_base) + index + 1
