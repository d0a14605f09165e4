"""Debian's Linux 6.1 boots as a PV domU with 2 vCPUs on 2 pCPUs, from the bzImage to
poweroff: vCPU 1 comes up the Xen-PV way (VCPUOP_initialise, VCPUOP_up) and both run
the workload; two runs give the same JSON.

Slow (two Linux boots); the pieces it relies on are tested by the default suite in
tests/pv/xen/test_smp_*.py. Run with `python -m pytest -m slow tests/pv/linux/test_boot_smp.py`.
"""

from __future__ import annotations

import json

import pytest

from hypervisor.cli import main
from hypervisor.pv.linux.initramfs import expected_workload_checksum
from tests import ROOT
from tests.pv.linux.test_boot import _without_wall

SCENARIO = ROOT / "scenarios" / "linux-pv-smp.toml"


def _run_json(capsys) -> dict:
    assert main(["run", str(SCENARIO), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_linux_boots_on_two_vcpus_runs_the_workload_and_powers_off(linux_build, capsys):
    first = _run_json(capsys)
    dom = first["domains"][0]
    console = dom["console"]
    milestones = ["Linux version 6.1", "smp: Bringing up secondary CPUs",
                  "smp: Brought up 1 node, 2 CPUs", "Run /init as init process",
                  "hvlab-linux: init ok",
                  f"hvlab-linux: workload ok {expected_workload_checksum()}"]
    positions = [console.find(m) for m in milestones]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), console[-3000:]
    assert dom["shutdown"]["reason"] == "poweroff" and dom["shutdown"]["code"] == 0
    assert dom["typeref_differences"] == []
    calls = dom["xen_pv"]["hypercalls"]
    assert calls["vcpu_op"] > 0 and calls["sched_op"] > 0
    assert all(v["instructions"] > 0 for v in dom["vcpus"])  # both vCPUs ran
    second = _run_json(capsys)
    assert _without_wall(first) == _without_wall(second)
