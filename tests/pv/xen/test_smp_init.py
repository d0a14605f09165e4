"""VCPUOP_initialise for CPL-3 domains (Xen's arch_set_info_guest), with tiny real guests.

vCPU 0 fills in a `vcpu_guest_context` the way Linux's cpu_initialize_context
does (kernel CS 0x10, SS 0x18, IOPL 1 in rflags, VGCF_in_kernel, its own L4
read from CR3 into ctrlreg[3]), brings vCPU 1 up and waits for it; vCPU 1
writes a flag and blocks.
"""

from __future__ import annotations

import struct

import pytest

from hypervisor.lib.errno import EEXIST, EFAULT, EINVAL
from hypervisor.pv.xen.hypercalls import call
from hypervisor.pv.xen.vcpu_init import fixup_selector, initialise_xen_vcpu
from hypervisor.stream.vcpu_context import (
    VGCF_IN_KERNEL,
    VGCF_ONLINE,
    CpuUserRegs,
    TrapInfo,
    VcpuGuestContext,
)
from tests.pv.xen.guest import ENTRY, Asm, boot

CTRLREG3_OFFSET = 4984 + 3 * 8
AP_GS_BASE = 0xFFFF_8880_0000_1000
AP_TRAP_14 = ENTRY + 0x10


def ap_context(ap: int, stack_top: int, **changes) -> VcpuGuestContext:
    ctx = VcpuGuestContext(
        flags=VGCF_IN_KERNEL,
        user_regs=CpuUserRegs(rip=ap, rsp=stack_top, cs=0x10, ss=0x18, ds=0x2B, es=0x2B,
                              rflags=0x1000, rbp=0x1234),
        kernel_ss=0x18, kernel_sp=stack_top, gs_base_kernel=AP_GS_BASE,
        event_callback_eip=ap, failsafe_callback_eip=ap)
    ctx.trap_ctxt[0] = TrapInfo(14, 0, 0x10, AP_TRAP_14)
    for name, value in changes.items():
        setattr(ctx, name, value)
    return ctx


def smp_guest(ctx_changes: dict | None = None) -> tuple[bytes, dict[str, int]]:
    """vCPU 0 initialises and ups vCPU 1, then yields until vCPU 1 has set the flag."""
    def assemble(ctx: bytes) -> Asm:
        asm = (Asm()
               .emit("0f20d8")  # mov rax, cr3: the kernel L4 (emulated)
               .emit("488905").rip_rel("ctx_cr3")
               .emit("b8").imm32(24).emit("31ff").emit("be").imm32(1)
               .emit("488d15").rip_rel("ctx").emit("0f05")  # vcpu_op(initialise, 1, &ctx)
               .emit("4989c4")  # r12 = rc
               .emit("b8").imm32(24).emit("bf").imm32(1).emit("be").imm32(1)
               .emit("31d2").emit("0f05")  # vcpu_op(up, 1)
               .emit("4989c5")  # r13 = rc
               .label("wait")
               .emit("8b05").rip_rel("flag").emit("85c0").emit("750d")  # flag set: done
               .emit("b8").imm32(29).emit("31ff").emit("31f6").emit("0f05")  # yield
               .emit("ebe9")  # jmp wait
               .shutdown(0)
               .label("ap")  # vCPU 1
               .emit("b8").imm32(1).emit("8905").rip_rel("flag")
               .label("block")
               .emit("b8").imm32(29).emit("bf").imm32(1).emit("31f6").emit("0f05")
               .emit("ebf0")  # sched_op(block), forever
               .label("flag").imm32(0).imm32(0)
               .label("ctx").data(ctx[:CTRLREG3_OFFSET]).label("ctx_cr3")
               .data(ctx[CTRLREG3_OFFSET:])
               .data(bytes(0x200)).label("stack_top"))
        return asm

    first = assemble(bytes(VcpuGuestContext.SIZE))
    first.bytes()
    at = first.labels
    ctx = ap_context(ENTRY + at["ap"], ENTRY + at["stack_top"], **(ctx_changes or {}))
    final = assemble(ctx.pack())
    code = final.bytes()
    assert final.labels == at
    return code, at


@pytest.mark.parametrize("pcpus", [1, 2])
def test_a_second_vcpu_starts_from_a_linux_like_context_at_cpl3(tmp_path, pcpus):
    code, labels = smp_guest()
    hv = boot(tmp_path, code, vcpus=2, pcpus=pcpus)
    dom = hv.domains[0]
    assert hv.run(50_000_000) == "shutdown"
    assert dom.shutdown.reason == "poweroff", dom.crash_report
    boot_v, ap = dom.vcpus
    regs0 = hv.read_vcpu_registers(boot_v)
    assert regs0["r12"] == 0 and regs0["r13"] == 0  # initialise and up succeeded
    assert ap.pcpu == (1 if pcpus == 2 else 0)
    assert ap.roots.kernel_ma == boot_v.roots.kernel_ma and ap.roots.user_ma == 0
    cpu = hv.switch_to(ap.pcpu, ap)
    assert cpu.in_ring3
    # Xen's selector fixup: RPL 3 for the kernel's 0x10/0x18
    assert cpu.reg("cs") == 0x13 and cpu.reg("ss") == 0x1B
    assert cpu.reg("gs_base") == AP_GS_BASE
    assert cpu.reg("rflags") & 0x3200 == 0x200  # IF on, IOPL virtual
    assert cpu.reg("rbp") == 0x1234
    x = ap.xen
    assert x.kernel_mode and x.iopl == 1 and x.kernel_ss == 0x1B
    assert x.kernel_sp == ENTRY + labels["stack_top"]
    assert ap.trap_table[14].address == AP_TRAP_14 and ap.trap_table[14].cs == 0x13
    assert x.vm_assist == boot_v.xen.vm_assist
    assert hv.check_typerefs(dom) == []


def _booted(tmp_path):
    code, labels = smp_guest()
    hv = boot(tmp_path, code, vcpus=2, pcpus=2)
    dom = hv.domains[0]
    return hv, dom, ap_context(ENTRY + labels["ap"], ENTRY + labels["stack_top"])


def _with_l4(dom, ctx, user=None):
    ctx.ctrlreg[3] = dom.vcpus[0].roots.kernel_ma
    if user is not None:
        ctx.ctrlreg[1] = user
    return ctx


@pytest.mark.parametrize("spoil, errno", [
    (lambda dom, c: setattr(c.user_regs, "rip", 0x0000_8000_0000_0000), EINVAL),
    (lambda dom, c: c.trap_ctxt.__setitem__(3, TrapInfo(3, 0, 0x10, 1 << 62)), EINVAL),
    (lambda dom, c: setattr(c, "ldt_ents", 8193), EINVAL),
    (lambda dom, c: setattr(c, "flags", 0), EINVAL),  # user mode without a user L4
    (lambda dom, c: c.ctrlreg.__setitem__(3, 4096), EINVAL),  # not the domain's frame
    (lambda dom, c: c.ctrlreg.__setitem__(3, int(dom.p2m[0x200]) << 12), EINVAL),  # mapped RW
    (lambda dom, c: setattr(c, "gdt_ents", 14 * 512 + 1), EINVAL),
    (lambda dom, c: (setattr(c, "gdt_ents", 16), c.gdt_frames.__setitem__(0, 1)), EINVAL),
])
def test_a_bad_context_is_refused_and_changes_nothing(tmp_path, spoil, errno):
    hv, dom, ctx = _booted(tmp_path)
    _with_l4(dom, ctx)
    spoil(dom, ctx)
    l4 = dom.vcpus[0].roots.kernel_ma >> 12
    ft = hv.frame_table
    before = (int(ft.type_info[l4]), int(ft.count_info[l4]))
    ap = dom.vcpus[1]
    assert initialise_xen_vcpu(hv, ap, ctx) == -errno
    assert ap.context is None and ap.runstate == "down" and ap.roots.kernel_ma == 0
    assert (int(ft.type_info[l4]), int(ft.count_info[l4])) == before
    assert hv.check_typerefs(dom) == []


def test_initialise_twice_is_eexist_and_online_needs_no_up(tmp_path):
    hv, dom, ctx = _booted(tmp_path)
    ap = dom.vcpus[1]
    _with_l4(dom, ctx).flags |= VGCF_ONLINE
    assert initialise_xen_vcpu(hv, ap, ctx) == 0
    assert ap.runstate == "runnable"  # VGCF_online: up at once
    assert initialise_xen_vcpu(hv, ap, ctx) == -EEXIST
    assert hv.check_typerefs(dom) == []


def test_a_user_mode_context_takes_both_roots_and_the_user_gs_base(tmp_path):
    hv, dom, ctx = _booted(tmp_path)
    ap = dom.vcpus[1]
    root = dom.vcpus[0].roots.kernel_ma
    _with_l4(dom, ctx, user=root | 1)  # Xen's saver encoding: bit 0 set
    ctx.flags = 0
    ctx.gs_base_user = 0x7000_0000
    ctx.user_regs.cs, ctx.user_regs.ss = 0x33, 0x2B
    assert initialise_xen_vcpu(hv, ap, ctx) == 0
    assert ap.roots.user_ma == root and not ap.xen.kernel_mode
    assert ap.mmu.user_mode
    assert ap.xen.gs_base_inactive == AP_GS_BASE  # the kernel's, while in user mode
    cpu = hv.switch_to(ap.pcpu, ap)
    assert cpu.reg("gs_base") == 0x7000_0000 and cpu.reg("cs") == 0x33
    assert hv.check_typerefs(dom) == []  # two references on the one L4, both counted


def test_selector_fixup_is_xens():
    assert [fixup_selector(s) for s in (0x10, 0x13, 0x18, 0xE033, 0x2B, 0)] == [
        0x13, 0x13, 0x1B, 0xE033, 0x2B, 3]


def test_the_context_is_read_through_the_callers_mapping(tmp_path):
    code, _ = smp_guest()
    hv = boot(tmp_path, code, vcpus=2)
    v = hv.domains[0].vcpus[0]
    assert call(hv, v, 24, (0, 1, 0x1000, 0, 0)) == -EFAULT  # unmapped
    assert hv.domains[0].vcpus[1].context is None


def test_registrations_made_before_initialise_are_kept(tmp_path):
    """Linux registers vCPU 1's vcpu_info and runstate area from vCPU 0 first."""
    hv, dom, ctx = _booted(tmp_path)
    boot_v, ap = dom.vcpus
    scratch = dom.virt_base + 0x300000
    info_mfn = int(dom.p2m[0x301])
    hv.copy_to_guest(boot_v, scratch, struct.pack("<QI4xQ", info_mfn, 64, scratch + 64))
    assert call(hv, boot_v, 24, (10, 1, scratch, 0, 0)) == 0  # register_vcpu_info(1)
    assert call(hv, boot_v, 24, (5, 1, scratch + 16, 0, 0)) == 0  # runstate area of 1
    assert initialise_xen_vcpu(hv, ap, _with_l4(dom, ctx)) == 0
    assert ap.xen.vcpu_info_ma == info_mfn * 4096 + 64
    assert ap.xen.runstate_area == scratch + 64
