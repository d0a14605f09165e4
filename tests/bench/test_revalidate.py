"""`hvlab bench revalidate`: fields present, consistent and serialisable; bad input refused.

Speeds are never asserted, only what the numbers must satisfy among themselves.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import unicorn

import hypervisor.bench.revalidate as bench
from hypervisor.bench.revalidate import (
    RevalidateBenchError,
    RevalidateMismatchError,
    host_frames_for,
    run_revalidate_bench,
    scan_page_tables,
)
from hypervisor.mm.builds import PageType, get_build
from hypervisor.mm.bulk import PHASES
from hypervisor.mm.frametable import FrameTable
from hypervisor.mm.layouts import anonymous_memory, build_linux_like
from hypervisor.mm.pte import PTE_PRESENT, PTE_RW, make_pte

MIB = 1 << 20
REQUIRED_KEYS = {
    "mem_bytes", "guest_pages", "page_table_frames", "nr_processes", "ptes", "ptes_by_level",
    "ptes_counted", "layout_s", "repeats", "bulk_s", "bulk_cold_s", "bulk_runs_s",
    "bulk_pte_per_s", "reference_s", "reference_ptes", "reference_pte_per_s",
    "reference_sample_pages", "reference_sample_is_guest", "equal_on_sample", "scan_s",
    "scan_runs_s", "bulk_vs_reference", "bulk_vs_scan", "peak_rss_mb", "build", "unicorn",
    "seed", "floor_s", "floor_runs_s", "bulk_vs_floor", "bulk_phases_s", "bulk_cold_vs_warm",
    "page_table_bytes",
}


def _present_entries_of_layout(guest_pages: int, nr_processes: int, seed: int) -> int:
    """Lay the same guest out again and count present entries table by table."""
    nr = host_frames_for(guest_pages)
    frames = FrameTable(nr, get_build("4.19"))
    mem = anonymous_memory(nr)
    tree = build_linux_like(frames, mem, 1, guest_pages, nr_processes=nr_processes, seed=seed)
    total = 0
    for level, tables in tree.tables.items():
        for mfn in tables.tolist():
            row = mem[mfn * 512 : (mfn + 1) * 512]
            for slot, entry in enumerate(row.tolist()):
                if entry & PTE_PRESENT and not (level == 4 and 256 <= slot <= 271):
                    total += 1
    return total


def _check_consistent(r: dict, mem_bytes: int, build: str, seed: int) -> None:
    assert REQUIRED_KEYS <= r.keys()
    assert json.loads(json.dumps(r)) == r
    assert r["mem_bytes"] == mem_bytes and r["guest_pages"] == mem_bytes // 4096
    assert r["build"] == build and r["seed"] == seed and r["unicorn"] == unicorn.__version__
    for key in ("layout_s", "bulk_s", "bulk_cold_s", "bulk_pte_per_s", "reference_s",
                "reference_pte_per_s", "scan_s", "bulk_vs_reference", "bulk_vs_scan",
                "peak_rss_mb", "ptes", "reference_ptes", "page_table_frames"):
        assert r[key] > 0, key
    assert r["equal_on_sample"] is True
    assert r["ptes"] == sum(r["ptes_by_level"].values())
    # Every guest page is mapped once by the direct map, plus the kernel image and processes.
    assert r["ptes_by_level"]["l1"] > r["guest_pages"]
    assert len(r["bulk_runs_s"]) == len(r["scan_runs_s"]) == r["repeats"]
    assert r["bulk_s"] == min(r["bulk_runs_s"]) and r["bulk_cold_s"] == r["bulk_runs_s"][0]
    assert r["scan_s"] == min(r["scan_runs_s"])
    assert r["bulk_pte_per_s"] == pytest.approx(r["ptes"] / r["bulk_s"])
    assert r["reference_pte_per_s"] == pytest.approx(r["reference_ptes"] / r["reference_s"])
    assert r["bulk_vs_reference"] == pytest.approx(
        r["bulk_pte_per_s"] / r["reference_pte_per_s"])
    assert r["bulk_vs_scan"] == pytest.approx(r["bulk_s"] / r["scan_s"])
    assert len(r["floor_runs_s"]) == r["repeats"] and r["floor_s"] == min(r["floor_runs_s"]) > 0
    assert r["bulk_vs_floor"] == pytest.approx(r["bulk_s"] / r["floor_s"])
    assert r["bulk_cold_vs_warm"] == pytest.approx(r["bulk_cold_s"] / r["bulk_s"])
    assert r["page_table_bytes"] == r["page_table_frames"] * 4096
    # The phases are the best run's time split up: they cannot add up to more.
    assert list(r["bulk_phases_s"]) == list(PHASES)
    assert all(v >= 0 for v in r["bulk_phases_s"].values())
    assert sum(r["bulk_phases_s"].values()) <= r["bulk_s"]
    # The same in CPU seconds, for the run with the least CPU time.
    assert list(r["bulk_phases_cpu_s"]) == list(PHASES)
    assert sum(r["bulk_phases_cpu_s"].values()) <= r["bulk_cpu_s"] + 1e-3
    assert len(r["bulk_cpu_runs_s"]) == r["repeats"]
    assert r["bulk_cpu_s"] == min(r["bulk_cpu_runs_s"]) > 0 and r["floor_cpu_s"] > 0
    assert r["bulk_vs_floor_cpu"] == pytest.approx(r["bulk_cpu_s"] / r["floor_cpu_s"])
    assert r["bulk_median_vs_floor"] >= r["bulk_vs_floor"]
    # Compiling (or loading) the kernels and faulting in the buffers happen
    # before the first timed run, and are reported on their own.
    assert r["compile_s"] > 0 and r["prepare_s"] > 0
    assert isinstance(r["compiled_from_cache"], bool)


def test_small_guest_fields_are_complete_and_consistent() -> None:
    out = io.StringIO()
    r = run_revalidate_bench(64 * MIB, "4.19", True, out, seed=3, nr_processes=8)
    assert json.loads(out.getvalue()) == r
    _check_consistent(r, 64 * MIB, "4.19", 3)
    assert r["ptes"] == _present_entries_of_layout(16384, 8, 3)
    # 32 direct-map L1s, one L2, one L3; kernel L4, L3, L2 and 4 L1s; 6 per process.
    assert r["page_table_frames"] == 32 + 1 + 1 + 3 + 4 + 6 * 8
    assert r["reference_sample_is_guest"] and r["reference_ptes"] == r["ptes"]
    assert r["reference_sample_pages"] == r["guest_pages"]


def test_a_large_guest_is_compared_on_a_separate_sample() -> None:
    out = io.StringIO()
    r = run_revalidate_bench(32 * MIB, "4.4", True, out, seed=11, nr_processes=2,
                             sample_pages=2048, repeats=1)
    _check_consistent(r, 32 * MIB, "4.4", 11)
    assert not r["reference_sample_is_guest"] and r["reference_sample_pages"] == 2048
    assert r["reference_ptes"] == _present_entries_of_layout(2048, 2, 11) < r["ptes"]


def test_readable_table() -> None:
    out = io.StringIO()
    r = run_revalidate_bench(8 * MIB, "4.12", False, out, repeats=2)
    text = out.getvalue()
    lines = {line.split("  ")[0]: line for line in text.splitlines()}
    for name in ("guest", "present PTEs", "layout", "bulk", "reference", "equal on sample",
                 "scan (gather+count)", "memory floor", "bulk phases", "bulk cold vs warm",
                 "bulk vs reference", "bulk vs floor", "bulk vs floor (CPU)",
                 "compile / prepare", "bulk vs scan", "peak RSS"):
        assert name in lines, name
    assert lines["equal on sample"].endswith("yes")
    assert f"{r['ptes']:,}" in lines["present PTEs"]
    assert "best of 2" in lines["bulk"]
    assert "4.12 / " in text and unicorn.__version__ in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"mem_bytes": 0}, "--mem 0"),
    ({"mem_bytes": 64 * MIB + 100}, "multiple of 4 KiB"),
    ({"mem_bytes": 4 * MIB}, "at least 8 MiB"),
    ({"mem_bytes": "64G"}, "number of bytes"),
    ({"mem_bytes": True}, "number of bytes"),
    ({"mem_bytes": 1 << 52}, "this machine has"),
    ({"build": "4.99"}, "unknown hypervisor build '4.99'"),
    ({"repeats": 0}, "repeats 0"),
    ({"nr_processes": -1}, "nr_processes -1"),
    ({"sample_pages": 10}, "sample_pages 10"),
    ({"seed": -5}, "seed -5"),
])
def test_bad_input_is_one_clear_error_before_any_output(kwargs, message) -> None:
    args = {"mem_bytes": 8 * MIB, "build": "4.19", "as_json": True} | kwargs
    out = io.StringIO()
    with pytest.raises(RevalidateBenchError, match=message):
        run_revalidate_bench(args.pop("mem_bytes"), args.pop("build"), args.pop("as_json"),
                             out, **args)
    assert out.getvalue() == ""


def test_a_bulk_reference_mismatch_is_loud(monkeypatch) -> None:
    real = bench.bulk_validate

    def off_by_one(mem, frames, domid, roots):
        result = real(mem, frames, domid, roots)
        writable = np.flatnonzero(frames.types() == PageType.WRITABLE)
        frames.type_info[writable[0]] += np.uint64(1)  # one type count too many
        return result

    monkeypatch.setattr(bench, "bulk_validate", off_by_one)
    out = io.StringIO()
    expected = r"differ on the sample \(1 differing elements\): type_info of mfn"
    with pytest.raises(RevalidateMismatchError, match=expected):
        run_revalidate_bench(8 * MIB, "4.19", True, out, repeats=1)
    assert out.getvalue() == ""


def test_scan_counts_present_guest_entries_and_their_targets() -> None:
    mem = np.zeros(16 * 512, dtype=np.uint64)
    mem2d = mem.reshape(16, 512)
    rw = PTE_PRESENT | PTE_RW
    mem2d[2, 0] = make_pte(3, rw)
    mem2d[2, 260] = make_pte(3, rw)  # a hypervisor slot: not the guest's
    mem2d[2, 511] = make_pte(4, rw)
    mem2d[3, 7] = make_pte(5, rw)
    mem2d[3, 8] = make_pte(6, PTE_RW)  # not present
    mem2d[5, 1:4] = [make_pte(9, rw), make_pte(9, PTE_PRESENT), make_pte(10, rw)]
    tables = {4: np.array([2]), 3: np.array([3, 4]), 1: np.array([5])}
    scan = scan_page_tables(mem2d, tables)
    assert scan.ptes_by_level == {4: 2, 3: 1, 2: 0, 1: 3} and scan.ptes == 6
    assert scan.refs.tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 0, 2, 1, 0, 0, 0, 0, 0]
    assert scan.seconds >= 0


@pytest.mark.slow
def test_64gib_guest_completes_with_consistent_fields() -> None:
    out = io.StringIO()
    r = run_revalidate_bench(64 << 30, "4.19", True, out)
    print("\n" + out.getvalue())
    _check_consistent(r, 64 << 30, "4.19", 0)
    assert r["ptes_by_level"]["l1"] > 1 << 24
    assert not r["reference_sample_is_guest"]
