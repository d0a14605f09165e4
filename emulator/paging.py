"""The x86-64 4-level page walker, as the hardware does it.

The walker reads tables from host memory by *machine* address: a PV guest's
tables hold machine frame numbers, so `table_frame_to_ma` is the identity; a
two-stage (HVM) walk passes a function that sends every table access through
EPT first. Accessed and Dirty bits are set in the entries as hardware would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

P, RW, US, PWT, PCD, A, D, PSE, G = (1 << i for i in range(9))
PRESENT, ACCESSED, DIRTY = P, A, D
NX = 1 << 63
ADDR_MASK = 0x000F_FFFF_FFFF_F000

# Page-fault error code bits.
PF_PRESENT, PF_WRITE, PF_USER, PF_RSVD, PF_FETCH = 1, 2, 4, 8, 16


@dataclass(frozen=True)
class WalkFault:
    """Why a walk failed: what a #PF reports (CR2 and the error code)."""

    gva: int
    error_code: int
    level: int  # the level (4..1) at which the walk stopped


@dataclass(frozen=True)
class Translation:
    ma: int  # machine address of the 4 KiB page
    writable: bool
    executable: bool
    dirty: bool  # the leaf's D bit: a read fill may grant write only once it is set
    # machine addresses of the entries used, top level first (for tracing/tests)
    entry_mas: tuple[int, ...]


def canonical(gva: int) -> bool:
    top = gva >> 47
    return top == 0 or top == 0x1FFFF


def walk(
    mem_u64: np.ndarray,
    root_ma: int,
    gva: int,
    access: str,
    table_to_ma: Callable[[int], int | None] | None = None,
    set_accessed: bool = True,
) -> Translation | WalkFault:
    """Translate `gva` through the tree at `root_ma` for `access` (read/write/fetch).

    `table_to_ma(address_from_entry)` maps an address found in an entry to
    the machine address of the next table or page (identity for PV; EPT for
    HVM); None there is reported as a fault at that level with PF_RSVD clear
    so the caller can tell it from a guest fault by its own bookkeeping.
    """
    write = access == "write"
    fetch = access == "fetch"
    if not canonical(gva):
        return WalkFault(gva, 0, 4)
    table_ma = root_ma
    writable = True
    executable = True
    used: list[int] = []
    for level in (4, 3, 2, 1):
        index = (gva >> (12 + 9 * (level - 1))) & 0x1FF
        entry_ma = table_ma + 8 * index
        entry = int(mem_u64[entry_ma >> 3])
        used.append(entry_ma)
        if not entry & P:
            return WalkFault(gva, _error_code(False, write, fetch), level)
        writable = writable and bool(entry & RW)
        executable = executable and not entry & NX
        large = level in (3, 2) and entry & PSE
        if large:
            # Guests in hvlab map 4 KiB pages only at the walker level; a PSE
            # entry is a reserved-bit fault here (PV forbids it; HVM kernels
            # of hvlab do not use it).
            return WalkFault(gva, _error_code(True, write, fetch) | PF_RSVD, level)
        if set_accessed and not entry & A:
            entry |= A
            mem_u64[entry_ma >> 3] = entry
        next_addr = entry & ADDR_MASK
        if table_to_ma is not None:
            mapped = table_to_ma(next_addr)
            if mapped is None:
                return WalkFault(gva, _error_code(True, write, fetch), level)
            next_addr = mapped
        table_ma = next_addr
    if (write and not writable) or (fetch and not executable):
        return WalkFault(gva, _error_code(True, write, fetch), 1)
    leaf_ma = used[-1]
    leaf = int(mem_u64[leaf_ma >> 3])
    if write and set_accessed and not leaf & D:
        leaf |= D
        mem_u64[leaf_ma >> 3] = leaf
    return Translation(table_ma, writable, executable, bool(leaf & D), tuple(used))


def _error_code(present: bool, write: bool, fetch: bool) -> int:
    return (PF_PRESENT if present else 0) | (PF_WRITE if write else 0) | (PF_FETCH if fetch else 0)


def walk_direct(mem: memoryview, root_ma: int, gva: int, access: str) -> Translation | WalkFault:
    """`walk` for one-stage tables of machine addresses, over a memoryview of u64.

    The same answer and the same A/D updates as `walk(..., table_to_ma=None)`;
    a memoryview hands out Python ints several times faster than numpy
    indexing, and the TLB-fill path of a CPL-3 PV guest runs this a million
    times per boot (it takes `fill_direct`, which skips building the result).
    """
    used: list[int] = []
    result = fill_direct(mem, root_ma, gva, access, used)
    if isinstance(result, WalkFault):
        return result
    ma, writable, executable, dirty = result
    return Translation(ma, writable, executable, dirty, tuple(used))


def fill_direct(mem: memoryview, root_ma: int, gva: int, access: str,
                used: list[int] | None = None) -> tuple[int, bool, bool, bool] | WalkFault:
    """`walk_direct`'s work: (page ma, writable, executable, dirty) or the fault;
    the entries' machine addresses are appended to `used` when given."""
    write = access == "write"
    fetch = access == "fetch"
    if not canonical(gva):
        return WalkFault(gva, 0, 4)
    table_ma = root_ma
    writable = executable = True
    slot = 0
    for shift in (39, 30, 21, 12):
        slot = (table_ma >> 3) + ((gva >> shift) & 0x1FF)
        entry = mem[slot]
        if used is not None:
            used.append(slot << 3)
        if not entry & P:
            return WalkFault(gva, _error_code(False, write, fetch), (shift - 3) // 9)
        if not entry & RW:
            writable = False
        if entry & NX:
            executable = False
        if shift in (30, 21) and entry & PSE:
            return WalkFault(gva, _error_code(True, write, fetch) | PF_RSVD, (shift - 3) // 9)
        if not entry & A:
            entry |= A
            mem[slot] = entry
        table_ma = entry & ADDR_MASK
    if (write and not writable) or (fetch and not executable):
        return WalkFault(gva, _error_code(True, write, fetch), 1)
    if write and not entry & D:
        entry |= D
        mem[slot] = entry
    return table_ma, writable, executable, bool(entry & D)
