"""Each typeref strategy on its own, on a real hand-over, and the strategy registry.

`handed_over` does by hand what the orchestrator does around a strategy: the old build
(pv-smp, run for a while) writes the hand-over and is torn down; a new build boots on
the same memory and claims the guests' frames. Then the strategy under test runs and
the new build's type state is compared with the old one's (what the proof compares).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from hypervisor.core.hypervisor import Hypervisor
from hypervisor.liveupdate import strategies
from hypervisor.liveupdate.handover import (
    changed_domains,
    frames_in_use,
    handed_over_pages,
    read_handover,
    write_handover,
)
from hypervisor.liveupdate.orchestrator import UpdatePlan, install_handed_over, live_update
from hypervisor.liveupdate.proof import ProofFailed, compare_types, type_state
from hypervisor.liveupdate.strategies.base import (
    SWEEP_BUDGET_PTES,
    NewBuild,
    StrategyError,
    UpdateSettings,
)
from hypervisor.pv.linux.backends import BackendPoll
from hypervisor.runner import boot_scenario
from hypervisor.scenario import load_scenario
from tests import SCENARIOS

MS = 1_000_000


def handed_over(workdir: Path, name: str, to: str = "4.12", scenario: str = "pv-smp.toml"):
    """(NewBuild ready for the strategy's `rebuild`, the old build's type state by domid)."""
    old = boot_scenario(load_scenario(SCENARIOS / scenario))
    old.run(2 * MS)
    strategy = strategies.strategy(name)
    settings = UpdateSettings(to, SWEEP_BUDGET_PTES)
    ahead = strategy.before_pause(old, settings, None)
    before = {d.domid: type_state(old, d.p2m) for d in old.domains}
    write_handover(old, workdir, strategy.hands_over_types, {})
    in_use = [frames_in_use(d) for d in old.domains]
    machine, memory, build, now = old.machine, old.memory, old.build, old.now
    changed = changed_domains(old) if old.frame_table.type_log is not None else set()
    old.teardown()
    new = Hypervisor(machine, to, memory, in_use=in_use)
    new.now = now
    handovers = read_handover(workdir)
    for domid, ho in enumerate(handovers):
        new.claim_frames(ho.p2m, domid)
        # the hypervisor pages it owns (shared_info), as the orchestrator gives them back
        new.frame_table.assign(handed_over_pages(ho.meta), domid)
    return NewBuild(new, handovers, settings, build, ahead, changed, {}, {}), before


def differences(nb: NewBuild, before) -> list[str]:
    return [p for domid, ho in enumerate(nb.handovers)
            for p in compare_types(ho.meta["name"], before[domid], type_state(nb.hv, ho.p2m))]


def test_the_registry_lists_every_strategy_module_in_reading_order():
    assert strategies.names() == ("full-walk", "transfer", "lazy", "prevalidate")
    assert all(strategies.strategy(n).name == n for n in strategies.names())
    with pytest.raises(StrategyError, match=r"unknown strategy 'none' \(choose from full-walk, "):
        strategies.strategy("none")


@pytest.mark.parametrize("name", ["full-walk", "transfer", "prevalidate"])
def test_a_blackout_strategy_rebuilds_the_old_builds_type_state(name, tmp_path):
    nb, before = handed_over(tmp_path, name)
    assert differences(nb, before)  # nothing typed yet: the check can see a difference
    counters = strategies.strategy(name).rebuild(nb)
    assert differences(nb, before) == []
    if name == "full-walk":
        assert counters["blackout_pages_validated"] > 0 and counters["blackout_refs_taken"] > 0
    elif name == "transfer":
        # every frame of the domain and the hypervisor pages it owns (shared_info)
        assert counters["frames_translated"] == sum(ho.p2m.size + handed_over_pages(ho.meta).size
                                                    for ho in nb.handovers)
        assert counters["translator"] == "type_info_4_19_to_4_12"
    else:  # validated before the pause in a table of its own: copied in the blackout
        assert counters["frames_copied"] > 0 and counters["domains_redone"] == 0


def test_reset_returns_every_frame_to_bare_ownership(tmp_path):
    nb, _ = handed_over(tmp_path, "full-walk")
    strategy = strategies.strategy("full-walk")
    strategy.rebuild(nb)
    strategy.reset(nb)
    for domid, ho in enumerate(nb.handovers):
        state = type_state(nb.hv, ho.p2m)
        assert not state["count"].any() and not state["pinned"].any()
        assert (nb.hv.frame_table.owner[ho.p2m.astype(np.int64)] == domid).all()
    assert strategy.rebuild(nb)["blackout_pages_validated"] > 0  # and can start over


def test_transfer_refuses_a_pair_of_builds_without_a_translator():
    with pytest.raises(StrategyError, match="no translator from build 4.19 to 4.4"):
        strategies.strategy("transfer").check("4.19", UpdateSettings("4.4", 1))


def test_prevalidate_without_its_work_ahead_is_refused(tmp_path):
    nb, _ = handed_over(tmp_path, "full-walk")
    with pytest.raises(StrategyError, match="nothing was prepared before the pause"):
        strategies.strategy("prevalidate").rebuild(nb)


def test_lazy_leaves_the_blackout_empty_and_completes_after_the_resume(tmp_path):
    nb, before = handed_over(tmp_path, "lazy")
    lazy = strategies.strategy("lazy")
    assert lazy.rebuild(nb) == {} and not lazy.proves_types_at_resume
    for ho in nb.handovers:
        bases = {vid: (c.ctrlreg[3] >> 12, c.ctrlreg[1] >> 12) for vid, c in ho.contexts.items()}
        dom = install_handed_over(nb.hv, ho, bases)
        lazy.domain_installed(nb, dom, ho)
        assert all(v.mmu.pending_typing is not None for v in dom.vcpus)
    assert nb.counters["blackout_pages_validated"] > 0  # the RIP/RSP paths, in the blackout
    backends = [h for h in nb.hv.slice_hooks if isinstance(h, BackendPoll)]  # the rings'
    assert len(nb.hv.slice_hooks) > len(backends)  # the sweeper runs after each slice until
    # all is validated
    nb.hv.finish_background_work()
    assert differences(nb, before) == [] and nb.hv.slice_hooks == backends


def test_recipe_a_new_strategy_is_one_module(tmp_path, monkeypatch):
    """README "How do I add a live-update strategy": one module in
    hypervisor/liveupdate/strategies/ defining STRATEGY. This one does nothing: an HVM
    guest (no PV page types) updates and proves; a PV guest's proof fails loudly."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "no_op.py").write_text(
        "from hypervisor.liveupdate.strategies.base import Strategy\n\n\n"
        "class NoOp(Strategy):\n    name = \"no-op\"\n\n\nSTRATEGY = NoOp()\n")
    monkeypatch.setattr(strategies, "__path__", [*strategies.__path__, str(tmp_path / "pkg")])
    monkeypatch.delitem(sys.modules, f"{strategies.__name__}.no_op", raising=False)
    strategies.registry.cache_clear()
    try:
        assert strategies.names()[-1] == "no-op"
        hvm = boot_scenario(load_scenario(SCENARIOS / "hvm-lapic.toml"))
        hvm.run(MS)
        new, report = live_update(hvm, UpdatePlan("4.12", "no-op", workdir=tmp_path / "a"))
        assert report["outcome"] == "updated" and report["proof"]["ok"]
        new.teardown()
        pv = boot_scenario(load_scenario(SCENARIOS / "pv-hello.toml"))
        pv.run(MS // 10)
        with pytest.raises(ProofFailed, match="type state 'count' differs"):
            live_update(pv, UpdatePlan("4.12", "no-op", workdir=tmp_path / "b"))
    finally:
        strategies.registry.cache_clear()
        sys.modules.pop(f"{strategies.__name__}.no_op", None)
