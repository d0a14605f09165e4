"""`hvlab image info`'s page-table statistics (hypervisor/images/pt_stats.py)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from hypervisor.cli import main
from hypervisor.images import image_info, pt_stats
from hypervisor.mm.pte import ENTRIES_PER_TABLE, PTE_USER
from tests import ROOT
from tests.images.synthetic_tree import (
    EXPECTED,
    NR_PAGES,
    RW,
    recount,
    write_synthetic_image,
)

IMAGES = ROOT / "scenarios" / "images"


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    path = tmp_path_factory.mktemp("tree") / "tree.img"
    write_synthetic_image(path)
    return path


def _stats(path) -> dict:
    return image_info(path, out=io.StringIO())["page_table_stats"]


def test_a_synthetic_tree_gives_the_counts_it_was_built_with(synthetic):
    assert _stats(synthetic) == EXPECTED
    assert recount(synthetic) == EXPECTED  # the plain-Python recount agrees by construction


def _all_l4_slots_are_guest_slots() -> np.ndarray:
    return np.ones(ENTRIES_PER_TABLE, dtype=bool)


def _slot_511_is_kernel() -> np.ndarray:
    slots = pt_stats._KERNEL_L4_SLOTS.copy()
    slots[511] = True
    return slots


@pytest.mark.parametrize("name, planted, field", [
    ("_RW", lambda: np.uint64(PTE_USER), "writable_mappings"),
    ("_GUEST_L4_SLOTS", _all_l4_slots_are_guest_slots, "present_entries"),
    ("_KERNEL_L4_SLOTS", _slot_511_is_kernel, "roots"),
])
def test_a_planted_miscount_is_caught(synthetic, monkeypatch, name, planted, field):
    monkeypatch.setattr(pt_stats, name, planted())
    stats = _stats(synthetic)
    assert stats[field] != EXPECTED[field]
    assert stats != recount(synthetic)


@pytest.mark.parametrize("image", ["pv-linux-like-256M.img.zst", "pv-dense-64M.img.zst",
                                   "pv-sparse-64M.img.zst", "pv-aliased-64M.img.zst",
                                   "pv-ptchurn-3ms.img.zst", "pv-smp-2ms.img.zst"])
def test_committed_images_match_a_plain_python_recount(image):
    stats = _stats(IMAGES / image)
    assert stats == recount(IMAGES / image)
    info = image_info(IMAGES / image, out=io.StringIO())
    assert stats["tables"] == info["page_tables"] and stats["pinned"] == info["pins"]


def test_the_generated_linux_like_layout_in_numbers():
    """What the docs' comparison quotes for the generated layout (scenarios/images/README.md)."""
    stats = _stats(IMAGES / "pv-linux-like-256M.img.zst")
    assert stats["tables"] == {"L1": 137, "L2": 6, "L3": 6, "L4": 9, "total": 158}
    assert stats["roots"] == {"total": 9, "kernel": 5, "user": 4, "pinned": 9,
                              "cr3_not_pinned": 0}
    assert stats["mapped_frames"] == 65536  # the direct map covers every pfn
    assert stats["linear_entries"] == stats["self_maps"] == 0
    assert stats["empty_tables"]["total"] == 0


def test_entries_beyond_the_domain_are_counted_apart(tmp_path):
    path = tmp_path / "beyond.img"
    # an L1 entry onto the pfn just past the domain, an L2 entry onto the largest MFN field
    write_synthetic_image(path, {5: {100: NR_PAGES << 12 | RW},
                                 3: {100: ((1 << 40) - 1) << 12 | RW}})
    stats = _stats(path)
    assert stats["beyond_domain"] == 2
    assert stats["writable_mappings"] == EXPECTED["writable_mappings"] + 1
    assert stats["mapped_frames"] == EXPECTED["mapped_frames"]
    assert stats["linear_entries"] == EXPECTED["linear_entries"]
    assert stats == recount(path)


def test_hvm_images_have_no_page_table_statistics():
    assert _stats(IMAGES / "hvm-lapic-2ms.img.zst") is None


def test_cli_prints_the_statistics_and_their_json(synthetic, capsys):
    assert main(["image", "info", str(synthetic)]) == 0
    text = capsys.readouterr().out
    assert "roots       3 L4 roots: 2 kernel, 1 user (2 pinned, 1 CR3s not pinned)" in text
    assert "L1 entries  15 present, 8 writable, 2 map page tables; 12 frames mapped" in text
    assert "linear      3 entries onto tables of their own level, 2 self-maps" in text
    assert "empty       L1 0  L2 0  L3 1  L4 0" in text
    assert main(["image", "info", str(synthetic), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["page_table_stats"] == EXPECTED


def test_large_images_fold_their_l1_targets_as_they_stream(monkeypatch):
    monkeypatch.setattr(pt_stats, "_FOLD_AT", 1000)  # fold after every record
    path = IMAGES / "pv-linux-like-1G.img.zst"
    stats = _stats(path)
    assert stats["mapped_frames"] == 262144
    assert stats["l1_present"] == stats["present_entries"]["L1"] > 262144
