"""Checks of lab lapic-timer: the expiry rule alone, then hvm-lapic with it."""

from __future__ import annotations

from hypervisor.core.seams import Seams
from hypervisor.runner import run_scenario
from hypervisor.scenario import load_scenario
from hypervisor.teaching.labs import SCENARIOS, Lab, StudentCodeError

PERIOD = 1000
# (check, [(elapsed, first_due, period, periodic) -> (expiries, running), ...])
CASES = [
    ("a one-shot timer fires once and stops",
     [((1000, 1000, PERIOD, False), (1, False)), ((5500, 1000, PERIOD, False), (1, False))]),
    ("a periodic timer fires on time and runs on",
     [((1000, 1000, PERIOD, True), (1, True)), ((2999, 2000, PERIOD, True), (1, True))]),
    ("a periodic timer looked at late counts every period that ended",
     [((4500, 1000, PERIOD, True), (4, True)), ((3000, 1000, PERIOD, True), (3, True)),
      ((10_999, 3000, 2000, True), (4, True))]),
]
RUN_CHECK = "hvm-lapic: every check of the guest passes"


def grade(lab: Lab) -> None:
    try:
        (rule,) = lab.load("timer.py", "timer_expiries")
    except StudentCodeError as err:
        lab.check("timer.py loads", False, str(err))
        lab.not_run([name for name, _ in CASES] + [RUN_CHECK], "timer.py does not load")
        return
    lab.check("timer.py loads", True, "timer_expiries() found")
    for name, cases in CASES:
        lab.check(name, *_cases(lab, rule, cases))
    _hvm_lapic(lab, rule)


def _cases(lab: Lab, rule, cases) -> tuple[bool, str]:
    for args, want in cases:
        elapsed, first_due, period, periodic = args
        call = (f"timer_expiries(elapsed={elapsed}, first_due={first_due}, period={period}, "
                f"periodic={periodic})")
        try:
            with lab.student_code(call):
                got = rule(*args)
        except StudentCodeError as err:
            return False, str(err)
        if not isinstance(got, tuple | list) or tuple(got) != want:
            return False, f"{call} returned {got!r}, expected {want!r}"
    return True, f"{len(cases)} cases right"


def _hvm_lapic(lab: Lab, rule) -> None:
    try:
        result = run_scenario(load_scenario(SCENARIOS / "hvm-lapic.toml"),
                              seams=Seams(lapic_timer=rule))
    except Exception as err:  # noqa: BLE001 - the student's rule raised inside hvlab
        lab.check(RUN_CHECK, False, f"the run stopped: {type(err).__name__}: {err}")
        return
    dom = result["domains"][0]
    lines = [line.split(": ", 1)[-1] for line in dom["console"].splitlines()]
    failed = [line for line in lines if "FAILED" in line]
    sd = dom["shutdown"]
    ok = sd is not None and sd["reason"] == "poweroff" and sd["code"] == 0
    if ok:
        detail = "all checks passed"
    elif sd is None:
        detail = (f"the guest never finished ({result['stop']} after "
                  f"{result['virtual_ns'] / 1e6:.1f} ms): a vCPU waiting in hlt for a timer "
                  "interrupt that never came?")
    else:
        detail = (f"the guest ended with code {sd['code']} (its first failed check): "
                  + " | ".join(failed[:3]))
    lab.check(RUN_CHECK, ok, detail)
