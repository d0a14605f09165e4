"""`hvlab demo`: the tour end to end through the CLI, paced only on a terminal."""

from __future__ import annotations

import io
import subprocess
import sys

from hypervisor.teaching import demo
from tests import ROOT


def test_demo_runs_end_to_end():
    out = subprocess.run([sys.executable, "-m", "hypervisor.cli", "demo", "--fast"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for step in ("== 1. A guest boots ==", "== 2. A page walk ==", "== 3. A hostile guest ==",
                 "== 4. A live update =="):
        assert step in text
    assert "pv_hello: all checks passed" in text
    assert "L1 in frame" in text and "-> frame" in text and ": WRITABLE, count" in text
    assert "attacks refused: 30/30" in text and "0 differences" in text
    assert "strategy lazy: updated" in text and "proof: ok" in text
    assert "proof when lazy finished: ok" in text


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_demo_pauses_only_on_a_terminal_without_fast(monkeypatch):
    pauses: list[float] = []
    monkeypatch.setattr(demo.time, "sleep", pauses.append)
    monkeypatch.setattr(demo, "_live_update", lambda tour: tour.say("(update skipped)"))
    demo.run_demo(fast=False, out=io.StringIO())  # not a terminal: no pauses
    demo.run_demo(fast=True, out=_Terminal())
    assert pauses == []
    demo.run_demo(fast=False, out=_Terminal())
    assert len(pauses) > 8 and 30 < sum(pauses) < 180  # a tour of about two minutes
