"""Running a scenario and describing the outcome (as data, then as text or JSON)."""

from __future__ import annotations

import sys
import time
from collections import Counter
from typing import Any, TextIO

import unicorn

from emulator.memory import HostMemory
from hypervisor.core.domain import Domain
from hypervisor.core.hypervisor import Hypervisor, MachineConfig
from hypervisor.pv.linux.domain import create_linux_domain, uses_xen_abi
from hypervisor.scenario import Scenario, ScenarioError
from hypervisor.seams import Seams
from hypervisor.teaching.gdb import GdbKilled, GdbSession
from hypervisor.tracing import Tracer


def boot_scenario(scenario: Scenario, build: str | None = None,
                  memory: HostMemory | None = None, seams: Seams | None = None) -> Hypervisor:
    """The scenario's machine with its domains, on `build` (default: the scenario's);
    `seams`: a lab's code in place of hvlab's own (hypervisor/seams.py)."""
    hv = Hypervisor(MachineConfig(scenario.pcpus, scenario.memory, scenario.quantum_ns),
                    build or scenario.build, memory, seams=seams)
    for spec in scenario.domains:
        if spec.image is not None:
            from hypervisor.pv.restore import restore_domain

            dom = restore_domain(hv, spec.image, name=spec.name)
            if spec.type not in ("image", dom.kind):
                raise ScenarioError(f"{scenario.path} domain '{spec.name}': type is "
                                    f"{spec.type!r} but {spec.image.name} holds a {dom.kind} "
                                    "domain")
        elif spec.type == "hvm":
            hv.create_hvm_domain(spec.name, str(spec.kernel), spec.memory, spec.vcpus,
                                 pod=spec.pod, sources=spec.sources)
        elif spec.kernel is not None and uses_xen_abi(spec.kernel):  # Linux: Xen's ABI
            create_linux_domain(hv, spec.name, spec.kernel, spec.memory, spec.vcpus,
                                spec.cmdline, spec.busybox)
        elif spec.cmdline or spec.busybox:
            raise ScenarioError(f"{scenario.path} domain '{spec.name}': 'cmdline' and "
                                "'busybox' are for kernels on Xen's PV ABI (Linux)")
        else:
            hv.create_pv_domain(spec.name, str(spec.kernel), spec.memory, spec.vcpus)
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
        if any(v.xen is not None for v in d.vcpus):  # Xen's ABI at CPL 3 (Linux)
            entry["xen_pv"] = describe_xen_pv(d)
        if d.hvm is not None:  # EPT/PoD figures; per vCPU timer ticks, IPIs, sources
            entry["hvm"] = hv.hvm.describe_domain(d)
            for row, v in zip(entry["vcpus"], d.vcpus, strict=True):
                row.update(hv.hvm.describe_vcpu(v))
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


def describe_xen_pv(d: Domain) -> dict[str, Any]:
    """The kernel file, and what Xen's CPL-3 ABI did for the domain (summed over vCPUs)."""
    hypercalls: Counter[str] = Counter()
    totals: Counter[str] = Counter()
    for v in d.vcpus:
        assert v.xen is not None
        hypercalls.update(v.xen.hypercalls)
        totals.update(privops=v.xen.privops, forced_cpuids=v.xen.forced_cpuids,
                      ptwr=v.xen.ptwr, bounces=v.xen.bounces)
    return {"kernel": d.kernel_file, "hypercalls": dict(sorted(hypercalls.items())),
            **{k: totals[k] for k in ("privops", "forced_cpuids", "ptwr", "bounces")}}


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
