"""HVM guest-physical memory: backing with superpages, EPT per build, PoD, log-dirty, builder."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from emulator.memory import HostMemory
from emulator.paging import RW, A, D, P, Translation, walk
from hypervisor.core.elf import KernelImage, Segment, load_kernel
from hypervisor.core.frames import FrameAllocator, OutOfFrames
from hypervisor.hvm.builder import (
    E820_RAM,
    E820_RESERVED,
    GDT,
    HVM_START_MAGIC,
    LAPIC_GPA,
    build_hvm_memory,
    plan_hvm_layout,
)
from hypervisor.hvm.ept import EPT_LAYOUTS, INVALID_MFN, P2mType
from hypervisor.hvm.physmap import GuestPhysmap, PhysmapError, ept_layout_for
from hypervisor.lib.errors import HvlabError
from tests import GUESTS

MB = 1 << 20


def physmap(host_mb: int = 64, dom_mb: int = 16, *, build: str = "4.19", pod: bool = False,
            prepopulate: range | None = None, taken: int = 0):
    mem = HostMemory(host_mb * MB)
    frames = FrameAllocator(mem.nr_frames)
    if taken:
        frames.alloc(taken, "something else")
    pm = GuestPhysmap(mem, frames, dom_mb * MB >> 12, ept_layout_for(build), "domain t",
                      pod=pod, prepopulate=prepopulate)
    return mem, frames, pm


def test_each_build_has_an_ept_layout_and_4_4_shares_4_12s():
    assert ept_layout_for("4.4") is EPT_LAYOUTS["4.12"]
    assert ept_layout_for("4.12") is EPT_LAYOUTS["4.12"]
    assert ept_layout_for("4.19") is EPT_LAYOUTS["4.19"]
    with pytest.raises(PhysmapError, match="build '5.0' has no EPT layout"):
        ept_layout_for("5.0")


def test_ram_is_backed_with_aligned_runs_so_ept_uses_2m_leaves():
    _, _, pm = physmap()
    assert pm.superpage_counts() == {"4K": 0, "2M": 8, "1G": 0}
    mfns = pm.p2m.mfns.astype(np.int64)
    chunks = mfns.reshape(-1, 512)
    assert (chunks[:, 0] % 512 == 0).all()
    assert (np.diff(chunks, axis=1) == 1).all()
    lookup = pm.ept.lookup_many(np.arange(pm.nr_pages, dtype=np.uint64))
    assert (lookup.mfn == pm.p2m.mfns).all() and (lookup.p2m_type == P2mType.RAM_RW).all()


def test_a_fragmented_host_still_backs_everything_with_smaller_leaves():
    mem = HostMemory(64 * MB)
    frames = FrameAllocator(mem.nr_frames)
    frames.alloc(frames.nr_free, "everything")
    # free: 1000..2999 (3 aligned 2 MiB runs) and 5000..6199 (2 runs)
    frames.release(np.arange(1000, 3000))
    frames.release(np.arange(5000, 6200))
    pm = GuestPhysmap(mem, frames, 12 * MB >> 12, ept_layout_for("4.19"), "domain t")
    assert pm.superpage_counts() == {"4K": 512, "2M": 5, "1G": 0}
    lookup = pm.ept.lookup_many(np.arange(pm.nr_pages, dtype=np.uint64))
    assert (lookup.mfn == pm.p2m.mfns).all()
    assert len(set(pm.p2m.mfns.tolist())) == pm.nr_pages  # every gfn its own frame


def test_the_two_builds_encode_the_same_mapping_differently():
    _, _, a = physmap(build="4.12")
    _, _, b = physmap(build="4.19")
    ea = a.memory.u64[a.ept.root_mfn * 512]
    eb = b.memory.u64[b.ept.root_mfn * 512]
    assert ea & 7 and eb & 7  # the root entries are plain table pointers in both
    la = a.ept.lookup_many(np.arange(8, dtype=np.uint64))
    lb = b.ept.lookup_many(np.arange(8, dtype=np.uint64))
    assert (la.p2m_type == lb.p2m_type).all()  # each reads its own entries right
    leaf_a = int(a.memory.u64[_leaf_slot(a, 0)])
    # read with the other build's layout, the same entry means something else
    assert EPT_LAYOUTS["4.19"].decode_entry(leaf_a).access != \
        EPT_LAYOUTS["4.12"].decode_entry(leaf_a).access


def _leaf_slot(pm: GuestPhysmap, gfn: int) -> int:
    mem, table = pm.memory.u64, pm.ept.root_mfn
    for level in (4, 3, 2, 1):
        slot = table * 512 + ((gfn >> (9 * (level - 1))) & 511)
        e = int(mem[slot])
        if level == 1 or e & 0x80:
            return slot
        table = (e >> 12) & ((1 << 40) - 1)
    raise AssertionError


def test_a_domain_too_big_for_the_host_takes_nothing():
    mem = HostMemory(8 * MB)
    frames = FrameAllocator(mem.nr_frames)
    free = frames.nr_free
    with pytest.raises(PhysmapError, match="domain big: host memory exhausted"):
        GuestPhysmap(mem, frames, 16 * MB >> 12, ept_layout_for("4.19"), "domain big")
    assert frames.nr_free == free


# ------------------------------------------------------------- populate on demand

def test_pod_backs_only_the_builders_pages_then_populates_2m_runs_or_single_pages():
    mem, frames, pm = physmap(pod=True, prepopulate=range(256, 300))
    assert pm.p2m_type(256) is P2mType.RAM_RW and pm.p2m_type(300) is P2mType.POPULATE_ON_DEMAND
    assert pm.p2m.pod_entries == pm.nr_pages - 44
    # a gfn whose 2 MiB range is all PoD: the whole range, one aligned run, zeroed
    mem.u64[:] = np.uint64(0xDEAD)  # garbage everywhere the host has not scrubbed
    mem.u64[: 512 * 512] = 0
    assert pm.populate(512 + 7) == 512
    run = pm.p2m.mfns[512:1024].astype(np.int64)
    assert run[0] % 512 == 0 and (np.diff(run) == 1).all()
    assert not mem.u64[run[0] * 512:(run[0] + 512) * 512].any()
    # a gfn whose range holds builder pages: just that page
    assert pm.populate(10) == 1
    assert pm.p2m_type(10) is P2mType.RAM_RW and pm.p2m_type(11) is P2mType.POPULATE_ON_DEMAND
    assert not mem.u64[int(pm.p2m.mfns[10]) * 512:][:512].any()
    assert (pm.stats.pod_faults, pm.stats.pod_pages, pm.stats.pod_superpages) == (2, 513, 1)
    with pytest.raises(PhysmapError, match="not populate-on-demand"):
        pm.populate(10)


def test_pod_out_of_host_memory_changes_nothing():
    mem, frames, pm = physmap(64, 16, pod=True, prepopulate=range(0, 4))
    frames.alloc(frames.nr_free, "hog")
    before = pm.p2m.save()
    with pytest.raises(OutOfFrames):
        pm.populate(5)
    assert pm.p2m.save() == before


# --------------------------------------------------------------------- log-dirty

def test_log_dirty_write_protects_marks_and_cleans():
    _, _, pm = physmap()
    assert pm.restrictions == 0
    pm.enable_logdirty()
    assert pm.restrictions == 1 and pm.p2m_type(3) is P2mType.RAM_LOGDIRTY
    assert pm.ept.walk(3 << 12).perms & 2 == 0  # not writable
    pm.mark_dirty(3)
    pm.mark_dirty(700)
    assert pm.ept.walk(3 << 12).perms & 2 and pm.stats.logdirty_faults == 2
    assert pm.take_dirty().tolist() == [3, 700]
    assert pm.restrictions == 2 and pm.p2m_type(3) is P2mType.RAM_LOGDIRTY
    assert pm.take_dirty().tolist() == []


# ------------------------------------------------------------------------ builder

def fake_kernel(base: int = 0x100000, size: int = 0x3000, entry_offset: int = 0) -> KernelImage:
    code = bytes(range(256)) * (size // 256)
    return KernelImage(Path("fake.elf"), base + entry_offset, (Segment(base, size + 0x1000,
                                                                       code),),
                       {"hypercall_page": base})


def test_builder_lays_out_start_info_gdt_idt_tables_and_stacks():
    mem, _, pm = physmap(dom_mb=8)
    kernel = fake_kernel()
    layout = plan_hvm_layout(kernel, pm.nr_pages, 2, "t")
    build_hvm_memory(mem, kernel, layout, pm.gpa_to_ma)

    def read(gpa: int, size: int) -> bytes:
        return mem.read(pm.gpa_to_ma(gpa), size)

    assert layout.region_start == 0x100000 + 0x4000
    assert read(0x100000, 5) == b"\xb8\x00\x00\x00\x00"  # the hypercall page: mov eax, 0
    assert read(0x100000 + 0x1000 + 32, 4) == bytes(range(32, 36))  # the image, after it
    magic, version, *_, memmap, entries, _ = struct.unpack("<IIIIQQQQII",
                                                           read(layout.start_info, 56))
    assert (magic, version, entries) == (HVM_START_MAGIC, 1, 4)
    table = [struct.unpack("<QQII", read(memmap + 24 * i, 24))[:3] for i in range(entries)]
    assert table == [(0, 0x100000, E820_RAM),
                     (0x100000, layout.region_end - 0x100000, E820_RESERVED),
                     (layout.region_end, 8 * MB - layout.region_end, E820_RAM),
                     (LAPIC_GPA, 0x1000, E820_RESERVED)]
    assert read(layout.gdt, len(GDT)) == GDT
    assert not any(read(layout.idt, 4096))
    assert layout.stack_top(1) - layout.stack_top(0) == 4 * 4096 <= layout.region_end
    # the page tables identity-map every RAM page and the LAPIC page, A/D clear
    for gva in (0, 0x100000, layout.stacks, 8 * MB - 4096, LAPIC_GPA):
        t = walk(mem.u64, pm.gpa_to_ma(layout.page_tables), gva, "read",
                 table_to_ma=lambda gpa: LAPIC_GPA if gpa == LAPIC_GPA else pm.gpa_to_ma(gpa),
                 set_accessed=False)
        assert isinstance(t, Translation)
        assert t.ma == (LAPIC_GPA if gva == LAPIC_GPA else pm.gpa_to_ma(gva)) and not t.dirty
    l1_entry = int(mem.u64[_pte_ma(mem, pm, layout.page_tables, 0x100000) >> 3])
    assert l1_entry & (P | RW) == P | RW and not l1_entry & (A | D)


def _pte_ma(mem, pm, cr3: int, gva: int) -> int:
    table = cr3
    for level in (4, 3, 2, 1):
        entry_ma = pm.gpa_to_ma(table) + 8 * ((gva >> (12 + 9 * (level - 1))) & 511)
        if level == 1:
            return entry_ma
        table = int(mem.u64[entry_ma >> 3]) & 0x000F_FFFF_FFFF_F000
    raise AssertionError


@pytest.mark.parametrize(("kernel", "memory", "vcpus", "message"), [
    (lambda: load_kernel(GUESTS / "pv_hello.elf"), 16 * MB, 1,
     r"pv_hello.elf is linked at 0xffffffff80000000-0x[0-9a-f]+, outside the domain's "
     r"guest-physical memory 0x1000-0x1000000"),
    (lambda: fake_kernel(base=0xF00000, size=0x100000), 16 * MB, 1, "outside the domain"),
    (lambda: fake_kernel(base=0), 16 * MB, 1, "outside the domain"),
    (lambda: fake_kernel(), 1 * MB + 0x6000, 1, "memory too small for the kernel"),
    (lambda: fake_kernel(entry_offset=0x10000), 16 * MB, 1, "entry 0x110000 is not inside"),
    (lambda: fake_kernel(), 4 << 30, 1, "HVM memory is at most 3 GiB"),
])
def test_bad_kernels_and_sizes_are_one_clear_error(kernel, memory, vcpus, message):
    with pytest.raises(HvlabError, match=message):
        plan_hvm_layout(kernel(), memory >> 12, vcpus, "d")


def test_pod_physmap_frames_are_backed_where_the_builder_writes():
    mem, _, pm = physmap(dom_mb=8, pod=True, prepopulate=range(0))
    layout = plan_hvm_layout(fake_kernel(), pm.nr_pages, 1, "t")
    with pytest.raises(HvlabError, match="has no backing frame"):
        build_hvm_memory(mem, fake_kernel(), layout, pm.gpa_to_ma)
    assert pm.gpa_to_ma(0x100000) is None and pm.p2m.mfns[0x100] == INVALID_MFN
