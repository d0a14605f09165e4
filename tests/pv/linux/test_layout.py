"""Xen's 64-bit PV start of day (hypervisor.pv.linux.layout), pinned through hvlab's typerefs."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emulator.memory import HostMemory
from hypervisor.core.frames import FrameAllocator
from hypervisor.lib.errors import HvlabError
from hypervisor.mm.builds import LATEST_BUILD, get_build
from hypervisor.mm.check import check_typerefs
from hypervisor.mm.frametable import FrameTable
from hypervisor.mm.pte import PTE_GLOBAL, PTE_RW, PTE_USER, pte_mfn
from hypervisor.mm.typerefs import PageTyping
from hypervisor.pv.linux import layout as lay
from hypervisor.pv.linux.xen_notes import plan_kernel_load
from tests.pv.linux.synthetic import VIRT_BASE, small_kernel

DOMID = 1
MB = 1 << 20


class Host:
    """Host memory, frame allocator and frame table for one domain plus slack."""

    def __init__(self, nr_pages: int) -> None:
        nr = nr_pages + 256
        self.memory = HostMemory(nr * 4096)
        self.allocator = FrameAllocator(nr)
        self.frames = FrameTable(nr, get_build(LATEST_BUILD))
        self.typing = PageTyping(self.frames, self.memory.u64)
        self.shared_info = int(self.allocator.alloc_one("shared_info"))
        lay.init_shared_info(self.memory.frame_u8(self.shared_info))

    def build(self, plan, nr_pages, initrd=b"", cmdline="console=hvc0"):
        return lay.build_start_of_day(self.memory, self.allocator, self.frames, self.typing,
                                      DOMID, plan, nr_pages, initrd, cmdline,
                                      self.shared_info * 4096, store_evtchn=1, console_evtchn=2)

    def typeref_differences(self, built):
        return check_typerefs(self.memory.u64, self.frames, DOMID, {built.l4_mfn: 4}, [])


def test_debian_kernel_256m_layout_matches_xen(vmlinux):
    """The figures Xen's builder gives this kernel in a 256 MiB domain."""
    layout = lay.plan_start_of_day(plan_kernel_load(vmlinux), 65536, initrd_size=2 * MB)
    assert (layout.kernel_pfn, layout.kernel_pfn + layout.kernel_pages) == (0x1000, 0x4A00)
    assert (layout.start_info_pfn, layout.xenstore_pfn, layout.console_pfn) == (
        0x4A00, 0x4A01, 0x4A02)
    assert (layout.pt_pfn, layout.nr_pt_frames) == (0x4A03, 41)
    first = layout.mappings[0]
    assert [lv.count for lv in first.levels] == [38, 1, 1, 1]  # 38 L1, L2, L3, L4
    assert layout.bootstack_pfn == 0x4A2C
    assert layout.virt_pgtab_end == VIRT_BASE + 0x4C00 * 4096
    assert (layout.initrd_pfn, layout.initrd_mapped, layout.flags) == (0x4C00, False, 8)
    assert layout.p2m_at_init_p2m and layout.p2m_vaddr == 0x8000000000
    assert layout.p2m_pfn == 0x4C00 + 2 * MB // 4096
    assert (layout.p2m_list_pages, layout.p2m_pages) == (128, 128 + 3)


def test_debian_kernel_built_and_pinned(vmlinux):
    host = Host(65536)
    initrd = bytes(range(256)) * 4096  # 1 MiB
    built = host.build(plan_kernel_load(vmlinux), 65536, initrd)
    layout, p2m, mem = built.layout, built.p2m, host.memory
    info = host.frames.info(built.l4_mfn)
    assert info.pinned and info.validated
    assert host.typeref_differences(built) == []
    # L4 slots: 511 for the kernel mapping, 1 for the p2m list
    l4 = mem.frame_u64(built.l4_mfn)
    assert [i for i in range(512) if l4[i]] == [1, 511]
    # start_info as Linux reads it
    si = mem.frame_u8(int(p2m[layout.start_info_pfn])).tobytes()
    assert si.startswith(b"xen-3.0-x86_64\0")
    nr_pages, shared_info, flags = struct.unpack_from("<QQI", si, 32)
    assert (nr_pages, shared_info, flags) == (65536, host.shared_info * 4096, 8)
    assert struct.unpack_from("<QQ", si, 112) == (layout.initrd_pfn, 1 * MB)
    assert struct.unpack_from("<QQ", si, 1152) == (layout.p2m_pfn, 131)
    assert si[128:140] == b"console=hvc0"
    # the initrd is where mod_start says, and unmapped
    first_initrd_mfn = int(p2m[layout.initrd_pfn])
    assert mem.frame_u8(first_initrd_mfn).tobytes() == initrd[:4096]
    # the p2m list at INIT_P2M holds the domain's frames
    list_mfn = int(p2m[layout.p2m_pfn])
    assert np.array_equal(mem.frame_u64(list_mfn), p2m[:512])
    # vCPU 0
    regs = built.registers
    assert regs.rip == plan_kernel_load(vmlinux).virt_entry
    assert regs.rsi == VIRT_BASE + 0x4A00 * 4096 and regs.rsp == VIRT_BASE + 0x4A2D * 4096
    assert (regs.cs, regs.ss, regs.ds, regs.rflags) == (0xE033, 0xE02B, 0, 0x200)
    assert regs.cr3 == built.l4_mfn << 12


def _walk(mem, l4_mfn, va):
    entry = 0
    table = l4_mfn
    for level in (4, 3, 2, 1):
        entry = int(mem.frame_u64(table)[(va >> (12 + 9 * (level - 1))) & 511])
        assert entry & 1, f"{va:#x} not present at L{level}"
        table = pte_mfn(entry)
    return entry


def test_synthetic_kernel_without_init_p2m(tmp_path):
    """No INIT_P2M, no MOD_START_PFN: p2m and initrd are inside the initial mapping."""
    nr_pages = 32 * MB // 4096
    plan = plan_kernel_load(small_kernel())
    host = Host(nr_pages)
    built = host.build(plan, nr_pages, initrd=b"initrd!" * 100)
    layout = built.layout
    assert not layout.p2m_at_init_p2m and layout.initrd_mapped and layout.flags == 0
    assert layout.initrd_pfn == layout.kernel_pfn + layout.kernel_pages
    assert layout.p2m_pfn == layout.initrd_pfn + 1
    assert layout.start_info_pfn == layout.p2m_pfn + layout.p2m_list_pages
    assert host.typeref_differences(built) == []
    assert built.start_info["mod_start"] == layout.va(layout.initrd_pfn)
    assert built.start_info["mfn_list"] == layout.va(layout.p2m_pfn)
    mem = host.memory
    # kernel bytes landed by paddr: the percpu-like segment (p_vaddr 0) at VIRT_BASE + paddr
    percpu = plan.segments[1]
    entry = _walk(mem, built.l4_mfn, percpu.vaddr)
    assert mem.frame_u8(pte_mfn(entry))[:4].tobytes() == b"\x11" * 4
    # page-table frames are mapped read-only, ordinary pages writable; Xen's adjustments applied
    pt_entry = _walk(mem, built.l4_mfn, layout.va(layout.pt_pfn))
    assert not pt_entry & PTE_RW and pt_entry & PTE_USER and pt_entry & lay.PTE_GUEST_KERNEL
    stack_entry = _walk(mem, built.l4_mfn, layout.va(layout.bootstack_pfn))
    assert stack_entry & PTE_RW and not stack_entry & PTE_GLOBAL
    # nothing beyond virt_pgtab_end (4 MiB aligned) is mapped: its L2 slot is empty
    _walk(mem, built.l4_mfn, layout.virt_pgtab_end - 4096)
    end = layout.virt_pgtab_end
    l3 = pte_mfn(int(mem.frame_u64(built.l4_mfn)[(end >> 39) & 511]))
    l2 = pte_mfn(int(mem.frame_u64(l3)[(end >> 30) & 511]))
    assert mem.frame_u64(l2)[(end >> 21) & 511] == 0


def test_a_writable_page_table_mapping_is_refused(monkeypatch):
    """Planted bug: map the tables writable. hvlab's typerefs refuse the pin."""
    monkeypatch.setattr(lay, "_l1_prot", lambda layout, pfn: lay.L1_PROT)
    nr_pages = 32 * MB // 4096
    host = Host(nr_pages)
    with pytest.raises(lay.StartOfDayError, match="pinning the initial L4"):
        host.build(plan_kernel_load(small_kernel()), nr_pages)


def test_too_small_a_domain_is_a_user_error():
    with pytest.raises(HvlabError, match="MiB"):
        lay.plan_start_of_day(plan_kernel_load(small_kernel()), 4096 + 8)


def test_adjust_guest_entries():
    kernel_page = 0x1000 | 0x23
    assert lay.adjust_guest_entry(1, kernel_page) == kernel_page | PTE_USER | lay.PTE_GUEST_KERNEL
    user_page = 0x1000 | 0x27
    assert lay.adjust_guest_entry(1, user_page) == user_page | PTE_GLOBAL
    assert lay.adjust_guest_entry(4, 0x1000 | 0x3) == 0x1000 | 0x27
    assert lay.adjust_guest_entry(2, 0x1000 | 0x3) == 0x1000 | 0x7
    assert lay.adjust_guest_entry(3, 0) == 0


@settings(max_examples=40, deadline=None)
@given(text_pages=st.integers(1, 3000), extra_mb=st.integers(0, 64),
       init_p2m=st.booleans(), initrd_kb=st.integers(0, 4096))
def test_tables_cover_exactly_what_the_fixed_point_promises(text_pages, extra_mb, init_p2m,
                                                            initrd_kb):
    plan = plan_kernel_load(small_kernel(text_size=text_pages * 4096,
                                         init_p2m=0x8000000000 if init_p2m else None,
                                         mod_start_pfn=init_p2m))
    nr_pages = (32 + extra_mb) * MB // 4096
    try:
        layout = lay.plan_start_of_day(plan, nr_pages, initrd_kb * 1024)
    except HvlabError:
        return
    end_pfn = layout.mapped_pages
    # the tables, stack and padding fit inside the mapping, which is 4 MiB aligned
    assert layout.bootstack_pfn + 1 + lay.PADDING_PAGES <= end_pfn
    assert layout.virt_pgtab_end % (4 * MB) == 0
    # the first mapping's tables are exactly what [VIRT_BASE, virt_pgtab_end) needs
    last = layout.virt_pgtab_end - 1
    need = 1 + sum((last >> s) - (VIRT_BASE >> s) + 1 for s in (39, 30, 21))
    assert layout.nr_pt_frames == need
    # every L1 slot of the mapping is filled, and nothing else, when the p2m is a fake identity
    p2m = np.arange(nr_pages, dtype=np.uint64) + 1
    tables = lay.initial_page_tables(layout, p2m)
    levels = lay.table_levels(layout)
    first = layout.mappings[0]
    l1s = [pfn for pfn in tables if levels[pfn] == 1 and
           first.levels[0].pfn <= pfn < first.levels[0].pfn + first.levels[0].count]
    mapped = sum(int(np.count_nonzero(tables[pfn])) for pfn in l1s)
    assert mapped == end_pfn
