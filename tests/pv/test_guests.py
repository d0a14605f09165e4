"""End to end: the PV guest kernels under the full hypervisor, through the CLI."""

from __future__ import annotations

import re

import pytest

from hypervisor.cli import main
from tests import SCENARIOS
from tests.results import run_json, stable


def domain(result: dict, name: str) -> dict:
    return next(d for d in result["domains"] if d["name"] == name)


def test_pv_hello_json_has_the_promised_shape(capsys):
    result = run_json(capsys, "pv-hello.toml")
    (hello,) = result["domains"]
    assert "all checks passed" in hello["console"]
    assert hello["shutdown"]["reason"] == "poweroff" and hello["shutdown"]["code"] == 0
    assert result["instructions"] > 0 and result["virtual_ns"] > 0
    assert result["exits"]["syscall"] > 0  # a ring-3 kernel's hypercalls are syscalls
    assert result["stop"] == "shutdown"
    assert {"build", "unicorn", "seed", "wall_s", "tlb_fills"} <= set(result)
    assert hello["typeref_differences"] == []


def test_pv_hello_text_output_shows_console_and_shutdown(capsys):
    assert main(["run", str(SCENARIOS / "pv-hello.toml")]) == 0
    out = capsys.readouterr().out
    assert "[hello] pv_hello: all checks passed" in out
    assert re.search(r"hello: shut down \(poweroff, code 0\)", out)


def test_pv_smp_counts_its_ticks_and_ipis_and_runs_identically_twice(capsys):
    first = run_json(capsys, "pv-smp.toml")
    second = run_json(capsys, "pv-smp.toml")
    assert stable(first) == stable(second)
    (smp,) = first["domains"]
    assert smp["shutdown"] == {"reason": "poweroff", "code": 0,
                               "virtual_ns": smp["shutdown"]["virtual_ns"]}, smp["console"]
    assert len(smp["vcpus"]) == 2 and all(v["upcalls"] > 0 for v in smp["vcpus"])
    assert smp["typeref_differences"] == []
    # both vCPUs ran on different pCPUs of the two-pCPU machine
    assert {v["pcpu"] for v in smp["vcpus"]} == {0, 1}


def test_pv_faults_passes_its_own_checks(capsys):
    result = run_json(capsys, "pv-faults.toml")
    (faults,) = result["domains"]
    assert faults["shutdown"]["code"] == 0, faults["console"]
    assert "cr2 = 0xffffffff90000000 ok" in faults["console"]
    assert result["exits"]["page_fault"] >= 3 and result["exits"]["exception"] >= 4


def test_a_crashing_domain_takes_down_only_itself(capsys):
    result = run_json(capsys, "pv-crash.toml")
    crashed = [d for d in result["domains"] if d["shutdown"]["reason"] == "crash"]
    fine = [d for d in result["domains"] if d["shutdown"]["reason"] == "poweroff"]
    assert len(crashed) == 1 and len(fine) == 1
    report = crashed[0]["crash_report"]
    # Xen's ABI: the #UD of ud2 finds no trap-table entry; the report names the
    # vector, the reason, RIP and the instruction
    assert re.search(r"unhandled #UD: no trap-table entry at RIP 0x\w+ <crash_here>", report)
    assert "ud2" in report.split("at RIP")[1]
    assert fine[0]["shutdown"]["code"] == 0


def test_trace_prints_disassembly_and_exits(capsys):
    assert main(["trace", str(SCENARIOS / "pv-hello.toml"), "--limit", "200"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 201  # 200 lines and the note that the limit was reached
    assert any(re.search(r"hello/v0 p0 0xffffffff8\w+  \w+", line) for line in out)
    assert any("-- exit Syscall" in line for line in out)


@pytest.mark.parametrize("scenario", ["pv-spin.toml", "pv-touch.toml"])
def test_benchmark_guests_finish_cleanly(capsys, scenario):
    result = run_json(capsys, scenario)
    assert all(d["shutdown"]["code"] == 0 for d in result["domains"])


def test_booting_validates_and_pins_the_initial_tables():
    from hypervisor.mm.builds import PageType
    from hypervisor.runner import boot_scenario
    from hypervisor.scenario import load_scenario

    hv = boot_scenario(load_scenario(SCENARIOS / "pv-hello.toml"))
    (dom,) = hv.domains
    ft = hv.frame_table
    l4 = dom.vcpus[0].roots.kernel_ma >> 12
    assert ft.page_type(l4) == PageType.L4 and ft.is_pinned(l4) and ft.is_validated(l4)
    assert ft.type_count(l4) == 2  # the pin and vCPU 0's CR3
    owned = ft.frames_of(dom.domid)
    types = ft.types(owned)
    # the bootstrap tree: one L4, one L3, one L2, L1s; every mapped data page writable
    assert (types == PageType.L3).sum() == 1 and (types == PageType.L2).sum() == 1
    assert (types == PageType.WRITABLE).sum() > 0
    assert hv.check_typerefs(dom) == []


def test_pv_hostile_refuses_every_attack_and_stays_consistent(capsys):
    result = run_json(capsys, "pv-hostile.toml")
    hostile = domain(result, "hostile")
    match = re.search(r"attacks refused: (\d+)/(\d+)", hostile["console"])
    assert match and match.group(1) == match.group(2) and int(match.group(1)) >= 10
    assert hostile["shutdown"]["code"] == 0
    assert all(d["typeref_differences"] == [] for d in result["domains"])
    assert domain(result, "bystander")["shutdown"]["code"] == 0


def test_pv_ptchurn_keeps_the_typeref_invariant_all_along():
    from hypervisor.runner import boot_scenario
    from hypervisor.scenario import load_scenario

    scenario = load_scenario(SCENARIOS / "pv-ptchurn.toml")
    hv = boot_scenario(scenario)
    (dom,) = hv.domains
    checks = 0
    while dom.alive and hv.now < scenario.virtual_time_ns:
        hv.run(hv.now + 500_000)  # the checker between every half millisecond of churn
        assert hv.check_typerefs(dom) == [], f"at {hv.now} ns"
        checks += 1
    assert checks >= 5
    assert dom.shutdown.code == 0, dom.console_text()[-500:]
