"""The posted-interrupt descriptor: exact bit positions in raw bytes, ON/SN semantics."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emulator.posted import DESCRIPTOR_SIZE, PostedInterruptDescriptor, PostedInterruptError


def make(offset: int = 64) -> tuple[np.ndarray, PostedInterruptDescriptor]:
    """A descriptor inside a larger 'host memory' buffer, to catch writes outside it."""
    memory = np.zeros(256, dtype=np.uint8)
    return memory, PostedInterruptDescriptor(memory[offset : offset + DESCRIPTOR_SIZE])


def test_pir_bit_positions_in_raw_bytes():
    memory, pid = make()
    for vector in (0, 7, 8, 63, 64, 200, 255):
        pid.post(vector)
        assert memory[64 + vector // 8] & (1 << (vector % 8))
    raw = pid.raw()
    assert raw[0] == 0b1000_0001 and raw[1] == 0x01 and raw[7] == 0x80 and raw[8] == 0x01
    assert raw[25] == 0x01 and raw[31] == 0x80
    assert raw[32] == 0x01  # ON = bit 256 = byte 32 bit 0
    assert pid.pir_bits() == sum(1 << v for v in (0, 7, 8, 63, 64, 200, 255))
    assert not memory[:64].any() and not memory[128:].any()


def test_control_field_positions():
    memory, pid = make(offset=0)
    pid.sn = True
    assert memory[32] == 0x02  # SN = bit 257
    pid.nv = 0xF2
    assert memory[34] == 0xF2  # NV = bits 279:272
    pid.ndst = 0x1234_5678
    assert memory[36:40].tobytes() == bytes.fromhex("78563412")  # NDST = bits 319:288
    assert memory[33] == 0 and memory[35] == 0 and not memory[40:].any()
    assert (pid.sn, pid.nv, pid.ndst, pid.on) == (True, 0xF2, 0x1234_5678, False)
    pid.sn = False
    assert memory[32] == 0


def test_on_notification_semantics():
    _, pid = make()
    assert pid.post(0x30) is True  # ON 0 -> 1: notify
    assert pid.on
    assert pid.post(0x31) is False  # notification outstanding
    assert pid.post(0x30) is False
    assert pid.take_pir() == [0x30, 0x31]
    assert not pid.on and not pid.pending()
    assert pid.post(0x40) is True


def test_sn_suppresses_on_but_keeps_pir():
    _, pid = make()
    pid.sn = True
    assert pid.post(0x50) is False
    assert not pid.on and pid.pending() and pid.is_posted(0x50)
    pid.sn = False
    assert pid.post(0x51) is True  # first post after SN cleared notifies


def test_take_pir_clears_only_pir_and_on():
    memory, pid = make(offset=0)
    pid.nv, pid.ndst, pid.sn = 0xF0, 3 << 8, False
    for v in (255, 17, 90):
        pid.post(v)
    assert pid.take_pir() == [17, 90, 255]
    assert not memory[:32].any()
    assert (pid.on, pid.nv, pid.ndst) == (False, 0xF0, 3 << 8)
    assert pid.take_pir() == []


def test_uint64_view_and_state_only_in_memory():
    words = np.zeros(8, dtype=np.uint64)
    pid = PostedInterruptDescriptor(words)
    pid.post(65)
    pid.nv = 0x22
    assert int(words[1]) == 1 << 1
    assert int(words[4]) == 1 | (0x22 << 16)
    again = PostedInterruptDescriptor(words.view(np.uint8))  # "after a live update"
    assert again.take_pir() == [65] and again.nv == 0x22


def test_bad_views_and_values_rejected():
    for view in (
        np.zeros(63, dtype=np.uint8),
        np.zeros(16, dtype=np.uint32),
        np.zeros(128, dtype=np.uint8)[::2],
        b"\0" * 64,
    ):
        with pytest.raises(PostedInterruptError):
            PostedInterruptDescriptor(view)  # type: ignore[arg-type]
    readonly = np.zeros(64, dtype=np.uint8)
    readonly.flags.writeable = False
    with pytest.raises(PostedInterruptError):
        PostedInterruptDescriptor(readonly)
    memory, pid = make()
    before = memory.copy()
    for call in (
        lambda: pid.post(256),
        lambda: pid.post(-1),
        lambda: setattr(pid, "nv", 300),
        lambda: setattr(pid, "ndst", 1 << 32),
    ):
        with pytest.raises(PostedInterruptError):
            call()
    assert (memory == before).all()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 255), max_size=40))
def test_take_pir_returns_exactly_the_posted_set(vectors):
    _, pid = make()
    notifications = [pid.post(v) for v in vectors]
    assert sum(notifications) == (1 if vectors else 0)
    assert pid.take_pir() == sorted(set(vectors))
    assert not pid.pending()
