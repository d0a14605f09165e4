"""Graded labs: as shipped each scores below full marks and names its failing checks; the
reference solutions (tests/teaching/lab_solutions, applied to a temporary copy) score full marks;
planted mistakes fail the checks meant to catch them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from hypervisor.teaching import labs
from hypervisor.teaching.labs import LABS_ROOT, check_lab
from tests import ROOT

SOLUTIONS = Path(__file__).parent / "lab_solutions"
HAVE_BINUTILS = shutil.which("as") is not None and shutil.which("ld") is not None


def _copy(tmp_path: Path, lab: str, files: dict[str, str]) -> Path:
    """A copy of the shipped lab folder with some files replaced (name -> text)."""
    work = tmp_path / lab
    shutil.copytree(LABS_ROOT / lab, work)
    for name, text in files.items():
        (work / name).write_text(text)
    return work


def _with_solution(tmp_path: Path, lab: str) -> Path:
    work = tmp_path / lab
    shutil.copytree(LABS_ROOT / lab, work)
    for f in (SOLUTIONS / lab).iterdir():
        shutil.copy(f, work / f.name)
    return work


def _failed(result: dict) -> set[str]:
    return {c["name"] for c in result["checks"] if not c["passed"]}


def _detail(result: dict, name: str) -> str:
    return next(c["detail"] for c in result["checks"] if c["name"] == name)


def hvlab(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hypervisor.cli", *args], cwd=ROOT,
                          capture_output=True, text=True)


# ---------------------------------------------------------------- catalogue, CLI
def test_lab_list_names_the_four_labs():
    out = hvlab("lab", "list", "--json")
    assert out.returncode == 0, out.stderr
    names = [lab["name"] for lab in json.loads(out.stdout)["labs"]]
    assert names == ["lapic-timer", "live-update", "typeref-rule", "write-a-guest"]
    text = hvlab("lab", "list").stdout
    assert "typeref rule that keeps page tables read-only" in text


def test_bad_lab_names_and_folders_are_user_errors():
    out = hvlab("lab", "check", "no-such-lab")
    assert out.returncode == 2 and out.stderr.startswith("hvlab: no lab named 'no-such-lab'")
    assert len(out.stderr.splitlines()) == 1
    out = hvlab("lab", "check", "typeref-rule", "--dir", "/nonexistent/folder")
    assert out.returncode == 2 and "no such folder" in out.stderr


def test_lab_check_cli_json_shape_and_text():
    out = hvlab("lab", "check", "typeref-rule", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert set(result) == {"lab", "score", "max", "checks"}
    assert all(set(c) == {"name", "passed", "detail"} for c in result["checks"])
    assert result["score"] == sum(c["passed"] for c in result["checks"])
    text = hvlab("lab", "check", "typeref-rule").stdout
    assert "FAIL  a page table in use is never mapped writable" in text
    assert text.rstrip().endswith(f"score: {result['score']}/{result['max']}")


# ------------------------------------------------------------------ write-a-guest
@pytest.mark.skipif(not HAVE_BINUTILS, reason="GNU as/ld not installed")
def test_write_a_guest_shipped_reference_and_planted(tmp_path):
    shipped = check_lab("write-a-guest")
    assert (shipped["score"], shipped["max"]) == (3, 6)
    assert _failed(shipped) == {'prints "hello, hvlab"', 'prints "sum 1..100 = 5050"',
                                "shuts down with code 42"}
    assert "code 0" in _detail(shipped, "shuts down with code 42")

    full = check_lab("write-a-guest", _with_solution(tmp_path / "ref", "write-a-guest"))
    assert full["score"] == full["max"] == 6, full

    solution = (SOLUTIONS / "write-a-guest" / "guest.s").read_text()
    wrong_code = _copy(tmp_path / "code", "write-a-guest",
                       {"guest.s": solution.replace("mov     edi, 42", "mov     edi, 41")})
    result = check_lab("write-a-guest", wrong_code)
    assert _failed(result) == {"shuts down with code 42"}
    assert "code 41" in _detail(result, "shuts down with code 42")

    off_by_one = _copy(tmp_path / "sum", "write-a-guest",
                       {"guest.s": solution.replace("jbe     1b", "jb      1b")})
    result = check_lab("write-a-guest", off_by_one)
    assert _failed(result) == {'prints "sum 1..100 = 5050"'}
    assert '"sum 1..100 = 4950"' in _detail(result, 'prints "sum 1..100 = 5050"')

    broken = _copy(tmp_path / "asm", "write-a-guest",
                   {"guest.s": solution.replace("inc     ecx", "inc     ecx, ecx, ecx")})
    result = check_lab("write-a-guest", broken)
    assert result["score"] == 1 and "guest.s builds" in _failed(result)
    assert "guest.s" in _detail(result, "guest.s builds")  # the assembler's own message


def test_write_a_guest_without_the_toolchain_still_grades(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no as, no ld
    result = check_lab("write-a-guest")
    assert (result["score"], result["max"]) == (0, 6)
    assert "install GNU binutils" in _detail(result, "toolchain: GNU as and ld")
    assert _detail(result, "guest.s builds") == "not run: no assembler or linker"


# ------------------------------------------------------------------- typeref-rule
RULE_HEAD = "from hypervisor.mm.builds import PageType\nfrom hypervisor.mm.errors import EBUSY\n"


def test_typeref_rule_shipped_and_reference(tmp_path):
    shipped = check_lab("typeref-rule")
    assert (shipped["score"], shipped["max"]) == (1, 7)
    assert "bookkeeping broke" in _detail(shipped,
                                          "pv-hostile: every attack refused with Xen's error code")
    full = check_lab("typeref-rule", _with_solution(tmp_path, "typeref-rule"))
    assert full["score"] == full["max"] == 7, full


@pytest.mark.parametrize(("body", "failing", "says"), [
    # refuses page tables, but with the wrong errno: attacks 1-5 report -EINVAL
    ("    return -22 if typing.get_page_type(mfn, PageType.WRITABLE) else 0\n",
     {"a page table in use is never mapped writable",
      "pv-hostile: every attack refused with Xen's error code"}, "returned -EINVAL"),
    # looks at the type without taking a reference
    ("    ft = typing.frames\n"
     "    busy = ft.type_count(mfn) and ft.page_type(mfn) != PageType.WRITABLE\n"
     "    return -EBUSY if busy else 0\n",
     {"a data page may be mapped writable", "a data page may be mapped writable twice",
      "pv-hostile: every attack refused with Xen's error code",
      "pv-hostile: page types consistent afterwards",
      "pv-hostile: the bystander guest still runs"}, "type NONE, type count 0"),
    # refuses everything: not even the guests' own data can be mapped
    ("    return -EBUSY\n",
     {"a data page may be mapped writable", "a data page may be mapped writable twice",
      "pv-hostile: every attack refused with Xen's error code",
      "pv-hostile: page types consistent afterwards",
      "pv-hostile: the bystander guest still runs"}, "returned -16"),
])
def test_typeref_rule_planted_mistakes(tmp_path, body, failing, says):
    work = _copy(tmp_path, "typeref-rule",
                 {"rule.py": RULE_HEAD + "\n\ndef writable_mapping(typing, mfn):\n" + body})
    result = check_lab("typeref-rule", work)
    assert _failed(result) == failing
    assert any(says in c["detail"] for c in result["checks"] if not c["passed"])


def test_an_endless_loop_fails_its_checks_instead_of_hanging(tmp_path, monkeypatch):
    monkeypatch.setattr(labs, "STUDENT_CALL_CPU_S", 0.2)
    work = _copy(tmp_path, "typeref-rule", {
        "rule.py": "def writable_mapping(typing, mfn):\n    while True:\n        pass\n"})
    result = check_lab("typeref-rule", work)
    assert result["score"] == 1, result  # only "rule.py loads"
    assert "still running after 0.2 s of CPU time" in _detail(
        result, "a data page may be mapped writable")
    assert "(an endless loop?)" in _detail(
        result, "pv-hostile: every attack refused with Xen's error code")
    loading = _copy(tmp_path / "l", "typeref-rule", {"rule.py": "while True:\n    pass\n"})
    result = check_lab("typeref-rule", loading)
    assert result["score"] == 0
    assert "importing rule.py was still running" in _detail(result, "rule.py loads")


def test_typeref_rule_broken_file_names_the_line(tmp_path):
    work = _copy(tmp_path, "typeref-rule", {"rule.py": "def writable_mapping(typing, mfn)\n"})
    result = check_lab("typeref-rule", work)
    assert result["score"] == 0
    assert _detail(result, "rule.py loads").startswith("rule.py line 1: syntax error")
    raising = _copy(tmp_path / "r", "typeref-rule", {
        "rule.py": "def writable_mapping(typing, mfn):\n    return typing.no_such_thing\n"})
    result = check_lab("typeref-rule", raising)
    assert "raised AttributeError" in _detail(result, "a data page may be mapped writable")
    assert "(at rule.py line 2)" in _detail(result, "a data page may be mapped writable")


# -------------------------------------------------------------------- lapic-timer
def test_lapic_timer_shipped_and_reference(tmp_path):
    shipped = check_lab("lapic-timer")
    assert (shipped["score"], shipped["max"]) == (2, 5)
    assert "code 9" in _detail(shipped, "hvm-lapic: every check of the guest passes")
    full = check_lab("lapic-timer", _with_solution(tmp_path, "lapic-timer"))
    assert full["score"] == full["max"] == 5, full


@pytest.mark.parametrize(("body", "failing"), [
    # one expiry per look: hvm-lapic does not notice, the late-look check does
    ("    return 1, periodic\n",
     {"a periodic timer looked at late counts every period that ended"}),
    # off by one: counts the period still running (hvm-lapic's guest is none the wiser:
    # the extra expiries coalesce and are re-injected one per EOI at the same rate)
    ("    return ((elapsed - first_due) // period + 2, True) if periodic else (1, False)\n",
     {"a periodic timer fires on time and runs on",
      "a periodic timer looked at late counts every period that ended"}),
    # no expiry at all: hvlab refuses to let time stand still
    ("    return 0, True\n",
     {"a one-shot timer fires once and stops", "a periodic timer fires on time and runs on",
      "a periodic timer looked at late counts every period that ended",
      "hvm-lapic: every check of the guest passes"}),
])
def test_lapic_timer_planted_mistakes(tmp_path, body, failing):
    work = _copy(tmp_path, "lapic-timer", {
        "timer.py": "def timer_expiries(elapsed, first_due, period, periodic):\n" + body})
    result = check_lab("lapic-timer", work)
    assert _failed(result) == failing


# -------------------------------------------------------------------- live-update
def test_live_update_shipped(tmp_path, monkeypatch):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    shipped = check_lab("live-update")
    assert list(scratch.iterdir()) == []  # the hand-overs of both updates are gone
    assert (shipped["score"], shipped["max"]) == (2, 7)
    assert _failed(shipped) == {
        "a refused root stops the update", "the proof: every typeref rebuilt",
        "the guests run on after the update",
        "measurement.toml: your full walk's modelled downtime",
        "measurement.toml: lazy's modelled downtime"}
    assert "type state 'count' differs" in _detail(shipped, "the proof: every typeref rebuilt")


def test_live_update_reference_full_marks(tmp_path):
    full = check_lab("live-update", _with_solution(tmp_path, "live-update"))
    assert full["score"] == full["max"] == 7, full


def test_live_update_planted_mistakes(tmp_path):
    solution = (SOLUTIONS / "live-update" / "strategy.py").read_text()
    # every root restored, refusals ignored; and a measurement off by 2 us
    ignoring = solution.replace("        if rc != 0:\n            raise", "        if False:\n"
                                "            raise")
    assert ignoring != solution
    measured = (SOLUTIONS / "live-update" / "measurement.toml").read_text()
    work = _copy(tmp_path, "live-update", {
        "strategy.py": ignoring,
        "measurement.toml": measured.replace("lazy_downtime_ns = 4344678",
                                             "lazy_downtime_ns = 4346678")})
    result = check_lab("live-update", work)
    assert _failed(result) == {"a refused root stops the update",
                               "measurement.toml: lazy's modelled downtime"}
