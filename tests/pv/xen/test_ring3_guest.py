"""Xen's PV ABI at CPL 3 with tiny hand-assembled kernels, through real unicorn execution."""

from __future__ import annotations

import struct

import numpy as np

from hypervisor.pv.policy import pv_policy
from hypervisor.pv.xen.cpuid_policy import cpuid
from hypervisor.pv.xen.mmu import GDT_VA
from tests import ROOT
from tests.pv.xen.guest import ENTRY, Asm, boot

MSG = b"hello from ring 3\n"


def test_a_kernel_runs_at_cpl3_with_xen_selectors_and_emulated_priv_ops(tmp_path):
    asm = (Asm()
           .emit("b9").imm32(0xC000_0101).emit("b8").imm32(0x1234_5000).emit("31d2")
           .emit("0f30")  # wrmsr GS base: #GP at CPL 3, emulated
           .emit("b8").imm32(0x4000_0000).emit("31c9")
           .emit("0f0b78656e0fa2")  # forced CPUID: Xen's leaves
           .emit("4989dd")  # mov r13, rbx
           .emit("0f20e0").emit("4989c4")  # mov rax, cr4; mov r12, rax
           .emit("b8").imm32(18).emit("31ff").emit("be").imm32(len(MSG))
           .emit("488d15").rip_rel("msg").emit("0f05")  # console_io(write)
           .shutdown(0)
           .label("msg").data(MSG))
    hv = boot(tmp_path, asm.bytes())
    dom = hv.domains[0]
    cpu = hv.pcpus[0]
    assert cpu.reg("cs") == 0xE033 and cpu.reg("ss") == 0xE02B and cpu.in_ring3
    assert cpu.reg("rip") == ENTRY
    assert hv.run(10_000_000) == "shutdown"
    assert dom.console_text() == MSG.decode()
    assert dom.shutdown is not None and dom.shutdown.reason == "poweroff"
    assert dom.shutdown.code == 0  # Xen's sched_shutdown has the reason only
    assert cpu.reg("gs_base") == 0x1234_5000
    assert cpu.reg("r13") == struct.unpack("<I", b"XenV")[0]
    assert cpu.reg("r12") == 0x620
    x = dom.vcpus[0].xen
    assert x.privops == 2 and x.forced_cpuids == 1
    assert x.hypercalls == {"console_io": 1, "sched_op": 1}
    assert hv.check_typerefs(dom) == []


def test_unknown_behaviour_is_a_crash_report_naming_rip_and_instruction(tmp_path):
    hv = boot(tmp_path, bytes.fromhex("9090f4"))  # nop; nop; hlt (no trap table)
    hv.run(1_000_000)
    dom = hv.domains[0]
    assert dom.shutdown.reason == "crash"
    assert f"at RIP {ENTRY + 2:#x}" in dom.crash_report
    assert "hlt" in dom.crash_report and "unhandled #GP" in dom.crash_report


def test_cli_needs_virtual_iopl(tmp_path):
    asm = Asm().emit("fa")  # cli: #GP without IOPL (no handler: crash)
    hv = boot(tmp_path, asm.bytes())
    hv.run(1_000_000)
    assert "unhandled #GP" in hv.domains[0].crash_report
    iopl = (Asm().emit("b8").imm32(33).emit("bf").imm32(6).emit("488d35").rip_rel("one")
            .emit("0f05").emit("fa").emit("fb").shutdown(0).label("one").imm32(1))
    hv = boot(tmp_path, iopl.bytes())  # PHYSDEVOP_set_iopl(1): cli and sti are no-ops
    assert hv.run(1_000_000) == "shutdown"
    assert hv.domains[0].shutdown.reason == "poweroff"


def test_ptwr_emulates_an_xchg_into_an_l1_table_through_the_typeref_rules(tmp_path):
    placeholder_va, placeholder_pte = 0x1111_2222_3333_4444, 0x5555_6666_7777_8888
    asm = (Asm().hypercall(21, rdi=0, rsi=2)  # vm_assist(enable, writable_pagetables)
           .emit("48bf").imm64(placeholder_va).emit("48b8").imm64(placeholder_pte)
           .emit("488707")  # xchg [rdi], rax: a direct write to a read-only L1 table
           .emit("4989c6")  # mov r14, rax
           .shutdown(0))
    code = asm.bytes()

    def run(make_pte):
        hv = boot(tmp_path, code)
        dom, cpu = hv.domains[0], hv.pcpus[0]
        mem = hv.memory
        # the L1 entry of the last mapped page (padding), and its VA through the initial mapping
        v = dom.vcpus[0]
        from hypervisor.pv.xen.hypercalls import l1_entry_ma
        target_va = dom.virt_base + 0x3FF000
        entry_ma = l1_entry_ma(hv, v, target_va)
        l1_pfn = int(hv.m2p[entry_ma >> 12])
        entry_va = dom.virt_base + l1_pfn * 4096 + (entry_ma & 0xFFF)
        old = int(mem.u64[entry_ma >> 3])
        new = make_pte(hv, dom, old)
        text_ma = int(dom.p2m[0x200]) * 4096
        page = mem.frame_u8(int(dom.p2m[0x200]))
        raw = page.tobytes().replace(struct.pack("<Q", placeholder_va), struct.pack("<Q", entry_va))
        raw = raw.replace(struct.pack("<Q", placeholder_pte), struct.pack("<Q", new))
        mem.write(text_ma, raw)
        hv.run(10_000_000)
        return hv, dom, cpu, entry_ma, old, new

    def data_frame(hv, dom, old):  # another of the domain's data frames, writable
        return (int(dom.p2m[0x300]) << 12) | (old & 0xFFF) | 2

    hv, dom, cpu, entry_ma, old, new = run(data_frame)
    assert dom.shutdown.reason == "poweroff", dom.crash_report
    assert int(hv.memory.u64[entry_ma >> 3]) == new
    assert cpu.reg("r14") == old
    assert dom.vcpus[0].xen.ptwr == 1
    assert hv.check_typerefs(dom) == []

    def l4_writable(hv, dom, old):  # planted bug: a page table mapped writable
        return (dom.vcpus[0].roots.kernel_ma) | (old & 0xFFF) | 2

    hv, dom, cpu, entry_ma, old, new = run(l4_writable)
    assert dom.shutdown.reason == "crash"
    assert "unhandled #PF" in dom.crash_report and "xchg" in dom.crash_report
    assert int(hv.memory.u64[entry_ma >> 3]) == old
    assert hv.check_typerefs(dom) == []


def test_the_gdt_and_m2p_are_xen_pages_the_guest_can_only_read(tmp_path):
    hv = boot(tmp_path, bytes.fromhex("f4"))
    dom, cpu = hv.domains[0], hv.pcpus[0]
    mmu = dom.vcpus[0].mmu
    assert mmu.translate(GDT_VA + 0xE030, "write") is None
    ma, _ = mmu.translate(GDT_VA + 0xE000, "read")
    assert struct.unpack_from("<Q", hv.memory.read(ma + 0x30, 8))[0] == 0x00AF_FB00_0000_FFFF
    m2p_ma, _ = mmu.translate(0xFFFF_8000_0000_0000, "read")
    m2p = np.frombuffer(hv.memory.read(m2p_ma, 4096), dtype=np.uint64)
    first = int(dom.p2m[0])
    if first < 512:
        assert int(m2p[first]) == 0
    assert cpu.read_virtual(0xFFFF_8000_0000_0000 + 8 * int(dom.p2m[5]), 8) == struct.pack("<Q", 5)


def test_cpuid_policy_hides_what_pv_linux_must_not_use():
    _, _, ecx, edx = cpuid(1, 0)
    assert ecx >> 31 & 1  # hypervisor
    assert not ecx >> 26 & 3  # XSAVE, OSXSAVE
    assert not edx & (1 << 3 | 1 << 7 | 1 << 14)  # PSE, MCE, MCA
    assert cpuid(7, 0)[1] & 0x81 == 0  # FSGSBASE, SMEP
    assert struct.pack("<III", *cpuid(0x4000_0000, 0)[1:]) == b"XenVMMXenVMM"


def test_a_kernel_without_xen_notes_is_no_pv_kernel(tmp_path, capsys):
    """One PV ABI: a PV domain's kernel needs Xen's ELF notes (an HVM kernel has none)."""
    from hypervisor.cli import main

    scenario = tmp_path / "s.toml"
    scenario.write_text(f'[machine]\npcpus = 1\nmemory = "16M"\n[[domain]]\nname = "a"\n'
                        f'kernel = "{ROOT / "scenarios/guests/hvm_crash.elf"}"\n'
                        f'memory = "4M"\n[limits]\nvirtual_time = "1ms"\n')
    assert main(["run", str(scenario)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no Xen ELF notes: not a PV kernel" in err


def test_own_guest_hypercall_page_holds_xens_ring3_stubs():
    """The builder wrote Xen's stubs (pv_ring3_init_hypercall_page) where the kernel's
    HYPERCALL_PAGE note says: a `syscall` stub per number, iret's pushing rax too."""
    from capstone import CS_ARCH_X86, CS_MODE_64, Cs

    from hypervisor.runner import boot_scenario
    from hypervisor.scenario import load_scenario
    from tests import SCENARIOS

    hv = boot_scenario(load_scenario(SCENARIOS / "pv-hello.toml"))
    cpu = hv.switch_to(0, hv.domains[0].vcpus[0])
    page = cpu.read_virtual(0xFFFF_FFFF_8000_0000, 4096)  # hypercall_page: kernel.ld's first
    md = Cs(CS_ARCH_X86, CS_MODE_64)

    def stub(n: int) -> list[str]:
        code = page[32 * n:32 * n + 32]
        return [f"{i.mnemonic} {i.op_str}".strip() for i in md.disasm(code, 0)][:7]

    assert stub(18) == ["push rcx", "push r11", "mov eax, 0x12", "syscall", "pop r11",
                        "pop rcx", "ret"]
    assert stub(23)[:5] == ["push rcx", "push r11", "push rax", "mov eax, 0x17", "syscall"]
    assert stub(23)[5] == "int3" and page[-1] == 0xCC


def test_the_direct_walk_agrees_with_the_reference_walk(tmp_path):
    from emulator.paging import WalkFault, walk, walk_direct
    from hypervisor.pv.mmu import _perms

    hv = boot(tmp_path, bytes.fromhex("f4"))
    mmu = hv.domains[0].vcpus[0].mmu
    root = hv.domains[0].vcpus[0].roots.kernel_ma
    view = memoryview(hv.memory.u64)
    base = hv.domains[0].virt_base
    for va in (base, base + 0x201000, base + 0x3FF000, base + 0x7FF000, 0x1000,
               0xFFFF_8000_0000_0000, 0x0000_8000_0000_0000):
        for access in ("read", "write", "fetch"):
            before = hv.memory.u64.copy()
            ref = walk(hv.memory.u64, root, va, access)
            after_ref = hv.memory.u64.copy()
            hv.memory.u64[:] = before
            fast = walk_direct(view, root, va, access)
            assert fast == ref, (hex(va), access)
            assert (hv.memory.u64 == after_ref).all()
            hv.memory.u64[:] = before
            filled = mmu.translate(va, access)  # the fill path: PvMmu's permissions
            if va < 0xFFFF_8000_0000_0000 or va >= 0xFFFF_8800_0000_0000:
                expected = None if isinstance(ref, WalkFault) else (ref.ma, _perms(ref))
                assert filled == expected, (hex(va), access)


def test_the_xenstore_ring_answers_a_kick_on_its_event_channel(tmp_path):
    from hypervisor.pv.linux.domain import STORE_EVTCHN

    asm = (Asm().emit("b8").imm32(32).emit("bf").imm32(4)  # event_channel_op(send, &port)
           .emit("488d35").rip_rel("port").emit("0f05").shutdown(0)
           .label("port").imm32(STORE_EVTCHN))
    hv = boot(tmp_path, asm.bytes())
    dom = hv.domains[0]
    store = dom.backends.xenstore
    request = struct.pack("<IIII", 2, 7, 0, 14) + b"memory/target\0"  # XS_READ memory/target
    store.page[:len(request)] = np.frombuffer(request, np.uint8)
    store.page[2052:2056] = np.frombuffer(struct.pack("<I", len(request)), np.uint8)
    assert hv.run(10_000_000) == "shutdown"
    assert struct.unpack("<I", store.page[2048:2052].tobytes())[0] == len(request)  # consumed
    rsp_prod = struct.unpack("<I", store.page[2060:2064].tobytes())[0]
    msg_type, req_id, _tx, length = struct.unpack("<IIII", store.page[1024:1040].tobytes())
    assert rsp_prod == 16 + length and req_id == 7
    assert msg_type == 2 and store.page[1040:1040 + length].tobytes() == b"8192"  # KiB
    assert dom.events.bits.test(dom.events.bits.PENDING, STORE_EVTCHN)


def test_teardown_releases_xens_pages(tmp_path):
    hv = boot(tmp_path, bytes.fromhex("f4"))
    own = pv_policy(hv).support.own_frames()
    assert own.size > 1 and not hv.frames.free[own.astype(np.int64)].any()
    hv.teardown()
    assert hv.frames.free[own.astype(np.int64)].all()
    assert not hv.memory.u64.reshape(-1, 512)[own.astype(np.int64)].any()
