"""Debian's Linux saved mid-run (`hvlab save`), verified, restored and run to the same end.

Slow (a boot to T, then the rest of the run, twice the guest's 3.3e9 instructions
in all): `python -m pytest -m slow tests/pv/linux/test_save_restore.py`. The
default suite covers the same code with a tiny CPL-3 guest
(tests/pv/xen/test_save_restore.py).
"""

from __future__ import annotations

import json

import pytest

from hypervisor.cli import main
from tests import ROOT

SCENARIO = ROOT / "scenarios" / "linux-pv.toml"


def _comparable(value):
    """A run's JSON without wall fields and unicorn's wall-clock-paced `tlb_fills`."""
    if isinstance(value, dict):
        return {k: _comparable(v) for k, v in value.items()
                if "wall" not in k and k != "tlb_fills"}
    if isinstance(value, list):
        return [_comparable(v) for v in value]
    return value


def _json(capsys, args: list[str]) -> dict:
    assert main(args) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
@pytest.mark.parametrize("at", ["1s", "3s"])  # mid-boot; mid-workload (init runs at ~2.98 s)
def test_linux_saved_at_t_restores_and_runs_to_the_same_end(linux_build, capsys, tmp_path, at):
    image = tmp_path / "linux.img"
    _json(capsys, ["save", str(SCENARIO), "--domain", "linux", "--at", at, "-o", str(image),
                   "--json"])
    assert main(["image", "verify", str(image)]) == 0
    capsys.readouterr()
    restored_scenario = tmp_path / "restore.toml"
    restored_scenario.write_text('[machine]\npcpus = 1\nmemory = "320M"\n\n'
                                 '[[domain]]\nname = "linux"\nimage = "linux.img"\n\n'
                                 '[limits]\nvirtual_time = "60s"\n')
    restored = _json(capsys, ["run", str(restored_scenario), "--json"])["domains"][0]
    reference = _json(capsys, ["run", str(SCENARIO), "--json"])["domains"][0]
    assert restored["shutdown"] == reference["shutdown"]
    assert restored["shutdown"]["reason"] == "poweroff" and restored["shutdown"]["code"] == 0
    assert restored["console"] == reference["console"]
    assert restored["typeref_differences"] == []  # the independent check after the restore
    assert _comparable(restored) == _comparable(reference)
