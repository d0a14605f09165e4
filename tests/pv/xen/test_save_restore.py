"""Saving a CPL-3 Xen-PV guest mid-run and restoring it into another hypervisor."""

from __future__ import annotations

import pytest

from hypervisor.core.hypervisor import Hypervisor, MachineConfig
from hypervisor.images.domains import restore_domain, save_domain
from hypervisor.images.verify import image_verify
from hypervisor.lib.errors import SaveError
from hypervisor.pv.xen.hypercalls import l1_entry_ma
from hypervisor.pv.xen.image import ARCH_P2M_CR3, ARCH_P2M_VADDR
from hypervisor.pv.xen.state import VMASST_TYPE_WRITABLE_PAGETABLES
from hypervisor.stream import StreamReader, X86PvVcpuBasicRecord, open_image_for_read
from hypervisor.stream.vcpu_context import VGCF_IN_KERNEL
from tests.pv.xen.guest import ENTRY, Asm, boot

KERNEL_GS, USER_GS, KERNEL_SP = 0x1234_5000, 0x5678_0000, 0xABC0_00
LOOPS = 200_000
SHARED_INFO_VA = ENTRY + 0x1000  # the kernel image's second page, unused


def _console(asm: Asm, label: str, text: bytes) -> Asm:
    return (asm.emit("b8").imm32(18).emit("31ff").emit("be").imm32(len(text))
            .emit("488d15").rip_rel(label).emit("0f05"))


def _publish_p2m(asm: Asm) -> Asm:
    """What Linux does: map shared_info (update_va_mapping with start_info's machine
    address) and publish its P2M list there (arch.p2m_cr3 and p2m_vaddr)."""
    return (asm.emit("4889f3")  # mov rbx, rsi (start_info)
            .emit("488b4328").emit("4883c867").emit("4889c6")  # rsi = shared_info | P RW US A D
            .emit("48bf").imm64(SHARED_INFO_VA).emit("31d2")
            .emit("b8").imm32(14).emit("0f05")  # update_va_mapping
            .emit("0f20d8")  # mov rax, cr3 (emulated: the kernel root's machine address)
            .emit("48bf").imm64(SHARED_INFO_VA)
            .emit("488987").imm32(ARCH_P2M_CR3)  # mov [rdi + p2m_cr3], rax
            .emit("488b4368")  # mov rax, [rbx + 104] (start_info.mfn_list)
            .emit("488987").imm32(ARCH_P2M_VADDR))  # mov [rdi + p2m_vaddr], rax


def _program(publish: bool = True) -> bytes:
    asm = _publish_p2m(Asm()) if publish else Asm()
    asm = (asm
           .emit("b9").imm32(0xC000_0101).emit("b8").imm32(KERNEL_GS).emit("31d2").emit("0f30")
           .emit("b9").imm32(0xC000_0102).emit("b8").imm32(USER_GS).emit("31d2").emit("0f30")
           .hypercall(3, rdi=0xE02B, rsi=KERNEL_SP)  # stack_switch
           .hypercall(21, rdi=0, rsi=VMASST_TYPE_WRITABLE_PAGETABLES)  # vm_assist enable
           .emit("0f20e0").emit("480d").imm32(0x10000).emit("0f22e0"))  # cr4 |= FSGSBASE
    _console(asm, "before", b"before\n")
    asm.emit("b9").imm32(LOOPS).label("loop").emit("ffc9").emit("75fc")  # dec ecx; jnz loop
    _console(asm, "after", b"after\n")
    return (asm.shutdown(0).label("before").data(b"before\n").label("after").data(b"after\n")
            .bytes())


def _final(hv: Hypervisor):
    dom = hv.domains[-1]
    v = dom.vcpus[0]
    x = v.xen
    regs = hv.read_vcpu_registers(v)
    return (dom.console_text(), dom.shutdown.reason, dom.shutdown.code, regs["gs_base"],
            x.gs_base_inactive, x.kernel_sp, x.kernel_ss, x.cr4, x.vm_assist, x.kernel_mode,
            dict(x.hypercalls), x.privops)


def test_a_cpl3_guest_saved_mid_run_restores_and_ends_as_the_unsaved_run(tmp_path):
    reference = boot(tmp_path, _program())
    assert reference.run(10**9) == "shutdown"

    hv = boot(tmp_path, _program())
    assert hv.run(100_000) == "time-limit"  # inside the loop: "before" written, "after" not
    assert hv.domains[0].console_text() == "before\n"
    image = tmp_path / "cpl3.img"
    save_domain(hv, hv.domains[0], image)

    with open_image_for_read(image) as f:  # Xen's own record carries Xen's vCPU state
        ctx = next(r for r in StreamReader(f) if isinstance(r, X86PvVcpuBasicRecord)
                   ).guest_context()
    assert ctx.flags & VGCF_IN_KERNEL
    assert (ctx.gs_base_kernel, ctx.gs_base_user) == (KERNEL_GS, USER_GS)
    assert (ctx.kernel_ss, ctx.kernel_sp) == (0xE02B, KERNEL_SP)
    assert ctx.vm_assist == 1 << VMASST_TYPE_WRITABLE_PAGETABLES
    assert ctx.ctrlreg[4] == 0x620 | 0x10000
    assert (ctx.user_regs.cs, ctx.user_regs.ss) == (0xE033, 0xE02B)
    assert image_verify(image, out=open("/dev/null", "w"))["ok"]

    other = Hypervisor(MachineConfig(1, 48 << 20))
    other.frames.alloc(300, "someone else")  # the restored domain gets other frames
    dom = restore_domain(other, image)
    assert dom.vcpus[0].xen is not None and other.check_typerefs(dom) == []
    entry = int(other.memory.u64[l1_entry_ma(other, dom.vcpus[0], SHARED_INFO_VA) // 8])
    assert entry >> 12 == dom.shared_info_mfn  # mapped again: the new hypervisor page
    assert other.run(10**9) == "shutdown"
    assert _final(other) == _final(reference)
    assert other.check_typerefs(dom) == []


def test_a_guest_that_has_not_published_its_p2m_is_refused_and_nothing_is_written(tmp_path):
    hv = boot(tmp_path, _program(publish=False))
    hv.run(100_000)
    image = tmp_path / "early.img"
    with pytest.raises(SaveError, match="has not published its P2M list"):
        save_domain(hv, hv.domains[0], image)
    assert not image.exists()
