"""hypervisor.api: the examples of docs/api.md run as written, and looking changes nothing."""

from __future__ import annotations

import re

import pytest

from hypervisor.api import ApiError, Machine
from hypervisor.runner import run_scenario
from hypervisor.scenario import load_scenario
from tests import ROOT


def _run_python_blocks(doc: str) -> int:
    """Exec a doc's ```python blocks in order, in one namespace; returns how many ran."""
    text = (ROOT / "docs" / doc).read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, f"docs/{doc}", "exec"), namespace)  # noqa: S102 - the doc's code
    return len(blocks)


def test_docs_api_examples_run(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert _run_python_blocks("api.md") >= 5
    assert "hello from a paravirtualised guest" in capsys.readouterr().out


def test_tutorial_python_example_runs(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert _run_python_blocks("tutorial.md") == 1
    assert "'type': 'L3'" in capsys.readouterr().out


def test_looking_at_a_run_changes_nothing():
    """Registers, virtual and physical reads and the frame table at every 2 us: the run's
    result is the one `hvlab run` gives."""
    plain = run_scenario(load_scenario(ROOT / "scenarios" / "pv-hello.toml"))
    m = Machine.boot(ROOT / "scenarios" / "pv-hello.toml")

    def look(m: Machine) -> bool:
        m.registers("hello")
        m.read_virtual("hello", m.registers("hello")["rsp"] - 64, 64)
        m.read_physical("hello", 0x3000, 8)
        m.frame_table("hello")
        return False

    assert m.run(until=look, every_ns=2_000) == "shutdown"
    looked = m.report()
    for key in ("virtual_ns", "instructions", "tlb_fills", "domains"):
        assert looked[key] == plain[key], key
    looked["exits"].pop("budget")  # the steps themselves: a slice that ends is a budget exit
    assert looked["exits"] == plain["exits"]


def test_bad_questions_are_api_errors():
    m = Machine.boot(ROOT / "scenarios" / "pv-hello.toml")
    with pytest.raises(ApiError, match="no domain 'nope'"):
        m.console("nope")
    with pytest.raises(ApiError, match="no vCPU 3"):
        m.registers("hello", 3)
    with pytest.raises(ApiError, match="not mapped"):
        m.read_virtual("hello", 0x1000, 8)
    with pytest.raises(ApiError, match="beyond its"):
        m.read_physical("hello", 1 << 40, 8)
    with pytest.raises(ApiError, match="at least 1"):
        m.step(0)
