"""Event channels as a pure state machine (no CPU): Xen's 2-level semantics."""

from __future__ import annotations

import struct

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from hypervisor.core.evtchn import (
    DOMID_SELF,
    EVTCHNOP_ALLOC_UNBOUND,
    EVTCHNOP_BIND_IPI,
    EVTCHNOP_SEND,
    VIRQ_TIMER,
    EventChannels,
    SharedInfoBits,
)
from hypervisor.lib.errno import EEXIST, EINVAL, ESRCH


class World:
    """Two domains with two vCPUs each, recording every kick."""

    def __init__(self) -> None:
        self.pages = [np.zeros(4096, np.uint8) for _ in range(2)]
        self.kicks: list[tuple[int, int]] = []
        self.doms = [
            EventChannels(d, 2, self.pages[d], kick=lambda v, d=d: self.kicks.append((d, v)),
                          peer=self.peer)
            for d in range(2)
        ]

    def peer(self, domid: int):
        return self.doms[domid] if 0 <= domid < 2 else None


def pending(ev: EventChannels, port: int) -> bool:
    return ev.bits.test(SharedInfoBits.PENDING, port)


def test_ipi_sets_pending_selector_and_upcall_and_kicks_the_bound_vcpu():
    w = World()
    ev = w.doms[0]
    port = ev.bind_ipi(1)
    assert port == 1  # port 0 is never handed out
    assert ev.send(port) == 0
    assert pending(ev, port)
    assert ev.bits.upcall_pending(1) and not ev.bits.upcall_pending(0)
    assert int(ev.bits.vcpu_info(1)[8:16].view(np.uint64)[0]) == 1
    assert w.kicks == [(0, 1)]
    # a second send while pending coalesces: no second kick, as in Xen
    ev.send(port)
    assert w.kicks == [(0, 1)]


def test_masked_port_stays_pending_and_unmask_delivers():
    w = World()
    ev = w.doms[0]
    port = ev.bind_ipi(0)
    ev.bits.test_and_set(SharedInfoBits.MASK, port)
    ev.send(port)
    assert pending(ev, port) and not ev.bits.upcall_pending(0) and w.kicks == []
    assert ev.unmask(port) == 0
    assert ev.bits.upcall_pending(0) and w.kicks == [(0, 0)]


def test_virq_binding_rules_and_raise():
    w = World()
    ev = w.doms[0]
    port = ev.bind_virq(VIRQ_TIMER, 1)
    assert port > 0
    assert ev.bind_virq(VIRQ_TIMER, 1) == -EEXIST
    assert ev.bind_virq(VIRQ_TIMER, 5) == -EINVAL
    assert ev.raise_virq(1, VIRQ_TIMER) and pending(ev, port)
    assert not ev.raise_virq(0, VIRQ_TIMER)  # never bound on vCPU 0
    assert ev.close(port) == 0
    assert not pending(ev, port)  # closing clears the stale bit
    assert ev.bind_virq(VIRQ_TIMER, 1) > 0


def test_interdomain_binding_and_send_both_ways():
    w = World()
    a, b = w.doms
    unbound = b.alloc_unbound(0)
    assert a.bind_interdomain(1, unbound + 7) == -EINVAL  # not an unbound port
    assert a.bind_interdomain(7, unbound) == -ESRCH
    local = a.bind_interdomain(1, unbound)
    assert local > 0 and pending(a, local)  # Xen raises the binder's port
    a.bits.test_and_clear(SharedInfoBits.PENDING, local)
    a.send(local)
    assert pending(b, unbound)
    b.send(unbound)
    assert pending(a, local)
    a.close(local)
    assert b.port_info(unbound).state == "unbound"  # the peer goes back to unbound


def test_hypercall_structs_round_trip():
    w = World()
    ev = w.doms[0]
    rc, out = ev.op(EVTCHNOP_BIND_IPI, struct.pack("<II", 1, 0), 0)
    assert rc == 0 and struct.unpack("<II", out) == (1, 1)
    rc, out = ev.op(EVTCHNOP_ALLOC_UNBOUND, struct.pack("<HHI", DOMID_SELF, 1, 0), 0)
    assert rc == 0 and struct.unpack("<HHI", out)[2] == 2
    rc, _ = ev.op(EVTCHNOP_SEND, struct.pack("<I", 99), 0)
    assert rc == -EINVAL


def test_save_and_restore_keep_the_port_table():
    w = World()
    ev = w.doms[0]
    ev.bind_ipi(0)
    ev.bind_virq(VIRQ_TIMER, 1)
    state = ev.save()
    ev.close(1)
    ev.restore(state)
    assert ev.port_info(1).state == "ipi" and ev.state.virq_ports == {(1, VIRQ_TIMER): 2}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["send", "unmask", "mask", "handle"]),
                          st.integers(0, 3)), max_size=60))
def test_no_event_is_lost_or_invented(ops):
    """Model: each port is pending iff sent since the guest last handled it."""
    w = World()
    ev = w.doms[0]
    ports = [ev.bind_ipi(i % 2) for i in range(4)]
    sent_since_handled = [False] * 4
    for op, i in ops:
        port = ports[i]
        if op == "send":
            ev.send(port)
            sent_since_handled[i] = True
        elif op == "mask":
            ev.bits.test_and_set(SharedInfoBits.MASK, port)
        elif op == "unmask":
            ev.unmask(port)
        else:  # the guest handles the port: clears its pending bit
            if ev.bits.test_and_clear(SharedInfoBits.PENDING, port):
                assert sent_since_handled[i]
            sent_since_handled[i] = False
        for j, p in enumerate(ports):
            assert pending(ev, p) == sent_since_handled[j]
            unmasked = not ev.bits.test(SharedInfoBits.MASK, p)
            if pending(ev, p) and unmasked:
                # an unmasked pending port is always visible through its vCPU's upcall flag
                assert ev.bits.upcall_pending(j % 2)
