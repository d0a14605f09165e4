"""Running a machine through one or more live updates, and what it cost the guests.

The caller (hypervisor/runner.py for a scenario) says how to boot the machine, how
to describe the finished run and how the last process prints it; this module runs
to each update's time, updates and carries on.

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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from emulator.memory import HostMemory
from hypervisor.core.hypervisor import Hypervisor
from hypervisor.core.seams import Seams
from hypervisor.lib.errors import HvlabError, HvlabFailure
from hypervisor.liveupdate.orchestrator import (
    Blackout,
    UpdateError,
    UpdatePlan,
    check_updates,
    live_update,
    prepare,
)

# the work before the pause (hand-over sent ahead, prevalidation) starts this long before it
PREPARE_LEAD_NS = 1_000_000
RESUME_FILE = "resume.pickle"


def _memory_file() -> Path:
    """Host memory shared across execs: a file in /dev/shm (RAM), unlinked at once and
    reached through an open descriptor every new program image inherits, so nothing
    is left behind however the run ends (even killed)."""
    shm = Path("/dev/shm")
    folder = shm if shm.is_dir() else Path(tempfile.gettempdir())
    fd, name = tempfile.mkstemp(prefix="hvlab-memory-", dir=folder)
    os.unlink(name)
    os.set_inheritable(fd, True)
    return Path(f"/proc/self/fd/{fd}")


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


class ScheduledUpdate(Protocol):
    """A live update at a virtual time (a scenario's `[[update]]`)."""

    @property
    def at_ns(self) -> int: ...

    @property
    def to(self) -> str: ...

    @property
    def strategy(self) -> str: ...


def check_run(build: str, end_ns: int, updates: Sequence[ScheduledUpdate], plan: UpdatePlan,
              keep_handover: Path | None = None, seams: Seams | None = None) -> None:
    """Every planned update checked before the run starts: each inside the run, each
    build and strategy known, a translator for every transfer along the chain of
    builds, a lab's code not asked to cross an exec, a place to keep the hand-overs."""
    if plan.exec_new_process and seams is not None and seams.plugged:
        raise UpdateError("--exec: a lab's code plugged into this build cannot cross into a "
                          "new process")
    for n, spec in enumerate(sorted(updates, key=lambda u: u.at_ns), 1):
        where = f"update {n} of {len(updates)} (at {_ms(spec.at_ns)}, {build} -> {spec.to}, " \
                f"{spec.strategy})"
        if spec.at_ns >= end_ns:
            raise UpdateError(f"{where}: not inside the run, which stops at "
                              f"{_ms(end_ns)} ([limits] virtual_time)")
        try:
            check_updates(build, [(spec.to, spec.strategy)], plan.fail_at)
        except HvlabError as err:
            raise UpdateError(f"{where}: {err}") from None
        build = spec.to
    if keep_handover is not None:
        if not keep_handover.parent.is_dir():
            raise UpdateError(f"--keep-handover {keep_handover}: no folder "
                              f"{keep_handover.parent}")
        if keep_handover.exists() and (not keep_handover.is_dir()
                                       or any(keep_handover.iterdir())):
            raise UpdateError(f"--keep-handover {keep_handover}: not an empty folder")


def _ms(ns: int) -> str:
    return f"{ns / 1e6:g} ms"


@contextmanager
def hvlab_failure(what: str) -> Iterator[None]:
    """Past the checks, an error is not the user's: the request was legal and hvlab
    could not carry it out (exit status 3, lib/errors.py)."""
    try:
        yield
    except HvlabError as err:
        raise HvlabFailure(f"{what}: {err}") from err


@dataclass
class UpdateRun:
    """One run with its updates: picklable (the callables are module-level functions or
    partials of them), so it survives an exec."""

    updates: list[ScheduledUpdate]
    plan: UpdatePlan
    memory_bytes: int  # host memory
    end_ns: int  # virtual time the run ends at
    boot: Callable[[HostMemory | None], Hypervisor]  # the machine with its domains
    describe: Callable[[Hypervisor, str, float], dict[str, Any]]  # (hv, stop, wall_s)
    emit: Callable[[dict[str, Any]], None] | None = None  # how the last process prints
    memory_file: Path | None = None
    finished: list[tuple[dict[str, Any], int, int]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    pending_rate: float | None = None  # throughput before the update under way
    skipped: list[dict[str, Any]] = field(default_factory=list)  # no domain left to update
    keep_handover: Path | None = None  # keep each update's hand-over in DIR/update-N
    started_updates: int = 0

    def start(self) -> dict[str, Any]:
        memory = None
        if self.plan.exec_new_process:
            self.memory_file = _memory_file()
            memory = HostMemory(self.memory_bytes, self.memory_file)
        try:
            return self.carry_on(self.boot(memory))  # with --exec, a new process goes on from here
        except BaseException:  # the memory file has no name left: close its descriptor
            if self.memory_file is not None:
                os.close(int(self.memory_file.name))
            raise

    def _plan_for(self, spec: ScheduledUpdate) -> UpdatePlan:
        self.started_updates += 1
        workdir = (None if self.keep_handover is None
                   else self.keep_handover / f"update-{self.started_updates}")
        return replace(self.plan, to_build=spec.to, strategy=spec.strategy, workdir=workdir)

    def carry_on(self, hv: Hypervisor) -> dict[str, Any]:
        """Run to each pending update, update, and on to the end."""
        while self.updates:
            spec = self.updates.pop(0)
            this = self._plan_for(spec)
            what = f"update at {_ms(spec.at_ns)} to {spec.to} ({spec.strategy})"
            segment_start, instr_start = hv.now, _instructions(hv)
            hv.run(max(hv.now, spec.at_ns - PREPARE_LEAD_NS))
            prepared = None
            if any(d.alive for d in hv.domains):
                with hvlab_failure(what):
                    prepared = prepare(hv, this)
            try:
                hv.run(spec.at_ns)
            except BaseException:
                if prepared is not None:
                    prepared.discard()
                raise
            if not any(d.alive for d in hv.domains):
                if prepared is not None:
                    prepared.discard()
                self.skipped.append(_not_started(hv, spec))
                continue
            self.pending_rate = _rate(_instructions(hv) - instr_start, hv.now - segment_start)
            handoff = self._exec_into_new_process if this.exec_new_process else None
            with hvlab_failure(what):
                hv, report = live_update(hv, this, prepared, handoff=handoff)
            self.record(hv, report)
        return self._finish(hv)

    def record(self, hv: Hypervisor, report: dict[str, Any]) -> None:
        """An update is done (in this process, or in the one exec'd for it)."""
        report.setdefault("throughput", {})["before"] = self.pending_rate
        if self.plan.exec_new_process and report.get("outcome") == "updated":
            # completed by a new program image (execv): the old one is gone
            report["exec"] = {"new_program_image": True, "process_wall": {
                "pid": os.getpid(), "python_started_s": _process_start_time()}}
        self.finished.append((report, hv.now, _instructions(hv)))

    def _exec_into_new_process(self, blackout: Blackout) -> None:
        path = blackout.workdir / RESUME_FILE
        with path.open("wb") as f:
            pickle.dump((self, blackout), f)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, "-m", "hypervisor.liveupdate.resume",
                                  str(blackout.workdir),
                                  "temporary" if blackout.temporary_workdir else "kept"])

    def _finish(self, hv: Hypervisor) -> dict[str, Any]:
        stop = hv.run(self.end_ns)
        hv.finish_background_work()  # the guests stopped before a lazy sweeper did
        end_ns, end_instr = hv.now, _instructions(hv)
        reports = []
        for report, resumed_ns, resumed_instr in self.finished:
            report["throughput"]["after"] = _rate(end_instr - resumed_instr, end_ns - resumed_ns)
            reports.append(report)
        result = self.describe(hv, stop, time.monotonic() - self.started)
        result["updates"] = reports + self.skipped
        if len(reports) == 1 and not self.skipped:
            result.update({k: v for k, v in reports[0].items() if k not in result})
        return result


def _not_started(hv: Hypervisor, spec: ScheduledUpdate) -> dict[str, Any]:
    """An update whose time came after every domain had stopped: nothing to update."""
    return {"strategy": spec.strategy, "from_build": hv.build, "to_build": spec.to,
            "at_ns": spec.at_ns, "outcome": "not started: no domain was running"}
