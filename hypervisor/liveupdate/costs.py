"""The modelled native downtime: counters x per-operation costs, as an explained sum.

Wall time in hvlab measures Python, not a hypervisor. To speak about what a
live update would cost natively, each phase counts the work it did and this
table prices it. `downtime_breakdown` splits the blackout into the phases of
a native update (pause, hand over state, tear down, boot the new build,
rebuild the frame table, typerefs, EPT, resume); `modelled_ns` is exactly
their sum. Work a strategy does while the guests run is priced too, never
free: `before_pause_ns` (the hand-over sent ahead, the new build's frame
table staged, prevalidation) and `deferred_ns` (lazy's fill validations and
sweep after the resume).

Every default has an origin (`COST_TABLE`, printed by `hvlab costs`): a
measurement on the development machine (how and when), a published figure
(with its citation), or an estimate labelled as such. Not priced: what the
new build reads in the blackout from a stream sent ahead (`late_staging_*`,
only with `--exec`: its process cannot start before the pause; natively the
new image is loaded and staged ahead), guest I/O in flight, dom0/toolstack
work, and cache/TLB warm-up after the resume. `--costs FILE` (a JSON object
of the same keys) overrides any value.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from hypervisor.lib.errors import HvlabError

MAX_COST_NS = 1e9  # one second per operation: beyond any hardware, and no overflow

MEASURED, PUBLISHED, ESTIMATE = "measured", "published", "estimate"

# Published anchors the estimates are checked against (whole updates, not terms).
HOTSWAP = ("HotSwap (F. Brasser et al., TU Darmstadt; live update of Xen 4.2, "
           "xen-devel 'HotSwap: Live Update for Xen', 2014-01-17): ~45 ms per whole update")
HYPERFRESH = ("HyperFresh (S. Doddamani et al., 'Fast and Live Hypervisor Replacement', "
              "VEE 2019, doi:10.1145/3313808.3313821): replacement within ~10 ms")
HYFIX = ("Hy-FiX (A. Segalini et al., 'Hy-FiX: Fast In-Place Upgrades of KVM Hypervisors', "
         "IEEE TCC 10(4), 2022, doi:10.1109/TCC.2021.3056590): 7.6 s host reboot; "
         "2.31 s checkpoint/restore of a 256 GB VM")
AWS_LU = ("A. Shah, D. Woodhouse (AWS), 'Live-Updating Xen', Xen Project Developer and "
          "Design Summit 2019: load target Xen; pause domains; mask their interrupts; "
          "serialise domain and Xen state; jump (kexec) to the target; deserialise; unpause")
ANCHORS = (HOTSWAP, HYPERFRESH, HYFIX, AWS_LU)

_MEASURED_HOW = ("measured 2026-12-04 on the development VM (AMD EPYC, 2 vCPUs) with "
                 "`hvlab costs --measure`: best of 5 numpy passes over 256 MiB, {what}; "
                 "a Xen struct page_info row is 32 bytes")


@dataclass(frozen=True)
class Cost:
    ns: float
    origin: str  # MEASURED, PUBLISHED or ESTIMATE
    source: str  # how it was measured, the citation, or the reasoning behind the estimate


COST_TABLE: dict[str, Cost] = {
    "pause_per_vcpu": Cost(10_000.0, ESTIMATE, "IPI to each pCPU, VMEXIT/trap, save to a "
                           "restartable boundary; AWS_LU phase 'pause domains'"),
    "resume_per_vcpu": Cost(5_000.0, ESTIMATE, "reload one vCPU context and VMENTER"),
    "handover_per_entry": Cost(2.0, ESTIMATE, "one ownership run or page-table frame, written "
                               "and read sequentially (a cache line per few entries)"),
    "evtchn_handed_over": Cost(50.0, ESTIMATE, "one bound event channel serialised and "
                               "re-bound (port table entry + pending bits)"),
    "timer_handed_over": Cost(200.0, ESTIMATE, "one armed timer serialised and re-armed in "
                              "the new build's timer heap"),
    "vcpu_context_handed_over": Cost(1_000.0, ESTIMATE, "one vCPU context (~5 KiB with FPU/"
                                     "XSAVE state) serialised and restored"),
    "hvm_record_handed_over": Cost(500.0, ESTIMATE, "one HVM save record (CPU, LAPIC, "
                                   "LAPIC_REGS, params) encoded and loaded"),
    "teardown_fixed": Cost(1_000_000.0, ESTIMATE, "old build quiesced: interrupts masked, "
                           "other CPUs parked, its own heap released; AWS_LU 'serialise Xen "
                           "state', bounded by HOTSWAP's ~45 ms whole update"),
    "kexec_boot_fixed": Cost(3_000_000.0, ESTIMATE, "kexec jump to the staged image and the "
                             "new build's early boot with no firmware and no memory scrub; "
                             "fixed, bounded by HYPERFRESH's ~10 ms and HOTSWAP's ~45 ms whole "
                             "updates (a firmware reboot is HYFIX's 7.6 s)"),
    "cpu_bringup_per_pcpu": Cost(100_000.0, ESTIMATE, "INIT-SIPI-SIPI and the AP's trampoline "
                                 "per physical CPU"),
    "percpu_init_per_pcpu": Cost(50_000.0, ESTIMATE, "per-CPU areas, IDT/GDT, timers, "
                                 "scheduler run queue of one physical CPU"),
    "frame_table_row_init": Cost(0.41, MEASURED, _MEASURED_HOW.format(
        what="a fill: 78 GB/s = 0.41 ns per 32-byte row")),
    "claim_per_run": Cost(50.0, ESTIMATE, "one ownership extent restored in the blackout"),
    "pte_examined": Cost(2.0, ESTIMATE, "one page-table entry read and checked "
                         "(a cache-missing sequential read)"),
    "page_validated": Cost(20.0, ESTIMATE, "one table's type transition: page_info cmpxchg "
                           "and bookkeeping"),
    "ref_taken": Cost(5.0, ESTIMATE, "one typeref or general reference increment"),
    "frame_translated": Cost(1.5, ESTIMATE, "transfer: decode a row in the old layout, encode "
                             "it in the new"),
    "frame_copied": Cost(2.33, MEASURED, _MEASURED_HOW.format(
        what="a copy: 13.8 GB/s = 2.33 ns per 32-byte row")),
    "ept_entry_written": Cost(1.0, ESTIMATE, "one EPT entry written from the P2M"),
    "fill_trap": Cost(1_000.0, ESTIMATE, "lazy: the guest's fault into the hypervisor and "
                      "back around one fill validation (a VMEXIT/trap round trip)"),
}

DEFAULT_COSTS_NS: dict[str, float] = {k: c.ns for k, c in COST_TABLE.items()}

# The blackout's phases, in the order a native update does them.
TERMS = ("pause_vcpus", "handover_state", "teardown", "boot_new_build", "frame_table",
         "typerefs", "ept_rebuild", "resume_vcpus")
TYPEREF_TERM = "typerefs"


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


def _priced(counters: dict[str, int], costs: dict[str, float],
            items: tuple[tuple[str, str], ...]) -> float:
    return sum((counters.get(counter) or 0) * costs[cost] for counter, cost in items)


def downtime_breakdown(counters: dict[str, int], costs: dict[str, float]) -> dict[str, int]:
    """The blackout, phase by phase, in ns (only counters of work inside the blackout)."""
    one_update = {"updates": 1} | counters
    terms = {
        "pause_vcpus": _priced(counters, costs, (("vcpus", "pause_per_vcpu"),)),
        "handover_state": _priced(counters, costs, (
            ("handover_entries", "handover_per_entry"),
            ("event_channels", "evtchn_handed_over"),
            ("timers", "timer_handed_over"),
            ("vcpu_contexts", "vcpu_context_handed_over"),
            ("hvm_records", "hvm_record_handed_over"))),
        "teardown": _priced(one_update, costs, (("updates", "teardown_fixed"),)),
        "boot_new_build": _priced(one_update, costs, (
            ("updates", "kexec_boot_fixed"),
            ("pcpus", "cpu_bringup_per_pcpu"),
            ("pcpus", "percpu_init_per_pcpu"))),
        "frame_table": _priced(counters, costs, (
            ("frame_table_rows", "frame_table_row_init"),
            ("ownership_runs", "claim_per_run"))),
        "typerefs": _priced(counters, costs, (
            ("blackout_ptes_examined", "pte_examined"),
            ("blackout_pages_validated", "page_validated"),
            ("blackout_refs_taken", "ref_taken"),
            ("frames_translated", "frame_translated"),
            ("frames_copied", "frame_copied"))),
        "ept_rebuild": _priced(counters, costs, (("ept_entries_written", "ept_entry_written"),)),
        "resume_vcpus": _priced(counters, costs, (("vcpus", "resume_per_vcpu"),)),
    }
    return {term: int(round(terms[term])) for term in TERMS}


def modelled_ns(counters: dict[str, int], costs: dict[str, float]) -> int:
    """The modelled blackout: exactly the sum of `downtime_breakdown`."""
    return sum(downtime_breakdown(counters, costs).values())


def before_pause_ns(counters: dict[str, int], costs: dict[str, float]) -> int:
    """Work done while the guests still ran: hand-over sent ahead, tables staged,
    prevalidation."""
    return int(round(_priced(counters, costs, (
        ("precopy_entries", "handover_per_entry"),
        ("frame_table_rows_staged", "frame_table_row_init"),
        ("prevalidate_ptes_examined", "pte_examined"),
        ("prevalidate_pages_validated", "page_validated"),
        ("prevalidate_refs_taken", "ref_taken")))))


def deferred_ns(counters: dict[str, int], costs: dict[str, float]) -> int:
    """Work left for after the resume (lazy): fill validations with their traps and the
    sweep, that is all lazy typing work but the blackout's own share."""
    after = {key: (counters.get(f"lazy_{key}") or 0) - (counters.get(f"blackout_{key}") or 0)
             for key in ("ptes_examined", "pages_validated", "refs_taken")}
    after["fills"] = counters.get("lazy_fill_validations") or 0
    return int(round(_priced(after, costs, (
        ("ptes_examined", "pte_examined"), ("pages_validated", "page_validated"),
        ("refs_taken", "ref_taken"), ("fills", "fill_trap")))))


# The machine-level terms every update pays once, whatever its guests (tear down, boot).
FIXED_COSTS = ("teardown_fixed", "kexec_boot_fixed", "cpu_bringup_per_pcpu",
               "percpu_init_per_pcpu")


def without_fixed_costs(costs: dict[str, float]) -> dict[str, float]:
    """`costs` with the fixed machine-level terms at zero: a blackout of the hand-over
    and typeref work alone (tens of microseconds), for experiments about that work."""
    return costs | dict.fromkeys(FIXED_COSTS, 0.0)
