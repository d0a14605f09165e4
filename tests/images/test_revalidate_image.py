"""`hvlab bench revalidate --image`: bulk and reference on a stored image's own page tables."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from hypervisor.bench import revalidate_image as bench
from hypervisor.bench.revalidate import RevalidateBenchError, RevalidateMismatchError
from hypervisor.cli import main
from hypervisor.images import image_info
from hypervisor.mm.builds import PageType
from hypervisor.stream import Pfinfo
from tests import ROOT
from tests.images.synthetic_tree import write_synthetic_image
from tests.images.test_image_tools import edit_page, first_page_of_type, rewrite

IMAGES = ROOT / "scenarios" / "images"
LINUX_LIKE = IMAGES / "pv-linux-like-256M.img.zst"


def _run(path, **kwargs) -> dict:
    return bench.run_revalidate_image_bench(str(path), "4.19", True, io.StringIO(),
                                            repeats=1, **kwargs)


def test_a_stored_image_is_revalidated_whole_and_both_validators_agree():
    r = _run(LINUX_LIKE)
    stats = image_info(LINUX_LIKE, out=io.StringIO())["page_table_stats"]
    assert r["mem_bytes"] == 256 << 20 and r["guest_pages"] == 65536
    assert r["page_table_frames"] == r["tables_validated"] == stats["tables"]["total"]
    assert r["ptes"] == r["reference_ptes"] == stats["present_entries"]["total"]
    assert r["ptes_by_level"] == {f"l{i}": stats["present_entries"][f"L{i}"] for i in (1, 2, 3, 4)}
    assert r["roots"] == 10 and r["pins"] == 9  # nine pinned L4s, then vCPU 0's CR3
    assert r["reference_sample_is_guest"] and r["equal_on_sample"]
    assert r["reference_sample_roots"] == r["roots"]
    assert r["bulk_s_per_gib"] == pytest.approx(r["bulk_s"] * 4)


def test_the_reference_takes_a_sample_of_roots_when_the_image_is_too_large():
    r = _run(LINUX_LIKE, sample_ptes=2000)
    assert not r["reference_sample_is_guest"] and r["equal_on_sample"]
    assert 1 <= r["reference_sample_roots"] < r["roots"]
    assert r["reference_ptes"] < r["ptes"]
    # the rate measured on the sample, extrapolated to the whole image
    assert r["reference_s_per_gib"] == pytest.approx(
        r["ptes"] / r["reference_pte_per_s"] * 4)


def test_linear_entries_and_self_maps_are_validated_targets_first(tmp_path):
    image = tmp_path / "tree.img"
    write_synthetic_image(image)  # three linear entries, two of them self-maps
    r = _run(image)
    assert r["equal_on_sample"] and r["tables_validated"] == r["page_table_frames"] == 9


def test_a_bulk_reference_mismatch_is_loud(monkeypatch):
    real = bench.bulk_validate

    def one_count_too_many(mem, frames, domid, roots):
        result = real(mem, frames, domid, roots)
        writable = np.flatnonzero(frames.types() == PageType.WRITABLE)
        frames.type_info[writable[0]] += np.uint64(1)
        return result

    monkeypatch.setattr(bench, "bulk_validate", one_count_too_many)
    with pytest.raises(RevalidateMismatchError, match=r"differ on the sample \(1 differing"):
        _run(LINUX_LIKE)


def test_an_image_whose_tables_do_not_validate_is_refused(tmp_path):
    bad = tmp_path / "bad.img"
    pfn, _ = first_page_of_type(LINUX_LIKE, Pfinfo.L1TAB)

    def writable_self_map(entries):
        entries[511] = np.uint64((pfn << 12) | 0x67)

    rewrite(LINUX_LIKE, bad, edit_page(pfn, writable_self_map))
    with pytest.raises(RevalidateBenchError, match="do not validate .*hvlab image verify"):
        _run(bad)


@pytest.mark.parametrize("args, message", [
    (["--image", str(IMAGES / "hvm-lapic-2ms.img.zst")], "an HVM image"),
    (["--image", str(LINUX_LIKE), "--mem", "1G"], "leave out --mem"),
    (["--image", str(LINUX_LIKE), "--build", "9.9"], "9.9"),
    (["--image", "/nonexistent.img"], "No such file"),
])
def test_bad_requests_are_one_line_and_status_2(capsys, args, message):
    assert main(["bench", "revalidate", "--quiet", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert message in captured.err and len(captured.err.strip().splitlines()) == 1


def test_cli_json_has_the_generated_bench_fields(capsys):
    assert main(["bench", "revalidate", "--quiet", "--json", "--repeat", "2", "--image",
                 str(LINUX_LIKE)]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["repeats"] == 2 and len(r["bulk_runs_s"]) == len(r["scan_runs_s"]) == 2
    for key in ("mem_bytes", "guest_pages", "page_table_frames", "ptes", "ptes_by_level",
                "bulk_s", "bulk_cold_s", "bulk_phases_s", "floor_s", "scan_s", "reference_s",
                "reference_pte_per_s", "equal_on_sample", "bulk_vs_reference", "bulk_vs_floor",
                "bulk_vs_scan", "peak_rss_mb", "build", "unicorn"):
        assert key in r
    assert main(["bench", "revalidate", "--quiet", "--image", str(LINUX_LIKE)]) == 0
    assert "equal on sample      yes" in capsys.readouterr().out
