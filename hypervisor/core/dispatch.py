"""The one exit dispatcher: every reason a pCPU stopped guest code comes here.

`handle` is called after a run returns an exit; `handle_sync` is called from
inside the engine's hooks for exits answered on the spot (cpuid, port I/O)
and returns True when the guest may simply go on. What an exit means for a
PV or an HVM guest (the name it is counted under, `hlt`, how a fault reaches
the guest, which hypercalls exist, memory faults the hypervisor resolves) is
asked of the domain's policy (`hypervisor/core/policy.py`).
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
from emulator.paging import WalkFault
from hypervisor.core import hypercalls
from hypervisor.core.vcpu import Vcpu

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
        """Every exit of every vCPU, after its run returned."""
        policy = v.domain.policy
        name = policy.exit_name(v, exit_)
        self.hv.count_exit(name)
        for hook in self.hv.exit_hooks:
            hook(v, exit_, name)
        if self.hv.tracer is not None:
            self.hv.tracer.exit(v, exit_)
        if policy.handle_exit(cpu, v, exit_):  # a kind whose exits mean other things
            return
        match exit_:
            case BudgetExhausted() | Cpuid() | PortIO():
                pass  # Cpuid, PortIO: answered synchronously, here when the handler stopped
            case Hypercall():
                number = cpu.reg("rax") & 0xFFFF_FFFF
                args = tuple(cpu.reg(r) for r in ("rdi", "rsi", "rdx", "r10", "r8"))
                rc = hypercalls.call(policy.hypercalls, self.hv, v, number, args)
                cpu.set_reg("rax", rc & 0xFFFF_FFFF_FFFF_FFFF)
            case Halt():
                policy.halt(cpu, v)
            case GuestException(vector=vector, error_code=err, cr2=cr2, next_rip=next_rip):
                policy.exception(cpu, v, vector, err, cr2, next_rip, exit_.rip)
            case MmuFault(gva=gva, reason=reason):
                if not policy.memory_fault(cpu, v, exit_):  # else: the guest's #PF
                    err = reason.error_code if isinstance(reason, WalkFault) else 0
                    policy.exception(cpu, v, 14, err, gva, exit_.rip, exit_.rip)
            case InvalidOpcode():
                policy.exception(cpu, v, 6, None, None, exit_.rip, exit_.rip)
            case EngineError(message=message):
                self.hv.crash_domain(v.domain, f"{v.name}: {message} at RIP {exit_.rip:#x}")

    def handle_sync(self, cpu: PhysicalCpu, v: Vcpu, exit_: Exit) -> bool:
        self.hv.count_exit(EXIT_NAMES[type(exit_)])
        match exit_:
            case Cpuid(leaf=leaf):
                if not v.domain.policy.answer_cpuid(cpu, v, leaf):
                    eax, ebx, ecx, edx = CPUID_TABLE.get(leaf, (0, 0, 0, 0))
                    for name, value in (("rax", eax), ("rbx", ebx), ("rcx", ecx),
                                        ("rdx", edx)):
                        cpu.set_reg(name, value)
            case PortIO(port=port, size=size, is_write=is_write, value=value):
                if is_write and port == DEBUG_CONSOLE_PORT:
                    v.domain.console.append(value & 0xFF)
                elif not is_write:
                    cpu.complete_port_read((1 << (8 * size)) - 1)  # nothing there: all ones
        return True


def fault_report(cpu: PhysicalCpu, v: Vcpu, vector: int, error_code: int | None,
                 cr2: int | None, rip: int, why: str) -> str:
    """The crash report of a fault the guest cannot take: where, the instruction, registers."""
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
