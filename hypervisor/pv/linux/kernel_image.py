"""A Linux kernel file as Xen's toolstack reads it: a bzImage (setup header, xz payload) or an ELF.

A bzImage starts with the real-mode setup code; its header ("HdrS" at 0x202)
says where the protected-mode part starts ((setup_sects + 1) * 512) and where,
relative to that, the compressed vmlinux lies (payload_offset/length, boot
protocol 2.08+). Debian's kernels compress it with xz; the kernel's decompressor
appends the uncompressed size as 4 little-endian bytes, which Python's lzma
would read as the start of a second stream, so they are cut off first.
"""

from __future__ import annotations

import lzma
import struct
from dataclasses import dataclass
from pathlib import Path

from hypervisor.lib.errors import HvlabError

ELF_MAGIC = b"\x7fELF"
XZ_MAGIC = b"\xfd7zXZ\x00"
HDRS_OFFSET = 0x202
HDRS_MAGIC = b"HdrS"
SETUP_SECTS_OFFSET = 0x1F1
VERSION_OFFSET = 0x206
PAYLOAD_OFFSET_OFFSET = 0x248
PAYLOAD_LENGTH_OFFSET = 0x24C
MIN_PAYLOAD_VERSION = 0x208  # payload_offset/length exist from boot protocol 2.08
SECTOR = 512

# What the payload is when it is not xz: named in the error, not decompressed.
_OTHER_COMPRESSIONS = {
    b"\x1f\x8b": "gzip",
    b"BZh": "bzip2",
    b"\x5d\x00\x00": "lzma",
    b"\x89LZO": "lzo",
    b"\x02\x21\x4c\x18": "lz4",
    b"\x28\xb5\x2f\xfd": "zstd",
}


class KernelImageError(HvlabError):
    """The kernel file is not a bzImage hvlab can unpack, nor an x86-64 ELF."""


@dataclass(frozen=True)
class SetupHeader:
    """The fields of a bzImage's setup header the unpacking needs."""

    version: int  # boot protocol, e.g. 0x20f = 2.15
    setup_sects: int
    payload_offset: int  # from the start of the protected-mode code
    payload_length: int

    @property
    def protected_mode_start(self) -> int:
        return (self.setup_sects + 1) * SECTOR

    @property
    def payload_start(self) -> int:
        return self.protected_mode_start + self.payload_offset


def parse_setup_header(data: bytes, name: str = "kernel") -> SetupHeader:
    if len(data) < PAYLOAD_LENGTH_OFFSET + 4:
        raise KernelImageError(f"{name}: truncated ({len(data)} bytes), no bzImage setup header")
    if data[HDRS_OFFSET:HDRS_OFFSET + 4] != HDRS_MAGIC:
        raise KernelImageError(f"{name}: neither an ELF file nor a bzImage (no 'HdrS' at 0x202)")
    (version,) = struct.unpack_from("<H", data, VERSION_OFFSET)
    if version < MIN_PAYLOAD_VERSION:
        raise KernelImageError(f"{name}: boot protocol {version >> 8}.{version & 0xFF:02d} has no "
                               f"payload fields (needs 2.08 or newer)")
    setup_sects = data[SETUP_SECTS_OFFSET] or 4  # 0 means 4 (boot protocol)
    payload_offset, payload_length = struct.unpack_from("<II", data, PAYLOAD_OFFSET_OFFSET)
    return SetupHeader(version, setup_sects, payload_offset, payload_length)


def vmlinux_from_bzimage(data: bytes, name: str = "kernel") -> bytes:
    """The uncompressed vmlinux ELF inside a bzImage."""
    header = parse_setup_header(data, name)
    start, end = header.payload_start, header.payload_start + header.payload_length
    if header.payload_length <= 4 or end > len(data):
        raise KernelImageError(f"{name}: truncated: payload [{start:#x}, {end:#x}) runs past the "
                               f"end of the file ({len(data):#x} bytes)")
    payload = data[start:end]
    if not payload.startswith(XZ_MAGIC):
        kind = next((k for magic, k in _OTHER_COMPRESSIONS.items() if payload.startswith(magic)),
                    "an unknown format")
        raise KernelImageError(f"{name}: the payload is {kind}; hvlab unpacks xz payloads only")
    (size,) = struct.unpack("<I", payload[-4:])
    decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    try:
        vmlinux = decompressor.decompress(payload[:-4])
    except lzma.LZMAError as err:
        raise KernelImageError(f"{name}: the xz payload is corrupt ({err})") from None
    if not decompressor.eof:
        raise KernelImageError(f"{name}: the xz payload is truncated")
    if len(vmlinux) != size:
        raise KernelImageError(f"{name}: the payload unpacks to {len(vmlinux)} bytes, its size "
                               f"field says {size}")
    if not vmlinux.startswith(ELF_MAGIC):
        raise KernelImageError(f"{name}: the payload is not an ELF file")
    return vmlinux


def kernel_elf_bytes(data: bytes, name: str = "kernel") -> bytes:
    """The kernel's ELF bytes: `data` itself if it is an ELF file, else unpacked from a bzImage."""
    if data.startswith(ELF_MAGIC):
        return data
    return vmlinux_from_bzimage(data, name)


def read_kernel_elf(path: str | Path) -> bytes:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise KernelImageError(f"kernel {path}: cannot read ({err.strerror})") from None
    return kernel_elf_bytes(data, f"kernel {path}")
