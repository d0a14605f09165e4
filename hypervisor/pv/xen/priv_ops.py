"""Privileged instructions of a CPL-3 PV guest, emulated as Xen's PV emulator does
(pv/emul-priv-op.c, emul-inv-op.c).

At CPL 3 they raise #GP (the forced-CPUID prefix raises #UD); the decoded
instruction is carried out on the vCPU's virtual state and the guest resumes
after it. What Xen refuses (unknown MSRs, cli/sti without virtual IOPL) comes
back as `INJECT_GP`: the guest's own #GP handler sees it, as on Xen.
Instructions hvlab does not emulate at all return a reason for a crash report.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from capstone import x86_const as cx

from emulator.disasm import _decoder
from emulator.engine import GuestMemoryFault, PhysicalCpu
from hypervisor.pv.xen.cpuid_policy import cpuid
from hypervisor.pv.xen.hypercalls import new_baseptr
from hypervisor.pv.xen.state import CR0_GUEST, CR0_TS, XenVcpu

if TYPE_CHECKING:
    from hypervisor.core.hypervisor import Hypervisor
    from hypervisor.core.vcpu import Vcpu

FORCED_CPUID = b"\x0f\x0bxen\x0f\xa2"  # ud2; "xen"; cpuid (Xen's forced-emulation prefix)
INJECT_GP = "inject #GP"
DONE = "done"

MSR_FS_BASE, MSR_GS_BASE, MSR_SHADOW_GS_BASE = 0xC000_0100, 0xC000_0101, 0xC000_0102
MSR_EFER = 0xC000_0080
# fixed answers Xen gives a PV domU (msr.c guest_rdmsr and the default policy)
MSR_READS = {
    0x10: None,  # TSC: the virtual TSC
    0x17: 0,  # IA32_PLATFORM_ID
    0x1B: 0xFEE0_0900,  # APIC_BASE on vCPU 0: enabled, BSP
    0x3A: 1,  # FEATURE_CONTROL: locked, VMX off
    0x8B: 0,  # microcode revision
    0xCE: 0,  # PLATFORM_INFO
    0x140: 0,  # MISC_FEATURES_ENABLES
    0x1A0: 0x1801,  # MISC_ENABLE: fast strings; BTS and PEBS unavailable
    0x277: 0x0005_0100_0704_06,  # PAT as Xen programs it
    MSR_EFER: 0xD01,  # SCE, LME, LMA, NXE
}
# writes Xen accepts and drops for a PV guest (Linux sends few: it turns the
# base MSRs into set_segment_base and drops the syscall MSRs itself)
MSR_WRITES_IGNORED = frozenset({0x8B, 0x1A0, 0x277, 0xC000_0081, 0xC000_0082, 0xC000_0083,
                                0xC000_0084, 0x174, 0x175, 0x176})
# privileged instructions hvlab does not emulate (Linux under Xen never issues them)
NOT_EMULATED = frozenset({"swapgs", "lgdt", "lidt", "lldt", "ltr", "lmsw", "xsetbv", "mov",
                          "monitor", "mwait", "invpcid", "sysret", "sysretq", "sysexit"})
_GPR64 = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
          "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


def _subregisters() -> dict[str, tuple[str, int, int]]:
    """capstone register name -> (64-bit register, bit shift, width in bytes)."""
    names: dict[str, tuple[str, int, int]] = {}
    for full in _GPR64:
        names[full] = (full, 0, 8)
        if full.startswith("r") and full[1].isdigit():
            names[full + "d"], names[full + "w"], names[full + "b"] = (
                (full, 0, 4), (full, 0, 2), (full, 0, 1))
        else:
            stem = full[1:]  # ax, bx, si, sp ...
            names["e" + stem] = (full, 0, 4)
            names[stem] = (full, 0, 2)
            if stem.endswith("x"):
                names[stem[0] + "l"] = (full, 0, 1)
                names[stem[0] + "h"] = (full, 8, 1)
            else:
                names[stem + "l"] = (full, 0, 1)
    return names


SUBREGISTERS = _subregisters()


def read_operand_reg(cpu: PhysicalCpu, name: str) -> int:
    full, shift, width = SUBREGISTERS[name]
    return (cpu.reg(full) >> shift) & ((1 << 8 * width) - 1)


def write_operand_reg(cpu: PhysicalCpu, name: str, value: int) -> None:
    full, shift, width = SUBREGISTERS[name]
    mask = ((1 << 8 * width) - 1) << shift
    if width == 4:  # a 32-bit write zero-extends
        cpu.set_reg(full, value & 0xFFFF_FFFF)
    else:
        cpu.set_reg(full, cpu.reg(full) & ~mask | (value << shift) & mask)


def forced_cpuid(cpu: PhysicalCpu, v: Vcpu, rip: int) -> bool:
    """`ud2; "xen"; cpuid` at rip: answer from the policy and step over all 7 bytes."""
    try:
        if cpu.read_virtual(rip, len(FORCED_CPUID)) != FORCED_CPUID:
            return False
    except GuestMemoryFault:
        return False
    answer_cpuid(cpu)
    cpu.set_reg("rip", rip + len(FORCED_CPUID))
    assert v.xen is not None
    v.xen.forced_cpuids += 1
    return True


def answer_cpuid(cpu: PhysicalCpu) -> None:
    eax, ebx, ecx, edx = cpuid(cpu.reg("rax"), cpu.reg("rcx"))
    for name, value in (("rax", eax), ("rbx", ebx), ("rcx", ecx), ("rdx", edx)):
        cpu.set_reg(name, value)


def emulate(hv: Hypervisor, cpu: PhysicalCpu, v: Vcpu, rip: int) -> str:
    """Carry out the privileged instruction at `rip`: DONE, INJECT_GP or a crash reason."""
    x = v.xen
    assert x is not None
    try:
        code = cpu.read_virtual(rip, 15 if (rip & 0xFFF) <= 0xFF1 else 0x1000 - (rip & 0xFFF))
    except GuestMemoryFault:
        return "instruction bytes unreadable"
    insns = list(_decoder(True).disasm(code, rip, 1))
    if not insns:
        return "undecodable instruction"
    insn = insns[0]
    outcome = _emulate_insn(hv, cpu, v, x, insn)
    if outcome == DONE:
        cpu.set_reg("rip", rip + insn.size)
        x.privops += 1
    return outcome


def _emulate_insn(hv: Hypervisor, cpu: PhysicalCpu, v: Vcpu, x: XenVcpu, insn) -> str:
    m = insn.mnemonic
    if m == "wrmsr":
        index = cpu.reg("rcx") & 0xFFFF_FFFF
        value = (cpu.reg("rdx") & 0xFFFF_FFFF) << 32 | cpu.reg("rax") & 0xFFFF_FFFF
        return DONE if write_msr(cpu, v, x, index, value) else INJECT_GP
    if m == "rdmsr":
        msr = read_msr(cpu, x, cpu.reg("rcx") & 0xFFFF_FFFF)
        if msr is None:
            return INJECT_GP
        cpu.set_reg("rax", msr & 0xFFFF_FFFF)
        cpu.set_reg("rdx", msr >> 32)
        return DONE
    if m in ("cli", "sti"):
        # no-ops for a kernel with virtual IOPL >= 1 (the event mask is the guest's IF)
        return DONE if x.kernel_mode and x.iopl >= 1 else INJECT_GP
    if not x.kernel_mode:
        return INJECT_GP
    if m == "mov" and len(insn.operands) == 2:
        dst, src = (insn.reg_name(op.reg) if op.type == cx.X86_OP_REG else None
                    for op in insn.operands)
        if src and src.startswith("cr") and dst in SUBREGISTERS:
            cr = _read_cr(hv, v, x, src)
            if cr is None:
                return f"mov from {src} not emulated"
            write_operand_reg(cpu, dst, cr)
            return DONE
        if dst and dst.startswith("cr") and src in SUBREGISTERS:
            return _write_cr(hv, cpu, v, x, dst, read_operand_reg(cpu, src))
    if m == "clts":
        x.cr0_ts = False
        return DONE
    if m in ("wbinvd", "invd"):
        return DONE
    if m == "invlpg":
        cpu.flush_tlb()
        return DONE
    if m in ("rdpmc", "hlt"):
        return INJECT_GP
    if m in NOT_EMULATED:
        text = f"{m} {insn.op_str}".strip()
        return f"privileged instruction '{text}' not emulated"
    return INJECT_GP  # not a privileged instruction: a genuine #GP of the guest's


def _read_cr(hv: Hypervisor, v: Vcpu, x: XenVcpu, name: str) -> int | None:
    if name == "cr0":
        return CR0_GUEST | (CR0_TS if x.cr0_ts else 0)
    if name == "cr2":
        return int(v.domain.events.bits.vcpu_info(v.vcpu_id)[16:24].view("<u8")[0])
    if name == "cr3":
        return v.roots.kernel_ma
    if name == "cr4":
        return x.cr4
    if name == "cr8":
        return 0
    return None


def _write_cr(hv: Hypervisor, cpu: PhysicalCpu, v: Vcpu, x: XenVcpu, name: str,
              value: int) -> str:
    if name == "cr0":
        if (value ^ CR0_GUEST) & ~CR0_TS:
            return INJECT_GP  # only TS may change
        x.cr0_ts = bool(value & CR0_TS)
        return DONE
    if name == "cr3":
        return DONE if new_baseptr(hv, v, value >> 12) == 0 else INJECT_GP
    if name == "cr4":
        x.cr4 = value
        return DONE
    return f"mov to {name} not emulated"


def read_msr(cpu: PhysicalCpu, x: XenVcpu, index: int) -> int | None:
    if index == MSR_FS_BASE:
        return cpu.reg("fs_base")
    if index == MSR_GS_BASE:
        return cpu.reg("gs_base")
    if index == MSR_SHADOW_GS_BASE:
        return x.gs_base_inactive
    if index == 0x10:
        return cpu.tsc()
    return MSR_READS.get(index)


def write_msr(cpu: PhysicalCpu, v: Vcpu, x: XenVcpu, index: int, value: int) -> bool:
    if index == MSR_FS_BASE:
        cpu.set_reg("fs_base", value)
    elif index == MSR_GS_BASE:
        cpu.set_reg("gs_base", value)
    elif index == MSR_SHADOW_GS_BASE:
        x.gs_base_inactive = value
    elif index not in MSR_WRITES_IGNORED:
        return False
    return True
