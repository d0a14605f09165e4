"""Typed migration-stream records and their body codecs (shared by reader and writer).

Each record class knows its ``TYPE``, encodes its body (``encode_body``, a list
of buffers so page data is never copied into one big bytes object) and decodes
one (``decode_body``).  Size rules follow the spec and what libxc's restore
enforces (``xg_sr_restore*.c``):

============================ ==========================================================
PAGE_DATA                    ``u32 count, u32 reserved, u64 pfn[count], pages``;
                             count > 0; body = 8 + 8*count + 4096*(pages with data)
X86_PV_INFO                  ``u8 guest_width, u8 pt_levels, 6 reserved``; (8,4) or (4,3)
X86_PV_P2M_FRAMES            ``u32 start_pfn, u32 end_pfn, u64 p2m_pfn[]``; start <= end;
                             one pfn per p2m frame covering start..end (512 per frame for
                             a 64-bit guest)
X86_PV_VCPU_*                ``u32 vcpu_id, u32 reserved, context``; BASIC context is a
                             5168-octet vcpu_guest_context (64-bit), EXTENDED <= 128,
                             XSAVE >= 16, MSRS a multiple of 16
SHARED_INFO                  exactly 4096 octets
X86_TSC_INFO                 ``u32 mode, u32 khz, u64 nsec, u32 incarnation, u32 reserved``
HVM_CONTEXT                  non-empty blob (see hvm_records)
HVM_PARAMS                   ``u32 count, u32 reserved, {u64 index, u64 value}[count]``
X86_CPUID_POLICY             ``xen_cpuid_leaf_t[]``, 24 octets each
X86_MSR_POLICY               ``xen_msr_entry_t[]``, 16 octets each
END, VERIFY, CHECKPOINT,     empty
STATIC_DATA_END
============================ ==========================================================

Records carry ``offset``: where their header starts in the stream (``-1`` for
records built in memory), so a consumer can report later problems precisely.
It takes no part in equality.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Self

import numpy as np
import numpy.typing as npt

from .framing import (
    PAGE_DATA_PFN_MASK,
    PAGE_DATA_RESERVED_MASK,
    PAGE_DATA_TYPE_SHIFT,
    PAGE_SIZE,
    DomainType,
    RecordType,
    pfinfo_has_data,
    pfinfo_is_valid,
)
from .vcpu_context import VCPU_GUEST_CONTEXT_SIZE, VcpuGuestContext

Buffer = bytes | bytearray | memoryview

_U32X2 = struct.Struct("<II")
_PV_INFO = struct.Struct("<BB6x")
_TSC_INFO = struct.Struct("<IIQI4x")

CPUID_LEAF_SIZE = 24  # xen_cpuid_leaf_t: u32 leaf, subleaf, a, b, c, d
MSR_ENTRY_SIZE = 16  # xen_msr_entry_t: u32 idx, u32 flags, u64 val
VCPU_EXTENDED_MAX = 128
VCPU_XSAVE_MIN = 16


class BodyError(Exception):
    """A record body that breaks its type's rules; the reader/writer adds offset and name."""


@dataclass(frozen=True)
class CodecContext:
    """What body coding needs from earlier records: the PV guest width (8 until told)."""

    guest_width: int = 8


def _u(name: str, value: object, bits: int) -> int:
    if not isinstance(value, int | np.integer) or isinstance(value, bool):
        raise BodyError(f"{name} {value!r} is not an integer")
    value = int(value)
    if not 0 <= value < 1 << bits:
        raise BodyError(f"{name} {value:#x} does not fit u{bits}")
    return value


def _require_empty(body: Buffer) -> None:
    if len(body) != 0:
        raise BodyError(f"body length {len(body)}, expected 0")


# --------------------------------------------------------------------------- PAGE_DATA


@dataclass(frozen=True, eq=False)
class PageDataRecord:
    """A batch of pages: pfns (bits 51-0 only), their PFINFO types, and the data pages.

    ``pages`` has one 4096-octet row per pfn whose type carries data (all but
    BROKEN, XALLOC and XTAB), in pfn order; ``data_index`` maps them back.
    """

    pfns: npt.NDArray[np.uint64]
    types: npt.NDArray[np.uint8]
    pages: npt.NDArray[np.uint8]
    offset: int = field(default=-1, compare=False)

    TYPE: ClassVar[RecordType] = RecordType.PAGE_DATA

    @property
    def count(self) -> int:
        return int(self.pfns.shape[0])

    @property
    def has_data(self) -> npt.NDArray[np.bool_]:
        return pfinfo_has_data(self.types)

    @property
    def data_pfns(self) -> npt.NDArray[np.uint64]:
        """The pfns that ``pages`` rows belong to, row by row."""
        return self.pfns[self.has_data]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PageDataRecord):
            return NotImplemented
        return (
            np.array_equal(self.pfns, other.pfns)
            and np.array_equal(self.types, other.types)
            and np.array_equal(self.pages, other.pages)
        )

    __hash__ = None  # type: ignore[assignment]

    def validate(self) -> None:
        pfns, types, pages = self.pfns, self.types, self.pages
        if not isinstance(pfns, np.ndarray) or pfns.ndim != 1 or pfns.dtype.kind not in "ui":
            raise BodyError("pfns must be a 1-D integer array")
        if not isinstance(types, np.ndarray) or types.shape != pfns.shape:
            raise BodyError(f"types must be an array of {pfns.shape[0]} PFINFO values")
        if pfns.size == 0:
            raise BodyError("count is 0; a PAGE_DATA record needs at least one pfn")
        if pfns.dtype.kind == "i" and (pfns < 0).any():
            raise BodyError(f"pfn[{int(np.flatnonzero(pfns < 0)[0])}] is negative")
        too_big = np.flatnonzero(pfns.astype(np.uint64) > np.uint64(PAGE_DATA_PFN_MASK))
        if too_big.size:
            i = int(too_big[0])
            raise BodyError(f"pfn[{i}] {int(pfns[i]):#x} does not fit 52 bits")
        if types.dtype.kind not in "ui" or (types.dtype.kind == "i" and (types < 0).any()):
            raise BodyError("types must be non-negative integers (PFINFO values)")
        bad = np.flatnonzero(~pfinfo_is_valid(types))
        if bad.size:
            i = int(bad[0])
            raise BodyError(f"pfn[{i}] has unknown PFINFO type {int(types[i]):#x}")
        n_data = int(np.count_nonzero(pfinfo_has_data(types)))
        if (
            not isinstance(pages, np.ndarray)
            or pages.dtype != np.uint8
            or pages.shape != (n_data, PAGE_SIZE)
        ):
            shape = getattr(pages, "shape", None)
            raise BodyError(
                f"pages must be a uint8 array of shape ({n_data}, {PAGE_SIZE}) for the "
                f"{n_data} pfns that carry data, got {shape}"
            )

    def encode_body(self, ctx: CodecContext) -> list[Buffer]:
        self.validate()
        words = self.pfns.astype("<u8") | (
            self.types.astype("<u8") << np.uint64(PAGE_DATA_TYPE_SHIFT)
        )
        parts: list[Buffer] = [_U32X2.pack(self.count, 0), words.tobytes()]
        if self.pages.size:
            parts.append(np.ascontiguousarray(self.pages).data.cast("B"))
        return parts

    @classmethod
    def decode_body(cls, body: bytearray, ctx: CodecContext) -> Self:
        length = len(body)
        if length < _U32X2.size:
            raise BodyError(f"body length {length} too short for the 8-octet PAGE_DATA header")
        count, _reserved = _U32X2.unpack_from(body)
        if count == 0:
            raise BodyError("count is 0; a PAGE_DATA record needs at least one pfn")
        if length < 8 + 8 * count:
            raise BodyError(f"body length {length} too short for count {count} pfns")
        words = np.frombuffer(body, dtype="<u8", count=count, offset=8)
        reserved = np.flatnonzero(words & np.uint64(PAGE_DATA_RESERVED_MASK))
        if reserved.size:
            i = int(reserved[0])
            raise BodyError(f"pfn[{i}] {int(words[i]):#018x} has reserved bits 59-52 set")
        types = (words >> np.uint64(PAGE_DATA_TYPE_SHIFT)).astype(np.uint8)
        bad = np.flatnonzero(~pfinfo_is_valid(types))
        if bad.size:
            i = int(bad[0])
            raise BodyError(f"pfn[{i}] has unknown PFINFO type {int(types[i]):#x}")
        n_data = int(np.count_nonzero(pfinfo_has_data(types)))
        expected = 8 + 8 * count + PAGE_SIZE * n_data
        if length != expected:
            raise BodyError(
                f"body length {length} does not match count {count}: expected {expected} "
                f"({count} pfns, {n_data} pages of data)"
            )
        pages = np.frombuffer(body, dtype=np.uint8, count=PAGE_SIZE * n_data, offset=8 + 8 * count)
        return cls(
            pfns=(words & np.uint64(PAGE_DATA_PFN_MASK)).astype(np.uint64),
            types=types,
            pages=pages.reshape(n_data, PAGE_SIZE),
        )


# --------------------------------------------------------------------------- PV records


@dataclass(frozen=True)
class X86PvInfoRecord:
    guest_width: int = 8
    pt_levels: int = 4
    offset: int = field(default=-1, compare=False)

    TYPE: ClassVar[RecordType] = RecordType.X86_PV_INFO

    def encode_body(self, ctx: CodecContext) -> list[Buffer]:
        if (self.guest_width, self.pt_levels) not in ((8, 4), (4, 3)):
            raise BodyError(
                f"guest_width {self.guest_width} / pt_levels {self.pt_levels}: "
                "only 8/4 and 4/3 exist"
            )
        return [_PV_INFO.pack(self.guest_width, self.pt_levels)]

    @classmethod
    def decode_body(cls, body: bytearray, ctx: CodecContext) -> Self:
        if len(body) != _PV_INFO.size:
            raise BodyError(f"body length {len(body)}, expected {_PV_INFO.size}")
        width, levels = _PV_INFO.unpack(body)
        record = cls(guest_width=width, pt_levels=levels)
        record.encode_body(ctx)  # same combination check
        return record


def p2m_frame_count(start_pfn: int, end_pfn: int, guest_width: int = 8) -> int:
    """Number of p2m frames covering pfns ``start_pfn..end_pfn`` (inclusive)."""
    per_frame = PAGE_SIZE // guest_width
    return end_pfn // per_frame - start_pfn // per_frame + 1


@dataclass(frozen=True, eq=False)
class X86PvP2mFramesRecord:
    start_pfn: int
    end_pfn: int
    p2m_pfns: npt.NDArray[np.uint64]
    offset: int = field(default=-1, compare=False)

    TYPE: ClassVar[RecordType] = RecordType.X86_PV_P2M_FRAMES

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, X86PvP2mFramesRecord):
            return NotImplemented
        return (self.start_pfn, self.end_pfn) == (other.start_pfn, other.end_pfn) and bool(
            np.array_equal(self.p2m_pfns, other.p2m_pfns)
        )

    __hash__ = None  # type: ignore[assignment]

    def encode_body(self, ctx: CodecContext) -> list[Buffer]:
        start = _u("start_pfn", self.start_pfn, 32)
        end = _u("end_pfn", self.end_pfn, 32)
        if start > end:
            raise BodyError(f"start_pfn {start:#x} above end_pfn {end:#x}")
        pfns = np.asarray(self.p2m_pfns)
        expected = p2m_frame_count(start, end, ctx.guest_width)
        if pfns.ndim != 1 or pfns.shape[0] != expected or pfns.dtype.kind not in "ui":
            raise BodyError(f"p2m_pfns must be {expected} integers for pfns {start:#x}..{end:#x}")
        if pfns.dtype.kind == "i" and (pfns < 0).any():
            raise BodyError("p2m_pfns must be non-negative")
        return [_U32X2.pack(start, end), pfns.astype("<u8").tobytes()]

    @classmethod
    def decode_body(cls, body: bytearray, ctx: CodecContext) -> Self:
        if len(body) < _U32X2.size:
            raise BodyError(f"body length {len(body)} too short for start/end pfn")
        start, end = _U32X2.unpack_from(body)
        if start > end:
            raise BodyError(f"start_pfn {start:#x} above end_pfn {end:#x}")
        frames = p2m_frame_count(start, end, ctx.guest_width)
        if len(body) != 8 + 8 * frames:
            raise BodyError(
                f"body length {len(body)}, expected {8 + 8 * frames} for {frames} p2m frames "
                f"covering pfns {start:#x}..{end:#x}"
            )
        pfns = np.frombuffer(body, dtype="<u8", count=frames, offset=8).astype(np.uint64)
        return cls(start_pfn=start, end_pfn=end, p2m_pfns=pfns)


@dataclass(frozen=True)
class X86PvVcpuRecord:
    """Common shape of the four X86_PV_VCPU_* records: a vcpu id and an opaque blob."""

    vcpu_id: int
    context: bytes
    offset: int = field(default=-1, compare=False)

    TYPE: ClassVar[RecordType]

    def check_context(self, ctx: CodecContext) -> None:
        """Per-type size rule (libxc's handle_x86_pv_vcpu_blob)."""

    def encode_body(self, ctx: CodecContext) -> list[Buffer]:
        if not isinstance(self.context, bytes | bytearray | memoryview):
            raise BodyError("context must be bytes")
        if len(self.context) == 0:
            raise BodyError("empty context (readers ignore such records; do not write one)")
        self.check_context(ctx)
        return [_U32X2.pack(_u("vcpu_id", self.vcpu_id, 32), 0), bytes(self.context)]

    @classmethod
    def decode_body(cls, body: bytearray, ctx: CodecContext) -> Self:
        if len(body) < _U32X2.size:
            raise BodyError(f"body length {len(body)} too short for the 8-octet vcpu header")
        vcpu_id, _reserved = _U32X2.unpack_from(body)
        record = cls(vcpu_id=vcpu_id, context=bytes(body[8:]))
        if record.context:
            record.check_context(ctx)
        return record


@dataclass(frozen=True)
class X86PvVcpuBasicRecord(X86PvVcpuRecord):
    TYPE: ClassVar[RecordType] = RecordType.X86_PV_VCPU_BASIC

    def check_context(self, ctx: CodecContext) -> None:
        if ctx.guest_width == 8 and len(self.context) != VCPU_GUEST_CONTEXT_SIZE:
            raise BodyError(
                f"context is {len(self.context)} octets, an x86_64 vcpu_guest_context is "
                f"{VCPU_GUEST_CONTEXT_SIZE}"
            )

    def guest_context(self) -> VcpuGuestContext:
        """Decode the blob (x86_64 guests); StreamError carries this record's offset."""
        offset = self.offset if self.offset >= 0 else None
        return VcpuGuestContext.unpack(self.context, offset=offset)


@dataclass(frozen=True)
class X86PvVcpuExtendedRecord(X86PvVcpuRecord):
    TYPE: ClassVar[RecordType] = RecordType.X86_PV_VCPU_EXTENDED

    def check_context(self, ctx: CodecContext) -> None:
        if len(self.context) > VCPU_EXTENDED_MAX:
            raise BodyError(f"context is {len(self.context)} octets, max {VCPU_EXTENDED_MAX}")


@dataclass(frozen=True)
class X86PvVcpuXsaveRecord(X86PvVcpuRecord):
    TYPE: ClassVar[RecordType] = RecordType.X86_PV_VCPU_XSAVE

    def check_context(self, ctx: CodecContext) -> None:
        if len(self.context) < VCPU_XSAVE_MIN:
            raise BodyError(f"context is {len(self.context)} octets, min {VCPU_XSAVE_MIN}")


@dataclass(frozen=True)
class X86PvVcpuMsrsRecord(X86PvVcpuRecord):
    TYPE: ClassVar[RecordType] = RecordType.X86_PV_VCPU_MSRS

    def check_context(self, ctx: CodecContext) -> None:
        if len(self.context) % MSR_ENTRY_SIZE:
            raise BodyError(
                f"context is {len(self.context)} octets, not a multiple of {MSR_ENTRY_SIZE}"
            )


@dataclass(frozen=True)
class SharedInfoRecord:
    page: bytes
    offset: int = field(default=-1, compare=False)

    TYPE: ClassVar[RecordType] = RecordType.SHARED_INFO

    def encode_body(self, ctx: CodecContext) -> list[Buffer]:
        if not isinstance(self.page, bytes | bytearray | memoryview) or len(self.page) != PAGE_SIZE:
            raise BodyError(f"shared info must be exactly {PAGE_SIZE} octets")
        return [bytes(self.page)]

    @classmethod
    def decode_body(cls, body: bytearray, ctx: CodecContext) -> Self:
        if len(body) != PAGE_SIZE:
            raise BodyError(f"body length {len(body)}, expected {PAGE_SIZE}")
        return cls(page=bytes(body))


# --------------------------------------------------------------------------- common records


@dataclass(frozen=True)
class X86TscInfoRecord:
    mode: int = 0
    khz: int = 0
    nsec: int = 0
    incarnation: int = 0
    offset: int = field(default=-1, compare=False)

    TYPE: ClassVar[RecordType] = RecordType.X86_TSC_INFO

    def encode_body(self, ctx: CodecContext) -> list[Buffer]:
        return [
            _TSC_INFO.pack(
                _u("mode", self.mode, 32),
                _u("khz", self.khz, 32),
                _u("nsec", self.nsec, 64),
                _u("incarnation", self.incarnation, 32),
            )
        ]

    @classmethod
    def decode_body(cls, body: bytearray, ctx: CodecContext) -> Self:
        if len(body) != _TSC_INFO.size:
            raise BodyError(f"body length {len(body)}, expected {_TSC_INFO.size}")
        mode, khz, nsec, incarnation = _TSC_INFO.unpack(body)
        return cls(mode=mode, khz=khz, nsec=nsec, incarnation=incarnation)


@dataclass(frozen=True)
class HvmContextRecord:
    """The HVM save blob; decode it with :mod:`hypervisor.stream.hvm_records`."""

    blob: bytes
    offset: int = field(default=-1, compare=False)

    TYPE: ClassVar[RecordType] = RecordType.HVM_CONTEXT

    def encode_body(self, ctx: CodecContext) -> list[Buffer]:
        if not isinstance(self.blob, bytes | bytearray | memoryview) or len(self.blob) == 0:
            raise BodyError("HVM context blob must be non-empty bytes")
        return [bytes(self.blob)]

    @classmethod
    def decode_body(cls, body: bytearray, ctx: CodecContext) -> Self:
        if len(body) == 0:
            raise BodyError("zero-length HVM context")
        return cls(blob=bytes(body))


@dataclass(frozen=True)
class HvmParamsRecord:
    params: tuple[tuple[int, int], ...]
    offset: int = field(default=-1, compare=False)

    TYPE: ClassVar[RecordType] = RecordType.HVM_PARAMS

    def encode_body(self, ctx: CodecContext) -> list[Buffer]:
        if len(self.params) == 0:
            raise BodyError("no parameters (readers ignore such records; do not write one)")
        out = [_U32X2.pack(_u("count", len(self.params), 32), 0)]
        for i, pair in enumerate(self.params):
            if not isinstance(pair, Sequence) or len(pair) != 2:
                raise BodyError(f"param[{i}] is not an (index, value) pair")
            index = _u(f"param[{i}].index", pair[0], 64)
            value = _u(f"param[{i}].value", pair[1], 64)
            out.append(struct.pack("<QQ", index, value))
        return [b"".join(out)]

    @classmethod
    def decode_body(cls, body: bytearray, ctx: CodecContext) -> Self:
        if len(body) < _U32X2.size:
            raise BodyError(f"body length {len(body)} too short for the 8-octet header")
        count, _reserved = _U32X2.unpack_from(body)
        if len(body) != 8 + 16 * count:
            expected = 8 + 16 * count
            raise BodyError(f"body length {len(body)}, expected {expected} for {count} params")
        flat = struct.unpack_from(f"<{2 * count}Q", body, 8)
        return cls(params=tuple(zip(flat[0::2], flat[1::2], strict=True)))


@dataclass(frozen=True)
class _PolicyRecord:
    data: bytes
    offset: int = field(default=-1, compare=False)

    ENTRY_SIZE: ClassVar[int]
    TYPE: ClassVar[RecordType]

    def encode_body(self, ctx: CodecContext) -> list[Buffer]:
        if not isinstance(self.data, bytes | bytearray | memoryview):
            raise BodyError("policy data must be bytes")
        if len(self.data) == 0 or len(self.data) % self.ENTRY_SIZE:
            raise BodyError(
                f"policy of {len(self.data)} octets is not a non-empty multiple of "
                f"{self.ENTRY_SIZE}"
            )
        return [bytes(self.data)]

    @classmethod
    def decode_body(cls, body: bytearray, ctx: CodecContext) -> Self:
        if len(body) % cls.ENTRY_SIZE:
            raise BodyError(f"body length {len(body)} not a multiple of {cls.ENTRY_SIZE}")
        return cls(data=bytes(body))


@dataclass(frozen=True)
class X86CpuidPolicyRecord(_PolicyRecord):
    ENTRY_SIZE: ClassVar[int] = CPUID_LEAF_SIZE
    TYPE: ClassVar[RecordType] = RecordType.X86_CPUID_POLICY


@dataclass(frozen=True)
class X86MsrPolicyRecord(_PolicyRecord):
    ENTRY_SIZE: ClassVar[int] = MSR_ENTRY_SIZE
    TYPE: ClassVar[RecordType] = RecordType.X86_MSR_POLICY


@dataclass(frozen=True)
class _EmptyRecord:
    offset: int = field(default=-1, compare=False)

    TYPE: ClassVar[RecordType]

    def encode_body(self, ctx: CodecContext) -> list[Buffer]:
        return []

    @classmethod
    def decode_body(cls, body: bytearray, ctx: CodecContext) -> Self:
        _require_empty(body)
        return cls()


@dataclass(frozen=True)
class EndRecord(_EmptyRecord):
    TYPE: ClassVar[RecordType] = RecordType.END


@dataclass(frozen=True)
class VerifyRecord(_EmptyRecord):
    TYPE: ClassVar[RecordType] = RecordType.VERIFY


@dataclass(frozen=True)
class CheckpointRecord(_EmptyRecord):
    TYPE: ClassVar[RecordType] = RecordType.CHECKPOINT


@dataclass(frozen=True)
class StaticDataEndRecord(_EmptyRecord):
    TYPE: ClassVar[RecordType] = RecordType.STATIC_DATA_END


Record = (
    PageDataRecord
    | X86PvInfoRecord
    | X86PvP2mFramesRecord
    | X86PvVcpuBasicRecord
    | X86PvVcpuExtendedRecord
    | X86PvVcpuXsaveRecord
    | X86PvVcpuMsrsRecord
    | SharedInfoRecord
    | X86TscInfoRecord
    | HvmContextRecord
    | HvmParamsRecord
    | X86CpuidPolicyRecord
    | X86MsrPolicyRecord
    | EndRecord
    | VerifyRecord
    | CheckpointRecord
    | StaticDataEndRecord
)

RECORD_CLASSES: dict[int, type[Record]] = {
    cls.TYPE: cls
    for cls in (
        PageDataRecord, X86PvInfoRecord, X86PvP2mFramesRecord,
        X86PvVcpuBasicRecord, X86PvVcpuExtendedRecord, X86PvVcpuXsaveRecord, X86PvVcpuMsrsRecord,
        SharedInfoRecord, X86TscInfoRecord, HvmContextRecord, HvmParamsRecord,
        X86CpuidPolicyRecord, X86MsrPolicyRecord,
        EndRecord, VerifyRecord, CheckpointRecord, StaticDataEndRecord,
    )
}  # fmt: skip

# Records that only make sense for one kind of domain (libxc's PV/HVM restore ops).
PV_ONLY = frozenset(
    {
        RecordType.X86_PV_INFO,
        RecordType.X86_PV_P2M_FRAMES,
        RecordType.X86_PV_VCPU_BASIC,
        RecordType.X86_PV_VCPU_EXTENDED,
        RecordType.X86_PV_VCPU_XSAVE,
        RecordType.X86_PV_VCPU_MSRS,
        RecordType.SHARED_INFO,
    }
)
HVM_ONLY = frozenset({RecordType.HVM_CONTEXT, RecordType.HVM_PARAMS})
# Records that belong before STATIC_DATA_END (spec "Static data records").
STATIC_RECORDS = frozenset(
    {RecordType.X86_PV_INFO, RecordType.X86_CPUID_POLICY, RecordType.X86_MSR_POLICY}
)
# Records libxc refuses before STATIC_DATA_END in a v3 stream.
NEEDS_STATIC_DATA_END = frozenset({RecordType.PAGE_DATA, RecordType.X86_PV_P2M_FRAMES})


def misplaced(rtype: int, domain: DomainType, pv_info_seen: bool) -> str | None:
    """Why a record may not stand here, by the rules reader and writer share (the
    domain type it belongs to, X86_PV_INFO first and once), or None."""
    if rtype in PV_ONLY and domain != DomainType.X86_PV:
        return "not valid in an x86 HVM stream"
    if rtype in HVM_ONLY and domain != DomainType.X86_HVM:
        return "not valid in an x86 PV stream"
    if rtype == RecordType.X86_PV_INFO and pv_info_seen:
        return "a second X86_PV_INFO: it was already written"
    if rtype in (RecordType.X86_PV_P2M_FRAMES, RecordType.SHARED_INFO) and not pv_info_seen:
        return "X86_PV_INFO must come first"
    return None
