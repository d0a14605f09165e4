"""mmu_update / mmuext_op semantics (hypervisor.pv.mmu_ops)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hypervisor.mm.builds import BUILDS, PageType, get_build
from hypervisor.mm.check import check_typerefs
from hypervisor.mm.errors import (
    EACCES,
    EBUSY,
    EINVAL,
    ENOSYS,
    EOPNOTSUPP,
    ERESTART,
    ESRCH,
    errno_name,
)
from hypervisor.mm.frametable import FrameTable, FrameTableSnapshot
from hypervisor.mm.layouts import build_linux_like, build_random_tree
from hypervisor.mm.pte import (
    PTE_ACCESSED,
    PTE_DIRTY,
    PTE_GLOBAL,
    PTE_PCD,
    PTE_PRESENT,
    PTE_PSE,
    PTE_RW,
    PTE_USER,
    make_pte,
)
from hypervisor.mm.typerefs import PreemptAfter
from hypervisor.pv.mmu_ops import (
    MMU_MACHPHYS_UPDATE,
    MMU_PT_UPDATE_PRESERVE_AD,
    MMUEXT_CLEAR_PAGE,
    MMUEXT_COPY_PAGE,
    MMUEXT_FLUSH_CACHE,
    MMUEXT_INVLPG_ALL,
    MMUEXT_INVLPG_LOCAL,
    MMUEXT_INVLPG_MULTI,
    MMUEXT_MARK_SUPER,
    MMUEXT_NEW_BASEPTR,
    MMUEXT_NEW_USER_BASEPTR,
    MMUEXT_PIN_L1_TABLE,
    MMUEXT_PIN_L2_TABLE,
    MMUEXT_PIN_L4_TABLE,
    MMUEXT_SET_LDT,
    MMUEXT_TLB_FLUSH_ALL,
    MMUEXT_TLB_FLUSH_LOCAL,
    MMUEXT_TLB_FLUSH_MULTI,
    MMUEXT_UNPIN_TABLE,
    FlushKind,
    PvMmuError,
    TlbFlush,
    do_mmu_update,
    do_mmuext_op,
)

DOM = 1
OTHER = 2
RO = PTE_PRESENT | PTE_ACCESSED
RW = PTE_PRESENT | PTE_RW | PTE_ACCESSED | PTE_DIRTY


@dataclass
class Vcpu:
    """A PvMmuContext: one vCPU of domain 1 on a small machine."""

    frames: FrameTable
    mem: np.ndarray
    domid: int = DOM
    m2p: np.ndarray = field(default_factory=lambda: np.full(64, ~np.uint64(0), np.uint64))
    cr3: int = 0
    user_cr3: int = 0
    flushes: list[TlbFlush] = field(default_factory=list)
    budget: PreemptAfter | None = None

    def get_cr3(self) -> int:
        return self.cr3

    def set_cr3(self, mfn: int) -> None:
        self.cr3 = mfn

    def get_user_cr3(self) -> int:
        return self.user_cr3

    def set_user_cr3(self, mfn: int) -> None:
        self.user_cr3 = mfn

    def flush_tlb(self, flush: TlbFlush) -> None:
        self.flushes.append(flush)

    def hypercall_preempt_check(self) -> bool:
        return self.budget is not None and self.budget()

    # --- test helpers -------------------------------------------------------

    def set(self, table: int, slot: int, mfn: int, flags: int) -> None:
        self.mem[table * 512 + slot] = make_pte(mfn, flags)

    def ext(self, *ops: tuple[int, int, int]) -> tuple[int, int]:
        return do_mmuext_op(self, list(ops))

    def update(self, *reqs: tuple[int, int]) -> tuple[int, int]:
        return do_mmu_update(self, list(reqs))

    def refused(self, call, rc: int, done: int = 0) -> None:
        snap, mem = self.frames.snapshot(), self.mem.copy()
        got = call()
        assert (errno_name(got[0]), got[1]) == (errno_name(-rc), done)
        assert self.frames.snapshot() == snap
        assert np.array_equal(self.mem, mem)


def ptr(table: int, slot: int, cmd: int = 0) -> int:
    return table << 12 | slot << 3 | cmd


@pytest.fixture
def v() -> Vcpu:
    frames = FrameTable(64, get_build("4.19"))
    frames.assign(range(1, 40), DOM)
    frames.assign(range(40, 44), OTHER)
    return Vcpu(frames, np.zeros(64 * 512, dtype=np.uint64))


# ---------------------------------------------------------------------------
# mmu_update
# ---------------------------------------------------------------------------


def test_normal_update_takes_and_drops_references(v: Vcpu) -> None:
    assert v.ext((MMUEXT_PIN_L1_TABLE, 13, 0)) == (0, 1)
    assert v.update((ptr(13, 5), make_pte(20, RW)), (ptr(13, 6), make_pte(21, RO))) == (0, 2)
    f = v.frames
    assert int(v.mem[13 * 512 + 5]) == make_pte(20, RW)
    assert f.page_type(20) == PageType.WRITABLE and f.type_count(20) == 1
    assert f.general_count(21) == 2 and f.type_count(21) == 0
    assert v.update((ptr(13, 5), make_pte(21, RW))) == (0, 1)
    assert f.type_count(20) == 0 and f.general_count(20) == 1 and f.type_count(21) == 1
    assert check_typerefs(v.mem, f, DOM, {13: 1}, []) == []


def test_a_refused_request_stops_the_batch_and_changes_nothing(v: Vcpu) -> None:
    assert v.ext((MMUEXT_PIN_L1_TABLE, 13, 0), (MMUEXT_PIN_L1_TABLE, 14, 0)) == (0, 2)
    assert v.update((ptr(13, 0), make_pte(20, RW))) == (0, 1)
    v.refused(lambda: v.update((ptr(13, 1), make_pte(14, RW))), EBUSY)  # an L1, writable
    v.refused(lambda: v.update((ptr(13, 1), make_pte(40, RO))), EBUSY)  # foreign
    v.refused(lambda: v.update((ptr(13, 1), make_pte(21, RW | PTE_PCD))), EINVAL)
    snap = v.frames.snapshot()
    rc, done = v.update((ptr(13, 2), make_pte(22, RW)), (ptr(13, 3), make_pte(14, RW)),
                        (ptr(13, 4), make_pte(23, RW)))
    assert (rc, done) == (-EBUSY, 1)
    assert v.frames.type_count(22) == 1 and v.frames.type_count(23) == 0
    assert int(v.mem[13 * 512 + 4]) == 0
    assert snap != v.frames.snapshot()


def test_updates_of_upper_levels_and_xen_slots(v: Vcpu) -> None:
    assert v.ext((MMUEXT_PIN_L4_TABLE, 10, 0)) == (0, 1)
    assert v.update((ptr(10, 0), make_pte(11, RW))) == (0, 1)  # 11 becomes an (empty) L3
    assert v.frames.page_type(11) == PageType.L3
    v.refused(lambda: v.update((ptr(10, 256), make_pte(12, RW))), EINVAL)
    v.refused(lambda: v.update((ptr(10, 1), make_pte(12, RW | PTE_GLOBAL))), EINVAL)
    v.refused(lambda: v.update((ptr(11, 1), make_pte(12, RW | PTE_PSE))), EINVAL)
    assert v.update((ptr(10, 0), 0)) == (0, 1)
    assert v.frames.type_count(11) == 0 and not v.frames.is_validated(11)


def test_updates_of_ordinary_pages_are_plain_writes(v: Vcpu) -> None:
    assert v.update((ptr(25, 7), 0x1234)) == (0, 1)
    assert int(v.mem[25 * 512 + 7]) == 0x1234
    assert v.frames.page_type(25) == PageType.WRITABLE and v.frames.type_count(25) == 0
    assert v.ext((MMUEXT_PIN_L2_TABLE, 26, 0)) == (0, 1)
    v.set(27, 0, 26, RO)
    assert v.ext((MMUEXT_PIN_L1_TABLE, 27, 0)) == (0, 1)
    v.refused(lambda: v.update((ptr(40, 0), 1)), EINVAL)  # someone else's page
    v.refused(lambda: v.update((ptr(50, 0), 1)), EINVAL)  # a free frame
    v.refused(lambda: v.update((ptr(25, 0, 5), 1)), ENOSYS)  # no such command
    v.refused(lambda: do_mmu_update(v, [(ptr(25, 0), 1)], foreigndom=OTHER), ESRCH)


def test_preserve_ad_keeps_the_hardware_bits(v: Vcpu) -> None:
    assert v.ext((MMUEXT_PIN_L1_TABLE, 13, 0)) == (0, 1)
    assert v.update((ptr(13, 0), make_pte(20, RW))) == (0, 1)  # A and D set
    new = make_pte(20, PTE_PRESENT | PTE_RW | PTE_USER)
    assert v.update((ptr(13, 0, MMU_PT_UPDATE_PRESERVE_AD), new)) == (0, 1)
    assert int(v.mem[13 * 512]) == new | PTE_ACCESSED | PTE_DIRTY
    assert v.frames.type_count(20) == 1


def test_machphys_update(v: Vcpu) -> None:
    assert v.update((ptr(20, 0, MMU_MACHPHYS_UPDATE), 0x77)) == (0, 1)
    assert int(v.m2p[20]) == 0x77
    v.refused(lambda: v.update((ptr(40, 0, MMU_MACHPHYS_UPDATE), 1)), EINVAL)
    assert v.frames.general_count(20) == 1


def test_bad_request_arrays_are_one_clear_error(v: Vcpu) -> None:
    with pytest.raises(PvMmuError, match=r"\(n, 2\)"):
        do_mmu_update(v, [(1, 2, 3)])
    with pytest.raises(PvMmuError, match="unsigned 64-bit"):
        do_mmuext_op(v, [(0, -1, 0)])
    assert do_mmu_update(v, []) == (0, 0)


# ---------------------------------------------------------------------------
# mmuext_op
# ---------------------------------------------------------------------------


def test_pins_do_not_nest(v: Vcpu) -> None:
    assert v.ext((MMUEXT_PIN_L2_TABLE, 12, 0)) == (0, 1)
    v.refused(lambda: v.ext((MMUEXT_PIN_L2_TABLE, 12, 0)), EINVAL)
    v.refused(lambda: v.ext((MMUEXT_PIN_L1_TABLE, 12, 0)), EINVAL)
    assert v.ext((MMUEXT_UNPIN_TABLE, 12, 0)) == (0, 1)
    v.refused(lambda: v.ext((MMUEXT_UNPIN_TABLE, 12, 0)), EINVAL)
    v.refused(lambda: v.ext((MMUEXT_PIN_L1_TABLE, 40, 0)), EINVAL)
    v.refused(lambda: do_mmuext_op(v, [(MMUEXT_PIN_L1_TABLE, 12, 0)], foreigndom=OTHER), ESRCH)


def test_new_baseptr_moves_the_cr3_reference(v: Vcpu) -> None:
    v.set(10, 0, 11, RW)
    assert v.ext((MMUEXT_NEW_BASEPTR, 10, 0)) == (0, 1)
    assert v.cr3 == 10 and v.frames.type_count(10) == 1 and v.frames.type_count(11) == 1
    assert TlbFlush(FlushKind.LOCAL) in v.flushes
    assert v.ext((MMUEXT_NEW_BASEPTR, 10, 0)) == (0, 1)  # same base: no new reference
    assert v.frames.type_count(10) == 1
    assert v.ext((MMUEXT_NEW_BASEPTR, 15, 0)) == (0, 1)
    assert v.frames.type_count(10) == 0 and v.frames.type_count(11) == 0
    v.set(16, 0, 40, RW)
    v.refused(lambda: v.ext((MMUEXT_NEW_BASEPTR, 16, 0)), EINVAL)
    assert v.cr3 == 15


def test_new_user_baseptr(v: Vcpu) -> None:
    assert v.ext((MMUEXT_NEW_USER_BASEPTR, 17, 0)) == (0, 1)
    assert v.user_cr3 == 17 and v.frames.page_type(17) == PageType.L4
    assert check_typerefs(v.mem, v.frames, DOM, {}, [17]) == []
    assert v.ext((MMUEXT_NEW_USER_BASEPTR, 0, 0)) == (0, 1)
    assert v.user_cr3 == 0 and v.frames.type_count(17) == 0


def test_flush_commands(v: Vcpu) -> None:
    assert v.ext((MMUEXT_TLB_FLUSH_LOCAL, 0, 0), (MMUEXT_INVLPG_LOCAL, 0x5000, 0),
                 (MMUEXT_TLB_FLUSH_MULTI, 0, 0x9000), (MMUEXT_INVLPG_MULTI, 0x6000, 0x9000),
                 (MMUEXT_TLB_FLUSH_ALL, 0, 0), (MMUEXT_INVLPG_ALL, 0x7000, 0)) == (0, 6)
    assert v.flushes == [
        TlbFlush(FlushKind.LOCAL), TlbFlush(FlushKind.LOCAL, va=0x5000),
        TlbFlush(FlushKind.MULTI, vcpumask=0x9000),
        TlbFlush(FlushKind.MULTI, va=0x6000, vcpumask=0x9000),
        TlbFlush(FlushKind.ALL), TlbFlush(FlushKind.ALL, va=0x7000)]


def test_a_type_change_flushes_every_pcpu_once_per_request(v: Vcpu) -> None:
    v.set(13, 0, 20, RW)
    v.set(13, 1, 21, RW)
    assert v.ext((MMUEXT_PIN_L1_TABLE, 13, 0)) == (0, 1)
    assert v.flushes == [TlbFlush(FlushKind.ALL)]
    v.flushes.clear()
    assert v.ext((MMUEXT_UNPIN_TABLE, 13, 0), (MMUEXT_PIN_L1_TABLE, 13, 0)) == (0, 2)
    assert v.flushes == []  # nothing changed type


def test_unsupported_and_unknown_commands(v: Vcpu) -> None:
    v.refused(lambda: v.ext((MMUEXT_SET_LDT, 0, 0)), ENOSYS)
    v.refused(lambda: v.ext((99, 0, 0)), ENOSYS)
    v.refused(lambda: v.ext((MMUEXT_MARK_SUPER, 0, 0)), EOPNOTSUPP)
    v.refused(lambda: v.ext((MMUEXT_FLUSH_CACHE, 0, 0)), EACCES)
    v.refused(lambda: v.ext((MMUEXT_TLB_FLUSH_LOCAL, 0, 0), (99, 0, 0)), ENOSYS, done=1)


def test_clear_and_copy_page(v: Vcpu) -> None:
    v.mem[20 * 512 : 21 * 512] = np.arange(512, dtype=np.uint64)
    assert v.ext((MMUEXT_COPY_PAGE, 21, 20)) == (0, 1)
    assert np.array_equal(v.mem[21 * 512 : 22 * 512], np.arange(512))
    assert v.ext((MMUEXT_CLEAR_PAGE, 20, 0)) == (0, 1)
    assert not v.mem[20 * 512 : 21 * 512].any()
    v.refused(lambda: v.ext((MMUEXT_PIN_L1_TABLE, 21, 0)), EBUSY)  # entry 1 maps free mfn 0
    assert v.ext((MMUEXT_PIN_L1_TABLE, 22, 0)) == (0, 1)
    v.refused(lambda: v.ext((MMUEXT_CLEAR_PAGE, 22, 0)), EINVAL)  # a page table
    assert v.frames.general_count(20) == 1 and v.frames.general_count(21) == 1


def _continue(call, ctx: Vcpu, reqs: list) -> tuple[int, int, int]:
    """Re-issue from `done` while the call asks to be continued: (rc, done, restarts)."""
    pos = restarts = 0
    while True:
        rc, done = call(ctx, reqs[pos:])
        pos += done
        if rc != -ERESTART:
            return rc, pos, restarts
        restarts += 1
        if ctx.budget is not None:
            ctx.budget.reset()


@pytest.mark.parametrize("budget", [0, 2, 25])
def test_preempted_pin_and_baseptr_continue_to_the_same_state(budget: int) -> None:
    def machine() -> tuple[Vcpu, list]:
        frames = FrameTable(2500, get_build("4.19"))
        mem = np.zeros(2500 * 512, dtype=np.uint64)
        tree = build_linux_like(frames, mem, DOM, 2048, nr_processes=1, seed=4)
        ops = [(MMUEXT_PIN_L4_TABLE, r.mfn, 0) for r in tree.roots if r.pinned]
        ops.append((MMUEXT_NEW_BASEPTR, tree.cr3_refs[0], 0))
        return Vcpu(frames, mem, m2p=np.zeros(2500, np.uint64)), ops

    one, ops = machine()
    assert do_mmuext_op(one, ops) == (0, len(ops))
    two, ops = machine()
    two.budget = PreemptAfter(budget)
    rc, done, restarts = _continue(do_mmuext_op, two, ops)
    assert (rc, done) == (0, len(ops)) and restarts > 0
    assert two.frames.snapshot() == one.frames.snapshot() and two.cr3 == one.cr3


# ---------------------------------------------------------------------------
# Random operation sequences
# ---------------------------------------------------------------------------

FLAG_CHOICES = [RW, RO, RW | PTE_USER, RO | PTE_GLOBAL, RW | PTE_PCD, RW | PTE_PSE, 0]
SLOTS = [0, 1, 2, 3, 256, 300]

op_strategy = st.one_of(
    st.tuples(st.just("pin"), st.integers(0, 99), st.integers(1, 4)),
    st.tuples(st.just("unpin"), st.integers(0, 99)),
    st.tuples(st.just("update"), st.integers(0, 99), st.sampled_from(SLOTS),
              st.integers(0, 99), st.sampled_from(FLAG_CHOICES)),
    st.tuples(st.just("baseptr"), st.integers(0, 99)),
    st.tuples(st.just("user_baseptr"), st.integers(0, 99)),
    st.tuples(st.just("m2p"), st.integers(0, 99), st.integers(0, 1000)),
    st.tuples(st.just("flush")),
)


def _effective(snap: FrameTableSnapshot, frames: FrameTable) -> tuple:
    """What a failed continuation must restore: counts, pins, links (not stale types)."""
    ti = np.frombuffer(snap.type_info, np.uint64)
    layout = frames.layout
    return (layout.count_of(ti).tobytes(), layout.pinned_of(ti).tobytes(),
            snap.count_info, snap.owner, snap.linear_pt_count)


@pytest.mark.parametrize("build", sorted(BUILDS))
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), ops=st.lists(op_strategy, min_size=1, max_size=30),
       budgets=st.lists(st.sampled_from([None, 0, 1, 3]), min_size=30, max_size=30))
def test_random_operation_sequences_keep_the_invariant(build, seed, ops, budgets) -> None:
    frames = FrameTable(140, get_build(build))
    mem = np.zeros(140 * 512, dtype=np.uint64)
    tree = build_random_tree(frames, mem, DOM, seed, nr_pages=64, linear=0.3,
                             foreign_domid=OTHER)
    vcpu = Vcpu(frames, mem, m2p=np.zeros(140, np.uint64))
    pins: dict[int, int] = {}
    for root in tree.roots:
        if root.pinned:
            if vcpu.ext((MMUEXT_PIN_L1_TABLE + root.level - 1, root.mfn, 0))[0] == 0:
                pins[root.mfn] = root.level
        elif vcpu.cr3 == 0:
            vcpu.ext((MMUEXT_NEW_BASEPTR, root.mfn, 0))
    # Frames ops may name: the domain's, someone else's, free ones, nonexistent ones.
    candidates = [int(m) for m in tree.p2m] + [int(m) for m in frames.frames_of(OTHER)]
    candidates += [int(m) for m in np.flatnonzero(frames.owner == 0x7FF4)[:4]] + [500, 0]

    def frame(i: int) -> int:
        return candidates[i % len(candidates)]

    for op, budget in zip(ops, budgets, strict=False):
        vcpu.budget = None if budget is None else PreemptAfter(budget)
        before, mem_before = frames.snapshot(), mem.copy()
        kind = op[0]
        if kind == "pin":
            call, reqs = do_mmuext_op, [(MMUEXT_PIN_L1_TABLE + op[2] - 1, frame(op[1]), 0)]
        elif kind == "unpin":
            call, reqs = do_mmuext_op, [(MMUEXT_UNPIN_TABLE, frame(op[1]), 0)]
        elif kind == "update":
            value = make_pte(frame(op[3]), op[4]) if op[4] else 0
            call, reqs = do_mmu_update, [(ptr(frame(op[1]), op[2]), value)]
        elif kind == "baseptr":
            call, reqs = do_mmuext_op, [(MMUEXT_NEW_BASEPTR, frame(op[1]), 0)]
        elif kind == "user_baseptr":
            call, reqs = do_mmuext_op, [(MMUEXT_NEW_USER_BASEPTR, frame(op[1]), 0)]
        elif kind == "m2p":
            call, reqs = do_mmu_update, [(ptr(frame(op[1]), 0, MMU_MACHPHYS_UPDATE), op[2])]
        else:
            call, reqs = do_mmuext_op, [(MMUEXT_TLB_FLUSH_ALL, 0, 0)]
        rc, _, restarts = _continue(call, vcpu, reqs)

        if rc == 0 and kind == "pin":
            pins[frame(op[1])] = op[2]
        elif rc == 0 and kind == "unpin":
            del pins[frame(op[1])]
        elif rc < 0 and restarts == 0:
            assert frames.snapshot() == before, (op, rc)
            assert np.array_equal(mem, mem_before)
        elif rc < 0:
            assert _effective(frames.snapshot(), frames) == _effective(before, frames)

        cr3s = [m for m in (vcpu.cr3, vcpu.user_cr3) if m]
        diffs = check_typerefs(mem, frames, DOM, pins, cr3s)
        assert diffs == [], (op, errno_name(rc), [str(d) for d in diffs[:5]])
        # No frame is both a page table and mapped writable by a validated L1.
        types, counts = frames.types(), frames.type_counts()
        l1s = np.flatnonzero((types == PageType.L1) & (counts > 0))
        entries = mem.reshape(-1, 512)[l1s].ravel()
        writable = entries[(entries & np.uint64(PTE_PRESENT | PTE_RW)) ==
                           np.uint64(PTE_PRESENT | PTE_RW)]
        targets = ((writable >> np.uint64(12)) & np.uint64((1 << 40) - 1)).astype(np.int64)
        assert not ((types[targets] >= 1) & (types[targets] <= 4) & (counts[targets] > 0)).any()
