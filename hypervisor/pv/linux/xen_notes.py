"""A PV kernel's Xen ELF notes and the load plan Xen's libelf derives from them.

Notes are PT_NOTE entries named "Xen" (public/elfnote.h). Numeric notes may be
1, 2, 4 or 8 bytes; string notes are NUL-terminated. FEATURES is a '|'-separated
list of feature names (public/features.h); a leading '!' marks a feature the
kernel requires, not just supports.

Xen loads a PV kernel by physical address: each PT_LOAD segment goes to
p_paddr + (VIRT_BASE - PADDR_OFFSET). Loading by p_vaddr would break Linux,
whose .data..percpu segment has p_vaddr 0.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from hypervisor.lib.errors import HvlabError

PAGE_SIZE = 4096

XEN_ELFNOTE_INFO = 0
XEN_ELFNOTE_ENTRY = 1
XEN_ELFNOTE_HYPERCALL_PAGE = 2
XEN_ELFNOTE_VIRT_BASE = 3
XEN_ELFNOTE_PADDR_OFFSET = 4
XEN_ELFNOTE_XEN_VERSION = 5
XEN_ELFNOTE_GUEST_OS = 6
XEN_ELFNOTE_GUEST_VERSION = 7
XEN_ELFNOTE_LOADER = 8
XEN_ELFNOTE_PAE_MODE = 9
XEN_ELFNOTE_FEATURES = 10
XEN_ELFNOTE_BSD_SYMTAB = 11
XEN_ELFNOTE_HV_START_LOW = 12
XEN_ELFNOTE_L1_MFN_VALID = 13
XEN_ELFNOTE_SUSPEND_CANCEL = 14
XEN_ELFNOTE_INIT_P2M = 15
XEN_ELFNOTE_MOD_START_PFN = 16
XEN_ELFNOTE_SUPPORTED_FEATURES = 17
XEN_ELFNOTE_PHYS32_ENTRY = 18

_NUMERIC = {
    XEN_ELFNOTE_ENTRY: "entry",
    XEN_ELFNOTE_HYPERCALL_PAGE: "hypercall_page",
    XEN_ELFNOTE_VIRT_BASE: "virt_base",
    XEN_ELFNOTE_PADDR_OFFSET: "paddr_offset",
    XEN_ELFNOTE_HV_START_LOW: "hv_start_low",
    XEN_ELFNOTE_SUSPEND_CANCEL: "suspend_cancel",
    XEN_ELFNOTE_INIT_P2M: "init_p2m",
    XEN_ELFNOTE_MOD_START_PFN: "mod_start_pfn",
    XEN_ELFNOTE_SUPPORTED_FEATURES: "supported_features",
    XEN_ELFNOTE_PHYS32_ENTRY: "phys32_entry",
}
_STRING = {
    XEN_ELFNOTE_XEN_VERSION: "xen_version",
    XEN_ELFNOTE_GUEST_OS: "guest_os",
    XEN_ELFNOTE_GUEST_VERSION: "guest_version",
    XEN_ELFNOTE_LOADER: "loader",
    XEN_ELFNOTE_PAE_MODE: "pae_mode",
    XEN_ELFNOTE_FEATURES: "features",
    XEN_ELFNOTE_BSD_SYMTAB: "bsd_symtab",
}

# public/features.h, by bit number
FEATURE_NAMES = (
    "writable_page_tables", "writable_descriptor_tables", "auto_translated_physmap",
    "supervisor_mode_kernel", "pae_pgdir_above_4gb", "mmu_pt_update_preserve_ad",
    "highmem_assist", "gnttab_map_avail_bits", "hvm_callback_vector", "hvm_safe_pvclock",
    "hvm_pirqs", "dom0", "grant_map_identity", "memory_op_vcpu_local", "ARM_SMCCC_supported",
    "linux_rsdp_unrestricted", "not_direct_mapped", "direct_mapped",
)


class XenNotesError(HvlabError):
    """The kernel is not a PV kernel Xen's loader would accept."""


@dataclass(frozen=True)
class XenNotes:
    """Every Xen ELF note of a kernel (None: the note is absent)."""

    guest_os: str | None = None
    guest_version: str | None = None
    xen_version: str | None = None
    loader: str | None = None
    pae_mode: str | None = None
    features: str | None = None
    bsd_symtab: str | None = None
    entry: int | None = None
    hypercall_page: int | None = None
    virt_base: int | None = None
    paddr_offset: int | None = None
    hv_start_low: int | None = None
    suspend_cancel: int | None = None
    init_p2m: int | None = None
    mod_start_pfn: int | None = None
    supported_features: int | None = None
    phys32_entry: int | None = None
    l1_mfn_valid: tuple[tuple[int, int], ...] = ()  # (mask, value) pairs

    @property
    def feature_masks(self) -> tuple[int, int]:
        """(supported, required) bitmaps: FEATURES folded with SUPPORTED_FEATURES (libelf)."""
        supported, required = parse_features(self.features or "")
        return supported | (self.supported_features or 0), required


def parse_features(text: str) -> tuple[int, int]:
    """'!a|b' -> (supported, required) bitmaps; '!' marks a required feature."""
    supported = required = 0
    for word in filter(None, text.split("|")):
        name = word.lstrip("!")
        if name not in FEATURE_NAMES:
            raise XenNotesError(f"kernel FEATURES note: unknown feature {name!r}")
        bit = 1 << FEATURE_NAMES.index(name)
        supported |= bit
        if word.startswith("!"):
            required |= bit
    return supported, required


@dataclass(frozen=True)
class LoadSegment:
    paddr: int
    vaddr: int  # where Xen maps it: paddr + virt_offset (not the ELF's p_vaddr)
    memsz: int
    data: bytes  # file bytes; the rest up to memsz is zero


@dataclass(frozen=True)
class KernelLoadPlan:
    """A PV kernel placed as libelf places it (elf_xen_addr_calc_check)."""

    notes: XenNotes
    virt_base: int
    paddr_offset: int
    virt_kstart: int
    virt_kend: int
    virt_entry: int
    segments: tuple[LoadSegment, ...]
    elf_entry: int  # e_entry: the native physical entry, unused under Xen

    @property
    def virt_offset(self) -> int:
        return self.virt_base - self.paddr_offset

    @property
    def kernel_pfns(self) -> tuple[int, int]:
        """[first, end) pfns the kernel occupies, counted from VIRT_BASE."""
        return ((self.virt_kstart - self.virt_base) // PAGE_SIZE,
                -(-(self.virt_kend - self.virt_base) // PAGE_SIZE))


def _align4(n: int) -> int:
    return (n + 3) & ~3


def iter_notes(blob: bytes) -> list[tuple[bytes, int, bytes]]:
    """(name, type, desc) of every entry of an ELF note area."""
    notes, pos = [], 0
    while pos + 12 <= len(blob):
        namesz, descsz, ntype = struct.unpack_from("<III", blob, pos)
        name_at = pos + 12
        desc_at = name_at + _align4(namesz)
        end = desc_at + _align4(descsz)
        if desc_at + descsz > len(blob):
            raise XenNotesError(f"kernel note area: entry at {pos:#x} runs past its end")
        notes.append((blob[name_at:name_at + namesz].rstrip(b"\0"), ntype,
                      blob[desc_at:desc_at + descsz]))
        pos = end
    return notes


def _numeric(ntype: int, desc: bytes) -> int:
    formats = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}
    if len(desc) not in formats:
        raise XenNotesError(f"kernel Xen note {ntype}: a number of {len(desc)} bytes")
    return int(struct.unpack(formats[len(desc)], desc)[0])


def parse_xen_notes(note_areas: list[bytes]) -> XenNotes:
    fields: dict[str, object] = {}
    l1_mfn_valid: list[tuple[int, int]] = []
    for area in note_areas:
        for name, ntype, desc in iter_notes(area):
            if name != b"Xen":
                continue
            if ntype in _NUMERIC:
                fields[_NUMERIC[ntype]] = _numeric(ntype, desc)
            elif ntype in _STRING:
                fields[_STRING[ntype]] = desc.split(b"\0", 1)[0].decode("ascii", "replace")
            elif ntype == XEN_ELFNOTE_L1_MFN_VALID:
                width = 8 if len(desc) % 16 == 0 else 4
                values = struct.unpack(f"<{len(desc) // width}{'Q' if width == 8 else 'I'}", desc)
                l1_mfn_valid = list(zip(values[0::2], values[1::2], strict=False))
    notes = XenNotes(**fields, l1_mfn_valid=tuple(l1_mfn_valid))  # type: ignore[arg-type]
    notes.feature_masks  # noqa: B018 - rejects unknown feature names now, not at boot
    return notes


def plan_kernel_load(elf_bytes: bytes, name: str = "kernel") -> KernelLoadPlan:
    """Read a PV kernel ELF's notes and place its segments by paddr, as Xen's libelf does."""
    try:
        elf = ELFFile(io.BytesIO(elf_bytes))
        if elf.get_machine_arch() != "x64" or elf.elfclass != 64:
            raise XenNotesError(f"{name}: not an x86-64 ELF64 file")
        phdrs = list(elf.iter_segments())
        note_areas = [seg.data() for seg in phdrs if seg["p_type"] == "PT_NOTE"]
        loads = [seg for seg in phdrs if seg["p_type"] == "PT_LOAD" and seg["p_memsz"] > 0]
        raw = [(seg["p_paddr"], seg["p_memsz"], seg.data()) for seg in loads]
        elf_entry = elf.header["e_entry"]
    except (ELFError, ValueError, struct.error) as err:
        raise XenNotesError(f"{name}: not a valid ELF file ({err})") from None
    notes = parse_xen_notes(note_areas)
    if notes.guest_os is None and notes.xen_version is None:
        raise XenNotesError(f"{name}: no Xen ELF notes: not a PV kernel")
    if notes.loader != "generic" and notes.guest_os != "linux":
        raise XenNotesError(f"{name}: loader {notes.loader!r}: Xen loads only 'generic' or "
                            f"Linux images")
    if notes.xen_version != "xen-3.0":
        raise XenNotesError(f"{name}: XEN_VERSION {notes.xen_version!r}, Xen needs 'xen-3.0'")
    if not raw:
        raise XenNotesError(f"{name}: no loadable segments")
    virt_base = notes.virt_base if notes.virt_base is not None else 0
    paddr_offset = notes.paddr_offset if notes.paddr_offset is not None else 0
    offset = virt_base - paddr_offset
    pstart = min(paddr for paddr, _, _ in raw)
    pend = max(paddr + memsz for paddr, memsz, _ in raw)
    kstart, kend = pstart + offset, pend + offset
    entry = notes.entry if notes.entry is not None else elf_entry
    if not virt_base <= kstart <= entry < kend:
        raise XenNotesError(f"{name}: entry {entry:#x} or kernel [{kstart:#x}, {kend:#x}) lies "
                            f"outside VIRT_BASE {virt_base:#x} and above")
    if notes.hypercall_page is not None and not kstart <= notes.hypercall_page < kend:
        raise XenNotesError(f"{name}: HYPERCALL_PAGE {notes.hypercall_page:#x} is outside the "
                            f"kernel")
    segments = tuple(LoadSegment(paddr, paddr + offset, memsz, data)
                     for paddr, memsz, data in sorted(raw, key=lambda seg: seg[0]))
    return KernelLoadPlan(notes, virt_base, paddr_offset, kstart, kend, entry, segments,
                          elf_entry)
