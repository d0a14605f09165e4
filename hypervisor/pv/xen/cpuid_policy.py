"""The CPUID a CPL-3 PV guest sees: unicorn's CPU model, masked as Xen masks it for a PV domU.

Hidden: PSE and PSE36 (a PV guest maps 4 KiB pages only), XSAVE/OSXSAVE
(the FPU then uses FXSAVE, which unicorn runs), MCE and MCA (a #GP in the
MCE code panics Linux), FSGSBASE and SMEP (the kernel would use them at
CPL 3), RDRAND (not deterministic). Xen's leaves sit at 0x40000000 with the
"XenVMMXenVMM" signature. Every answer is a constant:
never the host's.
"""

from __future__ import annotations

import struct

XEN_SIGNATURE = struct.unpack("<III", b"XenVMMXenVMM")
VENDOR = struct.unpack("<III", b"GenuineIntel")  # ebx, edx, ecx order below
BRAND = b"hvlab virtual CPU (unicorn)".ljust(48, b"\0")

XEN_VERSION = (4 << 16) | 19
LEAF1_ECX = 0xCED8_2203 & ~((1 << 26) | (1 << 27) | (1 << 30)) | (1 << 31)
LEAF1_EDX = 0x078B_FBFD & ~((1 << 3) | (1 << 7) | (1 << 14) | (1 << 17))
LEAF7_EBX = 0x389 & ~((1 << 0) | (1 << 7))


def _brand(i: int) -> tuple[int, int, int, int]:
    return struct.unpack_from("<IIII", BRAND, 16 * i)  # type: ignore[return-value]


LEAVES: dict[int, tuple[int, int, int, int]] = {
    0x0: (0xD, VENDOR[0], VENDOR[2], VENDOR[1]),
    0x1: (0x0003_06C4, 0x0000_0800, LEAF1_ECX, LEAF1_EDX),
    0x4000_0000: (0x4000_0005, *XEN_SIGNATURE),
    0x4000_0001: (XEN_VERSION, 0, 0, 0),
    0x4000_0002: (1, 0x4000_0000, 0, 0),  # hypercall pages, MSR base
    0x8000_0000: (0x8000_0008, 0, 0, 0),
    0x8000_0001: (0, 0, 0x21, 0x2810_0800),  # LAHF, ABM; SYSCALL, NX, RDTSCP, LM
    0x8000_0002: _brand(0),
    0x8000_0003: _brand(1),
    0x8000_0004: _brand(2),
    0x8000_0008: (0x3028, 0, 0, 0),  # 40 physical, 48 virtual address bits
}
SUBLEAF_ZERO_ONLY = {0x7: (0, LEAF7_EBX, 0, 0)}


def cpuid(leaf: int, subleaf: int) -> tuple[int, int, int, int]:
    """eax, ebx, ecx, edx for `leaf`/`subleaf` (zeros for anything not listed)."""
    leaf &= 0xFFFF_FFFF
    if leaf in SUBLEAF_ZERO_ONLY:
        return SUBLEAF_ZERO_ONLY[leaf] if subleaf & 0xFFFF_FFFF == 0 else (0, 0, 0, 0)
    return LEAVES.get(leaf, (0, 0, 0, 0))
