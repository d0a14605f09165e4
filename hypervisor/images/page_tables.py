"""A PV image's page tables laid into scratch host memory, ready to validate.

What `hvlab bench revalidate --image` works on: every page-table page of the
image *localised* (pfn p becomes mfn p + 1, since mfn 0 is never a guest's, as
`image verify` does), a fresh frame table in which the domain owns every frame
and nothing is typed (as a new build has it after a live update), and the
image's roots in the order a restore takes them: the `*_PIN` pages in stream
order, then each vCPU's CR3 and user CR3. Data pages are never read by a
validator, so only the tables are copied: memory is the tables plus a frame
table (anonymous MAP_NORESERVE scratch, like verify's).

This trusts the image's structure: `hvlab image verify` is the tool that
explains a bad one. What would make the result meaningless (an entry beyond the
domain, no P2M record, an HVM image) is refused in one line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from emulator.memory import HostMemory
from hypervisor.mm.builds import get_build
from hypervisor.mm.frametable import PGC_ALLOCATED, FrameTable
from hypervisor.mm.pte import (
    ENTRIES_PER_TABLE,
    MFN_FIELD_BITS,
    PTE_ADDR_MASK,
    PTE_PRESENT,
    XEN_L4_FIRST_SLOT,
    XEN_L4_LAST_SLOT,
)
from hypervisor.mm.typerefs import Root
from hypervisor.stream import (
    DomainType,
    PageDataRecord,
    X86PvP2mFramesRecord,
    X86PvVcpuBasicRecord,
    pfinfo_has_data,
)
from hypervisor.stream.framing import PAGE_SIZE

from .common import ImageError, pfinfo_levels, pfinfo_pinned, read_image

DOMID = 1
_MFN_MASK = np.uint64((1 << MFN_FIELD_BITS) - 1)
_U12 = np.uint64(12)


@dataclass
class ImageTables:
    """An image's page tables in scratch memory (mfn = pfn + 1) and its roots."""

    path: str
    nr_pages: int
    host: HostMemory
    frames: FrameTable  # fresh: owned by DOMID, untyped; copy it before validating
    tables: dict[int, np.ndarray]  # level -> scratch mfns of that level's tables
    roots: list[Root]  # pins in stream order, then the vCPUs' CR3s and user CR3s
    pins: int

    @property
    def mem(self) -> np.ndarray:
        return self.host.u64

    @property
    def page_table_frames(self) -> int:
        return sum(int(t.size) for t in self.tables.values())

    def level_of(self) -> np.ndarray:
        """Per scratch frame: the level the image saved it as (0: not a table)."""
        level = np.zeros(self.frames.nr_frames, np.uint8)
        for lvl, mfns in self.tables.items():
            level[mfns] = lvl
        return level


def load_image_tables(path: str | os.PathLike[str], build: str) -> ImageTables:
    """Read the PV image at `path` into scratch memory with a fresh frame table of `build`."""
    host: HostMemory | None = None
    nr_pages: int | None = None
    table_mfns: list[np.ndarray] = []
    table_levels: list[np.ndarray] = []
    pins: list[Root] = []
    cr3s: list[Root] = []
    with read_image(path) as reader:
        if reader.domain_header.type != DomainType.X86_PV:
            raise ImageError(f"{path}: an HVM image: only PV images have page tables to "
                             "revalidate")
        for record in reader:
            match record:
                case X86PvP2mFramesRecord(end_pfn=end):
                    nr_pages = end + 1
                    host = HostMemory((nr_pages + 1) * PAGE_SIZE)
                case PageDataRecord():
                    if host is None or nr_pages is None:
                        raise ImageError(f"{path}: PAGE_DATA before X86_PV_P2M_FRAMES")
                    mfns, levels, pinned = _take_tables(path, record, host, nr_pages)
                    table_mfns.append(mfns)
                    table_levels.append(levels)
                    pins += [Root(m, lvl) for m, lvl in
                             zip(mfns[pinned].tolist(), levels[pinned].tolist(), strict=True)]
                case X86PvVcpuBasicRecord():
                    ctx = record.guest_context()
                    for pfn in (ctx.ctrlreg[3] >> 12 if ctx.ctrlreg[3] else None,
                                ctx.user_table):
                        if pfn is not None and nr_pages is not None and pfn < nr_pages:
                            cr3s.append(Root(pfn + 1, 4, pinned=False))
    if host is None or nr_pages is None:
        raise ImageError(f"{path}: no X86_PV_P2M_FRAMES record: the domain's size is unknown")
    mfns = np.concatenate(table_mfns) if table_mfns else np.empty(0, np.int64)
    levels = np.concatenate(table_levels) if table_levels else np.empty(0, np.uint8)
    frames = FrameTable(nr_pages + 1, get_build(build))
    # What FrameTable.assign does to fresh rows, without its np.unique (image verify's way).
    frames.owner[1:] = DOMID
    frames.count_info[1:] = PGC_ALLOCATED | 1
    tables = {lvl: np.sort(mfns[levels == lvl]) for lvl in (1, 2, 3, 4)}
    return ImageTables(os.fspath(path), nr_pages, host, frames, tables, pins + cr3s, len(pins))


def _take_tables(path: str | os.PathLike[str], record: PageDataRecord, host: HostMemory,
                 nr_pages: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Copy the record's tables, localised, into scratch memory: (mfns, levels, pinned)."""
    levels = pfinfo_levels(record.types)
    is_table = levels > 0
    if not is_table.any():
        return np.empty(0, np.int64), np.empty(0, np.uint8), np.empty(0, bool)
    data_row = np.cumsum(pfinfo_has_data(record.types)) - 1
    entries = record.pages[data_row[is_table]].view("<u8").reshape(-1, ENTRIES_PER_TABLE).copy()
    pfns = record.pfns[is_table].astype(np.int64)
    if int(pfns.max()) >= nr_pages:
        raise ImageError(f"{path}: record PAGE_DATA at offset {record.offset:#x}: a table beyond "
                         "the domain (hvlab image verify explains)")
    table_levels = levels[is_table]
    entries[table_levels == 4, XEN_L4_FIRST_SLOT : XEN_L4_LAST_SLOT + 1] = 0
    present = (entries & np.uint64(PTE_PRESENT)) != 0
    target = (entries >> _U12) & _MFN_MASK
    if (present & (target >= np.uint64(nr_pages))).any():
        raise ImageError(f"{path}: record PAGE_DATA at offset {record.offset:#x}: an entry maps "
                         "a pfn beyond the domain (hvlab image verify explains)")
    localised = (entries & ~np.uint64(PTE_ADDR_MASK)) | ((target + np.uint64(1)) << _U12)
    host.u64.reshape(-1, ENTRIES_PER_TABLE)[pfns + 1] = np.where(present, localised, entries)
    return pfns + 1, table_levels, pfinfo_pinned(record.types)[is_table]
