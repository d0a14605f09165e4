"""Taking interrupts and exceptions into an HVM guest the way the CPU does: through its IDT.

The hypervisor decides *when* (on entry, see hypervisor/hvm/policy.py); this module does
the CPU's part: is an interrupt blocked right now, and deliver a vector through the
guest's own IDT (`emulator.interrupts.read_idt_gate` + `deliver`: the 64-bit frame on the
current stack, IF cleared for interrupt gates).

- **RFLAGS.IF**: a maskable interrupt waits while IF is clear.
- **Interrupt shadow.** After `sti` (that set IF), `mov ss` or `pop ss`, the CPU takes no
  interrupt before the next instruction has run. Unicorn does not expose that state, so
  it is inferred from the code: if the bytes just before RIP are `sti` (FB), `pop ss`
  (17) or a register-form `mov ss, r16` (8E D0-D7), one more instruction runs first.
  (`mov ss` from memory is not recognised: 64-bit kernels do not load SS that way in
  practice.) The bytes before RIP need not be the instruction that ran last (a jump may
  have landed at RIP), so the test can see a shadow that is not there; that only delays
  the interrupt by one instruction, at most once per delivery, so it cannot starve the
  guest.
- **Interrupt window.** Unicorn has no "interrupt-window exiting". While a vector waits
  for IF or the shadow, the hypervisor runs the vCPU in short slices and looks again
  after each (`window_budget`: 1 instruction for a shadow, else 16, doubling up to 4096
  while the guest keeps IF clear); a guest that clears IF for long gets its interrupt
  late but is not slowed down much. EOI, TPR and other LAPIC writes end the run at once,
  so a vector that was only held back by priority is seen right after them.
- **Delivery checks.** The IDT entry and the stack slots of the frame must be guest
  RAM (the LAPIC page is not memory); populate-on-demand and log-dirty pages on the way
  are served first. If the gate is missing or nothing can be pushed, the CPU would
  double- and then triple-fault: that raises `DeliveryError`, and the hypervisor crashes
  the domain with a report (Xen would run the domain's triple-fault action).
"""

from __future__ import annotations

from emulator.engine import PhysicalCpu
from emulator.interrupts import RFLAGS_IF, DeliveryError, deliver, read_idt_gate
from emulator.paging import WalkFault
from hypervisor.hvm.mmu import HvmMmu

STI, POP_SS, MOV_SREG = 0xFB, 0x17, 0x8E
MOV_SS_REG = 0xD0  # ModRM of mov ss, r16: mod 3, reg 2 (SS), any register
WINDOW_FIRST = 16
WINDOW_MAX = 4096


def interrupts_enabled(cpu: PhysicalCpu) -> bool:
    return bool(cpu.reg("rflags") & RFLAGS_IF)


def in_interrupt_shadow(mmu: HvmMmu, rip: int) -> bool:
    """Whether the instruction ending at `rip` is sti, pop ss or mov ss, r16 (see above)."""
    code = mmu.peek(rip - 2, 2)
    if code is None:
        return False
    return code[1] in (STI, POP_SS) or (code[0] == MOV_SREG and code[1] & 0xF8 == MOV_SS_REG)


def window_budget(polls: int, shadow: bool) -> int:
    """How long to run before looking again at an interrupt that had to wait."""
    if shadow:
        return 1
    return min(WINDOW_FIRST << min(polls, 16), WINDOW_MAX)


def deliver_vector(cpu: PhysicalCpu, mmu: HvmMmu, vector: int, return_rip: int,
                   error_code: int | None = None) -> None:
    """Enter the guest's IDT gate for `vector`; DeliveryError if the CPU could not."""
    base, limit = cpu.descriptor_table("idtr")
    if 16 * vector + 15 > limit:
        raise DeliveryError(f"vector {vector} lies beyond the IDT limit {limit:#x}")
    entry = base + 16 * vector
    if not _in_ram(mmu, entry, 16, "read"):
        raise DeliveryError(f"IDT entry {vector} at {entry:#x} is not in guest memory")
    gate = read_idt_gate(cpu, vector)
    if not gate.present:
        raise DeliveryError(f"IDT gate {vector} not present")
    top = cpu.reg("rsp") & ~0xF
    size = 48 if error_code is not None else 40
    if not _in_ram(mmu, top - size, size, "write"):
        raise DeliveryError(f"cannot push the interrupt frame at {top - size:#x}")
    deliver(cpu, gate, return_rip, error_code)


def _in_ram(mmu: HvmMmu, gva: int, size: int, access: str) -> bool:
    """Whether every page of [gva, gva+size) is guest RAM for `access` (PoD etc. served)."""
    pages = {gva >> 12, (gva + size - 1) >> 12}
    return not any(isinstance(mmu.lookup(page << 12, access), WalkFault) for page in pages)
