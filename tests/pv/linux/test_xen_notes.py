"""Xen ELF notes and libelf's by-paddr load plan (hypervisor.pv.linux.xen_notes)."""

from __future__ import annotations

import io
import struct

import pytest
from elftools.elf.elffile import ELFFile

from hypervisor.pv.linux.xen_notes import (
    FEATURE_NAMES,
    XenNotesError,
    parse_features,
    plan_kernel_load,
)
from tests.pv.linux.synthetic import VIRT_BASE, elf64, linux_like_notes, small_kernel


def bit(name: str) -> int:
    return 1 << FEATURE_NAMES.index(name)


def test_debian_kernel_notes(vmlinux):
    plan = plan_kernel_load(vmlinux)
    notes = plan.notes
    assert (notes.guest_os, notes.xen_version, notes.loader, notes.pae_mode) == (
        "linux", "xen-3.0", "generic", "yes")
    assert notes.virt_base == VIRT_BASE and notes.paddr_offset == 0
    assert notes.hypercall_page is None  # 6.1 stable dropped it: hypercalls are bare syscalls
    assert notes.init_p2m == 0x8000000000 and notes.mod_start_pfn == 1
    assert notes.hv_start_low == 0xFFFF800000000000
    assert notes.l1_mfn_valid == ((1, 1),)
    supported, required = notes.feature_masks
    assert required == bit("writable_page_tables")
    assert supported & bit("pae_pgdir_above_4gb") and supported & bit("dom0")
    assert plan.virt_kstart <= plan.virt_entry < plan.virt_kend


def test_debian_kernel_loads_by_paddr_not_vaddr(vmlinux):
    """The .data..percpu segment has p_vaddr 0: Xen maps it at paddr + VIRT_BASE."""
    plan = plan_kernel_load(vmlinux)
    phdrs = [s for s in ELFFile(io.BytesIO(vmlinux)).iter_segments()
             if s["p_type"] == "PT_LOAD"]
    assert any(s["p_vaddr"] == 0 for s in phdrs)
    assert [seg.paddr for seg in plan.segments] == sorted(s["p_paddr"] for s in phdrs)
    for seg in plan.segments:
        assert seg.vaddr == seg.paddr + VIRT_BASE
    first, end = plan.kernel_pfns
    assert first == 0x1000  # 16 MiB: the kernel's physical load address


def test_synthetic_plan():
    plan = plan_kernel_load(small_kernel(init_p2m=0x8000000000, mod_start_pfn=True))
    assert plan.virt_base == VIRT_BASE and plan.virt_entry == VIRT_BASE + 0x1000040
    percpu = plan.segments[1]
    assert (percpu.paddr, percpu.vaddr) == (0x1005000, VIRT_BASE + 0x1005000)
    assert plan.virt_kend == VIRT_BASE + 0x1005000 + 0x2000 + 0x3000
    assert plan.notes.suspend_cancel == 1 and plan.notes.mod_start_pfn == 1


def test_paddr_offset_shifts_the_mapping():
    notes = linux_like_notes(entry=VIRT_BASE + 0x40, paddr_offset=0x1000000)
    plan = plan_kernel_load(elf64([(0, 0x1000000, b"\x90" * 64, 0x1000)], notes, 0))
    assert plan.virt_offset == VIRT_BASE - 0x1000000
    assert plan.segments[0].vaddr == VIRT_BASE  # paddr 16 MiB - offset 16 MiB


def test_entry_defaults_to_e_entry_only_without_the_note():
    notes = linux_like_notes(entry=0)
    stripped = notes.replace(struct.pack("<III", 4, 8, 1) + b"Xen\0" + struct.pack("<Q", 0), b"")
    assert stripped != notes
    kernel = elf64([(VIRT_BASE + 0x1000000, 0x1000000, b"\x90" * 64, 0x1000)], stripped,
                   e_entry=VIRT_BASE + 0x1000010)
    assert plan_kernel_load(kernel).virt_entry == VIRT_BASE + 0x1000010


def test_features_syntax():
    assert parse_features("!writable_page_tables|pae_pgdir_above_4gb") == (
        bit("writable_page_tables") | bit("pae_pgdir_above_4gb"), bit("writable_page_tables"))
    assert parse_features("") == (0, 0)
    with pytest.raises(XenNotesError, match="unknown feature 'flying_pigs'"):
        parse_features("writable_page_tables|!flying_pigs")


@pytest.mark.parametrize("kernel, message", [
    (lambda: elf64([(VIRT_BASE, 0, b"x", 1)], b"", VIRT_BASE), "no Xen ELF notes"),
    (lambda: small_kernel(xen_version="xen-2.0"), "XEN_VERSION 'xen-2.0'"),
    (lambda: small_kernel(features="!warp_drive"), "unknown feature"),
    (lambda: elf64([(VIRT_BASE + 0x1000000, 0x1000000, b"x", 0x1000)],
                   linux_like_notes(entry=VIRT_BASE + 0x9000000), 0), "outside"),
    (lambda: b"\x7fELF" + b"\0" * 20, "not a valid ELF"),
])
def test_refused_kernels(kernel, message):
    with pytest.raises(XenNotesError, match=message):
        plan_kernel_load(kernel(), "kernel k")
