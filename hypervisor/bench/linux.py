"""`hvlab bench linux`: Debian's Linux 6.1 booting as a PV domU, from entry to poweroff.

One run of scenarios/linux-pv.toml, or of the scenario given (`--scenario`, e.g.
scenarios/linux-pv-smp.toml), after scenarios/linux/fetch.sh:
guest instructions, TLB fills, hypercalls by kind, privileged instructions
emulated, ptwr emulations, bounces, wall and CPU time and MIPS (on a shared
machine the process's CPU time is the wall time it would take alone), and how
far the boot got (the last milestone seen on the console).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from hypervisor.lib.errors import HvlabError
from hypervisor.runner import boot_scenario, describe
from hypervisor.scenario import load_scenario

SCENARIO = Path(__file__).resolve().parents[2] / "scenarios" / "linux-pv.toml"
MILESTONES = ("Linux version 6.1", "Run /init as init process", "hvlab-linux: init ok",
              "hvlab-linux: workload ok")


def reached(console: str) -> str | None:
    """The furthest milestone the console shows."""
    seen = [m for m in MILESTONES if m in console]
    return seen[-1] if seen else None


def run_linux_bench(as_json: bool, scenario_path: Path = SCENARIO) -> dict:
    scenario = load_scenario(scenario_path)
    if not (scenario_path.parent / "linux" / "build" / "manifest.json").is_file():
        raise HvlabError("the Linux kernel is not fetched: run scenarios/linux/fetch.sh")
    started, cpu_started = time.perf_counter(), time.process_time()
    hv = boot_scenario(scenario)
    stop = hv.run(scenario.virtual_time_ns)
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    run = describe(hv, scenario, stop, wall)
    dom = run["domains"][0]
    result = {
        "scenario": scenario_path.name,
        "kernel": dom["xen_pv"]["kernel"],
        "reached": reached(dom["console"]),
        "shutdown": dom["shutdown"],
        "crash_report": dom["crash_report"],
        "instructions": run["instructions"],
        "vcpu_instructions": [v["instructions"] for v in dom["vcpus"]],
        "virtual_ns": run["virtual_ns"],
        "tlb_fills": run["tlb_fills"],
        "exits": run["exits"],
        **{k: dom["xen_pv"][k] for k in ("hypercalls", "privops", "forced_cpuids", "ptwr",
                                         "bounces")},
        "typeref_differences": len(dom["typeref_differences"]),
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),  # this process's CPU time: wall on a machine of its own
        "mips": round(run["instructions"] / wall / 1e6, 2),
        "cpu_mips": round(run["instructions"] / cpu / 1e6, 2),
    }
    if as_json:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return result
