"""Debian's Linux live-updated while it runs (scenarios/linux-update.toml): the proof
passes, the console is byte-identical to the run without an update, poweroff code 0.

Slow (a whole Linux run each, ~1 min of CPU): `python -m pytest -m slow
tests/liveupdate/test_linux_update.py`. Twelve runs in all: the run without an update
once, the four strategies in the middle of the page-table workload, one strategy at
each of three other points (boot before init, fork/exit churn, mid-execve; the times
come from a trace, listed in the scenario), and --exec for every strategy. The
default suite covers the same code with a tiny CPL-3 guest (test_cpl3_update.py).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hypervisor.cli import main
from tests import ROOT
from tests.pv.linux.conftest import linux_build  # noqa: F401 - skips without fetch.sh

SCENARIO = ROOT / "scenarios" / "linux-update.toml"
MID_WORKLOAD = "3170ms"  # the scenario's own [[update]]
OTHER_POINTS = [("2000ms", "full-walk"),  # boot, before init (after printk.time=0 is read)
                ("3111ms", "transfer"),  # fork/exit churn: a round's workers forked
                ("3135334us", "prevalidate")]  # mid-execve (3135.11 -> 3135.56 ms)


@pytest.fixture(scope="session")
def baseline(request) -> dict:
    """The same scenario run without its update, once."""
    request.getfixturevalue("linux_build")  # skips (fails with CI=true) without fetch.sh
    from hypervisor.runner import run_scenario
    from hypervisor.scenario import load_scenario

    (dom,) = run_scenario(load_scenario(SCENARIO))["domains"]
    assert dom["shutdown"]["reason"] == "poweroff" and dom["shutdown"]["code"] == 0
    assert "hvlab-linux: workload ok" in dom["console"]
    return dom


def _updated(capsys, strategy: str, at: str | None = None) -> dict:
    args = ["update", str(SCENARIO), "--strategy", strategy, "--json"]
    assert main(args + (["--at", at, "--to", "4.12"] if at else [])) == 0
    return json.loads(capsys.readouterr().out)


def _same_end(result: dict, baseline: dict) -> dict:
    (report,) = result["updates"]
    assert report["outcome"] == "updated", report.get("reason")
    assert report["proof"]["ok"] and report["proof"]["checks"]["xen_domains"] == 1
    (dom,) = result["domains"]
    assert dom["console"] == baseline["console"]  # byte for byte
    assert dom["shutdown"]["reason"] == "poweroff" and dom["shutdown"]["code"] == 0
    assert dom["typeref_differences"] == []
    return report


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["full-walk", "transfer", "lazy", "prevalidate"])
def test_every_strategy_mid_workload(strategy, baseline, capsys):
    report = _same_end(_updated(capsys, strategy), baseline)
    assert report["at_ns"] == 3_170_000_000 and report["to_build"] == "4.12"
    if strategy == "lazy":
        counters = report["counters"]
        assert report["proof_after_lazy"]["ok"]
        # Linux's first page-table hypercall after the resume validates the rest
        # (finish_pending_typing): the sweeper may never get a turn
        assert counters["lazy_fill_validations"] > 0 and counters["sweeper_steps"] >= 0
        assert counters["lazy_pages_validated"] > 0 and counters["shadow_off_virtual_ns"] > 0
        rates = report["throughput"]
        assert all(rates[k] for k in ("before", "during_lazy", "after", "during_lazy_modelled"))
        assert rates["during_lazy_modelled"] < rates["during_lazy"]


@pytest.mark.slow
@pytest.mark.parametrize("at, strategy", OTHER_POINTS)
def test_other_points(at, strategy, baseline, capsys):
    _same_end(_updated(capsys, strategy, at), baseline)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["full-walk", "transfer", "lazy", "prevalidate"])
def test_with_exec(strategy, baseline):
    done = subprocess.run([sys.executable, "-m", "hypervisor.cli", "update", str(SCENARIO),
                           "--strategy", strategy, "--json", "--exec"],
                          capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["updates"][0]["exec"]["new_program_image"]
    _same_end(result, baseline)
