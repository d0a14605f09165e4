"""Checks of lab live-update: the student's full walk through a proven update, and the
measurement of it against lazy."""

from __future__ import annotations

import tempfile
import tomllib
from dataclasses import replace
from pathlib import Path

import numpy as np

from hypervisor.core.seams import Seams
from hypervisor.liveupdate.orchestrator import UpdatePlan
from hypervisor.liveupdate.proof import ProofFailed
from hypervisor.mm.builds import PageType, get_build
from hypervisor.mm.frametable import FrameTable
from hypervisor.mm.typerefs import PageTyping, Root
from hypervisor.runner import run_with_updates
from hypervisor.scenario import load_scenario
from hypervisor.teaching.labs import Lab, StudentCodeError

UPDATE_CHECKS = ["the update completes with your walk", "the proof: every typeref rebuilt",
                 "the guests run on after the update"]
MEASURE = {"full_walk_downtime_ns": "measurement.toml: your full walk's modelled downtime",
           "lazy_downtime_ns": "measurement.toml: lazy's modelled downtime"}
TOLERANCE_NS = 1000  # the text report's precision: 0.001 ms
FOREIGN = 7  # a frame of another domain, in the refused-root check


def grade(lab: Lab) -> None:
    try:
        (walk,) = lab.load("strategy.py", "full_walk_domain")
    except StudentCodeError as err:
        lab.check("strategy.py loads", False, str(err))
        lab.not_run(["a refused root stops the update", *UPDATE_CHECKS, *MEASURE.values()],
                    "strategy.py does not load")
        return
    lab.check("strategy.py loads", True, "full_walk_domain() found")
    _refused_root(lab, walk)
    measured = {"full_walk_downtime_ns": _update(lab, walk),
                "lazy_downtime_ns": _run(lab, "lazy", None)["modelled_downtime_ns"]}
    _measurement(lab, measured)


def _refused_root(lab: Lab, walk) -> None:
    """A pin of a frame the domain does not own must not pass silently."""
    frames = FrameTable(16, get_build("4.12"))
    frames.assign(np.arange(1, 8, dtype=np.uint64), 0)
    frames.assign(np.arange(8, 16, dtype=np.uint64), 1)
    typing = PageTyping(frames, np.zeros(16 * 512, dtype=np.uint64))
    roots = [Root(FOREIGN + 2, 1, True)]  # domain 1's own frame: this one is fine
    roots.append(Root(FOREIGN, 1, True))  # domain 0's: refused with -EINVAL
    try:
        walk(typing, 1, roots)
    except Exception as err:  # noqa: BLE001 - any exception stops the update
        ok = frames.page_type(FOREIGN) == PageType.NONE
        lab.check("a refused root stops the update", ok,
                  f"raised {type(err).__name__}: {err}" if ok else
                  f"raised, but frame {FOREIGN} (not the domain's) got a type")
        return
    lab.check("a refused root stops the update", False,
              f"a pin of frame {FOREIGN}, which belongs to another domain, is refused "
              "(-EINVAL) but your walk returned normally: an update that lost a root "
              "must fail loudly (raise an exception)")


def _run(lab: Lab, strategy: str, seams: Seams | None) -> dict:
    scenario = load_scenario(lab.home / "lab.toml")
    updates = [replace(u, strategy=strategy) for u in scenario.updates]
    with tempfile.TemporaryDirectory(prefix="hvlab-lab-handover-") as handover:
        plan = UpdatePlan(updates[0].to, strategy, workdir=Path(handover))
        return run_with_updates(scenario, updates, plan, seams=seams)


def _update(lab: Lab, walk) -> int | None:
    """The update with the student's walk; its modelled downtime if it was proven."""
    try:
        result = _run(lab, "full-walk", Seams(full_walk_domain=walk))
    except ProofFailed as err:
        lab.check(UPDATE_CHECKS[0], True, "the walk returned")
        lab.check(UPDATE_CHECKS[1], False, f"the new build's page types differ from the old "
                  f"build's: {str(err).removeprefix('live update proof failed: ')}")
        lab.not_run(UPDATE_CHECKS[2:], "the proof failed")
        return None
    except Exception as err:  # noqa: BLE001 - the student's walk raised inside the update
        lab.check(UPDATE_CHECKS[0], False, f"the typeref phase stopped: "
                  f"{type(err).__name__}: {err}")
        lab.not_run(UPDATE_CHECKS[1:], "the update did not complete")
        return None
    lab.check(UPDATE_CHECKS[0], result["outcome"] == "updated", f"outcome {result['outcome']}")
    downtime = result["modelled_downtime_ns"]
    lab.check(UPDATE_CHECKS[1], result["proof"]["ok"],
              f"proven; your walk's modelled downtime: {downtime} ns")
    churn = result["domains"][0]
    sd = churn["shutdown"]
    ok = sd is not None and sd["reason"] == "poweroff" and sd["code"] == 0
    lab.check(UPDATE_CHECKS[2], ok, "pv_ptchurn finished all its rounds" if ok else
              f"pv_ptchurn ended {sd}: {churn['crash_report'] or churn['console'][-200:]}")
    return int(downtime) if ok else None


def _measurement(lab: Lab, measured: dict[str, int | None]) -> None:
    try:
        answers = tomllib.loads((lab.work / "measurement.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        for name in MEASURE.values():
            lab.check(name, False, f"measurement.toml cannot be read: {err}")
        return
    for key, name in MEASURE.items():
        got, want = answers.get(key), measured[key]
        if want is None:
            lab.check(name, False, "not run: your full walk has no proven update to measure")
        elif isinstance(got, int | float) and abs(got - want) <= TOLERANCE_NS:
            lab.check(name, True, f"{got} ns (measured {want} ns)")
        else:
            where = ("the proof check's detail" if key.startswith("full")
                     else "`hvlab update scenarios/labs/live-update/lab.toml --strategy lazy`")
            lab.check(name, False, f"{key} = {got!r} is not the figure measured, to the "
                      f"microsecond (read it from {where})")
