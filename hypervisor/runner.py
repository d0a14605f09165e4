"""Running a scenario and describing the outcome (as data, then as text or JSON)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import unicorn

from emulator.memory import HostMemory
from hypervisor.core.hypervisor import Hypervisor, MachineConfig
from hypervisor.core.seams import Seams
from hypervisor.debug.gdb import GdbKilled, GdbSession
from hypervisor.hvm.policy import create_hvm_domain
from hypervisor.images.frames import domain_frames
from hypervisor.kernel_symbols import kernel_symbols, lazy_describer
from hypervisor.lib.errors import HvlabError
from hypervisor.liveupdate.driver import ScheduledUpdate, UpdateRun, check_run
from hypervisor.liveupdate.orchestrator import UpdatePlan
from hypervisor.liveupdate.report import print_update_report
from hypervisor.pv.linux.domain import create_linux_domain
from hypervisor.scenario import Scenario, ScenarioError, load_scenario, parse_time
from hypervisor.tracing import TraceOptions, Tracer, parse_rip_range


def boot_scenario(scenario: Scenario, build: str | None = None,
                  memory: HostMemory | None = None, seams: Seams | None = None) -> Hypervisor:
    """The scenario's machine with its domains, on `build` (default: the scenario's);
    `seams`: a lab's code in place of hvlab's own (hypervisor/core/seams.py)."""
    hv = Hypervisor(MachineConfig(scenario.pcpus, scenario.memory, scenario.quantum_ns),
                    build or scenario.build, memory, seams=seams)
    for spec in scenario.domains:
        if spec.image is not None:
            from hypervisor.images.domains import restore_domain

            dom = restore_domain(hv, spec.image, name=spec.name)
            if spec.type not in ("image", dom.kind):
                raise ScenarioError(f"{scenario.path} domain '{spec.name}': type is "
                                    f"{spec.type!r} but {spec.image.name} holds a {dom.kind} "
                                    "domain")
        elif spec.type == "hvm":
            create_hvm_domain(hv, spec.name, str(spec.kernel), spec.memory, spec.vcpus,
                              pod=spec.pod, sources=spec.sources)
        else:  # every PV kernel, Linux or hvlab's own: Xen's PV ABI (docs/pv-abi.md)
            assert spec.kernel is not None
            dom = create_linux_domain(hv, spec.name, spec.kernel, spec.memory, spec.vcpus,
                                      spec.cmdline, spec.busybox)
            dom.describe_address = lazy_describer(spec.kernel)
    return hv


def run_scenario(scenario: Scenario, trace: TextIO | None = None,
                 trace_limit: int = 10_000, build: str | None = None,
                 seams: Seams | None = None, gdb: str | None = None) -> dict[str, Any]:
    """Run to the end; with `gdb` (HOST:PORT) a gdb client holds it before the first
    instruction and may stop it at will, without changing what the run does."""
    started = time.perf_counter()
    hv = boot_scenario(scenario, build or scenario.build, seams=seams)
    if trace is not None:
        hv.tracer = Tracer(hv, trace, trace_limit)
    session = None
    if gdb is not None:
        session = GdbSession.wait_for_client(hv, gdb, sys.stderr)
    try:
        if session is not None:
            session.hold_before_start()
        stop = hv.run(scenario.virtual_time_ns)
    except GdbKilled:
        stop = "killed by gdb"
    finally:
        if session is not None:
            session.finish(locals().get("stop", "error"))
    wall = time.perf_counter() - started
    return describe(hv, scenario, stop, wall)


def describe(hv: Hypervisor, scenario: Scenario, stop: str, wall_s: float) -> dict[str, Any]:
    domains = []
    for d in hv.domains:
        sd = d.shutdown
        entry: dict[str, Any] = {
            "name": d.name,
            "type": d.kind,
            "memory_pages": d.nr_pages,
            "console": d.console_text(),
            "shutdown": None if sd is None else {"reason": sd.reason, "code": sd.code,
                                                  "virtual_ns": sd.virtual_ns},
            "crash_report": d.crash_report,
            # the typeref invariant recomputed independently (docs/design.md §3); [] = clean
            "typeref_differences": [str(diff) for diff in hv.check_typerefs(d)],
            "vcpus": [{"id": v.vcpu_id, "pcpu": v.pcpu, "instructions": v.instructions,
                       "upcalls": v.upcalls, "state": v.runstate} for v in d.vcpus],
        }
        # what the kind adds (HVM: EPT/PoD; Linux on Xen's ABI: its hypercalls), per vCPU
        entry.update(d.policy.describe(d))
        for row, v in zip(entry["vcpus"], d.vcpus, strict=True):
            row.update(d.policy.describe_vcpu(v))
        domains.append(entry)
    instructions = sum(v.instructions for d in hv.domains for v in d.vcpus)
    return {
        "scenario": str(scenario.path),
        "build": hv.build,
        "unicorn": unicorn.__version__,
        "seed": 0,
        "stop": stop,
        "virtual_ns": hv.now,
        "instructions": instructions,
        "exits": dict(sorted(hv.exits.items())),
        "tlb_fills": sum(cpu.tlb_fills for cpu in hv.pcpus),
        "domains": domains,
        "wall_s": round(wall_s, 6),
    }


def run_with_updates(scenario: Scenario, updates: Sequence[ScheduledUpdate], plan: UpdatePlan,
                     output: str = "none", seams: Seams | None = None,
                     keep_handover: Path | None = None) -> dict[str, Any]:
    """Check every update, boot, run to each update's time, update, run to the end; one
    report per update. `output` ("json", "text" or "none") matters with
    `plan.exec_new_process`: the last process prints. `seams`: a lab's code in place of
    hvlab's (hypervisor/core/seams.py). Hand-overs are removed when done unless
    `keep_handover`."""
    check_run(scenario.build, scenario.virtual_time_ns, updates, plan, keep_handover, seams)
    if keep_handover is not None:
        keep_handover.mkdir(exist_ok=True)
    emit = {"json": print_json, "text": print_update_run}.get(output)
    run = UpdateRun(sorted(updates, key=lambda u: u.at_ns), plan, scenario.memory,
                    scenario.virtual_time_ns, partial(_boot, scenario, seams),
                    partial(_describe, scenario), emit, keep_handover=keep_handover)
    return run.start()


def _boot(scenario: Scenario, seams: Seams | None, memory: HostMemory | None) -> Hypervisor:
    return boot_scenario(scenario, memory=memory, seams=seams)


def _describe(scenario: Scenario, hv: Hypervisor, stop: str, wall_s: float) -> dict[str, Any]:
    return describe(hv, scenario, stop, wall_s)


def print_json(result: dict[str, Any]) -> None:
    json.dump(result, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def print_update_run(result: dict[str, Any], out: TextIO | None = None) -> None:
    """A run with live updates: the updates, then the run's report."""
    print_update_report(result, out)
    print_report(result, out)


def print_report(result: dict[str, Any], out: TextIO | None = None) -> None:
    out = out if out is not None else sys.stdout
    for d in result["domains"]:
        for line in d["console"].splitlines():
            out.write(f"[{d['name']}] {line}\n")
    out.write("\n")
    for d in result["domains"]:
        sd = d["shutdown"]
        if sd is None:
            fate = "still running"
        elif sd["reason"] == "crash":
            fate = f"CRASHED at {sd['virtual_ns'] / 1e6:.3f} ms: {d['crash_report']}"
        else:
            fate = (f"shut down ({sd['reason']}, code {sd['code']}) "
                    f"at {sd['virtual_ns'] / 1e6:.3f} ms virtual")
        out.write(f"{d['name']}: {fate}\n")
        for v in d["vcpus"] if "hvm" in d else []:
            sources = "".join(f", {s['name']} {s['posted']} posted / {s['delivered']} delivered"
                              for s in v["sources"])
            out.write(f"{d['name']}/v{v['id']}: {v['timer_ticks']} timer ticks, IPIs "
                      f"{v['ipis_sent']} sent / {v['ipis_received']} received{sources}\n")
        if d["typeref_differences"]:
            out.write(f"{d['name']}: TYPEREF CHECK FAILED, {len(d['typeref_differences'])} "
                      f"differences, first: {d['typeref_differences'][0]}\n")
    exits = ", ".join(f"{k} {v}" for k, v in result["exits"].items())
    wall = result["wall_s"]
    mips = result["instructions"] / wall / 1e6 if wall else 0.0
    out.write(f"\n{result['instructions']:,} instructions in {result['virtual_ns'] / 1e6:.3f} ms "
              f"virtual, {wall:.2f} s wall ({mips:.1f} MIPS); stop: {result['stop']}\n")
    out.write(f"exits: {exits}\n")


def trace_scenario(scenario_path: str, out: TextIO, limit: int, options: TraceOptions,
                   rip_text: str | None) -> str:
    """Run a scenario with a tracer: the symbols of its guests, the filters, the window."""
    scenario = load_scenario(scenario_path)
    names = [d.name for d in scenario.domains]
    if options.domain is not None and options.domain not in names:
        raise HvlabError(f"--domain {options.domain}: no such domain (domains: "
                         f"{', '.join(names)})")
    for spec in scenario.domains:
        if spec.kernel is not None:
            options.symbols[spec.name] = kernel_symbols(spec.kernel)
    wanted = [options.symbols[n] for n in ([options.domain] if options.domain else names)
              if n in options.symbols]
    if rip_text is not None:
        options.rip = parse_rip_range(rip_text, wanted)
    hv = boot_scenario(scenario)
    hv.tracer = Tracer(hv, out, limit, options)
    until = scenario.virtual_time_ns
    if options.window[1] is not None:
        until = min(until, options.window[1])
    return hv.run(until)


def scenario_frames(path: str | Path, at: str, domain: str | None) -> dict[str, np.ndarray]:
    """Run the scenario at `path` to virtual time `at` and read one domain's frames."""
    scenario = load_scenario(path)
    at_ns = parse_time(at, "--at")
    hv = boot_scenario(scenario)
    try:
        hv.run(at_ns)
        pv = [d for d in hv.domains if domain is None or d.name == domain]
        if not pv:
            names = ", ".join(d.name for d in hv.domains)
            raise HvlabError(f"{path}: no domain '{domain}' (domains: {names})")
        if domain is None and len(pv) > 1:
            names = ", ".join(d.name for d in hv.domains)
            raise HvlabError(f"{path}: several domains ({names}): choose one with --domain")
        return domain_frames(hv, pv[0])
    finally:
        hv.teardown()
