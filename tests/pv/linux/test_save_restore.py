"""Debian's Linux saved mid-run (`hvlab save`), verified, restored and run to the same end.

Slow (a boot to T, then the rest of the run, twice the guest's 3.3e9 instructions
in all): `python -m pytest -m slow tests/pv/linux/test_save_restore.py`. The
default suite covers the same code with a tiny CPL-3 guest
(tests/pv/xen/test_save_restore.py).
"""

from __future__ import annotations

import json
import re

import pytest

from hypervisor.cli import main
from tests import ROOT

SCENARIO = ROOT / "scenarios" / "linux-pv.toml"


def _without_timestamps(console: str) -> str:
    """The restored kernel runs on other machine frames, and Linux reads MFNs (its page
    tables, mfn_to_pfn), so its instruction counts, hence its printk times, drift by
    microseconds after the restore; the text it prints does not."""
    return re.sub(r"^\[ *\d+\.\d+\] ", "", console, flags=re.MULTILINE)


def _json(capsys, args: list[str]) -> dict:
    assert main(args) == 0
    return json.loads(capsys.readouterr().out)


def _saved_domain_state(image) -> dict:
    from hypervisor.stream import OpaqueRecord, StreamReader, open_image_for_read
    from hypervisor.stream.hvlab_records import HVLAB_DOMAIN_RECORD

    with open_image_for_read(image) as f:
        for record in StreamReader(f, keep=frozenset({HVLAB_DOMAIN_RECORD})):
            if isinstance(record, OpaqueRecord) and record.type == HVLAB_DOMAIN_RECORD:
                return json.loads(record.body)
    raise AssertionError("no HVLAB_DOMAIN record")


@pytest.fixture(scope="module")
def reference() -> dict:
    """The run without a save, once for every T."""
    from hypervisor.runner import run_scenario
    from hypervisor.scenario import load_scenario

    return run_scenario(load_scenario(SCENARIO))["domains"][0]


@pytest.mark.slow
@pytest.mark.parametrize("at", ["2s", "3100ms"])  # mid-boot; mid-workload (init: ~3.0 s)
def test_linux_saved_at_t_restores_and_runs_to_the_same_end(linux_build, reference, capsys,
                                                            tmp_path, at):
    image = tmp_path / "linux.img"
    _json(capsys, ["save", str(SCENARIO), "--domain", "linux", "--at", at, "-o", str(image),
                   "--json"])
    assert main(["image", "verify", str(image)]) == 0
    capsys.readouterr()
    before = _saved_domain_state(image)
    restored_scenario = tmp_path / "restore.toml"
    restored_scenario.write_text('[machine]\npcpus = 1\nmemory = "320M"\n\n'
                                 '[[domain]]\nname = "linux"\nimage = "linux.img"\n\n'
                                 '[limits]\nvirtual_time = "60s"\n')
    restored = _json(capsys, ["run", str(restored_scenario), "--json"])["domains"][0]
    assert restored["shutdown"]["reason"] == reference["shutdown"]["reason"]
    assert restored["shutdown"]["code"] == reference["shutdown"]["code"] == 0
    saved_console = before["console"]  # what the guest printed up to T, byte for byte
    assert reference["console"].startswith(saved_console)
    assert restored["console"].startswith(saved_console)
    assert _without_timestamps(restored["console"]) == _without_timestamps(reference["console"])
    assert "hvlab-linux: workload ok" in restored["console"]
    assert restored["typeref_differences"] == []  # the independent check after the restore


@pytest.mark.slow
def test_linux_is_refused_while_it_still_builds_its_p2m(linux_build, capsys, tmp_path):
    """Until ~1.38 s Linux copies MFNs into the P2M list it is building (no restore on
    other frames could fix those copies); it publishes the list in shared_info after."""
    image = tmp_path / "early.img"
    assert main(["save", str(SCENARIO), "--domain", "linux", "--at", "1s", "-o",
                 str(image)]) == 2
    err = capsys.readouterr().err
    assert "has not published its P2M list" in err and err.count("\n") == 1
    assert not image.exists()
