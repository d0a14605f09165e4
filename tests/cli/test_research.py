"""hvlab sweep / plot: grids refused before running, tidy rows, resume, Dask, figures."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from hypervisor.cli import main
from hypervisor.research.grid import GridError, load_grid
from hypervisor.research.plot import make_figure
from hypervisor.research.runs import COLUMNS, TERM_COLUMNS
from hypervisor.research.sweep import run_sweep
from hypervisor.research.table import read_rows

GRID = """[sweep]
kind = "update"
sizes = ["64M"]
layouts = ["linux-like"]
strategies = ["full-walk", "lazy"]
builds = ["4.19->4.12"]
seeds = [1]
"""
HOW_IT_RAN = ("workers", "executor")  # record the concurrency: differ by design


def deterministic(rows):
    return sorted(tuple((k, v) for k, v in r.items()
                         if "wall" not in k and k not in HOW_IT_RAN) for r in rows)


@pytest.fixture
def grid(tmp_path):
    path = tmp_path / "grid.toml"
    path.write_text(GRID)
    return path


@pytest.mark.parametrize("bad, message", [
    ('colour = "red"', "unknown key"),
    ('kind = "nap"', "kind must be"),
    ('strategies = ["teleport"]', "unknown strategy"),
    ('builds = ["4.19"]', "FROM->TO"),
    ('builds = ["4.19->9.9"]', "unknown build"),
    ('sizes = ["1K"]', "at least 8M"),
    ('layouts = ["spiral"]', "layout"),
    ('images = ["nowhere.img"]', "either images or sizes"),
    ('repeat = 0', "repeat"),
])
def test_an_impossible_grid_is_refused_before_anything_runs(tmp_path, capsys, bad, message):
    key = bad.split(" = ")[0]
    lines = [line for line in GRID.splitlines() if not line.startswith(key + " ")]
    path = tmp_path / "grid.toml"
    path.write_text("\n".join(lines + [bad]) + "\n")
    with pytest.raises(GridError, match=message):
        load_grid(path)
    out = tmp_path / "out.csv"
    assert main(["sweep", str(path), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not out.exists()


def test_revalidate_grids_have_no_strategies(tmp_path):
    path = tmp_path / "grid.toml"
    path.write_text('[sweep]\nkind = "revalidate"\nsizes = ["64M"]\nstrategies = ["lazy"]\n')
    with pytest.raises(GridError, match="no strategies"):
        load_grid(path)


def test_a_sweep_writes_one_tidy_row_per_run_and_resume_skips_them(grid, tmp_path, capsys):
    out = tmp_path / "out.csv"
    assert main(["sweep", str(grid), "-o", str(out), "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["done"] == 2
    rows = read_rows(out)
    assert [r["strategy"] for r in rows] == ["full-walk", "lazy"]
    assert list(rows[0]) == list(COLUMNS)
    for r in rows:
        assert r["proof_ok"] == "True" and r["size_bytes"] == str(64 << 20)
        assert int(r["modelled_downtime_ns"]) == sum(int(r[c]) for c in TERM_COLUMNS)
        assert int(r["ptes"]) > 0 and int(r["page_tables"]) > 0
        assert r["hvlab_version"] and r["unicorn"] == "2.1.4" and r["workers"] == "1"
    lazy = rows[1]
    assert int(lazy["deferred_work_ns"]) > 0 and int(lazy["typeref_downtime_ns"]) < int(
        rows[0]["typeref_downtime_ns"])
    # a third run is added to the grid: --resume runs only it
    grid.write_text(GRID.replace('["full-walk", "lazy"]', '["full-walk", "lazy", "transfer"]'))
    assert main(["sweep", str(grid), "-o", str(out), "--json", "--quiet", "--resume"]) == 0
    assert json.loads(capsys.readouterr().out) | {"output": ""} == {
        "runs": 3, "done": 1, "skipped": 2, "output": ""}
    assert [r["strategy"] for r in read_rows(out)] == ["full-walk", "lazy", "transfer"]
    # without --resume an existing table is not overwritten
    assert main(["sweep", str(grid), "-o", str(out)]) == 2


def test_a_killed_sweep_keeps_the_rows_it_finished(grid, tmp_path):
    """Rows are on disk as runs finish: kill the sweep after its first row."""
    out = tmp_path / "out.csv"
    code = ("import sys, os\n"
            "from hypervisor.research import sweep\n"
            "from hypervisor.research.table import TableWriter\n"
            "add = TableWriter.add\n"
            "def add_then_die(self, row):\n"
            "    add(self, row); os._exit(9)\n"
            "TableWriter.add = add_then_die\n"
            f"sweep.run_sweep({str(grid)!r}, {str(out)!r}, quiet=True)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert done.returncode == 9
    with out.open() as f:
        assert [r["strategy"] for r in csv.DictReader(f)] == ["full-walk"]


def test_the_same_grid_on_a_dask_local_cluster_gives_the_same_deterministic_columns(
        grid, tmp_path):
    pytest.importorskip("distributed")
    local, dasked = tmp_path / "local.csv", tmp_path / "dask.parquet"
    run_sweep(grid, local, quiet=True)
    summary = run_sweep(grid, dasked, workers=2, dask="local", quiet=True)
    assert summary["done"] == 2
    a, b = read_rows(local), read_rows(dasked)
    assert {r["executor"] for r in b} == {"dask:local"}
    stringify = [{k: "" if v is None else str(v) for k, v in r.items()} for r in b]
    assert deterministic(a) == deterministic(stringify)


def test_plot_draws_the_default_figures_with_axes_and_legends(grid, tmp_path, capsys):
    out = tmp_path / "out.csv"
    run_sweep(grid, out, quiet=True)
    rows = read_rows(out)
    fig = make_figure(rows)
    left, right = fig.axes
    assert left.get_xscale() == "log" and left.get_yscale() == "log"
    assert "MiB" in left.get_xlabel() and "ms" in left.get_ylabel()
    labels = [t.get_text() for t in left.get_legend().get_texts()]
    assert "lazy (modelled native)" in labels and "full-walk (wall)" in labels
    colours = {line.get_label(): line.get_color() for line in left.lines}
    assert colours["lazy (modelled native)"] == colours["lazy (wall)"] != colours[
        "full-walk (wall)"]
    assert right.get_ylim()[0] == 0  # no empty negative half on the symlog axis
    assert "entries" in right.get_xlabel()
    for suffix, magic in ((".png", b"\x89PNG"), (".svg", b"<?xml"), (".pdf", b"%PDF")):
        fig_path = tmp_path / f"fig{suffix}"
        assert main(["plot", str(out), "-o", str(fig_path)]) == 0
        data = fig_path.read_bytes()
        assert data.startswith(magic) and 5_000 < len(data) < 2_000_000
    custom = make_figure(rows, "ptes", "typeref_downtime_ns", "strategy")
    (ax,) = custom.axes
    assert ax.get_xlabel().startswith("page-table entries")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["full-walk", "lazy"]
    capsys.readouterr()
    assert main(["plot", str(out), "-o", str(tmp_path / "f.png"), "--x", "nope",
                 "--y", "ptes"]) == 2
    assert main(["plot", str(out), "-o", str(tmp_path / "f.gif")]) == 2
    assert "no column 'nope'" in capsys.readouterr().err


def test_revalidate_rows_are_sweepable(tmp_path):
    path = tmp_path / "grid.toml"
    path.write_text('[sweep]\nkind = "revalidate"\nsizes = ["16M", "32M"]\nseeds = [3]\n')
    out = tmp_path / "out.csv"
    run_sweep(path, out, quiet=True)
    rows = read_rows(out)
    assert [int(r["size_bytes"]) for r in rows] == [16 << 20, 32 << 20]
    assert int(rows[1]["ptes"]) > int(rows[0]["ptes"]) > 0
    assert all(r["proof_ok"] == "True" and float(r["bulk_wall_s"]) > 0 for r in rows)
    fig = make_figure(rows)
    assert fig.axes[1].get_legend() is not None


def _sweep_with_stderr_on_a_terminal(grid, out, *extra: str) -> tuple[bytes, bytes]:
    """stdout and what reached the terminal on stderr (a pseudo-terminal)."""
    import os
    import pty

    leader, follower = pty.openpty()
    try:
        done = subprocess.run([sys.executable, "-m", "hypervisor.cli", "sweep", str(grid),
                               "-o", str(out), "--json", *extra], stdout=subprocess.PIPE,
                              stderr=follower, timeout=120, check=True)
        os.close(follower)
        seen = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closed: everything is read
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(leader)
    return done.stdout, seen


def test_progress_goes_to_a_terminal_only_and_json_stays_byte_identical(grid, tmp_path):
    out = tmp_path / "out.csv"
    with_bar, terminal = _sweep_with_stderr_on_a_terminal(grid, out)
    out.unlink()
    quiet, silent = _sweep_with_stderr_on_a_terminal(grid, out, "--quiet")
    assert with_bar == quiet and json.loads(quiet)["done"] == 2
    assert b"2/2" in terminal and b"ETA" in terminal  # rich's bar, per run
    assert silent == b""
    out.unlink()
    piped = subprocess.run([sys.executable, "-m", "hypervisor.cli", "sweep", str(grid), "-o",
                            str(out), "--json"], capture_output=True, timeout=120, check=True)
    assert piped.stdout == quiet and b"ETA" not in piped.stderr  # not a terminal: no bar


def test_without_dask_the_command_says_how_to_get_it(grid, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # import fails as if not installed
    out = tmp_path / "out.csv"
    assert main(["sweep", str(grid), "-o", str(out), "--dask", "local"]) == 2
    assert "pip install -e '.[cluster]'" in capsys.readouterr().err
    assert not out.exists()


def test_costs_measure_gives_this_machines_figures():
    from hypervisor.research.cli import measure_memory

    measured = measure_memory(8 << 20, passes=1)
    assert set(measured) == {"frame_table_row_init", "frame_copied"}
    assert all(0 < ns < 1_000 for ns in measured.values())


def test_a_sweep_submits_to_a_running_scheduler_by_its_address(grid, tmp_path):
    distributed = pytest.importorskip("distributed")
    dask = pytest.importorskip("dask")
    out = tmp_path / "out.csv"
    scratch = {"temporary-directory": str(tmp_path / "dask")}  # not /tmp/dask-scratch-space
    with dask.config.set(scratch), distributed.LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None,
            local_directory=str(tmp_path / "dask")) as cluster:
        summary = run_sweep(grid, out, dask=cluster.scheduler_address, quiet=True)
    assert summary["done"] == 2
    rows = read_rows(out)
    assert {r["executor"] for r in rows} == {f"dask:{cluster.scheduler_address}"}
    assert all(r["proof_ok"] == "True" for r in rows)
