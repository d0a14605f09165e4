"""Saving and restoring PV domains: exact round trips, and bad images refused cleanly."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hypervisor.cli import main
from hypervisor.core.hypervisor import Hypervisor, MachineConfig
from hypervisor.images.domains import restore_domain, save_domain
from hypervisor.lib.errors import RestoreError
from hypervisor.pv.save import domain_digest
from hypervisor.runner import boot_scenario
from hypervisor.scenario import load_scenario
from hypervisor.stream.hvlab_records import HVLAB_DOMAIN_RECORD
from tests import SCENARIOS
from tests.image_surgery import assert_refused_cleanly, rebuild, records, records_at


def finish(hv: Hypervisor, scenario):
    hv.run(scenario.virtual_time_ns)
    return [(d.console_text(), d.shutdown.reason, d.shutdown.code, d.shutdown.virtual_ns,
             domain_digest(hv, d)) for d in hv.domains]


@pytest.mark.parametrize("name, at_ns", [("pv-hello.toml", 100_000),
                                          ("pv-smp.toml", 2_000_000),
                                          ("pv-ptchurn.toml", 3_000_000)])
def test_round_trip_mid_run_is_identical_to_an_uninterrupted_run(tmp_path, name, at_ns):
    scenario = load_scenario(SCENARIOS / name)
    if scenario.domains[0].kernel is not None and not scenario.domains[0].kernel.exists():
        pytest.skip(f"{scenario.domains[0].kernel.name} not built yet")
    expected = finish(boot_scenario(scenario), scenario)

    hv = boot_scenario(scenario)
    hv.run(at_ns)
    assert hv.domains[0].alive, "save point must be mid-run"
    image = tmp_path / "guest.img.zst"
    save_domain(hv, hv.domains[0], image)
    fresh = Hypervisor(MachineConfig(scenario.pcpus, scenario.memory, scenario.quantum_ns))
    fresh.now = at_ns  # the same slice boundaries as the uninterrupted run
    dom = restore_domain(fresh, image, name=scenario.domains[0].name)
    assert fresh.check_typerefs(dom) == []
    assert finish(fresh, scenario) == expected


def test_a_domain_restored_on_other_frames_saves_and_restores_again(tmp_path):
    """The guest published its P2M list's root (shared_info arch.p2m_cr3, a machine
    address) before the save; restored where other frames are taken, that root is
    localised, so a second save finds the list and its copy runs to the same end."""
    scenario = load_scenario(SCENARIOS / "pv-smp.toml")
    expected = finish(boot_scenario(scenario), scenario)
    hv = boot_scenario(scenario)
    hv.run(2_000_000)
    first = tmp_path / "first.img.zst"
    save_domain(hv, hv.domains[0], first)
    elsewhere = boot_scenario(load_scenario(SCENARIOS / "pv-hello.toml"))  # frames taken
    elsewhere.now = 2_000_000
    moved = restore_domain(elsewhere, first, name="smp")
    assert int(moved.p2m[0]) != int(hv.domains[0].p2m[0])  # other machine frames
    second = tmp_path / "second.img.zst"
    save_domain(elsewhere, moved, second)
    fresh = Hypervisor(MachineConfig(scenario.pcpus, scenario.memory, scenario.quantum_ns))
    fresh.now = 2_000_000
    restore_domain(fresh, second, name="smp")
    # The second image restores in place, on the frames it was saved from, so the
    # machine frame numbers in the guest's P2M list differ from the first run's:
    # the same end is the same console and shutdown.
    assert [r[:4] for r in finish(fresh, scenario)] == [r[:4] for r in expected]


@pytest.fixture
def hello_image(saved_image) -> bytes:
    return saved_image("pv-hello.toml", 50_000).read_bytes()


def edit_page_data(image: bytes, edit) -> bytes:
    """Apply `edit(pfns, body)` to the first PAGE_DATA record."""
    recs = records(image)
    for i, (rtype, body) in enumerate(recs):
        if rtype == 1:
            recs[i] = (rtype, edit(bytearray(body)))
            break
    return rebuild(image, recs)


def test_truncated_image(tmp_path, hello_image):
    assert_refused_cleanly(tmp_path, hello_image[: len(hello_image) // 2], "offset")


def test_wrong_marker_and_version(tmp_path, hello_image):
    assert_refused_cleanly(tmp_path, b"\0" * 8 + hello_image[8:], "marker")
    bad_version = hello_image[:12] + struct.pack(">I", 7) + hello_image[16:]
    assert_refused_cleanly(tmp_path, bad_version, "version")


def test_record_running_past_the_end(tmp_path, hello_image):
    offset, rtype, body = records_at(hello_image)[-1]
    bad = hello_image[:offset] + struct.pack("<II", rtype, 1 << 20)
    assert_refused_cleanly(tmp_path, bad, "runs past end", f"{offset:#x}")


def test_pfn_beyond_the_domain_and_duplicates(tmp_path, hello_image):
    def beyond(body: bytearray) -> bytes:
        struct.pack_into("<Q", body, 8, (struct.unpack_from("<Q", body, 8)[0] & ~0xFFFFF) | 0xFFFFF)
        return bytes(body)

    assert_refused_cleanly(tmp_path, edit_page_data(hello_image, beyond), "PAGE_DATA", "beyond")

    def duplicate(body: bytearray) -> bytes:
        body[16:24] = body[8:16]
        return bytes(body)

    assert_refused_cleanly(tmp_path, edit_page_data(hello_image, duplicate), "PAGE_DATA")


def test_a_page_table_that_maps_itself_writable_is_refused(tmp_path, hello_image):
    """Find an L1 in the image and make one of its entries map that L1 read-write."""
    recs = [(t, bytearray(b)) for t, b in records(hello_image)]
    for rtype, body in recs:
        if rtype != 1:
            continue
        count = struct.unpack_from("<I", body, 0)[0]
        words = struct.unpack_from(f"<{count}Q", body, 8)
        data_at = 8 + 8 * count
        page_index = 0
        for word in words:
            kind, pfn = word >> 60, word & ((1 << 52) - 1)
            if kind in (0xE, 0xD, 0xF):
                continue
            if kind & 0x7 == 1:  # an L1 table
                entry_at = data_at + page_index * 4096 + 8 * 500
                struct.pack_into("<Q", body, entry_at, (pfn << 12) | 0x67)  # P|RW|US|A|D
                bad = rebuild(hello_image, [(t, bytes(b)) for t, b in recs])
                assert_refused_cleanly(tmp_path, bad, "validation")
                return
            page_index += 1
    pytest.fail("no L1 table in the image")


def test_unknown_mandatory_record(tmp_path, hello_image):
    recs = records(hello_image)
    recs.insert(2, (0x7777, b"\0" * 8))
    assert_refused_cleanly(tmp_path, rebuild(hello_image, recs), "unknown mandatory record")


def test_missing_hvlab_record_is_named(tmp_path, hello_image):
    recs = [(t, b) for t, b in records(hello_image) if t != HVLAB_DOMAIN_RECORD]
    assert_refused_cleanly(tmp_path, rebuild(hello_image, recs), "HVLAB_DOMAIN")


def test_cli_reports_a_bad_image_in_one_line_with_status_2(tmp_path, hello_image, capsys):
    (tmp_path / "bad.img").write_bytes(hello_image[:100])
    (tmp_path / "s.toml").write_text('[machine]\n[[domain]]\nname = "x"\nimage = "bad.img"\n')
    assert main(["run", str(tmp_path / "s.toml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.img" in err


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_images_never_crash_and_never_touch_other_frames(tmp_path, hello_image, data):
    image = bytearray(hello_image)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(image) - 1))
        image[pos] = data.draw(st.integers(0, 255))
    path = tmp_path / "fuzz.img"
    path.write_bytes(bytes(image))
    hv = Hypervisor(MachineConfig(1, 16 << 20))
    in_use = ~hv.frames.free
    frames = hv.memory.u8.reshape(-1, 4096)
    before = frames[in_use].copy()
    try:
        dom = restore_domain(hv, path)
    except RestoreError:
        assert hv.domains == []
        assert (frames[hv.frames.free] == 0).all()  # given frames were scrubbed back
    else:
        assert hv.check_typerefs(dom) == []
    assert np.array_equal(frames[in_use], before)  # nothing outside the domain's frames


@pytest.mark.parametrize("field, value, message", [
    ("runstate", "flying", "runstate 'flying'"),
    ("upcalls", -1, "vCPU 0.upcalls must be a non-negative integer"),
    ("timer_deadline_ns", "soon", "vCPU 0.timer_deadline_ns must be a non-negative integer"),
])
def test_a_damaged_vcpu_state_is_refused_cleanly(tmp_path, hello_image, field, value, message):
    """HVLAB_DOMAIN's `vcpus` are PvVcpuState (pv/vcpu.py), checked field by field."""
    import json

    from tests.image_surgery import edit_first

    def damage(body):
        meta = json.loads(bytes(body))
        meta["vcpus"][0][field] = value
        return json.dumps(meta).encode()

    bad = edit_first(hello_image, HVLAB_DOMAIN_RECORD, damage)
    assert_refused_cleanly(tmp_path, bad, "HVLAB_DOMAIN", message)
