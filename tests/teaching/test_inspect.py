"""`hvlab inspect`: page walks, frames, EPT, LAPIC, event channels and vCPUs at a moment."""

from __future__ import annotations

import hashlib
import json

from emulator.paging import walk
from hypervisor.cli import main
from hypervisor.teaching.inspect import open_machine, walk_view
from tests import SCENARIOS

KERNEL_TEXT = 0xFFFF_FFFF_8000_1000


def inspect(capsys, *args: str) -> tuple[int, dict | str, str]:
    status = main(["inspect", *args])
    out = capsys.readouterr()
    data = json.loads(out.out) if status == 0 and "--json" in args else out.out
    return status, data, out.err


def test_walk_shows_four_levels_that_agree_with_the_hardware_walk(capsys):
    status, data, _ = inspect(capsys, str(SCENARIOS / "pv-hello.toml"), "--at", "50us",
                              "walk", hex(KERNEL_TEXT), "--json")
    assert status == 0 and isinstance(data, dict)
    levels = data["levels"]
    assert [lv["level"] for lv in levels] == [4, 3, 2, 1]
    assert [lv["target"]["type"] for lv in levels] == ["L3", "L2", "L1", "WRITABLE"]
    assert all(lv["target"]["validated"] and "P" in lv["flags"] for lv in levels)
    assert data["root"]["type"] == "L4" and data["root"]["pinned"]
    assert not any(lv["target"]["pinned"] for lv in levels)
    hv = open_machine(str(SCENARIOS / "pv-hello.toml"), 50_000)
    v = hv.domains[0].vcpus[0]
    t = walk(hv.memory.u64, v.roots.kernel_ma, KERNEL_TEXT, "read", set_accessed=False)
    assert data["final"]["mfn"] == t.ma >> 12 == levels[-1]["target"]["mfn"]
    assert data["final"]["pfn"] == 1  # VIRT_BASE + 4 KiB is pseudo-physical frame 1
    assert "fault" not in data


def test_walk_of_an_unmapped_address_stops_where_the_hardware_would(capsys):
    status, data, _ = inspect(capsys, str(SCENARIOS / "pv-hello.toml"), "walk", "0x1000",
                              "--json")
    assert status == 0 and isinstance(data, dict)
    assert data["fault"] == "not present at level 4" and len(data["levels"]) == 1
    status, text, _ = inspect(capsys, str(SCENARIOS / "pv-hello.toml"), "walk", hex(KERNEL_TEXT))
    assert status == 0 and "L4" in text and "pinned validated" in text and "final: 0x" in text


def test_inspecting_changes_no_guest_memory():
    hv = open_machine(str(SCENARIOS / "pv-hello.toml"), 20_000)
    before = hashlib.sha256(hv.memory.u64.tobytes()).digest()
    for va in (KERNEL_TEXT, 0xFFFF_FFFF_8010_0000, 0x0):
        walk_view(hv, hv.domains[0], va)
    assert hashlib.sha256(hv.memory.u64.tobytes()).digest() == before


def test_frames_summary_and_range(capsys):
    status, data, _ = inspect(capsys, str(SCENARIOS / "pv-hello.toml"), "frames", "--json")
    assert status == 0 and isinstance(data, dict)
    by_type = data["by_type"]
    # its 1024 pages and the hypervisor pages it owns on Xen's ABI: shared_info, a grant frame
    assert sum(t["frames"] for t in by_type.values()) == data["frames"] == 1026
    assert by_type["L4"] == {"frames": 1, "pinned": 1, "validated": 1}
    status, data, _ = inspect(capsys, str(SCENARIOS / "pv-hello.toml"), "frames", "0-3",
                              "--json")
    assert status == 0 and isinstance(data, dict)
    assert [r["pfn"] for r in data["rows"]] == [0, 1, 2, 3]
    hv = open_machine(str(SCENARIOS / "pv-hello.toml"), 0)
    assert [r["mfn"] for r in data["rows"]] == [int(m) for m in hv.domains[0].p2m[:4]]


def test_hvm_walk_ept_and_lapic(capsys):
    hvm = str(SCENARIOS / "hvm-lapic.toml")
    status, data, _ = inspect(capsys, hvm, "--at", "1ms", "walk", "0x101000", "--json")
    assert status == 0 and isinstance(data, dict) and len(data["levels"]) == 4
    assert data["final"]["p2m_type"] == "RAM_RW" and data["final"]["gpa"] == 0x101000
    status, ept, _ = inspect(capsys, hvm, "--at", "1ms", "ept", "0x101000", "--json")
    assert status == 0 and isinstance(ept, dict)
    hv = open_machine(hvm, 1_000_000)
    assert ept["mfn"] << 12 == hv.domains[0].hvm.physmap.gpa_to_ma(0x101000)
    assert ept["mfn"] == data["final"]["mfn"]
    status, lapic, _ = inspect(capsys, hvm, "--at", "1ms", "lapic", "--json")
    assert status == 0 and isinstance(lapic, dict) and len(lapic["vcpus"]) == 2
    for row in lapic["vcpus"]:
        assert row["enabled"] and row["timer"]["running"] and row["timer"]["vector"] == 0x40
        assert row["ppr"] >= row["tpr"]
    status, text, _ = inspect(capsys, hvm, "--at", "1ms", "lapic")
    assert status == 0 and "IRR" in text and "periodic" in text


def test_evtchn_and_vcpu_views(capsys):
    smp = str(SCENARIOS / "pv-smp.toml")
    status, ev, _ = inspect(capsys, smp, "--at", "1ms", "evtchn", "--json")
    assert status == 0 and isinstance(ev, dict)
    virqs = {(p["vcpu"], p["virq"]) for p in ev["ports"] if p["state"] == "virq"}
    assert virqs == {(0, 0), (1, 0)}  # each vCPU bound its timer VIRQ
    assert len(ev["vcpus"]) == 2
    status, vc, _ = inspect(capsys, smp, "--at", "1ms", "vcpu", "--json")
    assert status == 0 and isinstance(vc, dict)
    hv = open_machine(smp, 1_000_000)
    for row, v in zip(vc["vcpus"], hv.domains[0].vcpus, strict=True):
        assert row["registers"]["rip"] == hv.read_vcpu_registers(v)["rip"]
        assert row["kernel_cr3"] == v.roots.kernel_ma


def test_an_image_is_inspected_like_a_scenario(capsys):
    image = str(SCENARIOS / "images" / "pv-smp-2ms.img.zst")
    status, data, _ = inspect(capsys, image, "walk", hex(KERNEL_TEXT), "--json")
    assert status == 0 and isinstance(data, dict) and len(data["levels"]) == 4
    assert data["root"]["pinned"] and data["final"]["type"] == "WRITABLE"


def test_bad_requests_are_usage_errors(capsys):
    hello = str(SCENARIOS / "pv-hello.toml")
    for args in ((hello, "--domain", "nobody", "vcpu"), (hello, "ept", "0x1000"),
                 (hello, "walk", "banana"), (hello, "lapic"), (hello, "walk", "0", "--vcpu", "3"),
                 (str(SCENARIOS / "no-such.img"), "vcpu")):
        status, _, err = inspect(capsys, *args)
        assert status == 2 and err.startswith("hvlab: ") and err.count("\n") == 1, args
