"""Bounce frames and HYPERVISOR_iret, called directly on a booted tiny CPL-3 kernel."""

from __future__ import annotations

import struct

import pytest

from hypervisor.core.vcpu import TrapEntry
from hypervisor.pv.policy import pv_policy
from hypervisor.pv.xen.bounce import IRET_FRAME, BounceError, bounce, hypervisor_iret
from tests.pv.xen.guest import ENTRY, boot


def _setup(tmp_path):
    hv = boot(tmp_path, bytes.fromhex("f4"))
    dom = hv.domains[0]
    v = dom.vcpus[0]
    cpu = hv.pcpus[0]
    return hv, dom, v, cpu


def test_a_page_fault_from_kernel_mode_bounces_with_xens_frame(tmp_path):
    hv, dom, v, cpu = _setup(tmp_path)
    v.trap_table[14] = TrapEntry(14, 4, 0xE030, ENTRY + 0x100)  # an "interrupt gate"
    dom.events.bits.set_upcall_mask(0, False)
    cpu.set_reg("rcx", 0x1111)
    cpu.set_reg("r11", 0x2222)
    rsp = cpu.reg("rsp")
    pv_policy(hv).support.inject(cpu, v, 14, 0x2, ENTRY + 7, ENTRY + 7, cr2=0xDEAD_B000)
    new_rsp = cpu.reg("rsp")
    assert new_rsp == (rsp & ~0xF) - 8 * 8
    frame = struct.unpack("<8Q", hv.copy_from_guest(v, new_rsp, 64))
    assert frame == (0x1111, 0x2222, 0x2, ENTRY + 7, 0xE030, 0x202, rsp, 0xE02B)
    assert cpu.reg("rip") == ENTRY + 0x100 and cpu.reg("cs") == 0xE033
    assert dom.events.bits.upcall_mask(0)  # interrupt gate: events masked
    info = dom.events.bits.vcpu_info(0)
    assert struct.unpack("<Q", info[16:24].tobytes())[0] == 0xDEAD_B000


def test_iret_to_user_mode_switches_root_and_gs_and_a_syscall_comes_back(tmp_path):
    hv, dom, v, cpu = _setup(tmp_path)
    x = v.xen
    v.roots.user_ma = v.roots.kernel_ma  # a user root (the same tables will do here)
    x.kernel_sp = 0xFFFF_FFFF_8020_0F00
    cpu.set_reg("gs_base", 0x6000)
    x.gs_base_inactive = 0x7000  # the user's GS base while in kernel mode
    rsp = cpu.reg("rsp") - IRET_FRAME.size
    user_rsp = 0xFFFF_FFFF_8020_0800
    hv.copy_to_guest(v, rsp, IRET_FRAME.pack(42, 0x346, 0x999, 0, ENTRY + 1, 0x33, 0x246,
                                             user_rsp, 0x2B))
    cpu.set_reg("rsp", rsp)
    assert hypervisor_iret(hv, cpu, v) == 42
    assert not x.kernel_mode and v.mmu.user_mode
    assert cpu.reg("gs_base") == 0x7000 and x.gs_base_inactive == 0x6000
    assert (cpu.reg("rip"), cpu.reg("cs"), cpu.reg("rsp"), cpu.reg("ss")) == (
        ENTRY + 1, 0x33, user_rsp, 0x2B)
    assert cpu.reg("r11") == 0x346 and cpu.reg("rcx") == 0x999
    assert not dom.events.bits.upcall_mask(0)  # IF set in the frame
    # from user mode a bounce lands on the kernel stack, back in kernel mode
    bounce(hv, cpu, v, ENTRY + 0x200, return_rip=ENTRY + 3, rcx_r11=(ENTRY + 3, 0x246),
           mask_events=True)
    assert x.kernel_mode and cpu.reg("gs_base") == 0x6000
    assert cpu.reg("rsp") == 0xFFFF_FFFF_8020_0F00 - 7 * 8
    frame = struct.unpack("<7Q", hv.copy_from_guest(v, cpu.reg("rsp"), 56))
    assert frame == (ENTRY + 3, 0x246, ENTRY + 3, 0x33, 0x246, user_rsp, 0x2B)


def test_iret_to_user_mode_without_a_user_root_is_refused(tmp_path):
    hv, dom, v, cpu = _setup(tmp_path)
    rsp = cpu.reg("rsp") - IRET_FRAME.size
    hv.copy_to_guest(v, rsp, IRET_FRAME.pack(0, 0, 0, 0, ENTRY, 0x33, 0x246, rsp, 0x2B))
    cpu.set_reg("rsp", rsp)
    with pytest.raises(BounceError, match="without a user page table"):
        hypervisor_iret(hv, cpu, v)
    assert v.xen.kernel_mode


def _run_pv_faults() -> dict:
    from hypervisor.runner import boot_scenario, describe
    from hypervisor.scenario import load_scenario
    from tests import SCENARIOS

    scenario = load_scenario(SCENARIOS / "pv-faults.toml")
    hv = boot_scenario(scenario)
    stop = hv.run(100_000)  # 100 us: pv_faults is done in 20 us; a broken one stops here
    (dom,) = describe(hv, scenario, stop, 0.0)["domains"]
    hv.teardown()
    return dom


def test_own_guests_take_faults_through_bounce_and_iret_and_planted_bugs_show(monkeypatch):
    """pv_faults handles #DE, #BP and #PF on Xen's bounce frame and returns with
    HYPERVISOR_iret (lib BOUNCE_ENTRY/BOUNCE_IRET): it passes its checks, and a frame
    with two words swapped, or an iret reading its frame one word off, breaks it."""
    from hypervisor.pv.xen import hypercalls as pv_calls
    from hypervisor.pv.xen import support

    def passed(dom: dict) -> bool:
        return dom["shutdown"] is not None and dom["shutdown"] == {"reason": "poweroff", "code": 0,
                                   "virtual_ns": dom["shutdown"]["virtual_ns"]}

    good = _run_pv_faults()
    assert passed(good), good["console"]
    assert good["xen_pv"]["bounces"] == 7 and good["xen_pv"]["hypercalls"]["iret"] == 7

    real_bounce = support.bounce

    def swapped_frame(hv, cpu, v, handler, **kwargs):
        real_bounce(hv, cpu, v, handler, **kwargs)
        rsp = cpu.reg("rsp")  # R11 and the word after it (error code or RIP) swapped
        r11, after = struct.unpack("<QQ", hv.copy_from_guest(v, rsp + 8, 16))
        hv.copy_to_guest(v, rsp + 8, struct.pack("<QQ", after, r11))

    monkeypatch.setattr(support, "bounce", swapped_frame)
    assert not passed(_run_pv_faults())  # a crash, a failed check or no end in time
    monkeypatch.undo()

    real_iret = pv_calls.hypervisor_iret

    def iret_one_word_off(hv, cpu, v):
        cpu.set_reg("rsp", cpu.reg("rsp") + 8)
        return real_iret(hv, cpu, v)

    monkeypatch.setattr(pv_calls, "hypervisor_iret", iret_one_word_off)
    assert not passed(_run_pv_faults())
