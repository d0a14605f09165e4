"""Hypercalls: Xen's numbers, the table type, the call path and the handlers both kinds share.

A hypercall table maps a number to a `Hypercall` (name, handler); each domain kind has
its own (`hypervisor/pv/hypercalls.py`, `hypervisor/hvm/hypercalls.py`), as Xen has
`pv_hypercall_table` and `hvm_hypercall_table`, and its policy names it. Arguments come
in rdi, rsi, rdx, r10, r8. Each handler takes (hypervisor, vcpu, *args) and returns the
value for rax (negative errno on failure). Handlers that change how the vCPU is
scheduled (block, yield, shutdown) only change its state; the scheduler acts on it.
Guest pointers are read and written through the vCPU's own translation, so a bad
pointer is -EFAULT, never a hypervisor crash.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, NamedTuple

from hypervisor.core.evtchn import EventChannels
from hypervisor.core.vcpu import BLOCKED, Vcpu
from hypervisor.lib.errno import EFAULT, EINVAL, ENOSYS

if TYPE_CHECKING:
    from hypervisor.core.hypervisor import Hypervisor

HYPERVISOR_SET_TRAP_TABLE = 0
HYPERVISOR_MMU_UPDATE = 1
HYPERVISOR_SET_CALLBACKS = 4
HYPERVISOR_SET_TIMER_OP = 15
HYPERVISOR_XEN_VERSION = 17
HYPERVISOR_CONSOLE_IO = 18
HYPERVISOR_VCPU_OP = 24
HYPERVISOR_MMUEXT_OP = 26
HYPERVISOR_SCHED_OP = 29
HYPERVISOR_EVENT_CHANNEL_OP = 32

CONSOLEIO_WRITE, CONSOLEIO_READ = 0, 1
SCHEDOP_YIELD, SCHEDOP_BLOCK, SCHEDOP_SHUTDOWN, SCHEDOP_SHUTDOWN_CODE = 0, 1, 2, 5
VCPUOP_INITIALISE, VCPUOP_UP, VCPUOP_DOWN, VCPUOP_IS_UP = 0, 1, 2, 3
XENVER_VERSION, XENVER_EXTRAVERSION = 0, 1

MAX_CONSOLE_WRITE = 64 << 10


class GuestAccessError(Exception):
    """A guest pointer given to a hypercall is not mapped as needed."""


Handler = Callable[..., int]


def set_timer_op(hv: Hypervisor, v: Vcpu, deadline: int, *_: int) -> int:
    # the guest speaks its own time; the scheduler the hypervisor's
    v.timer_deadline_ns = deadline - v.domain.time_offset if deadline else None
    return 0


def xen_version(hv: Hypervisor, v: Vcpu, cmd: int, buf: int, *_: int) -> int:
    major, minor = hv.build_version
    if cmd == XENVER_VERSION:
        return (major << 16) | minor
    if cmd == XENVER_EXTRAVERSION:
        hv.copy_to_guest(v, buf, b".0-hvlab".ljust(16, b"\0"))
        return 0
    return -ENOSYS


def console_io(hv: Hypervisor, v: Vcpu, cmd: int, count: int, buf: int, *_: int) -> int:
    if cmd != CONSOLEIO_WRITE:
        return -ENOSYS  # guests have no console input in hvlab
    if count > MAX_CONSOLE_WRITE:
        return -EINVAL
    v.domain.console += hv.copy_from_guest(v, buf, count)
    return 0


def sched_op(hv: Hypervisor, v: Vcpu, cmd: int, arg: int, *_: int) -> int:
    if cmd == SCHEDOP_YIELD:
        v.yield_requested = True
        return 0
    if cmd == SCHEDOP_BLOCK:
        evtchn = _evtchn(v)
        evtchn.bits.set_upcall_mask(v.vcpu_id, False)  # Xen enables delivery first
        if not evtchn.bits.upcall_pending(v.vcpu_id):
            v.runstate = BLOCKED
        return 0
    if cmd in (SCHEDOP_SHUTDOWN, SCHEDOP_SHUTDOWN_CODE):
        reason, code = struct.unpack("<II", hv.copy_from_guest(v, arg, 8))
        if cmd == SCHEDOP_SHUTDOWN:
            hv.shutdown_domain(v.domain, reason, code)
        return 0
    return -ENOSYS


def event_channel_op(hv: Hypervisor, v: Vcpu, cmd: int, arg: int, *_: int) -> int:
    evtchn = _evtchn(v)
    size = EventChannels.ARG_SIZES.get(cmd)
    if size is None:
        return -ENOSYS
    rc, out = evtchn.op(cmd, hv.copy_from_guest(v, arg, size), v.vcpu_id)
    if out is not None:
        hv.copy_to_guest(v, arg, out)
    return rc


def _evtchn(v: Vcpu) -> EventChannels:
    return v.domain.events


class Hypercall(NamedTuple):
    name: str
    handler: Handler


HypercallTable = Mapping[int, Hypercall]

# What every kind of guest may call; a kind's table adds its own.
COMMON: dict[int, Hypercall] = {
    HYPERVISOR_SET_TIMER_OP: Hypercall("set_timer_op", set_timer_op),
    HYPERVISOR_XEN_VERSION: Hypercall("xen_version", xen_version),
    HYPERVISOR_CONSOLE_IO: Hypercall("console_io", console_io),
    HYPERVISOR_SCHED_OP: Hypercall("sched_op", sched_op),
    HYPERVISOR_EVENT_CHANNEL_OP: Hypercall("event_channel_op", event_channel_op),
}


def call(table: HypercallTable, hv: Hypervisor, v: Vcpu, number: int,
         args: tuple[int, ...]) -> int:
    """Run hypercall `number` from `table` for `v`; -ENOSYS when the table has none."""
    entry = table.get(number)
    if entry is None:
        return -ENOSYS
    try:
        return entry.handler(hv, v, *args)
    except GuestAccessError:
        return -EFAULT
