"""The live update: replace the running hypervisor by another build, memory in place.

Before the pause, while the guests still run (`prepare`), the old build sends
the bulk of the hand-over ahead (each PV domain's ownership runs and page-table
list, handover.py) and the new build's per-frame tables are staged with those
frames claimed, as a new hypervisor image is loaded ahead of a kexec;
`prevalidate` builds its type state then too. From then on type changes are
logged per frame, so the blackout hands over only what changed.

Phases (docs/design.md §4): pause every domain at a restartable boundary (the
hypervisor is between slices); the old build writes the hand-over streams;
the old hypervisor is torn down (engines gone, its own frames scrubbed); the
new build boots on the same host memory around the guests' frames, restores
ownership (what was not staged), then page types (by the chosen strategy),
then vCPU and event state with timers rearmed; then the guests resume, virtual
time advanced by the modelled downtime.

The point of no return is the teardown. A fault injected before it (or a
hand-over stream that does not read back) resumes the old build; a fault
after it is recovered by the new build starting that phase over from the
hand-over streams, which are still on disk. Either way the proof must pass.
"""

from __future__ import annotations

import gc
import hashlib
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from emulator.memory import HostMemory
from hypervisor.core.hypervisor import Hypervisor, MachineConfig, StagedTables
from hypervisor.core.seams import HVLAB_OWN, Seams
from hypervisor.hvm.image import adopt_hvm_domain
from hypervisor.lib.errors import HvlabError
from hypervisor.liveupdate.costs import (
    DEFAULT_COSTS_NS,
    TYPEREF_TERM,
    before_pause_ns,
    downtime_breakdown,
)
from hypervisor.liveupdate.handover import (
    DomainHandover,
    DomainMemory,
    HandoverError,
    changed_domains,
    frames_in_use,
    handed_over_pages,
    kept_pages,
    read_handover,
    read_precopy,
    state_counts,
    write_handover,
    write_precopy,
)
from hypervisor.liveupdate.proof import (
    ProofFailed,
    Snapshot,
    blackout_posts,
    capture,
    compare_types,
    proof_frames,
    type_state,
    verify,
)
from hypervisor.liveupdate.strategies import strategy as strategy_named
from hypervisor.liveupdate.strategies.base import (
    SWEEP_BUDGET_PTES,
    NewBuild,
    StagedState,
    Strategy,
    UpdateSettings,
)
from hypervisor.mm.incremental import IncrementalTyping
from hypervisor.pv.restore import install_domain, install_xen_abi_domain
from hypervisor.pv.xen.grant_table import GrantTable

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
    corrupt_stream: bool = False  # damage a stream of the pause (dom0.stream)
    corrupt_precopy: bool = False  # damage a stream sent ahead, as it waits on disk
    exec_new_process: bool = False
    sweep_budget_ptes: int = SWEEP_BUDGET_PTES  # work left after the resume, per quantum
    costs: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_COSTS_NS))
    workdir: Path | None = None  # given: the caller's, kept; else a temporary one, removed

    @property
    def settings(self) -> UpdateSettings:
        return UpdateSettings(self.to_build, self.sweep_budget_ptes, self.costs)


def check_updates(build: str, updates: list[tuple[str, str]], fail_at: str | None = None) -> None:
    """Refuse, before anything runs, a chain of (to_build, strategy) updates from
    `build` that cannot work: unknown builds or strategies, a transfer without a
    translator for its pair, an unknown --fail-at phase."""
    from hypervisor.mm.builds import get_build

    if fail_at is not None and fail_at not in PHASES:
        raise UpdateError(f"--fail-at {fail_at}: phases are {', '.join(PHASES)}")
    for to_build, name in updates:
        strategy = strategy_named(name)
        try:
            get_build(to_build)
        except Exception as err:  # noqa: BLE001 - the build registry's own message
            raise UpdateError(str(err)) from None
        strategy.check(build, UpdateSettings(to_build, SWEEP_BUDGET_PTES))
        build = to_build


def check_plan(hv: Hypervisor, plan: UpdatePlan) -> Strategy:
    """Refuse a plan that cannot work before anything is paused; its strategy."""
    check_updates(hv.build, [(plan.to_build, plan.strategy)], plan.fail_at)
    if plan.exec_new_process and hv.seams.plugged:
        raise UpdateError("--exec: a lab's code plugged into this build cannot cross into a "
                          "new process")
    for dom in hv.domains:
        if dom.kind not in ("pv", "hvm"):
            raise UpdateError(f"domain {dom.name}: live update of {dom.kind} domains is not "
                              "supported")
    return strategy_named(plan.strategy)


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


@dataclass
class StagedBuild:
    """The new build made ready before the pause: its per-frame tables with the
    guests' frames claimed, from the streams sent ahead, and those streams as read."""

    tables: StagedTables
    sent: dict[str, DomainMemory]  # stream name -> what it holds
    claimed: set[int]  # domids whose frames `tables` holds
    # type state a strategy set up before the pause, by domid
    typing: dict[int, IncrementalTyping] = field(default_factory=dict)


@dataclass
class Prepared:
    """What an update did while the guests still ran."""

    workdir: Path
    precopied: dict[int, str]  # domid -> its stream sent ahead
    staged: StagedBuild | None
    ahead: Any  # what the strategy did before the pause (`Strategy.before_pause`)
    report: dict[str, Any]  # wall times and counters, for the update's report
    temporary: bool = True  # workdir is ours to remove when the update is over
    sent: dict[str, DomainMemory] = field(default_factory=dict)  # as read back
    digests: dict[str, str] = field(default_factory=dict)  # stream name -> sha256

    def discard(self) -> None:
        """The update is over (done, aborted or failed): remove a temporary hand-over."""
        if self.temporary:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _workdir(plan: UpdatePlan) -> tuple[Path, bool]:
    """Where the hand-over is written, and whether it is temporary (removed after)."""
    if plan.workdir is not None:
        plan.workdir.mkdir(parents=True, exist_ok=True)
        return plan.workdir, False
    return Path(tempfile.mkdtemp(prefix="hvlab-handover-")), True


def _digest(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _check_sent_ahead(prepared: Prepared) -> None:
    """Before the point of no return: every stream sent ahead is still what was read
    back when it was sent (the new build, or a retried restore, reads it from disk)."""
    for name, digest in prepared.digests.items():
        try:
            same = _digest(prepared.workdir / name) == digest
        except OSError as err:
            raise HandoverError(f"hand-over stream {name}: {err}") from None
        if not same:
            raise HandoverError(f"hand-over stream {name}: changed on disk since it was "
                                "sent ahead and read back")


def prepare(hv: Hypervisor, plan: UpdatePlan) -> Prepared:
    """Before the pause: send the hand-over's bulk ahead, stage the new build on it
    (not with `--exec`: the new process does not exist yet) and let the strategy do
    its work ahead (prevalidate builds the new build's type state)."""
    check_plan(hv, plan)
    hv.finish_background_work()  # an earlier lazy update still validating: complete it
    workdir, temporary = _workdir(plan)
    try:
        return _prepare(hv, plan, workdir, temporary)
    except BaseException:
        if temporary:
            shutil.rmtree(workdir, ignore_errors=True)
        raise


def _prepare(hv: Hypervisor, plan: UpdatePlan, workdir: Path, temporary: bool) -> Prepared:
    wall: dict[str, float] = {}
    started = time.perf_counter()
    precopied, counters = write_precopy(hv, workdir)
    # natively the new build's frame table is set up ahead, even where (`--exec`) hvlab's
    # new process cannot start before the pause
    counters["frame_table_rows_staged"] = hv.memory.nr_frames
    wall["precopy_wall_s"] = time.perf_counter() - started

    started = time.perf_counter()
    sent = {name: read_precopy(workdir, name) for name in precopied.values()}  # read back
    digests = {name: _digest(workdir / name) for name in sent}
    staged = None
    if not plan.exec_new_process:
        tables = StagedTables.empty(hv.memory.nr_frames, plan.to_build, touch=True)
        for domid, name in precopied.items():
            tables.claim(sent[name].p2m, domid)
            # the hypervisor pages it owns, as they are now (restore adds any made since)
            pages = kept_pages(hv.domains[domid])
            tables.allocator.mark_used(pages)
            tables.frame_table.assign(pages, domid)
        staged = StagedBuild(tables, sent, set(precopied))
    wall["stage_wall_s"] = time.perf_counter() - started

    started = time.perf_counter()
    strategy = strategy_named(plan.strategy)
    state = None if staged is None else StagedState(
        staged.tables.frame_table,
        {domid: sent[name] for domid, name in precopied.items()}, staged.typing)
    ahead = strategy.before_pause(hv, plan.settings, state)
    wall["strategy_wall_s"] = time.perf_counter() - started
    counters |= strategy.ahead_counters(ahead)
    report = {k: round(v, 6) for k, v in wall.items()} | counters
    return Prepared(workdir, precopied, staged, ahead, report, temporary, sent, digests)


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
    ahead: Any  # the strategy's work before the pause
    changed: set[int]
    in_use: list[np.ndarray]  # per domid
    kept: list[np.ndarray]  # per domid: hypervisor pages it owns, in place (kept_pages)
    machine: MachineConfig
    now: int
    old_build: str
    started: float  # time.monotonic(): system-wide, comparable across processes
    staged: StagedBuild | None = None  # made before the pause, in this process
    seams: Seams = HVLAB_OWN  # a lab's code plugged into the old build goes on in the new
    temporary_workdir: bool = True  # removed once the new build has read it


def live_update(hv: Hypervisor, plan: UpdatePlan, prepared: Prepared | None = None,
                handoff: Callable[[Blackout], None] | None = None) -> tuple[Hypervisor, dict]:
    """Replace `hv` by a hypervisor of `plan.to_build`; returns it and the report.

    Without `prepared` nothing was sent ahead: the blackout hands everything over.
    With `handoff`, the old process hands the blackout over after the teardown
    (`--exec`: the callable execs a new process and does not return).
    """
    check_plan(hv, plan)
    if prepared is None:
        workdir, temporary = _workdir(plan)
        prepared = Prepared(workdir, {}, None, None, {}, temporary)
    try:  # (an exec'd handoff never returns here: the new process removes the hand-over)
        return _live_update(hv, plan, prepared, handoff)
    finally:
        prepared.discard()


def _live_update(hv: Hypervisor, plan: UpdatePlan, prepared: Prepared,
                 handoff: Callable[[Blackout], None] | None) -> tuple[Hypervisor, dict]:
    phases = _Phases(plan.fail_at)
    counters: dict[str, Any] = {"vcpus": sum(len(d.vcpus) for d in hv.domains),
                                "pcpus": hv.machine.pcpus, **state_counts(hv)}
    report: dict[str, Any] = {"strategy": plan.strategy, "from_build": hv.build,
                              "to_build": plan.to_build, "at_ns": hv.now}
    hv.finish_background_work()  # an earlier lazy update still validating: complete it
    if not prepared.temporary:
        report["handover_dir"] = str(prepared.workdir)  # the caller's own, kept
    report["before_pause"] = prepared.report
    # The proof's snapshot is instrumentation, not part of an update: outside the blackout.
    proof_started = time.monotonic()
    before = capture(hv)
    report["proof_capture_wall_s"] = round(time.monotonic() - proof_started, 6)
    with _collector_paused():
        return _blackout(hv, plan, prepared, phases, counters, report, before, handoff)


@contextmanager
def _collector_paused():
    """Python's garbage collection (freeing, say, a whole earlier machine's memory)
    is kept out of the blackout, as a native hypervisor has none: collect before."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _blackout(hv: Hypervisor, plan: UpdatePlan, prepared: Prepared, phases: _Phases,
              counters: dict[str, Any], report: dict[str, Any], before: Snapshot,
              handoff: Callable[[Blackout], None] | None) -> tuple[Hypervisor, dict]:
    started = time.monotonic()

    # ---- before the point of no return: any failure resumes the old build
    try:
        with phases.phase("pause"):
            pass  # domains stop at the slice boundary the hypervisor is already at
        with phases.phase("save"):
            counters.update(write_handover(hv, prepared.workdir,
                                           strategy_named(plan.strategy).hands_over_types,
                                           prepared.precopied))
            if plan.corrupt_stream or plan.corrupt_precopy:
                phases.injected.append(_corrupt(prepared, plan.corrupt_precopy))
            # read back: a stream the new build cannot read is fatal
            _check_sent_ahead(prepared)
            read_handover(prepared.workdir, prepared.sent, resolve=bool(prepared.sent))
    except (InjectedFault, HandoverError) as err:
        report.update(_aborted(phases, str(err), started))
        # The old build carries on: the proof is that the attempt changed nothing in it.
        report["proof"] = _prove(before, hv, "the old build, resumed after the abort")
        return hv, report

    # ---- the point of no return
    blackout = Blackout(
        plan, phases, counters, report, prepared.workdir, before, prepared.ahead,
        changed_domains(hv), [frames_in_use(d) for d in hv.domains],
        [kept_pages(d) for d in hv.domains],
        hv.machine, hv.now, hv.build, started, prepared.staged, hv.seams,
        temporary_workdir=prepared.temporary)
    memory = hv.memory
    _retrying(phases, "teardown", hv.teardown)
    if handoff is not None:
        blackout.staged = None  # a new process makes its own
        handoff(blackout)
    return complete_update(blackout, memory)


def complete_update(bo: Blackout, memory: HostMemory) -> tuple[Hypervisor, dict]:
    """The new build's side: restore ownership, typerefs, vCPU state; prove; resume.
    A temporary hand-over is removed when done, whatever happened."""
    try:
        return _complete_update(bo, memory)
    finally:
        if bo.temporary_workdir:
            shutil.rmtree(bo.workdir, ignore_errors=True)


def _complete_update(bo: Blackout, memory: HostMemory) -> tuple[Hypervisor, dict]:
    plan, phases, counters, report = bo.plan, bo.phases, bo.counters, bo.report

    typing: dict[int, IncrementalTyping] = {}  # set up before the pause (lazy)

    def restore() -> tuple[Hypervisor, list[DomainHandover]]:
        staged, bo.staged = bo.staged, None  # a retried restore starts from fresh tables
        claimed = staged.claimed if staged is not None else set()
        typing.clear()
        typing.update(staged.typing if staged is not None else {})
        # a staged domain's frames are marked already, but not pages it gained since
        in_use = [f if d not in claimed else bo.kept[d] for d, f in enumerate(bo.in_use)]
        new = Hypervisor(bo.machine, plan.to_build, memory, in_use=in_use,
                         staged=staged.tables if staged is not None else None,
                         seams=bo.seams)
        new.now = bo.now
        handovers = read_handover(bo.workdir, staged.sent if staged is not None else None)
        # what was sent ahead but could not be staged before the pause (costs.py)
        counters["late_staging_entries"] = sum(ho.entries_read for ho in handovers)
        counters["late_staging_runs"] = counters["ownership_runs"] = 0
        for domid, ho in enumerate(handovers):
            # HVM frames carry no PV ownership (as when built)
            if ho.kind == "pv" and domid not in claimed:
                key = "late_staging_runs" if "precopy" in ho.meta else "ownership_runs"
                counters[key] += new.claim_frames(ho.p2m, domid)
            if ho.kind == "pv":  # hypervisor pages it owns (shared_info, grant frames)
                pages = handed_over_pages(ho.meta)
                pages = pages[new.frame_table.owner[pages.astype(np.int64)] != domid]
                new.frame_table.assign(pages, domid)
                counters["ownership_runs"] += int(pages.size)
        counters["frames_claimed"] = int(sum(ho.p2m.size for ho in handovers))  # (unpriced)
        # the new build's frame table, unless it was set up before the pause
        counters["frame_table_rows"] = 0 if report["before_pause"] else memory.nr_frames
        counters["tables_changed_since_precopy"] = sum(ho.tables_changed for ho in handovers)
        return new, handovers

    new, handovers = _retrying(phases, "restore", restore)

    strategy = strategy_named(plan.strategy)
    nb = NewBuild(new, handovers, plan.settings, bo.old_build, bo.ahead, bo.changed, typing,
                  counters)
    counters.update(_retrying(phases, "typerefs", lambda: strategy.rebuild(nb),
                              cleanup=lambda: strategy.reset(nb)))
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
            bases = {vid: (ctx.ctrlreg[3] >> 12, ctx.user_table or 0)
                     for vid, ctx in ho.contexts.items()}
            dom = install_handed_over(new, ho, bases)
            strategy.domain_installed(nb, dom, ho)

    _retrying(phases, "resume", resume)
    blackout_wall = time.monotonic() - bo.started

    proof = _prove(bo.before, new, f"the new build {plan.to_build}",
                   check_types=strategy.proves_types_at_resume, report=report)
    breakdown = downtime_breakdown(counters, plan.costs)
    downtime = sum(breakdown.values())
    new.now += downtime  # guests see the blackout as time that passed (their offsets stay)
    _devices_catch_up(new)
    proof["blackout_interrupts"] = blackout_posts(bo.before, new)
    if not proof["blackout_interrupts"]["ok"]:
        proof["ok"] = False
        raise ProofFailed("live update proof failed: "
                          + "; ".join(proof["blackout_interrupts"]["problems"][:5]))
    report.update({
        "outcome": "updated",
        "blackout_wall_s": round(blackout_wall, 6),
        "modelled_downtime_ns": downtime,
        "downtime_breakdown": breakdown,
        "typeref_downtime_ns": breakdown[TYPEREF_TERM],
        "before_pause_work_ns": before_pause_ns(report["before_pause"], plan.costs),
        # work left after the resume (lazy) is priced when it completes
        "deferred_work_ns": 0 if strategy.proves_types_at_resume else None,
        "phases_wall_s": {p: round(phases.wall.get(p, 0.0), 6) for p in PHASES},
        "counters": counters,
        "proof": proof,
        "injected": phases.injected,
    })

    def prove(dom) -> list[str]:
        """A domain's type state now against the old build's (strategies that finish
        after the resume call this when they do)."""
        return compare_types(dom.name, bo.before.types[dom.domid],
                             type_state(new, proof_frames(dom)))

    strategy.resumed(nb, report, prove)
    return new, report


def install_handed_over(hv: Hypervisor, ho: DomainHandover,
                        bases: dict[int, tuple[int, int]]):
    """A handed-over PV domain in the new build, its memory and hypervisor pages in
    place: a CPL-3 domain (Linux) with its Xen vCPU state and backends, and any
    domain's grant table."""
    kept = ho.meta.get("kept_pages") or {}
    if "linux" in ho.meta:
        dom = install_xen_abi_domain(hv, ho.meta, ho.p2m, int(kept["shared_info_mfn"]),
                                     ho.contexts, bases, ho.meta["name"])
    else:
        dom = install_domain(hv, ho.meta, ho.p2m, ho.contexts, bases)
    table = kept.get("grant_table")
    if table is not None:
        dom.grant_table = GrantTable(table["max_frames"], list(table["frames"]),
                                     table["version"])
    return dom


def _devices_catch_up(hv: Hypervisor) -> None:
    """Devices are hardware: what fell due while no hypervisor ran is posted by the time
    the guests resume (as each slice's start does for its own time), sleepers woken."""
    for dom in hv.domains:
        for v in dom.vcpus:
            dom.policy.on_time(v, hv.now)


def _prove(before: Snapshot, hv: Hypervisor, subject: str, check_types: bool = True,
           report: dict[str, Any] | None = None) -> dict[str, Any]:
    """The proof's verdict on `hv` against the snapshot; a failed proof is raised."""
    started = time.monotonic()
    proof = {"subject": subject} | verify(before, hv, check_types=check_types)
    if report is not None:
        report["proof_verify_wall_s"] = round(time.monotonic() - started, 6)
    if not proof["ok"]:
        raise ProofFailed(f"live update proof failed ({subject}): "
                          + "; ".join(proof["problems"][:5]))
    return proof


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
            "modelled_downtime_ns": 0, "downtime_breakdown": {},
            "phases_wall_s": {p: round(phases.wall.get(p, 0.0), 6) for p in PHASES},
            "counters": {}, "injected": phases.injected}


def _corrupt(prepared: Prepared, sent_ahead: bool) -> str:
    """Damage the first stream's first record header (for fault-injection tests): of
    the pause's streams, or of those sent ahead; returns what was damaged."""
    pattern = "dom*.precopy" if sent_ahead else "dom*.stream"
    paths = sorted(prepared.workdir.glob(pattern))
    if not paths:
        return f"corrupt-stream: no {pattern} to damage"
    data = bytearray(paths[0].read_bytes())
    data[40:48] = b"\xff" * 8
    paths[0].write_bytes(bytes(data))
    return f"corrupt-stream {paths[0].name}"
