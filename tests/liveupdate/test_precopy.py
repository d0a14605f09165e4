"""The hand-over sent ahead of the pause, and the new build staged from it."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hypervisor.liveupdate.handover import (
    HVLAB_FRAMES_RECORD,
    HVLAB_TABLES_RECORD,
    HVLAB_TYPEINFO_RECORD,
    HandoverError,
    _apply_delta,
    changed_domains,
    read_handover,
    read_precopy,
    write_handover,
    write_precopy,
)
from hypervisor.liveupdate.orchestrator import UpdatePlan, live_update, prepare
from hypervisor.pv.save import classify_pages
from hypervisor.runner import boot_scenario
from hypervisor.scenario import load_scenario
from hypervisor.stream import OpaqueRecord, Pfinfo, StreamReader
from tests import SCENARIOS
from tests.image_surgery import edit_first

MS = 1_000_000
MID_ROUND = 500_000  # pv_ptchurn then holds 3 more page tables than 1 ms after boot


def booted(name: str, run_ns: int = MS):
    hv = boot_scenario(load_scenario(SCENARIOS / name))
    hv.run(run_ns)
    return hv


def record_types(path: Path) -> list[int]:
    with path.open("rb") as f:
        return [r.type for r in StreamReader(f, keep=frozenset({HVLAB_FRAMES_RECORD,
                                                                HVLAB_TABLES_RECORD}))
                if isinstance(r, OpaqueRecord)]


@pytest.mark.parametrize("strategy", ["full-walk", "lazy", "prevalidate", "transfer"])
def test_an_unchanged_domain_hands_over_only_its_vcpus_and_state(strategy, tmp_path):
    hv = booted("pv-spin.toml")
    plan = UpdatePlan("4.12", strategy, workdir=tmp_path)
    prepared = prepare(hv, plan)
    assert prepared.report["precopy_entries"] > 0
    hv.run(hv.now + MS)  # pv_spin never changes a page table
    new, report = live_update(hv, plan, prepared)
    c = report["counters"]
    assert report["proof"]["ok"]
    assert (c["domains_precopied"], c["tables_changed_since_precopy"]) == (1, 0)
    assert c["ownership_runs"] == c["late_staging_runs"] == 0
    # what is left: transfer's type state, as runs of equal rows
    assert (c["handover_entries"] > 0) == (strategy == "transfer")
    blackout = record_types(tmp_path / "dom0.stream")
    assert HVLAB_FRAMES_RECORD not in blackout and HVLAB_TABLES_RECORD not in blackout
    assert HVLAB_FRAMES_RECORD in record_types(tmp_path / "dom0.precopy")
    new.finish_background_work()
    assert new.check_typerefs(new.domains[0]) == []


@pytest.mark.parametrize("strategy", ["full-walk", "lazy"])
def test_a_domain_changing_its_page_tables_after_the_precopy_resends_them(strategy, tmp_path):
    hv = booted("pv-ptchurn.toml")
    plan = UpdatePlan("4.12", strategy, workdir=tmp_path)
    prepared = prepare(hv, plan)
    hv.run(hv.now + MID_ROUND)  # pv_ptchurn pins, edits and unpins tables all the time
    assert hv.frame_table.type_log and changed_domains(hv) == {0}
    new, report = live_update(hv, plan, prepared)
    c = report["counters"]
    assert report["proof"]["ok"] and c["tables_changed_since_precopy"] > 0
    assert c["handover_entries"] > 0 and c["ownership_runs"] == 0
    assert HVLAB_TABLES_RECORD in record_types(tmp_path / "dom0.stream")
    assert HVLAB_FRAMES_RECORD not in record_types(tmp_path / "dom0.stream")
    new.run(new.now + 2 * MS)  # the lazy proof runs when the sweeper is done
    new.finish_background_work()
    if strategy == "lazy":
        assert report["proof_after_lazy"]["ok"]
    assert new.check_typerefs(new.domains[0]) == []


def test_the_tables_sent_ahead_and_the_delta_make_the_list_at_the_pause(tmp_path):
    hv = booted("pv-ptchurn.toml")
    names, _ = write_precopy(hv, tmp_path)
    hv.run(hv.now + MID_ROUND)
    counters = write_handover(hv, tmp_path, with_type_state=False, precopied=names)
    (ho,) = read_handover(tmp_path)
    types = classify_pages(hv, hv.domains[0]).types
    pfns = np.flatnonzero(types != Pfinfo.NOTAB)
    expected = pfns.astype(np.uint64) | (types[pfns].astype(np.uint64) << np.uint64(60))
    assert np.array_equal(ho.tables, expected)
    # the delta names only frames whose type state changed, far fewer than the domain's
    assert 0 < ho.tables_changed <= counters["handover_entries"] < hv.domains[0].nr_pages


def test_a_delta_adds_removes_and_retypes_page_tables():
    def words(table: dict[int, int]) -> np.ndarray:
        return np.array([pfn | (kind << 60) for pfn, kind in table.items()], dtype=np.uint64)

    sent = words({1: Pfinfo.L1TAB, 5: Pfinfo.L2TAB, 9: Pfinfo.L4TAB_PIN})
    delta = words({1: Pfinfo.L1TAB, 5: Pfinfo.NOTAB, 7: Pfinfo.L1TAB, 9: Pfinfo.L4TAB,
                   11: Pfinfo.NOTAB})
    merged, changed = _apply_delta(sent, delta)
    assert merged.tolist() == words({1: Pfinfo.L1TAB, 7: Pfinfo.L1TAB,
                                     9: Pfinfo.L4TAB}).tolist()
    assert changed == 3  # 5 gone, 7 new, 9 unpinned; 1 (a count change) and 11 are not


KINDS = st.sampled_from([Pfinfo.NOTAB, Pfinfo.L1TAB, Pfinfo.L2TAB, Pfinfo.L4TAB_PIN])


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.integers(0, 63), KINDS.filter(lambda k: k != Pfinfo.NOTAB)),
       st.dictionaries(st.integers(0, 63), KINDS))
def test_a_delta_is_a_dictionary_update(sent: dict[int, int], delta: dict[int, int]):
    def words(table: dict[int, int]) -> np.ndarray:
        return np.array([p | (k << 60) for p, k in sorted(table.items())], dtype=np.uint64)

    expected = {p: k for p, k in (sent | delta).items() if k != Pfinfo.NOTAB}
    merged, changed = _apply_delta(words(sent), words(delta))
    assert merged.tolist() == words(expected).tolist()
    differing = {p for p in sent.keys() | expected.keys() if sent.get(p) != expected.get(p)}
    assert changed == len(differing)


def test_lazy_staged_ahead_does_the_same_blackout_work_as_lazy_from_scratch(tmp_path):
    """Setting the sweep up before the pause moves work out of the blackout, but the
    roots and RIP/RSP paths validated in it are the same."""
    reports = []
    for ahead in (True, False):
        hv = booted("pv-smp.toml")
        plan = UpdatePlan("4.12", "lazy", workdir=tmp_path / str(ahead))
        new, report = live_update(hv, plan, prepare(hv, plan) if ahead else None)
        reports.append({k: v for k, v in report["counters"].items() if k.startswith("blackout_")})
        new.finish_background_work()
        assert report["proof_after_lazy"]["ok"]
    assert reports[0] == reports[1] and reports[0]["blackout_pages_validated"] > 0


def test_a_damaged_stream_sent_ahead_is_one_clear_error(tmp_path):
    hv = booted("pv-spin.toml")
    names, _ = write_precopy(hv, tmp_path)
    path = tmp_path / names[0]
    data = bytearray(path.read_bytes())
    data[40:48] = b"\xff" * 8  # the first record's header
    path.write_bytes(bytes(data))
    with pytest.raises(HandoverError, match=r"dom0\.precopy"):
        read_precopy(tmp_path, names[0])


def test_type_state_that_does_not_cover_the_domain_is_refused_before_the_pause(tmp_path):
    """transfer's type state travels as runs of equal rows; runs that leave a gap
    are refused when the stream is read back, and the old build carries on."""
    hv = booted("pv-spin.toml")
    write_handover(hv, tmp_path, with_type_state=True)
    assert read_handover(tmp_path)[0].type_runs is not None
    path = tmp_path / "dom0.stream"

    def shorten_first_run(body: bytearray) -> bytes:
        count = struct.unpack_from("<Q", body, 8 + 8)[0]  # row 0: pfn, count, ...
        struct.pack_into("<Q", body, 8 + 8, count - 1)
        return bytes(body)

    path.write_bytes(edit_first(path.read_bytes(), HVLAB_TYPEINFO_RECORD, shorten_first_run))
    with pytest.raises(HandoverError, match="dom0.stream.*do not cover the domain"):
        read_handover(tmp_path)
