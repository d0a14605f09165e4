"""PV hypercalls the PV table (hypervisor/pv/xen/hypercalls.py) takes from here:
set_trap_table and the PV MMU's mmu_update and
mmuext_op, whose semantics are in `hypervisor/pv/mmu_ops.py`; here they are
decoded from the guest's request arrays and given the calling vCPU's MMU
context.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import numpy as np

from hypervisor.core.vcpu import TrapEntry, Vcpu
from hypervisor.lib.errno import EINVAL
from hypervisor.pv.mmu_ops import FlushKind, TlbFlush, do_mmu_update, do_mmuext_op
from hypervisor.pv.vcpu import finish_pending_typing, set_base_pointer

if TYPE_CHECKING:
    from hypervisor.core.hypervisor import Hypervisor

MAX_MMU_REQUESTS = 1 << 16
MMU_UPDATE_SIZE = 16  # {u64 ptr; u64 val}
MMUEXT_OP_SIZE = 24  # {u32 cmd; u32 pad; u64 arg1; u64 arg2}
MAX_TRAP_ENTRIES = 256
TRAP_INFO_SIZE = 16


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
        set_base_pointer(self.hv, self.v, mfn << 12)

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


def forget_cached_walks(dom) -> None:
    """After a page-table hypercall: entries may have changed, so no vCPU of the domain
    may keep walks cached from before (the guest's own flush may never be seen)."""
    for u in dom.vcpus:
        flush = getattr(u.mmu, "flush", None)
        if flush is not None:
            flush()


def _mmu_batch(hv: Hypervisor, v: Vcpu, ptr: int, count: int, done_ptr: int, foreigndom: int,
               size: int, run) -> int:
    if count > MAX_MMU_REQUESTS:
        return -EINVAL
    raw = hv.copy_from_guest(v, ptr, count * size)
    requests = np.frombuffer(raw, dtype=np.uint64).reshape(count, size // 8)
    finish_pending_typing(v.domain)
    rc, done = run(VcpuMmuContext(hv, v), requests, foreigndom & 0xFFFF_FFFF)
    forget_cached_walks(v.domain)
    if done_ptr:
        hv.copy_to_guest(v, done_ptr, struct.pack("<I", done))
    return rc


def mmu_update(hv: Hypervisor, v: Vcpu, reqs: int, count: int, done: int, foreigndom: int,
               *_: int) -> int:
    return _mmu_batch(hv, v, reqs, count, done, foreigndom, MMU_UPDATE_SIZE, do_mmu_update)


def mmuext_op(hv: Hypervisor, v: Vcpu, ops: int, count: int, done: int, foreigndom: int,
              *_: int) -> int:
    return _mmu_batch(hv, v, ops, count, done, foreigndom, MMUEXT_OP_SIZE, do_mmuext_op)
