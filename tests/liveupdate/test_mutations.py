"""The mutation list: bugs planted one at a time, each caught by the live-update proof
or by a named check.

Each entry plants one bug (in process, through monkeypatch) and names the check that
must see it. The same check runs twice: without the bug it passes, with it it fails
with the named complaint. A check that cannot fail proves nothing, so this list is
what keeps the proof honest as the code moves: a new way for an update to go wrong
gets an entry here together with what catches it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from emulator.engine import PERM_W
from emulator.paging import ADDR_MASK, RW, A, D, P
from hypervisor.liveupdate import orchestrator
from hypervisor.liveupdate.handover import HandoverError
from hypervisor.liveupdate.orchestrator import UpdatePlan, live_update, prepare
from hypervisor.liveupdate.proof import ProofFailed
from hypervisor.liveupdate.strategies import base, names, transfer
from hypervisor.liveupdate.strategies.lazy import LazyDomain, lazy_update_of
from hypervisor.mm.builds import get_build
from hypervisor.pv.hypercalls import VcpuMmuContext
from hypervisor.pv.mmu_ops import DOMID_SELF, MMUEXT_NEW_USER_BASEPTR, do_mmuext_op
from hypervisor.runner import boot_scenario, run_with_updates
from hypervisor.scenario import UpdateSpec, load_scenario
from tests import SCENARIOS

PV_SMP = SCENARIOS / "pv-smp.toml"
PTCHURN = SCENARIOS / "pv-ptchurn.toml"  # at 2 ms one of its tables is left to the sweeper
LAPIC = SCENARIOS / "hvm-lapic-image.toml"


def booted(scenario: Path, at_ns: int):
    hv = boot_scenario(load_scenario(scenario))
    hv.run(at_ns)
    return hv


def _updated(hv, plan: UpdatePlan) -> dict:
    """Update `hv` as a run does: what goes ahead is sent (and prevalidated) first."""
    new, report = live_update(hv, plan, prepare(hv, plan))
    assert new is not hv and report["outcome"] == "updated" and report["proof"]["ok"]
    if plan.strategy == "lazy":
        assert lazy_update_of(new) is not None
        new.finish_background_work()  # the lazy proof runs when validation completes
        assert report["proof_after_lazy"]["ok"]
    return report


# ------------------------------------------------------------------------ checks
def lazy_never_maps_a_page_table_writable() -> None:
    """During the lazy period, a write to one of the guest's page tables through an entry
    that (against the rules) maps it writable gets a read-only translation, whether the
    table is validated yet or still pending: the guard is the MMU's, whatever the
    guest's tables say. A data frame planted the same way is writable, so the check
    can tell the two apart."""
    hv = booted(PTCHURN, 2_000_000)
    new, report = live_update(hv, UpdatePlan("4.12", "lazy", sweep_budget_ptes=1))
    lazy = lazy_update_of(new)
    assert report["proof"]["ok"] and lazy is not None and lazy.shadow_off_ns is None
    dom = new.domains[0]
    v = dom.vcpus[0]
    mem = new.memory.u64
    rip = new.read_vcpu_registers(v)["rip"]
    table = v.roots.kernel_ma
    for level in (4, 3, 2):  # down to the L1 that maps RIP: validated in the blackout
        table = int(mem[(table >> 3) + ((rip >> (12 + 9 * (level - 1))) & 0x1FF)]) & ADDR_MASK
    free = [i for i in range(512) if not mem[(table >> 3) + i]]
    assert len(free) >= 3
    ((_, typing),) = lazy.domains
    tables = np.flatnonzero(typing.typing._level)  # every page table the stream lists
    validated = new.frame_table.validated(tables)
    assert validated.any() and not validated.all()  # some still pending
    data = int(dom.p2m[-1])  # the guest's last frame: plain memory
    assert not typing.typing._level[data]
    targets = [int(tables[validated][0]), int(tables[~validated][0]), data]
    region = rip & ~((1 << 21) - 1)
    for slot, target in zip(free, targets, strict=False):
        mem[(table >> 3) + slot] = (target << 12) | P | RW | A | D
    new.pcpus[v.pcpu].flush_tlb()
    for slot, target in zip(free, targets, strict=False):
        found = v.mmu.translate(region | (slot << 12), "write")
        assert found is not None
        ma, perms = found
        assert ma >> 12 == target
        if target == data:
            assert perms & PERM_W
        else:
            assert not perms & PERM_W, "a page-table frame was mapped writable in shadow mode"


def every_strategy_keeps_user_cr3_references() -> None:
    """A PV domain whose vCPU issued MMUEXT_NEW_USER_BASEPTR (as a 64-bit PV kernel does
    for its user page tables) is updated while that user L4 is set: its extra
    reference must be rebuilt by every strategy (the proof compares type counts)."""
    for strategy in names():
        hv = booted(PV_SMP, 2_000_000)
        v = hv.domains[0].vcpus[0]
        user_l4 = v.roots.kernel_ma >> 12  # a second root reference to the kernel's L4
        count = int(hv.frame_table.type_counts(np.array([user_l4]))[0])
        rc, done = do_mmuext_op(VcpuMmuContext(hv, v),
                                [[MMUEXT_NEW_USER_BASEPTR, user_l4, 0]], DOMID_SELF)
        assert (rc, done) == (0, 1) and v.roots.user_ma == user_l4 << 12
        assert int(hv.frame_table.type_counts(np.array([user_l4]))[0]) == count + 1
        _updated(hv, UpdatePlan("4.12", strategy))


def _first_leaf_slot(mem: np.ndarray, root: int, gfn: int) -> int:
    """Index in `mem` of the EPT entry that maps `gfn` (4 KiB or superpage leaf)."""
    table = root
    for level in (4, 3, 2, 1):
        slot = table * 512 + ((gfn >> (9 * (level - 1))) & 511)
        if level == 1 or (level < 4 and int(mem[slot]) & (1 << 7)):
            return slot
        table = (int(mem[slot]) >> 12) & ((1 << 40) - 1)
    raise AssertionError("unreachable")


def hvm_update_proves() -> None:
    _updated(booted(LAPIC, 1_000_000), UpdatePlan("4.12", "full-walk"))


def aborted_update_reports_what_it_checked() -> None:
    """An update aborted before the point of no return proves the old build unchanged:
    every domain and vCPU compared, never a constant verdict."""
    hv = booted(PV_SMP, 2_000_000)
    same, report = live_update(hv, UpdatePlan("4.12", "full-walk", fail_at="save"))
    assert same is hv and report["outcome"].startswith("aborted")
    proof = report["proof"]
    assert proof["checks"].get("domains") == len(hv.domains), f"domains not checked: {proof}"
    assert proof["checks"]["vcpus"] == len(hv.domains[0].vcpus)
    assert proof["ok"] and "old build" in proof["subject"], proof
    # its pages and the hypervisor pages it owns (shared_info, its grant frames)
    dom = hv.domains[0]
    assert dom.grant_table is not None and dom.grant_table.frames
    assert proof["checks"]["frames_hashed"] == dom.nr_pages + 1 + len(dom.grant_table.frames)


def transfer_proves() -> None:
    _updated(booted(PV_SMP, 2_000_000), UpdatePlan("4.12", "transfer"))


def prevalidate_redoes_what_changed() -> None:
    """pv-ptchurn changes its tables between the prevalidation (1 ms ahead) and the pause."""
    result = run_with_updates(load_scenario(PTCHURN),
                              [UpdateSpec(2_300_000, "4.12", "prevalidate")],
                              UpdatePlan("4.12", "prevalidate"))
    (report,) = result["updates"]
    assert report["proof"]["ok"] and report["counters"]["domains_redone"] >= 1


def lazy_proves_when_validation_completes() -> None:
    hv = booted(PTCHURN, 2_000_000)
    _updated(hv, UpdatePlan("4.12", "lazy", sweep_budget_ptes=512))


def cpl3_update_proves() -> None:
    """A guest on Xen's PV ABI at CPL 3 (as Linux), updated mid-run by every strategy."""
    from tests.liveupdate.test_cpl3_update import cpl3_guest_mid_run

    for strategy in names():
        with tempfile.TemporaryDirectory() as tmp:
            hv = cpl3_guest_mid_run(Path(tmp))
            _updated(hv, UpdatePlan("4.12", strategy))


def table_writes_during_lazy_validate_first() -> None:
    """A ptwr write and an update_va_mapping into an L1 table the lazy update has not
    validated yet: each validates first, then does what it does without an update."""
    from tests.liveupdate.test_cpl3_update import table_write_during_lazy

    for how in ("ptwr", "update_va_mapping"):
        with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
            out = table_write_during_lazy(Path(tmp), how, mp)
            assert out["seen"][:1] == [False], f"{how}: the table was validated already"
            assert out["entry"] == out["value"], f"{how}: the table write was refused"
            assert out["dom"].shutdown.reason == "poweroff", out["dom"].crash_report


# --------------------------------------------------------------------- mutations
def _writable_page_tables(monkeypatch) -> None:
    monkeypatch.setattr(LazyDomain, "may_map_writable", lambda self, mfn: True)


def _no_user_cr3(monkeypatch) -> None:
    def kernel_only(contexts):  # every vCPU's CR3, none of its user L4
        return [ctx.ctrlreg[3] >> 12 for _vid, ctx in sorted(contexts.items())]

    monkeypatch.setattr(base, "cr3s_of", kernel_only)


def _ept_loses_write(monkeypatch) -> None:
    adopt = orchestrator.adopt_hvm_domain

    def adopt_then_drop_w(*args, **kwargs):
        dom = adopt(*args, **kwargs)
        physmap = dom.hvm.physmap
        slot = _first_leaf_slot(physmap.memory.u64, physmap.ept.root_mfn, 0)
        physmap.memory.u64[slot] &= ~np.uint64(2)  # EPT W
        return dom

    monkeypatch.setattr(orchestrator, "adopt_hvm_domain", adopt_then_drop_w)


def _blackout_posts_dropped(monkeypatch) -> None:
    def skip_due(hv) -> None:  # the sources restart at the resume time
        for dom in hv.domains:
            for v in dom.vcpus if dom.hvm is not None else ():
                for s in v.hvm.sources:
                    src, now = s.source, hv.now + dom.time_offset
                    src._next_occurrence = max(src._next_occurrence,
                                               (now - src.start_ns) // src.period_ns + 1)

    monkeypatch.setattr(orchestrator, "_devices_catch_up", skip_due)


def _abort_proof_constant(monkeypatch) -> None:
    prove = orchestrator._prove

    def constant_on_abort(before, hv, subject, **kwargs):
        if "abort" in subject:
            return {"ok": True, "checks": {}, "problems": []}
        return prove(before, hv, subject, **kwargs)

    monkeypatch.setattr(orchestrator, "_prove", constant_on_abort)


def _abort_damages_a_guest(monkeypatch) -> None:
    def scribble_then_fail(hv, *args, **kwargs):
        hv.memory.u64[int(hv.domains[0].p2m[5]) * 512] ^= np.uint64(1)
        raise HandoverError("injected: the stream could not be written")

    monkeypatch.setattr(orchestrator, "write_handover", scribble_then_fail)


def _translator_flips_a_pin(monkeypatch) -> None:
    pair = ("4.19", "4.12")
    translate = transfer.TRANSLATORS[pair]
    pinned_bit = np.uint64(get_build("4.12").type_info.pinned_bit)

    def flip_first_pin(type_info: np.ndarray) -> np.ndarray:
        out = translate(type_info).copy()
        pinned = np.flatnonzero((out >> pinned_bit) & np.uint64(1))
        if pinned.size:  # (the domain's RAM; its hypervisor pages have no pins)
            out[pinned[0]] ^= np.uint64(1) << pinned_bit
        return out

    monkeypatch.setitem(transfer.TRANSLATORS, pair, flip_first_pin)


def _prevalidate_trusts_stale_tables(monkeypatch) -> None:
    monkeypatch.setattr(orchestrator, "changed_domains", lambda hv: set())


def _sweeper_skips_a_table(monkeypatch) -> None:
    from hypervisor.mm.incremental import IncrementalTyping

    needs = IncrementalTyping._needs_validation
    skipped: dict[int, int] = {}  # per typing: the table it never validates

    def but_one(self, mfns):
        if id(self) not in skipped:
            pending = self._queue[needs(self, self._queue)]
            skipped[id(self)] = int(pending[-1]) if pending.size else -1
        return needs(self, mfns) & (mfns != skipped[id(self)])

    monkeypatch.setattr(IncrementalTyping, "_needs_validation", but_one)


def _handover_drops(field: str):
    """The hand-over loses one field of a CPL-3 vCPU's Xen state (vcpu_guest_context)."""
    def plant(monkeypatch) -> None:
        from hypervisor.pv.xen import image as xen_image

        fill = xen_image.fill_vcpu_context

        def fill_but_drop(ctx, *args, **kwargs):
            fill(ctx, *args, **kwargs)
            setattr(ctx, field, 0)

        monkeypatch.setattr(xen_image, "fill_vcpu_context", fill_but_drop)

    return plant


def _no_validation_before(module_name: str):
    """A page-table write path forgets the lazy update's validation (the seam is skipped)."""
    def plant(monkeypatch) -> None:
        import importlib

        module = importlib.import_module(module_name)
        monkeypatch.setattr(module, "finish_pending_typing", lambda domain: None)

    return plant


@dataclass(frozen=True)
class Mutation:
    name: str
    plant: Callable[[pytest.MonkeyPatch], None]
    check: Callable[[], None]
    caught_as: type[BaseException]
    complaint: str  # a fragment of what the check says when it catches the bug


MUTATIONS = [
    Mutation("lazy shadow mode maps a page-table frame writable", _writable_page_tables,
             lazy_never_maps_a_page_table_writable, AssertionError, "mapped writable"),
    Mutation("full-walk (every strategy) drops user-CR3 references", _no_user_cr3,
             every_strategy_keeps_user_cr3_references, ProofFailed, "type state 'count'"),
    Mutation("the rebuilt EPT loses a write permission", _ept_loses_write,
             hvm_update_proves, ProofFailed, "EPT perms differs"),
    Mutation("posts due in the blackout are dropped", _blackout_posts_dropped,
             hvm_update_proves, ProofFailed, "fell due during the blackout"),
    Mutation("an aborted update reports a constant ok", _abort_proof_constant,
             aborted_update_reports_what_it_checked, AssertionError, "domains not checked"),
    Mutation("an aborted update damaged the old build's guest", _abort_damages_a_guest,
             aborted_update_reports_what_it_checked, ProofFailed, "frames changed"),
    Mutation("the transfer translator flips a pin bit", _translator_flips_a_pin,
             transfer_proves, ProofFailed, "type state 'pinned'"),
    Mutation("prevalidate trusts tables that changed after it ran",
             _prevalidate_trusts_stale_tables, prevalidate_redoes_what_changed, ProofFailed,
             "type state"),
    Mutation("the lazy sweeper skips a table", _sweeper_skips_a_table,
             lazy_proves_when_validation_completes, ProofFailed, "lazy typeref"),
    Mutation("the hand-over drops a CPL-3 vCPU's user GS base", _handover_drops("gs_base_user"),
             cpl3_update_proves, ProofFailed, "Xen vCPU state differs: gs_base_inactive"),
    Mutation("the hand-over drops a CPL-3 vCPU's kernel stack", _handover_drops("kernel_sp"),
             cpl3_update_proves, ProofFailed, "Xen vCPU state differs: kernel_sp"),
    Mutation("ptwr writes into a table lazy has not validated",
             _no_validation_before("hypervisor.pv.xen.ptwr"),
             table_writes_during_lazy_validate_first, AssertionError, "ptwr: the table write"),
    Mutation("update_va_mapping into a table lazy has not validated",
             _no_validation_before("hypervisor.pv.xen.hypercalls"),
             table_writes_during_lazy_validate_first, AssertionError,
             "update_va_mapping: the table write"),
]
IDS = [m.name for m in MUTATIONS]


@pytest.mark.parametrize("mutation", MUTATIONS, ids=IDS)
def test_the_check_passes_without_the_bug(mutation):
    mutation.check()


@pytest.mark.parametrize("mutation", MUTATIONS, ids=IDS)
def test_the_check_catches_the_planted_bug(mutation, monkeypatch):
    mutation.plant(monkeypatch)
    with pytest.raises(mutation.caught_as, match=mutation.complaint):
        mutation.check()
