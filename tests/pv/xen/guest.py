"""Tiny hand-assembled kernels on Xen's PV ABI at CPL 3 (ELF with Linux-like Xen notes)."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

from hypervisor.core.hypervisor import Hypervisor, MachineConfig
from hypervisor.pv.linux.domain import create_linux_domain
from hypervisor.pv.xen.state import VMASST_TYPE_WRITABLE_PAGETABLES
from tests.pv.linux.synthetic import VIRT_BASE, elf64, linux_like_notes

TEXT_PADDR = 0x200000
ENTRY = VIRT_BASE + TEXT_PADDR


@dataclass
class Asm:
    """Machine code with labels for rip-relative references (resolved by `bytes`)."""

    code: bytearray = field(default_factory=bytearray)
    labels: dict[str, int] = field(default_factory=dict)
    fixups: list[tuple[int, str]] = field(default_factory=list)

    def emit(self, hex_bytes: str) -> Asm:
        self.code += bytes.fromhex(hex_bytes)
        return self

    def imm32(self, value: int) -> Asm:
        self.code += struct.pack("<I", value & 0xFFFF_FFFF)
        return self

    def imm64(self, value: int) -> Asm:
        self.code += struct.pack("<Q", value)
        return self

    def rip_rel(self, label: str) -> Asm:  # a disp32 that ends the instruction
        self.fixups.append((len(self.code), label))
        self.code += b"\0" * 4
        return self

    def label(self, name: str) -> Asm:
        self.labels[name] = len(self.code)
        return self

    def data(self, raw: bytes) -> Asm:
        self.code += raw
        return self

    def hypercall(self, number: int, rdi: int | None = None, rsi: int | None = None) -> Asm:
        self.emit("b8").imm32(number)
        if rdi is not None:
            self.emit("bf").imm32(rdi)
        if rsi is not None:
            self.emit("be").imm32(rsi)
        return self.emit("0f05")

    def shutdown(self, reason: int = 0) -> Asm:
        self.emit("b8").imm32(29).emit("bf").imm32(2).emit("488d35").rip_rel("reason")
        self.emit("0f05")
        return self.label("reason").imm32(reason).imm32(0xDEAD)  # not a code: Xen ignores it

    def bytes(self) -> bytes:
        out = bytearray(self.code)
        for at, name in self.fixups:
            struct.pack_into("<i", out, at, self.labels[name] - (at + 4))
        return bytes(out)


# The CPL-3 kernel state the save/restore and live-update tests carry across
KERNEL_GS, USER_GS, KERNEL_SP = 0x1234_5000, 0x5678_0000, 0xABC0_00
LOOPS = 200_000
SHARED_INFO_VA = ENTRY + 0x1000  # the kernel image's second page, unused


def console(asm: Asm, label: str, text: bytes) -> Asm:
    """console_io write of `text`, kept at `label`."""
    return (asm.emit("b8").imm32(18).emit("31ff").emit("be").imm32(len(text))
            .emit("488d15").rip_rel(label).emit("0f05"))


def set_kernel_state(asm: Asm) -> Asm:
    """Both GS bases, the kernel stack (stack_switch), writable page tables, CR4.FSGSBASE."""
    return (asm
            .emit("b9").imm32(0xC000_0101).emit("b8").imm32(KERNEL_GS).emit("31d2").emit("0f30")
            .emit("b9").imm32(0xC000_0102).emit("b8").imm32(USER_GS).emit("31d2").emit("0f30")
            .hypercall(3, rdi=0xE02B, rsi=KERNEL_SP)  # stack_switch
            .hypercall(21, rdi=0, rsi=VMASST_TYPE_WRITABLE_PAGETABLES)  # vm_assist enable
            .emit("0f20e0").emit("480d").imm32(0x10000).emit("0f22e0"))  # cr4 |= FSGSBASE


def kernel_elf(code: bytes) -> bytes:
    size = max(0x2000, -(-len(code) // 4096) * 4096)
    segments = [(ENTRY, TEXT_PADDR, code, size)]
    return elf64(segments, linux_like_notes(entry=ENTRY, mod_start_pfn=True), TEXT_PADDR)


def boot(tmp_path: Path, code: bytes, memory: int = 8 << 20, vcpus: int = 1,
         pcpus: int = 1) -> Hypervisor:
    path = tmp_path / "kernel.elf"
    path.write_bytes(kernel_elf(code))
    hv = Hypervisor(MachineConfig(pcpus, 32 << 20))
    create_linux_domain(hv, "tiny", path, memory, vcpus, "console=hvc0", None)
    return hv
