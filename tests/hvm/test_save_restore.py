"""Saving and restoring HVM domains: exact round trips, the CLI, and bad images refused cleanly."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hypervisor.cli import main
from hypervisor.core.hypervisor import Hypervisor, MachineConfig
from hypervisor.hvm.image import HVM_PARAM_PAE_ENABLED, hvm_domain_digest
from hypervisor.images.domains import restore_domain, save_domain
from hypervisor.lib.errors import RestoreError
from hypervisor.runner import boot_scenario
from hypervisor.scenario import load_scenario
from hypervisor.stream import (
    DomainType,
    HvmContextRecord,
    HvmParamsRecord,
    OpaqueRecord,
    PageDataRecord,
    Pfinfo,
    StreamReader,
    X86TscInfoRecord,
    open_image_for_read,
)
from hypervisor.stream.hvlab_records import HVLAB_DOMAIN_RECORD
from hypervisor.stream.hvm_records import HvmContext, HvmHwCpu
from tests import SCENARIOS
from tests.image_surgery import assert_refused_cleanly as refused_on
from tests.image_surgery import edit_first, rebuild, records

LAPIC = SCENARIOS / "hvm-lapic.toml"
STORED = SCENARIOS / "images" / "hvm-lapic-2ms.img.zst"
SAVE_AT = 2_000_000  # a slice boundary where the disk source posts (0x50 folded into IRR)
RECORD_PAGE_DATA, RECORD_HVM_CONTEXT = 0x01, 0x09


def outcome(hv: Hypervisor, until: int) -> list:
    """Everything the guest and its devices did: console, fate, counters, every page."""
    hv.run(until)
    return [(d.console, d.shutdown, d.crash_report,
             [(v.runstate, v.instructions, v.pcpu, d.policy.describe_vcpu(v)) for v in d.vcpus],
             d.policy.describe(d), hvm_domain_digest(hv, d)) for d in hv.domains]


def save_and_restore(scenario, at: int, path: Path) -> tuple[Hypervisor, Hypervisor]:
    """Run to `at`, save, restore into a fresh hypervisor at the same time: (saver, fresh)."""
    hv = boot_scenario(scenario)
    hv.run(at)
    dom = hv.domains[0]
    assert dom.alive, "the save point must be mid-run"
    save_domain(hv, dom, path)
    fresh = Hypervisor(MachineConfig(scenario.pcpus, scenario.memory, scenario.quantum_ns),
                       scenario.build)
    fresh.now = hv.now  # the same slice grid as the run that was saved
    restore_domain(fresh, path, name=dom.name)
    return hv, fresh


def read_records(path: Path) -> list:
    with open_image_for_read(path) as f:
        reader = StreamReader(f, keep=frozenset({HVLAB_DOMAIN_RECORD}))
        assert reader.domain_header.type == DomainType.X86_HVM
        return list(reader)


@pytest.fixture
def lapic_image(saved_image) -> Path:
    return saved_image(LAPIC.name, SAVE_AT)


# ------------------------------------------------------------------ round trips


def test_round_trip_mid_run_is_identical_to_an_uninterrupted_run(tmp_path):
    scenario = load_scenario(LAPIC)
    expected = outcome(boot_scenario(scenario), scenario.virtual_time_ns)
    assert expected[0][1].code == 0
    _, fresh = save_and_restore(scenario, SAVE_AT, tmp_path / "lapic.img.zst")
    dom = fresh.domains[0]
    assert fresh.now + dom.time_offset == SAVE_AT
    assert [v.runstate for v in dom.vcpus] == ["runnable", "blocked"]
    assert outcome(fresh, scenario.virtual_time_ns) == expected


@pytest.mark.parametrize("build", ["4.12", "4.4"])
def test_restoring_on_another_build_rebuilds_ept_in_its_layout(tmp_path, lapic_image, build):
    scenario = load_scenario(LAPIC)
    expected = outcome(boot_scenario(scenario), scenario.virtual_time_ns)
    fresh = Hypervisor(MachineConfig(scenario.pcpus, scenario.memory, scenario.quantum_ns), build)
    fresh.now = SAVE_AT
    dom = restore_domain(fresh, lapic_image, name="lapic")
    assert scenario.build != "4.12" and dom.hvm.physmap.ept.layout.build == "4.12"
    assert outcome(fresh, scenario.virtual_time_ns) == expected


def test_round_trip_of_a_split_run_matches_the_saver_going_on(tmp_path):
    """Saved off the slice grid: the restored domain does what the saving hypervisor does.

    (It differs from an unsplit run, and so does the saver: `run(T)` ends a slice at T,
    which moves every later slice boundary and so when cross-pCPU IPIs are seen.)
    """
    scenario = load_scenario(LAPIC)
    saver, fresh = save_and_restore(scenario, 2_345_678, tmp_path / "split.img")
    assert outcome(fresh, scenario.virtual_time_ns) == outcome(saver,
                                                               scenario.virtual_time_ns)


def test_populate_on_demand_round_trip_keeps_pod_pages_unpopulated(tmp_path):
    scenario = load_scenario(SCENARIOS / "hvm-memtouch.toml")
    expected = outcome(boot_scenario(scenario), scenario.virtual_time_ns)
    saver, fresh = save_and_restore(scenario, 100_000, tmp_path / "pod.img")
    pod_before = hvm_domain_digest(saver, saver.domains[0]).count("pod")
    assert 0 < pod_before == hvm_domain_digest(fresh, fresh.domains[0]).count("pod")
    assert fresh.domains[0].hvm.physmap.pod
    assert outcome(fresh, scenario.virtual_time_ns) == expected


def test_the_image_carries_xen_records(lapic_image):
    records = read_records(lapic_image)
    kinds = [type(r).__name__ for r in records]
    assert isinstance(records[0], OpaqueRecord) and records[0].type == HVLAB_DOMAIN_RECORD
    assert kinds[-4:] == ["X86TscInfoRecord", "HvmContextRecord", "HvmParamsRecord",
                          "EndRecord"]
    meta = json.loads(records[0].body)
    assert (meta["name"], meta["nr_pages"], meta["pod"]) == ("lapic", 4096, False)
    assert [s["state"]["name"] for v in meta["vcpus"] for s in v["sources"]] == ["disk", "nic"]
    pages = [r for r in records if isinstance(r, PageDataRecord)]
    pfns = np.concatenate([r.pfns for r in pages])
    types = np.concatenate([r.types for r in pages])
    assert np.array_equal(np.sort(pfns), np.arange(4096))  # every gfn is backed
    assert set(np.unique(types).tolist()) == {Pfinfo.NOTAB, Pfinfo.XALLOC}
    tsc = next(r for r in records if isinstance(r, X86TscInfoRecord))
    assert tsc.nsec == SAVE_AT
    params = next(r for r in records if isinstance(r, HvmParamsRecord))
    assert dict(params.params) == {HVM_PARAM_PAE_ENABLED: 1}
    context = next(r for r in records if isinstance(r, HvmContextRecord))
    entries = HvmContext.unpack(context.blob).records
    assert [(e.typecode, e.instance) for e in entries] == [(2, 0), (5, 0), (6, 0),
                                                           (2, 1), (5, 1), (6, 1)]
    cpu = HvmHwCpu.unpack(entries[0].payload)
    assert cpu.cs_sel == 0x08 and cpu.ss_sel == 0x10 and cpu.msr_efer & (1 << 10)  # LMA
    assert cpu.cs_arbytes == 0xA9A and cpu.tsc == SAVE_AT  # G, L, present, code execute/read
    assert cpu.cr3 == meta["layout"]["page_tables"] and cpu.gdtr_base == meta["layout"]["gdt"]
    irr = entries[2].payload[0x200:0x280]
    vectors = [v for v in range(256) if irr[16 * (v // 32) + (v % 32) // 8] >> (v % 8) & 1]
    assert 0x50 in vectors  # the disk post due at the save instant, folded from PIR


def test_cli_save_then_a_scenario_with_the_image_runs_to_code_0(tmp_path, capsys):
    image = tmp_path / "x.img.zst"
    assert main(["save", str(LAPIC), "--domain", "lapic", "--at", "2ms", "-o", str(image)]) == 0
    assert "saved lapic at 2.000 ms" in capsys.readouterr().out
    toml = tmp_path / "s.toml"
    toml.write_text('[machine]\npcpus = 2\nmemory = "64M"\nquantum = "100us"\n'
                    '[[domain]]\nname = "lapic"\nimage = "x.img.zst"\n'
                    '[limits]\nvirtual_time = "1s"\n')
    assert main(["run", str(toml), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    (dom,) = result["domains"]
    assert dom["type"] == "hvm" and dom["shutdown"]["code"] == 0
    assert "all checks passed" in dom["console"]


def test_the_stored_image_restores_and_passes():
    assert STORED.exists(), "make it: hvlab save scenarios/hvm-lapic.toml --domain lapic " \
                            "--at 2ms -o scenarios/images/hvm-lapic-2ms.img.zst"
    scenario = load_scenario(SCENARIOS / "hvm-lapic-image.toml")
    assert scenario.domains[0].image == STORED
    hv = boot_scenario(scenario)
    (dom,) = hv.domains
    assert dom.kind == "hvm" and hv.vcpu_time(dom) == SAVE_AT
    expected = outcome(boot_scenario(load_scenario(LAPIC)), scenario.virtual_time_ns)
    assert outcome(hv, scenario.virtual_time_ns) == expected  # hv.now 0: the same grid
    assert dom.shutdown is not None and (dom.shutdown.reason, dom.shutdown.code) == ("poweroff", 0)
    assert "hvm_lapic: all checks passed" in dom.console_text()


# ------------------------------------------------------------------- bad images


def assert_refused_cleanly(tmp_path, image: bytes, *messages: str) -> str:
    return refused_on(tmp_path, image, *messages, pcpus=2, memory=32 << 20)


def test_truncated_image(tmp_path, lapic_image):
    image = lapic_image.read_bytes()
    assert_refused_cleanly(tmp_path, image[: len(image) // 2], "offset")
    assert_refused_cleanly(tmp_path, image[:-8], "END")  # everything but the END record


def test_a_page_beyond_the_domain(tmp_path, lapic_image):
    def beyond(body: bytearray) -> bytes:
        word = struct.unpack_from("<Q", body, 8)[0]
        struct.pack_into("<Q", body, 8, (word & ~((1 << 52) - 1)) | 0x12345)
        return bytes(body)

    bad = edit_first(lapic_image.read_bytes(), RECORD_PAGE_DATA, beyond)
    assert_refused_cleanly(tmp_path, bad, "PAGE_DATA", "beyond", "offset")


def test_a_page_table_type_is_refused_in_an_hvm_image(tmp_path, lapic_image):
    def as_l1(body: bytearray) -> bytes:
        count = struct.unpack_from("<I", body, 0)[0]
        words = struct.unpack_from(f"<{count}Q", body, 8)
        i = next(i for i, w in enumerate(words) if w >> 60 == Pfinfo.NOTAB)  # carries data
        struct.pack_into("<Q", body, 8 + 8 * i, words[i] | (Pfinfo.L1TAB << 60))
        return bytes(body)

    bad = edit_first(lapic_image.read_bytes(), RECORD_PAGE_DATA, as_l1)
    assert_refused_cleanly(tmp_path, bad, "PAGE_DATA", "NOTAB or XALLOC")


@pytest.mark.parametrize("offset, value, message", [
    (8, b"\0\0\0\0", "magic"),  # HEADER magic
    (32 + 4, b"\x10\0\0\0", "CPU"),  # the first CPU entry's length
    (40 + 512 + 8 * 18, b"\0" * 8, "64-bit"),  # vCPU 0's cr0
    (40 + 736, b"\x18\x01\0\0", "cs selector"),  # vCPU 0's cs beyond the GDT
])
def test_a_corrupt_hvm_context_blob(tmp_path, lapic_image, offset, value, message):
    def corrupt(body: bytearray) -> bytes:
        body[offset:offset + len(value)] = value
        return bytes(body)

    bad = edit_first(lapic_image.read_bytes(), RECORD_HVM_CONTEXT, corrupt)
    assert_refused_cleanly(tmp_path, bad, "HVM_CONTEXT", message)


def test_a_corrupt_lapic_record(tmp_path, lapic_image):
    def bad_base(body: bytearray) -> bytes:
        lapic = 40 + 1032 + 8  # vCPU 0's LAPIC payload
        struct.pack_into("<Q", body, lapic, 0x1234_5000)
        return bytes(body)

    bad = edit_first(lapic_image.read_bytes(), RECORD_HVM_CONTEXT, bad_base)
    assert_refused_cleanly(tmp_path, bad, "HVM_CONTEXT", "apic_base_msr")


def test_missing_or_unreadable_hvlab_record(tmp_path, lapic_image):
    image = lapic_image.read_bytes()
    recs = [(t, b) for t, b in records(image) if t != HVLAB_DOMAIN_RECORD]
    assert_refused_cleanly(tmp_path, rebuild(image, recs), "HVLAB_DOMAIN")
    bad = edit_first(image, HVLAB_DOMAIN_RECORD, lambda body: b"{" + bytes(body[1:]).replace(
        b'"nr_pages": 4096', b'"nr_pages": -5000'))
    assert_refused_cleanly(tmp_path, bad, "HVLAB_DOMAIN", "nr_pages")


def test_a_domain_larger_than_the_host_is_refused(tmp_path, lapic_image):
    image = lapic_image.read_bytes()
    bad = edit_first(image, HVLAB_DOMAIN_RECORD, lambda body: bytes(body).replace(
        b'"nr_pages": 4096', b'"nr_pages": 9999'))
    assert_refused_cleanly(tmp_path, bad, "HVLAB_DOMAIN", "cannot back")


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_state_records_never_crash_and_never_touch_other_frames(tmp_path, lapic_image,
                                                                        data):
    """Damage HVLAB_DOMAIN or HVM_CONTEXT: a clean refusal, or a domain that works."""
    image = lapic_image.read_bytes()
    recs = records(image)
    which = data.draw(st.sampled_from([HVLAB_DOMAIN_RECORD, RECORD_HVM_CONTEXT]))
    i = next(i for i, (t, _) in enumerate(recs) if t == which)
    body = bytearray(recs[i][1])
    for _ in range(data.draw(st.integers(1, 3))):
        body[data.draw(st.integers(0, len(body) - 1))] = data.draw(st.integers(0, 255))
    recs[i] = (which, bytes(body))
    path = tmp_path / "fuzz.img"
    path.write_bytes(rebuild(image, recs))
    hv = Hypervisor(MachineConfig(2, 32 << 20))
    in_use = ~hv.frames.free
    frames = hv.memory.u8.reshape(-1, 4096)
    before = frames[in_use].copy()
    try:
        dom = restore_domain(hv, path)
    except RestoreError as err:
        assert "\n" not in str(err)
        assert hv.domains == [] and np.array_equal(~hv.frames.free, in_use)
        assert (frames[hv.frames.free] == 0).all()  # given frames were scrubbed back
    else:
        hv.run(hv.now + 200_000)  # it runs (or crashes as a guest), never as the host
        assert dom in hv.domains
    assert np.array_equal(frames[in_use], before)  # nothing outside the domain's frames
