"""`hvlab image verify`: is an image well formed, and would its page tables validate?

Two parts, in one streaming pass plus a validation:

* **Structure**: every record parses (the stream reader's rules), PV order
  (X86_PV_INFO, X86_PV_P2M_FRAMES before any PAGE_DATA, no PAGE_DATA after a
  vCPU record), END present, PFNs inside the domain and never repeated
  (`stream.check_pfns`), vCPU ids unique, CR3s inside the domain, the
  hypervisor's L4 slots empty, HVLAB_DOMAIN readable.
* **Page tables**, without running anything: the page-table pages are
  *localised* into scratch memory (pfn p becomes mfn p + 1, since mfn 0 is
  never a guest frame) with a scratch frame table, then the `*_PIN` pages are
  pinned and the vCPUs' CR3 references taken, in the order a restore does
  (`mm.rebuild.rebuild_from_roots`: the vectorised validator, every linear
  entry's target validated first). A refused root is
  explained by walking its tree for the entry at fault.

Only page-table pages are copied: data pages are never read as tables by a
valid image, and one that is (a NOTAB page referenced as a table) is itself
reported. Scratch memory is anonymous MAP_NORESERVE, so a 64 GiB image costs
the size of its page tables plus a few bytes per page of bookkeeping.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np

from emulator.memory import HostMemory
from hypervisor.mm.builds import BUILDS, LATEST_BUILD, PageType, get_build
from hypervisor.mm.errors import MmError, errno_name
from hypervisor.mm.frametable import PGC_ALLOCATED, FrameTable
from hypervisor.mm.pte import (
    ENTRIES_PER_TABLE,
    MFN_FIELD_BITS,
    PTE_ADDR_MASK,
    PTE_PRESENT,
    PTE_RW,
    XEN_L4_FIRST_SLOT,
    XEN_L4_LAST_SLOT,
    disallow_mask,
)
from hypervisor.mm.rebuild import rebuild_from_roots
from hypervisor.mm.typerefs import Root
from hypervisor.pv.save import HVLAB_DOMAIN_VERSION
from hypervisor.stream import (
    DomainType,
    EndRecord,
    HvmContextRecord,
    OpaqueRecord,
    PageDataRecord,
    Pfinfo,
    StreamError,
    StreamReader,
    X86PvInfoRecord,
    X86PvP2mFramesRecord,
    X86PvVcpuRecord,
    check_pfns,
    iter_hvm_context,
    open_image_for_read,
    pfinfo_has_data,
)
from hypervisor.stream.framing import PAGE_SIZE
from hypervisor.stream.hvlab_records import HVLAB_DOMAIN_RECORD
from hypervisor.stream.records import X86PvVcpuBasicRecord

from .common import HVLAB_DOMAIN_NAME, ImageError, pfinfo_levels, pfinfo_name, pfinfo_pinned

SCRATCH_DOMID = 1
MAX_VCPUS = 32
# Bookkeeping is ~60 bytes per guest page (frame table, validator, pfn maps):
# 256 GiB guests (3.8 GB) are the most this machine-sized tool takes on.
MAX_PV_PAGES = 1 << 26
MAX_HVM_PFNS = 1 << 26
MAX_PROBLEMS = 50
CULPRITS_PER_ROOT = 3
_ABSENT = 0xFF  # pfn_type of a pfn no PAGE_DATA record carried
_MFN_MASK = np.uint64((1 << MFN_FIELD_BITS) - 1)
_WALK_CHUNK = 2048  # tables per gather while explaining a refused root


@dataclass
class _RootInfo:
    """A root to take, and where the image asked for it (for messages)."""

    root: Root
    what: str
    record: str
    offset: int


@dataclass
class _State:
    path: str
    problems: list[str] = field(default_factory=list)
    dropped: int = 0  # problems beyond MAX_PROBLEMS
    fatal: bool = False  # the stream could not be read to END
    domain_type: DomainType = DomainType.X86_PV
    build: str = LATEST_BUILD
    nr_pages: int | None = None
    seen: np.ndarray | None = None  # bool per pfn
    pfn_type: np.ndarray | None = None  # PFINFO type per pfn (_ABSENT if not in the stream)
    pfn_record: np.ndarray | None = None  # index into record_offsets per pfn
    record_offsets: list[int] = field(default_factory=list)  # PAGE_DATA offsets
    memory: HostMemory | None = None  # scratch: pfn p at mfn p + 1
    frames: FrameTable | None = None  # scratch: what validating the tables left
    p2m_list: np.ndarray | None = None
    p2m_offset: int = 0
    pins: list[_RootInfo] = field(default_factory=list)
    cr3s: list[_RootInfo] = field(default_factory=list)
    vcpu_ids: set[int] = field(default_factory=set)
    vcpu_seen: bool = False
    pv_info_seen: bool = False
    hvlab_seen: bool = False
    pages: int = 0
    tables: int = 0
    max_pfn: int = -1
    explained: set[tuple[str, int, str]] = field(default_factory=set)  # culprits reported

    def problem(self, message: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(message)
        else:
            self.dropped += 1

    def at(self, record: str, offset: int, message: str) -> None:
        where = f"record {record}" + (f" at offset {offset:#x}" if offset >= 0 else "")
        self.problem(f"{where}: {message}")

    def table_offset(self, pfn: int) -> int:
        """Offset of the PAGE_DATA record that carried `pfn` (-1: none did)."""
        assert self.pfn_record is not None and self.pfn_type is not None
        if self.pfn_type[pfn] == _ABSENT:
            return -1
        return self.record_offsets[int(self.pfn_record[pfn])]


def image_verify(path: str | os.PathLike[str], out: TextIO | None = None) -> dict[str, Any]:
    """Check `path`'s structure and page tables; print the verdict to `out`.

    Returns ``{"ok": bool, "problems": [one line each], ...statistics}``; a bad
    image is not an exception (the CLI exits 2 when not ok). ImageError only
    for a file that cannot be opened at all, or a domain too large to check.
    """
    result, _st = _verify(path)
    _print(result, sys.stdout if out is None else out)
    return result


def image_typerefs(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pfn of a PV image: page type (0 when unreferenced), type count and pin, as
    validating the image's own tables from its pins and CR3s leaves them: the typerefs
    recomputed from the image alone. ImageError if the image does not verify."""
    result, st = _verify(path)
    if not result["ok"] or st.frames is None:
        raise ImageError(f"{path}: does not verify: {(result['problems'] or ['no tables'])[0]}")
    layout = st.frames.layout
    ti = st.frames.type_info[1:]
    counts = layout.count_of(ti).astype(np.int64)
    types = np.where(counts > 0, layout.type_of(ti), 0).astype(np.uint8)
    return types, counts, st.frames.pinned()[1:]


def _verify(path: str | os.PathLike[str]) -> tuple[dict[str, Any], _State]:
    st = _State(path=os.fspath(path))
    try:
        f = open_image_for_read(path)
    except OSError as err:
        raise ImageError(f"{path}: {err.strerror or err}") from None
    with f:
        try:
            reader = StreamReader(f, keep=frozenset({HVLAB_DOMAIN_RECORD}))
            st.domain_type = reader.domain_header.type
            version = f"{reader.domain_header.xen_major}.{reader.domain_header.xen_minor}"
            st.build = version if version in BUILDS else LATEST_BUILD
            for record in reader:
                _take(st, record)
                if isinstance(record, EndRecord):
                    break
        except _Stop:
            st.fatal = True
        except StreamError as err:
            st.problem(str(err))
            st.fatal = True
        except OSError as err:
            st.problem(f"read error: {err.strerror or err}")
            st.fatal = True
    stats: dict[str, Any] = {}
    if not st.fatal:
        _check_end_of_stream(st)
        if st.domain_type == DomainType.X86_PV and st.memory is not None:
            stats = _validate_tables(st)
    if st.dropped:
        st.problems.append(f"... and {st.dropped} more problems")
    result = {
        "path": st.path,
        "ok": not st.problems,
        "problems": st.problems,
        "domain_type": "pv" if st.domain_type == DomainType.X86_PV else "hvm",
        "nr_pages": st.nr_pages if st.domain_type == DomainType.X86_PV else st.max_pfn + 1,
        "pages_in_stream": st.pages,
        "page_tables": st.tables,
        "pins": len(st.pins),
        "cr3_refs": len(st.cr3s),
        **stats,
    }
    return result, st


def _print(result: dict[str, Any], out: TextIO) -> None:
    if result["ok"]:
        extra = ""
        if "tables_validated" in result:
            extra = (f", {result['tables_validated']:,} page tables validated from "
                     f"{result['pins']:,} pins and {result['cr3_refs']} CR3s")
        out.write(f"{result['path']}: ok ({result['pages_in_stream']:,} pages{extra})\n")
        return
    out.write(f"{result['path']}: {len(result['problems'])} problem(s)\n")
    for line in result["problems"]:
        out.write(f"  {line}\n")


# --------------------------------------------------------------------------- streaming pass


def _take(st: _State, record: object) -> None:
    pv = st.domain_type == DomainType.X86_PV
    match record:
        case X86PvInfoRecord(guest_width=width, pt_levels=levels):
            st.pv_info_seen = True
            if (width, levels) != (8, 4):
                st.at("X86_PV_INFO", record.offset,
                      f"guest width {width} with {levels} levels: hvlab runs 64-bit 4-level guests")
        case X86PvP2mFramesRecord():
            _p2m_frames(st, record)
        case PageDataRecord():
            if st.vcpu_seen:
                st.at("PAGE_DATA", record.offset, "page data after the vCPU records")
            if pv and st.nr_pages is None:
                st.at("PAGE_DATA", record.offset,
                      "page data before X86_PV_P2M_FRAMES: the domain's size is unknown")
                st.fatal = True
                raise _Stop
            if not pv:
                _grow(st, int(record.pfns.max()) + 1)
            _page_data(st, record)
        case X86PvVcpuBasicRecord():
            st.vcpu_seen = True
            _vcpu(st, record)
        case X86PvVcpuRecord():
            st.vcpu_seen = True
        case HvmContextRecord(blob=blob):
            st.vcpu_seen = True
            try:
                for _entry in iter_hvm_context(blob):
                    pass
            except StreamError as err:
                st.at("HVM_CONTEXT", record.offset, str(err))
        case OpaqueRecord(type=rtype, body=body) if rtype == HVLAB_DOMAIN_RECORD:
            st.hvlab_seen = True
            try:
                state = json.loads(body)
                if not isinstance(state, dict):
                    raise ValueError("not a JSON object")
                if state.get("version") != HVLAB_DOMAIN_VERSION:
                    raise ValueError(f"version {state.get('version')!r}, expected "
                                     f"{HVLAB_DOMAIN_VERSION}")
            except (ValueError, UnicodeDecodeError) as err:
                st.at(HVLAB_DOMAIN_NAME, record.offset, f"unreadable: {err}")


class _Stop(StreamError):
    """Reading on cannot tell anything more (the problem is already recorded)."""

    def __init__(self) -> None:
        super().__init__("stop")


def _setup(st: _State, nr_pages: int, *, scratch: bool) -> None:
    st.nr_pages = nr_pages
    st.seen = np.zeros(nr_pages, dtype=bool)
    st.pfn_type = np.full(nr_pages, _ABSENT, dtype=np.uint8)
    st.pfn_record = np.zeros(nr_pages, dtype=np.uint32)
    if scratch:
        st.memory = HostMemory((nr_pages + 1) * PAGE_SIZE)


def _grow(st: _State, needed: int) -> None:
    """HVM streams do not say the domain's size: the pfn maps grow with the pfns seen."""
    size = 0 if st.nr_pages is None else st.nr_pages
    if needed <= size or size >= MAX_HVM_PFNS:
        return
    new = min(max(1 << (needed - 1).bit_length(), 1 << 16), MAX_HVM_PFNS)
    seen, pfn_type, pfn_record = st.seen, st.pfn_type, st.pfn_record
    _setup(st, new, scratch=False)
    if seen is not None and pfn_type is not None and pfn_record is not None:
        assert st.seen is not None and st.pfn_type is not None and st.pfn_record is not None
        st.seen[:size] = seen
        st.pfn_type[:size] = pfn_type
        st.pfn_record[:size] = pfn_record


def _p2m_frames(st: _State, record: X86PvP2mFramesRecord) -> None:
    where = ("X86_PV_P2M_FRAMES", record.offset)
    if st.nr_pages is not None:
        st.at(*where, "a second X86_PV_P2M_FRAMES record")
        return
    if record.start_pfn != 0:
        st.at(*where, f"p2m range starts at pfn {record.start_pfn:#x}, not 0")
    nr_pages = record.end_pfn + 1
    if nr_pages > MAX_PV_PAGES:
        raise ImageError(
            f"{st.path}: record X86_PV_P2M_FRAMES at offset {record.offset:#x}: a domain of "
            f"{nr_pages:#x} pages is larger than image verify checks "
            f"({MAX_PV_PAGES * PAGE_SIZE >> 30} GiB)")
    _setup(st, nr_pages, scratch=True)
    beyond = np.flatnonzero(record.p2m_pfns >= np.uint64(nr_pages))
    if beyond.size:
        i = int(beyond[0])
        st.at(*where, f"P2M list frame {i} is pfn {int(record.p2m_pfns[i]):#x}, beyond the "
                      f"domain's {nr_pages:#x} pages")
    st.p2m_list = record.p2m_pfns[record.p2m_pfns < np.uint64(nr_pages)].astype(np.int64)
    st.p2m_offset = record.offset


def _page_data(st: _State, record: PageDataRecord) -> None:
    assert st.seen is not None and st.pfn_type is not None and st.pfn_record is not None
    assert st.nr_pages is not None
    pfns, types = record.pfns, record.types
    try:
        check_pfns(pfns, st.nr_pages, st.seen, offset=record.offset)
        ok = np.ones(pfns.size, dtype=bool)
    except StreamError as err:
        ok = pfns < np.uint64(st.nr_pages)
        ok[ok] = ~st.seen[pfns[ok]]
        first = np.zeros(pfns.size, dtype=bool)
        first[np.unique(pfns, return_index=True)[1]] = True
        ok &= first
        more = int((~ok).sum()) - 1
        st.problem(f"{err}" + (f" (and {more} more bad pfns in this record)" if more > 0 else ""))
        st.seen[pfns[ok]] = True
    good = pfns[ok].astype(np.int64)
    st.pages += int(good.size)
    if good.size:
        st.max_pfn = max(st.max_pfn, int(good.max()))
    st.pfn_type[good] = types[ok]
    st.pfn_record[good] = len(st.record_offsets)
    st.record_offsets.append(record.offset)

    levels = pfinfo_levels(types)
    bad_kind = np.isin(types, (Pfinfo.BROKEN, Pfinfo.XTAB))
    if bad_kind.any():
        i = int(np.flatnonzero(bad_kind)[0])
        st.at("PAGE_DATA", record.offset,
              f"pfn {int(pfns[i]):#x} is {pfinfo_name(int(types[i]))}: it cannot be restored")
    if st.domain_type != DomainType.X86_PV:
        if (levels > 0).any():
            i = int(np.flatnonzero(levels > 0)[0])
            st.at("PAGE_DATA", record.offset, f"pfn {int(pfns[i]):#x} is "
                  f"{pfinfo_name(int(types[i]))}: HVM guests have no PV page tables")
        return
    tables = ok & (levels > 0)
    if not tables.any():
        return
    data_row = np.cumsum(pfinfo_has_data(types)) - 1
    rows = record.pages[data_row[tables]].view("<u8").reshape(-1, ENTRIES_PER_TABLE)
    table_pfns = pfns[tables].astype(np.int64)
    st.tables += int(table_pfns.size)
    entries = _localise(st, record.offset, rows, table_pfns, levels[tables])
    assert st.memory is not None
    st.memory.u64.reshape(-1, ENTRIES_PER_TABLE)[table_pfns + 1] = entries
    pinned = tables & pfinfo_pinned(types)
    for pfn, level in zip(pfns[pinned].tolist(), levels[pinned].tolist(), strict=True):
        st.pins.append(_RootInfo(Root(pfn + 1, level), f"pin of L{level} pfn {pfn:#x}",
                                 "PAGE_DATA", record.offset))


def _localise(st: _State, offset: int, rows: np.ndarray, pfns: np.ndarray,
              levels: np.ndarray) -> np.ndarray:
    """Entries with each present PFN replaced by its scratch MFN (pfn + 1)."""
    assert st.nr_pages is not None and st.pfn_type is not None
    entries = rows.astype(np.uint64)
    l4 = levels == 4
    if l4.any():
        xen = entries[l4, XEN_L4_FIRST_SLOT : XEN_L4_LAST_SLOT + 1]
        for r, c in np.argwhere(xen != 0)[:CULPRITS_PER_ROOT]:
            pfn = int(pfns[np.flatnonzero(l4)[r]])
            st.at("PAGE_DATA", offset, f"L4 pfn {pfn:#x} slot {XEN_L4_FIRST_SLOT + c} is not "
                  "zero: slots 256-271 belong to the hypervisor")
        entries[np.ix_(l4, np.arange(XEN_L4_FIRST_SLOT, XEN_L4_LAST_SLOT + 1))] = 0
    present = (entries & np.uint64(PTE_PRESENT)) != 0
    target = (entries >> np.uint64(12)) & _MFN_MASK
    beyond = present & (target >= np.uint64(st.nr_pages))
    if beyond.any():
        for r, c in np.argwhere(beyond)[:CULPRITS_PER_ROOT]:
            st.at("PAGE_DATA", offset,
                  f"pfn {int(pfns[r]):#x} ({pfinfo_name(int(st.pfn_type[pfns[r]]))}) slot {c} "
                  f"maps pfn {int(target[r, c]):#x}, beyond the domain's {st.nr_pages:#x} pages")
        entries[beyond] = 0  # reported once here, not again by validation
        present &= ~beyond
    localised = (entries & ~np.uint64(PTE_ADDR_MASK)) | ((target + np.uint64(1)) << np.uint64(12))
    return np.where(present, localised, entries)


def _vcpu(st: _State, record: X86PvVcpuBasicRecord) -> None:
    where = ("X86_PV_VCPU_BASIC", record.offset)
    vid = record.vcpu_id
    if not 0 <= vid < MAX_VCPUS:
        st.at(*where, f"vCPU id {vid} is outside 0..{MAX_VCPUS - 1}")
        return
    if vid in st.vcpu_ids:
        st.at(*where, f"vCPU {vid} appears twice")
        return
    st.vcpu_ids.add(vid)
    try:
        ctx = record.guest_context()
    except StreamError as err:
        st.problem(str(err))
        return
    if ctx.ctrlreg[3] == 0:
        st.at(*where, f"vCPU {vid} has no CR3")
    for pfn, what in ((ctx.ctrlreg[3] >> 12 if ctx.ctrlreg[3] else None, "CR3"),
                      (ctx.user_table, "user CR3")):
        if pfn is None:
            continue
        if st.nr_pages is None or pfn >= st.nr_pages:
            st.at(*where, f"vCPU {vid} {what} is pfn {pfn:#x}, beyond the domain")
            continue
        st.cr3s.append(_RootInfo(Root(pfn + 1, 4, pinned=False),
                                 f"vCPU {vid} {what} (L4 pfn {pfn:#x})", *where))


def _check_end_of_stream(st: _State) -> None:
    if st.domain_type != DomainType.X86_PV:
        return
    if not st.pv_info_seen:
        st.problem("record X86_PV_INFO: missing")
    if st.nr_pages is None:
        st.problem("record X86_PV_P2M_FRAMES: missing")
        return
    assert st.seen is not None and st.p2m_list is not None
    absent = st.p2m_list[~st.seen[st.p2m_list]]
    if absent.size:
        st.at("X86_PV_P2M_FRAMES", st.p2m_offset,
              f"P2M list pfn {int(absent[0]):#x} is in no PAGE_DATA record")
    if not st.hvlab_seen:
        st.problem(f"record {HVLAB_DOMAIN_NAME}: missing; hvlab's restore needs it (it names "
                   "the start_info and shared_info pfns, docs/images.md)")


# --------------------------------------------------------------------------- page tables


def _validate_tables(st: _State) -> dict[str, Any]:
    assert st.memory is not None and st.nr_pages is not None and st.pfn_type is not None
    frames = st.frames = FrameTable(st.nr_pages + 1, get_build(st.build))
    # What FrameTable.assign does to fresh rows (allocated, the allocation's
    # reference, owned, untyped), without its np.unique: numpy 2's hash-based
    # unique takes ~1 us per element, 15 s for a 64 GiB guest.
    frames.owner[1:] = SCRATCH_DOMID
    frames.count_info[1:] = PGC_ALLOCATED | 1
    roots = st.pins + st.cr3s
    try:
        saved_levels = pfinfo_levels(st.pfn_type).astype(np.int64)
        table_pfns = np.flatnonzero(saved_levels)  # scratch mfn = pfn + 1
        result = rebuild_from_roots(st.memory.u64, frames, SCRATCH_DOMID, [r.root for r in roots],
                                    (table_pfns + 1, saved_levels[table_pfns]))
    except MmError as err:
        st.problem(f"page tables could not be validated: {err}")
        return {}
    if result.failures:
        mem2d = st.memory.u64.reshape(-1, ENTRIES_PER_TABLE)
        for failure in result.failures:
            _explain(st, roots[failure.index], failure.rc, mem2d, frames)

    # Every frame in use as a table must have been saved as one of that level.
    layout = frames.layout
    ti = frames.type_info[1:]
    used = np.where(layout.count_of(ti) > 0, layout.type_of(ti), 0)
    used = np.where((used >= PageType.L1) & (used <= PageType.L4), used, 0).astype(np.uint8)
    saved = pfinfo_levels(st.pfn_type)
    wrong = (used > 0) & (used != saved) & ~np.isin(st.pfn_type, (Pfinfo.XALLOC, _ABSENT))
    for pfn in np.flatnonzero(wrong)[:CULPRITS_PER_ROOT].tolist():
        st.at("PAGE_DATA", st.table_offset(pfn),
              f"pfn {pfn:#x} is used as an L{int(used[pfn])} table but saved as "
              f"{pfinfo_name(int(st.pfn_type[pfn]))}")
    if int(wrong.sum()) > CULPRITS_PER_ROOT:
        st.problem(f"... {int(wrong.sum()) - CULPRITS_PER_ROOT} more pages used as tables of "
                   "another level than saved")
    return {
        "tables_validated": int((used > 0).sum()),
        "unreferenced_tables": int(((saved > 0) & (used == 0)).sum()),
        "refused_roots": len(result.failures),
        "validation_passes": result.passes,
    }


def _explain(st: _State, info: _RootInfo, rc: int, mem2d: np.ndarray,
             frames: FrameTable) -> None:
    """Report a refused root by the entries in its tree that the rules refuse."""
    culprits = _Walk(st, mem2d, frames, info).culprits()[:CULPRITS_PER_ROOT]
    refused = f"{info.what} refused ({errno_name(rc)})"
    new = [c for c in culprits if c not in st.explained]
    if not new:  # nothing found, or the same entries as an earlier root's
        st.at(info.record, info.offset, refused + ("" if not culprits else
                                                   " (by the entries reported above)"))
    for record, offset, message in new:
        st.explained.add((record, offset, message))
        st.at(record, offset, f"{message}; {refused}")


class _Walk:
    """The tree under one root, level by level, looking for what validation refuses.

    The frame table holds what the roots validated before this one left; the
    walk adds what this root's own tree asks for.
    """

    def __init__(self, st: _State, mem2d: np.ndarray, frames: FrameTable,
                 info: _RootInfo) -> None:
        self.st = st
        self.mem2d = mem2d
        self.frames = frames
        self.info = info
        self.root = info.root
        layout = frames.layout
        self.n = frames.nr_frames
        counted = layout.count_of(frames.type_info) > 0
        self.type_now = np.where(counted, layout.type_of(frames.type_info), 0).astype(np.uint8)
        self.found: list[tuple[str, int, str]] = []  # (record, offset, message)

    def _name(self, mfn: int) -> str:
        assert self.st.pfn_type is not None
        pfn = mfn - 1
        return f"pfn {pfn:#x} ({pfinfo_name(int(self.st.pfn_type[pfn]))})"

    def _culprit(self, table_mfn: int, message: str) -> None:
        self.found.append(("PAGE_DATA", self.st.table_offset(table_mfn - 1), message))

    def _entries(self, tables: np.ndarray, level: int):
        """(table, slot, entry, target mfn) of the present guest entries of `tables`."""
        for start in range(0, tables.size, _WALK_CHUNK):
            chunk = tables[start : start + _WALK_CHUNK]
            e = self.mem2d[chunk]
            present = (e & np.uint64(PTE_PRESENT)) != 0
            if level == 4:
                present[:, XEN_L4_FIRST_SLOT : XEN_L4_LAST_SLOT + 1] = False
            rows, slots = np.nonzero(present)
            entries = e[rows, slots]
            yield chunk[rows], slots, entries, ((entries >> np.uint64(12)) & _MFN_MASK).astype(
                np.int64)

    def culprits(self) -> list[tuple[str, int, str]]:
        root = self.root
        if self.type_now[root.mfn] not in (0, root.level):
            have = PageType(int(self.type_now[root.mfn])).name
            self.found.append((self.info.record, self.info.offset,
                               f"{self._name(root.mfn)} is already in use as {have}"))
        tables: dict[int, np.ndarray] = {root.level: np.array([root.mfn], dtype=np.int64)}
        writable: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for level in range(root.level, 0, -1):
            t = np.unique(tables.get(level, np.empty(0, np.int64)))
            tables[level] = t
            below: list[np.ndarray] = []
            for table, slot, entry, target in self._entries(t, level):
                self._bad_flags(level, table, slot, entry)
                rw = (entry & np.uint64(PTE_RW)) != 0
                if level == 1:
                    writable.append((table[rw], slot[rw], target[rw]))
                    continue
                linear = (target == table) | np.isin(target, t) | (self.type_now[target] == level)
                for i in np.flatnonzero(linear & rw)[:CULPRITS_PER_ROOT]:
                    self._culprit(int(table[i]), f"{self._name(int(table[i]))} slot {slot[i]} "
                                  f"maps L{level} {self._name(int(target[i]))} writable "
                                  "(a linear entry must be read-only)")
                child = ~linear
                have = self.type_now[target]
                clash = child & (have != 0) & (have != level - 1)
                for i in np.flatnonzero(clash)[:CULPRITS_PER_ROOT]:
                    self._culprit(int(table[i]), f"{self._name(int(table[i]))} slot {slot[i]} "
                                  f"references {self._name(int(target[i]))} as an L{level - 1} "
                                  f"table, but it is in use as {PageType(int(have[i])).name}")
                below.append(target[child])
            if level > 1:
                tables[level - 1] = np.concatenate(below) if below else np.empty(0, np.int64)
        self._level_clashes(tables)
        self._writable_tables(tables, writable)
        return self.found

    def _bad_flags(self, level: int, table: np.ndarray, slot: np.ndarray,
                   entry: np.ndarray) -> None:
        bad = (entry & np.uint64(disallow_mask(level))) != 0
        for i in np.flatnonzero(bad)[:CULPRITS_PER_ROOT]:
            flags = int(entry[i]) & disallow_mask(level)
            self._culprit(int(table[i]), f"{self._name(int(table[i]))} slot {slot[i]} has "
                          f"flags {flags:#x} that an L{level} entry may not use")

    def _level_clashes(self, tables: dict[int, np.ndarray]) -> None:
        for upper in (4, 3, 2):
            for lower in range(upper - 1, 0, -1):
                both = np.intersect1d(tables.get(upper, []), tables.get(lower, []))
                for mfn in both[:CULPRITS_PER_ROOT].tolist():
                    self._culprit(mfn, f"{self._name(mfn)} is used as both an L{upper} and an "
                                  f"L{lower} table")

    def _writable_tables(self, tables: dict[int, np.ndarray],
                         writable: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
        if not writable:
            return
        table = np.concatenate([w[0] for w in writable])
        slot = np.concatenate([w[1] for w in writable])
        target = np.concatenate([w[2] for w in writable])
        level_of = np.zeros(self.n, dtype=np.uint8)
        for level, t in tables.items():
            level_of[t] = level
        now = self.type_now[target]
        walked = level_of[target]
        is_table = (walked > 0) | ((now >= PageType.L1) & (now <= PageType.L4))
        other = (now != 0) & (now != PageType.WRITABLE) & ~is_table
        for i in np.flatnonzero(is_table | other)[:CULPRITS_PER_ROOT]:
            kind = (f"an L{int(walked[i])} table" if walked[i] else
                    f"in use as {PageType(int(now[i])).name}")
            self._culprit(int(table[i]), f"{self._name(int(table[i]))} slot {slot[i]} maps "
                          f"{self._name(int(target[i]))} writable, but it is {kind}")
