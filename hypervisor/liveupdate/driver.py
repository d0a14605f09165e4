"""Running a scenario through one or more live updates, and what it cost the guests."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from hypervisor.liveupdate.orchestrator import UpdatePlan, live_update, prepare
from hypervisor.runner import boot_scenario, describe
from hypervisor.scenario import Scenario, UpdateSpec

PREVALIDATE_LEAD_NS = 1_000_000  # prevalidation starts this long before the pause


def _instructions(hv) -> int:
    return sum(v.instructions for d in hv.domains for v in d.vcpus)


def _rate(instructions: int, ns: int) -> float | None:
    return round(instructions / (ns / 1e6), 1) if ns > 0 else None


def run_with_updates(scenario: Scenario, updates: list[UpdateSpec],
                     plan: UpdatePlan) -> dict[str, Any]:
    """Boot, run to each update's time, update, run to the end; one report per update."""
    started = time.perf_counter()
    hv = boot_scenario(scenario)
    reports = []
    for spec in sorted(updates, key=lambda u: u.at_ns):
        this = replace(plan, to_build=spec.to, strategy=spec.strategy)
        prepared = None
        if this.strategy == "prevalidate":
            hv.run(max(hv.now, spec.at_ns - PREVALIDATE_LEAD_NS))
            prepared = prepare(hv, this)
        segment_start, instr_start = hv.now, _instructions(hv)
        hv.run(spec.at_ns)
        if not any(d.alive for d in hv.domains):
            break
        before_rate = _rate(_instructions(hv) - instr_start, hv.now - segment_start)
        hv, report = live_update(hv, this, prepared)
        report["throughput"] = {"before": before_rate}
        reports.append((report, hv.now, _instructions(hv)))
    stop = hv.run(scenario.virtual_time_ns)
    end_ns, end_instr = hv.now, _instructions(hv)
    lazy = hv.lazy_update
    finished = []
    for report, resumed_ns, resumed_instr in reports:
        t = report.setdefault("throughput", {})
        t["after"] = _rate(end_instr - resumed_instr, end_ns - resumed_ns)
        if lazy is not None and lazy.shadow_off_ns is not None:
            t["during_lazy"] = _rate(lazy.instructions_at_end - lazy.instructions_at_start,
                                     lazy.shadow_off_ns - lazy.started_ns)
        finished.append(report)
    result = describe(hv, scenario, stop, time.perf_counter() - started)
    result["updates"] = finished
    if len(finished) == 1:
        result.update({k: v for k, v in finished[0].items() if k not in result})
    return result
