"""Small hand-made kernels for the loader tests: an ELF64 with Xen notes, a bzImage around it."""

from __future__ import annotations

import lzma
import struct

from hypervisor.pv.linux import xen_notes as xn

VIRT_BASE = 0xFFFFFFFF80000000


def note(ntype: int, desc: bytes, name: bytes = b"Xen") -> bytes:
    def pad(b: bytes) -> bytes:
        return b + b"\0" * (-len(b) % 4)

    return struct.pack("<III", len(name) + 1, len(desc), ntype) + pad(name + b"\0") + pad(desc)


def linux_like_notes(*, entry: int, init_p2m: int | None = None, mod_start_pfn: bool = False,
                     features: str = "!writable_page_tables|pae_pgdir_above_4gb",
                     xen_version: str = "xen-3.0", paddr_offset: int = 0,
                     virt_base: int = VIRT_BASE) -> bytes:
    parts = [
        note(xn.XEN_ELFNOTE_GUEST_OS, b"linux\0"),
        note(xn.XEN_ELFNOTE_XEN_VERSION, xen_version.encode() + b"\0"),
        note(xn.XEN_ELFNOTE_VIRT_BASE, struct.pack("<Q", virt_base)),
        note(xn.XEN_ELFNOTE_PADDR_OFFSET, struct.pack("<Q", paddr_offset)),
        note(xn.XEN_ELFNOTE_ENTRY, struct.pack("<Q", entry)),
        note(xn.XEN_ELFNOTE_FEATURES, features.encode() + b"\0"),
        note(xn.XEN_ELFNOTE_SUPPORTED_FEATURES, struct.pack("<I", 1 << 11)),
        note(xn.XEN_ELFNOTE_LOADER, b"generic\0"),
        note(xn.XEN_ELFNOTE_SUSPEND_CANCEL, struct.pack("<I", 1)),
        note(xn.XEN_ELFNOTE_L1_MFN_VALID, struct.pack("<QQ", 1, 1)),
        note(99, b"ignored"),  # unknown types are skipped, as libelf does
        note(1, b"not Xen's", name=b"GNU"),
    ]
    if init_p2m is not None:
        parts.append(note(xn.XEN_ELFNOTE_INIT_P2M, struct.pack("<Q", init_p2m)))
    if mod_start_pfn:
        parts.append(note(xn.XEN_ELFNOTE_MOD_START_PFN, struct.pack("<I", 1)))
    return b"".join(parts)


def elf64(segments: list[tuple[int, int, bytes, int]], notes: bytes, e_entry: int) -> bytes:
    """An x86-64 ELF executable; segments are (p_vaddr, p_paddr, data, p_memsz), + a PT_NOTE."""
    phnum = len(segments) + 1
    offset = 64 + 56 * phnum
    body = b""
    phdrs = b""
    for vaddr, paddr, data, memsz in segments:
        at = offset + len(body)
        phdrs += struct.pack("<IIQQQQQQ", 1, 7, at, vaddr, paddr, len(data), memsz, 0x1000)
        body += data + b"\0" * (-len(data) % 8)
    phdrs += struct.pack("<IIQQQQQQ", 4, 4, offset + len(body), 0, 0, len(notes), len(notes), 4)
    body += notes
    header = (b"\x7fELF" + bytes([2, 1, 1, 0]) + b"\0" * 8
              + struct.pack("<HHIQQQIHHHHHH", 2, 0x3E, 1, e_entry, 64, 0, 0, 64, 56, phnum, 64,
                            0, 0))
    return header + phdrs + body


def small_kernel(*, init_p2m: int | None = None, mod_start_pfn: bool = False,
                 text_size: int = 0x5000, **note_args) -> bytes:
    """A 'kernel' at paddr 16 MiB: text, data and a percpu-style segment with p_vaddr 0."""
    text_paddr = 0x1000000
    entry = VIRT_BASE + text_paddr + 0x40
    segments = [
        (VIRT_BASE + text_paddr, text_paddr, b"\x90" * text_size, text_size),
        (0, text_paddr + text_size, b"\x11" * 0x800, 0x2000),  # p_vaddr 0, like .data..percpu
        (VIRT_BASE + text_paddr + text_size + 0x2000, text_paddr + text_size + 0x2000,
         b"\x22" * 0x100, 0x3000),  # mostly bss
    ]
    notes = linux_like_notes(entry=entry, init_p2m=init_p2m, mod_start_pfn=mod_start_pfn,
                             **note_args)
    return elf64(segments, notes, e_entry=text_paddr)


def bzimage(payload: bytes, *, setup_sects: int = 3, version: int = 0x20F) -> bytes:
    """A bzImage-shaped file: setup header, then `payload` at payload_offset."""
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    payload_offset = 0x123
    struct.pack_into("<II", setup, 0x248, payload_offset, len(payload))
    return bytes(setup) + b"\xcc" * payload_offset + payload + b"\xcc" * 64


def xz_payload(vmlinux: bytes, size_field: int | None = None) -> bytes:
    """What the kernel's build appends: xz (CRC32 check), then the size as 4 LE bytes."""
    size = len(vmlinux) if size_field is None else size_field
    return lzma.compress(vmlinux, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32) + struct.pack(
        "<I", size)
