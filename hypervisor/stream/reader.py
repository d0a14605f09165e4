"""Streaming reader for migration stream v2 images.

``StreamReader(f)`` validates the image and domain headers on construction,
then yields one typed record at a time.  It never reads past the end of the
record it is decoding (no read-ahead), so at most one record is in memory; a
PAGE_DATA record's arrays are views into that record's own buffer.

Every malformed input raises :class:`StreamError` with the offset of the
record (or header) at fault and the record's name.  Besides each record's own
size rules (see :mod:`.records`) the reader enforces what libxc's restore does
about the stream as a whole:

* a mandatory record type it does not know (or TOOLSTACK /
  CHECKPOINT_DIRTY_PFN_LIST, which it does not support) fails; an unknown
  optional record (bit 31) is skipped and listed in ``skipped``;
* PV-only records in an HVM stream, or HVM-only records in a PV stream, fail;
* X86_PV_INFO at most once, and before X86_PV_P2M_FRAMES and SHARED_INFO;
* in a version-3 stream PAGE_DATA and X86_PV_P2M_FRAMES need a preceding
  STATIC_DATA_END (in version 2 its position is inferred); at most one
  STATIC_DATA_END;
* the stream must end with END; the reader stops there and reads nothing
  after it (a higher-level stream may follow).

Empty X86_PV_VCPU_* and HVM_PARAMS records are tolerated and ignored, as the
spec's errata ask.  The reader does not know the domain's size: PFN range and
duplicate checks belong to the restorer (:func:`.framing.check_pfns`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import BinaryIO

from .framing import (
    DOMAIN_HEADER_SIZE,
    IMAGE_HEADER_SIZE,
    REC_HEADER,
    REC_HEADER_SIZE,
    REC_LENGTH_MAX,
    REC_TYPE_OPTIONAL,
    DomainHeader,
    ImageHeader,
    RecordType,
    StreamError,
    padded_length,
    record_type_name,
)
from .records import (
    NEEDS_STATIC_DATA_END,
    RECORD_CLASSES,
    BodyError,
    CodecContext,
    HvmParamsRecord,
    Record,
    X86PvInfoRecord,
    X86PvVcpuRecord,
    misplaced,
)

# Read large bodies in slices so a lying length on an unsized stream costs
# memory only as fast as data actually arrives.
_READ_CHUNK = 1 << 20


@dataclass(frozen=True)
class SkippedRecord:
    """A record the reader passed over: an unknown optional one, or an empty data record."""

    type: int
    offset: int
    body_length: int

    @property
    def name(self) -> str:
        return record_type_name(self.type)


@dataclass(frozen=True)
class OpaqueRecord:
    """An optional record of a type this reader does not decode, kept on request."""

    type: int
    body: bytes
    offset: int

    @property
    def name(self) -> str:
        return record_type_name(self.type)


class StreamReader:
    """Validate the headers of ``fileobj`` now; ``iter(reader)`` yields records up to END.

    Unknown optional records are skipped, except those whose type is in
    ``keep``: they are returned as ``OpaqueRecord`` (hvlab's own state).
    """

    def __init__(self, fileobj: BinaryIO, keep: frozenset[int] = frozenset()) -> None:
        self._keep = keep
        self._f = fileobj
        self._pos = 0
        self._size = _remaining_size(fileobj)
        self._ended = False
        self._records_read = 0
        self._ctx = CodecContext()
        self._seen_pv_info = False
        self._seen_static_data_end = False
        self.skipped: list[SkippedRecord] = []
        self.image_header = ImageHeader.unpack(self._read_header(IMAGE_HEADER_SIZE, "image header"))
        self.domain_header = DomainHeader.unpack(
            self._read_header(DOMAIN_HEADER_SIZE, "domain header"), offset=IMAGE_HEADER_SIZE
        )

    @property
    def offset(self) -> int:
        """Octets consumed so far (where the next record header starts)."""
        return self._pos

    @property
    def ended(self) -> bool:
        return self._ended

    def __iter__(self) -> Iterator[Record]:
        while not self._ended:
            yield self.read_record()

    def read_record(self) -> Record:
        """The next record (END included); StreamError on any malformation."""
        if self._ended:
            raise StreamError("no records after END", offset=self._pos, part="stream")
        while True:
            record = self._next_record()
            if record is not None:
                self._records_read += 1
                return record

    # ------------------------------------------------------------------ internals

    def _read_into(self, n: int) -> bytearray:
        """Up to ``n`` octets (fewer only at end of file)."""
        # With a known file size the length was checked already: allocate once.
        buf = bytearray(n if self._size is not None else min(n, _READ_CHUNK))
        readinto = getattr(self._f, "readinto", None)
        got = 0
        while got < n:
            if got == len(buf):
                buf.extend(bytes(min(n - got, _READ_CHUNK)))
            # Views must be released before the buffer may grow or shrink again.
            with memoryview(buf) as whole, whole[got:] as view:
                if readinto is not None:
                    chunk = readinto(view) or 0
                else:
                    data = self._f.read(len(view))
                    chunk = len(data)
                    view[:chunk] = data
            if not chunk:
                break
            got += chunk
        del buf[got:]
        self._pos += got
        return buf

    def _read_header(self, size: int, part: str) -> bytearray:
        start = self._pos
        data = self._read_into(size)
        if len(data) < size:
            raise StreamError(
                f"truncated: {len(data)} of {size} octets present", offset=start, part=part
            )
        return data

    def _next_record(self) -> Record | None:
        start = self._pos
        header = self._read_into(REC_HEADER_SIZE)
        if not header:
            raise StreamError(
                f"missing: stream ends after {self._records_read} records without END",
                offset=start,
                record="END",
            )
        if len(header) < REC_HEADER_SIZE:
            raise StreamError(
                f"truncated: {len(header)} of {REC_HEADER_SIZE} octets present",
                offset=start,
                part="record header",
            )
        rtype, length = REC_HEADER.unpack(header)
        name = record_type_name(rtype)

        def fail(reason: str) -> StreamError:
            return StreamError(reason, offset=start, record=name)

        if length > REC_LENGTH_MAX:
            raise fail(f"body length {length} exceeds the {REC_LENGTH_MAX}-octet maximum")
        padded = padded_length(length)
        if self._size is not None and start + REC_HEADER_SIZE + length > self._size:
            raise fail(f"body length {length} runs past end of file")
        raw = self._read_into(padded)
        if len(raw) < length:
            raise fail(f"body length {length} runs past end of file")
        if len(raw) < padded:
            raise fail(f"padding of {padded - length} octets runs past end of file")
        if any(raw[length:]):
            raise fail(f"non-zero padding after a body of {length} octets")
        del raw[length:]

        record_class = RECORD_CLASSES.get(rtype)
        if record_class is None:
            if rtype & REC_TYPE_OPTIONAL and rtype in self._keep:
                return OpaqueRecord(rtype, bytes(raw), start)  # type: ignore[return-value]
            if rtype & REC_TYPE_OPTIONAL:
                self.skipped.append(SkippedRecord(rtype, start, length))
                return None
            known = rtype in (RecordType.TOOLSTACK, RecordType.CHECKPOINT_DIRTY_PFN_LIST)
            raise fail("unsupported mandatory record" if known else "unknown mandatory record type")
        self._check_placement(rtype, fail)
        try:
            record = record_class.decode_body(raw, self._ctx)
        except BodyError as err:
            raise fail(str(err)) from None

        if isinstance(record, X86PvVcpuRecord) and not record.context:
            self.skipped.append(SkippedRecord(rtype, start, length))
            return None
        if isinstance(record, HvmParamsRecord) and not record.params:
            self.skipped.append(SkippedRecord(rtype, start, length))
            return None
        if isinstance(record, X86PvInfoRecord):
            self._seen_pv_info = True
            self._ctx = CodecContext(guest_width=record.guest_width)
        elif rtype == RecordType.STATIC_DATA_END:
            self._seen_static_data_end = True
        elif rtype == RecordType.END:
            self._ended = True
        return replace(record, offset=start)

    def _check_placement(self, rtype: int, fail: Callable[[str], StreamError]) -> None:
        problem = misplaced(rtype, self.domain_header.type, self._seen_pv_info)
        if problem is not None:
            raise fail(problem)
        if rtype == RecordType.STATIC_DATA_END and self._seen_static_data_end:
            raise fail("second STATIC_DATA_END (or one after data in a version-2 stream)")
        if rtype in NEEDS_STATIC_DATA_END and not self._seen_static_data_end:
            if self.image_header.version >= 3:
                raise fail("version-3 stream has no STATIC_DATA_END before this record")
            self._seen_static_data_end = True  # v2: infer it here, as libxc does


def _remaining_size(fileobj: BinaryIO) -> int | None:
    """Octets from the current position to the end, when the file can tell us cheaply."""
    try:
        if not fileobj.seekable():
            return None
        here = fileobj.tell()
        try:
            fileno = fileobj.fileno()
        except (OSError, AttributeError, ValueError):
            end = fileobj.seek(0, os.SEEK_END)
            fileobj.seek(here)
        else:
            end = os.fstat(fileno).st_size
        return max(end - here, 0)
    except (OSError, AttributeError, ValueError):
        return None
