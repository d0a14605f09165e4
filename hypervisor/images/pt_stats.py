"""Page-table statistics of a PV image, computed from the image alone while it streams.

What a researcher compares between real and generated guests (docs/images.md,
"Page-table statistics"): tables and pins per level, present entries per level
and per table, the L4 roots split into kernel and user ones, what the L1
entries map, and the linear (same-level) entries. Page tables in an image are
normalised (entries hold PFNs), so every target is a pfn of the same image.

Definitions:

* a **root** is an L4 that is pinned or some vCPU's CR3 / user CR3. A
  **kernel** root maps at least one guest-kernel slot of 272-510 (direct map,
  vmalloc, vmemmap); a **user** root maps none of them, like the user page
  table a 64-bit PV Linux keeps beside each process's kernel one (it maps the
  process's slots 0-255 and slot 511 for the vsyscall page only, while a
  kernel root has the kernel image in slot 511 too).
* **present entries**: entries with the present bit, in L4s guest slots only
  (256-271 belong to the hypervisor); **entries per table** their mean per
  level; **empty tables** those with none (Linux preallocates L3s for its
  vmalloc area, for instance).
* **writable mappings**: present L1 entries with RW; **table mappings**:
  present L1 entries whose target is a page-table page (read-only in a valid
  image; Linux maps all its tables through the direct map).
* **linear entries**: present entries of an L2-L4 whose target is a table of
  the same level; **self-maps** are those onto the table itself.
* **beyond domain**: present entries whose target is no pfn of the domain (0
  in a valid image; left out of the other target counts).

Memory stays bounded whatever the image's size: the L1 targets are folded into a
per-pfn counter every `_FOLD_AT` entries; upper-level entries (one per lower
table at most) are kept as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from hypervisor.mm.pte import (
    ENTRIES_PER_TABLE,
    MFN_FIELD_BITS,
    PTE_PRESENT,
    PTE_RW,
    XEN_L4_FIRST_SLOT,
    XEN_L4_LAST_SLOT,
)
from hypervisor.stream import pfinfo_has_data

from .common import pfinfo_levels, pfinfo_pinned

LEVEL_NAMES = ("L1", "L2", "L3", "L4")
FIRST_KERNEL_SLOT = XEN_L4_LAST_SLOT + 1  # 272: the guest kernel's half after Xen's slots
VSYSCALL_SLOT = 511  # also in a PV Linux's user L4s (the vsyscall page): not a kernel sign
_PRESENT = np.uint64(PTE_PRESENT)
_RW = np.uint64(PTE_RW)
_U12 = np.uint64(12)
_MFN_MASK = np.uint64((1 << MFN_FIELD_BITS) - 1)
_GUEST_L4_SLOTS = np.ones(ENTRIES_PER_TABLE, dtype=bool)
_GUEST_L4_SLOTS[XEN_L4_FIRST_SLOT : XEN_L4_LAST_SLOT + 1] = False
_KERNEL_L4_SLOTS = np.zeros(ENTRIES_PER_TABLE, dtype=bool)
_KERNEL_L4_SLOTS[FIRST_KERNEL_SLOT:VSYSCALL_SLOT] = True
_FOLD_AT = 1 << 23  # L1 targets kept before they are counted per pfn (64 MiB)
# Domain size assumed when no X86_PV_P2M_FRAMES came first (a malformed image): bounds the
# per-pfn counter (image verify's largest domain, 256 GiB).
_MAX_PAGES = 1 << 26
_EMPTY = np.empty(0, np.int64)


@dataclass
class PageTableStats:
    """Fed every PAGE_DATA record and vCPU CR3 of one image; `summary()` at the end."""

    tables: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)
    present_per_table: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    writable: int = 0
    l1_pending: list[np.ndarray] = field(default_factory=list)
    l1_pending_size: int = 0
    l1_maps: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint32))
    upper: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)
    kernel_l4: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    cr3s: list[int] = field(default_factory=list)
    nr_pages: int | None = None  # from X86_PV_P2M_FRAMES: targets at or above are counted apart
    beyond: int = 0

    def add_page_data(self, pfns: npt.NDArray[np.uint64], types: npt.NDArray[np.uint8],
                      pages: npt.NDArray[np.uint8]) -> None:
        """One PAGE_DATA record: its table pages are read, everything else skipped."""
        levels = pfinfo_levels(types)
        is_table = levels > 0
        if not is_table.any():
            return
        data_row = np.cumsum(pfinfo_has_data(types)) - 1
        rows = pages[data_row[is_table]].view("<u8").reshape(-1, ENTRIES_PER_TABLE)
        table_pfns = pfns[is_table].astype(np.int64)
        table_levels = levels[is_table]
        self.tables.append((table_pfns, table_levels, pfinfo_pinned(types)[is_table]))
        for level in (1, 2, 3, 4):
            at_level = table_levels == level
            if at_level.any():
                self._add_level(level, table_pfns[at_level], rows[at_level])

    def _add_level(self, level: int, pfns: np.ndarray, entries: np.ndarray) -> None:
        present = (entries & _PRESENT) != 0
        if level == 4:
            present &= _GUEST_L4_SLOTS
            self.kernel_l4.append((pfns, (present & _KERNEL_L4_SLOTS).any(axis=1)))
        self.present_per_table.append((np.full(pfns.size, level, np.uint8),
                                       present.sum(axis=1).astype(np.int64)))
        targets = ((entries[present] >> _U12) & _MFN_MASK).astype(np.int64)
        inside = targets < (_MAX_PAGES if self.nr_pages is None else self.nr_pages)
        self.beyond += int(targets.size - inside.sum())
        if level == 1:
            self.writable += int(((entries[present] & _RW) != 0).sum())
            targets = targets[inside]
            self.l1_pending.append(targets)
            self.l1_pending_size += targets.size
            if self.l1_pending_size >= _FOLD_AT:
                self._fold_l1()
            return
        sources = np.repeat(pfns, present.sum(axis=1))[inside]
        self.upper.append((sources, np.full(sources.size, level, np.uint8), targets[inside]))

    def add_cr3(self, pfn: int | None) -> None:
        """A vCPU's CR3 or user CR3, as a pfn (None: the vCPU has none)."""
        if pfn is not None:
            self.cr3s.append(int(pfn))

    def _fold_l1(self) -> None:
        """Count the pending L1 targets per pfn, growing the counter as needed."""
        if not self.l1_pending:
            return
        targets = np.concatenate(self.l1_pending)
        self.l1_pending, self.l1_pending_size = [], 0
        if not targets.size:
            return
        counts = np.bincount(targets, minlength=self.l1_maps.size)
        if counts.size > self.l1_maps.size:
            grown = np.zeros(counts.size, np.uint32)
            grown[: self.l1_maps.size] = self.l1_maps
            self.l1_maps = grown
        self.l1_maps += counts.astype(np.uint32)

    def summary(self) -> dict[str, Any] | None:
        """The statistics (docstring at the top), or None for an image without tables."""
        if not self.tables:
            return None
        self._fold_l1()
        pfns = np.concatenate([t[0] for t in self.tables])
        levels = np.concatenate([t[1] for t in self.tables]).astype(np.int64)
        pinned = np.concatenate([t[2] for t in self.tables])
        tables = {name: int((levels == lvl).sum()) for lvl, name in enumerate(LEVEL_NAMES, 1)}
        pins = {name: int(((levels == lvl) & pinned).sum())
                for lvl, name in enumerate(LEVEL_NAMES, 1)}

        table_level = np.concatenate([p[0] for p in self.present_per_table])
        per_table = np.concatenate([p[1] for p in self.present_per_table])
        present = {name: int(per_table[table_level == lvl].sum())
                   for lvl, name in enumerate(LEVEL_NAMES, 1)}
        empty = {name: int(((table_level == lvl) & (per_table == 0)).sum())
                 for lvl, name in enumerate(LEVEL_NAMES, 1)}
        per_table_mean = {name: (round(present[name] / tables[name], 2) if tables[name] else 0.0)
                          for name in LEVEL_NAMES}

        size = max(int(pfns.max()) + 1, self.l1_maps.size)
        level_of = np.zeros(size, np.uint8)
        level_of[pfns] = levels
        l1_maps = np.zeros(size, np.int64)
        l1_maps[: self.l1_maps.size] = self.l1_maps

        src = np.concatenate([u[0] for u in self.upper]) if self.upper else _EMPTY
        src_level = (np.concatenate([u[1] for u in self.upper]) if self.upper
                     else np.empty(0, np.uint8))
        dst = np.concatenate([u[2] for u in self.upper]) if self.upper else _EMPTY
        in_range = dst < size
        linear = np.zeros(dst.size, dtype=bool)
        linear[in_range] = level_of[dst[in_range]] == src_level[in_range]

        return {
            "tables": {**tables, "total": int(pfns.size)},
            "pinned": {**pins, "total": int(pinned.sum())},
            "roots": self._roots(pfns, levels, pinned),
            "present_entries": {**present, "total": int(per_table.sum())},
            "entries_per_table": per_table_mean,
            "empty_tables": {**empty, "total": sum(empty.values())},
            "l1_present": present["L1"],
            "writable_mappings": self.writable,
            "table_mappings": int(l1_maps[pfns].sum()),
            "mapped_frames": int(np.count_nonzero(l1_maps)),
            "linear_entries": int(linear.sum()),
            "self_maps": int((linear & (dst == src)).sum()),
            "beyond_domain": self.beyond,
        }

    def _roots(self, pfns: np.ndarray, levels: np.ndarray, pinned: np.ndarray
               ) -> dict[str, int]:
        """L4 roots (pinned L4s and CR3s, each once), kernel or user by the slots they map."""
        pinned_l4 = pfns[(levels == 4) & pinned]
        cr3 = np.unique(np.array(self.cr3s, dtype=np.int64))
        roots = np.union1d(pinned_l4, cr3)
        l4_pfns = (np.concatenate([k[0] for k in self.kernel_l4]) if self.kernel_l4
                   else _EMPTY)
        l4_kernel = (np.concatenate([k[1] for k in self.kernel_l4]) if self.kernel_l4
                     else np.empty(0, bool))
        # a CR3 that is no L4 of the image (a broken image) counts as neither kind
        known = np.isin(roots, l4_pfns)
        kernel = np.isin(roots, l4_pfns[l4_kernel])
        return {"total": int(roots.size), "kernel": int(kernel.sum()),
                "user": int((known & ~kernel).sum()),
                "pinned": int(pinned_l4.size),
                "cr3_not_pinned": int(np.setdiff1d(cr3, pinned_l4).size)}
