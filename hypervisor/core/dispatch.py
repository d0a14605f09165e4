"""The one exit dispatcher: every reason a pCPU stopped guest code comes here.

`handle` is called after a run returns an exit; `handle_sync` is called from
inside the engine's hooks for exits answered on the spot (cpuid, port I/O)
and returns True when the guest may simply go on.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

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
from emulator.interrupts import GATE_TRAP, DeliveryError, Gate, deliver
from emulator.paging import WalkFault
from hypervisor.core import hypercalls
from hypervisor.core.vcpu import BLOCKED, Vcpu
from hypervisor.hvm.mmu import EptViolation
from hypervisor.lib.errno import ENOSYS
from hypervisor.pv.xen.priv_ops import answer_cpuid

if TYPE_CHECKING:
    from hypervisor.core.hypervisor import Hypervisor

EXIT_NAMES = {
    BudgetExhausted: "budget",
    Hypercall: "hypercall",
    Halt: "halt",
    Cpuid: "cpuid",
    PortIO: "port_io",
    GuestException: "exception",
    MmuFault: "page_fault",
    InvalidOpcode: "invalid_opcode",
    EngineError: "engine_error",
    Syscall: "syscall",
}

VECTOR_NAMES = {0: "#DE", 1: "#DB", 2: "NMI", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD", 7: "#NM",
                8: "#DF", 10: "#TS", 11: "#NP", 12: "#SS", 13: "#GP", 14: "#PF", 16: "#MF",
                17: "#AC", 18: "#MC", 19: "#XM"}

DEBUG_CONSOLE_PORT = 0xE9
KERNEL_CS = 0x08
VCPU_INFO_CR2 = 16  # offset of arch.cr2 in vcpu_info

# CPUID: a deterministic answer for every leaf (never the host's).
XEN_SIGNATURE = struct.unpack("<III", b"XenVMMXenVMM")
CPUID_TABLE: dict[int, tuple[int, int, int, int]] = {
    0x0: (0x1, *struct.unpack("<III", b"GenuntelineI")),  # ebx, ecx, edx: "GenuineIntel"
    0x1: (0x000306C3, 0x00000800, 0x80000000, 0x0000_0000),  # ecx bit 31: hypervisor present
    0x4000_0000: (0x4000_0002, *XEN_SIGNATURE),
    0x4000_0001: (0x0004_0013, 0, 0, 0),  # Xen 4.19
    0x8000_0000: (0x8000_0001, 0, 0, 0),
    0x8000_0001: (0, 0, 0, 0x2010_0800),  # LM, NX, SYSCALL
}


class ExitDispatcher:
    def __init__(self, hv: Hypervisor) -> None:
        self.hv = hv

    # ------------------------------------------------------------------ entry
    def handle(self, cpu: PhysicalCpu, v: Vcpu, exit_: Exit) -> None:
        """Every exit of every vCPU. What differs for HVM vCPUs (the name an exit is
        counted under, `hlt`, faults through the guest IDT, the hypercalls allowed, EPT
        violations) is asked of hypervisor/hvm/support.py."""
        hvm = self.hv.hvm if v.hvm is not None else None
        name = hvm.exit_name(v, exit_) if hvm is not None else EXIT_NAMES[type(exit_)]
        self.hv.count_exit(name)
        for hook in self.hv.exit_hooks:
            hook(v, exit_, name)
        if self.hv.tracer is not None:
            self.hv.tracer.exit(v, exit_)
        if v.xen is not None:  # Xen's PV ABI at CPL 3
            self.hv.xen_pv.handle(cpu, v, exit_)
            return
        match exit_:
            case BudgetExhausted() | Cpuid() | PortIO():
                pass  # Cpuid, PortIO: answered synchronously, here when the handler stopped
            case Hypercall():
                self._hypercall(cpu, v)
            case Halt():
                if hvm is not None:
                    hvm.halt(cpu, v)
                elif not v.domain.events.bits.upcall_pending(v.vcpu_id):
                    v.runstate = BLOCKED
            case GuestException(vector=vector, error_code=err, cr2=cr2, next_rip=next_rip):
                self._fault(cpu, v, vector, err, cr2, next_rip, exit_.rip)
            case MmuFault(reason=EptViolation() as violation) if hvm is not None:
                hvm.ept_violation(cpu, v, exit_, violation)
            case MmuFault(gva=gva, reason=reason):
                err = reason.error_code if isinstance(reason, WalkFault) else 0
                self._fault(cpu, v, 14, err, gva, exit_.rip, exit_.rip)
            case InvalidOpcode():
                self._fault(cpu, v, 6, None, None, exit_.rip, exit_.rip)
            case EngineError(message=message):
                self.hv.crash_domain(v.domain, f"{v.name}: {message} at RIP {exit_.rip:#x}")

    def handle_sync(self, cpu: PhysicalCpu, v: Vcpu, exit_: Exit) -> bool:
        self.hv.count_exit(EXIT_NAMES[type(exit_)])
        match exit_:
            case Cpuid() if v.xen is not None:
                answer_cpuid(cpu)
            case Cpuid(leaf=leaf):
                eax, ebx, ecx, edx = CPUID_TABLE.get(leaf, (0, 0, 0, 0))
                for name, value in (("rax", eax), ("rbx", ebx), ("rcx", ecx), ("rdx", edx)):
                    cpu.set_reg(name, value)
            case PortIO(port=port, size=size, is_write=is_write, value=value):
                if is_write and port == DEBUG_CONSOLE_PORT:
                    v.domain.console.append(value & 0xFF)
                elif not is_write:
                    cpu.complete_port_read((1 << (8 * size)) - 1)  # nothing there: all ones
        return True

    # -------------------------------------------------------------- hypercall
    def _hypercall(self, cpu: PhysicalCpu, v: Vcpu) -> None:
        number = cpu.reg("rax") & 0xFFFF_FFFF
        args = tuple(cpu.reg(r) for r in ("rdi", "rsi", "rdx", "r10", "r8"))
        if v.hvm is not None and not self.hv.hvm.allows_hypercall(number, args):
            rc = -ENOSYS
        else:
            rc = hypercalls.call(self.hv, v, number, args)
        cpu.set_reg("rax", rc & 0xFFFF_FFFF_FFFF_FFFF)

    # ------------------------------------------------------------------ faults
    def _fault(self, cpu: PhysicalCpu, v: Vcpu, vector: int, error_code: int | None,
               cr2: int | None, return_rip: int, fault_rip: int) -> None:
        if v.hvm is not None:  # through the guest's own IDT, as the CPU would
            self.hv.hvm.exception(cpu, v, vector, error_code, cr2, return_rip, fault_rip)
            return
        entry = v.trap_table.get(vector)
        if entry is None:
            self.hv.crash_domain(v.domain, self._crash_report(cpu, v, vector, error_code, cr2,
                                                              fault_rip, "no handler"))
            return
        if vector == 14 and cr2 is not None:
            cpu.set_reg("cr2", cr2)
            self.hv.write_vcpu_info(v, VCPU_INFO_CR2, struct.pack("<Q", cr2))
        try:
            deliver(cpu, Gate(KERNEL_CS, entry.address, GATE_TRAP, True), return_rip, error_code)
        except DeliveryError as err:
            self.hv.crash_domain(v.domain, self._crash_report(cpu, v, vector, error_code, cr2,
                                                              fault_rip, str(err)))
            return
        if entry.masks_events:
            v.domain.events.bits.set_upcall_mask(v.vcpu_id, True)

    def deliver_upcall(self, cpu: PhysicalCpu, v: Vcpu) -> None:
        """Enter the guest's event callback, events masked, as Xen's upcall does."""
        if v.xen is not None:
            self.hv.xen_pv.deliver_upcall(cpu, v)
            return
        v.domain.events.bits.set_upcall_mask(v.vcpu_id, True)
        try:
            deliver(cpu, Gate(KERNEL_CS, v.event_callback, GATE_TRAP, True), cpu.reg("rip"),
                    None)
        except DeliveryError as err:
            self.hv.crash_domain(v.domain, f"{v.name}: event upcall failed: {err}")
            return
        v.upcalls += 1

    def _crash_report(self, cpu: PhysicalCpu, v: Vcpu, vector: int, error_code: int | None,
                      cr2: int | None, rip: int, why: str) -> str:
        name = VECTOR_NAMES.get(vector, f"vector {vector}")
        parts = [f"{v.name}: unhandled {name} (vector {vector}, {why}) at RIP {rip:#x}:"
                 f" {disassemble_with(cpu.read_virtual, rip)}"]
        if error_code is not None:
            parts.append(f"error code {error_code:#x}")
        if cr2 is not None:
            parts.append(f"CR2 {cr2:#x}")
        regs = " ".join(f"{r}={cpu.reg(r):#x}" for r in GPRS[:8])
        parts.append(regs)
        return "; ".join(parts)
