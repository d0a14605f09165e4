"""Migration stream v2 framing: constants, the two headers, and the stream exception.

Facts from xen.git ``docs/specs/libxc-migration-stream.pandoc`` (revision 3) and
``tools/libs/guest/xg_sr_stream_format.h``:

* Image header, 24 octets, always **big-endian**::

      0  marker   u64  0xFFFFFFFFFFFFFFFF (legacy images have a zero bit here)
      8  id       u32  0x58454E46 ("XENF")
     12  version  u32  3 (2 is still accepted on read, as the spec asks)
     16  options  u16  bit 0 = endianness of everything after this header
     18  reserved 6 octets

* Domain header, 16 octets, in the stream's endianness (little-endian here)::

      0  type        u32  1 x86 PV, 2 x86 HVM
      4  page_shift  u16  12
      6  reserved    u16
      8  xen_major   u32
     12  xen_minor   u32

* Record: ``type u32, body_length u32, body, zero padding to a multiple of 8``.
  ``body_length`` excludes the padding; bit 31 of ``type`` marks an optional
  record, which a reader that does not know it may skip.  libxc refuses
  records longer than 128 MiB (``REC_LENGTH_MAX``) and so do we.

Reserved fields other than the image-header options are ignored on read, as
the spec says ("set to zero on save and must be ignored during restore"); the
writer always zeroes them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import numpy.typing as npt

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT

IHDR_MARKER = 0xFFFF_FFFF_FFFF_FFFF
IHDR_ID = 0x58454E46  # "XENF"
IHDR_VERSION = 3
IHDR_READABLE_VERSIONS = (2, 3)
IHDR_OPT_BIG_ENDIAN = 1 << 0
IHDR_OPT_RESERVED_MASK = 0xFFFE

REC_ALIGN = 8
REC_HEADER_SIZE = 8
REC_LENGTH_MAX = 128 << 20
REC_TYPE_OPTIONAL = 0x8000_0000

# libxc's MAX_BATCH_SIZE: the most pfns a saver puts in one PAGE_DATA record.
MAX_BATCH_SIZE = 1024

# PAGE_DATA pfn word: bits 63-60 PFINFO type, 59-52 reserved, 51-0 PFN.
PAGE_DATA_PFN_MASK = (1 << 52) - 1
PAGE_DATA_TYPE_SHIFT = 60
PAGE_DATA_RESERVED_MASK = ((1 << 60) - 1) & ~PAGE_DATA_PFN_MASK


class DomainType(IntEnum):
    """Domain header ``type`` values (spec revision 3 reserves everything else)."""

    X86_PV = 1
    X86_HVM = 2


class RecordType(IntEnum):
    """Mandatory record types of the libxc stream (``REC_TYPE_*``)."""

    END = 0x00
    PAGE_DATA = 0x01
    X86_PV_INFO = 0x02
    X86_PV_P2M_FRAMES = 0x03
    X86_PV_VCPU_BASIC = 0x04
    X86_PV_VCPU_EXTENDED = 0x05
    X86_PV_VCPU_XSAVE = 0x06
    SHARED_INFO = 0x07
    X86_TSC_INFO = 0x08
    HVM_CONTEXT = 0x09
    HVM_PARAMS = 0x0A
    TOOLSTACK = 0x0B
    X86_PV_VCPU_MSRS = 0x0C
    VERIFY = 0x0D
    CHECKPOINT = 0x0E
    CHECKPOINT_DIRTY_PFN_LIST = 0x0F
    STATIC_DATA_END = 0x10
    X86_CPUID_POLICY = 0x11
    X86_MSR_POLICY = 0x12


class Pfinfo(IntEnum):
    """``XEN_DOMCTL_PFINFO_*`` page types as carried in bits 63-60 of a PAGE_DATA pfn."""

    NOTAB = 0x0
    L1TAB = 0x1
    L2TAB = 0x2
    L3TAB = 0x3
    L4TAB = 0x4
    L1TAB_PIN = 0x9
    L2TAB_PIN = 0xA
    L3TAB_PIN = 0xB
    L4TAB_PIN = 0xC
    BROKEN = 0xD
    XALLOC = 0xE
    XTAB = 0xF


PFINFO_LPINTAB = 0x8  # pinned bit, set on top of L1TAB..L4TAB
PFINFO_LTABTYPE_MASK = 0x7  # level of a (possibly pinned) page-table type

# Lookup tables indexed by the 4-bit type: vectorised validity / has-data checks.
_PFINFO_VALID = np.zeros(16, dtype=bool)
_PFINFO_VALID[[int(t) for t in Pfinfo]] = True
_PFINFO_HAS_DATA = _PFINFO_VALID.copy()
_PFINFO_HAS_DATA[[Pfinfo.BROKEN, Pfinfo.XALLOC, Pfinfo.XTAB]] = False


def pfinfo_is_valid(types: npt.NDArray[np.uint8]) -> npt.NDArray[np.bool_]:
    """Per element: is this a defined PFINFO type (0x5-0x8 and >0xF are not)?"""
    types = np.asarray(types)
    in_range = types < 16
    return in_range & _PFINFO_VALID[np.where(in_range, types, 0)]


def pfinfo_has_data(types: npt.NDArray[np.uint8]) -> npt.NDArray[np.bool_]:
    """Per element: does a page of this type carry 4096 octets in PAGE_DATA?

    BROKEN, XALLOC and XTAB do not; every other valid type does.
    """
    types = np.asarray(types)
    in_range = types < 16
    return in_range & _PFINFO_HAS_DATA[np.where(in_range, types, 0)]


def record_type_name(rtype: int) -> str:
    """Name for messages: ``PAGE_DATA``, or ``UNKNOWN_0x0000002a`` / ``OPTIONAL_0x8000...``."""
    try:
        return RecordType(rtype).name
    except ValueError:
        prefix = "OPTIONAL" if rtype & REC_TYPE_OPTIONAL else "UNKNOWN"
        return f"{prefix}_0x{rtype:08x}"


def padded_length(body_length: int) -> int:
    """Body length rounded up to the 8-octet record alignment."""
    return (body_length + REC_ALIGN - 1) & ~(REC_ALIGN - 1)


class StreamError(Exception):
    """A malformed (or unwritable) migration stream.

    ``offset`` is where the offending structure starts: the record header for
    record problems, 0 for the image header, 24 for the domain header (offsets
    count from the start of the stream).  ``record`` names the record type when
    known (``"PAGE_DATA"``); ``part`` says what kind of structure it is, so
    ``str(err)`` reads ``record PAGE_DATA at offset 0x1a8: body length 4096 runs
    past end of file`` and a CLI can prefix the file name.
    """

    def __init__(
        self,
        reason: str,
        *,
        offset: int | None = None,
        record: str | None = None,
        part: str = "record",
    ) -> None:
        self.reason = reason
        self.offset = offset
        self.record = record
        self.part = part
        super().__init__(self._render())

    def _render(self) -> str:
        where = self.part if self.record is None else f"{self.part} {self.record}"
        if self.offset is not None:
            where += f" at offset {self.offset:#x}"
        return f"{where}: {self.reason}"

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only arguments: teach pickle (multiprocessing, dask) to rebuild us.
        return (_rebuild_stream_error, (self.reason, self.offset, self.record, self.part))


def _rebuild_stream_error(
    reason: str, offset: int | None, record: str | None, part: str
) -> StreamError:
    return StreamError(reason, offset=offset, record=record, part=part)


_IHDR = struct.Struct(">QIIHHI")
_DHDR = struct.Struct("<IHHII")
REC_HEADER = struct.Struct("<II")

IMAGE_HEADER_SIZE = _IHDR.size  # 24
DOMAIN_HEADER_SIZE = _DHDR.size  # 16


@dataclass(frozen=True)
class ImageHeader:
    """The 24-octet big-endian image header (marker and id are constants)."""

    version: int = IHDR_VERSION
    options: int = 0  # little-endian; the only layout this package reads or writes

    def pack(self) -> bytes:
        if self.version not in IHDR_READABLE_VERSIONS:
            raise StreamError(f"cannot write image version {self.version}", part="image header")
        if self.options != 0:
            raise StreamError(
                f"cannot write options {self.options:#x}: only little-endian streams",
                part="image header",
            )
        return _IHDR.pack(IHDR_MARKER, IHDR_ID, self.version, self.options, 0, 0)

    @classmethod
    def unpack(cls, data: bytes | bytearray, *, offset: int = 0) -> ImageHeader:
        def fail(reason: str) -> StreamError:
            return StreamError(reason, offset=offset, part="image header")

        if len(data) < IMAGE_HEADER_SIZE:
            raise fail(f"truncated: {len(data)} of {IMAGE_HEADER_SIZE} octets present")
        marker, ident, version, options, _res1, _res2 = _IHDR.unpack_from(data)
        if marker != IHDR_MARKER:
            raise fail(
                f"bad marker {marker:#018x}, expected {IHDR_MARKER:#018x} "
                "(not a migration-v2 image; legacy images have zero bits here)"
            )
        if ident != IHDR_ID:
            raise fail(f"bad id {ident:#010x}, expected {IHDR_ID:#010x} ('XENF')")
        if version not in IHDR_READABLE_VERSIONS:
            raise fail(f"unsupported version {version}, expected 2 or 3")
        if options & IHDR_OPT_BIG_ENDIAN:
            raise fail("big-endian streams are not supported")
        if options & IHDR_OPT_RESERVED_MASK:
            raise fail(f"reserved option bits set: {options & IHDR_OPT_RESERVED_MASK:#06x}")
        return cls(version=version, options=options)


@dataclass(frozen=True)
class DomainHeader:
    """The 16-octet domain header."""

    type: DomainType
    xen_major: int
    xen_minor: int
    page_shift: int = PAGE_SHIFT

    def pack(self) -> bytes:
        try:
            dtype = DomainType(self.type)
        except ValueError:
            raise StreamError(
                f"cannot write domain type {self.type!r}", part="domain header"
            ) from None
        if self.page_shift != PAGE_SHIFT:
            raise StreamError(
                f"cannot write page_shift {self.page_shift}, only {PAGE_SHIFT}",
                part="domain header",
            )
        for name in ("xen_major", "xen_minor"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < 1 << 32:
                raise StreamError(f"{name} {value!r} does not fit u32", part="domain header")
        return _DHDR.pack(int(dtype), self.page_shift, 0, self.xen_major, self.xen_minor)

    @classmethod
    def unpack(cls, data: bytes | bytearray, *, offset: int = IMAGE_HEADER_SIZE) -> DomainHeader:
        def fail(reason: str) -> StreamError:
            return StreamError(reason, offset=offset, part="domain header")

        if len(data) < DOMAIN_HEADER_SIZE:
            raise fail(f"truncated: {len(data)} of {DOMAIN_HEADER_SIZE} octets present")
        dtype, page_shift, _res, major, minor = _DHDR.unpack_from(data)
        try:
            domain_type = DomainType(dtype)
        except ValueError:
            raise fail(f"unsupported domain type {dtype:#x} (1 = x86 PV, 2 = x86 HVM)") from None
        if page_shift != PAGE_SHIFT:
            raise fail(f"page_shift {page_shift}, expected {PAGE_SHIFT}")
        return cls(type=domain_type, xen_major=major, xen_minor=minor, page_shift=page_shift)


def check_pfns(
    pfns: npt.NDArray[np.uint64],
    nr_pfns: int,
    seen_bitmap: npt.NDArray[np.bool_],
    *,
    offset: int | None = None,
) -> None:
    """Restorer-side check of one PAGE_DATA batch against the domain's size.

    Raises :class:`StreamError` (record ``PAGE_DATA``) if a pfn is ``>= nr_pfns``
    or appears twice (within the batch or in ``seen_bitmap``, a bool array of at
    least ``nr_pfns`` entries).  Only on success are the pfns marked in
    ``seen_bitmap``; on failure nothing changes.
    """
    pfns = np.asarray(pfns, dtype=np.uint64)

    def fail(reason: str) -> StreamError:
        return StreamError(reason, offset=offset, record="PAGE_DATA")

    if seen_bitmap.dtype != np.bool_ or seen_bitmap.shape[0] < nr_pfns:
        raise fail(f"seen_bitmap must be a bool array of at least {nr_pfns} entries")
    beyond = np.flatnonzero(pfns >= np.uint64(nr_pfns))
    if beyond.size:
        i = int(beyond[0])
        raise fail(f"pfn[{i}] {int(pfns[i]):#x} beyond the domain's {nr_pfns:#x} pages")
    already = np.flatnonzero(seen_bitmap[pfns])
    if already.size:
        i = int(already[0])
        raise fail(f"pfn[{i}] {int(pfns[i]):#x} already seen in an earlier record")
    unique, first_index, counts = np.unique(pfns, return_index=True, return_counts=True)
    if unique.size != pfns.size:
        dup = int(unique[counts > 1][0])
        i = int(np.flatnonzero(pfns == np.uint64(dup))[1])
        raise fail(f"pfn[{i}] {dup:#x} duplicates pfn[{int(first_index[counts > 1][0])}]")
    seen_bitmap[pfns] = True
