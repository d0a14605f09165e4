"""`hvlab bench update`: what each typeref strategy costs, by guest size, in one run.

For every size a Linux-like PV guest image is generated once (a direct map of
all its RAM with 4 KiB pages plus process trees, running `pv_spin`). For
every strategy that image is restored on build 4.19, run for 1 ms of virtual
time, and live-updated to build 4.12, `repeat` times. A row reports the run
with the median blackout (wall and modelled native: the whole update, and its
typeref-only share, what the strategies differ in; every run's blackout is
listed too: a few milliseconds of Python move with the machine's caches),
and its total work: the blackout plus what the strategy did outside it
(before the pause: the hand-over sent ahead, the new build's tables staged,
prevalidation; after it: the lazy sweeper and fill validations).
"""

from __future__ import annotations

import io
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

import unicorn

from hypervisor.core.hypervisor import Hypervisor, MachineConfig
from hypervisor.images import image_make
from hypervisor.images.domains import restore_domain
from hypervisor.lib.errors import HvlabError
from hypervisor.lib.progress import progress
from hypervisor.liveupdate.orchestrator import (
    UpdatePlan,
    live_update,
    prepare,
)
from hypervisor.liveupdate.strategies import names as strategy_names
from hypervisor.liveupdate.strategies.lazy import lazy_update_of
from hypervisor.scenario import parse_size

RUN_BEFORE_NS = 1_000_000
LAZY_RUN_LIMIT_NS = 200_000_000  # stop running once shadow mode is off, or after this
FROM_BUILD, TO_BUILD = "4.19", "4.12"


def _host_bytes(guest: int) -> int:
    return guest + max(64 << 20, guest // 32)


def _one(image: Path, guest_bytes: int, strategy: str) -> dict[str, Any]:
    hv = Hypervisor(MachineConfig(1, _host_bytes(guest_bytes)), FROM_BUILD)
    restore_domain(hv, image)
    hv.run(hv.now + RUN_BEFORE_NS)
    plan = UpdatePlan(TO_BUILD, strategy)
    started = time.perf_counter()
    prepared = prepare(hv, plan)
    before_pause_s = time.perf_counter() - started
    hv, report = live_update(hv, plan, prepared)
    if not report["proof"]["ok"]:
        raise HvlabError(f"bench update: proof failed for {strategy}: {report['proof']}")
    background_s = 0.0
    if lazy_update_of(hv) is not None:  # work left after the resume: run until it is done
        limit = hv.now + LAZY_RUN_LIMIT_NS
        while lazy_update_of(hv) is not None and hv.now < limit and hv.domains[0].alive:
            hv.run(hv.now + 1_000_000)
        hv.finish_background_work()  # its report's counters are complete now
        background_s = report["counters"]["lazy_background_wall_s"]
        if not report.get("proof_after_lazy", {}).get("ok"):
            raise HvlabError("bench update: lazy typeref state differs after shadow-off")
    hv.teardown()
    return {
        "strategy": strategy,
        "size_gib": guest_bytes / (1 << 30),
        "blackout_wall_s": report["blackout_wall_s"],
        "modelled_downtime_ns": report["modelled_downtime_ns"],
        "typeref_downtime_ns": report["typeref_downtime_ns"],
        "downtime_breakdown": report["downtime_breakdown"],
        "before_pause_work_ns": report["before_pause_work_ns"],
        "deferred_work_ns": report["deferred_work_ns"],
        "total_work_wall_s": round(report["blackout_wall_s"] + before_pause_s + background_s, 6),
        "before_pause_wall_s": round(before_pause_s, 6),
        "after_resume_wall_s": round(background_s, 6),
        "phases_wall_s": report["phases_wall_s"],
        "counters": report["counters"],
    }


def _median_run(image: Path, guest_bytes: int, strategy: str, repeat: int) -> dict[str, Any]:
    runs = sorted((_one(image, guest_bytes, strategy) for _ in range(repeat)),
                  key=lambda r: r["blackout_wall_s"])
    row = runs[(len(runs) - 1) // 2]
    row["blackout_wall_s_runs"] = [r["blackout_wall_s"] for r in runs]
    return row


def run_update_bench(as_json: bool, sizes: str = "1G,4G,16G,64G", repeat: int = 3,
                     out: TextIO | None = None, quiet: bool = False) -> dict[str, Any]:
    out = out if out is not None else sys.stdout
    wanted = [parse_size(s.strip(), "--sizes") for s in sizes.split(",") if s.strip()]
    rows = []
    images: dict[int, float] = {}
    steps = len(wanted) * (1 + len(strategy_names()))
    with (tempfile.TemporaryDirectory(prefix="hvlab-bench-update-") as tmp,
          progress(steps, "bench update", quiet) as advance):
        for guest in wanted:
            image = Path(tmp) / f"pv-{guest >> 20}M.img"
            started = time.perf_counter()
            image_make("pv", guest, "linux-like", 1, image, out=io.StringIO())
            images[guest] = round(time.perf_counter() - started, 3)
            advance(f"{guest >> 20} MiB image made")
            for strategy in strategy_names():
                rows.append(_median_run(image, guest, strategy, repeat))
                advance(f"{guest >> 20} MiB {strategy}")
            image.unlink()
    result: dict[str, Any] = {
        "rows": rows,
        "image_make_wall_s": {f"{g / (1 << 30):g}G": s for g, s in images.items()},
        "from_build": FROM_BUILD, "to_build": TO_BUILD, "repeat": repeat,
        "unicorn": unicorn.__version__,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    result["goals"] = _goals(rows)
    if as_json:
        json.dump(result, out, indent=2)
        out.write("\n")
    else:
        out.write(f"{'strategy':<12} {'GiB':>5} {'blackout ms':>12} {'modelled ms':>12} "
                  f"{'typerefs ms':>12} "
                  f"{'total work ms':>14}\n")
        for r in rows:
            out.write(f"{r['strategy']:<12} {r['size_gib']:>5g} "
                      f"{r['blackout_wall_s'] * 1e3:>12.1f} "
                      f"{r['modelled_downtime_ns'] / 1e6:>12.3f} "
                      f"{r['typeref_downtime_ns'] / 1e6:>12.3f} "
                      f"{r['total_work_wall_s'] * 1e3:>14.1f}\n")
        for goal, verdict in result["goals"].items():
            out.write(f"goal {goal}: {verdict}\n")
    return result


def _goals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's goals, judged on this run's rows (where the sizes were measured)."""
    def row(strategy: str, size: float) -> dict[str, Any] | None:
        return next((r for r in rows if r["strategy"] == strategy and r["size_gib"] == size),
                    None)

    sizes = sorted({r["size_gib"] for r in rows})
    goals: dict[str, Any] = {}
    small, large = sizes[0], sizes[-1]
    lazy_small, lazy_large = row("lazy", small), row("lazy", large)
    if lazy_small and lazy_large and small != large:
        wall = lazy_large["blackout_wall_s"] / lazy_small["blackout_wall_s"]
        modelled = lazy_large["modelled_downtime_ns"] / lazy_small["modelled_downtime_ns"]
        typerefs = _ratio(lazy_large, lazy_small)
        goals[f"lazy blackout {large:g}G <= 1.5x {small:g}G"] = {
            "wall_ratio": round(wall, 3), "modelled_ratio": round(modelled, 3),
            "typeref_ratio": round(typerefs, 3), "met_wall": wall <= 1.5,
            "met_modelled": modelled <= 1.5, "met_typerefs": typerefs <= 1.5}
    walks = [row("full-walk", s) for s in sizes]
    modelled = [w["typeref_downtime_ns"] for w in walks if w]
    goals["full-walk typeref work grows with size"] = {"typeref_ns": modelled,
                                                       "met": modelled == sorted(modelled)}
    pre, walk = row("prevalidate", large), row("full-walk", large)
    if pre and walk:
        wall = pre["blackout_wall_s"] / walk["blackout_wall_s"]
        modelled = pre["modelled_downtime_ns"] / walk["modelled_downtime_ns"]
        typerefs = _ratio(pre, walk)
        # the whole update's fixed terms (booting the new build) are the same for both
        goals[f"prevalidate blackout <= 0.2x full-walk at {large:g}G"] = {
            "wall_ratio": round(wall, 3), "modelled_ratio": round(modelled, 3),
            "typeref_ratio": round(typerefs, 3), "met_wall": wall <= 0.2,
            "met_modelled": modelled <= 0.2, "met_typerefs": typerefs <= 0.2}
    return goals


def _ratio(a: dict[str, Any], b: dict[str, Any]) -> float:
    """a's typeref-only modelled downtime over b's (b has some: every strategy takes at
    least the roots' references in the blackout)."""
    return a["typeref_downtime_ns"] / max(b["typeref_downtime_ns"], 1)
