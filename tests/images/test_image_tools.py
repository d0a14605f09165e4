"""Image tools: info, verify and make (hypervisor/images)."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from hypervisor.core.hypervisor import Hypervisor, MachineConfig
from hypervisor.images import ImageError, image_info, image_make, image_verify
from hypervisor.images.domains import restore_domain
from hypervisor.images.make import workload_kernel
from hypervisor.lib.errors import HvlabError
from hypervisor.pv.linux.domain import load_plan
from hypervisor.pv.linux.layout import plan_start_of_day
from hypervisor.stream import (
    OpaqueRecord,
    PageDataRecord,
    Pfinfo,
    StreamReader,
    StreamWriter,
    open_image_for_read,
    open_image_for_write,
)
from hypervisor.stream.hvlab_records import HVLAB_DOMAIN_RECORD, HVLAB_MACHINE_FRAMES_RECORD

MIB = 1 << 20
SMALL = 16 * MIB
SMALL_PAGES = SMALL >> 12
PRESENT_RW_A_D = 0x63


def make(path: Path, layout: str, mem: int = SMALL, seed: int = 7) -> dict:
    return image_make("pv", mem, layout, seed, path, out=io.StringIO())


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    d = tmp_path_factory.mktemp("images")
    out = {}
    for layout, name in (("dense", "dense.img"), ("linux-like", "linux.img.zst"),
                         ("aliased", "aliased.img"), ("sparse", "sparse.img")):
        out[layout] = (d / name, make(d / name, layout))
    return out


def bootstrap_tables() -> tuple[int, int]:
    """(pfn of the builder's L4, number of its tables) for the small guest."""
    layout = plan_start_of_day(load_plan(workload_kernel()), SMALL_PAGES)
    # Xen's start of day maps 4 MiB: one L4, L3 and L2 and two L1s
    assert layout.nr_pt_frames == 5
    return layout.pt_pfn, layout.nr_pt_frames


def rewrite(src: Path, dst: Path, edit: Callable[[PageDataRecord], list[PageDataRecord]],
            hvlab: Callable[[bytes], bytes | None] = lambda body: body) -> None:
    """Copy an image record by record; `edit` returns what replaces each PAGE_DATA,
    `hvlab` the HVLAB_DOMAIN body (None: leave the record out)."""
    with open_image_for_read(src) as f, open_image_for_write(dst) as g:
        reader = StreamReader(f, keep=frozenset({HVLAB_DOMAIN_RECORD,
                                                 HVLAB_MACHINE_FRAMES_RECORD}))
        head = reader.domain_header
        w = StreamWriter(g, head.type, xen_major=head.xen_major, xen_minor=head.xen_minor)
        for record in reader:
            if isinstance(record, OpaqueRecord):
                body = hvlab(record.body) if record.type == HVLAB_DOMAIN_RECORD else record.body
                if body is not None:
                    w.write_record(record.type, body)
            elif isinstance(record, PageDataRecord):
                for new in edit(record):
                    w.write(new)
            else:
                w.write(record)


def first_page_of_type(path: Path, pfinfo: Pfinfo) -> tuple[int, int]:
    """(pfn, PAGE_DATA offset) of the first page of type `pfinfo`."""
    with open_image_for_read(path) as f:
        for record in StreamReader(f):
            if isinstance(record, PageDataRecord) and (record.types == pfinfo).any():
                return int(record.pfns[np.flatnonzero(record.types == pfinfo)[0]]), record.offset
    raise AssertionError(f"no {pfinfo.name} page")


def edit_page(pfn: int, change: Callable[[np.ndarray], None], new_type: int | None = None):
    """An `edit` that changes page `pfn`'s 512 entries (and optionally its type)."""

    def edit(record: PageDataRecord) -> list[PageDataRecord]:
        hit = np.flatnonzero(record.pfns == pfn)
        if not hit.size:
            return [record]
        i = int(hit[0])
        pages = record.pages.copy()
        change(pages[int(np.cumsum(record.has_data)[i]) - 1].view("<u8"))
        types = record.types.copy()
        if new_type is not None:
            types[i] = new_type
        return [PageDataRecord(record.pfns, types, pages)]

    return edit


# --------------------------------------------------------------------------- info


def test_info_histogram_pins_and_vcpus_of_a_dense_image(images):
    path, made = images["dense"]
    out = io.StringIO()
    info = image_info(path, as_json=True, out=out)
    assert json.loads(out.getvalue()) == info
    l4_pfn, boot_tables = bootstrap_tables()
    assert info["domain_type"] == "pv" and info["build"] == "4.19"
    assert info["nr_pages"] == SMALL_PAGES == info["pages_in_stream"]
    # The builder's tree (an L4, L3 and L2 and two L1s for Xen's 4 MiB, its L4 pinned)
    # plus the dense map: 4096 pfns in 8 full L1s, one L2, one L3, and a pinned L4.
    assert made["tables_added"] == {"L1": 8, "L2": 1, "L3": 1, "L4": 1} and boot_tables == 5
    types = info["page_types"]
    assert types["L1TAB"] == 10 and types["L2TAB"] == 2 and types["L3TAB"] == 2
    assert types["L4TAB_PIN"] == 2 and "L4TAB" not in types
    assert info["pins"] == {"L1": 0, "L2": 0, "L3": 0, "L4": 2, "total": 2}
    assert sum(types.values()) == SMALL_PAGES
    assert types["XALLOC"] == SMALL_PAGES - made["save"]["data_pages"]
    assert info["data_pages"] == made["save"]["data_pages"]
    assert info["vcpus"]["count"] == 1
    (v0,) = info["vcpus"]["list"]
    assert v0["online"] and v0["cr3_pfn"] == l4_pfn and v0["rip"] >= 0xFFFFFFFF80000000
    assert info["hvlab_domain"]["name"] == "pv-dense-16M"
    assert info["hvlab_domain"]["virtual_ns"] == made["run_virtual_ns"]
    names = [r["type"] for r in info["records"]]
    # optional records the reader skips (HVLAB_MACHINE_FRAMES) are tallied after END
    assert names[0] == "X86_PV_INFO" and "END" in names and "HVLAB_DOMAIN" in names
    assert sum(r["bytes"] for r in info["records"]) + 40 == info["stream_bytes"]


def test_info_of_a_compressed_linux_like_image(images):
    path, made = images["linux-like"]
    text = io.StringIO()
    info = image_info(path, out=text)
    assert info["compressed"] and info["file_bytes"] < info["stream_bytes"]
    # init_mm (the builder's L4, now with the direct map) and 4 processes x 2 L4s.
    assert info["pins"]["L4"] == 9 == 1 + made["pins_added"]
    assert info["page_tables"]["L1"] == 2 + made["tables_added"]["L1"]  # + the builder's
    assert "L4 9" in text.getvalue() and "pv-linux-like-16M" in text.getvalue()


def test_info_rejects_a_truncated_image_naming_record_and_offset(images, tmp_path):
    path, _ = images["dense"]
    data = path.read_bytes()
    bad = tmp_path / "cut.img"
    _, offset = first_page_of_type(path, Pfinfo.L1TAB)
    bad.write_bytes(data[: offset + 100])
    with pytest.raises(ImageError, match=rf"record PAGE_DATA at offset {offset:#x}: body"):
        image_info(bad, out=io.StringIO())
    with pytest.raises(ImageError, match="No such file"):
        image_info(tmp_path / "missing.img", out=io.StringIO())
    bad.write_bytes(b"\0" * 64)
    with pytest.raises(HvlabError, match="image header at offset 0x0: bad marker"):
        image_info(bad, out=io.StringIO())


# --------------------------------------------------------------------------- verify


@pytest.mark.parametrize("layout", ["dense", "linux-like", "aliased", "sparse"])
def test_verify_passes_generated_images(images, layout):
    path, made = images[layout]
    out = io.StringIO()
    result = image_verify(path, out=out)
    assert result["ok"], result["problems"]
    assert result["problems"] == [] and "ok" in out.getvalue()
    assert result["pins"] == 1 + made["pins_added"]
    assert result["cr3_refs"] == 1
    assert result["tables_validated"] == result["page_tables"]
    assert result["tables_validated"] == (bootstrap_tables()[1]
                                          + sum(made["tables_added"].values()))


def test_verify_names_the_page_table_that_maps_itself_writable(images, tmp_path):
    src, _ = images["dense"]
    pfn, offset = first_page_of_type(src, Pfinfo.L1TAB)
    bad = tmp_path / "selfmap.img"

    def map_itself(entries: np.ndarray) -> None:
        entries[7] = (pfn << 12) | PRESENT_RW_A_D

    rewrite(src, bad, edit_page(pfn, map_itself))
    result = image_verify(bad, out=io.StringIO())
    assert not result["ok"]
    first = result["problems"][0]
    assert first.startswith(f"record PAGE_DATA at offset {offset:#x}: pfn {pfn:#x} (L1TAB) slot 7")
    assert f"maps pfn {pfn:#x} (L1TAB) writable, but it is an L1 table" in first
    assert "refused (-EBUSY)" in first or "refused (-EINVAL)" in first
    assert result["refused_roots"] >= 1


def test_verify_names_a_table_saved_as_data(images, tmp_path):
    src, _ = images["dense"]
    pfn, offset = first_page_of_type(src, Pfinfo.L2TAB)
    bad = tmp_path / "notab.img"
    rewrite(src, bad, edit_page(pfn, lambda e: None, new_type=Pfinfo.NOTAB))
    result = image_verify(bad, out=io.StringIO())
    assert not result["ok"]
    assert (f"record PAGE_DATA at offset {offset:#x}: pfn {pfn:#x} is used as an L2 table but "
            "saved as NOTAB") in result["problems"]


def test_verify_refuses_bad_flags_and_hypervisor_slots(images, tmp_path):
    src, _ = images["dense"]
    l1, l1_offset = first_page_of_type(src, Pfinfo.L1TAB)
    l4, l4_offset = first_page_of_type(src, Pfinfo.L4TAB_PIN)
    step = tmp_path / "pcd.img"

    slots: list[int] = []

    def uncached(entries: np.ndarray) -> None:
        slots.append(int(np.flatnonzero(entries)[0]))  # its first present entry
        entries[slots[0]] |= np.uint64(0x10)  # PCD: not for a PV guest without I/O memory

    rewrite(src, step, edit_page(l1, uncached))
    bad = tmp_path / "both.img"
    rewrite(step, bad, edit_page(l4, lambda e: e.__setitem__(260, e[np.flatnonzero(e)[0]])))
    problems = image_verify(bad, out=io.StringIO())["problems"]
    assert (f"record PAGE_DATA at offset {l4_offset:#x}: L4 pfn {l4:#x} slot 260 is not zero: "
            "slots 256-271 belong to the hypervisor") in problems
    assert any(p.startswith(f"record PAGE_DATA at offset {l1_offset:#x}: pfn {l1:#x} (L1TAB) "
                            f"slot {slots[0]} has flags 0x10") for p in problems)


def _extra_record(pfns: list[int]):
    """An `edit` that appends a PAGE_DATA record of XALLOC pages after the first one."""
    done = []

    def edit(record: PageDataRecord) -> list[PageDataRecord]:
        if done:
            return [record]
        done.append(True)
        extra = PageDataRecord(np.array(pfns, dtype=np.uint64),
                               np.full(len(pfns), Pfinfo.XALLOC, dtype=np.uint8),
                               np.empty((0, 4096), dtype=np.uint8))
        return [record, extra]

    return edit


def _extra_offset(path: Path) -> int:
    with open_image_for_read(path) as f:
        offsets = [r.offset for r in StreamReader(f) if isinstance(r, PageDataRecord)]
    return offsets[1]


def test_verify_reports_duplicate_pfns(images, tmp_path):
    src, _ = images["dense"]
    bad = tmp_path / "dup.img"
    rewrite(src, bad, _extra_record([5]))
    result = image_verify(bad, out=io.StringIO())
    assert not result["ok"]
    assert result["problems"] == [
        f"record PAGE_DATA at offset {_extra_offset(bad):#x}: pfn[0] 0x5 already seen in an "
        "earlier record"]
    within = tmp_path / "dup2.img"
    rewrite(src, within, _extra_record([SMALL_PAGES + 1, 9, SMALL_PAGES + 1]))
    (problem,) = image_verify(within, out=io.StringIO())["problems"]
    assert problem.startswith(f"record PAGE_DATA at offset {_extra_offset(within):#x}: pfn[")
    assert problem.endswith("(and 2 more bad pfns in this record)")


def test_verify_reports_pfns_beyond_the_domain(images, tmp_path):
    src, _ = images["dense"]
    bad = tmp_path / "beyond.img"
    rewrite(src, bad, _extra_record([SMALL_PAGES + 5]))
    result = image_verify(bad, out=io.StringIO())
    assert not result["ok"]
    assert result["problems"] == [
        f"record PAGE_DATA at offset {_extra_offset(bad):#x}: pfn[0] {SMALL_PAGES + 5:#x} beyond "
        f"the domain's {SMALL_PAGES:#x} pages"]


def test_verify_wants_a_readable_hvlab_domain_record(images, tmp_path):
    src, _ = images["dense"]
    without = tmp_path / "no-hvlab.img"
    rewrite(src, without, lambda r: [r], hvlab=lambda body: None)
    (problem,) = image_verify(without, out=io.StringIO())["problems"]
    assert problem.startswith("record HVLAB_DOMAIN: missing")
    garbled = tmp_path / "garbled.img"
    rewrite(src, garbled, lambda r: [r], hvlab=lambda body: body[:-1])
    (problem,) = image_verify(garbled, out=io.StringIO())["problems"]
    assert problem.startswith("record HVLAB_DOMAIN at offset 0x") and "unreadable" in problem
    with pytest.raises(ImageError, match="record HVLAB_DOMAIN at offset 0x.*unreadable JSON"):
        image_info(garbled, out=io.StringIO())


def test_verify_reports_a_truncated_image_as_a_problem(images, tmp_path):
    path, _ = images["dense"]
    bad = tmp_path / "cut.img"
    bad.write_bytes(path.read_bytes()[:-8])  # END gone
    result = image_verify(bad, out=io.StringIO())
    assert not result["ok"]
    (problem,) = result["problems"]
    assert problem.startswith(f"record END at offset {path.stat().st_size - 8:#x}: missing: "
                              "stream ends after ")


# --------------------------------------------------------------------------- make


def test_make_is_deterministic(images, tmp_path):
    path, _ = images["aliased"]
    again = tmp_path / "again.img"
    make(again, "aliased")
    assert again.read_bytes() == path.read_bytes()
    other = tmp_path / "other.img"
    make(other, "aliased", seed=8)
    assert other.read_bytes() != path.read_bytes()


def test_make_layouts_have_their_shape(images):
    dense = images["dense"][1]
    assert dense["l1_entries_added"] == SMALL_PAGES  # every pfn once
    sparse = images["sparse"][1]
    assert sparse["l1_entries_added"] == 64 and sparse["tables_added"]["L1"] > 32
    aliased = images["aliased"][1]
    assert aliased["l1_entries_added"] == SMALL_PAGES // 8 and aliased["pins_added"] == 2
    linux = images["linux-like"][1]
    assert linux["l1_entries_added"] > SMALL_PAGES  # the direct map plus user pages
    for made in (dense, sparse, aliased, linux):
        assert made["save"]["xalloc_pages"] > made["save"]["data_pages"]


def test_a_generated_image_restores_and_runs_to_the_end(images):
    path, _ = images["linux-like"]
    hv = Hypervisor(MachineConfig(1, SMALL + 4 * MIB))
    dom = restore_domain(hv, path)
    assert hv.check_typerefs(dom) == []
    assert hv.run(hv.now + 300_000_000) == "shutdown"
    assert dom.shutdown is not None and (dom.shutdown.reason, dom.shutdown.code) == ("poweroff", 0)
    assert "all checks passed" in dom.console_text()
    assert hv.check_typerefs(dom) == []


@pytest.mark.parametrize("args, message", [
    (("hvm", SMALL, "dense", 1), "kind .hvm. is not one of pv"),
    (("pv", SMALL, "fractal", 1), "layout 'fractal' is not one of"),
    (("pv", SMALL + 1, "dense", 1), "not a whole number of 4 KiB pages"),
    (("pv", MIB, "dense", 1), "outside 16M"),
    (("pv", SMALL, "dense", -1), "seed -1"),
])
def test_make_refuses_bad_arguments(tmp_path, args, message):
    target = tmp_path / "x.img"
    with pytest.raises(ImageError, match=message):
        image_make(*args, target, out=io.StringIO())
    assert not target.exists()


@pytest.mark.slow
def test_make_info_verify_4g(tmp_path):
    path = tmp_path / "pv-linux-like-4G.img.zst"
    made = make(path, "linux-like", mem=4 << 30, seed=1)
    info = image_info(path, out=io.StringIO())
    assert info["nr_pages"] == 1 << 20 == made["nr_pages"]
    assert info["pins"]["L4"] == 9
    assert info["page_types"]["XALLOC"] > 0.99 * (1 << 20)
    result = image_verify(path, out=io.StringIO())
    assert result["ok"], result["problems"]
    assert result["tables_validated"] == result["page_tables"] == info["page_tables"]["total"]
    assert info["page_tables"]["L1"] > made["tables_added"]["L1"] == (1 << 20) // 512 + 8
