"""Graded labs: `hvlab lab list` and `hvlab lab check NAME`.

A lab is a folder `scenarios/labs/<name>/` holding a README.md (the story,
what to read, what to change, how it is graded), the files a student edits
and `checks.py`, whose `grade(lab)` runs the checks through the `Lab` given
here. A student's Python file is loaded by `Lab.load` and reaches hvlab only
through a `Seams` (hypervisor/core/seams.py) passed to the runs the checks make:
students never edit hvlab's sources, and a grader sees exactly what ran.

Each check is worth one point; a failing check says what went wrong in the
student's terms. A check that could not run because an earlier one failed
fails too and says why. Every call into the student's code (its import too)
has a CPU-time limit, so an endless loop fails its check instead of hanging
the grader. `--dir` grades a copy of a lab folder (the tests grade
reference solutions and planted mistakes that way); the scenarios and
hvlab's own files always come from the shipped lab.
"""

from __future__ import annotations

import functools
import importlib.util
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from hypervisor.lib.errors import HvlabError

LABS_ROOT = Path(__file__).resolve().parents[2] / "scenarios" / "labs"
SCENARIOS = LABS_ROOT.parent
# CPU seconds one call into a student's code may take: hvlab's own rules take microseconds,
# so only an endless (or hopelessly slow) loop reaches it.
STUDENT_CALL_CPU_S = 10.0


class LabError(HvlabError):
    """A lab that does not exist, or a --dir that is not a copy of it (exit status 2)."""


class StudentCodeError(Exception):
    """The student's code could not be loaded or used; the message is for the student."""


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


@dataclass
class Lab:
    """One grading of one lab: where the student's files are, and the checks so far."""

    name: str
    home: Path  # the shipped lab folder: scenarios, hvlab's own files
    work: Path  # the folder graded: the student's files
    checks: list[Check] = field(default_factory=list)

    def check(self, name: str, passed: bool, detail: str) -> bool:
        self.checks.append(Check(name, bool(passed), detail))
        return bool(passed)

    def not_run(self, names: list[str], why: str) -> None:
        """Checks that depend on one that failed: failed, saying why."""
        for name in names:
            self.check(name, False, f"not run: {why}")

    def load(self, filename: str, *functions: str) -> list[Callable[..., Any]]:
        """The named functions of the student's Python file, or StudentCodeError."""
        module = load_student_module(self.work / filename)
        found = []
        for name in functions:
            fn = getattr(module, name, None)
            if not callable(fn):
                raise StudentCodeError(f"{filename} defines no function {name}()")
            found.append(_time_limited(fn, f"{name}()"))
        return found

    @contextmanager
    def student_code(self, what: str) -> Iterator[None]:
        """Run code that calls the student's: an exception becomes StudentCodeError
        naming where in the student's file it came from."""
        try:
            yield
        except StudentCodeError:
            raise
        except Exception as err:  # noqa: BLE001 - whatever the student's code raised
            raise StudentCodeError(f"{what} raised {type(err).__name__}: {err}"
                                   f"{_student_frame(err, self.work)}") from err

    def result(self) -> dict[str, Any]:
        score = sum(c.passed for c in self.checks)
        return {"lab": self.name, "score": score, "max": len(self.checks),
                "checks": [asdict(c) for c in self.checks]}


def _student_frame(err: BaseException, work: Path) -> str:
    """' (at rule.py line 12)' for the innermost frame in the student's folder."""
    where = ""
    for frame in traceback.extract_tb(err.__traceback__):
        path = Path(frame.filename)
        if path.parent.resolve() == work.resolve():
            where = f" (at {path.name} line {frame.lineno})"
    return where


@contextmanager
def cpu_time_limit(what: str) -> Iterator[None]:
    """StudentCodeError if the block runs longer than STUDENT_CALL_CPU_S of CPU time.

    SIGPROF counts this process's CPU time, so a loaded machine does not fail a
    correct solution. Signals reach only the main thread: elsewhere (a grader
    run from a worker thread) the block runs without a limit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    seconds = STUDENT_CALL_CPU_S

    def expired(_signum: int, _frame: object) -> None:
        raise StudentCodeError(f"{what} was still running after {seconds:g} s of CPU time "
                               "(an endless loop?)")

    previous = signal.signal(signal.SIGPROF, expired)
    signal.setitimer(signal.ITIMER_PROF, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)


def _time_limited(fn: Callable[..., Any], what: str) -> Callable[..., Any]:
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        with cpu_time_limit(what):
            return fn(*args, **kwargs)
    return call


def load_student_module(path: Path) -> ModuleType:
    if not path.is_file():
        raise StudentCodeError(f"{path.name} is missing from {path.parent}")
    name = f"hvlab_lab_{path.parent.name.replace('-', '_')}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    try:
        with cpu_time_limit(f"importing {path.name}"):
            spec.loader.exec_module(module)
    except SyntaxError as err:
        raise StudentCodeError(f"{path.name} line {err.lineno}: syntax error: {err.msg}") from None
    except Exception as err:  # noqa: BLE001 - anything the student's module does on import
        raise StudentCodeError(f"{path.name} failed to load: {type(err).__name__}: {err}"
                               f"{_student_frame(err, path.parent)}") from None
    finally:
        sys.modules.pop(name, None)
    return module


# ------------------------------------------------------------------ catalogue
def lab_names() -> list[str]:
    return sorted(p.name for p in LABS_ROOT.iterdir()
                  if (p / "checks.py").is_file() and (p / "README.md").is_file())


def lab_title(name: str) -> str:
    """The README's first heading, without 'Lab:'."""
    first = (LABS_ROOT / name / "README.md").read_text().splitlines()[0]
    return first.lstrip("# ").removeprefix("Lab: ").strip()


def list_labs() -> list[dict[str, str]]:
    return [{"name": n, "title": lab_title(n), "path": str(LABS_ROOT / n)} for n in lab_names()]


def _home(name: str) -> Path:
    if name not in lab_names():
        raise LabError(f"no lab named '{name}' (labs: {', '.join(lab_names())})")
    return LABS_ROOT / name


def check_lab(name: str, work: Path | None = None) -> dict[str, Any]:
    """Grade lab `name` on the files in `work` (default: the lab's own folder)."""
    home = _home(name)
    work = home if work is None else Path(work)
    if not work.is_dir():
        raise LabError(f"--dir {work}: no such folder")
    grader = load_student_module(home / "checks.py")  # hvlab's own: errors are internal
    lab = Lab(name, home, work)
    grader.grade(lab)
    return lab.result()


def print_check(result: dict[str, Any]) -> None:
    out = sys.stdout
    out.write(f"lab {result['lab']}\n")
    for c in result["checks"]:
        mark = "PASS" if c["passed"] else "FAIL"
        out.write(f"  {mark}  {c['name']}: {c['detail']}\n")
    out.write(f"score: {result['score']}/{result['max']}\n")


def print_list(labs: list[dict[str, str]]) -> None:
    width = max((len(lab["name"]) for lab in labs), default=0)
    for lab in labs:
        sys.stdout.write(f"{lab['name']:<{width}}  {lab['title']}\n")
