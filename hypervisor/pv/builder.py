"""The PV domain builder: a guest kernel ELF into a bootable PV domain.

It lays out the start-of-day region the way Xen's builder does (docs/pv-abi.md):
the kernel at its link addresses, then the P2M list, start_info, the
shared_info page, the bootstrap page tables (mapped read-only: a page
table must never be writable) and a stack, all mapped through 4-level tables
that hold machine frame numbers.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from emulator.addr import PAGE_SIZE
from emulator.memory import HostMemory
from emulator.paging import ADDR_MASK, RW, A, D, P
from hypervisor.core.elf import KernelImage
from hypervisor.lib.errors import HvlabError

START_INFO_MAGIC = b"xen-3.0-x86_64"
VIRT_BASE_ALIGN = 4 << 20
STACK_PAGES = 4
PADDING = 512 << 10
HYPERCALL_STUB_SIZE = 32
NR_HYPERCALL_STUBS = PAGE_SIZE // HYPERCALL_STUB_SIZE

DATA_FLAGS = P | RW | A | D
PT_FLAGS = P | A  # page-table frames are mapped read-only
TABLE_FLAGS = P | RW | A  # upper-level entries; permission is the AND of levels


@dataclass(frozen=True)
class PvLayout:
    """Where everything of the start-of-day region lives (pfns are region-relative)."""

    virt_base: int
    kernel_pages: int
    p2m_pfn: int
    p2m_pages: int
    start_info_pfn: int
    shared_info_pfn: int  # the domain's own frame serves as its shared_info page
    pt_pfn: int
    nr_pt_frames: int
    stack_pfn: int
    mapped_pages: int  # pages mapped from virt_base, padding included

    def va(self, pfn: int) -> int:
        return self.virt_base + pfn * PAGE_SIZE

    @property
    def stack_top(self) -> int:
        return self.va(self.stack_pfn + STACK_PAGES)


def plan_layout(kernel: KernelImage, nr_pages: int) -> PvLayout:
    virt_base = kernel.low & ~(VIRT_BASE_ALIGN - 1)
    kernel_pages = -(-(kernel.high - virt_base) // PAGE_SIZE)
    p2m_pfn = kernel_pages
    p2m_pages = -(-nr_pages * 8 // PAGE_SIZE)
    start_info_pfn = p2m_pfn + p2m_pages
    shared_info_pfn = start_info_pfn + 1
    pt_pfn = shared_info_pfn + 1
    # the tables map themselves: grow until the count is a fixed point (as Xen does)
    nr_pt = 1
    while True:
        stack_pfn = pt_pfn + nr_pt
        mapped = stack_pfn + STACK_PAGES + PADDING // PAGE_SIZE
        needed = _tables_needed(virt_base, mapped)
        if needed <= nr_pt:
            break
        nr_pt = needed
    return PvLayout(virt_base, kernel_pages, p2m_pfn, p2m_pages, start_info_pfn,
                    shared_info_pfn, pt_pfn, nr_pt, stack_pfn, mapped)


def _tables_needed(virt_base: int, pages: int) -> int:
    end = virt_base + pages * PAGE_SIZE - 1
    n = 1  # the L4
    for shift in (39, 30, 21):  # L3s, L2s, L1s
        n += (end >> shift) - (virt_base >> shift) + 1
    return n


def build_pv_memory(
    memory: HostMemory,
    kernel: KernelImage,
    p2m: np.ndarray,
    domain_name: str,
) -> tuple[PvLayout, int]:
    """Write the kernel, tables, start_info and P2M list into the domain's frames.

    Returns the layout and the machine address of the L4. The shared_info
    page is the domain frame at `layout.shared_info_pfn` (in Xen it is a
    hypervisor page; making it a guest pfn lets saved images carry its
    mapping like any other).
    """
    nr_pages = int(p2m.size)
    layout = plan_layout(kernel, nr_pages)
    if layout.mapped_pages > nr_pages:
        need_kib = layout.mapped_pages * PAGE_SIZE // 1024
        raise HvlabError(
            f"domain {domain_name}: memory too small for the kernel "
            f"({kernel.path.name} needs {need_kib} KiB of start-of-day region, "
            f"the domain has {nr_pages * PAGE_SIZE // 1024} KiB)"
        )
    if "hypercall_page" not in kernel.symbols:
        raise HvlabError(f"kernel {kernel.path}: no symbol 'hypercall_page'")

    def ma_of_va(va: int) -> int:
        return int(p2m[(va - layout.virt_base) // PAGE_SIZE]) * PAGE_SIZE + (va & 0xFFF)

    for seg in kernel.segments:
        _write_virtual(memory, ma_of_va, seg.vaddr, seg.data)
    _write_hypercall_page(memory, ma_of_va(kernel.symbols["hypercall_page"]))
    memory.u8[ma_of_va(layout.va(layout.p2m_pfn)):][: nr_pages * 8] = p2m.view(np.uint8)
    l4_ma = _build_tables(memory, layout, p2m)
    _write_start_info(memory, ma_of_va(layout.va(layout.start_info_pfn)), layout, nr_pages,
                      int(p2m[layout.shared_info_pfn]))
    return layout, l4_ma


def _write_virtual(memory: HostMemory, ma_of_va, va: int, data: bytes) -> None:
    pos = 0
    while pos < len(data):
        chunk = min(len(data) - pos, PAGE_SIZE - ((va + pos) & 0xFFF))
        memory.write(ma_of_va(va + pos), data[pos : pos + chunk])
        pos += chunk


def _write_hypercall_page(memory: HostMemory, page_ma: int) -> None:
    """At 32*N: `mov eax, N; vmcall; ret`, padded with int3."""
    stubs = bytearray(b"\xcc" * PAGE_SIZE)
    for n in range(NR_HYPERCALL_STUBS):
        stub = b"\xb8" + struct.pack("<I", n) + b"\x0f\x01\xc1" + b"\xc3"
        stubs[n * HYPERCALL_STUB_SIZE : n * HYPERCALL_STUB_SIZE + len(stub)] = stub
    memory.write(page_ma, bytes(stubs))


HYPERVISOR_IRET = 23


def xen_hypercall_page() -> bytes:
    """The page Xen writes for a 64-bit PV kernel at ring 3 (pv_ring3_init_hypercall_page):
    int3 everywhere, at 32*N `push rcx; push r11; mov eax, N; syscall; pop r11; pop rcx;
    ret`, and at 32*23 (iret, jumped to, never returns) `push rcx; push r11; push rax;
    mov eax, 23; syscall`: the frame HYPERVISOR_iret reads."""
    page = bytearray(b"\xcc" * PAGE_SIZE)
    for n in range(NR_HYPERCALL_STUBS):
        if n == HYPERVISOR_IRET:
            stub = b"\x51\x41\x53\x50\xb8" + struct.pack("<I", n) + b"\x0f\x05"
        else:
            stub = (b"\x51\x41\x53\xb8" + struct.pack("<I", n) + b"\x0f\x05"
                    + b"\x41\x5b\x59\xc3")
        page[n * HYPERCALL_STUB_SIZE : n * HYPERCALL_STUB_SIZE + len(stub)] = stub
    return bytes(page)


def init_hypercall_page(memory: HostMemory, p2m: np.ndarray, virt_base: int,
                        hypercall_page_va: int) -> None:
    """Xen's hypercall_init for a kernel with a HYPERCALL_PAGE note: the stubs into that page."""
    pfn = (hypercall_page_va - virt_base) // PAGE_SIZE
    memory.write(int(p2m[pfn]) * PAGE_SIZE, xen_hypercall_page())


def _build_tables(memory: HostMemory, layout: PvLayout, p2m: np.ndarray) -> int:
    pt_mfns = [int(p2m[layout.pt_pfn + i]) for i in range(layout.nr_pt_frames)]
    next_table = iter(pt_mfns)
    l4 = next(next_table)
    tables: dict[tuple[int, int], int] = {}  # (level, index-prefix) -> mfn

    def table_for(level: int, va: int) -> int:
        """The mfn of the level-`level` table covering `va`, created on first use."""
        if level == 4:
            return l4
        key = (level, va >> (12 + 9 * level))
        if key not in tables:
            mfn = next(next_table)
            tables[key] = mfn
            parent = table_for(level + 1, va)
            index = (va >> (12 + 9 * level)) & 0x1FF
            memory.frame_u64(parent)[index] = np.uint64((mfn << 12) | TABLE_FLAGS)
        return tables[key]

    pt_range = range(layout.pt_pfn, layout.pt_pfn + layout.nr_pt_frames)
    for pfn in range(layout.mapped_pages):
        va = layout.va(pfn)
        l1 = table_for(1, va)
        flags = PT_FLAGS if pfn in pt_range else DATA_FLAGS
        entry = ((int(p2m[pfn]) << 12) & ADDR_MASK) | flags
        memory.frame_u64(l1)[(va >> 12) & 0x1FF] = np.uint64(entry)
    return l4 * PAGE_SIZE


def _write_start_info(memory: HostMemory, ma: int, layout: PvLayout, nr_pages: int,
                      shared_info_mfn: int) -> None:
    info = bytearray(PAGE_SIZE)
    info[0 : len(START_INFO_MAGIC)] = START_INFO_MAGIC
    struct.pack_into("<QQI", info, 32, nr_pages, shared_info_mfn * PAGE_SIZE, 0)
    struct.pack_into("<QQQQQ", info, 88, layout.va(layout.pt_pfn), layout.nr_pt_frames,
                     layout.va(layout.p2m_pfn), 0, 0)
    memory.write(ma, bytes(info))
