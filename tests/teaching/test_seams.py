"""hypervisor/core/seams.py: a lab's code replaces hvlab's exactly where named, survives a live
update into the new build, and is refused where it cannot go (--exec)."""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import pytest

from hypervisor.core.seams import HVLAB_OWN, Seams
from hypervisor.liveupdate.orchestrator import UpdateError, UpdatePlan
from hypervisor.mm.typerefs import take_writable_reference
from hypervisor.runner import run_scenario, run_with_updates
from hypervisor.scenario import UpdateSpec, load_scenario
from tests import SCENARIOS


def test_hvlab_own_is_nothing_plugged():
    assert not HVLAB_OWN.plugged
    assert Seams(lapic_timer=lambda *a: (1, False)).plugged


def test_a_rule_reaches_the_new_build_through_a_live_update(tmp_path):
    """The writable-mapping rule is asked before and after the update (pv-ptchurn maps
    pages writable all along), and the run is the one hvlab's own rule gives."""
    asked: list[int] = []

    def rule(typing, mfn):
        asked.append(mfn)
        return take_writable_reference(typing, mfn)

    scenario = load_scenario(SCENARIOS / "pv-ptchurn.toml")
    updates = [UpdateSpec(1_000_000, "4.12", "full-walk")]
    plan = UpdatePlan("4.12", "full-walk", workdir=tmp_path)
    plugged = run_with_updates(scenario, updates, plan, seams=Seams(writable_mapping=rule))
    asked_before_update = len(asked)
    own = run_with_updates(scenario, updates, replace(plan, workdir=tmp_path / "own"))
    assert plugged["build"] == "4.12" and plugged["proof"]["ok"]
    assert plugged["domains"][0]["console"] == own["domains"][0]["console"]
    assert asked_before_update > 1000  # every writable mapping, both builds
    # the new build asked too: a run stopped at the update asks fewer times
    before = []
    short = replace(scenario, virtual_time_ns=1_000_000)
    run_scenario(short, seams=Seams(writable_mapping=lambda t, m: before.append(1)
                                    or take_writable_reference(t, m)))
    assert 0 < len(before) < asked_before_update


def test_a_plugged_build_cannot_cross_exec(tmp_path, monkeypatch):
    made: list[Path] = []
    mkstemp = tempfile.mkstemp

    def recording_mkstemp(*args, **kwargs):
        fd, name = mkstemp(*args, **kwargs)
        made.append(Path(name))
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", recording_mkstemp)
    scenario = load_scenario(SCENARIOS / "pv-hello.toml")
    plan = UpdatePlan("4.12", "full-walk", exec_new_process=True, workdir=tmp_path)
    with pytest.raises(UpdateError, match="cannot cross into a new process"):
        run_with_updates(scenario, [UpdateSpec(50_000, "4.12", "full-walk")], plan,
                         seams=Seams(full_walk_domain=lambda *a: None))
    assert not any(p.exists() for p in made)  # refused before any memory file is made
