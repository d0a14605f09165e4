"""The HVM domain builder: an ELF kernel into guest-physical memory, ready for 64-bit entry.

An HVM kernel is linked at guest-physical addresses (hvlab's HVM guests at 1 MiB, see
scenarios/guests/hvm_kernel.ld) and its `PT_LOAD` segments are loaded there. After the
image, page aligned, the builder lays out what firmware would leave for a 64-bit kernel:

| what | size |
|---|---|
| `hvm_start_info` (Xen's PVH start-of-day structure, version 1) and its memory map | 1 page |
| GDT: null, 64-bit code 0x08, data 0x10 | 1 page |
| IDT: 256 empty 16-byte gates, loaded in IDTR (limit 0xFFF) for the guest to fill | 1 page |
| page tables: identity map of all RAM (4 KiB pages) and of the LAPIC page | as needed |
| one stack per vCPU | 4 pages each |

Every entry is present and writable, with Accessed and Dirty clear (the MMU sets them as
hardware does). Page tables hold guest-physical addresses; nothing here knows a host
frame except through `gpa_to_ma`.

The memory map (`memmap_paddr`, 24-byte entries {u64 addr, u64 size, u32 type, u32 0}):
RAM below the kernel, the kernel and builder region as reserved (type 2), RAM from the
end of the region to the end of memory (type 1), and the LAPIC page (reserved).

If the kernel has a `hypercall_page` symbol the builder fills that page with the same
stubs as for PV guests (`mov eax, N; vmcall; ret` at 32*N). Xen writes it when an HVM
guest writes the hypercall MSR; unicorn cannot trap `wrmsr`, so hvlab does it up front.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from emulator.addr import PAGE_SHIFT, PAGE_SIZE
from emulator.memory import HostMemory
from emulator.paging import RW, P
from hypervisor.core.elf import KernelImage
from hypervisor.lib.errors import HvlabError

HVM_START_MAGIC = 0x336EC578
HVM_START_INFO_VERSION = 1
MEMMAP_OFFSET = 64  # memory map entries follow the 56-byte hvm_start_info
MEMMAP_ENTRY = struct.Struct("<QQII")
E820_RAM, E820_RESERVED = 1, 2

LAPIC_GPA = 0xFEE0_0000
MAX_HVM_MEMORY = 3 << 30  # guest RAM stays below the MMIO hole under 4 GiB
STACK_PAGES = 4
KERNEL_CS, KERNEL_DS = 0x08, 0x10
GDT = struct.pack("<QQQ", 0, 0x00AF_9A00_0000_FFFF, 0x00CF_9200_0000_FFFF)
IDT_LIMIT = 256 * 16 - 1
PTE_FLAGS = P | RW  # A and D clear: the walker sets them
PCD_PWT = 0x18  # the LAPIC page is uncacheable
HYPERCALL_STUB_SIZE = 32
ADDR_MASK = 0x000F_FFFF_FFFF_F000

GpaToMa = Callable[[int], int | None]


@dataclass(frozen=True)
class HvmLayout:
    """Where the builder put everything, in guest-physical addresses."""

    nr_pages: int
    nr_vcpus: int
    kernel_start: int  # page-aligned start of the lowest segment
    region_start: int  # first page after the image: start_info
    gdt: int
    idt: int
    page_tables: int  # the L4; the other tables follow it
    nr_pt_pages: int
    stacks: int
    region_end: int  # first page after the last stack

    @property
    def start_info(self) -> int:
        return self.region_start

    @property
    def ram_end(self) -> int:
        return self.nr_pages << PAGE_SHIFT

    def stack_top(self, vcpu_id: int) -> int:
        return self.stacks + (vcpu_id + 1) * STACK_PAGES * PAGE_SIZE

    @property
    def builder_gfns(self) -> range:
        """Gfns the builder writes (the image and its region): backed before the guest runs."""
        return range(self.kernel_start >> PAGE_SHIFT, self.region_end >> PAGE_SHIFT)


def _page_up(n: int) -> int:
    return (n + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


def _nr_page_tables(ram_bytes: int) -> int:
    """L4 + L3 + one L2 per GiB + one L1 per 2 MiB of RAM + an L2 and an L1 for the LAPIC."""
    return 2 + -(-ram_bytes // (1 << 30)) + -(-ram_bytes // (1 << 21)) + 2


def plan_hvm_layout(kernel: KernelImage, nr_pages: int, nr_vcpus: int,
                    domain: str) -> HvmLayout:
    """Check that the kernel fits the domain's guest-physical memory and place the rest."""
    ram = nr_pages << PAGE_SHIFT
    if ram > MAX_HVM_MEMORY:
        raise HvlabError(f"domain {domain}: HVM memory is at most {MAX_HVM_MEMORY >> 30} GiB "
                         f"(RAM stays below the MMIO hole), got {ram >> 20} MiB")
    for seg in kernel.segments:
        if seg.vaddr < PAGE_SIZE or seg.vaddr + seg.memsz > ram:
            raise HvlabError(
                f"domain {domain}: kernel {kernel.path.name} is linked at "
                f"{seg.vaddr:#x}-{seg.vaddr + seg.memsz:#x}, outside the domain's "
                f"guest-physical memory {PAGE_SIZE:#x}-{ram:#x} (HVM kernels load at "
                "their link addresses)")
    if not any(s.vaddr <= kernel.entry < s.vaddr + s.memsz for s in kernel.segments):
        raise HvlabError(f"domain {domain}: kernel {kernel.path.name} entry "
                         f"{kernel.entry:#x} is not inside a loadable segment")
    region = _page_up(kernel.high)
    gdt = region + PAGE_SIZE
    idt = gdt + PAGE_SIZE
    page_tables = idt + PAGE_SIZE
    nr_pt = _nr_page_tables(ram)
    stacks = page_tables + nr_pt * PAGE_SIZE
    end = stacks + nr_vcpus * STACK_PAGES * PAGE_SIZE
    if end > ram:
        raise HvlabError(
            f"domain {domain}: memory too small for the kernel ({kernel.path.name} and "
            f"its start-of-day region end at {end:#x}, the domain has {ram >> 10} KiB)")
    return HvmLayout(nr_pages, nr_vcpus, kernel.low & ~(PAGE_SIZE - 1), region, gdt, idt,
                     page_tables, nr_pt, stacks, end)


def build_hvm_memory(memory: HostMemory, kernel: KernelImage, layout: HvmLayout,
                     gpa_to_ma: GpaToMa) -> None:
    """Write the kernel, tables, GDT, IDT, stacks and start info into guest memory."""
    writer = _GuestWriter(memory, gpa_to_ma)
    for gfn in layout.builder_gfns:
        writer.zero_page(gfn << PAGE_SHIFT)
    for seg in kernel.segments:
        writer.write(seg.vaddr, seg.data)
    if "hypercall_page" in kernel.symbols:
        writer.write(kernel.symbols["hypercall_page"], _hypercall_stubs())
    writer.write(layout.gdt, GDT)
    _build_page_tables(writer, layout)
    writer.write(layout.start_info, _start_info(layout, kernel))


def _hypercall_stubs() -> bytes:
    stubs = bytearray(b"\xcc" * PAGE_SIZE)
    for n in range(PAGE_SIZE // HYPERCALL_STUB_SIZE):
        stub = b"\xb8" + struct.pack("<I", n) + b"\x0f\x01\xc1\xc3"
        stubs[n * HYPERCALL_STUB_SIZE:n * HYPERCALL_STUB_SIZE + len(stub)] = stub
    return bytes(stubs)


def _start_info(layout: HvmLayout, kernel: KernelImage) -> bytes:
    entries = []
    if layout.kernel_start > 0:
        entries.append((0, layout.kernel_start, E820_RAM))
    entries.append((layout.kernel_start, layout.region_end - layout.kernel_start, E820_RESERVED))
    if layout.region_end < layout.ram_end:
        entries.append((layout.region_end, layout.ram_end - layout.region_end, E820_RAM))
    entries.append((LAPIC_GPA, PAGE_SIZE, E820_RESERVED))
    head = struct.pack("<IIIIQQQQII", HVM_START_MAGIC, HVM_START_INFO_VERSION, 0, 0, 0, 0, 0,
                       layout.start_info + MEMMAP_OFFSET, len(entries), 0)
    body = b"".join(MEMMAP_ENTRY.pack(addr, size, kind, 0) for addr, size, kind in entries)
    return head.ljust(MEMMAP_OFFSET, b"\0") + body


def _build_page_tables(writer: _GuestWriter, layout: HvmLayout) -> None:
    """Identity map of RAM (4 KiB pages) and of the LAPIC page, in guest-physical terms."""
    ram = layout.ram_end
    n_l2 = -(-ram // (1 << 30))
    n_l1 = -(-ram // (1 << 21))
    l4 = layout.page_tables
    l3 = l4 + PAGE_SIZE
    l2s = l3 + PAGE_SIZE
    l1s = l2s + n_l2 * PAGE_SIZE
    apic_l2 = l1s + n_l1 * PAGE_SIZE
    apic_l1 = apic_l2 + PAGE_SIZE
    writer.write_u64s(l4, np.array([l3 | PTE_FLAGS], dtype=np.uint64))
    l3_entries = np.zeros(512, dtype=np.uint64)
    l3_entries[:n_l2] = np.arange(n_l2, dtype=np.uint64) * PAGE_SIZE + (l2s | PTE_FLAGS)
    l3_entries[LAPIC_GPA >> 30] = apic_l2 | PTE_FLAGS
    writer.write_u64s(l3, l3_entries)
    l1_gpas = np.arange(n_l1, dtype=np.uint64) * PAGE_SIZE + np.uint64(l1s | PTE_FLAGS)
    for i in range(n_l2):
        writer.write_u64s(l2s + i * PAGE_SIZE, l1_gpas[i * 512:(i + 1) * 512])
    nr_pages = layout.nr_pages
    for i in range(n_l1):
        first = i * 512
        count = min(512, nr_pages - first)
        entries = (np.arange(first, first + count, dtype=np.uint64) << np.uint64(PAGE_SHIFT))
        writer.write_u64s(l1s + i * PAGE_SIZE, entries | np.uint64(PTE_FLAGS))
    writer.write_u64s(apic_l2 + 8 * ((LAPIC_GPA >> 21) & 511),
                      np.array([apic_l1 | PTE_FLAGS], dtype=np.uint64))
    writer.write_u64s(apic_l1 + 8 * ((LAPIC_GPA >> 12) & 511),
                      np.array([LAPIC_GPA | PTE_FLAGS | PCD_PWT], dtype=np.uint64))


class _GuestWriter:
    """Writes into guest-physical memory through the domain's P2M."""

    def __init__(self, memory: HostMemory, gpa_to_ma: GpaToMa) -> None:
        self.memory = memory
        self.gpa_to_ma = gpa_to_ma

    def _ma(self, gpa: int) -> int:
        ma = self.gpa_to_ma(gpa)
        if ma is None:  # the builder only writes gfns it asked to be backed
            raise HvlabError(f"HVM builder: guest-physical {gpa:#x} has no backing frame")
        return ma

    def zero_page(self, gpa: int) -> None:
        ma = self._ma(gpa)
        self.memory.u8[ma:ma + PAGE_SIZE] = 0

    def write(self, gpa: int, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            chunk = min(len(data) - pos, PAGE_SIZE - ((gpa + pos) & 0xFFF))
            self.memory.write(self._ma(gpa + pos), data[pos:pos + chunk])
            pos += chunk

    def write_u64s(self, gpa: int, values: np.ndarray) -> None:
        """Consecutive u64s within one page."""
        ma = self._ma(gpa)
        self.memory.u64[ma >> 3:(ma >> 3) + values.size] = values
