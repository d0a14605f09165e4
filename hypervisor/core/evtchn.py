"""Event channels, Xen's 2-level ABI, as a pure state machine.

The port table is hypervisor state (`State`); the pending and mask bitmaps
and each vCPU's `evtchn_upcall_pending` / `evtchn_pending_sel` live in the
domain's shared_info page, which this model reads and writes through a numpy
view, exactly where the guest looks. An event sent while the target vCPU is
not running stays pending there; the scheduler learns of it through `kick`.
No unicorn here: the model is tested without a CPU.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from hypervisor.lib.errno import EEXIST, EINVAL, ENOENT, ENOSPC, ENOSYS, ESRCH

# event_channel_op commands (public/event_channel.h)
EVTCHNOP_BIND_INTERDOMAIN = 0
EVTCHNOP_BIND_VIRQ = 1
EVTCHNOP_CLOSE = 3
EVTCHNOP_SEND = 4
EVTCHNOP_ALLOC_UNBOUND = 6
EVTCHNOP_BIND_IPI = 7
EVTCHNOP_BIND_VCPU = 8
EVTCHNOP_UNMASK = 9

VIRQ_TIMER = 0
VIRQ_DEBUG = 1
VIRQ_XENOPROF = 7
VIRQ_XENPMU = 13
PER_VCPU_VIRQS = frozenset({VIRQ_TIMER, VIRQ_DEBUG, VIRQ_XENOPROF, VIRQ_XENPMU})
NR_VIRQS = 24
DOMID_SELF = 0x7FF0

# shared_info layout (x86-64)
VCPU_INFO_SIZE = 64
MAX_LEGACY_VCPUS = 32
EVTCHN_PENDING_OFFSET = 2048
EVTCHN_MASK_OFFSET = 2560
NR_PORTS = 64 * 64  # 2-level ABI: 64 words of 64 bits

FREE, UNBOUND, INTERDOMAIN, VIRQ, IPI = "free", "unbound", "interdomain", "virq", "ipi"


@dataclass(frozen=True)
class Port:
    state: str = FREE
    notify_vcpu: int = 0
    remote_dom: int = -1  # unbound: who may bind; interdomain: the peer
    remote_port: int = 0
    virq: int = -1


@dataclass
class EventChannelState:
    """Everything the port table holds (pending bits live in shared_info)."""

    ports: dict[int, Port] = field(default_factory=dict)
    virq_ports: dict[tuple[int, int], int] = field(default_factory=dict)  # (vcpu, virq) -> port
    sent: int = 0
    raised: int = 0


class SharedInfoBits:
    """The event bits of one shared_info page, read and written in place."""

    def __init__(self, page_u8: np.ndarray) -> None:
        self.u8 = page_u8
        self.u64 = page_u8.view(np.uint64)
        self._moved: dict[int, np.ndarray] = {}  # vCPU -> its registered vcpu_info

    def _bit(self, base_word: int, port: int) -> tuple[int, int]:
        return base_word + port // 64, 1 << (port % 64)

    def test_and_set(self, base_word: int, port: int) -> bool:
        word, bit = self._bit(base_word, port)
        old = int(self.u64[word])
        self.u64[word] = np.uint64(old | bit)
        return bool(old & bit)

    def test_and_clear(self, base_word: int, port: int) -> bool:
        word, bit = self._bit(base_word, port)
        old = int(self.u64[word])
        self.u64[word] = np.uint64(old & ~bit)
        return bool(old & bit)

    def test(self, base_word: int, port: int) -> bool:
        word, bit = self._bit(base_word, port)
        return bool(int(self.u64[word]) & bit)

    PENDING = EVTCHN_PENDING_OFFSET // 8
    MASK = EVTCHN_MASK_OFFSET // 8

    def relocate_vcpu_info(self, vcpu: int, view: np.ndarray) -> None:
        """VCPUOP_register_vcpu_info: from now on the vCPU's vcpu_info is `view`
        (64 bytes of a guest frame) instead of its slot in shared_info."""
        view[:] = self.vcpu_info(vcpu)
        self._moved[vcpu] = view

    def vcpu_info(self, vcpu: int) -> np.ndarray:
        """The 64 bytes of the vCPU's vcpu_info, wherever the guest put them."""
        view = self._moved.get(vcpu)
        return view if view is not None else self.u8[VCPU_INFO_SIZE * vcpu:
                                                      VCPU_INFO_SIZE * (vcpu + 1)]

    def test_and_set_sel(self, vcpu: int, bit: int) -> bool:
        """evtchn_pending_sel: test and set one bit."""
        sel = self.vcpu_info(vcpu)[8:16].view(np.uint64)
        old = int(sel[0])
        sel[0] = np.uint64(old | (1 << bit))
        return bool(old >> bit & 1)

    def upcall_pending(self, vcpu: int) -> bool:
        return bool(self.vcpu_info(vcpu)[0])

    def set_upcall_pending(self, vcpu: int, value: bool) -> None:
        self.vcpu_info(vcpu)[0] = 1 if value else 0

    def upcall_mask(self, vcpu: int) -> bool:
        return bool(self.vcpu_info(vcpu)[1])

    def set_upcall_mask(self, vcpu: int, value: bool) -> None:
        self.vcpu_info(vcpu)[1] = 1 if value else 0


class EventChannels:
    """One domain's event channels."""

    def __init__(
        self,
        domid: int,
        nr_vcpus: int,
        shared_info: np.ndarray,
        kick: Callable[[int], None],
        peer: Callable[[int], EventChannels | None],
        pollers: Callable[[int], None] | None = None,
    ) -> None:
        self.domid = domid
        self.nr_vcpus = nr_vcpus
        self.bits = SharedInfoBits(shared_info)
        self.kick = kick
        self.peer = peer
        # told of every port that becomes pending, masked or not (SCHEDOP_poll's wake-up)
        self.pollers = pollers
        self.state = EventChannelState()

    # ------------------------------------------------------------ save/restore
    def save(self) -> EventChannelState:
        return EventChannelState(dict(self.state.ports), dict(self.state.virq_ports),
                                 self.state.sent, self.state.raised)

    def restore(self, state: EventChannelState) -> None:
        self.state = EventChannelState(dict(state.ports), dict(state.virq_ports),
                                       state.sent, state.raised)

    # -------------------------------------------------------------- hypercall
    def op(self, cmd: int, arg: bytes, caller_vcpu: int) -> tuple[int, bytes | None]:
        """Run one event_channel_op; returns (rc, updated argument struct or None)."""
        handler = {
            EVTCHNOP_BIND_INTERDOMAIN: self._op_bind_interdomain,
            EVTCHNOP_BIND_VIRQ: self._op_bind_virq,
            EVTCHNOP_CLOSE: self._op_close,
            EVTCHNOP_SEND: self._op_send,
            EVTCHNOP_ALLOC_UNBOUND: self._op_alloc_unbound,
            EVTCHNOP_BIND_IPI: self._op_bind_ipi,
            EVTCHNOP_BIND_VCPU: self._op_bind_vcpu,
            EVTCHNOP_UNMASK: self._op_unmask,
        }.get(cmd)
        if handler is None:
            return -ENOSYS, None
        return handler(arg, caller_vcpu)

    ARG_SIZES = {EVTCHNOP_BIND_INTERDOMAIN: 12, EVTCHNOP_BIND_VIRQ: 12, EVTCHNOP_CLOSE: 4,
                 EVTCHNOP_SEND: 4, EVTCHNOP_ALLOC_UNBOUND: 8, EVTCHNOP_BIND_IPI: 8,
                 EVTCHNOP_BIND_VCPU: 8, EVTCHNOP_UNMASK: 4}

    def _op_bind_interdomain(self, arg: bytes, _v: int) -> tuple[int, bytes | None]:
        remote_dom, remote_port, _ = struct.unpack("<HxxII", arg)
        rc = self.bind_interdomain(remote_dom, remote_port)
        if rc < 0:
            return rc, None
        return 0, struct.pack("<HxxII", remote_dom, remote_port, rc)

    def _op_bind_virq(self, arg: bytes, _v: int) -> tuple[int, bytes | None]:
        virq, vcpu, _ = struct.unpack("<III", arg)
        rc = self.bind_virq(virq, vcpu)
        return (rc, None) if rc < 0 else (0, struct.pack("<III", virq, vcpu, rc))

    def _op_bind_ipi(self, arg: bytes, _v: int) -> tuple[int, bytes | None]:
        vcpu, _ = struct.unpack("<II", arg)
        rc = self.bind_ipi(vcpu)
        return (rc, None) if rc < 0 else (0, struct.pack("<II", vcpu, rc))

    def _op_bind_vcpu(self, arg: bytes, _v: int) -> tuple[int, bytes | None]:
        port, vcpu = struct.unpack("<II", arg)
        return self.bind_vcpu(port, vcpu), None

    def _op_alloc_unbound(self, arg: bytes, _v: int) -> tuple[int, bytes | None]:
        dom, remote_dom, _ = struct.unpack("<HHI", arg)
        if dom not in (DOMID_SELF, self.domid):
            return -ESRCH, None  # only a privileged domain may allocate for others
        if remote_dom == DOMID_SELF:
            remote_dom = self.domid
        rc = self.alloc_unbound(remote_dom)
        return (rc, None) if rc < 0 else (0, struct.pack("<HHI", dom, remote_dom, rc))

    def _op_close(self, arg: bytes, _v: int) -> tuple[int, bytes | None]:
        return self.close(struct.unpack("<I", arg)[0]), None

    def _op_send(self, arg: bytes, _v: int) -> tuple[int, bytes | None]:
        return self.send(struct.unpack("<I", arg)[0]), None

    def _op_unmask(self, arg: bytes, _v: int) -> tuple[int, bytes | None]:
        return self.unmask(struct.unpack("<I", arg)[0]), None

    # ------------------------------------------------------------ operations
    def _get_free_port(self) -> int:
        for port in range(1, NR_PORTS):  # port 0 is never handed out, as in Xen
            if self.state.ports.get(port, Port()).state == FREE:
                return port
        return -ENOSPC

    def _valid(self, port: int) -> bool:
        return 0 < port < NR_PORTS and self.state.ports.get(port, Port()).state != FREE

    def alloc_unbound(self, remote_dom: int) -> int:
        port = self._get_free_port()
        if port < 0:
            return port
        self.state.ports[port] = Port(UNBOUND, remote_dom=remote_dom)
        return port

    def bind_interdomain(self, remote_dom: int, remote_port: int) -> int:
        if remote_dom == DOMID_SELF:
            remote_dom = self.domid
        remote = self if remote_dom == self.domid else self.peer(remote_dom)
        if remote is None:
            return -ESRCH
        rport = remote.state.ports.get(remote_port, Port())
        if not (0 < remote_port < NR_PORTS) or rport.state != UNBOUND:
            return -EINVAL
        if rport.remote_dom != self.domid:
            return -EINVAL
        port = self._get_free_port()
        if port < 0:
            return port
        self.state.ports[port] = Port(INTERDOMAIN, remote_dom=remote_dom, remote_port=remote_port)
        remote.state.ports[remote_port] = replace(rport, state=INTERDOMAIN,
                                                  remote_dom=self.domid, remote_port=port)
        # Xen raises the local port so the binder learns the peer may have sent already
        self.set_pending(port)
        return port

    def bind_virq(self, virq: int, vcpu: int) -> int:
        if not (0 <= virq < NR_VIRQS) or not (0 <= vcpu < self.nr_vcpus):
            return -EINVAL
        if virq not in PER_VCPU_VIRQS and vcpu != 0:
            return -EINVAL  # a global VIRQ is bound on vCPU 0 (then moved by bind_vcpu)
        if (vcpu, virq) in self.state.virq_ports:
            return -EEXIST
        port = self._get_free_port()
        if port < 0:
            return port
        self.state.ports[port] = Port(VIRQ, notify_vcpu=vcpu, virq=virq)
        self.state.virq_ports[(vcpu, virq)] = port
        return port

    def bind_ipi(self, vcpu: int) -> int:
        if not (0 <= vcpu < self.nr_vcpus):
            return -EINVAL
        port = self._get_free_port()
        if port < 0:
            return port
        self.state.ports[port] = Port(IPI, notify_vcpu=vcpu)
        return port

    def bind_vcpu(self, port: int, vcpu: int) -> int:
        """Xen's evtchn_bind_vcpu: which vCPU a port notifies (unbound, interdomain and
        global-VIRQ ports only; IPIs and per-vCPU VIRQs stay where they were bound)."""
        if not 0 <= vcpu < self.nr_vcpus:
            return -ENOENT
        if not self._valid(port):
            return -EINVAL
        p = self.state.ports[port]
        if p.state in (UNBOUND, INTERDOMAIN) or (p.state == VIRQ
                                                  and p.virq not in PER_VCPU_VIRQS):
            # a global VIRQ stays vCPU 0's to raise (Xen's virq_to_evtchn); it notifies `vcpu`
            self.state.ports[port] = replace(p, notify_vcpu=vcpu)
            return 0
        return -EINVAL

    def close(self, port: int) -> int:
        if not self._valid(port):
            return -EINVAL
        p = self.state.ports[port]
        if p.state == VIRQ:
            del self.state.virq_ports[(p.notify_vcpu if p.virq in PER_VCPU_VIRQS else 0, p.virq)]
        elif p.state == INTERDOMAIN:
            remote = self if p.remote_dom == self.domid else self.peer(p.remote_dom)
            if remote is not None:
                rp = remote.state.ports.get(p.remote_port)
                if rp is not None and rp.state == INTERDOMAIN:
                    remote.state.ports[p.remote_port] = Port(UNBOUND, remote_dom=self.domid)
        del self.state.ports[port]
        # a closed port's stale pending bit must not fire on its next user
        self.bits.test_and_clear(SharedInfoBits.PENDING, port)
        return 0

    def send(self, port: int) -> int:
        if not self._valid(port):
            return -EINVAL
        p = self.state.ports[port]
        self.state.sent += 1
        if p.state == INTERDOMAIN:
            remote = self if p.remote_dom == self.domid else self.peer(p.remote_dom)
            if remote is not None:
                remote.set_pending(p.remote_port)
        elif p.state == IPI:
            self.set_pending(port)
        # sends on unbound or virq ports are dropped, as Xen does
        return 0

    def raise_virq(self, vcpu: int, virq: int) -> bool:
        """Hypervisor-raised virtual IRQ; False when the guest never bound it."""
        port = self.state.virq_ports.get((vcpu, virq))
        if port is None:
            return False
        self.set_pending(port)
        return True

    def unmask(self, port: int) -> int:
        if not self._valid(port):
            return -EINVAL
        b = self.bits
        vcpu = self.state.ports[port].notify_vcpu
        if (b.test_and_clear(b.MASK, port) and b.test(b.PENDING, port)
                and not b.test_and_set_sel(vcpu, port // 64)):
            self._mark_events_pending(vcpu)
        return 0

    def set_pending(self, port: int) -> None:
        """Xen's 2-level evtchn_set_pending."""
        b = self.bits
        self.state.raised += 1
        vcpu = self.state.ports.get(port, Port()).notify_vcpu
        if b.test_and_set(b.PENDING, port):
            return
        if not b.test(b.MASK, port) and not b.test_and_set_sel(vcpu, port // 64):
            self._mark_events_pending(vcpu)
        if self.pollers is not None:
            self.pollers(port)

    def _mark_events_pending(self, vcpu: int) -> None:
        self.bits.set_upcall_pending(vcpu, True)
        self.kick(vcpu)

    # ---------------------------------------------------------------- queries
    def upcall_deliverable(self, vcpu: int) -> bool:
        return self.bits.upcall_pending(vcpu) and not self.bits.upcall_mask(vcpu)

    def port_info(self, port: int) -> Port:
        return self.state.ports.get(port, Port())
