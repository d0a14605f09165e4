"""Running a scenario through one or more live updates, and what it cost the guests.

With `exec_new_process`, host memory is a shared file mapping and every
update replaces the process: the old one tears its hypervisor down, writes
the hand-over and execs `python -m hypervisor.liveupdate.resume`, which maps
the same file, completes the update and carries the run on. Nothing crosses
but the memory file, the hand-over directory and this run's own bookkeeping.
"""

from __future__ import annotations

import os
import pickle
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from emulator.memory import HostMemory
from hypervisor.core.hypervisor import Hypervisor
from hypervisor.liveupdate.orchestrator import (
    Blackout,
    UpdatePlan,
    live_update,
    prepare,
)
from hypervisor.runner import boot_scenario, describe
from hypervisor.scenario import Scenario, UpdateSpec
from hypervisor.seams import Seams

# the work before the pause (hand-over sent ahead, prevalidation) starts this long before it
PREPARE_LEAD_NS = 1_000_000
RESUME_FILE = "resume.pickle"


def _process_start_time() -> float:
    """When this process image began (seconds since boot), to show an exec happened."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return -1.0


def _instructions(hv: Hypervisor) -> int:
    return sum(v.instructions for d in hv.domains for v in d.vcpus)


def _rate(instructions: int, ns: int) -> float | None:
    return round(instructions / (ns / 1e6), 1) if ns > 0 else None


@dataclass
class UpdateRun:
    """One scenario run with its updates: picklable, so it survives an exec."""

    scenario: Scenario
    updates: list[UpdateSpec]
    plan: UpdatePlan
    memory_file: Path | None = None
    finished: list[tuple[dict[str, Any], int, int]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    output: str = "none"  # how the last process prints the result: "json", "text", "none"
    pending_rate: float | None = None  # throughput before the update under way
    seams: Seams | None = None  # a lab's code in place of hvlab's (hypervisor/seams.py)

    def start(self) -> dict[str, Any]:
        memory = None
        if self.plan.exec_new_process:
            shm = Path("/dev/shm")
            folder = shm if shm.is_dir() else Path(tempfile.gettempdir())
            fd, name = tempfile.mkstemp(prefix="hvlab-memory-", dir=folder)
            os.close(fd)
            self.memory_file = Path(name)
            memory = HostMemory(self.scenario.memory, self.memory_file)
        try:
            hv = boot_scenario(self.scenario, memory=memory, seams=self.seams)
            return self.carry_on(hv)  # with --exec, a new process goes on from here
        except BaseException:  # a refused plan or a failure: the memory file goes too
            if self.memory_file is not None:
                self.memory_file.unlink(missing_ok=True)
            raise

    def carry_on(self, hv: Hypervisor) -> dict[str, Any]:
        """Run to each pending update, update, and on to the end."""
        while self.updates:
            spec = self.updates.pop(0)
            this = replace(self.plan, to_build=spec.to, strategy=spec.strategy)
            segment_start, instr_start = hv.now, _instructions(hv)
            hv.run(max(hv.now, spec.at_ns - PREPARE_LEAD_NS))
            prepared = prepare(hv, this) if any(d.alive for d in hv.domains) else None
            hv.run(spec.at_ns)
            if not any(d.alive for d in hv.domains):
                break
            self.pending_rate = _rate(_instructions(hv) - instr_start, hv.now - segment_start)
            handoff = self._exec_into_new_process if this.exec_new_process else None
            hv, report = live_update(hv, this, prepared, handoff=handoff)
            self.record(hv, report)
        return self._finish(hv)

    def record(self, hv: Hypervisor, report: dict[str, Any]) -> None:
        """An update is done (in this process, or in the one exec'd for it)."""
        report.setdefault("throughput", {})["before"] = self.pending_rate
        if self.plan.exec_new_process and report.get("outcome") == "updated":
            # completed by a new program image (execv): the old one is gone
            report["exec"] = {"pid": os.getpid(), "python_started": _process_start_time()}
        self.finished.append((report, hv.now, _instructions(hv)))

    def _exec_into_new_process(self, blackout: Blackout) -> None:
        path = blackout.workdir / RESUME_FILE
        with path.open("wb") as f:
            pickle.dump((self, blackout), f)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, "-m", "hypervisor.liveupdate.resume",
                                  str(blackout.workdir)])

    def _finish(self, hv: Hypervisor) -> dict[str, Any]:
        stop = hv.run(self.scenario.virtual_time_ns)
        if hv.lazy_update is not None:
            hv.lazy_update.finish_now()  # the guests stopped before the sweeper did
        end_ns, end_instr = hv.now, _instructions(hv)
        reports = []
        for report, resumed_ns, resumed_instr in self.finished:
            report["throughput"]["after"] = _rate(end_instr - resumed_instr, end_ns - resumed_ns)
            reports.append(report)
        result = describe(hv, self.scenario, stop, time.monotonic() - self.started)
        result["updates"] = reports
        if len(reports) == 1:
            result.update({k: v for k, v in reports[0].items() if k not in result})
        if self.memory_file is not None:
            self.memory_file.unlink(missing_ok=True)
        return result


def run_with_updates(scenario: Scenario, updates: list[UpdateSpec], plan: UpdatePlan,
                     output: str = "none", seams: Seams | None = None) -> dict[str, Any]:
    """Boot, run to each update's time, update, run to the end; one report per update.

    `output` matters with `plan.exec_new_process`: the last process prints.
    """
    run = UpdateRun(scenario, sorted(updates, key=lambda u: u.at_ns), plan, output=output,
                    seams=seams)
    return run.start()
