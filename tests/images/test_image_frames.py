"""hvlab image frames: one row per frame, its type state as the hypervisor holds it."""

from __future__ import annotations

import csv
import io
import json

from hypervisor.cli import main
from hypervisor.images import image_info
from tests import SCENARIOS

IMAGE = SCENARIOS / "images" / "pv-smp-2ms.img.zst"


def _rows(capsys, *args: str) -> list[dict[str, str]]:
    assert main(["image", "frames", *args, "--csv"]) == 0
    return list(csv.DictReader(io.StringIO(capsys.readouterr().out)))


def test_a_stored_image_gives_a_row_per_frame_matching_its_records(capsys):
    rows = _rows(capsys, str(IMAGE))
    info = image_info(IMAGE, out=io.StringIO())
    assert [int(r["pfn"]) for r in rows] == list(range(info["nr_pages"]))
    tables = [r for r in rows if r["type"] in ("l1", "l2", "l3", "l4")]
    assert len(tables) == info["page_tables"]["total"]
    assert all(r["validated"] == "1" and int(r["type_count"]) >= 1 for r in tables)
    assert sum(r["pinned"] == "1" for r in rows) == info["pins"]["total"]
    assert len({r["mfn"] for r in rows}) == len(rows)  # a frame per pfn


def test_a_live_scenario_at_a_time_agrees_with_its_saved_image(capsys):
    """pv-smp-2ms.img is pv-smp saved at 2 ms: the live frames then have the same types."""
    live = _rows(capsys, str(SCENARIOS / "pv-smp.toml"), "--at", "2ms")
    stored = _rows(capsys, str(IMAGE))
    key = ("pfn", "type", "type_count", "pinned", "validated")

    def state(row: dict[str, str]) -> tuple[str, ...]:
        # A type whose count fell to 0 is no one's (any use may retype the frame): the
        # live domain keeps it, as Xen does (e.g. the .bss page whose mapping xen_entry
        # gave to shared_info), an image carries none
        if row["type"] != "none" and row["type_count"] == "0" and row["pinned"] == "0":
            return (row["pfn"], "none", "0", "0", "0")
        return tuple(row[k] for k in key)

    assert [state(r) for r in live] == [state(r) for r in stored]
    assert sum(r["type"] != "none" for r in stored) > 10  # tables and mapped pages
    assert main(["image", "frames", str(IMAGE)]) == 0
    assert json.loads(capsys.readouterr().out)["frames"] == len(stored)


def test_bad_requests_are_refused_in_one_line(capsys):
    assert main(["image", "frames", str(SCENARIOS / "pv-smp.toml"), "--csv"]) == 2
    assert main(["image", "frames", str(SCENARIOS / "images" / "hvm-lapic-2ms.img.zst")]) == 2
    assert main(["image", "frames", str(SCENARIOS / "pv-smp.toml"), "--at", "1ms",
                 "--domain", "nobody"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and "needs --at" in err[0] and "HVM" in err[1] and "nobody" in err[2]
