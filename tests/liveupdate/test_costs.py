"""The downtime model: an explained sum, every cost used and sourced."""

from __future__ import annotations

import json

import pytest

from hypervisor.cli import main
from hypervisor.liveupdate import costs as model
from hypervisor.liveupdate.orchestrator import UpdatePlan, live_update, prepare
from hypervisor.runner import boot_scenario
from hypervisor.scenario import load_scenario
from tests import SCENARIOS

# every counter any term reads, once each
ALL_ONES = dict.fromkeys((
    "vcpus", "pcpus", "handover_entries", "event_channels", "timers", "vcpu_contexts",
    "hvm_records", "frame_table_rows", "ownership_runs", "blackout_ptes_examined",
    "blackout_pages_validated", "blackout_refs_taken", "frames_translated", "frames_copied",
    "ept_entries_written", "precopy_entries", "frame_table_rows_staged",
    "prevalidate_ptes_examined", "prevalidate_pages_validated", "prevalidate_refs_taken",
    "lazy_fill_validations"), 1) | {"lazy_ptes_examined": 2, "lazy_pages_validated": 2,
                                    "lazy_refs_taken": 2}


def _all_prices(costs: dict[str, float]) -> tuple[int, int, int]:
    return (model.modelled_ns(ALL_ONES, costs), model.before_pause_ns(ALL_ONES, costs),
            model.deferred_ns(ALL_ONES, costs))


@pytest.mark.parametrize("key", sorted(model.DEFAULT_COSTS_NS))
def test_every_cost_prices_some_work(key):
    raised = dict(model.DEFAULT_COSTS_NS) | {key: model.DEFAULT_COSTS_NS[key] + 1e6}
    assert _all_prices(raised) != _all_prices(model.DEFAULT_COSTS_NS)


def test_every_cost_has_an_origin_and_a_source():
    for key, cost in model.COST_TABLE.items():
        assert cost.origin in (model.MEASURED, model.PUBLISHED, model.ESTIMATE), key
        assert len(cost.source) > 20, key
    assert {c.origin for c in model.COST_TABLE.values()} >= {model.MEASURED, model.ESTIMATE}


def test_the_breakdown_adds_up_and_has_every_phase():
    breakdown = model.downtime_breakdown(ALL_ONES, model.DEFAULT_COSTS_NS)
    assert tuple(breakdown) == model.TERMS
    assert sum(breakdown.values()) == model.modelled_ns(ALL_ONES, model.DEFAULT_COSTS_NS)
    assert all(v > 0 for v in breakdown.values()), breakdown


def test_fixed_terms_are_paid_once_whatever_the_guests():
    nothing = model.downtime_breakdown({}, model.DEFAULT_COSTS_NS)
    assert nothing["boot_new_build"] == model.DEFAULT_COSTS_NS["kexec_boot_fixed"]
    assert nothing["teardown"] == model.DEFAULT_COSTS_NS["teardown_fixed"]
    short = model.without_fixed_costs(model.DEFAULT_COSTS_NS)
    assert model.modelled_ns({}, short) == 0


@pytest.mark.parametrize("strategy", ["full-walk", "prevalidate", "lazy"])
def test_an_update_reports_its_breakdown_and_the_work_outside_the_blackout(strategy, tmp_path):
    hv = boot_scenario(load_scenario(SCENARIOS / "pv-smp.toml"))
    hv.run(2_000_000)
    plan = UpdatePlan("4.12", strategy, workdir=tmp_path)
    new, report = live_update(hv, plan, prepare(hv, plan))
    breakdown = report["downtime_breakdown"]
    assert sum(breakdown.values()) == report["modelled_downtime_ns"]
    assert report["typeref_downtime_ns"] == breakdown["typerefs"]
    counters = report["counters"]
    assert counters["vcpus"] == counters["vcpu_contexts"] == 2 and counters["pcpus"] == 2
    assert counters["event_channels"] > 0  # pv_smp binds IPIs and VIRQs before 2 ms
    assert breakdown["boot_new_build"] > breakdown["typerefs"]  # booting dominates a small guest
    assert report["before_pause_work_ns"] > 0  # the frame table staged ahead, at least
    if strategy == "prevalidate":
        assert report["before_pause"]["prevalidate_ptes_examined"] > 0
    if strategy == "lazy":
        assert report["deferred_work_ns"] is None  # not priced before lazy has finished
        new.finish_background_work()
        assert report["deferred_work_ns"] == model.deferred_ns(report["counters"], plan.costs)
    else:
        assert report["deferred_work_ns"] == 0
    new.teardown()


def test_hvlab_costs_prints_every_value_with_its_origin(capsys):
    assert main(["costs", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert set(table["costs"]) == set(model.DEFAULT_COSTS_NS)
    assert all(row["origin"] in ("measured", "published", "estimate")
               for row in table["costs"].values())
    assert any("HotSwap" in a for a in table["anchors"])
    assert table["terms"] == list(model.TERMS)
    assert main(["costs"]) == 0
    text = capsys.readouterr().out
    assert "kexec_boot_fixed" in text and "estimate" in text and "measured" in text
