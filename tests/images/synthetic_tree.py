"""A small PV image whose page-table statistics are known by construction, and a plain-Python
recount of any image's statistics (an independent check of the vectorised `pt_stats`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hypervisor.images.common import pfinfo_levels, pfinfo_pinned
from hypervisor.stream import (
    PageDataRecord,
    Pfinfo,
    StreamReader,
    StreamWriter,
    X86PvP2mFramesRecord,
    X86PvVcpuBasicRecord,
    open_image_for_read,
    open_image_for_write,
)
from hypervisor.stream.framing import pfinfo_has_data
from hypervisor.stream.vcpu_context import VGCF_ONLINE, VcpuGuestContext

NR_PAGES = 64
RW = 0x67  # present, RW, user, accessed, dirty
RO = 0x25  # present, user, accessed
NOT_PRESENT_JUNK = 0xABCDE000  # an address without the present bit: counts for nothing

# pfn -> (PFINFO type, {slot: entry})
TREE: dict[int, tuple[Pfinfo, dict[int, int]]] = {
    # kernel root, pinned, vCPU 0's CR3: user L3, kernel L3, a read-only self-map, and a
    # hypervisor slot (256-271) that statistics must ignore
    1: (Pfinfo.L4TAB_PIN, {0: 2 << 12 | RW, 300: 7 << 12 | RW, 5: 1 << 12 | RO,
                           260: 33 << 12 | RW}),
    # user root, pinned, vCPU 0's user CR3: user slots and slot 511 (the vsyscall L3)
    6: (Pfinfo.L4TAB_PIN, {0: 2 << 12 | RW, 511: 7 << 12 | RW}),
    # kernel root, not pinned, vCPU 1's CR3
    9: (Pfinfo.L4TAB, {400: 7 << 12 | RW}),
    2: (Pfinfo.L3TAB, {0: 3 << 12 | RW}),
    7: (Pfinfo.L3TAB, {9: NOT_PRESENT_JUNK}),  # empty
    # two L1s, a read-only self-map and a linear entry onto another L2
    3: (Pfinfo.L2TAB, {0: 4 << 12 | RW, 1: 5 << 12 | RW, 2: 3 << 12 | RO, 3: 8 << 12 | RO}),
    8: (Pfinfo.L2TAB_PIN, {0: 5 << 12 | RW}),
    # pfns 10-19, the first five writable; a read-only mapping of L2 pfn 3; a junk entry
    4: (Pfinfo.L1TAB_PIN, {**{i: (10 + i) << 12 | (RW if i < 5 else RO) for i in range(10)},
                           10: 3 << 12 | RO, 11: NOT_PRESENT_JUNK}),
    # pfn 10 three times, writable; a read-only mapping of L1 pfn 4
    5: (Pfinfo.L1TAB, {0: 10 << 12 | RW, 1: 10 << 12 | RW, 2: 10 << 12 | RW, 3: 4 << 12 | RO}),
}
DATA_PFNS = range(10, 20)
CR3S = {0: (1, 6), 1: (9, None)}  # vCPU: (CR3 pfn, user CR3 pfn)

EXPECTED = {
    "tables": {"L1": 2, "L2": 2, "L3": 2, "L4": 3, "total": 9},
    "pinned": {"L1": 1, "L2": 1, "L3": 0, "L4": 2, "total": 4},
    "roots": {"total": 3, "kernel": 2, "user": 1, "pinned": 2, "cr3_not_pinned": 1},
    "present_entries": {"L1": 15, "L2": 5, "L3": 1, "L4": 6, "total": 27},
    "entries_per_table": {"L1": 7.5, "L2": 2.5, "L3": 0.5, "L4": 2.0},
    "empty_tables": {"L1": 0, "L2": 0, "L3": 1, "L4": 0, "total": 1},
    "l1_present": 15,
    "writable_mappings": 8,
    "table_mappings": 2,
    "mapped_frames": 12,
    "linear_entries": 3,
    "self_maps": 2,
    "beyond_domain": 0,
}


def write_synthetic_image(path: Path, extra: dict[int, dict[int, int]] | None = None) -> None:
    """The tree above; `extra` adds entries (table pfn -> {slot: entry})."""
    types = np.full(NR_PAGES, Pfinfo.XALLOC, dtype=np.uint8)
    pages = []
    for pfn in range(NR_PAGES):
        if pfn in TREE:
            kind, entries = TREE[pfn]
            entries = {**entries, **(extra or {}).get(pfn, {})}
            types[pfn] = kind
            page = np.zeros(512, np.uint64)
            for slot, entry in entries.items():
                page[slot] = entry
            pages.append(page.view(np.uint8))
        elif pfn in DATA_PFNS:
            types[pfn] = Pfinfo.NOTAB
            pages.append(np.full(4096, pfn, np.uint8))
    with open_image_for_write(path) as f:
        w = StreamWriter(f)
        w.write_x86_pv_info(8, 4)
        w.write_x86_pv_p2m_frames(0, NR_PAGES - 1, np.array([20], np.uint64))
        w.write_page_data(np.arange(NR_PAGES, dtype=np.uint64), types, np.stack(pages))
        for vcpu, (cr3, user) in CR3S.items():
            ctx = VcpuGuestContext(flags=VGCF_ONLINE)
            ctx.ctrlreg[3] = cr3 << 12
            ctx.ctrlreg[1] = 0 if user is None else 1 | user << 12
            w.write_x86_pv_vcpu_basic(vcpu, ctx)
        w.write_end()


def recount(path: Path) -> dict:
    """The statistics of `pt_stats`, entry by entry in plain Python."""
    tables: dict[int, tuple[int, bool, list[int]]] = {}  # pfn -> level, pinned, entries
    cr3s: set[int] = set()
    nr_pages = None
    with open_image_for_read(path) as f:
        for record in StreamReader(f):
            if isinstance(record, PageDataRecord):
                row = 0
                for pfn, kind, has_data in zip(record.pfns.tolist(), record.types.tolist(),
                                               pfinfo_has_data(record.types).tolist(),
                                               strict=True):
                    level = int(pfinfo_levels(np.array([kind]))[0])
                    if level:
                        entries = record.pages[row].view("<u8").tolist()
                        tables[pfn] = (level, bool(pfinfo_pinned(np.array([kind]))[0]),
                                       entries)
                    row += has_data
            elif isinstance(record, X86PvP2mFramesRecord):
                nr_pages = record.end_pfn + 1
            elif isinstance(record, X86PvVcpuBasicRecord):
                ctx = record.guest_context()
                if ctx.ctrlreg[3]:
                    cr3s.add(ctx.ctrlreg[3] >> 12)
                if ctx.user_table is not None:
                    cr3s.add(ctx.user_table)
    names = ("L1", "L2", "L3", "L4")
    stats = {key: dict.fromkeys(names, 0) for key in ("tables", "pinned", "present_entries",
                                                      "empty_tables")}
    writable = table_maps = linear = self_maps = beyond = 0
    limit = nr_pages if nr_pages is not None else 1 << 26
    mapped: set[int] = set()
    kernel_l4: dict[int, bool] = {}
    for pfn, (level, pinned, entries) in tables.items():
        name = names[level - 1]
        stats["tables"][name] += 1
        stats["pinned"][name] += pinned
        present = 0
        for slot, entry in enumerate(entries):
            if not entry & 1 or (level == 4 and 256 <= slot <= 271):
                continue
            present += 1
            target = (entry >> 12) & ((1 << 40) - 1)
            if level == 4 and 272 <= slot <= 510:
                kernel_l4[pfn] = True
            if target >= limit:
                beyond += 1
                writable += level == 1 and bool(entry & 2)
                continue
            if level == 1:
                writable += bool(entry & 2)
                table_maps += target in tables
                mapped.add(target)
            elif target in tables and tables[target][0] == level:
                linear += 1
                self_maps += target == pfn
        stats["present_entries"][name] += present
        stats["empty_tables"][name] += present == 0
    roots = {p for p, (lvl, pinned, _) in tables.items() if lvl == 4 and pinned} | cr3s
    pinned_l4 = {p for p, (lvl, pinned, _) in tables.items() if lvl == 4 and pinned}
    l4s = {p for p, (lvl, _, _) in tables.items() if lvl == 4}
    for key in ("tables", "pinned", "present_entries", "empty_tables"):
        stats[key]["total"] = sum(stats[key].values())
    return {
        **stats,
        "roots": {"total": len(roots), "kernel": sum(kernel_l4.get(r, False) for r in roots),
                  "user": sum(r in l4s and not kernel_l4.get(r, False) for r in roots),
                  "pinned": len(pinned_l4), "cr3_not_pinned": len(cr3s - pinned_l4)},
        "entries_per_table": {n: round(stats["present_entries"][n] / stats["tables"][n], 2)
                              if stats["tables"][n] else 0.0 for n in names},
        "l1_present": stats["present_entries"]["L1"],
        "writable_mappings": writable,
        "table_mappings": table_maps,
        "mapped_frames": len(mapped),
        "linear_entries": linear,
        "self_maps": self_maps,
        "beyond_domain": beyond,
    }
