"""Running CPL-3 PV vCPUs: their exits, their event upcalls, Xen's pages they see.

The dispatcher hands every exit of such a vCPU here:

- `syscall` in kernel mode is a hypercall; in user mode it bounces to the
  guest's syscall callback (#UD without one);
- #GP at a privileged instruction is emulated (priv_ops), #UD at the
  forced-CPUID prefix answered; other faults bounce through the trap table;
- a refused write to an L1 table may be a ptwr write, else it is the guest's #PF
  (CR2 in vcpu_info, USER in the error code only from user mode);
- what hvlab cannot carry out is a crash report naming RIP, instruction, reason.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import numpy as np

from emulator.disasm import disassemble_with
from emulator.engine import GPRS, PhysicalCpu
from emulator.exits import (
    BudgetExhausted,
    Cpuid,
    EngineError,
    Exit,
    GuestException,
    Halt,
    Hypercall,
    InvalidOpcode,
    MmuFault,
    PortIO,
    Syscall,
)
from emulator.paging import PF_USER, WalkFault
from hypervisor.pv.xen import priv_ops
from hypervisor.pv.xen.bounce import BounceError, bounce
from hypervisor.pv.xen.descriptors import loadable_at_cpl3
from hypervisor.pv.xen.hypercalls import HYPERVISOR_IRET, call
from hypervisor.pv.xen.mmu import GDT_VA
from hypervisor.pv.xen.ptwr import try_ptwr
from hypervisor.pv.xen.state import FLAT_KERNEL_CS, FLAT_KERNEL_SS, XenVcpu

if TYPE_CHECKING:
    from hypervisor.core.hypervisor import Hypervisor
    from hypervisor.core.vcpu import Vcpu

# Xen's GDT page (entries 7168-7679): the flat ring-3 descriptors at their selectors
XEN_DESCRIPTORS = {0xE023: 0x00CF_FB00_0000_FFFF, 0xE02B: 0x00CF_F300_0000_FFFF,
                   0xE033: 0x00AF_FB00_0000_FFFF}
XEN_GDT_FIRST_SELECTOR = 0xE000
VECTORS_WITH_ERROR_CODE = frozenset({8, 10, 11, 12, 13, 14, 17})
VCPU_INFO_CR2 = 16
VECTOR_NAMES = {0: "#DE", 1: "#DB", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD", 7: "#NM",
                8: "#DF", 10: "#TS", 11: "#NP", 12: "#SS", 13: "#GP", 14: "#PF", 16: "#MF",
                17: "#AC", 18: "#MC", 19: "#XM"}
INITIAL_RFLAGS = 0x202  # IF (always set for real) and the reserved bit 1


def xen_gdt_page() -> bytes:
    page = bytearray(4096)
    for selector, descriptor in XEN_DESCRIPTORS.items():
        struct.pack_into("<Q", page, selector - XEN_GDT_FIRST_SELECTOR & ~7, descriptor)
    return bytes(page)


class XenPvSupport:
    """Xen's pages shared by every CPL-3 PV domain, and the exit handling of their vCPUs."""

    def __init__(self, hv: Hypervisor) -> None:
        self.hv = hv
        self.gdt_mfn: int | None = None
        self.m2p_mfns: np.ndarray | None = None

    # ------------------------------------------------------- Xen's own pages
    def xen_pages(self) -> tuple[int, tuple[int, ...]]:
        """Machine addresses of Xen's GDT page and of the read-only M2P's pages."""
        hv = self.hv
        if self.gdt_mfn is None:
            self.gdt_mfn = hv.frames.alloc_one("Xen's GDT page")
            hv.memory.write(self.gdt_mfn * 4096, xen_gdt_page())
            pages = -(-hv.memory.nr_frames * 8 // 4096)
            self.m2p_mfns = hv.frames.alloc(pages, "the read-only M2P")
        assert self.m2p_mfns is not None
        return self.gdt_mfn * 4096, tuple(int(m) * 4096 for m in self.m2p_mfns)

    def own_frames(self) -> np.ndarray:
        """The frames of Xen's pages (released with the hypervisor, as its GDT is)."""
        if self.gdt_mfn is None or self.m2p_mfns is None:
            return np.zeros(0, dtype=np.uint64)
        return np.concatenate([np.array([self.gdt_mfn], dtype=np.uint64), self.m2p_mfns])

    def refresh_m2p(self) -> None:
        """Copy the M2P into the pages the guests read (after frames changed hands)."""
        assert self.m2p_mfns is not None
        flat = self.hv.memory.u64.reshape(-1, 512)
        table = np.zeros(len(self.m2p_mfns) * 512, dtype=np.uint64)
        table[:self.hv.m2p.size] = self.hv.m2p
        flat[self.m2p_mfns.astype(np.int64)] = table.reshape(-1, 512)

    def start_vcpu(self, v: Vcpu, rip: int, rsp: int, rsi: int, l4_ma: int) -> None:
        """vCPU state at Xen's start of day: CPL 3 on the flat selectors, events masked."""
        x = v.xen
        assert x is not None
        x.kernel_sp = rsp
        v.roots.kernel_ma = l4_ma

        def setup(cpu: PhysicalCpu) -> None:
            cpu.set_reg("cr4", x.cr4)
            cpu.set_reg("cr3", l4_ma)
            cpu.set_reg("cr0", 0x8005_0033)
            cpu.set_descriptor_table("gdtr", GDT_VA, 16 * 4096 - 1)
            cpu.set_reg("mxcsr", 0x1F80)
            cpu.enter_ring3(rip, rsp, INITIAL_RFLAGS, FLAT_KERNEL_CS, FLAT_KERNEL_SS)
            cpu.set_reg("rsi", rsi)

        self.hv.start_vcpu_with(v, setup)

    def resume_vcpu(self, v: Vcpu, regs: dict[str, int], cpu_cr4: int) -> None:
        """A restored or VCPUOP_initialise'd vCPU at CPL 3 with the given registers (its
        XenVcpu, roots and mode already set): as start_vcpu, but every register given."""
        x = v.xen
        assert x is not None
        v.mmu.user_mode = not x.kernel_mode  # type: ignore[attr-defined]
        v.mmu.guest_gdt = x.gdt_frames  # type: ignore[attr-defined]

        def setup(cpu: PhysicalCpu) -> None:
            cpu.set_reg("cr4", cpu_cr4)
            cpu.set_reg("cr3", v.roots.kernel_ma)
            cpu.set_reg("cr0", 0x8005_0033)
            cpu.set_descriptor_table("gdtr", GDT_VA, 16 * 4096 - 1)
            # the CPU loads the selectors' descriptors (a 32-bit user CS stays 32-bit);
            # one it could not load at CPL 3 is entered on Xen's flat ones, the selector
            # value kept (Xen would fault on it at the guest's first instruction)
            cs, ss = regs["cs"], regs["ss"]
            if not (self._loadable(x, cs, code=True) and self._loadable(x, ss, code=False)):
                cs, ss = FLAT_KERNEL_CS, FLAT_KERNEL_SS
            cpu.enter_ring3(regs["rip"], regs["rsp"], regs["rflags"], cs, ss)
            for name, value in regs.items():
                cpu.set_reg(name, value)

        self.hv.start_vcpu_with(v, setup)

    def _loadable(self, x: XenVcpu, selector: int, code: bool) -> bool:
        """Whether `iretq` at CPL 3 can load `selector` (Xen's page or the guest's GDT)."""
        index = selector >> 3
        if selector >= XEN_GDT_FIRST_SELECTOR:
            desc = XEN_DESCRIPTORS.get(selector & ~7 | 3)
        elif index < x.gdt_entries and index // 512 < len(x.gdt_frames) and index:
            desc = int(self.hv.memory.u64[x.gdt_frames[index // 512] * 512 + index % 512])
        else:
            return False
        return desc is not None and selector & 4 == 0 and loadable_at_cpl3(desc, code)

    # --------------------------------------------------------------- exits
    def handle(self, cpu: PhysicalCpu, v: Vcpu, exit_: Exit) -> None:
        x = v.xen
        assert x is not None
        match exit_:
            case BudgetExhausted() | Cpuid() | PortIO():
                pass
            case Syscall():
                self._syscall(cpu, v, x, exit_)
            case GuestException(vector=13, error_code=0):
                outcome = priv_ops.emulate(self.hv, cpu, v, exit_.rip)
                if outcome == priv_ops.INJECT_GP:
                    self.inject(cpu, v, 13, 0, exit_.rip, exit_.rip)
                elif outcome != priv_ops.DONE:
                    self.crash(cpu, v, exit_.rip, outcome)
            case GuestException(vector=vector, error_code=err, next_rip=next_rip):
                self.inject(cpu, v, vector, err, next_rip, exit_.rip)
            case MmuFault(gva=gva, reason=WalkFault() as fault):
                if fault.error_code & 2 and try_ptwr(self.hv, cpu, v, gva, fault.error_code):
                    return
                err = fault.error_code | (0 if x.kernel_mode else PF_USER)
                self.inject(cpu, v, 14, err, exit_.rip, exit_.rip, cr2=gva)
            case MmuFault(gva=gva):
                self.crash(cpu, v, exit_.rip, f"translation of {gva:#x} refused")
            case InvalidOpcode() | Hypercall():  # vmcall is no hypercall at CPL 3
                if not priv_ops.forced_cpuid(cpu, v, exit_.rip):
                    self.inject(cpu, v, 6, None, exit_.rip, exit_.rip)
            case Halt():
                self.crash(cpu, v, exit_.rip, "hlt completed at CPL 3")
            case EngineError(message=message):
                self.crash(cpu, v, exit_.rip, message)

    def _syscall(self, cpu: PhysicalCpu, v: Vcpu, x: XenVcpu, exit_: Syscall) -> None:
        next_rip = exit_.rip + 2
        if x.kernel_mode:
            number = cpu.reg("rax") & 0xFFFF_FFFF
            args = tuple(cpu.reg(r) for r in ("rdi", "rsi", "rdx", "r10", "r8"))
            try:
                rc = call(self.hv, v, number, args)
            except BounceError as err:
                self.crash(cpu, v, exit_.rip, f"hypercall {number}: {err}")
                return
            cpu.set_reg("rax", rc & 0xFFFF_FFFF_FFFF_FFFF)
            if number != HYPERVISOR_IRET:
                cpu.set_reg("rip", next_rip)
            return
        if not v.syscall_callback:
            self.inject(cpu, v, 6, None, exit_.rip, exit_.rip)
            return
        try:
            bounce(self.hv, cpu, v, v.syscall_callback, return_rip=next_rip,
                   rcx_r11=(next_rip, cpu.reg("rflags")), mask_events=x.syscall_masks_events,
                   clear_df=True)
        except BounceError as err:
            self.crash(cpu, v, exit_.rip, f"system call: {err}")

    def deliver_upcall(self, cpu: PhysicalCpu, v: Vcpu) -> None:
        """An event is pending and unmasked: bounce to the event callback, events masked."""
        try:
            bounce(self.hv, cpu, v, v.event_callback, return_rip=cpu.reg("rip"),
                   mask_events=True)
        except BounceError as err:
            self.crash(cpu, v, cpu.reg("rip"), f"event upcall: {err}")
            return
        v.upcalls += 1

    def inject(self, cpu: PhysicalCpu, v: Vcpu, vector: int, error_code: int | None,
               return_rip: int, fault_rip: int, cr2: int | None = None) -> None:
        """Bounce an exception through the guest's trap table (Xen's pv_inject_event)."""
        entry = v.trap_table.get(vector)
        name = VECTOR_NAMES.get(vector, f"vector {vector}")
        if entry is None or not entry.address:
            detail = f" (error code {error_code:#x})" if error_code is not None else ""
            detail += f", CR2 {cr2:#x}" if cr2 is not None else ""
            self.crash(cpu, v, fault_rip, f"unhandled {name}{detail}: no trap-table entry")
            return
        if vector in VECTORS_WITH_ERROR_CODE and error_code is None:
            error_code = 0
        if cr2 is not None:
            info = v.domain.events.bits.vcpu_info(v.vcpu_id)
            info[VCPU_INFO_CR2:VCPU_INFO_CR2 + 8] = np.frombuffer(struct.pack("<Q", cr2),
                                                                  np.uint8)
        try:
            bounce(self.hv, cpu, v, entry.address, return_rip=return_rip,
                   error_code=error_code, mask_events=entry.masks_events)
        except BounceError as err:
            self.crash(cpu, v, fault_rip, f"delivering {name}: {err}")

    def crash(self, cpu: PhysicalCpu, v: Vcpu, rip: int, why: str) -> None:
        insn = disassemble_with(cpu.read_virtual, rip)
        mode = "kernel" if v.xen is not None and v.xen.kernel_mode else "user"
        regs = " ".join(f"{r}={cpu.reg(r):#x}" for r in GPRS[:8])
        self.hv.crash_domain(v.domain, f"{v.name}: {why} at RIP {rip:#x} ({mode} mode): "
                                       f"{insn}; {regs}")
