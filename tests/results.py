"""Shared by the end-to-end tests: running the CLI for JSON, and comparing results."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from hypervisor.cli import main
from hypervisor.liveupdate.costs import DEFAULT_COSTS_NS, without_fixed_costs
from tests import SCENARIOS

# What legitimately differs between an update in this process and one completed
# in a new program image: that it was exec'd, and what its new process had to
# stage after the pause (it did not exist before).
EXEC_SPECIFIC = ("exec", "late_staging_entries", "late_staging_runs")

# hvm_lapic checks exact interrupt counts (device periods of 33 and 50 us), which a
# native blackout of milliseconds breaks (it fails at a 2.007 ms one): tests about update
# correctness with it price only the typeref, EPT, pause and resume work.
SHORT_BLACKOUT_COSTS = without_fixed_costs(DEFAULT_COSTS_NS) | dict.fromkeys(
    ("evtchn_handed_over", "timer_handed_over", "vcpu_context_handed_over",
     "hvm_record_handed_over", "frame_table_row_init"), 0.0)


def run_json(capsys, scenario: Path | str, *extra: str) -> dict:
    assert main(["run", str(SCENARIOS / scenario), "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def in_process_and_exec(capsys, args: list[str]) -> tuple[dict, dict]:
    """`hvlab ARGS` in this process, then again with --exec in a child (the update
    completes in a new program image); both JSON results, the exec'd one checked."""
    assert main(args) == 0
    in_process = json.loads(capsys.readouterr().out)
    done = subprocess.run([sys.executable, "-m", "hypervisor.cli", *args, "--exec"],
                          capture_output=True, text=True, timeout=120, check=True)
    execed = json.loads(done.stdout)
    assert execed["proof"]["ok"] and "exec" in execed["updates"][0]
    return in_process, execed


def stable(value, drop: tuple[str, ...] = ()):
    """`value` without its wall-clock fields (any name with "wall"), which are all
    that may differ from run to run (README), nor the keys in `drop`."""
    if isinstance(value, dict):
        return {k: stable(v, drop) for k, v in value.items() if "wall" not in k and k not in drop}
    if isinstance(value, list):
        return [stable(v, drop) for v in value]
    return value


def across_modes(value):
    """`value` comparable between an in-process update and an --exec one."""
    return stable(value, EXEC_SPECIFIC)
