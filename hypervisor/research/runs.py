"""One run of a sweep: a `grid.Run` in, one tidy row (a flat dict) out.

`update`: a PV guest image (generated from size, layout and seed, or a stored
one) is restored on the run's from-build, runs 1 ms of virtual time and is
live-updated to its to-build by the strategy, the hand-over sent ahead while
it runs; a lazy update is run until shadow mode is off. `revalidate`: `hvlab
bench revalidate` for one size, build and seed.

Columns whose value depends on the machine or its load have `wall` in their
name; every other column is a function of the run's inputs and the build.
"""

from __future__ import annotations

import io
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import unicorn

from hypervisor.lib.errors import HvlabError
from hypervisor.research.grid import KEY_COLUMNS, Run

RUN_BEFORE_NS = 1_000_000
LAZY_RUN_LIMIT_NS = 200_000_000
TERM_COLUMNS = tuple(f"downtime_{t}_ns" for t in (
    "pause_vcpus", "handover_state", "teardown", "boot_new_build", "frame_table", "typerefs",
    "ept_rebuild", "resume_vcpus"))
COUNTER_COLUMNS = tuple(f"counter_{c}" for c in (
    "vcpus", "pcpus", "event_channels", "timers", "vcpu_contexts", "hvm_records",
    "handover_bytes", "handover_frames", "handover_entries", "domains_precopied",
    "ownership_runs", "frames_claimed", "frame_table_rows", "tables_changed_since_precopy",
    "ept_entries_written", "blackout_ptes_examined", "blackout_pages_validated",
    "blackout_refs_taken", "frames_translated", "frames_copied", "domains_redone",
    "lazy_fill_validations", "sweeper_steps", "lazy_ptes_examined", "lazy_pages_validated",
    "lazy_refs_taken", "shadow_off_virtual_ns", "precopy_entries", "frame_table_rows_staged",
    "prevalidate_ptes_examined", "prevalidate_pages_validated", "prevalidate_refs_taken"))
RESULT_COLUMNS = (
    "guest_bytes", "ptes", "page_tables", "proof_ok", "modelled_downtime_ns",
    "typeref_downtime_ns", "before_pause_work_ns", "deferred_work_ns",
    "modelled_revalidate_ns", "blackout_wall_s", "before_pause_wall_s", "after_resume_wall_s",
    "bulk_wall_s", "reference_wall_s", "scan_wall_s", "layout_wall_s")
META_COLUMNS = ("hvlab_version", "unicorn", "workers", "executor")
COLUMNS = KEY_COLUMNS + RESULT_COLUMNS + TERM_COLUMNS + COUNTER_COLUMNS + META_COLUMNS


def hvlab_version() -> str:
    try:
        return version("hvlab")
    except PackageNotFoundError:
        return "unknown"


def run_one(run: Run) -> dict[str, Any]:
    """Execute `run` in this process; the row (without the meta columns the sweep adds)."""
    row: dict[str, Any] = dict.fromkeys(COLUMNS, None)
    row.update(zip(KEY_COLUMNS, (run.kind, run.size_bytes, run.layout, run.image, run.strategy,
                                 run.from_build, run.to_build, run.seed, run.run), strict=True))
    row.update({"hvlab_version": hvlab_version(), "unicorn": unicorn.__version__})
    if run.kind == "update":
        row.update(_update(run))
    else:
        row.update(_revalidate(run))
    return row


def _update(run: Run) -> dict[str, Any]:
    from hypervisor.core.hypervisor import Hypervisor, MachineConfig
    from hypervisor.images import image_make
    from hypervisor.images.domains import restore_domain
    from hypervisor.liveupdate.costs import DEFAULT_COSTS_NS, deferred_ns
    from hypervisor.liveupdate.orchestrator import UpdatePlan, live_update, prepare
    from hypervisor.liveupdate.strategies.base import typed_work
    from hypervisor.liveupdate.strategies.lazy import lazy_update_of

    with tempfile.TemporaryDirectory(prefix="hvlab-sweep-") as tmp:
        image = Path(run.image) if run.image else Path(tmp) / "guest.img"
        if not run.image:
            image_make("pv", run.size_bytes, run.layout, run.seed, image, out=io.StringIO())
        guest = _guest_bytes(image)
        hv = Hypervisor(MachineConfig(1, guest + max(64 << 20, guest // 32)), run.from_build)
        try:
            dom = restore_domain(hv, image)
            hv.run(hv.now + RUN_BEFORE_NS)
            work = typed_work(hv.frame_table, dom.p2m.astype(np.int64))
            workdir = Path(tmp) / "handover"  # removed with tmp on every path
            workdir.mkdir()
            plan = UpdatePlan(run.to_build, run.strategy, workdir=workdir)
            started = time.perf_counter()
            prepared = prepare(hv, plan)
            before_pause_s = time.perf_counter() - started
            hv, report = live_update(hv, plan, prepared)
            after_s = 0.0
            if lazy_update_of(hv) is not None:  # lazy: run until its validation is done
                limit = hv.now + LAZY_RUN_LIMIT_NS
                while (lazy_update_of(hv) is not None and hv.now < limit
                       and hv.domains[0].alive):
                    hv.run(hv.now + 1_000_000)
                hv.finish_background_work()
                after_s = report["counters"].get("lazy_background_wall_s", 0.0)
                report["deferred_work_ns"] = deferred_ns(report["counters"], DEFAULT_COSTS_NS)
        finally:
            hv.teardown()
    row: dict[str, Any] = {
        "size_bytes": run.size_bytes or guest, "guest_bytes": guest,
        "ptes": work["ptes_examined"], "page_tables": work["pages_validated"],
        "proof_ok": bool(report["proof"]["ok"] and report.get("proof_after_lazy",
                                                                {"ok": True})["ok"]),
        "modelled_downtime_ns": report["modelled_downtime_ns"],
        "typeref_downtime_ns": report["typeref_downtime_ns"],
        "before_pause_work_ns": report["before_pause_work_ns"],
        "deferred_work_ns": report["deferred_work_ns"],
        "blackout_wall_s": report["blackout_wall_s"],
        "before_pause_wall_s": round(before_pause_s, 6), "after_resume_wall_s": after_s,
    }
    for term, ns in report["downtime_breakdown"].items():
        row[f"downtime_{term}_ns"] = ns
    counters = report["counters"] | report["before_pause"]
    for column in COUNTER_COLUMNS:
        value = counters.get(column.removeprefix("counter_"))
        row[column] = value
    return row


def _guest_bytes(image: Path) -> int:
    from hypervisor.images import image_info

    return int(image_info(image, out=io.StringIO())["memory_bytes"])


def _revalidate(run: Run) -> dict[str, Any]:
    from hypervisor.bench.revalidate import run_revalidate_bench
    from hypervisor.liveupdate.costs import DEFAULT_COSTS_NS

    r = run_revalidate_bench(run.size_bytes, run.from_build, True, io.StringIO(),
                             seed=run.seed, repeats=1)
    if not r["equal_on_sample"]:
        raise HvlabError(f"revalidate {run.size_bytes}: bulk and reference differ")
    return {
        "guest_bytes": run.size_bytes, "ptes": r["ptes"], "page_tables": r["page_table_frames"],
        "proof_ok": bool(r["equal_on_sample"]),
        "modelled_revalidate_ns": int(round(r["ptes"] * DEFAULT_COSTS_NS["pte_examined"]
                                            + r["page_table_frames"]
                                            * DEFAULT_COSTS_NS["page_validated"])),
        "bulk_wall_s": r["bulk_s"], "reference_wall_s": r["reference_s"],
        "scan_wall_s": r["scan_s"], "layout_wall_s": r["layout_s"],
    }
