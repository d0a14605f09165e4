"""Saving a CPL-3 Xen-PV guest mid-run and restoring it: in place (on the machine frames it
was saved from) or relocated, before and after it published its P2M list, with its grant
table."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from hypervisor.core.hypervisor import Hypervisor, MachineConfig
from hypervisor.images.domains import restore_domain, save_domain
from hypervisor.images.verify import image_typerefs, image_verify
from hypervisor.lib.errors import RestoreError
from hypervisor.pv import restore as pv_restore
from hypervisor.pv.xen import grant_table as gt
from hypervisor.pv.xen.hypercalls import l1_entry_ma
from hypervisor.pv.xen.image import ARCH_P2M_CR3, ARCH_P2M_VADDR
from hypervisor.pv.xen.state import VMASST_TYPE_WRITABLE_PAGETABLES
from hypervisor.stream import StreamReader, X86PvVcpuBasicRecord, open_image_for_read
from hypervisor.stream.vcpu_context import VGCF_IN_KERNEL
from tests.pv.xen.guest import (
    ENTRY,
    KERNEL_GS,
    KERNEL_SP,
    LOOPS,
    SHARED_INFO_VA,
    USER_GS,
    Asm,
    boot,
    console,
    set_kernel_state,
)

GRANT_VA = ENTRY + 0x2000  # its third page (the program is padded to three), unused
GRANT_VALUE = 0xC0FFEE


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


def _setup_and_map_grant_frame(asm: Asm) -> Asm:
    """GNTTABOP_setup_table for two frames, map the second at GRANT_VA (update_va_mapping
    with its machine frame, as a PV Linux maps its grant frames) and write GRANT_VALUE."""
    asm.emit("488d05").rip_rel("flist").emit("488905").rip_rel("st_list")
    asm.emit("b8").imm32(20).emit("bf").imm32(gt.GNTTABOP_SETUP_TABLE)
    asm.emit("488d35").rip_rel("st").emit("ba").imm32(1).emit("0f05")
    asm.emit("488b35").rip_rel("flist1").emit("48c1e60c").emit("4883ce67")
    asm.emit("48bf").imm64(GRANT_VA).emit("ba").imm32(2).emit("b8").imm32(14).emit("0f05")
    return asm.emit("48bf").imm64(GRANT_VA).emit("c707").imm32(GRANT_VALUE)


def _program(publish: bool = True, grants: bool = False) -> bytes:
    asm = _publish_p2m(Asm()) if publish else Asm()
    if grants:
        _setup_and_map_grant_frame(asm)
    set_kernel_state(asm)
    console(asm, "before", b"before\n")
    asm.emit("b9").imm32(LOOPS).label("loop").emit("ffc9").emit("75fc")  # dec ecx; jnz loop
    if grants:  # the grant frame, read and written through the guest's own mapping
        asm.emit("48bf").imm64(GRANT_VA).emit("8b07").emit("ffc0").emit("8907")
    console(asm, "after", b"after\n")
    asm.shutdown(0).label("before").data(b"before\n").label("after").data(b"after\n")
    while len(asm.code) % 8:
        asm.emit("90")
    asm.label("st").data(struct.pack("<H2xIh6x", gt.DOMID_SELF, 2, 99))
    asm.label("st_list").data(bytes(8)).label("flist").data(bytes(8)).label("flist1")
    asm.data(bytes(8))
    return asm.data(bytes(0x2800 - len(asm.code))).bytes()  # three pages: code, two free


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


def _saved_mid_loop(tmp_path, program: bytes, name: str):
    """The unsaved run's end, and an image of the same guest saved inside its loop."""
    reference = boot(tmp_path, program)
    assert reference.run(10**9) == "shutdown"
    hv = boot(tmp_path, program)
    assert hv.run(100_000) == "time-limit"
    image = tmp_path / name
    save_domain(hv, hv.domains[0], image)
    assert image_verify(image, out=open("/dev/null", "w"))["ok"]
    assert typeref_mismatches(hv, hv.domains[0], image) == 0
    return reference, hv, image


def typeref_mismatches(hv: Hypervisor, dom, image) -> int:
    """pfns whose page type, type count or pin differ between the live frame table and
    the image's tables validated alone (hvlab image verify's recomputation)."""
    types, counts, pinned = image_typerefs(image)
    mfns = dom.p2m.astype(np.int64)
    live_counts = hv.frame_table.type_counts(mfns).astype(np.int64)
    live_types = np.where(live_counts > 0, hv.frame_table.types(mfns), 0)
    return int(((live_types != types) | (live_counts != counts)
                | (hv.frame_table.pinned(mfns) != pinned)).sum())


def test_an_image_that_loses_its_pins_fails_the_typeref_recomputation(tmp_path, monkeypatch):
    """A planted bug: the saver writes pinned tables as unpinned."""
    from hypervisor.pv import save as pv_save

    monkeypatch.setattr(pv_save, "PIN_OFFSET", 0)
    hv = boot(tmp_path, _program())
    hv.run(100_000)
    save_domain(hv, hv.domains[0], tmp_path / "unpinned.img")
    assert typeref_mismatches(hv, hv.domains[0], tmp_path / "unpinned.img") > 0


def test_a_cpl3_guest_restores_in_place_on_the_frames_it_was_saved_from(tmp_path):
    reference, saved, image = _saved_mid_loop(tmp_path, _program(), "cpl3.img")
    other = Hypervisor(MachineConfig(1, 32 << 20))  # the same machine, nothing else on it
    dom = restore_domain(other, image)
    assert (dom.p2m == saved.domains[0].p2m).all()  # every MFN the guest holds stays true
    assert dom.shared_info_mfn == saved.domains[0].shared_info_mfn
    assert other.run(10**9) == "shutdown"
    assert _final(other) == _final(reference)
    assert other.check_typerefs(dom) == []


def test_a_guest_saved_before_publishing_its_p2m_restores_in_place_only(tmp_path):
    """Before Linux publishes its P2M list it may hold MFNs in the list it is building; the
    image names start_info's list (Xen's rules accept it) and restores on its own frames."""
    reference, saved, image = _saved_mid_loop(tmp_path, _program(publish=False), "early.img")
    busy = Hypervisor(MachineConfig(1, 48 << 20))
    busy.frames.alloc(300, "someone else")  # some of the image's frames are taken here
    free_before = busy.frames.nr_free
    with pytest.raises(RestoreError, match=r"so it restores only onto the machine frames it "
                                           r"was saved from, and \d+ of them are in use"):
        restore_domain(busy, image)
    assert busy.frames.nr_free == free_before and busy.domains == []  # nothing changed

    other = Hypervisor(MachineConfig(1, 32 << 20))
    dom = restore_domain(other, image)
    assert (dom.p2m == saved.domains[0].p2m).all()
    assert other.run(10**9) == "shutdown"
    assert _final(other) == _final(reference)
    assert other.check_typerefs(dom) == []


def _word(hv: Hypervisor, mfn: int) -> int:
    return int(hv.memory.frame_u8(mfn)[:4].view(np.uint32)[0])


def _relocated_grant_guest_run(tmp_path):
    """A guest that maps a grant frame, saved, restored on other frames, run to its end."""
    reference, saved, image = _saved_mid_loop(tmp_path, _program(grants=True), "grants.img")
    old_frames = list(saved.domains[0].grant_table.frames)
    assert _word(saved, old_frames[1]) == GRANT_VALUE
    other = Hypervisor(MachineConfig(1, 48 << 20))
    other.frames.alloc(300, "someone else")  # other frames: the grant frames move too
    dom = restore_domain(other, image)
    table = dom.grant_table
    assert len(table.frames) == 2 and table.version == 1
    assert not set(table.frames) & (set(old_frames) | set(dom.p2m.tolist()))  # moved
    other.run(10**9)
    return reference, other, dom


def test_grant_frames_travel_with_their_contents_and_mappings(tmp_path):
    reference, other, dom = _relocated_grant_guest_run(tmp_path)
    assert _final(other) == _final(reference)
    assert _word(other, dom.grant_table.frames[1]) == GRANT_VALUE + 1
    assert other.check_typerefs(dom) == []


def test_grant_frames_not_mapped_again_fails_the_check(tmp_path, monkeypatch):
    """A planted bug: the restore forgets the entries that mapped the grant frames."""
    real = pv_restore.hypervisor_page_mappings
    monkeypatch.setattr(pv_restore, "hypervisor_page_mappings",
                        lambda linux: [m for m in real(linux) if m[3] == 0])
    reference, other, dom = _relocated_grant_guest_run(tmp_path)
    assert dom.shutdown.reason == "crash"  # its write to the grant frame faulted
    assert _final(other) != _final(reference)
    assert _word(other, dom.grant_table.frames[1]) == GRANT_VALUE
