"""Debian's Linux 6.1 boots as a PV domU under hvlab, from the bzImage to poweroff.

About 3.3e9 guest instructions (several minutes on a shared 2-core machine),
hence slow; the pieces it relies on are tested in tests/pv/xen/ by the
default suite. Run with `python -m pytest -m slow tests/pv/linux/test_boot.py`.
"""

from __future__ import annotations

import json

import pytest

from hypervisor.cli import main
from hypervisor.pv.linux.initramfs import expected_workload_checksum
from tests import ROOT

SCENARIO = ROOT / "scenarios" / "linux-pv.toml"


def _run_json(capsys) -> dict:
    assert main(["run", str(SCENARIO), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _without_wall(value):
    """The run's JSON minus wall fields and `tlb_fills`: unicorn (QEMU 5) resizes its TLB
    when a wall-clock window has passed between flushes, so on a run this long how
    often it refills varies; what the guest sees and every other figure do not."""
    if isinstance(value, dict):
        return {k: _without_wall(v) for k, v in value.items()
                if "wall" not in k and k != "tlb_fills"}
    if isinstance(value, list):
        return [_without_wall(v) for v in value]
    return value


@pytest.mark.slow
def test_linux_boots_to_init_runs_the_workload_and_powers_off(linux_build, capsys):
    first = _run_json(capsys)
    dom = first["domains"][0]
    console = dom["console"]
    milestones = ["Linux version 6.1", "Run /init as init process", "hvlab-linux: init ok",
                  f"hvlab-linux: workload ok {expected_workload_checksum()}"]
    positions = [console.find(m) for m in milestones]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), console[-2000:]
    assert dom["shutdown"]["reason"] == "poweroff" and dom["shutdown"]["code"] == 0
    assert dom["typeref_differences"] == []
    assert dom["xen_pv"]["kernel"] == linux_build.vmlinuz.name
    assert dom["xen_pv"]["ptwr"] > 0 and dom["xen_pv"]["hypercalls"]["iret"] > 0
    second = _run_json(capsys)
    assert _without_wall(first) == _without_wall(second)
