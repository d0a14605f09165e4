"""The command line end to end: image tools, save, benches' wiring, exit statuses."""

from __future__ import annotations

import json

import pytest

from hypervisor.cli import main
from tests import ROOT

IMAGES = ROOT / "scenarios" / "images"


def run(capsys, *args: str) -> tuple[int, str, str]:
    status = main(list(args))
    out = capsys.readouterr()
    return status, out.out, out.err


def test_image_info_json_of_a_stored_image(capsys):
    status, out, _ = run(capsys, "image", "info", str(IMAGES / "pv-smp-2ms.img.zst"), "--json")
    assert status == 0
    info = json.loads(out)
    assert info["domain_type"] and info["nr_pages"] == 1024 and info["build"] == "4.19"
    assert info["pins"]["L4"] == 1 and info["pins"]["total"] == 1
    assert info["vcpus"]["count"] == 2 and info["vcpus"]["online"] == 2


def test_image_verify_good_and_bad(tmp_path, capsys):
    assert run(capsys, "image", "verify", str(IMAGES / "pv-dense-64M.img.zst"))[0] == 0
    bad = tmp_path / "bad.img"
    bad.write_bytes((IMAGES / "pv-hello-100us.img.zst").read_bytes()[:200])
    status, _, err = run(capsys, "image", "verify", str(bad))
    assert status == 2 and err.count("\n") <= 1


def test_image_make_then_run_from_it(tmp_path, capsys):
    image = tmp_path / "small.img.zst"
    status, out, _ = run(capsys, "image", "make", "--pv", "--mem", "32M", "--layout", "dense",
                         "--seed", "3", "-o", str(image), "--json")
    assert status == 0 and image.exists() and json.loads(out[out.index("{"):])
    scenario = tmp_path / "s.toml"
    scenario.write_text(f'[machine]\nmemory = "64M"\n[[domain]]\nname = "g"\nimage = "{image}"\n'
                        '[limits]\nvirtual_time = "2ms"\n')
    status, out, _ = run(capsys, "run", str(scenario), "--json")
    result = json.loads(out)
    assert status == 0 and result["domains"][0]["typeref_differences"] == []


def test_save_names_a_missing_domain(tmp_path, capsys):
    status, _, err = run(capsys, "save", str(ROOT / "scenarios" / "pv-hello.toml"),
                         "--domain", "nobody", "--at", "10us", "-o", str(tmp_path / "x.img"))
    assert status == 2 and "no domain 'nobody'" in err


def test_bench_revalidate_small(capsys):
    status, out, _ = run(capsys, "bench", "revalidate", "--mem", "32M", "--json")
    result = json.loads(out)
    assert status == 0 and result["equal_on_sample"] is True
    for key in ("ptes", "bulk_s", "reference_pte_per_s", "bulk_pte_per_s", "scan_s",
                "bulk_vs_reference", "bulk_vs_scan", "peak_rss_mb"):
        assert key in result


@pytest.mark.slow
def test_bench_update_reports_every_strategy_and_size(capsys):
    status, out, _ = run(capsys, "bench", "update", "--json", "--sizes", "256M,1G",
                         "--repeat", "2")
    result = json.loads(out)
    assert status == 0
    rows = {(r["strategy"], r["size_gib"]) for r in result["rows"]}
    assert rows == {(s, g) for s in ("full-walk", "transfer", "lazy", "prevalidate")
                    for g in (0.25, 1.0)}
    for row in result["rows"]:
        assert row["blackout_wall_s"] > 0 and row["modelled_downtime_ns"] > 0
        assert row["total_work_wall_s"] >= row["blackout_wall_s"]
        assert len(row["blackout_wall_s_runs"]) == 2
        assert row["blackout_wall_s"] == row["blackout_wall_s_runs"][0]  # the lower median
