"""The hypercall table: Xen's numbers, arguments in rdi, rsi, rdx, r10, r8.

Each handler takes (hypervisor, vcpu, *args) and returns the value for rax
(negative errno on failure). Handlers that change how the vCPU is scheduled
(block, yield, shutdown) only change its state; the scheduler acts on it.
Guest pointers are read and written through the vCPU's own translation, so a
bad pointer is -EFAULT, never a hypervisor crash.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from hypervisor.core.evtchn import EventChannels
from hypervisor.core.vcpu import BLOCKED, DOWN, RUNNABLE, TrapEntry, Vcpu
from hypervisor.lib.errno import EEXIST, EFAULT, EINVAL, ENOENT, ENOSYS
from hypervisor.pv.mmu_ops import FlushKind, TlbFlush, do_mmu_update, do_mmuext_op
from hypervisor.stream.vcpu_context import VcpuGuestContext

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
MAX_MMU_REQUESTS = 1 << 16
MMU_UPDATE_SIZE = 16  # {u64 ptr; u64 val}
MMUEXT_OP_SIZE = 24  # {u32 cmd; u32 pad; u64 arg1; u64 arg2}
MAX_TRAP_ENTRIES = 256
TRAP_INFO_SIZE = 16


class GuestAccessError(Exception):
    """A guest pointer given to a hypercall is not mapped as needed."""


Handler = Callable[..., int]


def set_trap_table(hv: Hypervisor, v: Vcpu, table: int, *_: int) -> int:
    if table == 0:
        v.trap_table.clear()
        return 0
    entries: dict[int, TrapEntry] = {}
    for i in range(MAX_TRAP_ENTRIES + 1):
        vector, flags, cs, _pad, address = struct.unpack(
            "<BBHIQ", hv.copy_from_guest(v, table + TRAP_INFO_SIZE * i, TRAP_INFO_SIZE))
        if address == 0:
            break
        entries[vector] = TrapEntry(vector, flags, cs, address)
    else:
        return -EINVAL
    v.trap_table.update(entries)
    return 0


def set_callbacks(hv: Hypervisor, v: Vcpu, event: int, failsafe: int, syscall: int,
                  *_: int) -> int:
    v.event_callback, v.failsafe_callback, v.syscall_callback = event, failsafe, syscall
    return 0


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


def vcpu_op(hv: Hypervisor, v: Vcpu, cmd: int, vcpu_id: int, arg: int, *_: int) -> int:
    dom = v.domain
    if not 0 <= vcpu_id < len(dom.vcpus):
        return -ENOENT
    target = dom.vcpus[vcpu_id]
    if cmd == VCPUOP_INITIALISE:
        if target.context is not None:
            return -EEXIST  # Xen refuses to initialise a vCPU twice
        ctx = VcpuGuestContext.unpack(hv.copy_from_guest(v, arg, VcpuGuestContext.SIZE))
        return hv.initialise_vcpu(target, ctx)
    if cmd == VCPUOP_UP:
        if target.context is None:
            return -EINVAL
        if target.runstate == DOWN:
            target.runstate = RUNNABLE
        return 0
    if cmd == VCPUOP_DOWN:
        target.runstate = DOWN
        if target is v:
            v.yield_requested = True
        return 0
    if cmd == VCPUOP_IS_UP:
        return int(target.runstate != DOWN)
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


class VcpuMmuContext:
    """What the PV MMU hypercalls (hypervisor/pv/mmu_ops.py) need, for the calling vCPU.

    Hypercalls are atomic in virtual time in hvlab, so they are never
    preempted (`hypercall_preempt_check` is always False).
    """

    def __init__(self, hv: Hypervisor, v: Vcpu) -> None:
        self.hv, self.v = hv, v
        self.domid = v.domain.domid
        self.frames = hv.frame_table
        self.mem = hv.memory.u64
        self.m2p = hv.m2p
        self.writable_mapping = hv.seams.writable_mapping  # None: Xen's rule

    def get_cr3(self) -> int:
        return self.v.roots.kernel_ma >> 12

    def set_cr3(self, mfn: int) -> None:
        self.hv.set_base_pointer(self.v, mfn << 12)

    def get_user_cr3(self) -> int:
        return self.v.roots.user_ma >> 12

    def set_user_cr3(self, mfn: int) -> None:
        self.v.roots.user_ma = mfn << 12

    def flush_tlb(self, flush: TlbFlush) -> None:
        if flush.kind == FlushKind.LOCAL:
            self.hv.pcpus[self.v.pcpu].flush_tlb()
        else:  # MULTI and ALL: every pCPU that may hold the domain's translations
            for cpu in self.hv.pcpus:
                cpu.flush_tlb()

    def hypercall_preempt_check(self) -> bool:
        return False

    def domain_exists(self, domid: int) -> bool:
        return 0 <= domid < len(self.hv.domains)


def _mmu_batch(hv: Hypervisor, v: Vcpu, ptr: int, count: int, done_ptr: int, foreigndom: int,
               size: int, run) -> int:
    if count > MAX_MMU_REQUESTS:
        return -EINVAL
    raw = hv.copy_from_guest(v, ptr, count * size)
    requests = np.frombuffer(raw, dtype=np.uint64).reshape(count, size // 8)
    hv.before_page_table_hypercall(v.domain)
    rc, done = run(VcpuMmuContext(hv, v), requests, foreigndom & 0xFFFF_FFFF)
    # Entries may have changed: no vCPU of the domain may keep walks cached
    # from before (the guest's own flush may be a native mov cr3, unseen).
    for u in v.domain.vcpus:
        flush = getattr(u.mmu, "flush", None)
        if flush is not None:
            flush()
    if done_ptr:
        hv.copy_to_guest(v, done_ptr, struct.pack("<I", done))
    return rc


def mmu_update(hv: Hypervisor, v: Vcpu, reqs: int, count: int, done: int, foreigndom: int,
               *_: int) -> int:
    return _mmu_batch(hv, v, reqs, count, done, foreigndom, MMU_UPDATE_SIZE, do_mmu_update)


def mmuext_op(hv: Hypervisor, v: Vcpu, ops: int, count: int, done: int, foreigndom: int,
              *_: int) -> int:
    return _mmu_batch(hv, v, ops, count, done, foreigndom, MMUEXT_OP_SIZE, do_mmuext_op)


def _evtchn(v: Vcpu) -> EventChannels:
    return v.domain.events


TABLE: dict[int, tuple[str, Handler]] = {
    HYPERVISOR_SET_TRAP_TABLE: ("set_trap_table", set_trap_table),
    HYPERVISOR_MMU_UPDATE: ("mmu_update", mmu_update),
    HYPERVISOR_MMUEXT_OP: ("mmuext_op", mmuext_op),
    HYPERVISOR_SET_CALLBACKS: ("set_callbacks", set_callbacks),
    HYPERVISOR_SET_TIMER_OP: ("set_timer_op", set_timer_op),
    HYPERVISOR_XEN_VERSION: ("xen_version", xen_version),
    HYPERVISOR_CONSOLE_IO: ("console_io", console_io),
    HYPERVISOR_VCPU_OP: ("vcpu_op", vcpu_op),
    HYPERVISOR_SCHED_OP: ("sched_op", sched_op),
    HYPERVISOR_EVENT_CHANNEL_OP: ("event_channel_op", event_channel_op),
}


def call(hv: Hypervisor, v: Vcpu, number: int, args: tuple[int, ...]) -> int:
    entry = TABLE.get(number)
    if entry is None:
        return -ENOSYS
    try:
        return entry[1](hv, v, *args)
    except GuestAccessError:
        return -EFAULT
