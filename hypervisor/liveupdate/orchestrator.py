"""The live update: replace the running hypervisor by another build, memory in place.

Phases (DESIGN.md §4): pause every domain at a restartable boundary (the
hypervisor is between slices); the old build writes the hand-over streams;
the old hypervisor is torn down (engines gone, its own frames scrubbed); the
new build boots on the same host memory around the guests' frames, restores
ownership, then page types (by the chosen strategy), then vCPU and event
state with timers rearmed; then the guests resume, virtual time advanced by
the modelled downtime.

The point of no return is the teardown. A fault injected before it (or a
hand-over stream that does not read back) resumes the old build; a fault
after it is recovered by the new build starting that phase over from the
hand-over streams, which are still on disk. Either way the proof must pass.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from emulator.memory import HostMemory
from hypervisor.errors import HvlabError
from hypervisor.hvm.image import adopt_hvm_domain
from hypervisor.hypervisor import Hypervisor, MachineConfig, StagedTables
from hypervisor.liveupdate import strategies
from hypervisor.liveupdate.costs import DEFAULT_COSTS_NS, modelled_ns
from hypervisor.liveupdate.handover import (
    DomainHandover,
    HandoverError,
    frames_in_use,
    read_handover,
    write_handover,
)
from hypervisor.liveupdate.lazy import start_lazy
from hypervisor.liveupdate.proof import (
    ProofFailed,
    Snapshot,
    capture,
    compare_types,
    type_state,
    verify,
)
from hypervisor.mm.frametable import DOMID_INVALID
from hypervisor.restore import install_domain

PHASES = ("pause", "save", "teardown", "restore", "typerefs", "resume")


class InjectedFault(Exception):
    """A failure `--fail-at` asked for."""


class UpdateError(HvlabError):
    pass


@dataclass
class UpdatePlan:
    to_build: str
    strategy: str
    fail_at: str | None = None
    corrupt_stream: bool = False
    exec_new_process: bool = False
    sweep_budget_ptes: int = strategies.SWEEP_BUDGET_PTES  # lazy: per quantum
    costs: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_COSTS_NS))
    workdir: Path | None = None


def check_plan(hv: Hypervisor, plan: UpdatePlan) -> None:
    """Refuse a plan that cannot work before anything is paused."""
    from hypervisor.builds import get_build

    if plan.strategy not in strategies.STRATEGIES:
        raise UpdateError(f"unknown strategy '{plan.strategy}' "
                          f"(choose from {', '.join(strategies.STRATEGIES)})")
    try:
        get_build(plan.to_build)
    except Exception as err:  # noqa: BLE001 - the build registry's own message
        raise UpdateError(str(err)) from None
    if plan.fail_at is not None and plan.fail_at not in PHASES:
        raise UpdateError(f"--fail-at {plan.fail_at}: phases are {', '.join(PHASES)}")
    if plan.strategy == "transfer":
        strategies.translator_for(hv.build, plan.to_build)
    for dom in hv.domains:
        if dom.kind not in ("pv", "hvm"):
            raise UpdateError(f"domain {dom.name}: live update of {dom.kind} domains is not "
                              "supported")


class _Phases:
    """Wall time per phase, and the one injected fault."""

    def __init__(self, fail_at: str | None) -> None:
        self.wall: dict[str, float] = {}
        self.fail_at = fail_at
        self.injected: list[str] = []

    @contextmanager
    def phase(self, name: str):
        started = time.perf_counter()
        try:
            yield
            if self.fail_at == name and name not in self.injected:
                self.injected.append(name)
                raise InjectedFault(f"injected failure at the end of phase '{name}'")
        finally:
            self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - started


def prepare(hv: Hypervisor, plan: UpdatePlan) -> strategies.Prevalidation | None:
    """Work done while guests still run (only `prevalidate` has any)."""
    check_plan(hv, plan)
    if plan.strategy == "prevalidate":
        return strategies.prevalidate(hv, plan.to_build)
    return None


@dataclass
class Blackout:
    """Everything the new build needs to finish an update: plain data, picklable, so
    that with `--exec` a fresh process can take over after the old one has gone."""

    plan: UpdatePlan
    phases: _Phases
    counters: dict[str, Any]
    report: dict[str, Any]
    workdir: Path
    before: Snapshot
    prepared: strategies.Prevalidation | None
    changed: set[int]
    in_use: list[np.ndarray]
    machine: MachineConfig
    now: int
    old_build: str
    started: float  # time.monotonic(): system-wide, comparable across processes
    staged: StagedTables | None = None  # the new build's empty tables, made before the pause


def stage_new_build(hv: Hypervisor, plan: UpdatePlan) -> StagedTables:
    """Before the pause: the new build's per-frame tables, empty and faulted in."""
    return StagedTables.empty(hv.memory.nr_frames, plan.to_build, touch=True)


def live_update(hv: Hypervisor, plan: UpdatePlan,
                prepared: strategies.Prevalidation | None = None,
                handoff: Callable[[Blackout], None] | None = None,
                staged: StagedTables | None = None) -> tuple[Hypervisor, dict]:
    """Replace `hv` by a hypervisor of `plan.to_build`; returns it and the report.

    With `handoff`, the old process hands the blackout over after the teardown
    (`--exec`: the callable execs a new process and does not return).
    """
    check_plan(hv, plan)
    phases = _Phases(plan.fail_at)
    counters: dict[str, Any] = {"vcpus": sum(len(d.vcpus) for d in hv.domains)}
    report: dict[str, Any] = {"strategy": plan.strategy, "from_build": hv.build,
                              "to_build": plan.to_build, "at_ns": hv.now}
    workdir = plan.workdir or Path(tempfile.mkdtemp(prefix="hvlab-handover-"))
    # The proof's snapshot is instrumentation, not part of an update: outside the blackout.
    proof_started = time.monotonic()
    before = capture(hv)
    report["proof_capture_wall_s"] = round(time.monotonic() - proof_started, 6)
    started = time.monotonic()

    # ---- before the point of no return: any failure resumes the old build
    try:
        with phases.phase("pause"):
            pass  # domains stop at the slice boundary the hypervisor is already at
        with phases.phase("save"):
            counters.update(write_handover(hv, workdir, plan.strategy == "transfer"))
            if plan.corrupt_stream:
                _corrupt(workdir)
            read_handover(workdir)  # read back: a stream the new build cannot read is fatal
    except (InjectedFault, HandoverError) as err:
        report.update(_aborted(phases, str(err), started))
        return hv, report

    # ---- the point of no return
    blackout = Blackout(
        plan, phases, counters, report, workdir, before, prepared,
        set(hv.pt_change_log or ()),
        [frames_in_use(d) for d in hv.domains],
        hv.machine, hv.now, hv.build, started, staged)
    memory = hv.memory
    _retrying(phases, "teardown", hv.teardown)
    if handoff is not None:
        blackout.staged = None  # a new process makes its own
        handoff(blackout)
    return complete_update(blackout, memory)


def complete_update(bo: Blackout, memory: HostMemory) -> tuple[Hypervisor, dict]:
    """The new build's side: restore ownership, typerefs, vCPU state; prove; resume."""
    plan, phases, counters, report = bo.plan, bo.phases, bo.counters, bo.report

    def restore() -> tuple[Hypervisor, list[DomainHandover]]:
        staged, bo.staged = bo.staged, None  # a retried restore starts from fresh tables
        new = Hypervisor(bo.machine, plan.to_build, memory, in_use=bo.in_use, staged=staged)
        new.now = bo.now
        handovers = read_handover(bo.workdir)
        for domid, ho in enumerate(handovers):
            if ho.kind == "pv":  # HVM frames carry no PV ownership (as when built)
                new.claim_frames(ho.p2m, domid)
        counters["frames_claimed"] = int(sum(ho.p2m.size for ho in handovers))  # (unpriced)
        return new, handovers

    new, handovers = _retrying(phases, "restore", restore)

    def typerefs() -> dict[str, Any]:
        if plan.strategy == "full-walk":
            return strategies.full_walk(new, handovers)
        if plan.strategy == "transfer":
            return strategies.transfer(new, handovers, bo.old_build)
        if plan.strategy == "prevalidate":
            if bo.prepared is None:
                raise UpdateError("strategy prevalidate: nothing was prepared before the pause")
            return strategies.install_prevalidated(new, handovers, bo.prepared, bo.changed)
        return {}  # lazy: roots only, below, once the domains exist

    def reset_types() -> None:
        """A typeref phase that failed half way starts over from bare ownership."""
        ft = new.frame_table
        for domid, ho in enumerate(handovers):
            if ho.kind != "pv":
                continue
            rows = ho.p2m.astype(np.int64)
            for name in ("type_info", "count_info", "nr_validated_ptes", "partial_flags",
                         "linear_pt_count"):
                getattr(ft, name)[rows] = 0
            ft.owner[rows] = DOMID_INVALID
            ft.assign(ho.p2m, domid)

    counters.update(_retrying(phases, "typerefs", typerefs, cleanup=reset_types))
    report["translator"] = counters.pop("translator", None)

    def resume() -> None:
        if new.domains:
            return  # a retried resume: the domains were installed already
        counters["ept_entries_written"] = 0
        for ho in handovers:
            if ho.kind == "hvm":
                assert ho.hvm_p2m is not None and ho.posted_mfn is not None
                dom = adopt_hvm_domain(new, ho.hvm_records, ho.hvm_p2m, ho.posted_mfn,
                                       bo.workdir / f"dom{len(new.domains)}.stream")
                assert dom.hvm is not None
                counters["ept_entries_written"] += dom.hvm.physmap.ept_entries()
                continue  # EPT is rebuilt from the P2M whatever the strategy
            bases = {vid: (ctx.ctrlreg[3] >> 12, ctx.ctrlreg[1] >> 12)
                     for vid, ctx in ho.contexts.items()}
            dom = install_domain(new, ho.meta, ho.p2m, ho.contexts, bases)
            if plan.strategy == "lazy":
                start_lazy(new, dom, ho, plan.sweep_budget_ptes)

    _retrying(phases, "resume", resume)
    if new.lazy_update is not None:
        counters.update(new.lazy_update.blackout)
    blackout_wall = time.monotonic() - bo.started

    proof_started = time.monotonic()
    proof = verify(bo.before, new, check_types=plan.strategy != "lazy")
    report["proof_verify_wall_s"] = round(time.monotonic() - proof_started, 6)
    if not proof["ok"]:
        raise ProofFailed("live update proof failed: " + "; ".join(proof["problems"][:5]))
    downtime = modelled_ns(counters, plan.costs)
    new.now += downtime  # guests see the blackout as time that passed (their offsets stay)
    report.update({
        "outcome": "updated",
        "blackout_wall_s": round(blackout_wall, 6),
        "modelled_downtime_ns": downtime,
        "phases": {p: round(phases.wall.get(p, 0.0), 6) for p in PHASES},
        "counters": counters,
        "proof": proof,
        "injected": phases.injected,
        "handover_dir": str(bo.workdir),
    })
    if plan.strategy == "lazy":
        _arm_lazy_proof(new, bo.before, report)
    return new, report


def _arm_lazy_proof(new: Hypervisor, before: Snapshot, report: dict[str, Any]) -> None:
    """Prove each domain's type state the moment its lazy validation completes
    (before its guest can change a table), and report when all are done."""
    lazy = new.lazy_update
    problems: list[str] = []
    if lazy is None:  # no PV domain: nothing is validated lazily (HVM has no page types)
        report["proof_after_lazy"] = {"ok": True, "problems": [], "domains": 0}
        return

    def on_domain_done(dom) -> None:
        problems.extend(compare_types(dom.name, before.types[dom.domid],
                                      type_state(new, dom.p2m)))
        if problems:
            raise ProofFailed("lazy typeref reconstruction differs: " + "; ".join(problems[:5]))

    def on_done() -> None:
        report["proof_after_lazy"] = {"ok": not problems, "problems": problems,
                                      "domains": len(lazy.domains)}
        report["counters"].update(lazy.counters(new))

    lazy.on_domain_done = on_domain_done
    lazy.on_done = on_done


def _retrying(phases: _Phases, name: str, fn: Callable[[], Any],
              cleanup: Callable[[], None] | None = None) -> Any:
    """After the point of no return: a failed phase is done again, from the streams."""
    try:
        with phases.phase(name):
            return fn()
    except InjectedFault:
        if cleanup is not None:
            cleanup()
        with phases.phase(name):
            return fn()


def _aborted(phases: _Phases, why: str, started: float) -> dict[str, Any]:
    return {"outcome": "aborted: the old build resumed", "reason": why,
            "blackout_wall_s": round(time.monotonic() - started, 6),
            "modelled_downtime_ns": 0,
            "phases": {p: round(phases.wall.get(p, 0.0), 6) for p in PHASES},
            "counters": {}, "proof": {"ok": True, "checks": {}, "problems": []},
            "injected": phases.injected}


def _corrupt(workdir: Path) -> None:
    """Damage the first stream's first record header (for fault-injection tests)."""
    path = sorted(workdir.glob("dom*.stream"))[0]
    data = bytearray(path.read_bytes())
    data[40:48] = b"\xff" * 8
    path.write_bytes(bytes(data))

