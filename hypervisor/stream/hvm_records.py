"""The HVM save-record container carried in an HVM_CONTEXT record, and its CPU/LAPIC codecs.

Facts from xen.git ``xen/include/public/hvm/save.h`` and
``xen/include/public/arch-x86/hvm/save.h``:

* The blob is a sequence of entries, each a descriptor
  ``{u16 typecode, u16 instance, u32 length}`` (8 octets) followed directly by
  ``length`` octets of payload -- no alignment padding between entries.
* It starts with a HEADER entry (typecode 1) holding ``struct hvm_save_header``
  ``{u32 magic = 0x54381286, u32 version = 1, u64 changeset, u32 cpuid,
  u32 gtsc_khz}`` (24 octets) and ends with an END entry (typecode 0, length 0).
* CPU (2) is ``struct hvm_hw_cpu``, **1032 octets** since Xen 4.7 (older
  sizes 1016, pre-3.4 without ``msr_tsc_aux``, and 1024, pre-4.7 without
  ``flags``, are read with Xen's fix-ups).  Field offsets::

         0 fpu_regs[512]
       512 rax rbx rcx rdx rbp rsi rdi rsp r8..r15      (16 x u64)
       640 rip rflags cr0 cr2 cr3 cr4                   (u64)
       688 dr0 dr1 dr2 dr3 dr6 dr7                      (u64)
       736 cs ds es fs gs ss tr ldtr _sel               (8 x u32)
       768 cs ds es fs gs ss tr ldtr idtr gdtr _limit   (10 x u32)
       808 cs ds es fs gs ss tr ldtr idtr gdtr _base    (10 x u64)
       888 cs ds es fs gs ss tr ldtr _arbytes           (8 x u32)
       920 sysenter_cs sysenter_esp sysenter_eip shadow_gs
       952 msr_flags msr_lstar msr_star msr_cstar msr_syscall_mask msr_efer msr_tsc_aux
      1008 tsc                                          (u64)
      1016 pending_event u32  1020 error_code u32  1024 flags u32  1028 pad0 u32

* LAPIC (5) is ``struct hvm_hw_lapic`` ``{u64 apic_base_msr, u32 disabled,
  u32 timer_divisor, u64 tdt_msr, u32 pending_esr, u32 reserved}`` =
  **32 octets**; older streams carry 16 (no ``tdt_msr``) or 24 (no
  ``pending_esr``) and are zero-extended, as Xen does.
* LAPIC_REGS (6) is the 1024-octet APIC register page.

Instances: CPU, LAPIC and LAPIC_REGS entries use the vCPU id.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple, Self

from .framing import StreamError

HVM_FILE_MAGIC = 0x54381286
HVM_FILE_VERSION = 1

HVM_SAVE_END = 0
HVM_SAVE_HEADER = 1
HVM_SAVE_CPU = 2
HVM_SAVE_LAPIC = 5
HVM_SAVE_LAPIC_REGS = 6

HVM_SAVE_NAMES = {
    0: "END", 1: "HEADER", 2: "CPU", 3: "PIC", 4: "IOAPIC", 5: "LAPIC", 6: "LAPIC_REGS",
    7: "PCI_IRQ", 8: "ISA_IRQ", 9: "PCI_LINK", 10: "PIT", 11: "RTC", 12: "HPET",
    13: "PMTIMER", 14: "MTRR", 15: "VIRIDIAN_DOMAIN", 16: "CPU_XSAVE", 17: "VIRIDIAN_VCPU",
    18: "VMCE_VCPU", 19: "TSC_ADJUST", 20: "CPU_MSR",
}  # fmt: skip

XEN_X86_FPU_INITIALISED = 1 << 0  # hvm_hw_cpu.flags

DESCRIPTOR = struct.Struct("<HHI")
_HEADER = struct.Struct("<IIQII")


def hvm_type_name(typecode: int) -> str:
    return HVM_SAVE_NAMES.get(typecode, f"TYPE_{typecode}")


def _fail(reason: str, *, offset: int | None = None, typecode: int | None = None) -> StreamError:
    return StreamError(
        reason,
        offset=offset,
        record=None if typecode is None else hvm_type_name(typecode),
        part="HVM_CONTEXT entry",
    )


def _require_uint(what: str, name: str, value: object, bits: int, typecode: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << bits:
        raise _fail(f"{what}.{name} = {value!r} does not fit u{bits}", typecode=typecode)
    return value


# --------------------------------------------------------------------------- HEADER


@dataclass(frozen=True)
class HvmSaveHeader:
    """``struct hvm_save_header`` (24 octets)."""

    changeset: int = 0
    cpuid: int = 0
    gtsc_khz: int = 0
    magic: int = HVM_FILE_MAGIC
    version: int = HVM_FILE_VERSION

    SIZE = _HEADER.size

    def pack(self) -> bytes:
        def u(name: str, bits: int) -> int:
            return _require_uint("hvm_save_header", name, getattr(self, name), bits, 1)

        return _HEADER.pack(
            u("magic", 32), u("version", 32), u("changeset", 64), u("cpuid", 32), u("gtsc_khz", 32)
        )

    @classmethod
    def unpack(cls, payload: bytes | memoryview, *, offset: int | None = None) -> Self:
        if len(payload) != _HEADER.size:
            raise _fail(
                f"length {len(payload)}, expected {_HEADER.size}",
                offset=offset,
                typecode=HVM_SAVE_HEADER,
            )
        magic, version, changeset, cpuid, gtsc_khz = _HEADER.unpack(payload)
        if magic != HVM_FILE_MAGIC:
            raise _fail(
                f"bad magic {magic:#010x}, expected {HVM_FILE_MAGIC:#010x}",
                offset=offset,
                typecode=HVM_SAVE_HEADER,
            )
        if version != HVM_FILE_VERSION:
            raise _fail(
                f"unsupported version {version}, expected {HVM_FILE_VERSION}",
                offset=offset,
                typecode=HVM_SAVE_HEADER,
            )
        return cls(changeset=changeset, cpuid=cpuid, gtsc_khz=gtsc_khz)


# --------------------------------------------------------------------------- CPU

_CPU_FIELDS: tuple[tuple[str, str], ...] = (
    *((r, "Q") for r in (
        "rax", "rbx", "rcx", "rdx", "rbp", "rsi", "rdi", "rsp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
        "rip", "rflags", "cr0", "cr2", "cr3", "cr4",
        "dr0", "dr1", "dr2", "dr3", "dr6", "dr7",
    )),
    *((f"{s}_sel", "I") for s in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldtr")),
    *((f"{s}_limit", "I") for s in (
        "cs", "ds", "es", "fs", "gs", "ss", "tr", "ldtr", "idtr", "gdtr")),
    *((f"{s}_base", "Q") for s in (
        "cs", "ds", "es", "fs", "gs", "ss", "tr", "ldtr", "idtr", "gdtr")),
    *((f"{s}_arbytes", "I") for s in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldtr")),
    *((m, "Q") for m in (
        "sysenter_cs", "sysenter_esp", "sysenter_eip", "shadow_gs",
        "msr_flags", "msr_lstar", "msr_star", "msr_cstar", "msr_syscall_mask", "msr_efer",
        "msr_tsc_aux", "tsc",
    )),
    ("pending_event", "I"),
    ("error_code", "I"),
    ("flags", "I"),
)  # fmt: skip
_CPU_NAMES = tuple(name for name, _ in _CPU_FIELDS)
_CPU = struct.Struct("<512s" + "".join(code for _, code in _CPU_FIELDS) + "4x")
_CPU_BITS = {"Q": 64, "I": 32}

HVM_HW_CPU_SIZE = _CPU.size  # 1032
HVM_HW_CPU_SIZE_PRE_4_7 = HVM_HW_CPU_SIZE - 8  # no flags/pad0
HVM_HW_CPU_SIZE_PRE_3_4 = HVM_HW_CPU_SIZE - 16  # no msr_tsc_aux either
_TSC_AUX_OFFSET = 1000  # where msr_tsc_aux sits in the full layout


@dataclass
class HvmHwCpu:
    """``struct hvm_hw_cpu``: every field in save.h order (offsets in the module docstring)."""

    fpu_regs: bytes = bytes(512)
    # general registers, rip, rflags, control and debug registers (u64)
    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rbp: int = 0
    rsi: int = 0
    rdi: int = 0
    rsp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0
    rflags: int = 0
    cr0: int = 0
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    dr0: int = 0
    dr1: int = 0
    dr2: int = 0
    dr3: int = 0
    dr6: int = 0
    dr7: int = 0
    # selectors (u32)
    cs_sel: int = 0
    ds_sel: int = 0
    es_sel: int = 0
    fs_sel: int = 0
    gs_sel: int = 0
    ss_sel: int = 0
    tr_sel: int = 0
    ldtr_sel: int = 0
    # limits (u32)
    cs_limit: int = 0
    ds_limit: int = 0
    es_limit: int = 0
    fs_limit: int = 0
    gs_limit: int = 0
    ss_limit: int = 0
    tr_limit: int = 0
    ldtr_limit: int = 0
    idtr_limit: int = 0
    gdtr_limit: int = 0
    # bases (u64)
    cs_base: int = 0
    ds_base: int = 0
    es_base: int = 0
    fs_base: int = 0
    gs_base: int = 0
    ss_base: int = 0
    tr_base: int = 0
    ldtr_base: int = 0
    idtr_base: int = 0
    gdtr_base: int = 0
    # access rights (u32)
    cs_arbytes: int = 0
    ds_arbytes: int = 0
    es_arbytes: int = 0
    fs_arbytes: int = 0
    gs_arbytes: int = 0
    ss_arbytes: int = 0
    tr_arbytes: int = 0
    ldtr_arbytes: int = 0
    # sysenter MSRs, shadow GS, syscall MSRs, TSC (u64)
    sysenter_cs: int = 0
    sysenter_esp: int = 0
    sysenter_eip: int = 0
    shadow_gs: int = 0
    msr_flags: int = 0
    msr_lstar: int = 0
    msr_star: int = 0
    msr_cstar: int = 0
    msr_syscall_mask: int = 0
    msr_efer: int = 0
    msr_tsc_aux: int = 0
    tsc: int = 0
    # pending event, its error code, XEN_X86_* flags (u32)
    pending_event: int = 0
    error_code: int = 0
    flags: int = 0

    SIZE = HVM_HW_CPU_SIZE
    FIELDS = _CPU_NAMES

    # pending_event bit-fields: vector 7:0, type 10:8, error_valid 11, valid 31.
    @property
    def pending_vector(self) -> int:
        return self.pending_event & 0xFF

    @property
    def pending_type(self) -> int:
        return (self.pending_event >> 8) & 0x7

    @property
    def pending_error_valid(self) -> bool:
        return bool(self.pending_event >> 11 & 1)

    @property
    def pending_valid(self) -> bool:
        return bool(self.pending_event >> 31 & 1)

    def pack(self) -> bytes:
        if not isinstance(self.fpu_regs, bytes | bytearray) or len(self.fpu_regs) != 512:
            raise _fail("hvm_hw_cpu.fpu_regs must be 512 octets", typecode=HVM_SAVE_CPU)
        values = [
            _require_uint("hvm_hw_cpu", name, getattr(self, name), _CPU_BITS[code], HVM_SAVE_CPU)
            for name, code in _CPU_FIELDS
        ]
        return _CPU.pack(bytes(self.fpu_regs), *values)

    @classmethod
    def unpack(cls, payload: bytes | memoryview, *, offset: int | None = None) -> Self:
        """Decode 1032 octets, or older Xen's 1016/1024-octet layouts (fixed up as Xen does)."""
        size = len(payload)
        if size == HVM_HW_CPU_SIZE:
            data = bytes(payload)
        elif size in (HVM_HW_CPU_SIZE_PRE_4_7, HVM_HW_CPU_SIZE_PRE_3_4):
            old = bytes(payload)
            if size == HVM_HW_CPU_SIZE_PRE_3_4:
                # Insert a zero msr_tsc_aux before tsc; the tail (tsc, event, error) moves up.
                old = old[:_TSC_AUX_OFFSET] + bytes(8) + old[_TSC_AUX_OFFSET:]
            flags = XEN_X86_FPU_INITIALISED.to_bytes(4, "little")  # Xen's compat fix-up
            data = old + flags + bytes(4)
        else:
            raise _fail(
                f"length {size}, expected {HVM_HW_CPU_SIZE} (or 1024/1016 from older Xen)",
                offset=offset,
                typecode=HVM_SAVE_CPU,
            )
        fpu, *values = _CPU.unpack(data)
        return cls(fpu_regs=fpu, **dict(zip(_CPU_NAMES, values, strict=True)))


# --------------------------------------------------------------------------- LAPIC

_LAPIC = struct.Struct("<QIIQI4x")
HVM_HW_LAPIC_SIZE = _LAPIC.size  # 32
_LAPIC_OLD_SIZES = (16, 24)


@dataclass(frozen=True)
class HvmHwLapic:
    """``struct hvm_hw_lapic``: the LAPIC state that is not in the register page."""

    apic_base_msr: int = 0
    disabled: int = 0  # VLAPIC_*_DISABLED bits
    timer_divisor: int = 0
    tdt_msr: int = 0
    pending_esr: int = 0

    SIZE = HVM_HW_LAPIC_SIZE

    def pack(self) -> bytes:
        def u(name: str, bits: int) -> int:
            return _require_uint("hvm_hw_lapic", name, getattr(self, name), bits, HVM_SAVE_LAPIC)

        return _LAPIC.pack(
            u("apic_base_msr", 64),
            u("disabled", 32),
            u("timer_divisor", 32),
            u("tdt_msr", 64),
            u("pending_esr", 32),
        )

    @classmethod
    def unpack(cls, payload: bytes | memoryview, *, offset: int | None = None) -> Self:
        size = len(payload)
        if size != HVM_HW_LAPIC_SIZE and size not in _LAPIC_OLD_SIZES:
            raise _fail(
                f"length {size}, expected {HVM_HW_LAPIC_SIZE} (or 24/16 from older Xen)",
                offset=offset,
                typecode=HVM_SAVE_LAPIC,
            )
        data = bytes(payload) + bytes(HVM_HW_LAPIC_SIZE - size)  # zero-extend, as Xen does
        base, disabled, divisor, tdt, esr = _LAPIC.unpack(data)
        return cls(base, disabled, divisor, tdt, esr)


HVM_HW_LAPIC_REGS_SIZE = 1024


@dataclass(frozen=True)
class HvmHwLapicRegs:
    """``struct hvm_hw_lapic_regs``: the 1024-octet APIC register page (32-bit registers)."""

    data: bytes = bytes(HVM_HW_LAPIC_REGS_SIZE)

    SIZE = HVM_HW_LAPIC_REGS_SIZE

    def read_u32(self, reg_offset: int) -> int:
        """Register at ``reg_offset`` (e.g. 0x80 TPR, 0x200 IRR[0])."""
        if reg_offset % 4 or not 0 <= reg_offset <= HVM_HW_LAPIC_REGS_SIZE - 4:
            raise _fail(f"register offset {reg_offset:#x} invalid", typecode=HVM_SAVE_LAPIC_REGS)
        return int.from_bytes(self.data[reg_offset : reg_offset + 4], "little")

    def with_u32(self, reg_offset: int, value: int) -> HvmHwLapicRegs:
        self.read_u32(reg_offset)  # validates the offset
        value = _require_uint("lapic_regs", f"[{reg_offset:#x}]", value, 32, HVM_SAVE_LAPIC_REGS)
        raw = bytearray(self.data)
        raw[reg_offset : reg_offset + 4] = value.to_bytes(4, "little")
        return HvmHwLapicRegs(bytes(raw))

    def pack(self) -> bytes:
        if not isinstance(self.data, bytes | bytearray) or len(self.data) != self.SIZE:
            raise _fail(f"register page must be {self.SIZE} octets", typecode=HVM_SAVE_LAPIC_REGS)
        return bytes(self.data)

    @classmethod
    def unpack(cls, payload: bytes | memoryview, *, offset: int | None = None) -> Self:
        if len(payload) != HVM_HW_LAPIC_REGS_SIZE:
            raise _fail(
                f"length {len(payload)}, expected {HVM_HW_LAPIC_REGS_SIZE}",
                offset=offset,
                typecode=HVM_SAVE_LAPIC_REGS,
            )
        return cls(bytes(payload))


# --------------------------------------------------------------------------- container

# Payload lengths Xen accepts for the typecodes modelled here.
_ACCEPTED_LENGTHS = {
    HVM_SAVE_CPU: (HVM_HW_CPU_SIZE, HVM_HW_CPU_SIZE_PRE_4_7, HVM_HW_CPU_SIZE_PRE_3_4),
    HVM_SAVE_LAPIC: (HVM_HW_LAPIC_SIZE, *_LAPIC_OLD_SIZES),
    HVM_SAVE_LAPIC_REGS: (HVM_HW_LAPIC_REGS_SIZE,),
}


class HvmRecord(NamedTuple):
    """One save entry: ``(typecode, instance, payload)``."""

    typecode: int
    instance: int
    payload: bytes


@dataclass
class HvmContext:
    """A whole HVM_CONTEXT blob: the header and the entries between HEADER and END."""

    header: HvmSaveHeader = field(default_factory=HvmSaveHeader)
    records: list[HvmRecord] = field(default_factory=list)

    def pack(self) -> bytes:
        return pack_hvm_context(self.records, header=self.header)

    @classmethod
    def unpack(cls, blob: bytes | bytearray | memoryview) -> Self:
        header, entries = _parse(blob)
        return cls(header=header, records=list(entries))


def _descriptor(typecode: int, instance: int, length: int) -> bytes:
    return DESCRIPTOR.pack(typecode, instance, length)


def pack_hvm_context(
    records: Iterable[HvmRecord | tuple[int, int, bytes]],
    *,
    header: HvmSaveHeader | None = None,
) -> bytes:
    """HEADER entry, then ``records`` in order, then END: the HVM_CONTEXT body.

    ``records`` must not contain HEADER or END themselves.  Raises StreamError
    (naming the entry) on a bad typecode, instance, or a known type's wrong size.
    """
    header_payload = (header or HvmSaveHeader()).pack()
    parts = [_descriptor(HVM_SAVE_HEADER, 0, len(header_payload)), header_payload]
    for index, item in enumerate(records):
        try:
            typecode, instance, payload = item
        except (TypeError, ValueError):
            raise _fail(f"entry {index} is not a (typecode, instance, payload) triple") from None
        where = f"entry {index}"
        if not isinstance(typecode, int) or not 0 <= typecode < 1 << 16:
            raise _fail(f"{where}: typecode {typecode!r} does not fit u16")
        if typecode in (HVM_SAVE_END, HVM_SAVE_HEADER):
            raise _fail(f"{where}: HEADER and END are added by pack_hvm_context", typecode=typecode)
        if not isinstance(instance, int) or not 0 <= instance < 1 << 16:
            raise _fail(f"{where}: instance {instance!r} does not fit u16", typecode=typecode)
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise _fail(f"{where}: payload must be bytes", typecode=typecode)
        payload = bytes(payload)
        accepted = _ACCEPTED_LENGTHS.get(typecode)
        if accepted is not None and len(payload) not in accepted:
            raise _fail(
                f"{where}: length {len(payload)}, expected {accepted[0]}", typecode=typecode
            )
        parts += [_descriptor(typecode, instance, len(payload)), payload]
    parts.append(_descriptor(HVM_SAVE_END, 0, 0))
    return b"".join(parts)


def _parse(blob: bytes | bytearray | memoryview) -> tuple[HvmSaveHeader, Iterator[HvmRecord]]:
    view = memoryview(blob).cast("B")
    size = len(view)

    def read_descriptor(pos: int) -> tuple[int, int, int]:
        if size - pos < DESCRIPTOR.size:
            if pos == size:
                raise _fail("blob ends without an END entry", offset=pos, typecode=HVM_SAVE_END)
            raise _fail(f"truncated descriptor: {size - pos} of 8 octets", offset=pos)
        typecode, instance, length = DESCRIPTOR.unpack_from(view, pos)
        if length > size - pos - DESCRIPTOR.size:
            raise _fail(
                f"length {length} runs past the end of the blob", offset=pos, typecode=typecode
            )
        return typecode, instance, length

    typecode, _instance, length = read_descriptor(0)
    if typecode != HVM_SAVE_HEADER:
        raise _fail("blob does not start with a HEADER entry", offset=0, typecode=typecode)
    header = HvmSaveHeader.unpack(view[DESCRIPTOR.size : DESCRIPTOR.size + length], offset=0)
    first = DESCRIPTOR.size + length

    def entries() -> Iterator[HvmRecord]:
        pos = first
        while True:
            typecode, instance, length = read_descriptor(pos)
            body = pos + DESCRIPTOR.size
            if typecode == HVM_SAVE_END:
                if length != 0:
                    raise _fail(f"END entry with length {length}", offset=pos, typecode=typecode)
                if body != size:
                    raise _fail(f"{size - body} octets of trailing data after END", offset=body)
                return
            if typecode == HVM_SAVE_HEADER:
                raise _fail("second HEADER entry", offset=pos, typecode=typecode)
            accepted = _ACCEPTED_LENGTHS.get(typecode)
            if accepted is not None and length not in accepted:
                raise _fail(
                    f"length {length}, expected {accepted[0]}", offset=pos, typecode=typecode
                )
            yield HvmRecord(typecode, instance, bytes(view[body : body + length]))
            pos = body + length

    return header, entries()


def iter_hvm_context(blob: bytes | bytearray | memoryview) -> Iterator[HvmRecord]:
    """Validate the HEADER and yield every entry up to (not including) END.

    Errors (StreamError, ``part`` "HVM_CONTEXT entry", offsets within the blob)
    are raised as soon as the iteration reaches the bad entry; the HEADER is
    checked on the first ``next()``.
    """
    _header, entries = _parse(blob)
    yield from entries


def read_hvm_header(blob: bytes | bytearray | memoryview) -> HvmSaveHeader:
    """Just the validated HEADER of an HVM_CONTEXT blob."""
    header, _entries = _parse(blob)
    return header
