"""The hypercall page of a PV kernel, as Xen writes it for a 64-bit kernel in ring 3.

Xen's toolstack asks Xen to initialise the page the kernel's HYPERCALL_PAGE
note names (`XEN_DOMCTL_hypercall_init`); Xen fills it with
`pv_ring3_init_hypercall_page`'s stubs. The rest of the start of day (the
kernel placed by its notes, the P2M list, start_info, the bootstrap tables, the
stack) is Xen's domain builder, `hypervisor/pv/linux/layout.py`, driven by
`create_linux_domain` (`hypervisor/pv/linux/domain.py`) for every PV kernel.
"""

from __future__ import annotations

import struct

import numpy as np

from emulator.addr import PAGE_SIZE
from emulator.memory import HostMemory

HYPERCALL_STUB_SIZE = 32
NR_HYPERCALL_STUBS = PAGE_SIZE // HYPERCALL_STUB_SIZE
HYPERVISOR_IRET = 23


def xen_hypercall_page() -> bytes:
    """int3 everywhere, at 32*N `push rcx; push r11; mov eax, N; syscall; pop r11; pop rcx;
    ret`, and at 32*23 (iret, jumped to, never returns) `push rcx; push r11; push rax;
    mov eax, 23; syscall`: the frame HYPERVISOR_iret reads."""
    page = bytearray(b"\xcc" * PAGE_SIZE)
    for n in range(NR_HYPERCALL_STUBS):
        if n == HYPERVISOR_IRET:
            stub = b"\x51\x41\x53\x50\xb8" + struct.pack("<I", n) + b"\x0f\x05"
        else:
            stub = (b"\x51\x41\x53\xb8" + struct.pack("<I", n) + b"\x0f\x05"
                    + b"\x41\x5b\x59\xc3")
        page[n * HYPERCALL_STUB_SIZE : n * HYPERCALL_STUB_SIZE + len(stub)] = stub
    return bytes(page)


def init_hypercall_page(memory: HostMemory, p2m: np.ndarray, virt_base: int,
                        hypercall_page_va: int) -> None:
    """Xen's hypercall_init for a kernel with a HYPERCALL_PAGE note: the stubs into that page."""
    pfn = (hypercall_page_va - virt_base) // PAGE_SIZE
    memory.write(int(p2m[pfn]) * PAGE_SIZE, xen_hypercall_page())
