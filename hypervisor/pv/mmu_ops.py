"""The PV MMU hypercalls: mmu_update (1) and mmuext_op (26).

Semantics follow do_mmu_update / do_mmuext_op in Xen's mm.c, on top of the
reference typing rules (`typerefs.PageTyping`). The hypervisor core decodes the
guest's request array (mmu_update: {u64 ptr, u64 val}; mmuext_op: {u32 cmd,
u64 arg1, u64 arg2} as three u64 words) and passes it here as numpy arrays or
lists of ints; the results are Xen's: (rc, done), rc 0 or a negative errno and
done the number of requests completed. -ERESTART means "preempted": the caller
re-issues the requests from `done` on (Xen's hypercall continuation), and a
preempted validation continues where it stopped.

Each request is one transaction: a refused request leaves the frame table as it
was (see `typerefs` for the one exception, a failed continuation).

MMU_NORMAL_PT_UPDATE on a validated page table of the domain checks the new
entry like a validation would (get_page_from_lNe), takes its references, writes
it and then drops the old entry's. As in Xen, on any other frame of the domain
that can be typed writable it is a plain 8-byte write (a page table that is not
in use, count 0, thereby becomes a writable page); anything else is -EINVAL.

TLB flushes go through the context's `flush_tlb`: explicit flush commands, the
CR3 switch of NEW_BASEPTR, and one flush of every pCPU that may run the domain
after a request that changed a frame's type (where Xen flushes in
_get_page_type, filtered by TLB-flush timestamps the model does not keep).
As in Xen, plain page-table updates do not flush: the guest flushes after them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

import numpy as np

from hypervisor.mm.builds import PageType
from hypervisor.mm.errors import (
    EACCES,
    EINTR,
    EINVAL,
    ENOSYS,
    EOPNOTSUPP,
    EPERM,
    ERESTART,
    ESRCH,
    MmError,
)
from hypervisor.mm.frametable import DOMID_SELF, FrameTable
from hypervisor.mm.pte import ENTRIES_PER_TABLE
from hypervisor.mm.typerefs import PageTyping

# mmu_update commands (low 3 bits of ptr).
MMU_NORMAL_PT_UPDATE = 0
MMU_MACHPHYS_UPDATE = 1
MMU_PT_UPDATE_PRESERVE_AD = 2
MMU_PT_UPDATE_NO_TRANSLATE = 3

# mmuext_op commands.
MMUEXT_PIN_L1_TABLE = 0
MMUEXT_PIN_L2_TABLE = 1
MMUEXT_PIN_L3_TABLE = 2
MMUEXT_PIN_L4_TABLE = 3
MMUEXT_UNPIN_TABLE = 4
MMUEXT_NEW_BASEPTR = 5
MMUEXT_TLB_FLUSH_LOCAL = 6
MMUEXT_INVLPG_LOCAL = 7
MMUEXT_TLB_FLUSH_MULTI = 8
MMUEXT_INVLPG_MULTI = 9
MMUEXT_TLB_FLUSH_ALL = 10
MMUEXT_INVLPG_ALL = 11
MMUEXT_FLUSH_CACHE = 12
MMUEXT_SET_LDT = 13
MMUEXT_NEW_USER_BASEPTR = 15
MMUEXT_CLEAR_PAGE = 16
MMUEXT_COPY_PAGE = 17
MMUEXT_FLUSH_CACHE_GLOBAL = 18
MMUEXT_MARK_SUPER = 19
MMUEXT_UNMARK_SUPER = 20


class PvMmuError(MmError):
    """The hypervisor passed a request array of the wrong shape or values."""


class FlushKind(Enum):
    LOCAL = "local"  # the calling vCPU's pCPU
    MULTI = "multi"  # the vCPUs in a guest bitmap
    ALL = "all"  # every pCPU that may hold the domain's translations


@dataclass(frozen=True)
class TlbFlush:
    """One TLB flush request.

    `va` None flushes everything, else the one page at `va` (invlpg). For MULTI,
    `vcpumask` is the guest address of the vCPU bitmap: the caller reads it
    (and, if it cannot, flushing every pCPU of the domain is a safe answer).
    """

    kind: FlushKind
    va: int | None = None
    vcpumask: int | None = None


class PvMmuContext(Protocol):
    """What the PV MMU hypercalls need from the hypervisor core (calling vCPU)."""

    domid: int
    frames: FrameTable
    mem: np.ndarray  # host memory, 1-D uint64
    m2p: np.ndarray  # machine-to-phys: mfn -> pfn

    def get_cr3(self) -> int:
        """MFN of the calling vCPU's kernel L4 (guest_table), 0 if none."""
        ...

    def set_cr3(self, mfn: int) -> None: ...

    def get_user_cr3(self) -> int:
        """MFN of the calling vCPU's user L4 (guest_table_user), 0 if none."""
        ...

    def set_user_cr3(self, mfn: int) -> None: ...

    def flush_tlb(self, flush: TlbFlush) -> None: ...

    def hypercall_preempt_check(self) -> bool:
        """True when the hypercall should stop and be continued later."""
        ...


def _requests(reqs: np.ndarray | Sequence[Sequence[int]], width: int, name: str) -> np.ndarray:
    try:
        arr = np.asarray(reqs, dtype=np.uint64)
    except (OverflowError, ValueError, TypeError) as exc:
        raise PvMmuError(f"{name} requests are not unsigned 64-bit words: {exc}") from None
    if arr.size == 0:
        return arr.reshape(0, width)
    if arr.ndim != 2 or arr.shape[1] != width:
        raise PvMmuError(f"{name} requests must be an (n, {width}) array, got shape {arr.shape}")
    return arr


class _Hypercall:
    """State of one mmu_update / mmuext_op invocation."""

    def __init__(self, ctx: PvMmuContext) -> None:
        self.ctx = ctx
        self.domid = ctx.domid
        self.type_changed = False
        self.typing = PageTyping(ctx.frames, ctx.mem,
                                 preempt_check=ctx.hypercall_preempt_check,
                                 # a lab's rule, if the context carries one (seams.py)
                                 writable_mapping=getattr(ctx, "writable_mapping", None),
                                 on_type_change=self._type_changed)

    def _type_changed(self, mfn: int) -> None:
        self.type_changed = True

    def after_request(self) -> None:
        if self.type_changed:
            self.type_changed = False
            self.ctx.flush_tlb(TlbFlush(FlushKind.ALL))

    def foreign_rc(self, foreigndom: int) -> int:
        """0 for DOMID_SELF; Xen's refusal for any other `foreigndom`.

        Naming oneself explicitly is -ESRCH ("cannot specify itself as foreign
        domain"); another existing domain needs privileges the model's domains
        lack (XSM: -EPERM); a domain that does not exist is -ESRCH.
        """
        if foreigndom == DOMID_SELF:
            return 0
        exists = getattr(self.ctx, "domain_exists", None)
        if foreigndom != self.domid and exists is not None and exists(foreigndom):
            return -EPERM
        return -ESRCH


# ---------------------------------------------------------------------------
# mmu_update
# ---------------------------------------------------------------------------


def do_mmu_update(
    ctx: PvMmuContext,
    reqs: np.ndarray | Sequence[Sequence[int]],
    foreigndom: int = DOMID_SELF,
) -> tuple[int, int]:
    """HYPERVISOR_mmu_update: apply {ptr, val} requests in order; (rc, done)."""
    requests = _requests(reqs, 2, "mmu_update")
    call = _Hypercall(ctx)
    # Page tables and pages of another domain need privileges the model's
    # domains do not have (Xen: get_pg_owner / rcu_lock_domain_by_id fail).
    if (foreigndom >> 16) not in (0, ctx.domid + 1):
        return -ESRCH, 0
    rc = call.foreign_rc(foreigndom & 0xFFFF)
    if rc:
        return rc, 0
    done, rc = 0, 0
    for i, (ptr, val) in enumerate(requests.tolist()):
        if i and ctx.hypercall_preempt_check():
            rc = -ERESTART
            break
        cmd = ptr & 7
        if cmd in (MMU_NORMAL_PT_UPDATE, MMU_PT_UPDATE_PRESERVE_AD, MMU_PT_UPDATE_NO_TRANSLATE):
            rc = call.typing.run_transaction(functools.partial(
                _normal_pt_update, call, ptr - cmd, val,
                preserve_ad=cmd == MMU_PT_UPDATE_PRESERVE_AD))
        elif cmd == MMU_MACHPHYS_UPDATE:
            rc = _machphys_update(call, ptr, val)
        else:
            rc = -ENOSYS
        call.after_request()
        if rc:
            break
        done = i + 1
    return rc, done


def _normal_pt_update(call: _Hypercall, ptr: int, val: int, preserve_ad: bool) -> int:
    """*ptr = val, for a page table (checked like a new entry) or a writable page."""
    typing, domid = call.typing, call.domid
    mfn = ptr >> 12
    slot = (ptr & 0xFFF) >> 3
    if not typing.get_page(mfn, domid):
        return -EINVAL
    info = typing.frames.info(mfn)
    rc = -EINVAL
    if info.validated and info.count > 0:  # page_lock() succeeds
        if info.type == PageType.L1:
            rc = typing.mod_l1_entry(mfn, slot, val, domid, preserve_ad)
        elif info.type == PageType.L2:
            rc = typing.mod_l2_entry(mfn, slot, val, domid, preserve_ad)
        elif info.type == PageType.L3:
            rc = typing.mod_l3_entry(mfn, slot, val, domid, preserve_ad)
        elif info.type == PageType.L4:
            rc = typing.mod_l4_entry(mfn, slot, val, domid, preserve_ad)
        elif info.type == PageType.WRITABLE:
            typing.mem[mfn * ENTRIES_PER_TABLE + slot] = val
            rc = 0
        if rc == -EINTR:
            rc = -ERESTART
    elif typing.get_page_type(mfn, PageType.WRITABLE) == 0:
        # Not (validated as) anything: an ordinary write, under a writable ref.
        typing.mem[mfn * ENTRIES_PER_TABLE + slot] = val
        typing.put_page_type(mfn)
        rc = 0
    typing.put_page(mfn)
    return rc


def _machphys_update(call: _Hypercall, ptr: int, val: int) -> int:
    """M2P[ptr >> 12] = val, for a frame the domain owns."""
    mfn = ptr >> 12
    m2p = call.ctx.m2p
    if mfn >= m2p.shape[0] or not call.typing.get_page(mfn, call.domid):
        return -EINVAL
    m2p[mfn] = val
    call.typing.put_page(mfn)
    return 0


# ---------------------------------------------------------------------------
# mmuext_op
# ---------------------------------------------------------------------------

_PIN_LEVEL = {
    MMUEXT_PIN_L1_TABLE: 1,
    MMUEXT_PIN_L2_TABLE: 2,
    MMUEXT_PIN_L3_TABLE: 3,
    MMUEXT_PIN_L4_TABLE: 4,
}


def do_mmuext_op(
    ctx: PvMmuContext,
    ops: np.ndarray | Sequence[Sequence[int]],
    foreigndom: int = DOMID_SELF,
) -> tuple[int, int]:
    """HYPERVISOR_mmuext_op: apply {cmd, arg1, arg2} operations in order; (rc, done)."""
    requests = _requests(ops, 3, "mmuext_op")
    call = _Hypercall(ctx)
    rc = call.foreign_rc(foreigndom)
    if rc:
        return rc, 0
    done, rc = 0, 0
    for i, (word0, arg1, arg2) in enumerate(requests.tolist()):
        if i and ctx.hypercall_preempt_check():
            rc = -ERESTART
            break
        rc = _mmuext_one(call, word0 & 0xFFFFFFFF, arg1, arg2)
        call.after_request()
        if rc:
            break
        done = i + 1
    return rc, done


def _mmuext_one(call: _Hypercall, cmd: int, arg1: int, arg2: int) -> int:
    ctx, typing, domid = call.ctx, call.typing, call.domid
    if cmd in _PIN_LEVEL:
        return typing.pin_table(arg1, _PIN_LEVEL[cmd], domid)
    if cmd == MMUEXT_UNPIN_TABLE:
        return typing.unpin_table(arg1, domid)
    if cmd == MMUEXT_NEW_BASEPTR:
        return _new_guest_cr3(call, arg1)
    if cmd == MMUEXT_NEW_USER_BASEPTR:
        return _new_user_baseptr(call, arg1)
    if cmd == MMUEXT_TLB_FLUSH_LOCAL:
        ctx.flush_tlb(TlbFlush(FlushKind.LOCAL))
    elif cmd == MMUEXT_INVLPG_LOCAL:
        ctx.flush_tlb(TlbFlush(FlushKind.LOCAL, va=arg1))
    elif cmd == MMUEXT_TLB_FLUSH_MULTI:
        ctx.flush_tlb(TlbFlush(FlushKind.MULTI, vcpumask=arg2))
    elif cmd == MMUEXT_INVLPG_MULTI:
        ctx.flush_tlb(TlbFlush(FlushKind.MULTI, va=arg1, vcpumask=arg2))
    elif cmd == MMUEXT_TLB_FLUSH_ALL:
        ctx.flush_tlb(TlbFlush(FlushKind.ALL))
    elif cmd == MMUEXT_INVLPG_ALL:
        ctx.flush_tlb(TlbFlush(FlushKind.ALL, va=arg1))
    elif cmd == MMUEXT_CLEAR_PAGE:
        return _with_writable_page(call, arg1, lambda base: _fill(typing, base, None))
    elif cmd == MMUEXT_COPY_PAGE:
        return _copy_page(call, dst=arg1, src=arg2)
    elif cmd == MMUEXT_FLUSH_CACHE:
        return -EACCES  # cache flushes need I/O memory capabilities
    elif cmd == MMUEXT_FLUSH_CACHE_GLOBAL:
        return -EINVAL
    elif cmd in (MMUEXT_MARK_SUPER, MMUEXT_UNMARK_SUPER):
        return -EOPNOTSUPP
    else:
        return -ENOSYS  # including SET_LDT: descriptor tables are not modelled here
    return 0


def _new_guest_cr3(call: _Hypercall, mfn: int) -> int:
    ctx, typing = call.ctx, call.typing
    old = ctx.get_cr3()
    if old == mfn:  # also where a continuation that finished lands
        ctx.flush_tlb(TlbFlush(FlushKind.LOCAL))
        return 0
    rc = typing.get_root_ref(mfn, call.domid)
    if rc:
        return rc
    ctx.set_cr3(mfn)
    ctx.flush_tlb(TlbFlush(FlushKind.LOCAL))
    if old:
        typing.put_root_ref(old)
    return 0


def _new_user_baseptr(call: _Hypercall, mfn: int) -> int:
    ctx, typing = call.ctx, call.typing
    old = ctx.get_user_cr3()
    if old == mfn:
        return 0
    if mfn:
        rc = typing.get_root_ref(mfn, call.domid)
        if rc:
            return rc
    ctx.set_user_cr3(mfn)
    if old:
        typing.put_root_ref(old)
    return 0


def _fill(typing: PageTyping, base: int, src: int | None) -> None:
    frame = typing.mem[base : base + ENTRIES_PER_TABLE]
    if src is None:
        frame[:] = 0
    else:
        frame[:] = typing.mem[src : src + ENTRIES_PER_TABLE]


def _with_writable_page(call: _Hypercall, mfn: int, action: Callable[[int], None]) -> int:
    """Run `action(first word index)` on `mfn` under a writable type reference."""
    typing = call.typing

    def op() -> int:
        if not typing.get_page(mfn, call.domid):
            return -EINVAL
        if typing.get_page_type(mfn, PageType.WRITABLE) != 0:
            typing.put_page(mfn)
            return -EINVAL
        action(mfn * ENTRIES_PER_TABLE)
        typing.put_page_type(mfn)
        typing.put_page(mfn)
        return 0

    return typing.run_transaction(op)


def _copy_page(call: _Hypercall, dst: int, src: int) -> int:
    typing = call.typing
    if not typing.get_page(src, call.domid):
        return -EINVAL
    rc = _with_writable_page(
        call, dst, lambda base: _fill(typing, base, src * ENTRIES_PER_TABLE))
    typing.put_page(src)
    return rc

