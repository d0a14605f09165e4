"""Periodic interrupt source posting into a posted-interrupt descriptor."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emulator.irqsource import InterruptSource, InterruptSourceError
from emulator.posted import PostedInterruptDescriptor


def make_pid() -> PostedInterruptDescriptor:
    pid = PostedInterruptDescriptor(np.zeros(64, dtype=np.uint8))
    pid.nv, pid.ndst = 0xF2, 5 << 8
    return pid


def test_counts_every_due_occurrence_and_coalesces():
    pid = make_pid()
    sent: list[tuple[int, int]] = []
    src = InterruptSource(
        "nic",
        pid,
        0x41,
        period_ns=100,
        start_ns=1000,
        notify=lambda ndst, nv: sent.append((ndst, nv)),
    )
    assert src.next_deadline_ns() == 1000
    assert src.advance(999) == 0 and not pid.pending()
    assert src.advance(1000) == 1
    assert (src.posted, src.coalesced, sent) == (1, 0, [(5 << 8, 0xF2)])
    assert src.advance(1350) == 3  # 1100, 1200, 1300 while the first is still in PIR
    assert (src.posted, src.coalesced, src.notifications) == (4, 3, 1)
    assert src.next_deadline_ns() == 1400
    assert pid.take_pir() == [0x41]
    assert src.advance(1400) == 1
    assert (src.posted, src.coalesced, src.notifications) == (5, 3, 2)
    assert src.counters() == {"posted": 5, "coalesced": 3, "notifications": 2}


def test_posts_while_notifications_suppressed():
    pid = make_pid()
    pid.sn = True  # vCPU descheduled / no hypervisor: the PIR still collects
    src = InterruptSource("timer", pid, 0x30, period_ns=10)
    src.advance(95)
    assert pid.pending() and not pid.on
    assert (src.posted, src.coalesced, src.notifications) == (10, 9, 0)


@settings(max_examples=150, deadline=None)
@given(
    start=st.integers(0, 10_000),
    period=st.integers(1, 5_000),
    steps=st.lists(st.tuples(st.integers(0, 20_000), st.booleans()), max_size=20),
)
def test_exact_count_and_restore_continues_identically(start, period, steps):
    pid_a = make_pid()
    a = InterruptSource("src", pid_a, 0x60, period, start)
    twin: tuple[InterruptSource, PostedInterruptDescriptor] | None = None
    now = 0
    for i, (delta, take) in enumerate(steps):
        if i == len(steps) // 2:
            # Clone mid-run: a copy of the descriptor memory plus a restored source.
            pid_b = PostedInterruptDescriptor(np.frombuffer(pid_a.raw(), np.uint8).copy())
            b = InterruptSource("other", pid_b, 0x99, 7)
            b.restore(a.save())
            twin = (b, pid_b)
        now += delta
        for src in (a, twin[0]) if twin else (a,):
            src.advance(now)
            if take:
                src.descriptor.take_pir()
        expected = (now - start) // period + 1 if now >= start else 0
        assert a.posted == expected
        assert a.next_deadline_ns() == start + expected * period
        assert a.coalesced <= a.posted
        if twin:
            assert twin[0].save() == a.save()
            assert twin[1].raw() == pid_a.raw()


def test_restore_after_live_update_blackout():
    pid = make_pid()
    src = InterruptSource("src", pid, 0x50, period_ns=1_000)
    src.advance(2_500)
    state = src.save()
    src.advance(10_000)
    replay = InterruptSource("src", pid, 0x50, period_ns=1_000)
    replay.restore(state)
    replay.advance(10_000)
    assert replay.save() == src.save()


def test_bad_parameters_and_time_rejected():
    pid = make_pid()
    for kwargs in ({"vector": 256}, {"period_ns": 0}, {"start_ns": -1}, {"name": ""}):
        args: dict[str, Any] = {"name": "s", "vector": 0x40, "period_ns": 10, "start_ns": 0}
        args |= kwargs
        with pytest.raises(InterruptSourceError):
            InterruptSource(descriptor=pid, **args)
    with pytest.raises(InterruptSourceError):
        InterruptSource("s", "not a descriptor", 0x40, 10)  # type: ignore[arg-type]
    src = InterruptSource("s", pid, 0x40, 10)
    src.advance(50)
    before = src.save()
    with pytest.raises(InterruptSourceError, match="backwards"):
        src.advance(49)
    with pytest.raises(InterruptSourceError):
        src.restore("nope")  # type: ignore[arg-type]
    import dataclasses

    with pytest.raises(InterruptSourceError):
        src.restore(dataclasses.replace(before, period_ns=-5))
    assert src.save() == before
