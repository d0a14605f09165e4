"""A native instruction counter with a budget, installed as a unicorn code hook.

Unicorn's own `count=` limit already pays one C helper call per instruction
but never tells how many instructions ran when the run stops early (a
hypercall, a fault, `hlt`). Virtual time must advance by exactly the
instructions executed, so we install a hook of our own at the same cost: a few
bytes of x86-64 machine code in an executable page, called by unicorn as
`hook(uc, address, size, user_data)` (System V: user_data arrives in rcx).

    mov rax, [rcx]        ; executed so far
    cmp rax, [rcx+8]      ; budget limit reached?
    jae stop
    inc rax
    mov [rcx], rax
    ret
  stop:
    mov byte [rcx+24], 1  ; remember that the budget, not the guest, ended the run
    jmp [rcx+16]          ; tail-call uc_emu_stop(uc): this instruction does not run

A Python hook in its place would cost ~350 ns per instruction (docs/design.md §2).
"""

from __future__ import annotations

import ctypes
import mmap

from unicorn import UC_HOOK_CODE, UcError
from unicorn.unicorn_py3.unicorn import uclib

_CODE = bytes.fromhex("488b01" "483b4108" "7307" "48ffc0" "488901" "c3" "c6411801" "ff6110")


class _CounterBlock(ctypes.Structure):
    _fields_ = [
        ("executed", ctypes.c_uint64),
        ("limit", ctypes.c_uint64),
        ("stop_fn", ctypes.c_void_p),
        ("stopped", ctypes.c_uint8),
    ]


class NativeCounter:
    """Counts executed instructions of one engine and stops it at a limit."""

    _page: mmap.mmap | None = None
    _entry: int = 0

    def __init__(self) -> None:
        stop_fn = ctypes.cast(uclib.uc_emu_stop, ctypes.c_void_p).value
        self.block = _CounterBlock(0, 0, stop_fn)
        self.entry = self._code_address()

    @classmethod
    def _code_address(cls) -> int:
        if cls._page is None:
            prot = mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC
            page = mmap.mmap(-1, mmap.PAGESIZE, prot=prot)
            page.write(_CODE)
            cls._page = page
            cls._entry = ctypes.addressof(ctypes.c_char.from_buffer(page))
        return cls._entry

    def install(self, uc) -> None:
        """Add the counting hook to engine `uc` (before any code is translated)."""
        handle = ctypes.c_size_t()
        rc = uclib.uc_hook_add(
            uc._uch, ctypes.byref(handle), UC_HOOK_CODE, ctypes.c_void_p(self.entry),
            ctypes.c_void_p(self.user_data), ctypes.c_uint64(1), ctypes.c_uint64(0),
        )
        if rc != 0:
            raise UcError(rc)

    @property
    def user_data(self) -> int:
        return ctypes.addressof(self.block)

    @property
    def executed(self) -> int:
        return int(self.block.executed)

    def set_budget(self, instructions: int) -> None:
        """Allow `instructions` more instructions from now on."""
        self.block.limit = self.block.executed + instructions
        self.block.stopped = 0

    @property
    def budget_ran_out(self) -> bool:
        return bool(self.block.stopped)
