"""Entering the guest kernel as Xen does (entry.S create_bounce_frame) and leaving it (iret).

A bounce from user mode first switches to kernel mode (other root, GS bases
swapped) and lands on the kernel stack given by stack_switch; from kernel
mode it uses the current stack. The frame, ascending from the new rsp
(aligned down to 16): RCX, R11, [error code], RIP, CS, RFLAGS, RSP, SS.
CS carries the saved upcall mask in bits 32-39 and has its RPL cleared when
the kernel was interrupted; RFLAGS.IF is the inverse of that mask (the real
IF is always set). Xen returns through SYSRET, so the handler starts with
rcx/r11 clobbered: Linux's entry stubs pop the saved ones.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from emulator.engine import PhysicalCpu
from hypervisor.core.hypercalls import GuestAccessError
from hypervisor.pv.xen.state import FLAT_KERNEL_CS, FLAT_KERNEL_SS, XenVcpu

if TYPE_CHECKING:
    from hypervisor.core.hypervisor import Hypervisor
    from hypervisor.core.vcpu import Vcpu

RFLAGS_IF = 1 << 9
RFLAGS_DF = 1 << 10
RFLAGS_IOPL = 3 << 12
RFLAGS_CLEARED_ON_ENTRY = (1 << 8) | (1 << 14) | (1 << 16) | (1 << 17) | (1 << 18)  # TF NT RF VM AC
RFLAGS_VM = 1 << 17
VGCF_IN_SYSCALL = 1 << 8
IRET_FRAME = struct.Struct("<9Q")  # rax, r11, rcx, flags, rip, cs, rflags, rsp, ss


class BounceError(Exception):
    """The frame cannot be written (Xen crashes the domain: the guest's stack is broken)."""


def xen_state(v: Vcpu) -> XenVcpu:
    assert v.xen is not None
    return v.xen


def toggle_guest_mode(cpu: PhysicalCpu, v: Vcpu) -> None:
    """Kernel <-> user: the other root and the other GS base (Xen's toggle_guest_mode)."""
    x = xen_state(v)
    x.kernel_mode = not x.kernel_mode
    active = cpu.reg("gs_base")
    cpu.set_reg("gs_base", x.gs_base_inactive)
    x.gs_base_inactive = active
    v.mmu.user_mode = not x.kernel_mode  # type: ignore[attr-defined]
    cpu.flush_tlb()


def bounce(hv: Hypervisor, cpu: PhysicalCpu, v: Vcpu, handler: int, *, return_rip: int,
           error_code: int | None = None, mask_events: bool = False,
           rcx_r11: tuple[int, int] | None = None, clear_df: bool = False) -> None:
    """Deliver to `handler` in guest kernel mode; `return_rip` is what the frame resumes."""
    x = xen_state(v)
    bits = v.domain.events.bits
    cs, ss = cpu.reg("cs"), cpu.reg("ss")
    rsp, rflags = cpu.reg("rsp"), cpu.reg("rflags")
    rcx, r11 = rcx_r11 if rcx_r11 is not None else (cpu.reg("rcx"), cpu.reg("r11"))
    from_kernel = x.kernel_mode
    if not from_kernel:
        toggle_guest_mode(cpu, v)
    new_rsp = (rsp if from_kernel else x.kernel_sp) & ~0xF
    saved_mask = int(bits.upcall_mask(v.vcpu_id))
    frame_cs = (cs & ~3 if from_kernel else cs) & 0xFFFF | saved_mask << 32
    frame_flags = rflags & ~(RFLAGS_IF | RFLAGS_IOPL) | (0 if saved_mask else RFLAGS_IF)
    words = [rcx, r11, *(() if error_code is None else (error_code,)),
             return_rip, frame_cs, frame_flags, rsp, ss]
    new_rsp -= 8 * len(words)
    try:
        hv.copy_to_guest(v, new_rsp, struct.pack(f"<{len(words)}Q", *words))
    except GuestAccessError as err:
        raise BounceError(f"cannot write the bounce frame at {new_rsp:#x} ({err})") from None
    if mask_events:
        bits.set_upcall_mask(v.vcpu_id, True)
    rflags &= ~RFLAGS_CLEARED_ON_ENTRY
    if clear_df:
        rflags &= ~RFLAGS_DF
    cpu.set_reg("rsp", new_rsp)
    cpu.set_reg("rflags", rflags | RFLAGS_IF)
    cpu.set_reg("cs", FLAT_KERNEL_CS)
    cpu.set_reg("ss", FLAT_KERNEL_SS)
    cpu.set_reg("rip", handler)
    cpu.set_reg("rcx", handler)  # what SYSRET leaves
    cpu.set_reg("r11", rflags | RFLAGS_IF)
    x.bounces += 1


def hypervisor_iret(hv: Hypervisor, cpu: PhysicalCpu, v: Vcpu) -> int:
    """HYPERVISOR_iret (pv/iret.c): the frame at rsp; returns the saved rax."""
    x = xen_state(v)
    try:
        frame = IRET_FRAME.unpack(hv.copy_from_guest(v, cpu.reg("rsp"), IRET_FRAME.size))
    except GuestAccessError as err:
        raise BounceError(f"iret frame unreadable ({err})") from None
    rax, r11, rcx, flags, rip, cs, rflags, rsp, ss = frame
    if cs & 3 == 3:  # to user mode
        if not v.roots.user_ma:
            raise BounceError("iret to user mode without a user page table")
        if x.kernel_mode:
            toggle_guest_mode(cpu, v)
    cpu.set_reg("rip", rip)
    cpu.set_reg("cs", (cs | 3) & 0xFFFF)
    cpu.set_reg("rflags", rflags & ~(RFLAGS_IOPL | RFLAGS_VM) | RFLAGS_IF)
    cpu.set_reg("rsp", rsp)
    cpu.set_reg("ss", (ss | 3) & 0xFFFF)
    if not flags & VGCF_IN_SYSCALL:
        cpu.set_reg("r11", r11)
        cpu.set_reg("rcx", rcx)
    v.domain.events.bits.set_upcall_mask(v.vcpu_id, not rflags & RFLAGS_IF)
    return rax
