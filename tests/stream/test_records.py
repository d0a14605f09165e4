"""Struct codecs of the migration stream: vcpu_guest_context, HVM save records, record bodies.

Sizes and offsets checked here come from Xen's public headers:

* ``struct vcpu_guest_context`` for x86_64 is 5168 octets
  (xen/include/public/arch-x86/xen.h + xen-x86_64.h: 512 fpu + 8 flags + 200
  cpu_user_regs + 256*16 trap_info + 44*8 of longs and u64s); libxc checks an
  X86_PV_VCPU_BASIC blob of a 64-bit guest against
  ``sizeof(vcpu_guest_context_x86_64_t)``.
* ``struct hvm_hw_cpu`` is 1032 octets (xen/include/public/arch-x86/hvm/save.h
  since Xen 4.7 added ``flags`` + ``pad0``; 1024 before, 1016 before 3.4).
* ``struct hvm_hw_lapic`` is 32 octets with ``tdt_msr`` and ``pending_esr``.
* libxc's BUILD_BUG_ONs (tools/libs/guest/xg_sr_common.c): image header 24,
  domain header 16, record header 8, PAGE_DATA header 8, X86_PV_INFO 8,
  X86_TSC_INFO 24, HVM_PARAMS entry 16.
"""

from __future__ import annotations

import dataclasses
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hypervisor.stream import (
    CpuUserRegs,
    HvmContext,
    HvmHwCpu,
    HvmHwLapic,
    HvmHwLapicRegs,
    HvmRecord,
    HvmSaveHeader,
    StreamError,
    TrapInfo,
    VcpuGuestContext,
    framing,
    hvm_records,
    iter_hvm_context,
    pack_hvm_context,
    records,
    vcpu_context,
)
from hypervisor.stream.hvm_records import read_hvm_header

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)


def random_bytes(size: int) -> st.SearchStrategy[bytes]:
    """Large payloads from a seed: Hypothesis shrinks the seed, not 5 KB of data."""
    return st.integers(0, 2**32 - 1).map(lambda seed: np.random.default_rng(seed).bytes(size))


def le64(data: bytes, offset: int) -> int:
    return int(struct.unpack_from("<Q", data, offset)[0])


# ---------------------------------------------------------------- sizes


def test_struct_sizes_equal_xen() -> None:
    assert vcpu_context.VCPU_GUEST_CONTEXT_SIZE == 5168  # sizeof(vcpu_guest_context_x86_64_t)
    assert vcpu_context.CPU_USER_REGS_SIZE == 200  # sizeof(struct cpu_user_regs), x86_64
    assert vcpu_context.TRAP_INFO_SIZE == 16  # sizeof(struct trap_info), x86_64
    assert len(VcpuGuestContext().pack()) == 5168
    assert hvm_records.HVM_HW_CPU_SIZE == 1032 and len(HvmHwCpu().pack()) == 1032
    assert hvm_records.HVM_HW_LAPIC_SIZE == 32 and len(HvmHwLapic().pack()) == 32
    assert len(HvmHwLapicRegs().pack()) == 1024
    assert HvmSaveHeader.SIZE == 24 and hvm_records.DESCRIPTOR.size == 8
    # libxc xg_sr_common.c build assertions.
    assert framing.IMAGE_HEADER_SIZE == 24
    assert framing.DOMAIN_HEADER_SIZE == 16
    assert framing.REC_HEADER.size == 8
    assert records._PV_INFO.size == 8
    assert records._TSC_INFO.size == 24


# ---------------------------------------------------------------- vcpu_guest_context


def distinct_context() -> VcpuGuestContext:
    """Every field a different value, so each offset check is unambiguous."""
    regs = CpuUserRegs(**{f.name: 0 for f in dataclasses.fields(CpuUserRegs)})
    for i, f in enumerate(dataclasses.fields(CpuUserRegs)):
        setattr(regs, f.name, 0x10 + i)
    traps = [TrapInfo(vector=i, flags=i % 8, cs=0xE033, address=0xFFFF800000000000 + i)
             for i in range(256)]  # fmt: skip
    return VcpuGuestContext(
        fpu_ctxt=bytes(range(256)) * 2,
        flags=0x25,
        user_regs=regs,
        trap_ctxt=traps,
        ldt_base=0x1111,
        ldt_ents=0x2222,
        gdt_frames=[0x3000 + i for i in range(16)],
        gdt_ents=0x4444,
        kernel_ss=0xE02B,
        kernel_sp=0x5555,
        ctrlreg=[0x6000 + i for i in range(8)],
        debugreg=[0x7000 + i for i in range(8)],
        event_callback_eip=0x8888,
        failsafe_callback_eip=0x9999,
        syscall_callback_eip=0xAAAA,
        vm_assist=0xBBBB,
        fs_base=0xCCCC,
        gs_base_kernel=0xDDDD,
        gs_base_user=0xEEEE,
    )


def test_vcpu_guest_context_offsets() -> None:
    ctx = distinct_context()
    raw = ctx.pack()
    assert raw[:512] == bytes(range(256)) * 2
    assert le64(raw, 512) == 0x25  # flags
    # cpu_user_regs at 520: r15 r14 ... rdi (15 u64), then the 32-bit pair.
    gprs = ["r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8",
            "rax", "rcx", "rdx", "rsi", "rdi"]  # fmt: skip
    for i, name in enumerate(gprs):
        assert le64(raw, 520 + 8 * i) == getattr(ctx.user_regs, name)
    assert struct.unpack_from("<II", raw, 640) == (ctx.user_regs.error_code,
                                                   ctx.user_regs.entry_vector)  # fmt: skip
    assert le64(raw, 648) == ctx.user_regs.rip
    assert struct.unpack_from("<HH", raw, 656) == (ctx.user_regs.cs, 0)  # cs, _pad0
    assert raw[660:664] == bytes([ctx.user_regs.saved_upcall_mask, 0, 0, 0])
    assert le64(raw, 664) == ctx.user_regs.rflags
    assert le64(raw, 672) == ctx.user_regs.rsp
    for i, seg in enumerate(["ss", "es", "ds", "fs", "gs"]):
        assert le64(raw, 680 + 8 * i) == getattr(ctx.user_regs, seg)  # u16 + 6 zero pad
    # trap_ctxt[256] at 720, 16 octets each: vector, flags, cs, 4 pad, address.
    assert struct.unpack_from("<BBHIQ", raw, 720 + 16 * 37) == (
        37,
        37 % 8,
        0xE033,
        0,
        0xFFFF800000000000 + 37,
    )
    offsets = {
        "ldt_base": 4816, "ldt_ents": 4824, "gdt_ents": 4960, "kernel_ss": 4968,
        "kernel_sp": 4976, "event_callback_eip": 5112, "failsafe_callback_eip": 5120,
        "syscall_callback_eip": 5128, "vm_assist": 5136, "fs_base": 5144,
        "gs_base_kernel": 5152, "gs_base_user": 5160,
    }  # fmt: skip
    for name, offset in offsets.items():
        assert le64(raw, offset) == getattr(ctx, name), name
    assert [le64(raw, 4832 + 8 * i) for i in range(16)] == ctx.gdt_frames
    assert [le64(raw, 4984 + 8 * i) for i in range(8)] == ctx.ctrlreg
    assert le64(raw, 5008) == ctx.ctrlreg[3]  # CR3
    assert [le64(raw, 5048 + 8 * i) for i in range(8)] == ctx.debugreg
    assert VcpuGuestContext.unpack(raw) == ctx


regs_strategy = st.builds(
    CpuUserRegs,
    **{
        f.name: {"error_code": u32, "entry_vector": u32, "cs": u16, "saved_upcall_mask": u8,
                 "ss": u16, "es": u16, "ds": u16, "fs": u16, "gs": u16}.get(f.name, u64)
        for f in dataclasses.fields(CpuUserRegs)
    },
)  # fmt: skip
trap_strategy = st.builds(TrapInfo, u8, u8, u16, u64)


@st.composite
def contexts(draw: st.DrawFn) -> VcpuGuestContext:
    traps = [TrapInfo() for _ in range(256)]
    for i, trap in draw(st.dictionaries(st.integers(0, 255), trap_strategy, max_size=6)).items():
        traps[i] = trap
    return VcpuGuestContext(
        fpu_ctxt=draw(random_bytes(512)),
        flags=draw(u64),
        user_regs=draw(regs_strategy),
        trap_ctxt=traps,
        ldt_base=draw(u64),
        ldt_ents=draw(u64),
        gdt_frames=draw(st.lists(u64, min_size=16, max_size=16)),
        gdt_ents=draw(u64),
        kernel_ss=draw(u64),
        kernel_sp=draw(u64),
        ctrlreg=draw(st.lists(u64, min_size=8, max_size=8)),
        debugreg=draw(st.lists(u64, min_size=8, max_size=8)),
        event_callback_eip=draw(u64),
        failsafe_callback_eip=draw(u64),
        syscall_callback_eip=draw(u64),
        vm_assist=draw(u64),
        fs_base=draw(u64),
        gs_base_kernel=draw(u64),
        gs_base_user=draw(u64),
    )


@settings(max_examples=80, deadline=None)
@given(contexts())
def test_vcpu_guest_context_round_trip(ctx: VcpuGuestContext) -> None:
    raw = ctx.pack()
    assert len(raw) == 5168
    again = VcpuGuestContext.unpack(raw)
    assert again == ctx
    assert again.pack() == raw


@settings(max_examples=50, deadline=None)
@given(random_bytes(5168))
def test_vcpu_guest_context_accepts_any_5168_octets(raw: bytes) -> None:
    ctx = VcpuGuestContext.unpack(raw)
    packed = ctx.pack()
    # Only the padding octets may differ (they are zeroed on pack).
    pads = [656 + 2, 656 + 3, 661, 662, 663] + [680 + 8 * i + k for i in range(5)
                                                for k in range(2, 8)]  # fmt: skip
    pads += [720 + 16 * i + k for i in range(256) for k in range(4, 8)]
    keep = bytearray(raw)
    for p in pads:
        keep[p] = 0
    assert packed == bytes(keep)


@pytest.mark.parametrize("size", [0, 5167, 5169, 2800])
def test_vcpu_guest_context_wrong_size(size: int) -> None:
    with pytest.raises(StreamError, match="an x86_64 vcpu_guest_context is 5168"):
        VcpuGuestContext.unpack(bytes(size), offset=0x80)


@pytest.mark.parametrize(
    ("change", "text"),
    [
        ({"flags": -1}, "field flags = -1 does not fit u64"),
        ({"ctrlreg": [0] * 7}, "ctrlreg has 7 entries"),
        ({"gdt_frames": [0] * 15 + [1 << 64]}, "gdt_frames[15]"),
        ({"fpu_ctxt": b"x"}, "fpu_ctxt must be 512 octets"),
        ({"user_regs": CpuUserRegs(cs=0x10000)}, "user_regs.cs"),
        ({"trap_ctxt": [TrapInfo(vector=256)] * 256}, "trap_ctxt[0].vector"),
        ({"trap_ctxt": []}, "trap_ctxt has 0 entries"),
    ],
)
def test_vcpu_guest_context_bad_fields(change: dict[str, object], text: str) -> None:
    ctx = dataclasses.replace(VcpuGuestContext(), **change)  # type: ignore[arg-type]
    with pytest.raises(StreamError) as info:
        ctx.pack()
    assert text in str(info.value)


# ---------------------------------------------------------------- hvm_hw_cpu / lapic


def test_hvm_hw_cpu_field_order_and_offsets() -> None:
    names = [f.name for f in dataclasses.fields(HvmHwCpu)]
    assert names == ["fpu_regs", *HvmHwCpu.FIELDS]
    cpu = HvmHwCpu(fpu_regs=bytes(range(256)) * 2)
    for i, name in enumerate(HvmHwCpu.FIELDS):
        setattr(cpu, name, 0x100 + i)
    raw = cpu.pack()
    assert raw[:512] == bytes(range(256)) * 2
    u64_at = {"rax": 512, "rbx": 520, "rsp": 568, "r8": 576, "r15": 632, "rip": 640,
              "rflags": 648, "cr0": 656, "cr2": 664, "cr3": 672, "cr4": 680, "dr0": 688,
              "dr7": 728, "cs_base": 808, "gdtr_base": 880, "sysenter_cs": 920,
              "shadow_gs": 944, "msr_flags": 952, "msr_efer": 992, "msr_tsc_aux": 1000,
              "tsc": 1008}  # fmt: skip
    for name, offset in u64_at.items():
        assert le64(raw, offset) == getattr(cpu, name), name
    u32_at = {"cs_sel": 736, "ldtr_sel": 764, "cs_limit": 768, "gdtr_limit": 804,
              "cs_arbytes": 888, "ldtr_arbytes": 916, "pending_event": 1016,
              "error_code": 1020, "flags": 1024}  # fmt: skip
    for name, offset in u32_at.items():
        assert struct.unpack_from("<I", raw, offset)[0] == getattr(cpu, name), name
    assert raw[1028:] == bytes(4)  # pad0
    assert HvmHwCpu.unpack(raw) == cpu


def test_hvm_hw_cpu_older_layouts_are_fixed_up_like_xen() -> None:
    cpu = HvmHwCpu(rip=0x1000, msr_efer=0x500, msr_tsc_aux=7, tsc=99,
                   pending_event=0x8000_0B0E, error_code=0x18, flags=0)  # fmt: skip
    full = cpu.pack()
    pre_4_7 = HvmHwCpu.unpack(full[:1024])
    assert pre_4_7.flags == hvm_records.XEN_X86_FPU_INITIALISED
    assert (pre_4_7.msr_tsc_aux, pre_4_7.tsc, pre_4_7.error_code) == (7, 99, 0x18)
    pre_3_4 = HvmHwCpu.unpack(full[:1000] + full[1008:1024])  # no msr_tsc_aux
    assert (pre_3_4.msr_tsc_aux, pre_3_4.tsc, pre_3_4.pending_event) == (0, 99, 0x8000_0B0E)
    assert (pre_3_4.rip, pre_3_4.msr_efer) == (0x1000, 0x500)
    assert pre_3_4.pending_valid and pre_3_4.pending_error_valid
    assert (pre_3_4.pending_vector, pre_3_4.pending_type) == (0x0E, 3)
    with pytest.raises(StreamError, match="length 1031, expected 1032"):
        HvmHwCpu.unpack(full[:-1])


@settings(max_examples=60, deadline=None)
@given(random_bytes(1032))
def test_hvm_hw_cpu_round_trips_any_payload_but_pad(raw: bytes) -> None:
    assert HvmHwCpu.unpack(raw).pack() == raw[:1028] + bytes(4)


def test_hvm_hw_lapic_golden_and_old_sizes() -> None:
    lapic = HvmHwLapic(apic_base_msr=0xFEE00900, disabled=0, timer_divisor=2,
                       tdt_msr=0x1234, pending_esr=0x40)  # fmt: skip
    assert lapic.pack() == bytes.fromhex(
        "0009e0fe00000000 00000000 02000000 3412000000000000 40000000 00000000"
    )
    assert HvmHwLapic.unpack(lapic.pack()) == lapic
    assert HvmHwLapic.unpack(lapic.pack()[:24]) == dataclasses.replace(lapic, pending_esr=0)
    assert HvmHwLapic.unpack(lapic.pack()[:16]) == HvmHwLapic(0xFEE00900, 0, 2)
    with pytest.raises(StreamError, match="length 20, expected 32"):
        HvmHwLapic.unpack(bytes(20))
    with pytest.raises(StreamError, match="pending_esr"):
        HvmHwLapic(pending_esr=1 << 32).pack()


def test_lapic_register_page() -> None:
    regs = HvmHwLapicRegs().with_u32(0x80, 0x20).with_u32(0x200, 0x8000_0001)
    assert regs.read_u32(0x80) == 0x20 and regs.read_u32(0x200) == 0x8000_0001
    assert regs.pack()[0x80:0x84] == bytes.fromhex("20000000")
    assert HvmHwLapicRegs.unpack(regs.pack()) == regs
    for bad in (0x81, 1024, -4):
        with pytest.raises(StreamError, match="register offset"):
            regs.read_u32(bad)
    with pytest.raises(StreamError, match="length 1000, expected 1024"):
        HvmHwLapicRegs.unpack(bytes(1000))


# ---------------------------------------------------------------- HVM context container

HEADER_ENTRY = (
    bytes.fromhex("0100 0000 18000000")  # typecode 1 HEADER, instance 0, length 24
    + bytes.fromhex("86123854 01000000")  # magic 0x54381286, version 1
    + bytes.fromhex("0400000013000000 a0060500 80841e00")  # changeset, cpuid, gtsc_khz
)
END_ENTRY = bytes.fromhex("0000 0000 00000000")


def test_hvm_context_golden_bytes() -> None:
    header = HvmSaveHeader(changeset=0x13_0000_0004, cpuid=0x000506A0, gtsc_khz=2_000_000)
    lapic = HvmHwLapic(apic_base_msr=0xFEE00900).pack()
    blob = pack_hvm_context([HvmRecord(5, 1, lapic), (3, 0, bytes(8))], header=header)
    assert blob == (
        HEADER_ENTRY
        + bytes.fromhex("0500 0100 20000000") + lapic  # LAPIC, vcpu 1, 32 octets
        + bytes.fromhex("0300 0000 08000000") + bytes(8)  # PIC, passed through
        + END_ENTRY
    )  # fmt: skip
    assert list(iter_hvm_context(blob)) == [HvmRecord(5, 1, lapic), HvmRecord(3, 0, bytes(8))]
    assert read_hvm_header(blob) == header
    ctx = HvmContext.unpack(blob)
    assert ctx.header == header and ctx.pack() == blob


hvm_entries = st.lists(
    st.one_of(
        st.builds(HvmRecord, st.just(2), u16, random_bytes(1032)),
        st.builds(HvmRecord, st.just(5), u16, st.binary(min_size=32, max_size=32)),
        st.builds(HvmRecord, st.just(6), u16, random_bytes(1024)),
        st.builds(HvmRecord, st.integers(7, 0xFFFF), u16, st.binary(max_size=40)),
    ),
    max_size=6,
)


@settings(max_examples=80, deadline=None)
@given(hvm_entries, st.builds(HvmSaveHeader, u64, u32, u32))
def test_hvm_context_round_trip(entries: list[HvmRecord], header: HvmSaveHeader) -> None:
    blob = pack_hvm_context(entries, header=header)
    assert list(iter_hvm_context(blob)) == entries
    assert HvmContext.unpack(blob) == HvmContext(header, entries)


def malformed_hvm_blobs() -> list[tuple[bytes, str]]:
    good = pack_hvm_context([HvmRecord(6, 0, bytes(1024))])
    return [
        (b"", "blob ends without an END entry"),
        (good[:5], "truncated descriptor: 5 of 8"),
        (END_ENTRY, "does not start with a HEADER"),
        (good.replace(bytes.fromhex("86123854"), bytes(4)), "bad magic"),
        (good[:12] + b"\x02" + good[13:], "unsupported version 2"),
        (good[:-8], "blob ends without an END entry"),
        (good[:-8] + bytes.fromhex("0000000004000000") + bytes(4), "END entry with length 4"),
        (good + b"junk", "4 octets of trailing data after END"),
        (good[:32] + HEADER_ENTRY + good[32:], "second HEADER"),
        (good[:32] + bytes.fromhex("0600000000040000") + bytes(100), "runs past the end"),
        (good[:32] + bytes.fromhex("0200000008000000") + bytes(8) + END_ENTRY,
         "length 8, expected 1032"),
    ]  # fmt: skip


@pytest.mark.parametrize(("blob", "text"), malformed_hvm_blobs())
def test_hvm_context_malformed(blob: bytes, text: str) -> None:
    with pytest.raises(StreamError) as info:
        list(iter_hvm_context(blob))
    assert text in str(info.value)
    assert info.value.part == "HVM_CONTEXT entry"


@pytest.mark.parametrize(
    ("entries", "text"),
    [
        ([(0, 0, b"")], "HEADER and END are added"),
        ([(1, 0, bytes(24))], "HEADER and END are added"),
        ([(5, 0, bytes(31))], "length 31, expected 32"),
        ([(1 << 16, 0, b"")], "typecode 65536 does not fit u16"),
        ([(7, -1, b"")], "instance -1 does not fit u16"),
        ([(7, 0, "text")], "payload must be bytes"),
        ([(7, 0)], "not a (typecode, instance, payload) triple"),
    ],
)
def test_pack_hvm_context_rejects_bad_entries(entries: list[tuple], text: str) -> None:
    with pytest.raises(StreamError) as info:
        pack_hvm_context(entries)
    assert text in str(info.value)


FUZZ_HVM = pack_hvm_context(
    [HvmRecord(2, 0, HvmHwCpu(rip=5).pack()), HvmRecord(5, 0, HvmHwLapic().pack()),
     HvmRecord(6, 0, bytes(1024)), HvmRecord(3, 0, bytes(8))],
    header=HvmSaveHeader(gtsc_khz=1000),
)  # fmt: skip


@settings(max_examples=600, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, len(FUZZ_HVM)), st.integers(0, 3), st.binary(max_size=6)),
        min_size=1,
        max_size=3,
    )
)
def test_fuzz_hvm_context_raises_only_stream_error(edits: list[tuple[int, int, bytes]]) -> None:
    blob = bytearray(FUZZ_HVM)
    for pos, delete, insert in edits:
        blob[pos : pos + delete] = insert
    try:
        for typecode, _instance, payload in iter_hvm_context(bytes(blob)):
            if typecode == 2:
                HvmHwCpu.unpack(payload)
            elif typecode == 5:
                HvmHwLapic.unpack(payload)
            elif typecode == 6:
                HvmHwLapicRegs.unpack(payload)
    except StreamError:
        pass


# ---------------------------------------------------------------- record body codecs


def test_page_data_body_golden() -> None:
    rec = records.PageDataRecord(
        pfns=np.array([0x10, 0x11], np.uint64),
        types=np.array([framing.Pfinfo.L1TAB_PIN, framing.Pfinfo.XALLOC], np.uint8),
        pages=np.full((1, 4096), 7, np.uint8),
    )
    body = b"".join(bytes(p) for p in rec.encode_body(records.CodecContext()))
    assert body[:24] == bytes.fromhex("02000000 00000000 1000000000000090 11000000000000e0")
    assert body[24:] == bytes([7]) * 4096
    again = records.PageDataRecord.decode_body(bytearray(body), records.CodecContext())
    assert again == rec


def test_p2m_frames_body_uses_guest_width() -> None:
    ctx32 = records.CodecContext(guest_width=4)
    rec = records.X86PvP2mFramesRecord(0, 2047, np.array([9, 10], np.uint64))  # 1024 per frame
    body = b"".join(bytes(p) for p in rec.encode_body(ctx32))
    assert body == bytes.fromhex("00000000 ff070000 0900000000000000 0a00000000000000")
    assert records.X86PvP2mFramesRecord.decode_body(bytearray(body), ctx32) == rec
    with pytest.raises(records.BodyError, match="expected 40 for 4 p2m frames"):
        records.X86PvP2mFramesRecord.decode_body(bytearray(body), records.CodecContext())


def test_stream_error_pickles() -> None:
    import pickle

    err = StreamError("body length 4096 runs past end of file", offset=0x1A8, record="PAGE_DATA")
    again = pickle.loads(pickle.dumps(err))
    assert (
        str(again)
        == str(err)
        == ("record PAGE_DATA at offset 0x1a8: body length 4096 runs past end of file")
    )
    assert (again.offset, again.record, again.part) == (0x1A8, "PAGE_DATA", "record")
