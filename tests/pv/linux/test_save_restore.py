"""Debian's Linux saved at any time, verified, restored and run to the same end.

Slow (a boot to T, then the rest of the run, the guest's 3.3e9 instructions in
all, per T): `python -m pytest -m slow tests/pv/linux/test_save_restore.py`. The
default suite covers the same code with a tiny CPL-3 guest
(tests/pv/xen/test_save_restore.py).
"""

from __future__ import annotations

import json
import re

import pytest

from hypervisor.cli import main
from tests import ROOT
from tests.pv.xen.test_save_restore import typeref_mismatches

SCENARIO = ROOT / "scenarios" / "linux-pv.toml"
RESTORE_SCENARIO = ('[machine]\npcpus = 1\nmemory = "320M"\n\n[[domain]]\nname = "linux"\n'
                    'image = "linux.img"\n\n[limits]\nvirtual_time = "60s"\n')


def _without_timestamps(console: str) -> str:
    """A kernel restored on other machine frames reads other MFNs (its page tables,
    mfn_to_pfn), so its instruction counts, hence its printk times, drift by
    microseconds after the restore; the text it prints does not."""
    return re.sub(r"^\[ *\d+\.\d+\] ", "", console, flags=re.MULTILINE)


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


def _save(tmp_path, at: str):
    """Boot to `at`, save as `hvlab save` does; the image's typerefs recomputed from the
    image alone must be the live frame table's."""
    from hypervisor.images.domains import save_domain
    from hypervisor.runner import boot_scenario
    from hypervisor.scenario import load_scenario, parse_time

    hv = boot_scenario(load_scenario(SCENARIO))
    hv.run(parse_time(at, "--at"))
    dom = hv.domains[0]
    image = tmp_path / "linux.img"
    save_domain(hv, dom, image)
    assert typeref_mismatches(hv, dom, image) == 0
    assert main(["image", "verify", str(image)]) == 0
    return hv, image


def _check_end(restored: dict, reference: dict, saved_console: str) -> None:
    assert restored["shutdown"]["reason"] == reference["shutdown"]["reason"] == "poweroff"
    assert restored["shutdown"]["code"] == reference["shutdown"]["code"] == 0
    assert reference["console"].startswith(saved_console)  # what it printed up to T
    assert restored["console"].startswith(saved_console)
    assert _without_timestamps(restored["console"]) == _without_timestamps(reference["console"])
    assert "Grant table initialized" in restored["console"]
    assert "hvlab-linux: workload ok" in restored["console"]
    assert restored["typeref_differences"] == []  # the independent check after the run


@pytest.mark.slow
@pytest.mark.parametrize("at", ["1ns", "300ms", "800ms", "1s", "1200ms", "1500ms", "2s", "3s",
                                "3100ms"])
def test_linux_saved_at_t_restores_in_place_and_runs_to_the_same_end(linux_build, reference,
                                                                     capsys, tmp_path, at):
    """1 ns: the first instructions (--at takes no 0). Up to ~1.38 s Linux has not
    published its P2M list (0.3-1.2 s: it is copying MFNs into the list it builds);
    at 1.5 s it is patching alternatives through poking_mm with
    an MFN in a pending multicall batch; 1 s and 3 s straddle its grant-table set-up;
    3.1 s is mid-workload. Restored on the frames it was saved from, it is the saved
    run continued, instruction for instruction: the console is identical, timestamps
    included. (Against the run never paused, the text is: paused at 1 ns, the last
    line's timestamp moves, the restored run's and the continued run's alike.)"""
    saved, image = _save(tmp_path, at)
    capsys.readouterr()
    saved_console = _saved_domain_state(image)["console"]
    (tmp_path / "restore.toml").write_text(RESTORE_SCENARIO)
    assert main(["run", str(tmp_path / "restore.toml"), "--json"]) == 0
    restored = json.loads(capsys.readouterr().out)["domains"][0]
    _check_end(restored, reference, saved_console)
    saved.run(60 * 10**9)  # the saved run, continued
    assert restored["console"] == saved.domains[0].console_text()


@pytest.mark.slow
@pytest.mark.parametrize("at", ["2s", "3100ms"])  # after the P2M list is published
def test_linux_relocated_as_xen_restores_runs_to_the_same_end(linux_build, reference,
                                                             tmp_path, at):
    """On other machine frames, as Xen's restore: the P2M list, page tables, start_info,
    shared_info and the grant frames rewritten or mapped again."""
    from hypervisor.core.hypervisor import Hypervisor, MachineConfig
    from hypervisor.images.domains import restore_domain

    saved, image = _save(tmp_path, at)
    hv = Hypervisor(MachineConfig(1, 320 << 20))
    hv.frames.alloc(1000, "someone else")
    dom = restore_domain(hv, image)
    assert (dom.p2m != saved.domains[0].p2m).all()  # every pfn on another frame
    assert hv.run(60 * 10**9) in ("shutdown", "idle")
    restored = {"shutdown": vars(dom.shutdown), "console": dom.console_text(),
                "typeref_differences": hv.check_typerefs(dom)}
    _check_end(restored, reference, _saved_domain_state(image)["console"])


@pytest.mark.slow
def test_an_early_image_is_refused_where_its_frames_are_taken(linux_build, tmp_path):
    """Saved at 0.8 s (Linux still building its P2M list) it restores only in place."""
    from hypervisor.core.hypervisor import Hypervisor, MachineConfig
    from hypervisor.images.domains import restore_domain
    from hypervisor.lib.errors import RestoreError

    _hv, image = _save(tmp_path, "800ms")
    hv = Hypervisor(MachineConfig(1, 320 << 20))
    hv.frames.alloc(1000, "someone else")
    free = hv.frames.nr_free
    with pytest.raises(RestoreError, match="restores only onto the machine frames it was"):
        restore_domain(hv, image)
    assert hv.frames.nr_free == free and hv.domains == []
