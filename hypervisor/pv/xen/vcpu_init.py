"""VCPUOP_initialise for a CPL-3 PV domain: Xen's arch_set_info_guest (64-bit PV).

A kernel brings up a secondary vCPU by handing Xen a `vcpu_guest_context`
(Linux: arch/x86/xen/smp_pv.c cpu_initialize_context). Xen checks it, then
takes it over field by field; the vCPU stays down until VCPUOP_up unless the
context says VGCF_online. What is checked and how, as arch/x86/domain.c does:

- every address (rip, rsp, kernel_sp, callbacks, trap handlers, FS/GS bases,
  a non-empty LDT's base) must be canonical, the LDT base page aligned and at
  most 8192 entries: else -EINVAL;
- selectors get RPL 3 (`fixup_guest_{code,stack}_selector`: a 64-bit PV kernel
  runs in ring 3), so Linux's __KERNEL_CS 0x10 becomes 0x13;
- the virtual IOPL comes from user_regs.rflags (then cleared), IF is forced on;
- set_gdt's rules for gdt_frames/gdt_ents (descriptors get DPL 3, as
  pv/xen/descriptors.py says); ctrlreg[3] (the kernel L4, an MFN
  << 12) takes a root type reference, ctrlreg[1] (the user L4) one too; a
  context in user mode without a user L4 is -EINVAL;
- CR0: only TS is the guest's; CR4 keeps only the guest-controllable bits;
- vm_assist is domain-wide and taken from the context only for vCPU 0.

The vCPU then starts at CPL 3 with those registers, in kernel or user mode
as VGCF_in_kernel says, with the kernel GS base active in kernel mode.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from emulator.paging import canonical
from hypervisor.core.hypervisor import until_done
from hypervisor.core.vcpu import DOWN, RUNNABLE, TrapEntry
from hypervisor.lib.errno import EEXIST, EINVAL, ENOSYS
from hypervisor.pv.vcpu import finish_pending_typing
from hypervisor.pv.xen.descriptors import fix_gdt_frames
from hypervisor.pv.xen.state import (
    CR0_TS,
    CR4_GUEST_BITS,
    INITIAL_CR4,
    XenVcpu,
)
from hypervisor.stream.vcpu_context import (
    VGCF_I387_VALID,
    VGCF_IN_KERNEL,
    VGCF_ONLINE,
    VGCF_SYSCALL_DISABLES_EVENTS,
    VcpuGuestContext,
)

if TYPE_CHECKING:
    from hypervisor.core.hypervisor import Hypervisor
    from hypervisor.core.vcpu import Vcpu
    from hypervisor.pv.xen.policy import XenPvPolicy

GUEST_KERNEL_RPL = 3  # a 64-bit PV kernel's ring
RFLAGS_IF = 1 << 9
RFLAGS_IOPL = 3 << 12
RFLAGS_KEPT = 0x3F7FD7  # the flags a context may set (reserved bits and VM cleared)
MAX_LDT_ENTRIES = 8192
FXSAVE_MXCSR, FXSAVE_XMM0 = 24, 160
FPU_MXCSR_DEFAULT = 0x1F80
MAX_GDT_ENTRIES = 14 * 512  # FIRST_RESERVED_GDT_ENTRY: Xen's page starts at entry 7168


def fixup_selector(selector: int) -> int:
    """Xen's __fixup_guest_selector: an RPL below the kernel's becomes the kernel's."""
    return selector if selector & 3 >= GUEST_KERNEL_RPL else selector & ~3 | GUEST_KERNEL_RPL


def _addresses_ok(ctx: VcpuGuestContext) -> bool:
    addresses = [ctx.user_regs.rip, ctx.user_regs.rsp, ctx.kernel_sp, ctx.fs_base,
                 ctx.gs_base_kernel, ctx.gs_base_user, ctx.event_callback_eip,
                 ctx.syscall_callback_eip, ctx.failsafe_callback_eip]
    addresses += [t.address for t in ctx.trap_ctxt]
    if ctx.ldt_ents:
        addresses.append(ctx.ldt_base)
    return all(canonical(a) for a in addresses)


def _own_frame(hv: Hypervisor, v: Vcpu, mfn: int) -> bool:
    return 0 < mfn < hv.memory.nr_frames and hv.frame_table.owner_of(mfn) == v.domain.domid


def initialise_xen_vcpu(hv: Hypervisor, target: Vcpu, ctx: VcpuGuestContext) -> int:
    """arch_set_info_guest for a vCPU never initialised; 0 or a negative errno (nothing
    changed then)."""
    if target.context is not None:
        return -EEXIST  # VCPUOP_initialise on an initialised vCPU (Xen: -EEXIST)
    if not _addresses_ok(ctx) or ctx.ldt_base & 0xFFF or ctx.ldt_ents > MAX_LDT_ENTRIES:
        return -EINVAL
    if ctx.ldt_ents:
        return -ENOSYS  # an LDT is not modelled (as MMUEXT_SET_LDT with entries)
    in_kernel = bool(ctx.flags & VGCF_IN_KERNEL)
    user_mfn = ctx.ctrlreg[1] >> 12
    if not in_kernel and not user_mfn:
        return -EINVAL  # user mode needs a user page table
    nr_gdt_frames = -(-ctx.gdt_ents // 512)
    gdt_frames = tuple(ctx.gdt_frames[:nr_gdt_frames])
    if ctx.gdt_ents > MAX_GDT_ENTRIES or not all(_own_frame(hv, target, f) for f in gdt_frames):
        return -EINVAL
    kernel_mfn = ctx.ctrlreg[3] >> 12
    if not _own_frame(hv, target, kernel_mfn) or (user_mfn and not _own_frame(hv, target,
                                                                            user_mfn)):
        return -EINVAL
    dom = target.domain
    finish_pending_typing(dom)  # a lazy update validates first (a root reference follows)
    domid = dom.domid
    rc = until_done(lambda: hv.typing.get_root_ref(kernel_mfn, domid))
    if rc:
        return rc
    if user_mfn:
        rc = until_done(lambda: hv.typing.get_root_ref(user_mfn, domid))
        if rc:
            hv.typing.put_root_ref(kernel_mfn)
            return rc
    for cpu in hv.pcpus:  # a frame may have become a page table: no stale writable entry
        cpu.flush_tlb()
    fix_gdt_frames(hv.memory.u64, gdt_frames, ctx.gdt_ents)

    x = _xen_state(hv, target, ctx, in_kernel, gdt_frames)
    target.xen = x
    target.roots.kernel_ma, target.roots.user_ma = kernel_mfn << 12, user_mfn << 12
    target.mmu.guest_gdt = gdt_frames
    target.trap_table = {t.vector: TrapEntry(t.vector, t.flags, fixup_selector(t.cs), t.address)
                         for t in ctx.trap_ctxt if t.address}
    target.event_callback = ctx.event_callback_eip
    target.failsafe_callback = ctx.failsafe_callback_eip
    target.syscall_callback = ctx.syscall_callback_eip
    _start(hv, target, ctx, in_kernel)
    target.runstate = RUNNABLE if ctx.flags & VGCF_ONLINE else DOWN
    return 0


def _xen_state(hv: Hypervisor, target: Vcpu, ctx: VcpuGuestContext, in_kernel: bool,
               gdt_frames: tuple[int, ...]) -> XenVcpu:
    dom = target.domain
    # vm_assist is the domain's: vCPU 0's context sets it, the others inherit it
    boot = dom.vcpus[0].xen if target.vcpu_id else None
    vm_assist = boot.vm_assist if boot is not None else ctx.vm_assist
    x = XenVcpu(kernel_mode=in_kernel, kernel_ss=fixup_selector(ctx.kernel_ss),
                kernel_sp=ctx.kernel_sp, iopl=(ctx.user_regs.rflags & RFLAGS_IOPL) >> 12,
                cr0_ts=bool(ctx.ctrlreg[0] & CR0_TS),
                cr4=INITIAL_CR4 | ctx.ctrlreg[4] & CR4_GUEST_BITS, vm_assist=vm_assist,
                syscall_masks_events=bool(ctx.flags & VGCF_SYSCALL_DISABLES_EVENTS),
                gdt_frames=gdt_frames, gdt_entries=ctx.gdt_ents,
                debugregs={i: ctx.debugreg[i] for i in (0, 1, 2, 3, 6, 7)})
    x.debugregs[6] = ctx.debugreg[6] or 0xFFFF_0FF0
    x.debugregs[7] = ctx.debugreg[7] or 0x400
    # the inactive GS base: the user's in kernel mode ("non-nul selector kills" it)
    user_gs = 0 if ctx.user_regs.gs & ~3 else ctx.gs_base_user
    x.gs_base_inactive = user_gs if in_kernel else ctx.gs_base_kernel
    # what the vCPU's context does not hold stays: where its vcpu_info and runstate area
    # were registered (Linux does both before initialising it), and the counters
    old = target.xen
    if old is not None:
        x.vcpu_info_ma, x.runstate_area = old.vcpu_info_ma, old.runstate_area
        x.privops, x.forced_cpuids, x.ptwr, x.bounces = (old.privops, old.forced_cpuids,
                                                         old.ptwr, old.bounces)
        x.hypercalls = old.hypercalls
    return x


def _start(hv: Hypervisor, target: Vcpu, ctx: VcpuGuestContext, in_kernel: bool) -> None:
    r = ctx.user_regs
    regs = {name: getattr(r, name) for name in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip")}
    regs["rflags"] = (r.rflags | 2) & RFLAGS_KEPT & ~RFLAGS_IOPL | RFLAGS_IF
    regs["cs"], regs["ss"] = fixup_selector(r.cs), fixup_selector(r.ss)
    regs["fs_base"] = 0 if r.fs & ~3 else ctx.fs_base
    user_gs = 0 if r.gs & ~3 else ctx.gs_base_user
    regs["gs_base"] = ctx.gs_base_kernel if in_kernel else user_gs
    if ctx.flags & VGCF_I387_VALID:  # the FXSAVE image's SSE state (what the engine holds)
        fpu = ctx.fpu_ctxt
        regs["mxcsr"] = int.from_bytes(fpu[FXSAVE_MXCSR:FXSAVE_MXCSR + 4], "little")
        for i in range(16):
            start = FXSAVE_XMM0 + 16 * i
            regs[f"xmm{i}"] = int.from_bytes(fpu[start:start + 16], "little")
    else:
        regs["mxcsr"] = FPU_MXCSR_DEFAULT
    assert target.xen is not None
    calling = hv.loaded[target.pcpu]
    policy = cast("XenPvPolicy", target.domain.policy)  # a CPL-3 domain's
    policy.support.resume_vcpu(target, regs, target.xen.cr4)
    if calling is not None and calling is not target:
        hv.switch_to(target.pcpu, calling)  # the caller shares the pCPU: give it back
