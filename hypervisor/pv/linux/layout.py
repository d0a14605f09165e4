"""Xen's start-of-day layout for a 64-bit PV kernel, and building it in hvlab memory.

`plan_start_of_day` computes what Xen's domain builder (xg_dom_core.c
`xc_dom_build_image`, xg_dom_x86.c) computes. pfns count from VIRT_BASE
(pfn 0); each region is allocated after the previous one:

1. the kernel at its load address (pfns below it are plain RAM the tables map);
2. a mapped initrd, only when the kernel lacks MOD_START_PFN;
3. the p2m list, only when INIT_P2M is absent or unusable (mapped after the kernel);
4. start_info, xenstore and console pages;
5. the page tables: one L4, then the L3s, L2s and L1s covering [VIRT_BASE, end],
   where end is rounded up to 4 MiB and must also hold the tables, 512 KiB of
   padding and the boot stack (iterated until the count is a fixed point);
6. the boot stack; then padding up to virt_pgtab_end;
7. the initrd, unmapped (SIF_MOD_START_PFN: mod_start is a pfn);
8. the p2m list mapped at INIT_P2M, followed by its own L3/L2/L1 tables.

Initial L1 entries are P|RW|A, read-only for page-table frames; upper entries
P|RW|A|D|U. `build_start_of_day` writes all this into frames from hvlab's
frame allocator and pins the L4 through hvlab's typing rules (hypervisor.mm).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

from emulator.memory import HostMemory
from hypervisor.core.frames import FrameAllocator
from hypervisor.lib.errors import HvlabError
from hypervisor.mm.errors import ERESTART
from hypervisor.mm.frametable import FrameTable
from hypervisor.mm.pte import (
    PTE_ACCESSED,
    PTE_DIRTY,
    PTE_GLOBAL,
    PTE_PRESENT,
    PTE_RW,
    PTE_USER,
    make_pte,
)
from hypervisor.mm.typerefs import PageTyping
from hypervisor.pv.linux.xen_notes import PAGE_SIZE, KernelLoadPlan

PAGE_SHIFT = 12
LEVELS = 4
VADDR_MASK = (1 << 48) - 1  # x86-64 builder works on 48-bit virtual addresses
PADDING_PAGES = (512 << 10) // PAGE_SIZE
ALIGN_4M = (1 << 22) - 1
L1_PROT = PTE_PRESENT | PTE_RW | PTE_ACCESSED
UPPER_PROT = PTE_PRESENT | PTE_RW | PTE_ACCESSED | PTE_DIRTY | PTE_USER
PTE_GUEST_KERNEL = 1 << 52  # Xen's _PAGE_GUEST_KERNEL (a software bit)

START_INFO_MAGIC = b"xen-3.0-x86_64"
SIF_MOD_START_PFN = 1 << 3
MAX_GUEST_CMDLINE = 1024

# start_info_t (public/xen.h), 64-bit offsets
START_INFO_OFFSETS = {
    "magic": 0, "nr_pages": 32, "shared_info": 40, "flags": 48, "store_mfn": 56,
    "store_evtchn": 64, "console_mfn": 72, "console_evtchn": 80, "pt_base": 88,
    "nr_pt_frames": 96, "mfn_list": 104, "mod_start": 112, "mod_len": 120, "cmd_line": 128,
    "first_p2m_pfn": 1152, "nr_p2m_frames": 1160,
}

# arch-x86/xen-x86_64.h flat selectors (the guest kernel runs in ring 3)
FLAT_KERNEL_CS64 = 0xE033
FLAT_KERNEL_SS64 = 0xE02B
FLAT_KERNEL_DS64 = 0
VGCF_IN_KERNEL = 1 << 2
VGCF_ONLINE = 1 << 5
DR6_DEFAULT = 0xFFFF0FF0
DR7_DEFAULT = 0x400
RFLAGS_IF = 1 << 9

XEN_LEGACY_MAX_VCPUS = 32
VCPU_INFO_SIZE = 64
VCPU_INFO_UPCALL_MASK = 1


class LayoutError(HvlabError):
    """The domain is too small for the kernel's start-of-day region."""


class StartOfDayError(Exception):
    """hvlab built initial tables its own typing rules refuse (a bug in hvlab, not the input)."""


@dataclass(frozen=True)
class LevelTables:
    """The tables of one paging level that one mapping needs (count 0: shared or none)."""

    va_from: int  # 48-bit, inclusive
    va_to: int  # inclusive
    pfn: int  # first table's pfn
    count: int


@dataclass(frozen=True)
class Mapping:
    """One initial mapping: virtual [area_from, area_to] -> pfns from area_pfn, and its tables."""

    area_from: int
    area_to: int
    area_pfn: int
    levels: tuple[LevelTables, ...]  # index 0 = L1 .. 3 = L4
    nr_tables: int

    @property
    def first_table_pfn(self) -> int:
        return self.levels[LEVELS - 1].pfn


def _count_tables(mappings: list[Mapping], va_from: int, va_to: int, table_pfn: int,
                  area_pfn: int) -> Mapping:
    """Tables a new mapping needs, skipping ranges earlier mappings' tables already cover."""
    area_from, area_to = va_from & VADDR_MASK, va_to & VADDR_MASK
    levels: list[LevelTables | None] = [None] * LEVELS
    total = 0
    for level in range(LEVELS - 1, -1, -1):
        pfn = table_pfn + total
        if level == LEVELS - 1:  # the L4: one, in the first mapping only
            if not mappings:
                levels[level] = LevelTables(0, VADDR_MASK, pfn, 1)
                total += 1
            else:
                levels[level] = LevelTables(0, 0, pfn, 0)
            continue
        bits = PAGE_SHIFT + (level + 1) * 9
        mask = (1 << bits) - 1
        lo, hi = area_from & ~mask, area_to | mask
        for other in mappings:
            theirs = other.levels[level]
            if theirs.va_from == theirs.va_to:
                continue
            if lo >= theirs.va_from and hi <= theirs.va_to:
                lo = hi = 0
                break
            if theirs.va_from <= lo <= theirs.va_to:
                lo = theirs.va_to + 1
            if theirs.va_from <= hi <= theirs.va_to:
                hi = theirs.va_from - 1
        count = ((hi - lo) >> bits) + 1 if lo < hi else 0
        levels[level] = LevelTables(lo, hi, pfn, count)
        total += count
    return Mapping(area_from, area_to, area_pfn, tuple(lv for lv in levels if lv), total)


@dataclass(frozen=True)
class StartOfDay:
    """Every pfn and virtual address of a 64-bit PV domain's start of day."""

    nr_pages: int
    virt_base: int
    entry: int
    kernel_pfn: int
    kernel_pages: int
    initrd_pfn: int | None
    initrd_pages: int
    initrd_mapped: bool
    start_info_pfn: int
    xenstore_pfn: int
    console_pfn: int
    pt_pfn: int
    nr_pt_frames: int  # the first mapping's tables (start_info.nr_pt_frames)
    bootstack_pfn: int
    virt_pgtab_end: int  # virtual end of the initial mapping (exclusive)
    p2m_pfn: int
    p2m_list_pages: int
    p2m_pages: int  # list + its own tables when mapped at INIT_P2M
    p2m_vaddr: int
    p2m_at_init_p2m: bool
    mappings: tuple[Mapping, ...]
    pfn_alloc_end: int

    def va(self, pfn: int) -> int:
        return self.virt_base + pfn * PAGE_SIZE

    @property
    def flags(self) -> int:
        return SIF_MOD_START_PFN if self.initrd_pfn is not None and not self.initrd_mapped else 0

    @property
    def mapped_pages(self) -> int:
        return (self.virt_pgtab_end - self.virt_base) // PAGE_SIZE

    def table_pfns(self) -> list[int]:
        return [pfn for m in self.mappings for pfn in range(m.first_table_pfn,
                                                             m.first_table_pfn + m.nr_tables)]


class _Allocator:
    """xc_dom_alloc_segment's bookkeeping: pfns and virtual addresses, lowest first."""

    def __init__(self, virt_base: int, nr_pages: int) -> None:
        self.virt_base = virt_base
        self.nr_pages = nr_pages
        self.virt_end = virt_base
        self.pfn_end = 0

    def segment(self, what: str, size: int, start: int | None = None) -> tuple[int, int]:
        """(pfn, pages) of a new segment at `start` (default: the next free address)."""
        start = self.virt_end if start is None else start
        if start < self.virt_end:
            raise LayoutError(f"start of day: {what} at {start:#x} overlaps the region before it")
        pages = -(-size // PAGE_SIZE)
        pfn = (start - self.virt_base) // PAGE_SIZE
        if pfn + pages > self.nr_pages:
            raise LayoutError(f"start of day: {what} needs pfns up to {pfn + pages:#x}, the "
                              f"domain has {self.nr_pages:#x} pages "
                              f"({self.nr_pages * PAGE_SIZE >> 20} MiB)")
        self.pfn_end = pfn + pages
        self.virt_end = start + pages * PAGE_SIZE
        return pfn, pages

    def page(self, what: str) -> int:
        return self.segment(what, PAGE_SIZE)[0]


def _p2m_base_usable(plan: KernelLoadPlan) -> bool:
    base = plan.notes.init_p2m
    return base is not None and base < plan.virt_base and not base & (PAGE_SIZE - 1)


def plan_start_of_day(plan: KernelLoadPlan, nr_pages: int, initrd_size: int = 0) -> StartOfDay:
    """Xen's 64-bit PV layout for `plan` in a domain of `nr_pages` pages."""
    alloc = _Allocator(plan.virt_base, nr_pages)
    kernel_pfn, kernel_pages = alloc.segment("the kernel", plan.virt_kend - plan.virt_kstart,
                                             plan.virt_kstart)
    unmapped_initrd = plan.notes.mod_start_pfn is not None and plan.notes.mod_start_pfn != 0
    initrd_pfn, initrd_pages = None, 0
    if initrd_size and not unmapped_initrd:
        initrd_pfn, initrd_pages = alloc.segment("the initrd", initrd_size)
    p2m_list_size = -(-nr_pages * 8 // PAGE_SIZE) * PAGE_SIZE
    at_init_p2m = _p2m_base_usable(plan)
    mappings: list[Mapping] = []
    p2m_pfn = p2m_pages = 0
    if not at_init_p2m:
        p2m_pfn, p2m_pages = alloc.segment("the p2m list", p2m_list_size)
    start_info_pfn = alloc.page("start_info")
    xenstore_pfn = alloc.page("the xenstore page")
    console_pfn = alloc.page("the console page")

    extra = 1 + PADDING_PAGES  # boot stack + padding
    pages = extra
    while True:
        try_end = (alloc.virt_end + pages * PAGE_SIZE) | ALIGN_4M  # inclusive, 4 MiB aligned
        if ((try_end - plan.virt_base) >> PAGE_SHIFT) >= nr_pages:
            raise LayoutError(f"start of day: the initial mapping up to {try_end + 1:#x} needs "
                              f"more than the domain's {nr_pages:#x} pages "
                              f"({nr_pages * PAGE_SIZE >> 20} MiB)")
        first = _count_tables(mappings, plan.virt_base, try_end, alloc.pfn_end, 0)
        pages = first.nr_tables + extra
        if alloc.virt_end + pages * PAGE_SIZE <= try_end + 1:
            break
    mappings.append(first)
    virt_pgtab_end = try_end + 1
    pt_pfn, _ = alloc.segment("the page tables", first.nr_tables * PAGE_SIZE)
    bootstack_pfn = alloc.page("the boot stack")
    if alloc.virt_end < virt_pgtab_end:
        alloc.segment("padding", virt_pgtab_end - alloc.virt_end)
    if initrd_size and unmapped_initrd:
        initrd_pfn, initrd_pages = alloc.segment("the initrd", initrd_size)
    p2m_vaddr = plan.virt_base + p2m_pfn * PAGE_SIZE
    p2m_list_pages = p2m_list_size // PAGE_SIZE
    if at_init_p2m:
        assert plan.notes.init_p2m is not None
        p2m_vaddr = plan.notes.init_p2m
        start = alloc.pfn_end
        second = _count_tables(mappings, p2m_vaddr, p2m_vaddr + p2m_list_size - 1,
                               start + p2m_list_pages, start)
        mappings.append(second)
        p2m_pfn, p2m_pages = alloc.segment("the p2m list",
                                           p2m_list_size + second.nr_tables * PAGE_SIZE)
    return StartOfDay(
        nr_pages=nr_pages, virt_base=plan.virt_base, entry=plan.virt_entry,
        kernel_pfn=kernel_pfn, kernel_pages=kernel_pages, initrd_pfn=initrd_pfn,
        initrd_pages=initrd_pages, initrd_mapped=not unmapped_initrd,
        start_info_pfn=start_info_pfn, xenstore_pfn=xenstore_pfn, console_pfn=console_pfn,
        pt_pfn=pt_pfn, nr_pt_frames=first.nr_tables, bootstack_pfn=bootstack_pfn,
        virt_pgtab_end=virt_pgtab_end,
        p2m_pfn=p2m_pfn, p2m_list_pages=p2m_list_pages, p2m_pages=p2m_pages,
        p2m_vaddr=p2m_vaddr, p2m_at_init_p2m=at_init_p2m, mappings=tuple(mappings),
        pfn_alloc_end=alloc.pfn_end,
    )


def _l1_prot(layout: StartOfDay, pfn: int) -> int:
    for m in layout.mappings:
        if m.first_table_pfn <= pfn < m.first_table_pfn + m.nr_tables:
            return L1_PROT & ~PTE_RW  # a page table is never writable
    return L1_PROT


def initial_page_tables(layout: StartOfDay, p2m: np.ndarray) -> dict[int, np.ndarray]:
    """pfn -> the 512 entries of every initial page table (setup_pgtables_pv), machine frames."""
    tables = {pfn: np.zeros(512, dtype=np.uint64) for pfn in layout.table_pfns()}
    for level in range(LEVELS - 1, -1, -1):
        shift = PAGE_SHIFT + level * 9
        for owner in layout.mappings:
            mine = owner.levels[level]
            if mine.count == 0:
                continue
            for target in layout.mappings:
                if level > 0:
                    lower = target.levels[level - 1]
                    if lower.count == 0:
                        continue
                    lo, hi, pfn0 = lower.va_from, lower.va_to, lower.pfn
                else:
                    lo, hi, pfn0 = target.area_from, target.area_to, target.area_pfn
                if lo >= mine.va_to or hi <= mine.va_from:
                    continue
                first = (max(mine.va_from, lo) - mine.va_from) >> shift
                last = (min(mine.va_to, hi) - mine.va_from) >> shift
                pfn = ((max(mine.va_from, lo) - lo) >> shift) + pfn0
                for index in range(first, last + 1):
                    prot = _l1_prot(layout, pfn) if level == 0 else UPPER_PROT
                    table = mine.pfn + index // 512
                    tables[table][index % 512] = make_pte(int(p2m[pfn]), prot)
                    pfn += 1
    return tables


def adjust_guest_entry(level: int, entry: int) -> int:
    """A 64-bit PV guest's entry as Xen's validation rewrites it (pv/mm.h adjust_guest_lNe)."""
    if not entry & PTE_PRESENT:
        return entry
    if level == 1:
        if not entry & PTE_USER:
            entry |= PTE_GUEST_KERNEL | PTE_USER
        if not entry & PTE_GUEST_KERNEL:
            entry |= PTE_GLOBAL | PTE_USER
        return entry
    if level == 4:
        return entry | PTE_ACCESSED | PTE_USER
    return entry | PTE_USER


def table_levels(layout: StartOfDay) -> dict[int, int]:
    """pfn -> paging level (1..4) of every initial page table."""
    return {lv.pfn + i: index + 1 for m in layout.mappings
            for index, lv in enumerate(m.levels) for i in range(lv.count)}


@dataclass(frozen=True)
class VcpuRegisters:
    """vCPU 0's initial context (xg_dom_x86.c vcpu_x86_64)."""

    rip: int
    rsp: int
    rsi: int
    rflags: int
    cs: int
    ss: int
    ds: int
    es: int
    fs: int
    gs: int
    kernel_ss: int
    kernel_sp: int
    cr3: int  # machine address of the L4
    dr6: int
    dr7: int
    flags: int


def initial_registers(layout: StartOfDay, l4_mfn: int) -> VcpuRegisters:
    rsp = layout.va(layout.bootstack_pfn + 1)
    return VcpuRegisters(
        rip=layout.entry, rsp=rsp, rsi=layout.va(layout.start_info_pfn), rflags=RFLAGS_IF,
        cs=FLAT_KERNEL_CS64, ss=FLAT_KERNEL_SS64, ds=FLAT_KERNEL_DS64, es=FLAT_KERNEL_DS64,
        fs=FLAT_KERNEL_DS64, gs=FLAT_KERNEL_DS64, kernel_ss=FLAT_KERNEL_SS64, kernel_sp=rsp,
        cr3=l4_mfn << PAGE_SHIFT, dr6=DR6_DEFAULT, dr7=DR7_DEFAULT,
        flags=VGCF_IN_KERNEL | VGCF_ONLINE,
    )


def start_info_values(layout: StartOfDay, p2m: np.ndarray, shared_info_ma: int,
                      store_evtchn: int, console_evtchn: int) -> dict[str, int]:
    """start_info_t's numeric fields (start_info_x86_64)."""
    values = {
        "nr_pages": layout.nr_pages,
        "shared_info": shared_info_ma,
        "flags": layout.flags,
        "store_mfn": int(p2m[layout.xenstore_pfn]),
        "store_evtchn": store_evtchn,
        "console_mfn": int(p2m[layout.console_pfn]),
        "console_evtchn": console_evtchn,
        "pt_base": layout.va(layout.pt_pfn),
        "nr_pt_frames": layout.nr_pt_frames,
        "mfn_list": layout.p2m_vaddr,
        "mod_start": 0,
        "mod_len": 0,
        "first_p2m_pfn": layout.p2m_pfn if layout.p2m_at_init_p2m else 0,
        "nr_p2m_frames": layout.p2m_pages if layout.p2m_at_init_p2m else 0,
    }
    if layout.initrd_pfn is not None:
        values["mod_start"] = (layout.va(layout.initrd_pfn) if layout.initrd_mapped
                               else layout.initrd_pfn)
        values["mod_len"] = layout.initrd_pages * PAGE_SIZE
    return values


def start_info_bytes(values: dict[str, int], cmdline: str) -> bytes:
    page = bytearray(PAGE_SIZE)
    page[:len(START_INFO_MAGIC)] = START_INFO_MAGIC
    for name, value in values.items():
        width = 4 if name.endswith("evtchn") else 8
        struct.pack_into("<I" if width == 4 else "<Q", page, START_INFO_OFFSETS[name], value)
    encoded = cmdline.encode()[:MAX_GUEST_CMDLINE - 1]
    at = START_INFO_OFFSETS["cmd_line"]
    page[at:at + len(encoded)] = encoded
    return bytes(page)


def init_shared_info(page: np.ndarray) -> None:
    """Xen's shared_info as the builder leaves it: zero, every vCPU's upcall mask set."""
    page[:] = 0
    for vcpu in range(XEN_LEGACY_MAX_VCPUS):
        page[vcpu * VCPU_INFO_SIZE + VCPU_INFO_UPCALL_MASK] = 1


@dataclass
class BuiltStartOfDay:
    layout: StartOfDay
    p2m: np.ndarray  # pfn -> mfn
    l4_mfn: int
    registers: VcpuRegisters
    start_info: dict[str, int] = field(default_factory=dict)


def _write_pfns(memory: HostMemory, p2m: np.ndarray, first_pfn: int, data: bytes) -> None:
    view = np.frombuffer(data, dtype=np.uint8)
    for offset in range(0, len(view), PAGE_SIZE):
        mfn = int(p2m[first_pfn + offset // PAGE_SIZE])
        chunk = view[offset:offset + PAGE_SIZE]
        memory.frame_u8(mfn)[:len(chunk)] = chunk


def build_start_of_day(memory: HostMemory, allocator: FrameAllocator, frames: FrameTable,
                       typing: PageTyping, domid: int, plan: KernelLoadPlan, nr_pages: int,
                       initrd: bytes, cmdline: str, shared_info_ma: int,
                       store_evtchn: int = 0, console_evtchn: int = 0,
                       p2m: np.ndarray | None = None) -> BuiltStartOfDay:
    """Give the domain `nr_pages` frames (or `p2m`'s, allocated by the caller), lay out its
    start of day in them and pin its L4.

    The table entries are written as Xen's validation leaves them (adjust_guest_lNe
    applied: hvlab's typing rules never rewrite entries) and the pin runs through
    hvlab's typeref code, so a refusal means the layout breaks Xen's rules.
    """
    layout = plan_start_of_day(plan, nr_pages, len(initrd))
    if p2m is None:
        p2m = allocator.alloc(nr_pages, f"domain {domid}'s memory")
    frames.assign(p2m, domid)
    for mfn in p2m.tolist():
        memory.zero_frame(mfn)
    for seg in plan.segments:
        first = (seg.vaddr - plan.virt_base) // PAGE_SIZE
        _write_pfns(memory, p2m, first, seg.data)  # memsz beyond data stays zero
    if layout.initrd_pfn is not None:
        _write_pfns(memory, p2m, layout.initrd_pfn, initrd)
    p2m_bytes = np.asarray(p2m, dtype=np.uint64).tobytes()
    _write_pfns(memory, p2m, layout.p2m_pfn, p2m_bytes)
    levels = table_levels(layout)
    for pfn, entries in initial_page_tables(layout, p2m).items():
        level = levels[pfn]
        adjusted = [adjust_guest_entry(level, int(e)) for e in entries.tolist()]
        memory.frame_u64(int(p2m[pfn]))[:] = np.array(adjusted, dtype=np.uint64)
    values = start_info_values(layout, p2m, shared_info_ma, store_evtchn, console_evtchn)
    _write_pfns(memory, p2m, layout.start_info_pfn, start_info_bytes(values, cmdline))
    l4_mfn = int(p2m[layout.pt_pfn])
    rc = typing.pin_table(l4_mfn, 4, domid)
    while rc == -ERESTART:
        rc = typing.pin_table(l4_mfn, 4, domid)
    if rc:
        raise StartOfDayError(f"domain {domid}: pinning the initial L4 (mfn {l4_mfn:#x}) "
                              f"failed with {rc}")
    return BuiltStartOfDay(layout, p2m, l4_mfn, initial_registers(layout, l4_mfn), values)
