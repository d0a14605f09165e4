"""The modelled native downtime: counters x per-operation costs.

Wall time in hvlab measures Python, not a hypervisor. To speak about what a
live update would cost natively, each phase counts the work it did and this
table prices it. The defaults are order-of-magnitude figures for a modern
x86 server hypervisor (a cache-missing page-table entry read ~2 ns; a page's
page_info cmpxchg-based type change ~20 ns; pausing a vCPU ~10 us with the
IPI and VMEXIT; a hand-over entry ~2 ns sequential).
What a domain's hand-over sent ahead of the pause costs is not priced, even
where the new build reads and claims it in the blackout (`late_staging_*`:
with `--exec` its process cannot start before the pause; natively the new
image is loaded and staged ahead).
They are deliberately simple and overridable (`--costs FILE` with a JSON
object of the same keys), so a researcher can plug in measured numbers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from hypervisor.lib.errors import HvlabError

MAX_COST_NS = 1e9  # one second per operation: beyond any hardware, and no overflow

DEFAULT_COSTS_NS: dict[str, float] = {
    "pause_per_vcpu": 10_000.0,
    "resume_per_vcpu": 5_000.0,
    # The hand-over describes ownership as runs of consecutive frames and lists
    # page-table frames only, so neither grows with memory; what was sent ahead
    # and staged before the pause is not in the blackout at all.
    "handover_per_entry": 2.0,  # one run or one page-table frame, written and read
    "claim_per_run": 50.0,  # one ownership extent restored in the blackout
    "pte_examined": 2.0,  # one page-table entry read and checked
    "page_validated": 20.0,  # one table's type transition (+ its bookkeeping)
    "ref_taken": 5.0,  # one typeref / general ref increment
    "frame_translated": 1.5,  # transfer: decode old layout, encode new
    "frame_copied": 0.5,  # prevalidate: install a prepared frame-table row
    "ept_entry_written": 1.0,
}


def load_costs(path: str | Path | None) -> dict[str, float]:
    costs = dict(DEFAULT_COSTS_NS)
    if path is None:
        return costs
    try:
        override = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise HvlabError(f"cost table {path}: {err}") from None
    if not isinstance(override, dict):
        raise HvlabError(f"cost table {path}: expected a JSON object")
    for key, value in override.items():
        if key not in costs:
            raise HvlabError(f"cost table {path}: unknown cost '{key}' "
                             f"(known: {', '.join(sorted(costs))})")
        if (not isinstance(value, int | float) or isinstance(value, bool)
                or not math.isfinite(value) or not 0 <= value <= MAX_COST_NS):
            raise HvlabError(f"cost table {path}: '{key}' must be a number of ns from 0 to "
                             f"{MAX_COST_NS:.0e}, got {json.dumps(value)}")
        costs[key] = float(value)
    return costs


def modelled_ns(counters: dict[str, int], costs: dict[str, float]) -> int:
    """Blackout work priced: only counters that happen inside the blackout."""
    c = counters.get
    total = (c("vcpus", 0) * (costs["pause_per_vcpu"] + costs["resume_per_vcpu"])
             + c("handover_entries", 0) * costs["handover_per_entry"]
             + c("ownership_runs", 0) * costs["claim_per_run"]
             + c("blackout_ptes_examined", 0) * costs["pte_examined"]
             + c("blackout_pages_validated", 0) * costs["page_validated"]
             + c("blackout_refs_taken", 0) * costs["ref_taken"]
             + c("frames_translated", 0) * costs["frame_translated"]
             + c("frames_copied", 0) * costs["frame_copied"]
             + c("ept_entries_written", 0) * costs["ept_entry_written"])
    return int(round(total))
