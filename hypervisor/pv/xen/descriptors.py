"""Guest GDT descriptors as Xen leaves them (pv_check_descriptor's DPL fix-up).

A 64-bit PV kernel runs in ring 3, so Xen raises the DPL of every present code
or data descriptor the guest gives it (set_gdt, VCPUOP_initialise,
update_descriptor) to 3, writing the fixed value into the guest's frame: a
selector of the kernel's own GDT, such as Linux's __KERNEL_CS with RPL 3 (0x13,
what a vCPU started by VCPUOP_initialise runs on), then loads at CPL 3, as
Linux's iret_to_self does. Only this fix-up is modelled; Xen's checks of
system descriptors (call gates) are not.
"""

from __future__ import annotations

import numpy as np

SEGMENT_P = 1 << 47
SEGMENT_S = 1 << 44  # code or data (not a system descriptor)
SEGMENT_DPL = 3 << 45
GUEST_KERNEL_DPL = 3


def fix_descriptor(desc: int) -> int:
    """The descriptor as Xen stores it: a present code/data one gets DPL 3."""
    if desc & SEGMENT_P and desc & SEGMENT_S:
        return desc | GUEST_KERNEL_DPL << 45
    return desc


def fix_gdt_frames(u64: np.ndarray, frames: tuple[int, ...], entries: int) -> None:
    """Fix up the first `entries` descriptors held by a GDT's machine frames, in place."""
    for i, mfn in enumerate(frames):
        count = min(512, entries - 512 * i)
        if count <= 0:
            break
        table = u64[mfn * 512:mfn * 512 + count]
        fix = (table & np.uint64(SEGMENT_P)) != 0
        fix &= (table & np.uint64(SEGMENT_S)) != 0
        table[fix] |= np.uint64(SEGMENT_DPL)


def loadable_at_cpl3(desc: int, code: bool) -> bool:
    """A present DPL-3 code descriptor (`code`) or writable data descriptor: what an
    `iretq` to CPL 3 loads into CS or SS without a fault."""
    if not desc & SEGMENT_P or not desc & SEGMENT_S or desc & SEGMENT_DPL != SEGMENT_DPL:
        return False
    executable, writable = bool(desc >> 43 & 1), bool(desc >> 41 & 1)
    return executable if code else not executable and writable
