"""The command line can be trusted: bad input is one line and status 2 before any work,
hvlab's own failures have their own status, nothing is left in the temp dir, every
planned update is checked before the run, and update reports are deterministic."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from hypervisor.cli import main
from hypervisor.lib.errors import BAD_INPUT, INTERNAL_FAILURE, RUN_FAILED, HvlabFailure
from hypervisor.liveupdate import driver, resume
from hypervisor.liveupdate.proof import ProofFailed
from hypervisor.liveupdate.strategies import base as strategies
from hypervisor.liveupdate.strategies import full_walk
from tests import SCENARIOS
from tests.results import stable

HELLO = SCENARIOS / "pv-hello.toml"
SMP = SCENARIOS / "pv-smp.toml"
KERNEL = SCENARIOS / "guests" / "pv_hello.elf"


def run(capsys, *args: str) -> tuple[int, str, str]:
    status = main([str(a) for a in args])
    out = capsys.readouterr()
    return status, out.out, out.err


def scenario(tmp_path: Path, machine: str = "", limits: str = 'virtual_time = "1ms"',
             extra: str = "") -> Path:
    path = tmp_path / "s.toml"
    path.write_text(f'[machine]\n{machine}\n[[domain]]\nname = "h"\nkernel = "{KERNEL}"\n'
                    f'memory = "4M"\n[limits]\n{limits}\n{extra}')
    return path


@pytest.fixture
def temp_dir(tmp_path, monkeypatch) -> Path:
    """A fresh, empty temp dir for this process and the processes it starts."""
    folder = tmp_path / "temp"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again
    return folder


def one_line_bad_input(status: int, out: str, err: str, *words: str) -> None:
    assert status == BAD_INPUT and out == "" and err.count("\n") == 1, (status, out, err)
    assert err.startswith("hvlab") and all(w in err for w in words), err


# ---- bad input: one line, status 2, nothing done


@pytest.mark.parametrize("machine, limits, words", [
    ('memory = "0"', 'virtual_time = "1ms"', ("[machine] memory", "more than zero")),
    ('build = "5.0"', 'virtual_time = "1ms"', ("[machine] build", "'5.0'", "4.19")),
    ('quantum = "0ms"', 'virtual_time = "1ms"', ("quantum", "more than zero")),
    ("", "virtual_time = 2", ("virtual_time", "with its unit", "got 2")),
    ("", 'virtual_time = "0s"', ("virtual_time", "more than zero", "'0s'")),
])
def test_bad_scenario_values(tmp_path, capsys, machine, limits, words):
    path = scenario(tmp_path, machine, limits)
    one_line_bad_input(*run(capsys, "run", path), *words)


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "true", "-1", "1e300"])
def test_bad_cost_values_are_refused_before_the_run(tmp_path, capsys, temp_dir, value):
    costs = tmp_path / "costs.json"
    costs.write_text(f'{{"pause_per_vcpu": {value}}}')
    one_line_bad_input(*run(capsys, "update", HELLO, "--at", "10us", "--to", "4.12",
                            "--strategy", "full-walk", "--costs", costs),
                       "pause_per_vcpu")
    assert list(temp_dir.iterdir()) == []


@pytest.mark.parametrize("command", [
    ["save", HELLO, "--domain", "hello", "--at", "10us"],
    ["image", "make", "--pv", "--mem", "32M"],
])
def test_output_into_a_missing_folder(tmp_path, capsys, command):
    target = tmp_path / "missing" / "x.img"
    one_line_bad_input(*run(capsys, *command, "-o", target), "no folder", "missing")
    assert not (tmp_path / "missing").exists()


def test_an_update_after_the_end_of_the_run_is_refused(capsys, temp_dir):
    one_line_bad_input(*run(capsys, "update", HELLO, "--at", "5s", "--to", "4.12",
                            "--strategy", "lazy"), "not inside the run", "2000 ms")


@pytest.mark.parametrize("option", [["trace", HELLO, "--limit", "0"],
                                    ["run", HELLO, "--trace-limit", "-3"],
                                    ["bench", "update", "--repeat", "0"]])
def test_counts_must_be_positive(capsys, option):
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in option])
    err = capsys.readouterr().err
    assert exit_.value.code == BAD_INPUT and err.count("\n") == 1
    assert "expected a positive whole number" in err


def test_image_make_hvm_is_not_offered(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["image", "make", "--hvm", "--mem", "32M", "-o", str(tmp_path / "x.img")])
    assert exit_.value.code == BAD_INPUT and "--hvm" in capsys.readouterr().err


# ---- every planned update is checked before the run starts


def test_a_chain_of_updates_is_checked_before_the_run(tmp_path, capsys, temp_dir,
                                                      monkeypatch):
    """lazy to 4.12, then transfer 4.12 -> 4.4 (no translator), then full-walk: refused
    before booting, naming the second update; no guest ran."""
    booted = []
    monkeypatch.setattr("hypervisor.runner.boot_scenario", lambda *a, **k: booted.append(a))
    text = SMP.read_text().replace('"guests/', f'"{SCENARIOS}/guests/')
    for at, to, strategy in (("2ms", "4.12", "lazy"), ("2010us", "4.4", "transfer"),
                             ("2020us", "4.19", "full-walk")):
        text += f'[[update]]\nat = "{at}"\nto = "{to}"\nstrategy = "{strategy}"\n'
    path = tmp_path / "chain.toml"
    path.write_text(text)
    one_line_bad_input(*run(capsys, "run", path), "update 2 of 3", "4.12 -> 4.4",
                       "no translator from build 4.12 to 4.4")
    assert booted == [] and list(temp_dir.iterdir()) == []


# ---- exit statuses: 1 a failed check, 3 hvlab's own failure, 130/143 signals


def test_an_internal_failure_is_one_line_and_status_3(capsys, temp_dir, monkeypatch):
    """A legal update that hvlab cannot carry out (here a strategy that refuses a valid
    guest, planted) is hvlab's failure, not bad input."""
    def refuse(*args, **kwargs):
        raise strategies.StrategyError("planted: rc -22 on a legal table")

    monkeypatch.setattr(full_walk.FullWalk, "rebuild", refuse)
    monkeypatch.delenv("HVLAB_DEBUG", raising=False)
    status, out, err = run(capsys, "update", SMP, "--at", "2ms", "--to", "4.12",
                           "--strategy", "full-walk")
    assert status == INTERNAL_FAILURE and err.count("\n") == 1
    assert "internal failure" in err and "planted: rc -22" in err and "HVLAB_DEBUG" in err
    assert list(temp_dir.iterdir()) == []


def test_an_unexpected_exception_is_status_3_with_the_traceback_on_request(capsys,
                                                                          monkeypatch):
    def boom(*args, **kwargs):
        raise ZeroDivisionError("planted")

    monkeypatch.setattr("hypervisor.runner.Tracer", boom)
    status, _, err = run(capsys, "run", HELLO, "--trace")
    assert status == INTERNAL_FAILURE and err.count("\n") == 1
    assert "internal failure (ZeroDivisionError): planted" in err
    monkeypatch.setenv("HVLAB_DEBUG", "1")
    status, _, err = run(capsys, "run", HELLO, "--trace")
    assert status == INTERNAL_FAILURE and "Traceback" in err


def test_a_failed_proof_is_status_1(capsys, temp_dir, monkeypatch):
    from hypervisor.liveupdate import orchestrator

    def failing(*args, **kwargs):
        return {"ok": False, "checks": {}, "problems": ["planted: a frame differs"]}

    monkeypatch.setattr(orchestrator, "verify", failing)
    status, _, err = run(capsys, "update", SMP, "--at", "2ms", "--to", "4.12",
                         "--strategy", "full-walk")
    assert status == RUN_FAILED and err.startswith("hvlab: PROOF FAILED")
    assert list(temp_dir.iterdir()) == []
    assert ProofFailed.exit_status == RUN_FAILED and HvlabFailure.exit_status == 3


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_in_the_blackout_leaves_nothing_behind(capsys, temp_dir, monkeypatch,
                                                         signum, status):
    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signum)  # the real signal, handled as the CLI handles it
        raise AssertionError("the signal did not interrupt")

    monkeypatch.setattr(full_walk.FullWalk, "rebuild", interrupted)
    code, _, err = run(capsys, "update", SMP, "--at", "2ms", "--to", "4.12",
                       "--strategy", "full-walk")
    assert code == status and err.count("\n") == 1
    assert list(temp_dir.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is not None  # the CLI put the old one back


# ---- litter: nothing left on any path, unless asked to keep the hand-over


@pytest.mark.parametrize("extra", [[], ["--fail-at", "save"], ["--fail-at", "typerefs"],
                                   ["--corrupt-stream"], ["--corrupt-stream", "precopy"]])
def test_updates_leave_nothing_in_the_temp_dir(capsys, temp_dir, extra):
    status, out, _ = run(capsys, "update", SMP, "--at", "2ms", "--to", "4.12",
                         "--strategy", "lazy", "--json", *extra)
    assert status == 0 and json.loads(out)["domains"][0]["shutdown"]["code"] == 0
    assert list(temp_dir.iterdir()) == []


def test_exec_updates_leave_nothing_in_the_temp_dir(temp_dir):
    for extra in ([], ["--fail-at", "restore"], ["--corrupt-stream", "precopy"]):
        done = subprocess.run([sys.executable, "-m", "hypervisor.cli", "update", str(SMP),
                               "--at", "2ms", "--to", "4.12", "--strategy", "full-walk",
                               "--exec", "--json", *extra],
                              capture_output=True, text=True, timeout=120, check=True)
        assert json.loads(done.stdout)["domains"][0]["shutdown"]["code"] == 0
        assert list(temp_dir.iterdir()) == []


def test_the_exec_memory_file_is_unlinked_from_the_start():
    """Reached through an inherited descriptor: nothing in /dev/shm to leave behind,
    however the run ends (even killed)."""
    path = driver._memory_file()
    try:
        target = os.readlink(path)
        assert target.endswith(" (deleted)") and "hvlab-memory-" in target
        assert not Path(target.removesuffix(" (deleted)")).exists()
        assert os.get_inheritable(int(path.name))
    finally:
        os.close(int(path.name))


def test_a_failed_exec_update_leaves_nothing_behind(capsys, temp_dir, monkeypatch):
    """The new program image (run here in this process instead of by execv) fails after
    the teardown: status 3, and its hand-over is gone."""
    def execv_resume(executable, argv):
        raise SystemExit(resume.main(argv[3:]))

    def refuse(*args, **kwargs):
        raise strategies.StrategyError("planted in the new process")

    monkeypatch.setattr(driver.os, "execv", execv_resume)
    monkeypatch.setattr(full_walk.FullWalk, "rebuild", refuse)
    with pytest.raises(SystemExit) as exit_:
        main(["update", str(SMP), "--at", "2ms", "--to", "4.12", "--strategy", "full-walk",
              "--exec"])
    err = capsys.readouterr().err
    assert exit_.value.code == INTERNAL_FAILURE and "planted in the new process" in err
    assert "in the new process" in err and list(temp_dir.iterdir()) == []


def test_an_exec_that_cannot_start_leaves_nothing_behind(capsys, temp_dir, monkeypatch):
    def execv_fails(executable, argv):
        raise OSError("planted: exec format error")

    monkeypatch.setattr(driver.os, "execv", execv_fails)
    status, _, err = run(capsys, "update", SMP, "--at", "2ms", "--to", "4.12",
                         "--strategy", "full-walk", "--exec")
    assert status == INTERNAL_FAILURE and "planted: exec format error" in err
    assert list(temp_dir.iterdir()) == []


def test_keep_handover_keeps_each_update(tmp_path, capsys, temp_dir):
    keep = tmp_path / "kept"
    status, out, _ = run(capsys, "update", SMP, "--at", "2ms", "--to", "4.12",
                         "--strategy", "prevalidate", "--json", "--keep-handover", keep)
    report = json.loads(out)["updates"][0]
    assert status == 0 and report["handover_dir"] == str(keep / "update-1")
    names = {p.name for p in (keep / "update-1").iterdir()}
    assert {"manifest.json", "dom0.stream", "dom0.precopy"} <= names, names
    assert list(temp_dir.iterdir()) == []
    one_line_bad_input(*run(capsys, "update", SMP, "--at", "2ms", "--to", "4.12",
                            "--strategy", "lazy", "--keep-handover", keep),
                       "not an empty folder")


# ---- a damaged stream sent ahead is found before the point of no return


@pytest.mark.parametrize("mode", [[], ["--exec"]])
def test_a_damaged_stream_sent_ahead_resumes_the_old_build(mode):
    """Damaged on disk after it was read back: without the check before the teardown,
    the new build (with --exec, or a retried restore) reads it after the guests' old
    hypervisor is gone."""
    done = subprocess.run([sys.executable, "-m", "hypervisor.cli", "update", str(SMP),
                           "--at", "2ms", "--to", "4.12", "--strategy", "full-walk",
                           "--corrupt-stream", "precopy", *mode],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].endswith("strategy full-walk: aborted: the old build resumed")
    assert lines[1] == ("  injected: corrupt-stream dom0.precopy -> the old build resumed "
                        "(hand-over stream dom0.precopy: changed on disk since it was sent "
                        "ahead and read back)")
    assert "smp: shut down (poweroff, code 0)" in done.stdout


def test_injected_failures_are_told_in_the_human_report(capsys, temp_dir):
    status, out, _ = run(capsys, "update", SMP, "--at", "2ms", "--to", "4.12",
                         "--strategy", "transfer", "--fail-at", "restore")
    assert status == 0
    assert ("  injected: a failure in phase 'restore' -> past the point of no return: the "
            "phase was done again, the update went on") in out.splitlines()
    status, out, _ = run(capsys, "update", SMP, "--at", "2ms", "--to", "4.12",
                         "--strategy", "transfer", "--corrupt-stream")
    assert "  injected: corrupt-stream dom0.stream -> the old build resumed (hand-over " \
           "stream dom0.stream:" in out


# ---- output that parses, and determinism


def test_image_make_json_is_only_json(tmp_path, capsys):
    status, out, _ = run(capsys, "image", "make", "--mem", "16M", "--layout", "dense",
                         "-o", tmp_path / "x.img", "--json")
    assert status == 0 and json.loads(out)["kind"] == "pv"


def test_image_info_names_the_format_and_its_version_field(capsys):
    status, out, _ = run(capsys, "image", "info",
                         SCENARIOS / "images" / "pv-smp-2ms.img.zst")
    assert status == 0
    assert "Xen migration stream v2 (header version field 3), x86 PV" in out


def test_update_json_is_deterministic_but_for_wall_fields(capsys, temp_dir):
    """README: every field whose name lacks `wall` is identical across runs; no path
    of a temporary hand-over is reported."""
    args = ["update", SMP, "--at", "2ms", "--to", "4.12", "--strategy", "lazy", "--json"]
    first = json.loads(run(capsys, *args)[1])
    second = json.loads(run(capsys, *args)[1])
    assert stable(first) == stable(second)
    assert "handover_dir" not in json.dumps(first) and "phases_wall_s" in first


def test_an_update_after_every_guest_stopped_says_so(capsys, temp_dir):
    """pv-hello powers off at 0.174 ms: an update at 1 ms has nothing to update, and the
    report says it did not start (it used to print nothing about it)."""
    status, out, _ = run(capsys, "update", HELLO, "--at", "1ms", "--to", "4.12",
                         "--strategy", "lazy")
    assert status == 0
    assert out.startswith("live update 4.19 -> 4.12 at 1.000 ms, strategy lazy: not started: "
                          "no domain was running\n")
    assert list(temp_dir.iterdir()) == []
