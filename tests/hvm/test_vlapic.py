"""Unit and property tests of the xAPIC model alone (no CPU)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hypervisor.hvm.vlapic import (
    DIVIDE_BY_ENCODING,
    ESR_ILLEGAL_REGISTER_ADDRESS,
    ESR_RECEIVE_ILLEGAL_VECTOR,
    ESR_SEND_ILLEGAL_VECTOR,
    HVM_LAPIC_RECORD_SIZE,
    HVM_LAPIC_REGS_RECORD_SIZE,
    LVT_MASKED,
    LVT_REGISTERS,
    LVT_TIMER_PERIODIC,
    REG_APR,
    REG_DFR,
    REG_EOI,
    REG_ESR,
    REG_ICR_HIGH,
    REG_ICR_LOW,
    REG_ID,
    REG_IRR,
    REG_ISR,
    REG_LVT_ERROR,
    REG_LVT_TIMER,
    REG_PPR,
    REG_SVR,
    REG_TIMER_CURRENT,
    REG_TIMER_DIVIDE,
    REG_TIMER_INITIAL,
    REG_TMR,
    REG_TPR,
    REG_VERSION,
    VLapic,
    VLapicError,
)

DIVIDE_CONFIGS = {
    enc_bits: DIVIDE_BY_ENCODING[((enc_bits >> 1) & 4) | (enc_bits & 3)]
    for enc_bits in (0x0, 0x1, 0x2, 0x3, 0x8, 0x9, 0xA, 0xB)
}


class IpiRecorder:
    def __init__(self) -> None:
        self.calls: list[tuple[int | None, int, str]] = []

    def __call__(self, dest: int | None, vector: int, shorthand: str) -> None:
        self.calls.append((dest, vector, shorthand))


def make_lapic(apic_id: int = 1, *, enable: bool = True, **kwargs) -> tuple[VLapic, IpiRecorder]:
    rec = IpiRecorder()
    lapic = VLapic(apic_id, rec, **kwargs)
    if enable:
        lapic.mmio_write(REG_SVR, 4, 0x1FF)
    return lapic, rec


def read(lapic: VLapic, offset: int, **kw) -> int:
    return lapic.mmio_read(offset, 4, **kw)


def write(lapic: VLapic, offset: int, value: int, **kw) -> None:
    lapic.mmio_write(offset, 4, value, **kw)


def latch_esr(lapic: VLapic) -> int:
    write(lapic, REG_ESR, 0)
    return read(lapic, REG_ESR)


def start_timer(
    lapic: VLapic,
    count: int,
    *,
    vector: int = 0x40,
    periodic: bool = False,
    dcr: int = 0xB,
    now_ns: int = 0,
) -> None:
    write(lapic, REG_TIMER_DIVIDE, dcr, now_ns=now_ns)
    write(lapic, REG_LVT_TIMER, vector | (LVT_TIMER_PERIODIC if periodic else 0))
    write(lapic, REG_TIMER_INITIAL, count)


# --- reset state and register access -----------------------------------------------------


def test_reset_values_like_hardware():
    lapic, _ = make_lapic(apic_id=7, enable=False)
    assert read(lapic, REG_ID) == 7 << 24
    assert read(lapic, REG_VERSION) == 0x0005_0014
    assert read(lapic, REG_DFR) == 0xFFFF_FFFF
    assert read(lapic, REG_SVR) == 0xFF
    for lvt in LVT_REGISTERS:
        assert read(lapic, lvt) == LVT_MASKED
    assert not lapic.enabled
    assert lapic.accept(0x40) is False  # software-disabled: fixed interrupts dropped
    assert lapic.irr_vectors() == []
    assert lapic.counters.dropped == 1


@pytest.mark.parametrize(
    ("offset", "size"),
    [
        (0x000, 4),
        (0x010, 4),
        (0x040, 4),
        (0x290, 4),
        (0x3F0, 4),
        (0x400, 4),
        (0xFF0, 4),
        (0x084, 4),
        (0x080, 1),
        (0x080, 2),
        (0x080, 8),
        (0x301, 2),
    ],
)
def test_illegal_register_access_sets_esr_bit7(offset: int, size: int):
    lapic, _ = make_lapic()
    write(lapic, REG_TPR, 0x20)
    assert lapic.mmio_read(offset, size) == 0
    assert lapic.pending_esr == ESR_ILLEGAL_REGISTER_ADDRESS
    lapic.mmio_write(offset, size, 0x55)
    assert read(lapic, REG_TPR) == 0x20  # the write went nowhere
    assert latch_esr(lapic) == ESR_ILLEGAL_REGISTER_ADDRESS


def test_esr_is_write_to_latch():
    lapic, _ = make_lapic()
    lapic.mmio_read(0x40, 4)
    assert read(lapic, REG_ESR) == 0  # not visible before a write
    write(lapic, REG_ESR, 0xFFFF_FFFF)  # value written is irrelevant
    assert read(lapic, REG_ESR) == ESR_ILLEGAL_REGISTER_ADDRESS
    assert read(lapic, REG_ESR) == ESR_ILLEGAL_REGISTER_ADDRESS  # reads do not clear
    write(lapic, REG_ESR, 0)
    assert read(lapic, REG_ESR) == 0


def test_illegal_vector_is_dropped_and_logged():
    lapic, _ = make_lapic()
    assert lapic.accept(15) is False
    assert lapic.irr_vectors() == []
    assert latch_esr(lapic) == ESR_RECEIVE_ILLEGAL_VECTOR
    assert lapic.accept(16) is True


def test_lvt_error_raised_once_per_new_error_bit():
    lapic, _ = make_lapic()
    write(lapic, REG_LVT_ERROR, 0xFE)
    lapic.mmio_read(0x40, 4)
    lapic.mmio_read(0x50, 4)  # same bit already pending: no second interrupt
    assert lapic.irr_vectors() == [0xFE]
    assert lapic.counters.accepted == 1


def test_writes_to_read_only_registers_ignored():
    lapic, _ = make_lapic()
    lapic.accept(0x41)
    before = lapic.save().regs
    for offset in (
        REG_VERSION,
        REG_PPR,
        REG_APR,
        REG_IRR + 0x20,
        REG_ISR,
        REG_TMR,
        REG_TIMER_CURRENT,
        0x0C0,
    ):
        write(lapic, offset, 0xFFFF_FFFF)
    assert lapic.save().regs == before
    assert lapic.pending_esr == 0


def test_writable_bits_only():
    lapic, _ = make_lapic()
    write(lapic, REG_TPR, 0xFFFF_FFFF)
    assert read(lapic, REG_TPR) == 0xFF
    write(lapic, REG_DFR, 0)
    assert read(lapic, REG_DFR) == 0x0FFF_FFFF
    write(lapic, REG_LVT_TIMER, 0xFFFF_FFFF)
    assert read(lapic, REG_LVT_TIMER) == 0x0003_00FF  # no delivery status, no TSC-deadline
    write(lapic, REG_ICR_HIGH, 0xFFFF_FFFF)
    assert read(lapic, REG_ICR_HIGH) == 0xFF00_0000


def test_caller_bugs_raise_and_change_nothing():
    lapic, _ = make_lapic()
    before = lapic.save()
    for call in (
        lambda: lapic.mmio_read(0x1000, 4),
        lambda: lapic.mmio_read(0xFFE, 4),
        lambda: lapic.mmio_read(0x80, 3),
        lambda: lapic.mmio_write(0x80, 1, 0x100),
        lambda: lapic.mmio_write(0x80, 4, -1),
        lambda: lapic.accept(256),
        lambda: lapic.accept(-1),
    ):
        with pytest.raises(VLapicError):
            call()
    assert lapic.save() == before
    lapic.advance(100)
    with pytest.raises(VLapicError, match="backwards"):
        lapic.advance(99)
    with pytest.raises(VLapicError):
        VLapic(256, IpiRecorder())
    with pytest.raises(VLapicError):
        VLapic(0, IpiRecorder(), bus_hz=0)


# --- priority, acknowledge, EOI ----------------------------------------------------------


def test_tpr_blocks_same_and_lower_classes():
    lapic, _ = make_lapic()
    lapic.accept(0x45)
    for tpr, expected in ((0x50, None), (0x4F, None), (0x40, None), (0x3F, 0x45), (0, 0x45)):
        write(lapic, REG_TPR, tpr)
        assert read(lapic, REG_PPR) == tpr
        assert lapic.pending_vector() == expected, hex(tpr)
    write(lapic, REG_TPR, 0x50)
    assert lapic.ack() == 0xFF  # spurious vector, nothing moved
    assert lapic.irr_vectors() == [0x45] and lapic.isr_vectors() == []
    assert lapic.counters.spurious == 1


def test_highest_irr_wins():
    lapic, _ = make_lapic()
    for v in (0x31, 0x92, 0x90, 0x20):
        lapic.accept(v)
    assert lapic.pending_vector() == 0x92
    assert lapic.accept(0x92) is False  # IRR is one bit: coalesced
    assert lapic.counters.coalesced == 1


def test_nested_isr_and_eoi_order():
    lapic, _ = make_lapic()
    lapic.accept(0x30)
    assert lapic.ack() == 0x30
    assert read(lapic, REG_PPR) == 0x30
    lapic.accept(0x50)
    assert lapic.ack() == 0x50  # class 5 > PPR class 3: nests
    lapic.accept(0x41)
    assert lapic.pending_vector() is None  # class 4 <= PPR class 5
    assert read(lapic, REG_PPR) == 0x50
    assert read(lapic, REG_ISR + 0x10) == 1 << (0x30 - 32)
    assert read(lapic, REG_ISR + 0x20) == 1 << (0x50 - 64)
    write(lapic, REG_EOI, 0)
    assert lapic.isr_vectors() == [0x30]
    assert lapic.pending_vector() == 0x41
    assert lapic.ack() == 0x41
    assert lapic.isr_vectors() == [0x30, 0x41]
    assert lapic.eoi() == 0x41
    assert lapic.eoi() == 0x30
    assert lapic.eoi() is None
    assert read(lapic, REG_PPR) == 0
    assert lapic.counters.eois == 3


def test_ppr_keeps_tpr_when_tpr_class_is_higher_and_apr():
    lapic, _ = make_lapic()
    lapic.accept(0x35)
    lapic.ack()
    write(lapic, REG_TPR, 0x47)
    assert read(lapic, REG_PPR) == 0x47
    write(lapic, REG_TPR, 0x27)
    assert read(lapic, REG_PPR) == 0x30
    lapic.accept(0x61)
    assert read(lapic, REG_APR) == 0x60


def test_level_triggered_eoi_clears_tmr():
    lapic, _ = make_lapic()
    lapic.accept(0x60, level_trigger=True)
    assert lapic.tmr_vectors() == [0x60]
    assert lapic.ack() == 0x60
    assert lapic.tmr_vectors() == [0x60]
    lapic.eoi()
    assert lapic.tmr_vectors() == [] and lapic.isr_vectors() == []


def test_disabled_apic_masks_lvts_and_keeps_them_masked():
    lapic, _ = make_lapic()
    write(lapic, REG_LVT_TIMER, 0x40)
    write(lapic, REG_SVR, 0x0FF)  # software-disable
    assert read(lapic, REG_LVT_TIMER) == 0x40 | LVT_MASKED
    write(lapic, REG_LVT_TIMER, 0x40)
    assert read(lapic, REG_LVT_TIMER) & LVT_MASKED
    assert lapic.pending_vector() is None
    write(lapic, REG_SVR, 0x1FF)
    write(lapic, REG_LVT_TIMER, 0x40)
    assert read(lapic, REG_LVT_TIMER) == 0x40


# --- timer -------------------------------------------------------------------------------


def test_one_shot_fires_once_then_stops():
    lapic, _ = make_lapic()
    start_timer(lapic, 1000, now_ns=0)
    assert lapic.next_deadline_ns() == 1000
    assert read(lapic, REG_TIMER_CURRENT, now_ns=250) == 750
    assert lapic.advance(999) == 0
    assert lapic.irr_vectors() == []
    assert lapic.advance(1000) == 1
    assert lapic.irr_vectors() == [0x40]
    assert lapic.next_deadline_ns() is None
    assert read(lapic, REG_TIMER_CURRENT) == 0
    assert lapic.advance(100_000) == 0
    assert lapic.counters.timer_fires == 1


def test_periodic_late_advance_counts_and_coalesces():
    lapic, _ = make_lapic()
    start_timer(lapic, 100, periodic=True, now_ns=0)
    assert lapic.advance(1050) == 10
    assert lapic.irr_vectors() == [0x40]
    assert lapic.counters.timer_fires == 10
    assert lapic.counters.timer_coalesced == 9
    assert read(lapic, REG_TIMER_CURRENT) == 50
    assert lapic.next_deadline_ns() == 1100
    assert lapic.advance(1100) == 1
    assert lapic.counters.timer_coalesced == 10  # IRR still set
    assert lapic.ack() == 0x40
    assert lapic.advance(1200) == 1
    assert lapic.counters.timer_coalesced == 10
    assert read(lapic, REG_TIMER_CURRENT) == 100  # reloaded at the expiry instant


def test_huge_lateness_is_closed_form():
    lapic, _ = make_lapic()
    start_timer(lapic, 1, periodic=True, now_ns=0)
    assert lapic.advance(10**15) == 10**15  # would take ages if looped per expiry
    assert lapic.next_deadline_ns() == 10**15 + 1


@pytest.mark.parametrize(("dcr", "divisor"), sorted(DIVIDE_CONFIGS.items()))
def test_every_divide_value(dcr: int, divisor: int):
    lapic, _ = make_lapic()
    start_timer(lapic, 10_000, dcr=dcr, now_ns=500)
    assert lapic.divide == divisor
    assert read(lapic, REG_TIMER_DIVIDE) == dcr
    for elapsed in sorted({0, 1, divisor - 1, divisor, 3 * divisor + 1, 1234}):
        assert read(lapic, REG_TIMER_CURRENT, now_ns=500 + elapsed) == 10_000 - elapsed // divisor
    assert lapic.next_deadline_ns() == 500 + 10_000 * divisor
    assert lapic.hvm_lapic_record()[12:16] == struct.pack("<I", divisor)


def test_all_divide_encodings_distinct():
    assert sorted(DIVIDE_CONFIGS.values()) == [1, 2, 4, 8, 16, 32, 64, 128]


def test_bus_hz_scales_ticks():
    lapic, _ = make_lapic(bus_hz=100_000_000)  # 10 ns per tick at divide 1
    start_timer(lapic, 50, now_ns=0)
    assert read(lapic, REG_TIMER_CURRENT, now_ns=125) == 50 - 12
    assert lapic.next_deadline_ns() == 500
    lapic3, _ = make_lapic(bus_hz=3)  # non-integer ns per tick: deadline rounds up
    start_timer(lapic3, 1, now_ns=0)
    assert lapic3.next_deadline_ns() == 333_333_334


def test_divide_change_while_running_keeps_count():
    lapic, _ = make_lapic()
    start_timer(lapic, 1000, periodic=True, now_ns=0)
    assert read(lapic, REG_TIMER_CURRENT, now_ns=400) == 600
    write(lapic, REG_TIMER_DIVIDE, 0x0, now_ns=400)  # divide by 2
    assert read(lapic, REG_TIMER_CURRENT) == 600
    assert read(lapic, REG_TIMER_CURRENT, now_ns=600) == 500
    assert lapic.next_deadline_ns() == 400 + 600 * 2
    lapic.advance(1600)
    assert lapic.counters.timer_fires == 1
    assert lapic.next_deadline_ns() == 1600 + 1000 * 2  # later periods at the new rate


def test_initial_count_write_rearms_and_zero_stops():
    lapic, _ = make_lapic()
    start_timer(lapic, 1000, now_ns=0)
    write(lapic, REG_TIMER_INITIAL, 300, now_ns=900)
    assert lapic.next_deadline_ns() == 1200
    write(lapic, REG_TIMER_INITIAL, 0, now_ns=1000)
    assert lapic.next_deadline_ns() is None
    assert lapic.advance(5000) == 0
    assert lapic.counters.timer_fires == 0


def test_masked_timer_counts_but_does_not_accept():
    lapic, _ = make_lapic()
    start_timer(lapic, 100, periodic=True, now_ns=0)
    write(lapic, REG_LVT_TIMER, 0x40 | LVT_TIMER_PERIODIC | LVT_MASKED)
    assert read(lapic, REG_TIMER_CURRENT, now_ns=30) == 70
    assert lapic.advance(350) == 3
    assert lapic.irr_vectors() == []
    assert lapic.counters.timer_masked == 3
    write(lapic, REG_LVT_TIMER, 0x40 | LVT_TIMER_PERIODIC)
    lapic.advance(400)
    assert lapic.irr_vectors() == [0x40]


def test_masked_one_shot_still_stops():
    lapic, _ = make_lapic()
    write(lapic, REG_LVT_TIMER, 0x40 | LVT_MASKED)
    write(lapic, REG_TIMER_INITIAL, 10)  # reset divide configuration: divide by 2
    lapic.advance(20)
    assert lapic.next_deadline_ns() is None and lapic.irr_vectors() == []


def test_mode_switch_periodic_to_one_shot():
    lapic, _ = make_lapic()
    start_timer(lapic, 100, periodic=True, now_ns=0)
    lapic.advance(150)
    write(lapic, REG_LVT_TIMER, 0x40)  # one-shot from now: the running count fires once more
    assert lapic.advance(1000) == 1
    assert lapic.next_deadline_ns() is None


# --- IPIs --------------------------------------------------------------------------------


def test_icr_shorthands():
    lapic, rec = make_lapic(apic_id=2)
    write(lapic, REG_ICR_HIGH, 3 << 24)
    write(lapic, REG_ICR_LOW, 0x51)
    write(lapic, REG_ICR_LOW, 0x52 | 1 << 18)  # self
    write(lapic, REG_ICR_LOW, 0x53 | 2 << 18)  # all including self
    write(lapic, REG_ICR_LOW, 0x54 | 3 << 18)  # all excluding self
    assert rec.calls == [
        (3, 0x51, "none"),
        (None, 0x53, "all-including-self"),
        (None, 0x54, "all-excluding-self"),
    ]
    assert lapic.irr_vectors() == [0x52]
    assert read(lapic, REG_ICR_LOW) & (1 << 12) == 0  # delivery status idle
    assert read(lapic, REG_ICR_LOW) == 0x54 | 3 << 18
    assert lapic.counters.ipis_sent == 4


def test_icr_rejections():
    lapic, rec = make_lapic()
    write(lapic, REG_ICR_LOW, 0x50 | 4 << 8)  # NMI delivery mode: unsupported
    write(lapic, REG_ICR_LOW, 0x50 | 1 << 11)  # logical destination: unsupported
    write(lapic, REG_ICR_LOW, 0x05)  # illegal vector
    assert rec.calls == []
    assert lapic.counters.ipis_rejected == 3 and lapic.counters.ipis_sent == 0
    assert latch_esr(lapic) == ESR_SEND_ILLEGAL_VECTOR


# --- save / restore, HVM records ---------------------------------------------------------


def busy_lapic() -> VLapic:
    lapic, _ = make_lapic(apic_id=4, bsp=True)
    write(lapic, REG_TPR, 0x20)
    lapic.accept(0x70)
    lapic.accept(0x33, level_trigger=True)
    lapic.ack()
    lapic.accept(0x91)
    lapic.mmio_read(0x40, 4)
    start_timer(lapic, 5000, periodic=True, dcr=0x1, now_ns=100)  # divide by 4
    lapic.advance(7_700)  # a whole number of ticks after arming
    return lapic


def test_save_restore_continues_identically():
    a = busy_lapic()
    b, _ = make_lapic(apic_id=9, enable=False)
    b.restore(a.save())
    assert b.save() == a.save()
    for lapic in (a, b):
        lapic.advance(123_456)
        lapic.ack()
        write(lapic, REG_EOI, 0)
        write(lapic, REG_TIMER_DIVIDE, 0xB, now_ns=200_001)
    assert a.save() == b.save()
    assert read(a, REG_TIMER_CURRENT) == read(b, REG_TIMER_CURRENT)


def test_restore_rejects_bad_state_unchanged():
    lapic = busy_lapic()
    before = lapic.save()
    import dataclasses

    with pytest.raises(VLapicError):
        lapic.restore(dataclasses.replace(before, regs=b"\0" * 10))
    with pytest.raises(VLapicError):
        lapic.restore(dataclasses.replace(before, counters=(("bogus", 1),)))
    with pytest.raises(VLapicError):
        lapic.restore("not a state")  # type: ignore[arg-type]
    assert lapic.save() == before


def test_determinism():
    assert busy_lapic().save() == busy_lapic().save()


def test_hvm_record_sizes_and_layout():
    lapic = busy_lapic()
    rec = lapic.hvm_lapic_record()
    regs = lapic.hvm_lapic_regs_record()
    assert len(rec) == HVM_LAPIC_RECORD_SIZE == 32
    assert len(regs) == HVM_LAPIC_REGS_RECORD_SIZE == 1024
    base, disabled, divisor, tdt, esr, pad = struct.unpack("<QIIQII", rec)
    assert base == 0xFEE0_0000 | 1 << 11 | 1 << 8
    assert (disabled, divisor, tdt, pad) == (0, 4, 0, 0)
    assert esr == ESR_ILLEGAL_REGISTER_ADDRESS
    assert regs[REG_ID : REG_ID + 4] == struct.pack("<I", 4 << 24)
    assert regs[REG_PPR : REG_PPR + 4] == struct.pack("<I", 0x70)  # ISR 0x70 outranks TPR 0x20
    assert regs[REG_TIMER_CURRENT : REG_TIMER_CURRENT + 4] == struct.pack(
        "<I", read(lapic, REG_TIMER_CURRENT)
    )
    irr = int.from_bytes(
        b"".join(regs[REG_IRR + 16 * i : REG_IRR + 16 * i + 4] for i in range(8)), "little"
    )
    assert irr == (1 << 0x33) | (1 << 0x91)
    assert all(regs[o + 4 : o + 16] == bytes(12) for o in range(0, 1024, 16))
    disabled_lapic, _ = make_lapic(enable=False)
    assert struct.unpack_from("<I", disabled_lapic.hvm_lapic_record(), 8)[0] == 1


def test_hvm_records_round_trip():
    a = busy_lapic()
    rec, regs = a.hvm_lapic_record(), a.hvm_lapic_regs_record()
    b = VLapic.from_hvm_records(rec, regs, a.now_ns, IpiRecorder())
    assert b.hvm_lapic_record() == rec
    assert b.hvm_lapic_regs_record() == regs
    assert b.apic_id == 4 and b.pending_esr == a.pending_esr
    assert b.next_deadline_ns() == a.next_deadline_ns()  # whole ticks: no drift here
    assert b.irr_vectors() == a.irr_vectors() and b.isr_vectors() == a.isr_vectors()
    assert b.tmr_vectors() == a.tmr_vectors()
    for lapic in (a, b):
        lapic.advance(100_000)
        lapic.ack()
    assert a.irr_vectors() == b.irr_vectors() and a.isr_vectors() == b.isr_vectors()


def test_hvm_records_lose_at_most_the_partial_tick():
    a = busy_lapic()
    a.advance(7_701)  # 1 ns into a 4 ns tick
    b = VLapic.from_hvm_records(
        a.hvm_lapic_record(), a.hvm_lapic_regs_record(), a.now_ns, IpiRecorder()
    )
    late, on_time = b.next_deadline_ns(), a.next_deadline_ns()
    assert late is not None and on_time is not None
    assert 0 < late - on_time < 4


def test_hvm_records_restore_later_resumes_count():
    a = busy_lapic()
    remaining = read(a, REG_TIMER_CURRENT)
    b = VLapic.from_hvm_records(
        a.hvm_lapic_record(), a.hvm_lapic_regs_record(), 10**9, IpiRecorder()
    )
    assert b.next_deadline_ns() == 10**9 + remaining * 4


def test_hvm_records_reject_bad_input():
    a = busy_lapic()
    rec, regs = a.hvm_lapic_record(), a.hvm_lapic_regs_record()
    bad_inputs = [
        (rec[:24], regs, "LAPIC record must be 32"),
        (rec + b"\0" * 8, regs, "LAPIC record must be 32"),
        (rec, regs[:1000], "LAPIC_REGS record must be 1024"),
        (rec[:28] + b"\1\0\0\0", regs, "padding"),
        (struct.pack("<Q", 0xFEE0_0D00) + rec[8:], regs, "x2APIC"),
        (struct.pack("<Q", 0xFEC0_0900) + rec[8:], regs, "apic_base_msr"),
        (rec[:8] + struct.pack("<I", 1) + rec[12:], regs, "SVR"),
        (rec[:12] + struct.pack("<I", 8) + rec[16:], regs, "timer_divisor"),
        (rec[:16] + struct.pack("<Q", 5) + rec[24:], regs, "TSC-deadline"),
    ]
    page = bytearray(regs)
    struct.pack_into("<I", page, REG_TIMER_CURRENT, 6000)
    bad_inputs.append((rec, bytes(page), "current count"))
    page = bytearray(regs)
    struct.pack_into("<I", page, REG_IRR, 1 << 3)
    bad_inputs.append((rec, bytes(page), "vectors 0-15"))
    for lapic_rec, regs_rec, message in bad_inputs:
        with pytest.raises(VLapicError, match=message):
            VLapic.from_hvm_records(lapic_rec, regs_rec, 0, IpiRecorder())


def test_stopped_and_periodic_zero_count_records():
    lapic, _ = make_lapic()
    start_timer(lapic, 100, now_ns=0)
    lapic.advance(100)  # one-shot expired
    b = VLapic.from_hvm_records(
        lapic.hvm_lapic_record(), lapic.hvm_lapic_regs_record(), 500, IpiRecorder()
    )
    assert b.next_deadline_ns() is None
    page = bytearray(lapic.hvm_lapic_regs_record())
    struct.pack_into("<I", page, REG_LVT_TIMER, 0x40 | LVT_TIMER_PERIODIC)
    c = VLapic.from_hvm_records(lapic.hvm_lapic_record(), bytes(page), 500, IpiRecorder())
    assert c.next_deadline_ns() == 600  # Xen-style: periodic with count 0 restarts a period


# --- property: SDM priority invariants ---------------------------------------------------

operations = st.lists(
    st.one_of(
        st.tuples(st.just("accept"), st.integers(16, 255), st.booleans()),
        st.tuples(st.just("ack")),
        st.tuples(st.just("eoi")),
        st.tuples(st.just("tpr"), st.integers(0, 255)),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(operations)
def test_priority_invariants(ops):
    lapic, _ = make_lapic()
    irr: set[int] = set()
    isr: set[int] = set()
    tpr = 0
    for op in ops:
        if op[0] == "accept":
            lapic.accept(op[1], level_trigger=op[2])
            irr.add(op[1])
        elif op[0] == "tpr":
            tpr = op[1]
            write(lapic, REG_TPR, tpr)
        elif op[0] == "ack":
            ppr_before = read(lapic, REG_PPR)
            expected = lapic.pending_vector()
            vector = lapic.ack()
            if expected is None:
                assert vector == 0xFF
            else:
                assert vector == expected == max(irr)
                assert (vector >> 4) > (ppr_before >> 4)
                irr.discard(vector)
                isr.add(vector)
        else:
            highest = max(isr, default=None)
            assert lapic.eoi() == highest
            isr.discard(highest)  # type: ignore[arg-type]
        assert lapic.irr_vectors() == sorted(irr)
        assert lapic.isr_vectors() == sorted(isr)
        isrv = max(isr, default=0)
        assert lapic.ppr == (tpr if tpr >> 4 >= isrv >> 4 else isrv & 0xF0)
        pending = lapic.pending_vector()
        if pending is not None:
            assert pending == max(irr) and pending >> 4 > lapic.ppr >> 4
        elif irr:
            assert max(irr) >> 4 <= lapic.ppr >> 4


def test_coalesced_periodic_ticks_are_delivered_later_one_per_eoi():
    """Ten expiries while nothing ran: one in IRR now, nine owed; each EOI of the timer
    vector delivers the next, so a guest counting ticks ends up with all ten."""
    lapic, _ = make_lapic()
    start_timer(lapic, 100, periodic=True, now_ns=0)
    assert lapic.advance(1050) == 10
    delivered = 0
    while lapic.pending_vector() == 0x40:
        assert lapic.ack() == 0x40
        delivered += 1
        lapic.eoi()
    assert delivered == 10
    assert lapic.counters.timer_reinjected == 9
    assert lapic.save().timer_missed == 0
    # the debt survives save/restore
    again, _ = make_lapic()
    start_timer(again, 100, periodic=True, now_ns=0)
    again.advance(350)
    state = again.save()
    assert state.timer_missed == 2
    restored, _ = make_lapic()
    restored.restore(state)
    assert restored.save() == state


def test_recipe_a_new_lapic_register_is_two_entries_in_vlapic_py(monkeypatch):
    """README "How do I add a LAPIC feature": a plainly stored register is legal in
    `_LEGAL_REGISTERS` and writable in `_WRITE_MASK` (hypervisor/hvm/vlapic.py); it then
    reads back, lives in the register page and so travels in State and LAPIC_REGS."""
    from hypervisor.hvm import vlapic

    scratch = 0x3F0  # reserved on a real xAPIC: illegal until registered
    before = VLapic(0, lambda *_: None)
    before.mmio_write(scratch, 4, 0x1234)
    assert before.mmio_read(REG_ESR, 4) == 0  # not yet latched...
    before.mmio_write(REG_ESR, 4, 0)
    assert before.mmio_read(REG_ESR, 4) & 0x80  # ...illegal register address

    monkeypatch.setattr(vlapic, "_LEGAL_REGISTERS", vlapic._LEGAL_REGISTERS | {scratch})
    monkeypatch.setitem(vlapic._WRITE_MASK, scratch, 0xFF)
    lapic = VLapic(0, lambda *_: None)
    lapic.mmio_write(scratch, 4, 0x1234)
    assert lapic.mmio_read(scratch, 4) == 0x34  # only the writable bits
    copy = VLapic(0, lambda *_: None)
    copy.restore(lapic.save())
    assert copy.mmio_read(scratch, 4) == 0x34
    regs = lapic.hvm_lapic_regs_record()
    assert struct.unpack_from("<I", regs, scratch)[0] == 0x34
    lapic.mmio_write(REG_ESR, 4, 0)
    assert lapic.mmio_read(REG_ESR, 4) == 0  # no error this time
