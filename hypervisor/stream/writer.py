"""Incremental writer for migration stream v2 images.

``StreamWriter(f, domain_type)`` writes the image and domain headers at once,
then each ``write_*`` call validates and writes one record (PAGE_DATA in
batches of at most 1024 pfns, as libxc does), so the image is never held in
memory.  Every record is checked with the same rules the reader applies;
invalid input raises :class:`StreamError` naming the record and the offset it
would have had, and writes nothing.

Version-3 streams need STATIC_DATA_END before any memory or register content:
the writer emits it by itself before the first record that is not static data
(X86_PV_INFO and the CPUID/MSR policies are), unless the caller already did.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import BinaryIO, cast

import numpy as np
import numpy.typing as npt

from .framing import (
    MAX_BATCH_SIZE,
    PAGE_SIZE,
    REC_ALIGN,
    REC_HEADER,
    REC_LENGTH_MAX,
    REC_TYPE_OPTIONAL,
    DomainHeader,
    DomainType,
    ImageHeader,
    RecordType,
    StreamError,
    padded_length,
    pfinfo_has_data,
    record_type_name,
)
from .records import (
    RECORD_CLASSES,
    STATIC_RECORDS,
    BodyError,
    Buffer,
    CheckpointRecord,
    CodecContext,
    EndRecord,
    HvmContextRecord,
    HvmParamsRecord,
    PageDataRecord,
    Record,
    SharedInfoRecord,
    StaticDataEndRecord,
    VerifyRecord,
    X86CpuidPolicyRecord,
    X86MsrPolicyRecord,
    X86PvInfoRecord,
    X86PvP2mFramesRecord,
    X86PvVcpuBasicRecord,
    X86PvVcpuExtendedRecord,
    X86PvVcpuMsrsRecord,
    X86PvVcpuXsaveRecord,
    X86TscInfoRecord,
    misplaced,
)
from .vcpu_context import VcpuGuestContext

# Version hvlab writes into the domain header unless told otherwise: the Xen
# release whose interfaces (struct layouts, record set) this package follows.
DEFAULT_XEN_VERSION = (4, 19)

_ZEROS = bytes(REC_ALIGN)


class StreamWriter:
    """Write a little-endian version-3 stream to ``fileobj`` (not closed by us)."""

    def __init__(
        self,
        fileobj: BinaryIO,
        domain_type: DomainType = DomainType.X86_PV,
        *,
        xen_major: int = DEFAULT_XEN_VERSION[0],
        xen_minor: int = DEFAULT_XEN_VERSION[1],
    ) -> None:
        self.domain_header = DomainHeader(DomainType(domain_type), xen_major, xen_minor)
        headers = ImageHeader().pack() + self.domain_header.pack()
        self._f = fileobj
        self._offset = 0
        self._ctx = CodecContext()
        self._wrote_pv_info = False
        self._static_data_ended = False
        self._ended = False
        self._write_buffers([headers])

    @property
    def offset(self) -> int:
        """Octets written so far."""
        return self._offset

    @property
    def ended(self) -> bool:
        return self._ended

    # ------------------------------------------------------------------ generic

    def write(self, record: Record) -> None:
        """Write one typed record (as yielded by the reader)."""
        rtype = int(getattr(record, "TYPE", -1))
        if RECORD_CLASSES.get(rtype) is not type(record):
            raise StreamError(f"not a record object: {type(record).__name__}", offset=self._offset)
        self._check_placement(rtype)
        try:
            body = record.encode_body(self._ctx)
        except BodyError as err:
            name = record_type_name(rtype)
            raise StreamError(str(err), offset=self._offset, record=name) from None
        self._emit(rtype, body)
        if isinstance(record, X86PvInfoRecord):
            self._wrote_pv_info = True
            self._ctx = CodecContext(guest_width=record.guest_width)

    def write_record(self, rtype: int, body: Buffer) -> None:
        """Write a raw record.  Known types are decoded first, so they must be valid.

        Unknown types must be optional (bit 31): a reader is required to refuse
        unknown mandatory records.
        """
        if not isinstance(rtype, int) or not 0 <= rtype < 1 << 32:
            raise StreamError(f"record type {rtype!r} does not fit u32", offset=self._offset)
        name = record_type_name(rtype)
        if not isinstance(body, bytes | bytearray | memoryview):
            raise StreamError("body must be bytes", offset=self._offset, record=name)
        record_class = RECORD_CLASSES.get(rtype)
        if record_class is None:
            if not rtype & REC_TYPE_OPTIONAL:
                raise StreamError(
                    "unknown mandatory record type (set bit 31 for an optional record)",
                    offset=self._offset,
                    record=name,
                )
            self._emit(rtype, [bytes(body)], auto_static_end=False)
            return
        try:
            record = record_class.decode_body(bytearray(body), self._ctx)
        except BodyError as err:
            raise StreamError(str(err), offset=self._offset, record=name) from None
        self.write(record)

    # ------------------------------------------------------------------ typed helpers

    def write_page_data(
        self,
        pfns: npt.NDArray[np.integer],
        types: npt.NDArray[np.integer],
        pages: npt.NDArray[np.uint8] | None = None,
    ) -> None:
        """Pages in PAGE_DATA records of at most 1024 pfns each.

        ``pages`` holds one 4096-octet row for each pfn whose type carries data
        (every type but XALLOC, BROKEN and XTAB), in pfn order; it may be None
        when none does.  Empty ``pfns`` writes nothing.  All batches are
        validated before the first is written.
        """
        pfns = np.asarray(pfns)
        types = np.asarray(types)
        if pages is None:
            pages = np.empty((0, PAGE_SIZE), dtype=np.uint8)
        if pfns.ndim == 1 and pfns.size == 0 and types.size == 0 and pages.size == 0:
            return
        # validate() checks dtypes and ranges; the casts only inform the type checker.
        whole = PageDataRecord(
            pfns=cast(npt.NDArray[np.uint64], pfns),
            types=cast(npt.NDArray[np.uint8], types),
            pages=np.asarray(pages),
        )
        self._check_placement(RecordType.PAGE_DATA)
        try:
            whole.validate()
        except BodyError as err:
            raise StreamError(str(err), offset=self._offset, record="PAGE_DATA") from None
        data_before = np.concatenate(([0], np.cumsum(pfinfo_has_data(whole.types))))
        for start in range(0, whole.count, MAX_BATCH_SIZE):
            stop = min(start + MAX_BATCH_SIZE, whole.count)
            batch = PageDataRecord(
                pfns=whole.pfns[start:stop],
                types=whole.types[start:stop],
                pages=whole.pages[data_before[start] : data_before[stop]],
            )
            self.write(batch)

    def write_x86_pv_info(self, guest_width: int = 8, pt_levels: int = 4) -> None:
        self.write(X86PvInfoRecord(guest_width=guest_width, pt_levels=pt_levels))

    def write_x86_pv_p2m_frames(
        self, start: int, end: int, pfns: npt.NDArray[np.integer] | Iterable[int]
    ) -> None:
        """PFNs of the p2m frames covering guest pfns ``start..end`` (inclusive)."""
        frames = pfns if isinstance(pfns, np.ndarray) else np.array(list(pfns))
        # encode_body checks the dtype and values; the cast only informs the type checker.
        self.write(X86PvP2mFramesRecord(start, end, cast(npt.NDArray[np.uint64], frames)))

    def write_x86_pv_vcpu_basic(self, vcpu_id: int, ctx: bytes | VcpuGuestContext) -> None:
        """``ctx``: a packed 5168-octet context or a :class:`VcpuGuestContext`."""
        blob = ctx.pack() if isinstance(ctx, VcpuGuestContext) else ctx
        self.write(X86PvVcpuBasicRecord(vcpu_id, blob))

    def write_x86_pv_vcpu_extended(self, vcpu_id: int, blob: bytes) -> None:
        self.write(X86PvVcpuExtendedRecord(vcpu_id, blob))

    def write_x86_pv_vcpu_xsave(self, vcpu_id: int, blob: bytes) -> None:
        self.write(X86PvVcpuXsaveRecord(vcpu_id, blob))

    def write_x86_pv_vcpu_msrs(self, vcpu_id: int, blob: bytes) -> None:
        self.write(X86PvVcpuMsrsRecord(vcpu_id, blob))

    def write_shared_info(self, page: bytes | npt.NDArray[np.uint8]) -> None:
        data = page.tobytes() if isinstance(page, np.ndarray) else page
        self.write(SharedInfoRecord(data))

    def write_x86_tsc_info(
        self, mode: int = 0, khz: int = 0, nsec: int = 0, incarnation: int = 0
    ) -> None:
        self.write(X86TscInfoRecord(mode=mode, khz=khz, nsec=nsec, incarnation=incarnation))

    def write_hvm_context(self, blob: bytes) -> None:
        self.write(HvmContextRecord(blob))

    def write_hvm_params(self, pairs: Iterable[tuple[int, int]]) -> None:
        """(index, value) pairs; none at all writes nothing (readers ignore empty ones)."""
        params = tuple(tuple(p) for p in pairs)
        if params:
            self.write(HvmParamsRecord(params))  # type: ignore[arg-type]

    def write_x86_cpuid_policy(self, data: bytes) -> None:
        self.write(X86CpuidPolicyRecord(data))

    def write_x86_msr_policy(self, data: bytes) -> None:
        self.write(X86MsrPolicyRecord(data))

    def write_static_data_end(self) -> None:
        self.write(StaticDataEndRecord())

    def write_verify(self) -> None:
        self.write(VerifyRecord())

    def write_checkpoint(self) -> None:
        self.write(CheckpointRecord())

    def write_end(self) -> None:
        self.write(EndRecord())

    # ------------------------------------------------------------------ internals

    def _check_placement(self, rtype: int) -> None:
        def fail(reason: str) -> StreamError:
            return StreamError(reason, offset=self._offset, record=record_type_name(rtype))

        if self._ended:
            raise fail("the stream already ended with END")
        problem = misplaced(rtype, self.domain_header.type, self._wrote_pv_info)
        if problem is not None:
            raise fail(problem)
        if rtype in STATIC_RECORDS and self._static_data_ended:
            raise fail("static data record after STATIC_DATA_END")
        if rtype == RecordType.STATIC_DATA_END and self._static_data_ended:
            raise fail("STATIC_DATA_END was already written")

    def _emit(self, rtype: int, body: list[Buffer], *, auto_static_end: bool = True) -> None:
        length = sum(memoryview(part).nbytes for part in body)
        if length > REC_LENGTH_MAX:
            raise StreamError(
                f"body length {length} exceeds the {REC_LENGTH_MAX}-octet maximum",
                offset=self._offset,
                record=record_type_name(rtype),
            )
        if (
            auto_static_end
            and not self._static_data_ended
            and rtype not in STATIC_RECORDS
            and rtype != RecordType.STATIC_DATA_END
        ):
            self._static_data_ended = True
            self._write_buffers([REC_HEADER.pack(RecordType.STATIC_DATA_END, 0)])
        if rtype == RecordType.STATIC_DATA_END:
            self._static_data_ended = True
        pad = padded_length(length) - length
        self._write_buffers([REC_HEADER.pack(rtype, length), *body, _ZEROS[:pad]])
        if rtype == RecordType.END:
            self._ended = True

    def _write_buffers(self, parts: list[Buffer]) -> None:
        for part in parts:
            size = memoryview(part).nbytes
            if size:
                self._f.write(part)
                self._offset += size
