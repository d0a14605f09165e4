"""Writable page tables (VMASST_TYPE_writable_pagetables): a guest kernel's direct write
to one of its L1 tables, emulated as Xen's ptwr does (pv/ro-page-fault.c).

Conditions, as in Xen: the assist is on; a write fault on a present page, not
a fetch, no reserved bit; guest kernel mode; the target frame is an L1 page
table of the domain. One instruction is decoded (capstone) and emulated: mov,
xchg, cmpxchg, and, or with the table entry as destination, naturally
aligned, 1 to 8 bytes merged into the 8-byte entry. The new entry goes
through mmu_update's checks (the typeref rules: get_page_from_l1e, the old
entry's reference dropped). Anything else is the guest's own #PF. During a
lazy live update's shadow period the domain's tables are validated first
(`finish_pending_typing`, as before any page-table hypercall): a table not
typed yet in the new build is an L1 all the same.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from capstone import x86_const as cx

from emulator.disasm import _decoder
from emulator.engine import GuestMemoryFault, PhysicalCpu
from emulator.paging import PF_FETCH, PF_PRESENT, PF_RSVD, PF_WRITE, WalkFault, walk
from hypervisor.mm.builds import PageType
from hypervisor.pv.hypercalls import VcpuMmuContext
from hypervisor.pv.mmu_ops import MMU_NORMAL_PT_UPDATE, do_mmu_update
from hypervisor.pv.vcpu import finish_pending_typing
from hypervisor.pv.xen.priv_ops import SUBREGISTERS, read_operand_reg, write_operand_reg
from hypervisor.pv.xen.state import VMASST_TYPE_WRITABLE_PAGETABLES

if TYPE_CHECKING:
    from hypervisor.core.hypervisor import Hypervisor
    from hypervisor.core.vcpu import Vcpu

RFLAGS_ZF = 1 << 6
EMULATED = ("mov", "xchg", "cmpxchg", "and", "or")


def try_ptwr(hv: Hypervisor, cpu: PhysicalCpu, v: Vcpu, gva: int, error_code: int) -> bool:
    """Emulate the faulting write if it is a ptwr write; False: deliver the #PF."""
    x = v.xen
    assert x is not None
    if not (x.assists(VMASST_TYPE_WRITABLE_PAGETABLES) and x.kernel_mode):
        return False
    if error_code & (PF_PRESENT | PF_WRITE | PF_RSVD | PF_FETCH) != PF_PRESENT | PF_WRITE:
        return False
    t = walk(hv.memory.u64, v.mmu.active_root, gva, "read", set_accessed=False)  # type: ignore[attr-defined]
    if isinstance(t, WalkFault):
        return False
    mfn = t.ma >> 12
    if hv.frame_table.owner_of(mfn) != v.domain.domid:
        return False
    # a lazy live update still validating: the table may not be typed yet in this build,
    # so validate first, as every page-table hypercall does
    finish_pending_typing(v.domain)
    if hv.frame_table.page_type(mfn) != PageType.L1:
        return False
    rip = cpu.reg("rip")
    try:
        code = cpu.read_virtual(rip, 15 if (rip & 0xFFF) <= 0xFF1 else 0x1000 - (rip & 0xFFF))
    except GuestMemoryFault:
        return False
    insns = list(_decoder(True).disasm(code, rip, 1))
    if not insns or insns[0].mnemonic.split()[-1] not in EMULATED:
        return False
    insn = insns[0]
    done = _emulate_write(hv, cpu, v, insn, t.ma + (gva & 0xFFF))
    if done:
        cpu.set_reg("rip", rip + insn.size)
        x.ptwr += 1
    return done


def _emulate_write(hv: Hypervisor, cpu: PhysicalCpu, v: Vcpu, insn, target_ma: int) -> bool:
    ops = insn.operands
    if len(ops) != 2 or ops[0].type != cx.X86_OP_MEM:
        return False
    size = ops[0].size
    if size not in (1, 2, 4, 8) or target_ma % size:
        return False  # Xen: naturally aligned writes only
    src = ops[1]
    if src.type == cx.X86_OP_REG:
        src_name = insn.reg_name(src.reg)
        if src_name not in SUBREGISTERS:
            return False
        value = read_operand_reg(cpu, src_name)
    elif src.type == cx.X86_OP_IMM:
        src_name = None
        value = src.imm
    else:
        return False
    mask = (1 << 8 * size) - 1
    value &= mask
    entry_ma = target_ma & ~7
    shift = 8 * (target_ma & 7)
    old_entry = int(hv.memory.u64[entry_ma >> 3])
    old = old_entry >> shift & mask
    mnemonic = insn.mnemonic.split()[-1]  # drop a lock prefix
    new = value
    if mnemonic == "and":
        new = old & value
    elif mnemonic == "or":
        new = old | value
    elif mnemonic == "cmpxchg":
        accumulator = {1: "al", 2: "ax", 4: "eax", 8: "rax"}[size]
        if read_operand_reg(cpu, accumulator) != old:
            write_operand_reg(cpu, accumulator, old)
            cpu.set_reg("rflags", cpu.reg("rflags") & ~RFLAGS_ZF)
            return True  # no write: nothing for the tables to check
        cpu.set_reg("rflags", cpu.reg("rflags") | RFLAGS_ZF)
    new_entry = old_entry & ~(mask << shift) | new << shift
    rc, _ = do_mmu_update(VcpuMmuContext(hv, v), [[entry_ma | MMU_NORMAL_PT_UPDATE, new_entry]])
    if rc:
        return False
    if mnemonic == "xchg" and src_name is not None:
        write_operand_reg(cpu, src_name, old)
    return True
