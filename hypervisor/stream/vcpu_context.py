"""x86_64 PV ``struct vcpu_guest_context``: one codec for X86_PV_VCPU_BASIC and VCPUOP_initialise.

Layout from xen.git ``xen/include/public/arch-x86/xen.h`` (``vcpu_guest_context``,
``trap_info``) and ``arch-x86/xen-x86_64.h`` (``cpu_user_regs``), for a 64-bit
guest (``unsigned long`` = 8 octets), natural alignment, little-endian.

``struct cpu_user_regs`` (200 octets)::

      0 r15   8 r14  16 r13  24 r12  32 rbp  40 rbx  48 r11  56 r10
     64 r9   72 r8   80 rax  88 rcx  96 rdx 104 rsi 112 rdi            (u64 each)
    120 error_code u32      124 entry_vector u32
    128 rip u64
    136 cs u16, _pad0 u16   140 saved_upcall_mask u8, _pad1[3]
    144 rflags u64          152 rsp u64
    160 ss u16 +6 pad   168 es   176 ds   184 fs   192 gs   (each u16 + 6 pad)

``struct trap_info`` (16 octets): 0 vector u8, 1 flags u8, 2 cs u16,
4 implicit padding (4 octets, ``address`` is 8-aligned), 8 address u64.

``struct vcpu_guest_context`` (x86_64, **5168 octets**, Xen's
``sizeof(vcpu_guest_context_x86_64_t)`` that libxc checks X86_PV_VCPU_BASIC
against)::

       0 fpu_ctxt[512]             4832 gdt_frames[16] u64
     512 flags u64                 4960 gdt_ents
     520 user_regs (200)           4968 kernel_ss        4976 kernel_sp
     720 trap_ctxt[256] (4096)     4984 ctrlreg[8]       5048 debugreg[8]
    4816 ldt_base                  5112 event_callback_eip
    4824 ldt_ents                  5120 failsafe_callback_eip
                                   5128 syscall_callback_eip
                                   5136 vm_assist
                                   5144 fs_base  5152 gs_base_kernel  5160 gs_base_user

Padding octets are written as zero and ignored on read.  In a saved image
``ctrlreg[3]``, ``ctrlreg[1]`` (user page table) and ``gdt_frames`` hold PFNs
(normalised); in VCPUOP_initialise and the live-update hand-over, MFNs.
``ctrlreg[1]`` is written as Xen's saver writes it, ``1 | frame << 12`` (bit 0:
there is a user page table; Xen's restorer converts the field only when bit 0
is set), and read in that encoding or the bare ``frame << 12`` older images
hold: any non-zero value names ``value >> 12``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Self

from .framing import StreamError

# VGCF_* flag bits (xen.h).
VGCF_I387_VALID = 1 << 0
VGCF_IN_KERNEL = 1 << 2
VGCF_FAILSAFE_DISABLES_EVENTS = 1 << 3
VGCF_SYSCALL_DISABLES_EVENTS = 1 << 4
VGCF_ONLINE = 1 << 5

NR_TRAPS = 256
USER_TABLE_PRESENT = 1  # ctrlreg[1] bit 0, as Xen's saver sets it
NR_GDT_FRAMES = 16

_GPRS = (
    "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10",
    "r9", "r8", "rax", "rcx", "rdx", "rsi", "rdi",
)  # fmt: skip
_SEGMENTS = ("ss", "es", "ds", "fs", "gs")

# One format each; the pad octets ("x") are zero on pack and skipped on unpack.
_USER_REGS_FMT = "15Q" + "II" + "Q" + "H2x" + "B3x" + "QQ" + "H6x" * 5
_TRAP_FMT = "BBH4xQ"
_TAIL_FMT = "QQ" + "16Q" + "QQQ" + "8Q" + "8Q" + "QQQQ" + "QQQ"
_VCPU = struct.Struct("<512sQ" + _USER_REGS_FMT + _TRAP_FMT * NR_TRAPS + _TAIL_FMT)

CPU_USER_REGS_SIZE = struct.calcsize("<" + _USER_REGS_FMT)  # 200
TRAP_INFO_SIZE = struct.calcsize("<" + _TRAP_FMT)  # 16
VCPU_GUEST_CONTEXT_SIZE = _VCPU.size  # 5168

_U64 = 64


def _require_uint(name: str, value: object, bits: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << bits:
        raise StreamError(
            f"field {name} = {value!r} does not fit u{bits}",
            record="X86_PV_VCPU_BASIC",
            part="vcpu_guest_context",
        )
    return value


@dataclass
class CpuUserRegs:
    """``struct cpu_user_regs`` (x86_64)."""

    r15: int = 0
    r14: int = 0
    r13: int = 0
    r12: int = 0
    rbp: int = 0
    rbx: int = 0
    r11: int = 0
    r10: int = 0
    r9: int = 0
    r8: int = 0
    rax: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    error_code: int = 0
    entry_vector: int = 0
    rip: int = 0
    cs: int = 0
    saved_upcall_mask: int = 0
    rflags: int = 0
    rsp: int = 0
    ss: int = 0
    es: int = 0
    ds: int = 0
    fs: int = 0
    gs: int = 0

    def _values(self) -> list[int]:
        def u(name: str, bits: int) -> int:
            return _require_uint(f"user_regs.{name}", getattr(self, name), bits)

        values = [u(r, _U64) for r in _GPRS]
        values += [u("error_code", 32), u("entry_vector", 32), u("rip", _U64), u("cs", 16)]
        values += [u("saved_upcall_mask", 8), u("rflags", _U64), u("rsp", _U64)]
        values += [u(s, 16) for s in _SEGMENTS]
        return values

    @classmethod
    def _from_values(cls, values: tuple[int, ...]) -> CpuUserRegs:
        names = (
            *_GPRS, "error_code", "entry_vector", "rip", "cs",
            "saved_upcall_mask", "rflags", "rsp", *_SEGMENTS,
        )  # fmt: skip
        return cls(**dict(zip(names, values, strict=True)))


@dataclass
class TrapInfo:
    """``struct trap_info``: one virtual IDT entry (flags bits 0-1 DPL, bit 2 clear IF)."""

    vector: int = 0
    flags: int = 0
    cs: int = 0
    address: int = 0


def _default_traps() -> list[TrapInfo]:
    return [TrapInfo() for _ in range(NR_TRAPS)]


@dataclass
class VcpuGuestContext:
    """``struct vcpu_guest_context`` for an x86_64 PV guest; see the module docstring."""

    fpu_ctxt: bytes = bytes(512)
    flags: int = 0
    user_regs: CpuUserRegs = field(default_factory=CpuUserRegs)
    trap_ctxt: list[TrapInfo] = field(default_factory=_default_traps)
    ldt_base: int = 0
    ldt_ents: int = 0
    gdt_frames: list[int] = field(default_factory=lambda: [0] * NR_GDT_FRAMES)
    gdt_ents: int = 0
    kernel_ss: int = 0
    kernel_sp: int = 0
    ctrlreg: list[int] = field(default_factory=lambda: [0] * 8)
    debugreg: list[int] = field(default_factory=lambda: [0] * 8)
    event_callback_eip: int = 0
    failsafe_callback_eip: int = 0
    syscall_callback_eip: int = 0
    vm_assist: int = 0
    fs_base: int = 0
    gs_base_kernel: int = 0
    gs_base_user: int = 0

    SIZE = VCPU_GUEST_CONTEXT_SIZE

    @property
    def user_table(self) -> int | None:
        """The user page table's frame (ctrlreg[1], either encoding), None for none."""
        return self.ctrlreg[1] >> 12 if self.ctrlreg[1] else None

    @user_table.setter
    def user_table(self, frame: int | None) -> None:
        self.ctrlreg[1] = 0 if frame is None else USER_TABLE_PRESENT | frame << 12

    def pack(self) -> bytes:
        """The exact 5168-octet image; StreamError naming the field if a value does not fit."""
        if not isinstance(self.fpu_ctxt, bytes | bytearray) or len(self.fpu_ctxt) != 512:
            raise StreamError(
                "field fpu_ctxt must be 512 octets",
                record="X86_PV_VCPU_BASIC",
                part="vcpu_guest_context",
            )
        values: list[object] = [bytes(self.fpu_ctxt), _require_uint("flags", self.flags, _U64)]
        values += self.user_regs._values()
        if len(self.trap_ctxt) != NR_TRAPS:
            raise StreamError(
                f"field trap_ctxt has {len(self.trap_ctxt)} entries, expected {NR_TRAPS}",
                record="X86_PV_VCPU_BASIC",
                part="vcpu_guest_context",
            )
        for i, trap in enumerate(self.trap_ctxt):
            values += [
                _require_uint(f"trap_ctxt[{i}].vector", trap.vector, 8),
                _require_uint(f"trap_ctxt[{i}].flags", trap.flags, 8),
                _require_uint(f"trap_ctxt[{i}].cs", trap.cs, 16),
                _require_uint(f"trap_ctxt[{i}].address", trap.address, _U64),
            ]
        values += [_require_uint(n, getattr(self, n), _U64) for n in ("ldt_base", "ldt_ents")]
        values += self._array("gdt_frames", NR_GDT_FRAMES)
        values += [
            _require_uint(n, getattr(self, n), _U64) for n in ("gdt_ents", "kernel_ss", "kernel_sp")
        ]
        values += self._array("ctrlreg", 8) + self._array("debugreg", 8)
        values += [
            _require_uint(n, getattr(self, n), _U64)
            for n in (
                "event_callback_eip", "failsafe_callback_eip", "syscall_callback_eip",
                "vm_assist", "fs_base", "gs_base_kernel", "gs_base_user",
            )
        ]  # fmt: skip
        return _VCPU.pack(*values)

    def _array(self, name: str, length: int) -> list[int]:
        items = getattr(self, name)
        if len(items) != length:
            raise StreamError(
                f"field {name} has {len(items)} entries, expected {length}",
                record="X86_PV_VCPU_BASIC",
                part="vcpu_guest_context",
            )
        return [_require_uint(f"{name}[{i}]", v, _U64) for i, v in enumerate(items)]

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview, *, offset: int | None = None) -> Self:
        """Decode exactly 5168 octets; ``offset`` (of the record) only goes into errors."""
        if len(data) != VCPU_GUEST_CONTEXT_SIZE:
            raise StreamError(
                f"context is {len(data)} octets, an x86_64 vcpu_guest_context is "
                f"{VCPU_GUEST_CONTEXT_SIZE}",
                offset=offset,
                record="X86_PV_VCPU_BASIC",
            )
        v = _VCPU.unpack(data)
        pos = 2
        regs = CpuUserRegs._from_values(v[pos : pos + 27])
        pos += 27
        traps = [TrapInfo(*v[pos + 4 * i : pos + 4 * i + 4]) for i in range(NR_TRAPS)]
        pos += 4 * NR_TRAPS
        ldt_base, ldt_ents = v[pos], v[pos + 1]
        gdt_frames = list(v[pos + 2 : pos + 18])
        gdt_ents, kernel_ss, kernel_sp = v[pos + 18 : pos + 21]
        ctrlreg = list(v[pos + 21 : pos + 29])
        debugreg = list(v[pos + 29 : pos + 37])
        tail = v[pos + 37 :]
        return cls(
            fpu_ctxt=v[0],
            flags=v[1],
            user_regs=regs,
            trap_ctxt=traps,
            ldt_base=ldt_base,
            ldt_ents=ldt_ents,
            gdt_frames=gdt_frames,
            gdt_ents=gdt_ents,
            kernel_ss=kernel_ss,
            kernel_sp=kernel_sp,
            ctrlreg=ctrlreg,
            debugreg=debugreg,
            event_callback_eip=tail[0],
            failsafe_callback_eip=tail[1],
            syscall_callback_eip=tail[2],
            vm_assist=tail[3],
            fs_base=tail[4],
            gs_base_kernel=tail[5],
            gs_base_user=tail[6],
        )
