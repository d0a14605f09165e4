"""Migration stream v2: framing golden bytes, reader/writer round trips, malformed input, fuzz.

Golden bytes are written out by hand from docs/specs/libxc-migration-stream.pandoc
(revision 3): the image header is big-endian, everything after it little-endian.
"""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hypervisor.stream import (
    DomainType,
    EndRecord,
    HvmContextRecord,
    HvmParamsRecord,
    PageDataRecord,
    Pfinfo,
    SharedInfoRecord,
    StaticDataEndRecord,
    StreamError,
    StreamReader,
    StreamWriter,
    VcpuGuestContext,
    X86CpuidPolicyRecord,
    X86MsrPolicyRecord,
    X86PvInfoRecord,
    X86PvP2mFramesRecord,
    X86PvVcpuBasicRecord,
    X86PvVcpuExtendedRecord,
    X86PvVcpuMsrsRecord,
    X86PvVcpuXsaveRecord,
    X86TscInfoRecord,
    check_pfns,
    open_image_for_read,
    open_image_for_write,
)
from hypervisor.stream.framing import DomainHeader, ImageHeader

IMAGE_HEADER_V3 = bytes.fromhex(
    "ffffffffffffffff"  # marker
    "58454e46"  # id "XENF", big-endian
    "00000003"  # version 3, big-endian
    "0000"  # options: bit 0 clear = little-endian
    "000000000000"  # reserved
)
DOMAIN_HEADER_PV_4_19 = bytes.fromhex(
    "01000000"  # type 1 = x86 PV
    "0c00"  # page_shift 12
    "0000"  # reserved
    "04000000"  # xen_major 4
    "13000000"  # xen_minor 19
)
PV_INFO_REC = bytes.fromhex("02000000 08000000 0804 000000000000")
STATIC_DATA_END_REC = bytes.fromhex("10000000 00000000")
END_REC = bytes.fromhex("00000000 00000000")
PAGE = bytes([0xAB]) * 4096
# PAGE_DATA: pfn 5 NOTAB with one page, pfn 0x123456789 XTAB (no data).
PAGE_DATA_REC = (
    bytes.fromhex("01000000 18100000")  # type 1, body 8 + 2*8 + 4096 = 0x1018
    + bytes.fromhex("02000000 00000000")  # count 2, reserved
    + bytes.fromhex("0500000000000000")  # pfn[0] = 5, type NOTAB
    + bytes.fromhex("89674523010000f0")  # pfn[1] = 0x123456789 | XTAB << 60
    + PAGE
)

HEADERS = IMAGE_HEADER_V3 + DOMAIN_HEADER_PV_4_19
OFF_PV_INFO = 40
OFF_STATIC_END = 56
OFF_PAGE_DATA = 64
OFF_END = 64 + 8 + 0x1018  # 4192

BASE_STREAM = HEADERS + PV_INFO_REC + STATIC_DATA_END_REC + PAGE_DATA_REC + END_REC


def read_all(data: bytes) -> list[object]:
    return list(StreamReader(io.BytesIO(data)))


def patched(data: bytes, offset: int, new: bytes) -> bytes:
    return data[:offset] + new + data[offset + len(new) :]


class NonSeekable(io.RawIOBase):
    """A pipe-like reader that records how much was asked for in each read."""

    def __init__(self, data: bytes) -> None:
        self._inner = io.BytesIO(data)
        self.max_request = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def, override]
        self.max_request = max(self.max_request, len(buffer))
        return self._inner.readinto(buffer)

    @property
    def position(self) -> int:
        return self._inner.tell()


# ---------------------------------------------------------------- golden framing


def test_headers_match_hand_computed_bytes() -> None:
    assert ImageHeader().pack() == IMAGE_HEADER_V3
    assert DomainHeader(DomainType.X86_PV, 4, 19).pack() == DOMAIN_HEADER_PV_4_19
    assert len(IMAGE_HEADER_V3) == 24 and len(DOMAIN_HEADER_PV_4_19) == 16


def test_writer_produces_hand_computed_stream() -> None:
    f = io.BytesIO()
    w = StreamWriter(f)
    w.write_x86_pv_info(guest_width=8, pt_levels=4)
    w.write_page_data(
        np.array([5, 0x123456789], dtype=np.uint64),
        np.array([Pfinfo.NOTAB, Pfinfo.XTAB], dtype=np.uint8),
        np.frombuffer(PAGE, dtype=np.uint8).reshape(1, 4096),
    )
    w.write_end()
    # STATIC_DATA_END is inserted before the first non-static record (v3 requires it).
    assert f.getvalue() == BASE_STREAM
    assert w.offset == len(BASE_STREAM)


def test_padding_and_small_records_golden() -> None:
    f = io.BytesIO()
    w = StreamWriter(f, DomainType.X86_HVM, xen_major=4, xen_minor=19)
    w.write_record(0x8000_0001, b"\xab\xcd\xef")  # optional, 3-octet body, 5 octets padding
    w.write_x86_tsc_info(mode=1, khz=2_000_000, nsec=0x0102030405060708, incarnation=7)
    w.write_hvm_params([(2, 0xFEEDFACE)])
    w.write_hvm_context(b"hello")
    w.write_end()
    expected = (
        IMAGE_HEADER_V3
        + bytes.fromhex("02000000 0c00 0000 04000000 13000000")  # x86 HVM
        + bytes.fromhex("01000080 03000000 abcdef 0000000000")  # optional: no auto-insert
        + STATIC_DATA_END_REC
        + bytes.fromhex("08000000 18000000 01000000 80841e00")  # TSC: mode 1, 2000000 kHz
        + bytes.fromhex("0807060504030201 07000000 00000000")  # nsec, incarnation, reserved
        + bytes.fromhex("0a000000 18000000 01000000 00000000")  # HVM_PARAMS count 1
        + bytes.fromhex("0200000000000000 cefaedfe00000000")  # index 2, value
        + bytes.fromhex("09000000 05000000") + b"hello" + bytes(3)  # HVM_CONTEXT + padding
        + END_REC
    )  # fmt: skip
    assert f.getvalue() == expected
    reader = StreamReader(io.BytesIO(expected))
    records = list(reader)
    assert [type(r) for r in records] == [
        StaticDataEndRecord, X86TscInfoRecord, HvmParamsRecord, HvmContextRecord, EndRecord,
    ]  # fmt: skip
    assert records[1] == X86TscInfoRecord(1, 2_000_000, 0x0102030405060708, 7)
    assert records[2] == HvmParamsRecord(((2, 0xFEEDFACE),))
    assert records[3] == HvmContextRecord(b"hello")
    assert [(s.name, s.offset, s.body_length) for s in reader.skipped] == [
        ("OPTIONAL_0x80000001", 40, 3)
    ]


def test_reader_decodes_hand_computed_stream() -> None:
    reader = StreamReader(io.BytesIO(BASE_STREAM))
    assert reader.image_header == ImageHeader(version=3, options=0)
    assert reader.domain_header == DomainHeader(DomainType.X86_PV, 4, 19)
    info, static_end, pages, end = list(reader)
    assert info == X86PvInfoRecord(8, 4) and info.offset == OFF_PV_INFO
    assert isinstance(static_end, StaticDataEndRecord) and static_end.offset == OFF_STATIC_END
    assert isinstance(pages, PageDataRecord) and pages.offset == OFF_PAGE_DATA
    assert pages.pfns.tolist() == [5, 0x123456789]
    assert pages.types.tolist() == [Pfinfo.NOTAB, Pfinfo.XTAB]
    assert pages.pages.shape == (1, 4096) and pages.pages.tobytes() == PAGE
    assert pages.data_pfns.tolist() == [5]
    assert isinstance(end, EndRecord) and end.offset == OFF_END
    assert reader.ended and reader.offset == len(BASE_STREAM)


def test_version_2_stream_is_read_and_static_data_end_inferred() -> None:
    v2 = patched(BASE_STREAM, 12, bytes.fromhex("00000002"))
    v2_without_static_end = v2[:OFF_STATIC_END] + v2[OFF_PAGE_DATA:]
    records = read_all(v2_without_static_end)
    assert [type(r) for r in records] == [X86PvInfoRecord, PageDataRecord, EndRecord]


def test_reader_stops_at_end_and_leaves_the_rest() -> None:
    f = io.BytesIO(BASE_STREAM + b"libxl stream continues here")
    reader = StreamReader(f)
    assert len(list(reader)) == 4
    assert f.read() == b"libxl stream continues here"
    with pytest.raises(StreamError, match="no records after END"):
        reader.read_record()


# ---------------------------------------------------------------- malformed input


def expect_error(data: bytes, *, offset: int, record: str | None, part: str, text: str) -> None:
    with pytest.raises(StreamError) as info:
        read_all(data)
    err = info.value
    assert (err.offset, err.record, err.part) == (offset, record, part), str(err)
    assert text in err.reason, str(err)
    # One readable line, with the hex offset, for the CLI.
    assert "\n" not in str(err) and f"offset {offset:#x}" in str(err)


@pytest.mark.parametrize(
    ("cut", "offset", "record", "part", "text"),
    [
        (0, 0, None, "image header", "truncated: 0 of 24"),
        (10, 0, None, "image header", "truncated: 10 of 24"),
        (30, 24, None, "domain header", "truncated: 6 of 16"),
        (43, 40, None, "record header", "truncated: 3 of 8"),
        (80, 64, "PAGE_DATA", "record", "body length 4120 runs past end of file"),
        (OFF_END, OFF_END, "END", "record", "missing"),
        (OFF_END + 4, OFF_END, None, "record header", "truncated: 4 of 8"),
    ],
)
def test_truncated_file(cut: int, offset: int, record: str | None, part: str, text: str) -> None:
    expect_error(BASE_STREAM[:cut], offset=offset, record=record, part=part, text=text)


def test_truncated_file_without_known_size_reports_the_same() -> None:
    with pytest.raises(StreamError) as info:
        list(StreamReader(NonSeekable(BASE_STREAM[:80])))  # type: ignore[arg-type]
    assert (info.value.offset, info.value.record) == (64, "PAGE_DATA")
    assert "body length 4120 runs past end of file" in info.value.reason


def test_cli_style_message() -> None:
    with pytest.raises(StreamError) as info:
        read_all(BASE_STREAM[:80])
    assert str(info.value) == (
        "record PAGE_DATA at offset 0x40: body length 4120 runs past end of file"
    )


@pytest.mark.parametrize(
    ("offset", "new", "text"),
    [
        (3, b"\x00", "bad marker"),
        (8, b"XENG", "bad id"),
        (12, bytes.fromhex("00000004"), "unsupported version 4"),
        (12, bytes.fromhex("00000001"), "unsupported version 1"),
        (16, bytes.fromhex("0001"), "big-endian streams are not supported"),
        (16, bytes.fromhex("0002"), "reserved option bits"),
    ],
)
def test_bad_image_header(offset: int, new: bytes, text: str) -> None:
    expect_error(patched(BASE_STREAM, offset, new), offset=0, record=None, part="image header",
                 text=text)  # fmt: skip


@pytest.mark.parametrize(
    ("offset", "new", "text"),
    [
        (24, bytes.fromhex("03000000"), "unsupported domain type 0x3"),
        (28, b"\x0d", "page_shift 13"),
    ],
)
def test_bad_domain_header(offset: int, new: bytes, text: str) -> None:
    expect_error(patched(BASE_STREAM, offset, new), offset=24, record=None, part="domain header",
                 text=text)  # fmt: skip


def test_body_length_past_end_of_file() -> None:
    bad = patched(BASE_STREAM, OFF_PAGE_DATA + 4, struct.pack("<I", 0x10000))
    expect_error(bad, offset=OFF_PAGE_DATA, record="PAGE_DATA", part="record",
                 text="body length 65536 runs past end of file")  # fmt: skip


def test_body_length_above_libxc_maximum() -> None:
    bad = patched(BASE_STREAM, OFF_PAGE_DATA + 4, struct.pack("<I", 0xFFFF_FFF0))
    expect_error(bad, offset=OFF_PAGE_DATA, record="PAGE_DATA", part="record",
                 text="exceeds the 134217728-octet maximum")  # fmt: skip


def test_non_zero_padding() -> None:
    f = io.BytesIO()
    w = StreamWriter(f, DomainType.X86_HVM)
    w.write_hvm_context(b"hello")  # 5 octets + 3 padding, after auto STATIC_DATA_END at 40
    w.write_end()
    good = f.getvalue()
    assert read_all(good)[1] == HvmContextRecord(b"hello")
    bad = patched(good, 48 + 8 + 6, b"\x01")
    expect_error(bad, offset=48, record="HVM_CONTEXT", part="record", text="non-zero padding")


def test_padding_past_end_of_file() -> None:
    f = io.BytesIO()
    w = StreamWriter(f, DomainType.X86_HVM)
    w.write_hvm_context(b"hello")
    expect_error(f.getvalue()[: 48 + 8 + 6], offset=48, record="HVM_CONTEXT", part="record",
                 text="padding of 3 octets runs past end of file")  # fmt: skip


@pytest.mark.parametrize(
    ("count", "text"),
    [
        (1, "body length 4120 does not match count 1: expected 4112"),
        (3, "pfn[2] 0xabababababababab has reserved bits 59-52 set"),
        (1000, "body length 4120 too short for count 1000 pfns"),
        (0, "count is 0"),
    ],
)
def test_page_data_count_not_matching_length(count: int, text: str) -> None:
    bad = patched(BASE_STREAM, OFF_PAGE_DATA + 8, struct.pack("<I", count))
    expect_error(bad, offset=OFF_PAGE_DATA, record="PAGE_DATA", part="record", text=text)


def test_page_data_count_claiming_more_data_pages() -> None:
    # pfn[1] turned from XTAB into NOTAB: now two pages are owed but one is present.
    bad = patched(BASE_STREAM, OFF_PAGE_DATA + 8 + 8 + 8 + 7, b"\x00")
    expect_error(bad, offset=OFF_PAGE_DATA, record="PAGE_DATA", part="record",
                 text="expected 8216 (2 pfns, 2 pages of data)")  # fmt: skip


def test_pfn_with_reserved_bits() -> None:
    bad = patched(BASE_STREAM, OFF_PAGE_DATA + 16 + 6, b"\x10")  # bit 52 of pfn[0]
    expect_error(bad, offset=OFF_PAGE_DATA, record="PAGE_DATA", part="record",
                 text="pfn[0] 0x0010000000000005 has reserved bits 59-52 set")  # fmt: skip


@pytest.mark.parametrize("ptype", [5, 6, 7, 8])
def test_unknown_pfinfo_type(ptype: int) -> None:
    bad = patched(BASE_STREAM, OFF_PAGE_DATA + 16 + 7, bytes([ptype << 4]))
    expect_error(bad, offset=OFF_PAGE_DATA, record="PAGE_DATA", part="record",
                 text=f"pfn[0] has unknown PFINFO type {ptype:#x}")  # fmt: skip


@pytest.mark.parametrize(
    ("rtype", "name", "text"),
    [
        (0x13, "UNKNOWN_0x00000013", "unknown mandatory record type"),
        (0x7FFF_FFFF, "UNKNOWN_0x7fffffff", "unknown mandatory record type"),
        (0x0B, "TOOLSTACK", "unsupported mandatory record"),
        (0x0F, "CHECKPOINT_DIRTY_PFN_LIST", "unsupported mandatory record"),
    ],
)
def test_unknown_mandatory_record(rtype: int, name: str, text: str) -> None:
    bad = patched(BASE_STREAM, OFF_PAGE_DATA, struct.pack("<I", rtype))
    expect_error(bad, offset=OFF_PAGE_DATA, record=name, part="record", text=text)


def test_unknown_optional_record_is_skipped() -> None:
    stream = patched(BASE_STREAM, OFF_PAGE_DATA, struct.pack("<I", 0x8000_0013))
    reader = StreamReader(io.BytesIO(stream))
    assert [type(r) for r in reader] == [X86PvInfoRecord, StaticDataEndRecord, EndRecord]
    assert [(s.type, s.offset, s.body_length) for s in reader.skipped] == [
        (0x8000_0013, OFF_PAGE_DATA, 0x1018)
    ]


def test_missing_end() -> None:
    expect_error(BASE_STREAM[:OFF_END], offset=OFF_END, record="END", part="record",
                 text="stream ends after 3 records without END")  # fmt: skip


def test_v3_stream_without_static_data_end() -> None:
    bad = BASE_STREAM[:OFF_STATIC_END] + BASE_STREAM[OFF_PAGE_DATA:]
    expect_error(bad, offset=OFF_STATIC_END, record="PAGE_DATA", part="record",
                 text="no STATIC_DATA_END")  # fmt: skip


def test_record_of_the_wrong_domain_type() -> None:
    hvm = patched(BASE_STREAM, 24, struct.pack("<I", DomainType.X86_HVM))
    expect_error(hvm, offset=OFF_PV_INFO, record="X86_PV_INFO", part="record",
                 text="not valid in an x86 HVM stream")  # fmt: skip


def test_p2m_frames_before_pv_info() -> None:
    p2m = bytes.fromhex("03000000 10000000 00000000 ff010000 0700000000000000")
    bad = HEADERS + STATIC_DATA_END_REC + p2m + END_REC
    expect_error(bad, offset=48, record="X86_PV_P2M_FRAMES", part="record",
                 text="X86_PV_INFO must come first")  # fmt: skip


@pytest.mark.parametrize(
    ("body", "text"),
    [
        (bytes.fromhex("0804000000000001"), ""),  # reserved octets are ignored (spec)
        (bytes.fromhex("0803000000000000"), "only 8/4 and 4/3"),
        (bytes.fromhex("08040000000000"), "body length 7, expected 8"),
    ],
)
def test_pv_info_body_rules(body: bytes, text: str) -> None:
    rec = struct.pack("<II", 2, len(body)) + body + bytes(-len(body) % 8)
    stream = HEADERS + rec + END_REC
    if not text:
        assert read_all(stream)[0] == X86PvInfoRecord(8, 4)
        return
    expect_error(stream, offset=40, record="X86_PV_INFO", part="record", text=text)


@pytest.mark.parametrize(
    ("rtype", "body", "text"),
    [
        (0x04, struct.pack("<II", 0, 0) + bytes(100), "an x86_64 vcpu_guest_context is 5168"),
        (0x05, struct.pack("<II", 0, 0) + bytes(136), "max 128"),
        (0x06, struct.pack("<II", 0, 0) + bytes(8), "min 16"),
        (0x0C, struct.pack("<II", 0, 0) + bytes(20), "not a multiple of 16"),
        (0x04, bytes(4), "too short for the 8-octet vcpu header"),
        (0x07, bytes(4095), "expected 4096"),
        (0x08, bytes(16), "expected 24"),
        (0x0D, bytes(8), "expected 0"),
        (0x00, bytes(8), "expected 0"),
        (0x11, bytes(25), "not a multiple of 24"),
        (0x12, bytes(17), "not a multiple of 16"),
    ],
)
def test_record_size_rules(rtype: int, body: bytes, text: str) -> None:
    rec = struct.pack("<II", rtype, len(body)) + body + bytes(-len(body) % 8)
    stream = HEADERS + PV_INFO_REC + STATIC_DATA_END_REC + rec + END_REC
    name = {0: "END", 4: "X86_PV_VCPU_BASIC", 5: "X86_PV_VCPU_EXTENDED", 6: "X86_PV_VCPU_XSAVE",
            7: "SHARED_INFO", 8: "X86_TSC_INFO", 0xC: "X86_PV_VCPU_MSRS", 0xD: "VERIFY",
            0x11: "X86_CPUID_POLICY", 0x12: "X86_MSR_POLICY"}[rtype]  # fmt: skip
    expect_error(stream, offset=64, record=name, part="record", text=text)


def test_empty_vcpu_and_hvm_params_records_are_ignored() -> None:
    empty_vcpu = struct.pack("<IIII", 0x05, 8, 3, 0)
    stream = HEADERS + PV_INFO_REC + STATIC_DATA_END_REC + empty_vcpu + END_REC
    reader = StreamReader(io.BytesIO(stream))
    assert [type(r) for r in reader] == [X86PvInfoRecord, StaticDataEndRecord, EndRecord]
    assert [s.name for s in reader.skipped] == ["X86_PV_VCPU_EXTENDED"]


# ---------------------------------------------------------------- writer validation


def test_writer_rejects_bad_input_and_writes_nothing() -> None:
    f = io.BytesIO()
    w = StreamWriter(f)
    w.write_x86_pv_info()
    before = f.getvalue()
    page = np.zeros((1, 4096), np.uint8)
    cases = [
        (lambda: w.write_page_data(np.array([1 << 52]), np.array([0]), page), "52 bits"),
        (lambda: w.write_page_data(np.array([1]), np.array([5]), page), "unknown PFINFO type 0x5"),
        (lambda: w.write_page_data(np.array([1, 2]), np.array([0, 0]), page), "shape (2, 4096)"),
        (lambda: w.write_page_data(np.array([1]), np.array([0, 0]), page), "types must be"),
        (lambda: w.write_x86_pv_p2m_frames(0, 1023, [1]), "must be 2 integers"),
        (lambda: w.write_x86_pv_p2m_frames(5, 4, [1]), "above end_pfn"),
        (lambda: w.write_x86_pv_vcpu_basic(0, b"short"), "5168"),
        (lambda: w.write_x86_pv_vcpu_basic(1 << 32, VcpuGuestContext()), "vcpu_id"),
        (lambda: w.write_shared_info(b"x"), "exactly 4096"),
        (lambda: w.write_x86_tsc_info(khz=-1), "khz"),
        (lambda: w.write_hvm_context(b"x"), "not valid in an x86 PV stream"),
        (lambda: w.write_x86_pv_info(), "already written"),
        (lambda: w.write_record(0x13, b""), "unknown mandatory record type"),
        (lambda: w.write_record(0x8000_0001, 5), "body must be bytes"),  # type: ignore[arg-type]
        (lambda: w.write_record(0x02, b"\x08\x03" + bytes(6)), "only 8/4 and 4/3"),
        (lambda: w.write_x86_cpuid_policy(bytes(23)), "multiple of 24"),
    ]
    for call, text in cases:
        with pytest.raises(StreamError) as info:
            call()
        assert text in str(info.value)
        assert info.value.offset == len(before)
        assert f.getvalue() == before, text  # nothing written, state unchanged
    w.write_end()
    with pytest.raises(StreamError, match="already ended"):
        w.write_end()


def test_writer_rejects_pv_records_in_hvm_stream_and_static_records_late() -> None:
    w = StreamWriter(io.BytesIO(), DomainType.X86_HVM)
    with pytest.raises(StreamError, match="not valid in an x86 HVM stream"):
        w.write_shared_info(bytes(4096))
    w.write_x86_tsc_info()
    with pytest.raises(StreamError, match="static data record after STATIC_DATA_END"):
        w.write_x86_msr_policy(bytes(16))


def test_writer_batches_page_data_like_libxc() -> None:
    n = 2500
    pfns = np.arange(1000, 1000 + n, dtype=np.uint64)
    types = np.where(pfns % 3 == 0, Pfinfo.XALLOC, Pfinfo.NOTAB).astype(np.uint8)
    types[7] = Pfinfo.L4TAB_PIN
    has_data = types != Pfinfo.XALLOC
    pages = np.repeat((pfns[has_data] % 251).astype(np.uint8)[:, None], 4096, axis=1)
    f = io.BytesIO()
    w = StreamWriter(f)
    w.write_page_data(pfns, types, pages)
    w.write_end()
    f.seek(0)
    batches = [r for r in StreamReader(f) if isinstance(r, PageDataRecord)]
    assert [b.count for b in batches] == [1024, 1024, 452]
    assert np.array_equal(np.concatenate([b.pfns for b in batches]), pfns)
    assert np.array_equal(np.concatenate([b.types for b in batches]), types)
    for b in batches:
        assert np.array_equal(b.pages[:, 0], (b.data_pfns % 251).astype(np.uint8))


def test_writer_writes_nothing_for_empty_batches() -> None:
    f = io.BytesIO()
    w = StreamWriter(f)
    w.write_page_data(np.array([], np.uint64), np.array([], np.uint8))
    w.write_hvm_params([])
    assert f.getvalue() == HEADERS


# ---------------------------------------------------------------- round trips

rng_seeds = st.integers(min_value=0, max_value=2**32 - 1)


@st.composite
def page_batches(draw: st.DrawFn) -> PageDataRecord:
    n = draw(st.integers(1, 6))
    pfns = draw(st.lists(st.integers(0, (1 << 52) - 1), min_size=n, max_size=n))
    types = draw(st.lists(st.sampled_from(list(Pfinfo)), min_size=n, max_size=n))
    types_arr = np.array(types, dtype=np.uint8)
    n_data = int(np.count_nonzero(~np.isin(types_arr, [0xD, 0xE, 0xF])))
    rng = np.random.default_rng(draw(rng_seeds))
    pages = rng.integers(0, 256, size=(n_data, 4096), dtype=np.uint8)
    return PageDataRecord(np.array(pfns, dtype=np.uint64), types_arr, pages)


def blobs(min_size: int = 0, max_size: int = 64, multiple: int = 1) -> st.SearchStrategy[bytes]:
    return st.integers(min_size // multiple, max_size // multiple).flatmap(
        lambda k: st.binary(min_size=k * multiple, max_size=k * multiple)
    )


u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)


@st.composite
def p2m_records(draw: st.DrawFn) -> X86PvP2mFramesRecord:
    start = draw(st.integers(0, 5000))
    end = draw(st.integers(start, start + 3000))
    frames = end // 512 - start // 512 + 1
    pfns = draw(st.lists(u64, min_size=frames, max_size=frames))
    return X86PvP2mFramesRecord(start, end, np.array(pfns, dtype=np.uint64))


pv_dynamic_records = st.one_of(
    page_batches(),
    p2m_records(),
    st.builds(X86PvVcpuBasicRecord, u32, blobs(5168, 5168)),
    st.builds(X86PvVcpuExtendedRecord, u32, blobs(1, 128)),
    st.builds(X86PvVcpuXsaveRecord, u32, blobs(16, 80)),
    st.builds(X86PvVcpuMsrsRecord, u32, blobs(16, 64, multiple=16)),
    st.builds(SharedInfoRecord, blobs(4096, 4096)),
    st.builds(X86TscInfoRecord, u32, u32, u64, u32),
)
hvm_dynamic_records = st.one_of(
    page_batches(),
    st.builds(X86TscInfoRecord, u32, u32, u64, u32),
    st.builds(HvmContextRecord, blobs(1, 40)),
    st.builds(HvmParamsRecord, st.lists(st.tuples(u64, u64), min_size=1, max_size=4).map(tuple)),
)
static_records = st.lists(
    st.one_of(
        st.builds(X86CpuidPolicyRecord, blobs(24, 96, multiple=24)),
        st.builds(X86MsrPolicyRecord, blobs(16, 64, multiple=16)),
    ),
    max_size=2,
)


@st.composite
def streams(draw: st.DrawFn) -> tuple[DomainType, list[object]]:
    domain = draw(st.sampled_from([DomainType.X86_PV, DomainType.X86_HVM]))
    records: list[object] = []
    if domain == DomainType.X86_PV:
        records.append(X86PvInfoRecord(8, 4))
    records += draw(static_records)
    dynamic = pv_dynamic_records if domain == DomainType.X86_PV else hvm_dynamic_records
    records += draw(st.lists(dynamic, max_size=6))
    return domain, records


def write_stream(domain: DomainType, records: list[object]) -> bytes:
    f = io.BytesIO()
    w = StreamWriter(f, domain)
    for rec in records:
        w.write(rec)  # type: ignore[arg-type]
    w.write_end()
    return f.getvalue()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams())
def test_round_trip_records(stream: tuple[DomainType, list[object]]) -> None:
    domain, records = stream
    data = write_stream(domain, records)
    reader = StreamReader(io.BytesIO(data))
    assert reader.domain_header.type == domain
    got = list(reader)
    # Exactly one STATIC_DATA_END, after the static records, before anything else.
    n_static = sum(isinstance(r, X86PvInfoRecord | X86CpuidPolicyRecord | X86MsrPolicyRecord)
                   for r in records)  # fmt: skip
    assert isinstance(got[n_static], StaticDataEndRecord)
    assert sum(isinstance(r, StaticDataEndRecord) for r in got) == 1
    assert got[:n_static] + got[n_static + 1 : -1] == records
    assert isinstance(got[-1], EndRecord)
    # Byte-exact: what was read writes back to the very same stream.
    again = io.BytesIO()
    w = StreamWriter(again, domain)
    for rec in got:
        w.write(rec)
    assert again.getvalue() == data
    # Offsets point at the record headers.
    for rec in got:
        assert struct.unpack_from("<I", data, rec.offset)[0] == rec.TYPE


# ---------------------------------------------------------------- fuzz


def fuzz_base_stream() -> bytes:
    f = io.BytesIO()
    w = StreamWriter(f)
    w.write_x86_pv_info()
    w.write_x86_cpuid_policy(bytes(range(24)))
    w.write_x86_pv_p2m_frames(0, 600, [11, 12])
    w.write_page_data(
        np.array([1, 2, 3, 4], np.uint64),
        np.array([Pfinfo.L4TAB_PIN, Pfinfo.XTAB, Pfinfo.L1TAB, Pfinfo.XALLOC], np.uint8),
        np.arange(2 * 4096, dtype=np.uint64).astype(np.uint8).reshape(2, 4096),
    )
    w.write_record(0x8000_0042, b"optional!")
    w.write_x86_pv_vcpu_basic(0, VcpuGuestContext(flags=5))
    w.write_x86_pv_vcpu_msrs(0, bytes(32))
    w.write_shared_info(bytes(4096))
    w.write_x86_tsc_info(1, 2, 3, 4)
    w.write_end()
    return f.getvalue()


FUZZ_BASE = fuzz_base_stream()


def record_starts(data: bytes) -> list[int]:
    starts, pos = [], 40
    while pos + 8 <= len(data):
        starts.append(pos)
        rtype, length = struct.unpack_from("<II", data, pos)
        if rtype == 0:
            break
        pos += 8 + (length + 7) // 8 * 8
    return starts


FUZZ_HOT_SPOTS = sorted({0, 8, 12, 16, 24, 28} | {s + d for s in record_starts(FUZZ_BASE)
                                                 for d in range(0, 24)})  # fmt: skip

positions = st.one_of(st.integers(0, len(FUZZ_BASE)), st.sampled_from(FUZZ_HOT_SPOTS))
mutations = st.lists(
    st.one_of(
        st.tuples(st.just("flip"), positions, st.integers(1, 255)),
        st.tuples(st.just("truncate"), positions, st.just(0)),
        st.tuples(st.just("insert"), positions, st.binary(min_size=1, max_size=9)),
        st.tuples(st.just("delete"), positions, st.integers(1, 9)),
    ),
    min_size=1,
    max_size=4,
)


def mutate(data: bytes, ops: list[tuple[str, int, object]]) -> bytes:
    buf = bytearray(data)
    for op, pos, arg in ops:
        pos = min(pos, len(buf))
        if op == "flip" and pos < len(buf):
            buf[pos] ^= arg  # type: ignore[operator]
        elif op == "truncate":
            del buf[pos:]
        elif op == "insert":
            buf[pos:pos] = arg  # type: ignore[call-overload]
        elif op == "delete":
            del buf[pos : pos + arg]  # type: ignore[operator]
    return bytes(buf)


@settings(max_examples=1500, deadline=None)
@given(mutations)
def test_fuzz_mutated_streams_raise_only_stream_error(ops: list[tuple[str, int, object]]) -> None:
    data = mutate(FUZZ_BASE, ops)
    for source in (io.BytesIO(data), NonSeekable(data)):
        try:
            for rec in StreamReader(source):  # type: ignore[arg-type]
                if isinstance(rec, X86PvVcpuBasicRecord):
                    rec.guest_context()
        except StreamError as err:
            assert err.offset is None or 0 <= err.offset <= len(data)


# ---------------------------------------------------------------- streaming


def test_reader_holds_at_most_one_record() -> None:
    n_records = 300
    f = io.BytesIO()
    w = StreamWriter(f)
    w.write_x86_pv_info()
    for i in range(n_records):
        k = 1 + i % 3
        w.write_page_data(
            np.arange(i * 4, i * 4 + k, dtype=np.uint64),
            np.zeros(k, np.uint8),
            np.full((k, 4096), i % 256, np.uint8),
        )
    w.write_end()
    data = f.getvalue()
    largest_record = 8 + 8 + 3 * 8 + 3 * 4096

    source = NonSeekable(data)
    reader = StreamReader(source)  # type: ignore[arg-type]
    seen = 0
    for rec in reader:
        # No read-ahead: the source is exactly at the end of the record just yielded.
        assert source.position == reader.offset
        if isinstance(rec, PageDataRecord):
            assert rec.offset + 8 + (8 + 8 * rec.count + 4096 * rec.count) == source.position
            assert int(rec.pages[0, 0]) == seen % 256
            seen += 1
    assert seen == n_records
    # No single read asked for more than one record's worth of data.
    assert source.max_request <= largest_record


# ---------------------------------------------------------------- pfn checks


def test_check_pfns() -> None:
    seen = np.zeros(16, dtype=bool)
    check_pfns(np.array([1, 2, 3], np.uint64), 16, seen)
    assert seen.nonzero()[0].tolist() == [1, 2, 3]
    cases = [
        (np.array([4, 16], np.uint64), "pfn[1] 0x10 beyond the domain's 0x10 pages"),
        (np.array([5, 2], np.uint64), "pfn[1] 0x2 already seen"),
        (np.array([6, 7, 6], np.uint64), "pfn[2] 0x6 duplicates pfn[0]"),
    ]
    for pfns, text in cases:
        with pytest.raises(StreamError) as info:
            check_pfns(pfns, 16, seen, offset=0x40)
        assert info.value.record == "PAGE_DATA" and info.value.offset == 0x40
        assert text in info.value.reason
        assert seen.nonzero()[0].tolist() == [1, 2, 3]  # unchanged on failure


# ---------------------------------------------------------------- files and zstd


def test_plain_and_zstd_files_round_trip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    zstandard = pytest.importorskip("zstandard")
    for name in ("image.bin", "image.bin.zst"):
        path = tmp_path / name
        with open_image_for_write(path) as f:
            w = StreamWriter(f)
            w.write_x86_pv_info()
            w.write_page_data(
                np.array([5, 0x123456789], np.uint64),
                np.array([Pfinfo.NOTAB, Pfinfo.XTAB], np.uint8),
                np.frombuffer(PAGE, np.uint8).reshape(1, 4096),
            )
            w.write_end()
        raw = path.read_bytes()
        if name.endswith(".zst"):
            assert raw[:4] == b"\x28\xb5\x2f\xfd"  # zstd frame magic
            assert zstandard.ZstdDecompressor().decompressobj().decompress(raw) == BASE_STREAM
        else:
            assert raw == BASE_STREAM
        with open_image_for_read(path) as f:
            records = list(StreamReader(f))
        assert [type(r) for r in records] == [
            X86PvInfoRecord, StaticDataEndRecord, PageDataRecord, EndRecord,
        ]  # fmt: skip


def test_corrupt_and_truncated_zstd_give_stream_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    zstandard = pytest.importorskip("zstandard")
    compressed = zstandard.ZstdCompressor().compress(BASE_STREAM)
    (tmp_path / "trunc.zst").write_bytes(compressed[: len(compressed) // 2])
    (tmp_path / "garbage.zst").write_bytes(b"this is not zstd at all" * 4)
    for name in ("trunc.zst", "garbage.zst"):
        with pytest.raises(StreamError), open_image_for_read(tmp_path / name) as f:
            list(StreamReader(f))
