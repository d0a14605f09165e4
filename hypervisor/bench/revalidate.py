"""`hvlab bench revalidate`: what a full typeref revalidation of one PV guest costs.

One run, one process, one Linux-like PV guest (`mm.layouts.build_linux_like`:
a direct map of all its RAM with 4 KiB pages plus a few process trees) laid
out in anonymous host memory, with a fresh frame table that knows only who
owns each frame, as the new build has it after a live update. Three numbers
come out of the same run:

- `bulk`: `mm.bulk.bulk_validate` rebuilds the whole typeref state from the
  guest's roots (pins and CR3s), `repeats` times, each from a fresh copy of
  the frame table. `bulk_s` is the best run; `bulk_cold_s` the first, which
  also pays for the process's first touch of the memory bulk's temporaries
  need (on this VM ~2 s per GiB never touched before, against a few ms once
  the kernel has recycled it).
- `reference`: the plain-Python `mm.typerefs.PageTyping` does the same on a
  sample it can finish in a few seconds: the guest itself if it has at most
  `REFERENCE_SAMPLE_PAGES` pages, otherwise a separate guest of that size and
  the same layout and seed. On the sample, bulk and reference must leave
  byte-identical frame tables (`equal_on_sample`); if not, the run fails.
- `floor`: one contiguous numpy read of every page-table byte of the guest (a
  sum over a copy of all its tables as one array, made before the clock
  starts): the memory floor, which no validator can beat. `bulk_vs_floor` is
  bulk's best over the floor's best, both from this run.
- `scan`: a plain numpy pass over the same page-table frames (gather every
  table's entries, keep the present ones, bincount their MFNs): a lower bound
  for a validator that gathers and counts like bulk does (`bulk_vs_scan`).
  Read-only, so simply run `repeats` times; `scan_s` is the best.
- `bulk_phases_s`: where the best bulk run spent its time (`mm.bulk.PHASES`:
  setup, classify, count, check, write back); `bulk_phases_cpu_s` the same in
  CPU seconds for the run with the least CPU time.

Cold run: bulk's kernels are compiled when `mm.bulk_kernels` is imported,
or loaded from numba's on-disk cache (`compile_s`, `compiled_from_cache`), and
`mm.bulk.prepare` faults in the big buffers every pass reuses (the reference
counter, the bucket buffer, the frame mask: `prepare_s`), both before the
first timed run, as a live update would do while it still copies memory. So
the first run pays neither; `bulk_cold_vs_warm` is that first run over the
best.

CPU times: the machine is shared, and a wall time counts other processes'
turns. `bulk_cpu_s`, `floor_cpu_s` and `bulk_vs_floor_cpu` are the same
measurements in CPU seconds of the measuring thread.

PTE counts are the present entries of every page table the guest has, all four
levels (L4: guest slots only), which is exactly what a full validation reads.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO

import numpy as np
import unicorn

from emulator.memory import HostMemory
from hypervisor.lib.errors import HvlabError, HvlabFailure
from hypervisor.lib.progress import progress
from hypervisor.mm import bulk_kernels
from hypervisor.mm.builds import BuildError, PageType, get_build
from hypervisor.mm.bulk import BulkResult, bulk_validate, prepare
from hypervisor.mm.frametable import FrameTable
from hypervisor.mm.layouts import PvTree, build_linux_like
from hypervisor.mm.pte import (
    ENTRIES_PER_TABLE,
    MFN_FIELD_BITS,
    PTE_PRESENT,
    XEN_L4_FIRST_SLOT,
    XEN_L4_LAST_SLOT,
)
from hypervisor.mm.typerefs import PageTyping

PAGE_SIZE = 4096
DOMID = 1
DEFAULT_SEED = 0
DEFAULT_PROCESSES = 8
DEFAULT_REPEATS = 3
# The reference types ~120 K PTEs/s here: 1 GiB (262 K PTEs) takes about 2 s.
REFERENCE_SAMPLE_PAGES = 1 << 18
MIN_MEM_BYTES = 8 << 20  # each process maps ~1000 data pages (64 processes fit)
# Free frames beyond the guest's, like any host has (mfn 0 is never a guest's).
HOST_MARGIN_FRAMES = 1024
# Resident bytes per host frame the run needs at its peak (frame table, bulk's
# accumulators, a second frame table to copy runs from, the page tables):
# measured 120 at 64 GiB, rounded up.
RSS_BYTES_PER_FRAME = 150
# Tables per vectorised step of the scan (1 M entries, 8 MiB), as in bulk.
_SCAN_CHUNK = 2048
_MFN_MASK = np.uint64((1 << MFN_FIELD_BITS) - 1)
_GUEST_L4_SLOTS = np.ones(ENTRIES_PER_TABLE, dtype=bool)
_GUEST_L4_SLOTS[XEN_L4_FIRST_SLOT : XEN_L4_LAST_SLOT + 1] = False
PTES_COUNTED = "present entries of every page table, L1-L4 (L4: guest slots only)"


class RevalidateBenchError(HvlabError):
    """The benchmark was asked for something it cannot run (size, build, options)."""


class RevalidateMismatchError(HvlabFailure):
    """Bulk and reference disagree, or bulk refused a valid guest: a bug, not bad input."""


@dataclass
class Guest:
    """A laid-out guest: its host memory, fresh frame table and page-table tree."""

    host: HostMemory
    frames: FrameTable
    tree: PvTree
    layout_s: float

    @property
    def mem(self) -> np.ndarray:
        return self.host.u64

    @property
    def page_table_frames(self) -> int:
        return sum(int(t.size) for t in self.tree.tables.values())


@dataclass(frozen=True)
class ScanResult:
    """The numpy floor: present entries per level and every frame's reference count."""

    seconds: float
    ptes_by_level: dict[int, int]
    refs: np.ndarray  # per machine frame: present entries pointing at it

    @property
    def ptes(self) -> int:
        return sum(self.ptes_by_level.values())


def memory_floor(mem2d: np.ndarray, tables: dict[int, np.ndarray], repeats: int
                 ) -> list[float]:
    """Seconds of each of `repeats` sums over all page-table bytes as one contiguous array."""
    return memory_floor_timed(mem2d, tables, repeats)[0]


def memory_floor_timed(mem2d: np.ndarray, tables: dict[int, np.ndarray], repeats: int
                       ) -> tuple[list[float], list[float]]:
    """`memory_floor` in wall and in CPU seconds of this thread, run by run."""
    every = np.concatenate([tables.get(level, np.empty(0, np.int64)) for level in (4, 3, 2, 1)])
    contiguous = mem2d[np.sort(every)]  # the copy is made before timing
    runs, cpu_runs = [], []
    for _ in range(repeats):
        started, cpu = time.perf_counter(), time.thread_time()
        contiguous.sum()
        runs.append(time.perf_counter() - started)
        cpu_runs.append(time.thread_time() - cpu)
    return runs, cpu_runs


@dataclass(frozen=True)
class ReferenceResult:
    sample_pages: int
    sample_is_guest: bool
    ptes: int
    seconds: float
    equal: bool

    @property
    def pte_per_s(self) -> float:
        return self.ptes / self.seconds


# ---------------------------------------------------------------------------
# Setting up
# ---------------------------------------------------------------------------


def host_frames_for(guest_pages: int) -> int:
    """Host frames for a guest: its RAM, as much again as its page tables take, a margin.

    (build_linux_like takes page tables out of guest RAM, so the extra frames
    stay free; they cost nothing but frame-table entries.)
    """
    l1 = -(-guest_pages // ENTRIES_PER_TABLE)
    l2 = -(-l1 // ENTRIES_PER_TABLE)
    l3 = -(-l2 // ENTRIES_PER_TABLE)
    return 1 + guest_pages + l1 + l2 + l3 + HOST_MARGIN_FRAMES


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_mem_bytes(mem_bytes: object) -> int:
    """Guest pages of a `mem_bytes` guest; RevalidateBenchError if it cannot run here."""
    if not isinstance(mem_bytes, int) or isinstance(mem_bytes, bool):
        raise RevalidateBenchError(f"--mem must be a number of bytes, got {mem_bytes!r}")
    if mem_bytes < MIN_MEM_BYTES or mem_bytes % PAGE_SIZE:
        raise RevalidateBenchError(
            f"--mem {mem_bytes}: needs a multiple of 4 KiB of at least "
            f"{MIN_MEM_BYTES >> 20} MiB")
    guest_pages = mem_bytes // PAGE_SIZE
    need = host_frames_for(guest_pages) * RSS_BYTES_PER_FRAME
    physical = _physical_memory()
    if physical is not None and need > physical:
        raise RevalidateBenchError(
            f"--mem {mem_bytes >> 20} MiB: the run needs about {need >> 20} MiB resident, "
            f"this machine has {physical >> 20} MiB")
    return guest_pages


def lay_out_guest(guest_pages: int, build: str, seed: int, nr_processes: int) -> Guest:
    """A Linux-like guest of `guest_pages` frames in its own anonymous host memory."""
    nr_frames = host_frames_for(guest_pages)
    host = HostMemory(nr_frames * PAGE_SIZE)
    frames = FrameTable(nr_frames, get_build(build))
    started = time.perf_counter()
    tree = build_linux_like(frames, host.u64, DOMID, guest_pages,
                            nr_processes=nr_processes, seed=seed)
    return Guest(host, frames, tree, time.perf_counter() - started)


# ---------------------------------------------------------------------------
# The three measurements
# ---------------------------------------------------------------------------


def scan_page_tables(mem2d: np.ndarray, tables: dict[int, np.ndarray]) -> ScanResult:
    """Read every table's entries, keep the present ones, bincount their MFNs."""
    started = time.perf_counter()
    by_level: dict[int, int] = {}
    targets: list[np.ndarray] = []
    for level in (4, 3, 2, 1):
        level_tables = tables.get(level, np.empty(0, np.int64))
        count = 0
        for start in range(0, level_tables.size, _SCAN_CHUNK):
            entries = mem2d[level_tables[start : start + _SCAN_CHUNK]]
            present = (entries & np.uint64(PTE_PRESENT)) != 0
            if level == 4:
                present &= _GUEST_L4_SLOTS
            mfns = (entries[present] >> np.uint64(12)) & _MFN_MASK
            count += mfns.size
            targets.append(mfns)
        by_level[level] = count
    all_targets = np.concatenate(targets) if targets else np.empty(0, np.uint64)
    refs = np.bincount(all_targets.view(np.int64), minlength=mem2d.shape[0])
    return ScanResult(time.perf_counter() - started, by_level, refs)


def _validate(mem: np.ndarray, frames: FrameTable, tree: PvTree, what: str
              ) -> tuple[float, float, BulkResult]:
    """Time bulk_validate over all roots (wall and CPU seconds, phases); the run
    fails if bulk refuses any."""
    started, cpu = time.perf_counter(), time.thread_time()
    result = bulk_validate(mem, frames, DOMID, tree.roots)
    seconds, cpu_s = time.perf_counter() - started, time.thread_time() - cpu
    if not result.ok:
        raise RevalidateMismatchError(
            f"bulk validation refused {len(result.failures)} roots of the {what} "
            f"(first: root {result.failures[0].index}, rc {result.failures[0].rc})")
    return seconds, cpu_s, result


def _check_all_tables_validated(frames: FrameTable, guest: Guest) -> None:
    """Every page table the layout built is typed and validated after bulk."""
    types = frames.types()
    is_table = (types >= PageType.L1) & (types <= PageType.L4) & frames.validated()
    if int(is_table.sum()) != guest.page_table_frames:
        raise RevalidateMismatchError(
            f"bulk left {int(is_table.sum())} validated page tables, the guest has "
            f"{guest.page_table_frames}")


def _reference(fresh: FrameTable, bulk_done: FrameTable, guest: Guest,
               sample_is_guest: bool) -> ReferenceResult:
    """Time the reference from `fresh`; compare its frame table with bulk's."""
    typing = PageTyping(fresh, guest.mem)
    started = time.perf_counter()
    failures = typing.apply_roots(guest.tree.roots, DOMID)
    seconds = time.perf_counter() - started
    if failures:
        raise RevalidateMismatchError(
            f"the reference refused {len(failures)} roots of the sample guest "
            f"(first: root {failures[0].index}, rc {failures[0].rc})")
    ref_snap, bulk_snap = fresh.snapshot(), bulk_done.snapshot()
    equal = ref_snap == bulk_snap
    if not equal:
        diffs = ref_snap.differences(bulk_snap)
        shown = ", ".join(f"{name} of mfn {mfn:#x}" for name, mfn in diffs[:5])
        raise RevalidateMismatchError(
            f"bulk and reference frame tables differ on the sample "
            f"({len(diffs)} differing elements): {shown}")
    mem2d = fresh.check_mem(guest.mem)
    ptes = scan_page_tables(mem2d, guest.tree.tables).ptes
    return ReferenceResult(guest.tree.p2m.size, sample_is_guest, ptes, seconds, equal)


def _reference_on_sample(build: str, seed: int, nr_processes: int,
                         sample_pages: int) -> ReferenceResult:
    """A separate guest of `sample_pages`: bulk on one copy of its fresh frame table,
    the reference on another."""
    sample = lay_out_guest(sample_pages, build, seed, nr_processes)
    fresh = sample.frames.copy()
    _validate(sample.mem, sample.frames, sample.tree, "sample guest")
    return _reference(fresh, sample.frames, sample, sample_is_guest=False)


# ---------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------


def run_revalidate_bench(
    mem_bytes: int,
    build: str,
    as_json: bool,
    out: TextIO | None = None,
    *,
    seed: int = DEFAULT_SEED,
    nr_processes: int = DEFAULT_PROCESSES,
    sample_pages: int = REFERENCE_SAMPLE_PAGES,
    repeats: int = DEFAULT_REPEATS,
    quiet: bool = True,
) -> dict[str, Any]:
    """Measure bulk, reference and scan for one `mem_bytes` guest; print and return them.

    `sample_pages` bounds the reference's sample guest (the guest itself if it
    is no larger); bulk and scan run `repeats` times. RevalidateBenchError for
    input that cannot run (raised before any memory is taken);
    RevalidateMismatchError if bulk and reference disagree.
    """
    guest_pages = check_mem_bytes(mem_bytes)
    try:
        get_build(build)
    except BuildError as err:
        raise RevalidateBenchError(str(err)) from None
    for name, value, low, high in (("nr_processes", nr_processes, 0, 64),
                                   ("repeats", repeats, 1, 100),
                                   ("seed", seed, 0, 2**64 - 1),
                                   ("sample_pages", sample_pages, MIN_MEM_BYTES // PAGE_SIZE,
                                    REFERENCE_SAMPLE_PAGES * 16)):
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise RevalidateBenchError(f"{name} {value!r} is not an integer in {low}..{high}")
    out = sys.stdout if out is None else out

    with progress(3 + repeats, f"bench revalidate {size_text(mem_bytes)}", quiet) as advance:
        # guest.frames stays fresh (ownership only): every bulk run starts from a copy.
        guest = lay_out_guest(guest_pages, build, seed, nr_processes)
        advance("laid out")
        mem2d = guest.frames.check_mem(guest.mem)
        started = time.perf_counter()
        prepare(guest.frames.nr_frames, guest.tree.nr_l1_entries)
        prepare_s = time.perf_counter() - started
        bulk_runs: list[float] = []
        bulk_cpu_runs: list[float] = []
        bulk_phases: list[dict[str, float]] = []
        bulk_cpu_phases: list[dict[str, float]] = []
        validated = guest.frames
        for _ in range(repeats):
            del validated  # free the previous run's table before copying the next
            validated = guest.frames.copy()
            seconds, cpu_s, bulk = _validate(guest.mem, validated, guest.tree, "guest")
            bulk_runs.append(seconds)
            bulk_cpu_runs.append(cpu_s)
            bulk_phases.append(bulk.phases)
            bulk_cpu_phases.append(bulk.cpu_phases)
            advance(f"bulk run {len(bulk_runs)}")
        _check_all_tables_validated(validated, guest)
        floor_runs, floor_cpu_runs = memory_floor_timed(mem2d, guest.tree.tables, repeats)
        scans = [scan_page_tables(mem2d, guest.tree.tables) for _ in range(repeats)]
        scan = min(scans, key=lambda x: x.seconds)
        advance("floor and scan")

        if guest_pages <= sample_pages:
            reference = _reference(guest.frames, validated, guest, sample_is_guest=True)
        else:
            del validated
            reference = _reference_on_sample(build, seed, nr_processes, sample_pages)
        advance("reference done")

    ptes = scan.ptes
    bulk_s = min(bulk_runs)
    best = bulk_runs.index(bulk_s)
    floor_s = min(floor_runs)
    bulk_pte_per_s = ptes / bulk_s
    result: dict[str, Any] = {
        "mem_bytes": mem_bytes,
        "guest_pages": guest_pages,
        "page_table_frames": guest.page_table_frames,
        "nr_processes": nr_processes,
        "ptes": ptes,
        "ptes_by_level": {f"l{lvl}": scan.ptes_by_level[lvl] for lvl in (1, 2, 3, 4)},
        "ptes_counted": PTES_COUNTED,
        "layout_s": guest.layout_s,
        "repeats": repeats,
        "bulk_s": bulk_s,
        "bulk_cold_s": bulk_runs[0],
        "bulk_runs_s": bulk_runs,
        "bulk_cold_vs_warm": bulk_runs[0] / bulk_s,
        "bulk_phases_s": bulk_phases[best],
        "compile_s": bulk_kernels.COMPILE_S,
        "compiled_from_cache": bulk_kernels.compiled_from_cache(),
        "prepare_s": prepare_s,
        "page_table_bytes": guest.page_table_frames * PAGE_SIZE,
        "floor_s": floor_s,
        "floor_runs_s": floor_runs,
        "bulk_vs_floor": bulk_s / floor_s,
        "bulk_median_vs_floor": statistics.median(bulk_runs) / floor_s,
        "bulk_cpu_s": min(bulk_cpu_runs),
        "bulk_cpu_runs_s": bulk_cpu_runs,
        "bulk_phases_cpu_s": bulk_cpu_phases[bulk_cpu_runs.index(min(bulk_cpu_runs))],
        "floor_cpu_s": min(floor_cpu_runs),
        "bulk_vs_floor_cpu": min(bulk_cpu_runs) / min(floor_cpu_runs),
        "bulk_pte_per_s": bulk_pte_per_s,
        "reference_s": reference.seconds,
        "reference_ptes": reference.ptes,
        "reference_pte_per_s": reference.pte_per_s,
        "reference_sample_pages": reference.sample_pages,
        "reference_sample_is_guest": reference.sample_is_guest,
        "equal_on_sample": reference.equal,
        "scan_s": scan.seconds,
        "scan_runs_s": [x.seconds for x in scans],
        "bulk_vs_reference": bulk_pte_per_s / reference.pte_per_s,
        "bulk_vs_scan": bulk_s / scan.seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "build": build,
        "unicorn": unicorn.__version__,
        "seed": seed,
    }
    if as_json:
        json.dump(result, out, indent=2)
        out.write("\n")
    else:
        out.write(format_table(result))
    return result


def size_text(n_bytes: int) -> str:
    """2 GiB, 256 MiB or 4096 B: a memory size as people write it."""
    for unit, shift in (("GiB", 30), ("MiB", 20)):
        if n_bytes >= 1 << shift:
            return f"{n_bytes / (1 << shift):g} {unit}"
    return f"{n_bytes} B"


def format_table(r: dict[str, Any]) -> str:
    """The readable form of a result."""
    levels = ", ".join(f"{k.upper()} {v:,}" for k, v in r["ptes_by_level"].items())
    sample = ("the whole guest" if r["reference_sample_is_guest"]
              else f"a separate {size_text(r['reference_sample_pages'] * PAGE_SIZE)} guest")
    rows = [
        ("guest", f"{size_text(r['mem_bytes'])} PV, Linux-like, {r['nr_processes']} processes: "
                  f"{r['guest_pages']:,} pages, {r['page_table_frames']:,} page tables"),
        ("present PTEs", f"{r['ptes']:,} ({levels})"),
        ("layout", f"{r['layout_s']:.3f} s"),
        ("bulk", f"{r['bulk_s']:.3f} s   {r['bulk_pte_per_s'] / 1e6:,.2f} M PTE/s   "
                 f"(best of {r['repeats']}; first run {r['bulk_cold_s']:.3f} s)"),
        ("reference", f"{r['reference_s']:.3f} s on {r['reference_ptes']:,} PTEs of {sample}"
                      f"   {r['reference_pte_per_s'] / 1e3:,.1f} K PTE/s"),
        ("equal on sample", "yes" if r["equal_on_sample"] else "NO"),
        ("bulk phases", ", ".join(f"{k.replace('_', ' ')} {v:.3f}"
                                  for k, v in r["bulk_phases_s"].items()) + " s (best run)"),
        ("bulk cold vs warm", f"{r['bulk_cold_vs_warm']:.2f}x"),
        ("memory floor", f"{r['floor_s'] * 1e3:.1f} ms   (one sum over all "
                         f"{r['page_table_bytes'] / 1e6:,.0f} MB of page tables, "
                         f"best of {r['repeats']})"),
        ("scan (gather+count)", f"{r['scan_s']:.3f} s   (best of {r['repeats']})"),
        ("bulk vs reference", f"{r['bulk_vs_reference']:,.1f}x faster per PTE"),
        ("bulk vs floor", f"{r['bulk_vs_floor']:,.1f}x the memory floor's time "
                          f"(median run: {r['bulk_median_vs_floor']:,.1f}x)"),
        ("bulk vs floor (CPU)", f"{r['bulk_vs_floor_cpu']:,.1f}x   (bulk {r['bulk_cpu_s']:.3f} s, "
                                f"floor {r['floor_cpu_s'] * 1e3:.1f} ms of CPU, best runs)"),
        ("compile / prepare", f"{r['compile_s']:.3f} s "
                              f"({'from numba cache' if r['compiled_from_cache'] else 'compiled'})"
                              f" / {r['prepare_s']:.3f} s, before the first run"),
        ("bulk vs scan", f"{r['bulk_vs_scan']:,.2f}x the scan's time"),
        ("peak RSS", f"{r['peak_rss_mb']:,.0f} MB"),
        ("build / unicorn / seed", f"{r['build']} / {r['unicorn']} / {r['seed']}"),
    ]
    width = max(len(name) for name, _ in rows)
    return "".join(f"{name:<{width}}  {value}\n" for name, value in rows)
