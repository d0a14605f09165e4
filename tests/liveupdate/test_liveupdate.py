"""Live update end to end: every strategy, both directions, fault injection, the proof."""

from __future__ import annotations

import json

import pytest

from hypervisor.cli import main
from hypervisor.liveupdate.orchestrator import PHASES, UpdatePlan
from hypervisor.runner import run_with_updates
from hypervisor.scenario import UpdateSpec, load_scenario
from tests import SCENARIOS
from tests.results import SHORT_BLACKOUT_COSTS as SHORT
from tests.results import across_modes, in_process_and_exec, stable

STRATEGIES = ["full-walk", "transfer", "prevalidate", "lazy"]


def update(scenario_name: str, at: str, to: str, strategy: str, **plan) -> dict:
    scenario = load_scenario(SCENARIOS / scenario_name)
    from hypervisor.scenario import parse_time

    spec = UpdateSpec(parse_time(at, "at"), to, strategy)
    return run_with_updates(scenario, [spec], UpdatePlan(to, strategy, **plan))


def final_codes(result: dict) -> dict[str, int | None]:
    return {d["name"]: d["shutdown"]["code"] for d in result["domains"]}


@pytest.fixture(scope="module")
def baseline() -> dict:
    from hypervisor.runner import run_scenario

    return run_scenario(load_scenario(SCENARIOS / "pv-smp.toml"))


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("to", ["4.12", "4.19"])
def test_every_strategy_proves_and_the_guests_finish(strategy, to, baseline):
    result = update("pv-smp.toml", "2ms", to, strategy)
    (report,) = result["updates"]
    assert report["outcome"] == "updated" and report["proof"]["ok"], report["proof"]
    assert report["from_build"] == "4.19" and report["to_build"] == to
    assert set(report["phases_wall_s"]) == set(PHASES)
    assert report["modelled_downtime_ns"] > 0 and report["blackout_wall_s"] > 0
    assert final_codes(result) == {"smp": 0}
    assert result["domains"][0]["typeref_differences"] == []
    # the guest's own story is the same as without an update
    assert result["domains"][0]["console"] == baseline["domains"][0]["console"]
    if strategy == "transfer":
        assert report["translator"] == f"type_info_4_19_to_{to.replace('.', '_')}"
    if strategy == "lazy":
        counters = report["counters"]
        assert report["proof_after_lazy"]["ok"]
        assert counters["shadow_off_virtual_ns"] is not None
        assert counters["lazy_pages_validated"] > 0


def test_back_and_forth_between_builds():
    scenario = load_scenario(SCENARIOS / "pv-ptchurn.toml")
    specs = [UpdateSpec(2_000_000, "4.12", "full-walk"), UpdateSpec(4_000_000, "4.19", "transfer")]
    result = run_with_updates(scenario, specs, UpdatePlan("4.12", "full-walk"))
    assert [u["proof"]["ok"] for u in result["updates"]] == [True, True]
    assert [(u["from_build"], u["to_build"]) for u in result["updates"]] == [
        ("4.19", "4.12"), ("4.12", "4.19")]
    assert final_codes(result) == {"ptchurn": 0}


# every phase once, and the phases after the point of no return for every strategy (each
# keeps state staged before the pause that a phase done over must not trust)
FAULTS = [(phase, "full-walk") for phase in PHASES] + [
    (phase, strategy) for phase in ("restore", "typerefs", "resume")
    for strategy in ("transfer", "prevalidate", "lazy")]


@pytest.mark.parametrize("phase, strategy", FAULTS)
def test_a_failure_in_any_phase_still_proves_and_finishes(phase, strategy):
    result = update("pv-smp.toml", "2ms", "4.12", strategy, fail_at=phase)
    (report,) = result["updates"]
    assert report["injected"] == [phase]
    assert report["proof"]["ok"]
    before_point_of_no_return = phase in ("pause", "save")
    assert report["outcome"].startswith("aborted") == before_point_of_no_return
    assert result["build"] == ("4.19" if before_point_of_no_return else "4.12")
    assert final_codes(result) == {"smp": 0}


def test_a_corrupt_handover_stream_resumes_the_old_build():
    result = update("pv-smp.toml", "2ms", "4.12", "full-walk", corrupt_stream=True)
    (report,) = result["updates"]
    assert report["outcome"].startswith("aborted") and "stream" in report["reason"]
    assert result["build"] == "4.19" and final_codes(result) == {"smp": 0}


def test_a_pair_without_translator_is_refused_before_pausing(capsys):
    status = main(["update", str(SCENARIOS / "pv-smp.toml"), "--at", "2ms", "--to", "4.4",
                   "--strategy", "transfer"])
    err = capsys.readouterr().err
    assert status == 2 and "no translator from build 4.19 to 4.4" in err


def test_cli_json_has_the_promised_fields(capsys):
    status = main(["update", str(SCENARIOS / "pv-smp.toml"), "--at", "2ms", "--to", "4.12",
                   "--strategy", "full-walk", "--json"])
    assert status == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("strategy", "from_build", "to_build", "blackout_wall_s", "modelled_downtime_ns",
                "phases_wall_s", "counters", "proof"):
        assert key in result
    assert result["proof"]["ok"] is True


def test_cost_table_overrides_change_the_model(tmp_path, capsys):
    costs = tmp_path / "costs.json"
    costs.write_text('{"pause_per_vcpu": 0, "resume_per_vcpu": 0, "pte_examined": 1000}')
    args = ["update", str(SCENARIOS / "pv-smp.toml"), "--at", "2ms", "--to", "4.12",
            "--strategy", "full-walk", "--json"]
    main(args)
    default = json.loads(capsys.readouterr().out)["modelled_downtime_ns"]
    main([*args, "--costs", str(costs)])
    custom = json.loads(capsys.readouterr().out)
    ptes = custom["counters"]["blackout_ptes_examined"]
    assert custom["modelled_downtime_ns"] != default
    assert custom["modelled_downtime_ns"] >= 1000 * ptes
    costs.write_text('{"nonsense": 1}')
    assert main([*args, "--costs", str(costs)]) == 2
    assert "unknown cost 'nonsense'" in capsys.readouterr().err


def test_lazy_a_guest_touching_a_fresh_region_validates_by_fill(tmp_path):
    """pv_touch walks its whole start-of-day region; with 2 GiB of RAM the P2M list alone
    spans an L1 that neither RIP nor RSP uses, so the guest's first touch validates it."""
    scenario = tmp_path / "touch.toml"
    scenario.write_text(f"""
[machine]
pcpus = 1
memory = "2100M"
[[domain]]
name = "touch"
kernel = "{SCENARIOS / 'guests' / 'pv_touch.elf'}"
memory = "2G"
[limits]
virtual_time = "10ms"
""")
    result = run_with_updates(load_scenario(scenario), [UpdateSpec(1_000_000, "4.12", "lazy")],
                              UpdatePlan("4.12", "lazy"))
    (report,) = result["updates"]
    counters = report["counters"]
    assert counters["lazy_fill_validations"] >= 1
    assert counters["lazy_pages_validated"] > counters["blackout_pages_validated"]
    assert report["proof"]["ok"] and report["proof_after_lazy"]["ok"]
    assert result["domains"][0]["typeref_differences"] == []


@pytest.mark.parametrize("strategy", ["full-walk", "lazy"])
def test_exec_into_a_new_process_gives_the_same_proof_and_final_state(strategy, capsys):
    in_process, execed = in_process_and_exec(capsys, [
        "update", str(SCENARIOS / "pv-smp.toml"), "--at", "2ms", "--to", "4.12",
        "--strategy", strategy, "--json"])
    assert across_modes(execed) == across_modes(in_process)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_update_mixed_stored_guests_to_4_19_and_back(strategy):
    """pv_ptchurn and pv_smp saved mid-run, a generated 1 GiB guest and hvm_lapic (with
    device periods longer than any modelled blackout), on 4.12, with the default costs."""
    scenario = load_scenario(SCENARIOS / "update-mixed.toml")
    assert scenario.build == "4.12"
    specs = [UpdateSpec(1_000_000, "4.19", strategy), UpdateSpec(3_000_000, "4.12", "full-walk")]
    result = run_with_updates(scenario, specs,
                              UpdatePlan("4.19", strategy, costs=SHORT))
    first, back = result["updates"]
    assert (first["from_build"], first["to_build"]) == ("4.12", "4.19")
    assert (back["from_build"], back["to_build"]) == ("4.19", "4.12")
    assert first["proof"]["ok"] and back["proof"]["ok"]
    if strategy == "lazy":
        assert first["proof_after_lazy"]["ok"]
        # guest instructions per virtual ms while shadow mode was on: at most one per
        # virtual ns on each pCPU
        assert 0 < first["throughput"]["during_lazy"] <= scenario.pcpus * 1e6
    assert final_codes(result) == {"ptchurn": 0, "smp": 0, "linux-1g": 0, "lapic": 0}
    assert all(d["typeref_differences"] == [] for d in result["domains"])


@pytest.mark.parametrize("strategy", ["lazy", "prevalidate"])
def test_an_update_run_is_deterministic(strategy, capsys):
    args = ["update", str(SCENARIOS / "pv-smp.toml"), "--at", "2ms", "--to", "4.12",
            "--strategy", strategy, "--json"]
    outputs = []
    for _ in range(2):
        assert main(args) == 0
        outputs.append(stable(json.loads(capsys.readouterr().out)))
    assert outputs[0] == outputs[1]


def test_to_and_strategy_without_at_re_aim_the_scenarios_updates(capsys):
    status = main(["update", str(SCENARIOS / "update-mixed.toml"), "--to", "4.19",
                   "--strategy", "transfer", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert status == 0 and result["strategy"] == "transfer" and result["at_ns"] == 1_000_000


def test_an_update_while_lazy_validation_is_still_running_finishes_it_first():
    """The second update's hand-over must describe complete type state: the first
    (lazy) update's sweeper has not reached the 1 GiB guest's tables yet."""
    scenario = load_scenario(SCENARIOS / "update-mixed.toml")
    specs = [UpdateSpec(1_000_000, "4.19", "lazy"), UpdateSpec(1_010_000, "4.12", "lazy")]
    result = run_with_updates(scenario, specs,
                              UpdatePlan("4.19", "lazy", costs=SHORT))
    first, second = result["updates"]
    assert first["proof"]["ok"] and first["proof_after_lazy"]["ok"]
    assert second["proof"]["ok"] and second["proof_after_lazy"]["ok"]
    assert final_codes(result) == {"ptchurn": 0, "smp": 0, "linux-1g": 0, "lapic": 0}
    assert all(d["typeref_differences"] == [] for d in result["domains"])
