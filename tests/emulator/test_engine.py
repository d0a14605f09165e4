"""The unicorn adapter: exits, budgets and the quirks it hides (docs/design.md §2).

Guest code is given as machine code (assembly alongside) so the tests need no
assembler. An identity MMU maps guest-virtual = machine addresses, except a
hole at 0x400000 that it refuses.
"""

from __future__ import annotations

import struct

import pytest

from emulator.engine import PERM_R, PERM_W, PERM_X, PhysicalCpu
from emulator.exits import (
    BudgetExhausted,
    Cpuid,
    GuestException,
    Halt,
    Hypercall,
    InvalidOpcode,
    MmuFault,
    PortIO,
)
from emulator.interrupts import GATE_INTERRUPT, Gate, deliver
from emulator.memory import HostMemory

CODE = 0x1000
HOLE = 0x400000


class IdentityMmu:
    last_fault: object = None

    def __init__(self, size: int) -> None:
        self.size = size

    def translate(self, gva: int, access: str):
        if HOLE <= gva < HOLE + 0x1000 or gva >= self.size:
            self.last_fault = ("refused", gva, access)
            return None
        return gva & ~0xFFF, PERM_R | PERM_W | PERM_X


@pytest.fixture(scope="module")
def machine():
    mem = HostMemory(8 << 20)
    cpu = PhysicalCpu(0, mem)
    cpu.mmu = IdentityMmu(mem.size)
    mem.write(0x2000, struct.pack("<QQQ", 0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF))
    cpu.set_descriptor_table("gdtr", 0x2000, 23)
    cpu.set_reg("cs", 0x08)
    cpu.set_reg("ss", 0x10)
    return mem, cpu


def load(machine, hex_code: str):
    mem, cpu = machine
    mem.write(CODE, bytes.fromhex(hex_code) + b"\x90" * 16)
    cpu.flush_translations()
    cpu.set_reg("rip", CODE)
    cpu.set_reg("rsp", 0x8000)
    cpu.sync_exit = lambda exit_: True
    return cpu


def test_vmcall_is_a_hypercall_exit_and_hlt_a_halt(machine):
    # mov eax, 5; vmcall; mov ebx, 7; hlt
    cpu = load(machine, "b8050000000f01c1bb07000000f4")
    start = cpu.executed
    exit_ = cpu.run(1000)
    assert exit_ == Hypercall(CODE + 5, 3)
    assert cpu.reg("rip") == CODE + 8 and cpu.reg("rax") == 5
    assert cpu.executed - start == 2
    exit_ = cpu.run(1000)
    assert exit_ == Halt(CODE + 14)
    assert cpu.reg("rbx") == 7
    assert cpu.executed - start == 4


def test_budget_is_exact_and_told_apart_from_hlt(machine):
    cpu = load(machine, "48ffc0ebfb")  # l: inc rax; jmp l
    cpu.set_reg("rax", 0)
    start = cpu.executed
    assert isinstance(cpu.run(1001), BudgetExhausted)
    assert cpu.executed - start == 1001
    assert cpu.reg("rax") == 501  # inc, jmp, inc, ... : 501 incs in 1001 instructions
    # mov ecx, 10; l: dec ecx; jnz l; hlt  -> exactly 1 + 20 + 1 instructions
    cpu = load(machine, "b90a000000ffc975fcf4")
    start = cpu.executed
    assert isinstance(cpu.run(22), Halt)
    assert cpu.executed - start == 22


def test_repeated_faults_are_not_promoted_to_double_fault(machine):
    cpu = load(machine, "31c9f7f190")  # xor ecx, ecx; div ecx
    for _ in range(4):
        cpu.set_reg("rip", CODE)
        exit_ = cpu.run(100)
        assert isinstance(exit_, GuestException)
        assert exit_.vector == 0 and exit_.rip == CODE + 2
    assert cpu.reg("cs") == 0x08 and cpu.reg("ss") == 0x10


def test_refused_fill_is_an_mmu_fault_with_the_mmus_reason(machine):
    cpu = load(machine, "488b04251000400090")  # mov rax, [0x400010]
    exit_ = cpu.run(100)
    assert isinstance(exit_, MmuFault)
    assert exit_.gva == HOLE + 0x10 and exit_.access == "read" and exit_.rip == CODE
    assert exit_.reason == ("refused", HOLE, "read")  # the MMU is asked about the page
    # the exact byte, though unicorn's fill hook only names the page
    cpu = load(machine, "48c7042523004000010000009090")  # mov qword [0x400023], 1
    exit_ = cpu.run(100)
    assert (exit_.gva, exit_.access) == (HOLE + 0x23, "write")
    cpu = load(machine, "48c7c300004000ff7308")  # mov rbx, 0x400000; push [rbx+8]
    assert cpu.run(100).gva == HOLE + 8
    # the next fault after an MMU fault is still an ordinary one
    cpu = load(machine, "31c9f7f190")
    assert cpu.run(100).vector == 0


def test_software_traps_report_the_instruction_and_where_to_resume(machine):
    cpu = load(machine, "cc90cd80900f0b")  # int3; nop; int 0x80; nop; ud2
    e = cpu.run(100)
    assert (e.vector, e.rip, e.next_rip) == (3, CODE, CODE + 1)
    e = cpu.run(100)
    assert (e.vector, e.rip, e.next_rip) == (0x80, CODE + 2, CODE + 4)
    assert cpu.run(100) == InvalidOpcode(CODE + 5)


def test_iretq_returns_through_the_gdt(machine):
    # push a frame for CS 0x08 / SS 0x10 and iretq to the next instruction
    cpu = load(machine, "4889e06a10509c6a08488d05030000005048cfbb2a000000f4")
    assert isinstance(cpu.run(100), Halt)
    assert cpu.reg("rbx") == 42


def test_rdtsc_returns_virtual_time_and_cpuid_goes_to_the_handler(machine):
    cpu = load(machine, "0f310fa2f4")  # rdtsc; cpuid; hlt
    seen = []
    cpu.tsc = lambda: 0x12_3456_7890

    def handler(exit_):
        seen.append(exit_)
        cpu.set_reg("rax", 0xABC)
        return True

    cpu.sync_exit = handler
    assert isinstance(cpu.run(100), Halt)
    assert seen == [Cpuid(CODE + 2, 0x34567890, 0, 2)]
    assert cpu.reg("rax") == 0xABC and cpu.reg("rdx") == 0x12


def test_port_io_reaches_the_handler_and_reads_its_value(machine):
    cpu = load(machine, "66bae900b041eeecf4")  # mov dx,0xe9; mov al,0x41; out dx,al; in al,dx
    seen = []

    def handler(exit_):
        seen.append(exit_)
        if not exit_.is_write:
            cpu.complete_port_read(0x5A)
        return True

    cpu.sync_exit = handler
    assert isinstance(cpu.run(100), Halt)
    assert seen == [PortIO(CODE + 6, 0xE9, 1, True, 0x41), PortIO(CODE + 7, 0xE9, 1, False, 0)]
    assert cpu.reg("rax") & 0xFF == 0x5A


def test_delivery_pushes_the_hardware_frame(machine):
    mem, cpu = machine
    cpu.set_reg("rsp", 0x8008)
    cpu.set_reg("rflags", 0x202)
    deliver(cpu, Gate(0x08, 0x3000, GATE_INTERRUPT, True), return_rip=0x1234, error_code=0x6)
    rsp = cpu.reg("rsp")
    assert rsp == 0x8000 - 6 * 8  # aligned down to 16, then six words
    frame = struct.unpack("<6Q", mem.read(rsp, 48))
    assert frame == (0x6, 0x1234, 0x08, 0x202, 0x8008, 0x10)
    assert cpu.reg("rip") == 0x3000
    assert not cpu.reg("rflags") & 0x200  # an interrupt gate clears IF


class RemappingMmu(IdentityMmu):
    """Identity, except that guest page 0x5000 maps to whichever machine page is chosen."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.target = 0x6000

    def translate(self, gva: int, access: str):
        if gva & ~0xFFF == 0x5000:
            return self.target, PERM_R | PERM_W | PERM_X
        return super().translate(gva, access)


def test_flush_tlb_makes_a_changed_mapping_visible(machine):
    mem, cpu = machine
    mmu = RemappingMmu(mem.size)
    cpu.mmu = mmu
    mem.write_u64(0x6008, 0x1111)
    mem.write_u64(0x7008, 0x2222)
    try:
        for target, flush, expected in ((0x6000, False, 0x1111), (0x7000, False, 0x1111),
                                        (0x7000, True, 0x2222)):
            mmu.target = target
            if flush:
                cpu.flush_tlb()
            cpu = load(machine, "488b042508500000f4")  # mov rax, [0x5008]; hlt
            assert isinstance(cpu.run(100), Halt)
            assert cpu.reg("rax") == expected  # stale until flushed, as hardware
    finally:
        cpu.mmu = IdentityMmu(mem.size)
        cpu.flush_tlb()
