"""SCHEDOP_poll: block until one of some event channels is pending (Xen's do_poll).

Linux's paravirtual spinlocks wait this way (xen_qlock_wait polls the vCPU's
masked lock-kicker IPI port). The poll returns at once when an event is
already deliverable or a polled port is pending; otherwise the vCPU blocks
until a polled port becomes pending (masked or not: evtchn_check_pollers), any
event is marked pending for it (vcpu_kick), or the timeout (absolute system
time, 0 for none) passes. It always returns 0 once it has blocked.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from hypervisor.core.evtchn import NR_PORTS, SharedInfoBits
from hypervisor.core.vcpu import BLOCKED
from hypervisor.lib.errno import EINVAL

if TYPE_CHECKING:
    from hypervisor.core.domain import Domain
    from hypervisor.core.hypervisor import Hypervisor
    from hypervisor.core.vcpu import Vcpu

SCHED_POLL = struct.Struct("<QI4xQ")  # ports (guest pointer), nr_ports, timeout
MAX_POLL_PORTS = 128


def do_poll(hv: Hypervisor, v: Vcpu, arg: int) -> int:
    ports_ptr, nr_ports, timeout = SCHED_POLL.unpack(hv.copy_from_guest(v, arg, SCHED_POLL.size))
    if nr_ports > MAX_POLL_PORTS:
        return -EINVAL
    ports = struct.unpack(f"<{nr_ports}I", hv.copy_from_guest(v, ports_ptr, 4 * nr_ports))
    events = v.domain.events
    if events.upcall_deliverable(v.vcpu_id):
        return 0
    for port in ports:
        if not 0 < port < NR_PORTS or events.port_info(port).state == "free":
            return -EINVAL
        if events.bits.test(SharedInfoBits.PENDING, port):
            return 0
    now = hv.vcpu_time(v.domain) - v.domain.time_offset
    deadline = timeout - v.domain.time_offset if timeout else None
    if deadline is not None and deadline <= now:
        return 0
    x = v.xen
    x.poll_ports = frozenset(ports) if len(ports) == 1 else None  # None: any port
    x.polling = True
    x.poll_deadline_ns = deadline
    v.runstate = BLOCKED
    return 0


def wake_pollers(dom: Domain, port: int) -> None:
    """A port became pending: wake the vCPUs polling it (or polling several ports)."""
    for v in dom.vcpus:
        x = v.xen
        if x is not None and x.polling and (x.poll_ports is None or port in x.poll_ports):
            stop_polling(v)
            v.wake()


def stop_polling(v: Vcpu) -> None:
    x = v.xen
    x.polling, x.poll_ports, x.poll_deadline_ns = False, None, None
