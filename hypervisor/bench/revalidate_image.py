"""`hvlab bench revalidate --image IMAGE`: the revalidation bench on a stored guest's real tables.

The same measurements as the generated-layout bench (`bench/revalidate.py`,
its docstring defines them), on the page tables of a PV image instead of a
`linux-like` layout: the image's tables are localised into scratch memory with
a fresh frame table (`images.page_tables`), and its roots (pins in stream
order, then CR3s) are what bulk and the reference take.

The reference runs on a **sample of the roots** when the whole image would
take it longer than `REFERENCE_SAMPLE_PTES` entries: the roots are taken in
order while the tables they reach hold at most that many present entries
(tables shared with roots already taken cost nothing more), and at least the
first root. Any list of roots is a valid input to both validators, so bulk
runs on the same sample from a fresh frame table and the two frame tables
must be byte-identical (`equal_on_sample`), else the run fails.
`reference_s_per_gib` is then extrapolated from the reference's rate.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from typing import Any, TextIO

import numpy as np
import unicorn

from hypervisor.bench.revalidate import (
    PTES_COUNTED,
    RevalidateBenchError,
    RevalidateMismatchError,
    memory_floor,
    scan_page_tables,
    size_text,
)
from hypervisor.images.common import ImageError
from hypervisor.images.page_tables import DOMID, ImageTables, load_image_tables
from hypervisor.lib.progress import progress
from hypervisor.mm.builds import BuildError, PageType, get_build
from hypervisor.mm.bulk import bulk_validate
from hypervisor.mm.frametable import FrameTable
from hypervisor.mm.pte import ENTRIES_PER_TABLE, MFN_FIELD_BITS, PTE_PRESENT
from hypervisor.mm.rebuild import plan_rebuild
from hypervisor.mm.typerefs import PageTyping, Root

PAGE_SIZE = 4096
GIB = 1 << 30
DEFAULT_REPEATS = 3
# The reference types ~120 K PTEs/s here: a sample of this many entries takes ~2 s.
REFERENCE_SAMPLE_PTES = 1 << 18
_MFN_MASK = np.uint64((1 << MFN_FIELD_BITS) - 1)
_U12 = np.uint64(12)


def ordered_roots(img: ImageTables) -> list[Root]:
    """The image's roots with every linear entry's target first (`mm.rebuild`); holds a
    restore would drop afterwards stay pinned, the same for both validators."""
    levels = img.level_of()
    table_mfns = np.flatnonzero(levels)
    plan = plan_rebuild(img.mem, img.frames, img.roots, (table_mfns, levels[table_mfns]))
    return [x if isinstance(x, Root) else img.roots[x] for x in plan.first + plan.rest]


def _tree(mem2d: np.ndarray, levels: np.ndarray, root: Root) -> np.ndarray:
    """Scratch mfns of the tables under `root` (itself included), by the saved levels."""
    found = [np.array([root.mfn], np.int64)]
    frontier = found[0]
    for level in range(root.level, 1, -1):
        entries = mem2d[frontier]
        present = (entries & np.uint64(PTE_PRESENT)) != 0
        targets = ((entries[present] >> _U12) & _MFN_MASK).astype(np.int64)
        targets = targets[targets < levels.size]
        frontier = np.unique(targets[levels[targets] == level - 1])
        found.append(frontier)
    return np.concatenate(found)


def sample_roots(img: ImageTables, roots: list[Root], budget: int) -> tuple[list[Root], int]:
    """The roots, in order, whose trees together hold at most `budget` present entries
    (at least the first root); and that number of entries."""
    mem2d = img.mem.reshape(-1, ENTRIES_PER_TABLE)
    levels = img.level_of()
    taken: list[Root] = []
    reached = np.zeros(levels.size, dtype=bool)
    entries = 0
    for root in roots:
        tables = _tree(mem2d, levels, root)
        new = np.unique(tables[~reached[tables]])
        cost = int(((mem2d[new] & np.uint64(PTE_PRESENT)) != 0).sum())
        if taken and entries + cost > budget:
            continue
        taken.append(root)
        reached[new] = True
        entries += cost
    return taken, entries


def _bulk(img: ImageTables, frames: FrameTable, roots: list[Root]
          ) -> tuple[float, dict[str, float]]:
    started = time.perf_counter()
    result = bulk_validate(img.mem, frames, DOMID, roots)
    seconds = time.perf_counter() - started
    if not result.ok:
        first = result.failures[0]
        what = f"pinned L{first.root.level}" if first.root.pinned else "CR3"
        raise RevalidateBenchError(
            f"{img.path}: {len(result.failures)} of its roots do not validate (first: {what} "
            f"pfn {first.root.mfn - 1:#x}, rc {first.rc}): run hvlab image verify on it")
    return seconds, result.phases


def run_revalidate_image_bench(path: str, build: str, as_json: bool, out: TextIO | None = None,
                               *, repeats: int = DEFAULT_REPEATS,
                               sample_ptes: int = REFERENCE_SAMPLE_PTES,
                               quiet: bool = True) -> dict[str, Any]:
    """Measure bulk, reference and scan on the image at `path`; print and return them.

    RevalidateBenchError for input that cannot run (an unreadable or HVM image, an
    unknown build, roots that do not validate); RevalidateMismatchError if bulk and
    reference disagree on the sample.
    """
    try:
        get_build(build)
    except BuildError as err:
        raise RevalidateBenchError(str(err)) from None
    for name, value, low in (("repeats", repeats, 1), ("sample_ptes", sample_ptes, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise RevalidateBenchError(f"{name} {value!r} is not an integer of at least {low}")
    out = sys.stdout if out is None else out

    with progress(3 + repeats, f"bench revalidate {path}", quiet) as advance:
        started = time.perf_counter()
        try:
            img = load_image_tables(path, build)
        except ImageError as err:
            raise RevalidateBenchError(str(err)) from None
        load_s = time.perf_counter() - started
        roots = ordered_roots(img)
        advance("loaded")
        mem2d = img.frames.check_mem(img.mem)
        bulk_runs: list[float] = []
        bulk_phases: list[dict[str, float]] = []
        validated = img.frames
        for _ in range(repeats):
            del validated
            validated = img.frames.copy()
            seconds, phases = _bulk(img, validated, roots)
            bulk_runs.append(seconds)
            bulk_phases.append(phases)
            advance(f"bulk run {len(bulk_runs)}")
        types = validated.types()
        tables_validated = int(((types >= PageType.L1) & (types <= PageType.L4)
                                & validated.validated()).sum())
        floor_runs = memory_floor(mem2d, img.tables, repeats)
        scans = [scan_page_tables(mem2d, img.tables) for _ in range(repeats)]
        scan = min(scans, key=lambda x: x.seconds)
        advance("floor and scan")

        sample, sample_entries = sample_roots(img, roots, sample_ptes)
        whole = len(sample) == len(roots)
        if whole:
            bulk_done = validated
        else:
            del validated
            bulk_done = img.frames.copy()
            _bulk(img, bulk_done, sample)
        fresh = img.frames.copy()
        typing = PageTyping(fresh, img.mem)
        started = time.perf_counter()
        failures = typing.apply_roots(sample, DOMID)
        reference_s = time.perf_counter() - started
        if failures:
            raise RevalidateMismatchError(
                f"{path}: bulk validated every root, the reference refused {len(failures)} "
                f"(first: root {failures[0].index}, rc {failures[0].rc})")
        ref_snap, bulk_snap = fresh.snapshot(), bulk_done.snapshot()
        if ref_snap != bulk_snap:
            diffs = ref_snap.differences(bulk_snap)
            shown = ", ".join(f"{name} of mfn {mfn:#x}" for name, mfn in diffs[:5])
            raise RevalidateMismatchError(
                f"{path}: bulk and reference frame tables differ on the sample "
                f"({len(diffs)} differing elements): {shown}")
        advance("reference done")

    ptes = scan.ptes
    mem_bytes = img.nr_pages * PAGE_SIZE
    bulk_s = min(bulk_runs)
    best = bulk_runs.index(bulk_s)
    floor_s = min(floor_runs)
    bulk_pte_per_s = ptes / bulk_s
    reference_pte_per_s = sample_entries / reference_s if reference_s > 0 else float("inf")
    result: dict[str, Any] = {
        "image": img.path,
        "mem_bytes": mem_bytes,
        "guest_pages": img.nr_pages,
        "page_table_frames": img.page_table_frames,
        "tables_validated": tables_validated,
        "roots": len(roots),
        "pins": img.pins,
        "ptes": ptes,
        "ptes_by_level": {f"l{lvl}": scan.ptes_by_level[lvl] for lvl in (1, 2, 3, 4)},
        "ptes_counted": PTES_COUNTED,
        "load_s": load_s,
        "repeats": repeats,
        "bulk_s": bulk_s,
        "bulk_cold_s": bulk_runs[0],
        "bulk_runs_s": bulk_runs,
        "bulk_cold_vs_warm": bulk_runs[0] / bulk_s,
        "bulk_phases_s": bulk_phases[best],
        "page_table_bytes": img.page_table_frames * PAGE_SIZE,
        "floor_s": floor_s,
        "floor_runs_s": floor_runs,
        "bulk_vs_floor": bulk_s / floor_s,
        "bulk_pte_per_s": bulk_pte_per_s,
        "bulk_s_per_gib": bulk_s * GIB / mem_bytes,
        "reference_s": reference_s,
        "reference_ptes": sample_entries,
        "reference_pte_per_s": reference_pte_per_s,
        "reference_sample_roots": len(sample),
        "reference_sample_is_guest": whole,
        "reference_s_per_gib": ptes / reference_pte_per_s * GIB / mem_bytes,
        "equal_on_sample": True,
        "scan_s": scan.seconds,
        "scan_runs_s": [x.seconds for x in scans],
        "bulk_vs_reference": bulk_pte_per_s / reference_pte_per_s,
        "bulk_vs_scan": bulk_s / scan.seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "build": build,
        "unicorn": unicorn.__version__,
    }
    if as_json:
        json.dump(result, out, indent=2)
        out.write("\n")
    else:
        out.write(format_table(result))
    return result


def format_table(r: dict[str, Any]) -> str:
    """The readable form of a result."""
    levels = ", ".join(f"{k.upper()} {v:,}" for k, v in r["ptes_by_level"].items())
    sample = ("every root" if r["reference_sample_is_guest"]
              else f"a sample of {r['reference_sample_roots']} of the {r['roots']} roots")
    rows = [
        ("image", f"{r['image']}: {size_text(r['mem_bytes'])} PV, {r['guest_pages']:,} pages, "
                  f"{r['page_table_frames']:,} page tables, {r['roots']} roots "
                  f"({r['pins']} pins)"),
        ("present PTEs", f"{r['ptes']:,} ({levels})"),
        ("load", f"{r['load_s']:.3f} s"),
        ("bulk", f"{r['bulk_s']:.4f} s   {r['bulk_pte_per_s'] / 1e6:,.2f} M PTE/s   "
                 f"{r['bulk_s_per_gib']:.4f} s per GiB   (best of {r['repeats']}; first run "
                 f"{r['bulk_cold_s']:.4f} s)"),
        ("reference", f"{r['reference_s']:.3f} s on {r['reference_ptes']:,} PTEs of {sample}"
                      f"   {r['reference_pte_per_s'] / 1e3:,.1f} K PTE/s   "
                      f"{r['reference_s_per_gib']:.3f} s per GiB"),
        ("equal on sample", "yes" if r["equal_on_sample"] else "NO"),
        ("bulk phases", ", ".join(f"{k.replace('_', ' ')} {v:.4f}"
                                  for k, v in r["bulk_phases_s"].items()) + " s (best run)"),
        ("bulk cold vs warm", f"{r['bulk_cold_vs_warm']:.2f}x"),
        ("memory floor", f"{r['floor_s'] * 1e3:.2f} ms   (one sum over all "
                         f"{r['page_table_bytes'] / 1e6:,.1f} MB of page tables)"),
        ("scan (gather+count)", f"{r['scan_s']:.4f} s   (best of {r['repeats']})"),
        ("bulk vs reference", f"{r['bulk_vs_reference']:,.1f}x faster per PTE"),
        ("bulk vs floor", f"{r['bulk_vs_floor']:,.1f}x the memory floor's time"),
        ("bulk vs scan", f"{r['bulk_vs_scan']:,.2f}x the scan's time"),
        ("peak RSS", f"{r['peak_rss_mb']:,.0f} MB"),
        ("build / unicorn", f"{r['build']} / {r['unicorn']}"),
    ]
    width = max(len(name) for name, _ in rows)
    return "".join(f"{name:<{width}}  {value}\n" for name, value in rows)
