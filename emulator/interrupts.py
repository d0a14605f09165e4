"""Exception and interrupt delivery in long mode, done in Python.

Unicorn never delivers anything through the guest's IDT, so the hypervisor
asks this module to do what the CPU would: find the handler (an IDT gate, or
for PV guests the trap table the guest registered), push the 64-bit frame
(SS, RSP, RFLAGS, CS, RIP and, for some vectors, an error code) on the
current stack aligned to 16 bytes, clear IF for interrupt gates, and load
CS:RIP. `iretq` then returns natively. hvlab guests run at CPL 0, so there is
no stack switch except through an IST slot, which hvlab does not model.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from emulator.engine import GuestMemoryFault, PhysicalCpu

RFLAGS_IF = 1 << 9
RFLAGS_TF = 1 << 8
RFLAGS_NT = 1 << 14
RFLAGS_RF = 1 << 16
RFLAGS_VM = 1 << 17

GATE_INTERRUPT = 0xE
GATE_TRAP = 0xF


@dataclass(frozen=True)
class Gate:
    selector: int
    offset: int
    gate_type: int  # GATE_INTERRUPT clears IF on entry, GATE_TRAP does not
    present: bool

    @property
    def clears_if(self) -> bool:
        return self.gate_type == GATE_INTERRUPT


class DeliveryError(Exception):
    """The CPU could not deliver (no gate, or the stack is not writable): a double fault."""


def read_idt_gate(cpu: PhysicalCpu, vector: int) -> Gate:
    base, limit = cpu.descriptor_table("idtr")
    if 16 * vector + 15 > limit:
        raise DeliveryError(f"vector {vector} lies beyond the IDT limit {limit:#x}")
    try:
        raw = cpu.read_virtual(base + 16 * vector, 16)
    except GuestMemoryFault as fault:
        raise DeliveryError(f"IDT entry {vector} unreadable: {fault}") from None
    lo, sel, _ist, attr, mid, hi, _ = struct.unpack("<HHBBHII", raw)
    return Gate(sel, lo | (mid << 16) | (hi << 32), attr & 0xF, bool(attr & 0x80))


def deliver(cpu: PhysicalCpu, gate: Gate, return_rip: int, error_code: int | None) -> None:
    """Enter `gate` as the CPU does; `return_rip` is what `iretq` will return to."""
    if not gate.present:
        raise DeliveryError("handler gate not present")
    rsp = cpu.reg("rsp")
    rflags = cpu.reg("rflags")
    frame = [cpu.reg("ss"), rsp, rflags, cpu.reg("cs"), return_rip]
    if error_code is not None:
        frame.append(error_code)
    new_rsp = (rsp & ~0xF) - 8 * len(frame)
    # the frame is written top-down: the lowest address holds the last push
    data = b"".join(struct.pack("<Q", v) for v in reversed(frame))
    try:
        cpu.write_virtual(new_rsp, data)
    except GuestMemoryFault as fault:
        raise DeliveryError(f"cannot push the exception frame: {fault}") from None
    rflags &= ~(RFLAGS_TF | RFLAGS_NT | RFLAGS_RF | RFLAGS_VM)
    if gate.clears_if:
        rflags &= ~RFLAGS_IF
    cpu.set_reg("rsp", new_rsp)
    cpu.set_reg("rflags", rflags)
    if gate.selector != cpu.reg("cs"):
        cpu.set_reg("cs", gate.selector)
    cpu.set_reg("rip", gate.offset)
