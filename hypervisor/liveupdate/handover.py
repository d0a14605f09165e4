"""The live-update hand-over: migration-stream v2 records, memory left in place.

Guest memory does not travel: instead of PAGE_DATA (which must carry page
contents for typed pages), `HVLAB_FRAMES` records give the pfn->mfn map as
runs of consecutive frames (a handful for a whole guest) and `HVLAB_TABLES`
records the PFINFO type of every page-table pfn (PAGE_DATA's pfn-word format),
so the hand-over grows with page tables, not with memory. vCPU contexts carry
CR3s as MFNs (nothing is normalised). For the `transfer` strategy,
`HVLAB_TYPEINFO` records carry every frame's type_info, count_info and linear
count in the *old* build's layout, as runs of pfns with equal rows (most of a
guest's RAM is alike: a data page mapped writable once). Everything else Xen's records do not hold
is in `HVLAB_DOMAIN` (as in saved images). A CPL-3 domain's (Linux) vCPU state is
in X86_PV_VCPU_BASIC as in a saved image (set_gdt's frames as PFNs, the one thing
normalised); the hypervisor pages a PV domain owns outside its P2M (its shared_info
under the CPL-3 ABI, grant frames) stay in place, listed in `HVLAB_DOMAIN`'s
`kept_pages` with their type state in the old layout.
A manifest (JSON) names the streams and the machine-level state.

The bulk of a PV domain's hand-over (P2M frames, ownership runs, page-table
list) changes rarely, so it can be sent ahead, while the guests still run:
`write_precopy` writes it as `domN.precopy` and the frame table starts logging
which frames' type state the typing rules change (`FrameTable.type_log`). A
blackout stream then only names that stream in its `HVLAB_DOMAIN` (`precopy`),
and its `HVLAB_TABLES` records are a delta: the PFINFO type now of every pfn
whose type state changed since (NOTAB: no longer a page table). No hypercall
changes a PV domain's frames after it is built, so ownership sent ahead stays
true.

HVM domains (domain type 2) carry, in this order: `HVLAB_DOMAIN` (as in saved
HVM images, plus `posted_mfn`: the frame of the vCPUs' posted-interrupt
descriptors, which the new build adopts in place), `HVLAB_FRAMES` runs of the
*backed* gfns (PoD gfns not populated have none and stay PoD), `HVLAB_P2M`
(the p2m type and access of every gfn as runs, the log-dirty flag and dirty
gfns), then `X86_TSC_INFO`, `HVM_CONTEXT` (CPU, LAPIC, LAPIC_REGS) and
`HVM_PARAMS`. No page contents, and no EPT: the new build rebuilds it from the
P2M in its own layout. They are never sent ahead.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from emulator.addr import PAGE_SIZE
from hypervisor.core.hypervisor import TSC_KHZ
from hypervisor.hvm.ept import INVALID_MFN
from hypervisor.hvm.image import HVM_PARAM_PAE_ENABLED, hvm_handover_state
from hypervisor.hvm.p2m import P2M, P2MError, P2MState
from hypervisor.lib.errors import HvlabError, SaveError
from hypervisor.lib.extents import runs_of
from hypervisor.pv.save import (
    classify_pages,
    domain_state,
    p2m_frame_pfns,
    table_pfinfo,
    vcpu_context,
)
from hypervisor.pv.xen import image as xen_image
from hypervisor.stream import (
    DomainType,
    EndRecord,
    OpaqueRecord,
    Pfinfo,
    StreamError,
    StreamReader,
    StreamWriter,
    X86PvP2mFramesRecord,
    X86PvVcpuBasicRecord,
)
from hypervisor.stream.hvlab_records import (
    HVLAB_DOMAIN_RECORD,
    HVLAB_FRAMES_RECORD,
    HVLAB_P2M_RECORD,
    HVLAB_TABLES_RECORD,
    HVLAB_TYPEINFO_RECORD,
)
from hypervisor.stream.vcpu_context import VcpuGuestContext

if TYPE_CHECKING:
    from hypervisor.core.domain import Domain
    from hypervisor.core.hypervisor import Hypervisor

FRAMES_PER_RECORD = 1 << 20  # keeps each record far below the 128 MiB record limit
_COUNT = struct.Struct("<Q")
PFN_MASK = (1 << 52) - 1
MANIFEST = "manifest.json"


class HandoverError(HvlabError):
    pass


@dataclass
class DomainMemory:
    """A PV domain's frames and page tables, as a stream gives them."""

    p2m: np.ndarray  # pfn -> mfn
    tables: np.ndarray  # HVLAB_TABLES words (pfn | PFINFO type << 60), ascending pfn
    entries: int  # ownership runs + page tables read: what reading it cost
    changed: int = 0  # page tables added, removed or retyped by a delta on a list sent ahead


@dataclass
class DomainHandover:
    """One domain as the new build reads it."""

    meta: dict[str, Any]
    p2m: np.ndarray
    tables: np.ndarray  # as DomainMemory.tables (none for HVM)
    contexts: dict[int, VcpuGuestContext] = field(default_factory=dict)
    # transfer: (first pfn, count, type_info in the old layout, count_info, linear count)
    type_runs: np.ndarray | None = None
    kind: str = "pv"
    # HVM: the P2M rebuilt from the stream (no EPT yet), the descriptors' frame, and the
    # records the new build restores vCPUs and devices from
    hvm_p2m: P2M | None = None
    posted_mfn: int | None = None
    hvm_records: list[Any] = field(default_factory=list)
    tables_changed: int = 0  # page tables that changed since the hand-over sent ahead
    # ownership runs and page tables read from disk, in the blackout, from a stream sent
    # ahead (none when the new build read it before the pause)
    entries_read: int = 0


def frames_in_use(dom: Domain) -> np.ndarray:
    """The host frames a domain keeps across an update: its RAM and, for HVM, the
    posted-interrupt descriptors (hardware keeps posting into them); for PV, the
    hypervisor pages it owns (`kept_pages`)."""
    if dom.hvm is None:
        return np.concatenate([dom.p2m, kept_pages(dom)])
    mfns = dom.p2m[dom.p2m != INVALID_MFN]
    return np.append(mfns, np.uint64(dom.hvm.posted_mfn))


def kept_pages(dom: Domain) -> np.ndarray:
    """Hypervisor pages a PV domain owns outside its P2M, kept in place with their
    contents: a CPL-3 domain's shared_info page (Xen's, not a guest frame) and its
    grant-table frames. The guest maps them, so they carry its general references."""
    pages = [] if dom.hvm is not None or not xen_image.is_xen_abi(dom) else [dom.shared_info_mfn]
    if dom.grant_table is not None:
        pages += dom.grant_table.frames
    return np.array(pages, dtype=np.uint64)


def kept_pages_meta(hv: Hypervisor, dom: Domain) -> dict[str, Any]:
    """HVLAB_DOMAIN's `kept_pages` part (machine frames: memory stays in place), with each
    page's type state in the old build's layout (for `transfer`)."""
    pages = kept_pages(dom).astype(np.int64)
    ft = hv.frame_table
    table = dom.grant_table
    return {
        "shared_info_mfn": int(dom.shared_info_mfn) if xen_image.is_xen_abi(dom) else None,
        "grant_table": None if table is None else {
            "max_frames": table.max_frames, "frames": list(table.frames),
            "version": table.version},
        # [mfn, type_info, count_info, linear count] per page
        "type_state": [[int(m), int(ft.type_info[m]), int(ft.count_info[m]),
                        int(ft.linear_pt_count[m])] for m in pages.tolist()],
    }


def handed_over_pages(meta: dict[str, Any]) -> np.ndarray:
    """The hypervisor pages a PV hand-over keeps in place (`kept_pages`, as mfns)."""
    kept = meta.get("kept_pages") or {}
    return np.array([row[0] for row in kept.get("type_state", [])], dtype=np.uint64)


def write_precopy(hv: Hypervisor, directory: Path) -> tuple[dict[int, str], dict[str, int]]:
    """Before the pause: every PV domain's frames and page tables, sent ahead.

    Returns the streams written (domid -> name) and counters. From here on the
    frame table logs which frames' type state changes (`type_log`).
    """
    directory.mkdir(parents=True, exist_ok=True)
    start_type_log(hv)
    names: dict[int, str] = {}
    counters = {"precopy_bytes": 0, "precopy_entries": 0}
    for dom in hv.domains:
        if dom.hvm is not None:
            continue
        names[dom.domid] = f"dom{dom.domid}.precopy"
        with (directory / names[dom.domid]).open("wb") as f:
            w = _pv_writer(f, hv)
            runs = _write_frames(w, hv, dom)
            tables = _write_tables(w, hv, dom)
            w.write_record(HVLAB_DOMAIN_RECORD, json.dumps({"precopy_of": dom.name}).encode())
            w.write_end()
        counters["precopy_bytes"] += w.offset
        counters["precopy_entries"] += runs + tables
    return names, counters


def start_type_log(hv: Hypervisor) -> None:
    """Log type changes from now on (unless logging already)."""
    if hv.frame_table.type_log is None:
        hv.frame_table.type_log = set()


def logged_frames(hv: Hypervisor) -> np.ndarray:
    """The frames whose type state changed since logging began, ascending."""
    return np.array(sorted(hv.frame_table.type_log or ()), dtype=np.int64)


def changed_domains(hv: Hypervisor) -> set[int]:
    """The domains that own a frame whose type state changed since logging began."""
    return {int(d) for d in np.unique(hv.frame_table.owner[logged_frames(hv)])}


def read_precopy(directory: Path, name: str) -> DomainMemory:
    """The new build reads a stream sent ahead (StreamError names record and offset)."""
    path = directory / name
    try:
        with path.open("rb") as f:
            parts = _collect(StreamReader(f, keep=_KEPT))
        return _memory(parts, None)
    except (StreamError, OSError) as err:
        raise HandoverError(f"hand-over stream {name}: {err}") from None


def write_handover(hv: Hypervisor, directory: Path, with_type_state: bool,
                   precopied: dict[int, str] | None = None) -> dict[str, Any]:
    """The old build writes every domain's stream and the manifest; returns counters.

    A domain in `precopied` refers to its stream sent ahead for frames and tables
    and carries only the tables that changed since (`FrameTable.type_log`).
    """
    directory.mkdir(parents=True, exist_ok=True)
    streams = []
    counters = {"handover_bytes": 0, "handover_frames": 0, "handover_entries": 0,
                "domains_precopied": 0}
    logged = logged_frames(hv)
    for dom in hv.domains:
        path = directory / f"dom{dom.domid}.stream"
        ahead = (precopied or {}).get(dom.domid)
        changed = logged[hv.frame_table.owner[logged] == dom.domid]
        changed = changed[np.isin(changed, dom.p2m)]  # hypervisor pages go in kept_pages
        with path.open("wb") as f:
            written, entries = _write_domain(f, hv, dom, with_type_state, ahead, changed)
        counters["handover_bytes"] += written
        counters["handover_entries"] += entries
        counters["handover_frames"] += dom.nr_pages
        counters["domains_precopied"] += ahead is not None
        streams.append(path.name)
    manifest = {"build": hv.build, "virtual_ns": hv.now, "streams": streams,
                "machine": {"pcpus": hv.machine.pcpus, "memory": hv.machine.memory,
                            "quantum_ns": hv.machine.quantum_ns}}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return counters


def _pv_writer(f, hv: Hypervisor) -> StreamWriter:
    major, minor = hv.build_version
    w = StreamWriter(f, DomainType.X86_PV, xen_major=major, xen_minor=minor)
    w.write_x86_pv_info(8, 4)
    return w


def _write_frames(w: StreamWriter, hv: Hypervisor, dom: Domain) -> int:
    """X86_PV_P2M_FRAMES and the ownership runs; returns how many runs."""
    w.write_x86_pv_p2m_frames(0, dom.nr_pages - 1, _p2m_list_pfns(hv, dom))
    runs = runs_of(dom.p2m)
    if runs is None:  # fragmented: every frame its own run (correct, only larger)
        runs = np.stack([np.arange(dom.nr_pages), dom.p2m.astype(np.int64),
                         np.ones(dom.nr_pages, np.int64)], axis=1)
    for start in range(0, len(runs), FRAMES_PER_RECORD):
        chunk = runs[start : start + FRAMES_PER_RECORD]
        w.write_record(HVLAB_FRAMES_RECORD,
                       _COUNT.pack(len(chunk)) + chunk.astype("<u8").tobytes())
    return len(runs)


def _p2m_list_pfns(hv: Hypervisor, dom: Domain) -> np.ndarray:
    """The pfns of the guest's P2M list. Early in a Linux boot, before Linux published
    its own list in shared_info (a save refuses then), the live list is still the one
    start_info names: nothing is rewritten in place, so the record only names it."""
    try:
        return p2m_frame_pfns(hv, dom)
    except SaveError:
        start_info = hv.memory.read(xen_image.start_info_ma(dom), 1168)
        # placed at INIT_P2M (outside the initial mapping), start_info names its first pfn
        first = int.from_bytes(start_info[1152:1160], "little")
        if not first:
            first = (int.from_bytes(start_info[104:112], "little") - dom.virt_base) // PAGE_SIZE
        return np.arange(first, first + -(-dom.nr_pages * 8 // PAGE_SIZE), dtype=np.uint64)


def _write_tables(w: StreamWriter, hv: Hypervisor, dom: Domain,
                  changed: np.ndarray | None = None) -> int:
    """The PFINFO type of every page-table pfn, or with `changed` (mfns) of those pfns
    only, NOTAB included (a delta); returns how many words."""
    if changed is None:
        types = classify_pages(hv, dom).types
        pfns = np.flatnonzero(types != Pfinfo.NOTAB)
        types = types[pfns]
    else:
        pfns = hv.m2p[changed].astype(np.int64)
        order = np.argsort(pfns)
        pfns, types = pfns[order], table_pfinfo(hv.frame_table, changed[order])
    words = pfns.astype(np.uint64) | (types.astype(np.uint64) << np.uint64(60))
    for start in range(0, words.size, FRAMES_PER_RECORD):
        chunk = words[start : start + FRAMES_PER_RECORD]
        w.write_record(HVLAB_TABLES_RECORD, _COUNT.pack(chunk.size) + chunk.astype("<u8").tobytes())
    return int(words.size)


def _write_domain(f, hv: Hypervisor, dom: Domain, with_type_state: bool,
                  ahead: str | None, changed: np.ndarray) -> tuple[int, int]:
    """One domain's stream; returns (bytes, runs and page tables written). With `ahead`,
    frames and tables were sent ahead and only the `changed` frames' types follow."""
    if dom.hvm is not None:
        return _write_hvm_domain(f, hv, dom)
    w = _pv_writer(f, hv)
    entries = 0
    if ahead is None:
        entries += _write_frames(w, hv, dom) + _write_tables(w, hv, dom)
    elif changed.size:
        entries += _write_tables(w, hv, dom, changed)
    if with_type_state:
        runs = _type_runs(hv, dom)
        entries += len(runs)
        for start in range(0, len(runs), FRAMES_PER_RECORD):
            chunk = runs[start : start + FRAMES_PER_RECORD]
            w.write_record(HVLAB_TYPEINFO_RECORD,
                           _COUNT.pack(len(chunk)) + chunk.astype("<u8").tobytes())
    for v in dom.vcpus:
        if v.context is not None:
            ctx = vcpu_context(hv, v, normalise=False)
            if v.xen is not None:  # set_gdt's frames as PFNs, as a restore reads them
                nr = len(v.xen.gdt_frames)
                ctx.gdt_frames[:nr] = [int(hv.m2p[f]) for f in ctx.gdt_frames[:nr]]
            w.write_x86_pv_vcpu_basic(v.vcpu_id, ctx)
    state = domain_state(hv, dom)
    state["build"] = hv.build
    state["kept_pages"] = kept_pages_meta(hv, dom)
    if ahead is not None:
        state["precopy"] = {"stream": ahead}
    w.write_record(HVLAB_DOMAIN_RECORD, json.dumps(state).encode())
    w.write_end()
    return w.offset, entries


def _type_runs(hv: Hypervisor, dom: Domain) -> np.ndarray:
    """(first pfn, count, type_info, count_info, linear count) rows: the domain's frames
    in pfn order, a row per run of equal type state (runs also break every chunk)."""
    ft = hv.frame_table
    rows = []
    for pfn, mfns in _frame_chunks(dom.p2m):
        state = [ft.type_info[mfns].view(np.int64), ft.count_info[mfns].view(np.int64),
                 ft.linear_pt_count[mfns].astype(np.int64)]
        change = np.zeros(state[0].size - 1, dtype=bool)
        for column in state:
            change |= column[1:] != column[:-1]
        starts = np.concatenate([[0], np.flatnonzero(change) + 1])
        counts = np.diff(np.concatenate([starts, [state[0].size]]))
        rows.append(np.stack([starts + pfn, counts, *(c[starts] for c in state)], axis=1))
    return np.concatenate(rows) if rows else np.zeros((0, 5), np.int64)


def _frame_chunks(p2m: np.ndarray, chunk: int = FRAMES_PER_RECORD):
    """(first pfn, frame-table rows) for a domain's frames in pfn order, a chunk at a
    time: slices where the frames are consecutive (no gather), else the mfns."""
    runs = runs_of(p2m)
    if runs is None:
        for start in range(0, p2m.size, chunk):
            yield start, p2m[start : start + chunk].astype(np.int64)
        return
    for pfn, first, count in runs.tolist():
        for offset in range(0, count, chunk):
            n = min(chunk, count - offset)
            yield pfn + offset, slice(first + offset, first + offset + n)


def _backed_runs(mfns: np.ndarray) -> np.ndarray:
    """(gfn, first mfn, count) rows for every run of backed gfns with consecutive frames."""
    gfns = np.flatnonzero(mfns != INVALID_MFN)
    if not gfns.size:
        return np.zeros((0, 3), np.int64)
    m = mfns[gfns].astype(np.int64)
    breaks = np.flatnonzero((np.diff(gfns) != 1) | (np.diff(m) != 1)) + 1
    starts = np.concatenate([[0], breaks])
    counts = np.diff(np.concatenate([starts, [gfns.size]]))
    return np.stack([gfns[starts], m[starts], counts], axis=1)


def _value_runs(values: np.ndarray) -> np.ndarray:
    """(start, count, value) rows for the runs of equal values."""
    if not values.size:
        return np.zeros((0, 3), np.int64)
    starts = np.concatenate([[0], np.flatnonzero(np.diff(values) != 0) + 1])
    counts = np.diff(np.concatenate([starts, [values.size]]))
    return np.stack([starts, counts, values[starts].astype(np.int64)], axis=1)


def _write_hvm_domain(f, hv: Hypervisor, dom: Domain) -> tuple[int, int]:
    """An HVM domain's stream (see the module docstring); returns (bytes, entries)."""
    assert dom.hvm is not None
    meta, blob, now = hvm_handover_state(hv, dom)
    meta["build"] = hv.build
    p2m = dom.hvm.physmap.p2m
    major, minor = hv.build_version
    w = StreamWriter(f, DomainType.X86_HVM, xen_major=major, xen_minor=minor)
    w.write_record(HVLAB_DOMAIN_RECORD, json.dumps(meta).encode())
    runs = _backed_runs(p2m.mfns)
    for start in range(0, len(runs), FRAMES_PER_RECORD):
        chunk = runs[start : start + FRAMES_PER_RECORD]
        w.write_record(HVLAB_FRAMES_RECORD,
                       _COUNT.pack(len(chunk)) + chunk.astype("<u8").tobytes())
    # type and access of every gfn, as runs of one u16 value (type | access << 8)
    kinds = _value_runs(p2m.types.astype(np.uint16) | (p2m.accesses.astype(np.uint16) << 8))
    state = p2m.save()
    dirty = np.flatnonzero(np.unpackbits(np.frombuffer(state.dirty_bitmap, np.uint8),
                                         bitorder="little", count=p2m.nr_gfns))
    w.write_record(HVLAB_P2M_RECORD, b"".join((
        _COUNT.pack(int(state.logdirty)), _COUNT.pack(len(kinds)),
        kinds.astype("<u8").tobytes(), _COUNT.pack(dirty.size),
        dirty.astype("<u8").tobytes())))
    w.write_x86_tsc_info(0, TSC_KHZ, now, 0)
    w.write_hvm_context(blob)
    w.write_hvm_params([(HVM_PARAM_PAE_ENABLED, 1)])
    w.write_end()
    return w.offset, len(runs) + len(kinds)


def _read_hvm_domain(reader: StreamReader) -> DomainHandover:
    """An HVM domain's hand-over: its P2M rebuilt (frames in place), the other records kept."""
    meta: dict[str, Any] | None = None
    mfns: np.ndarray | None = None
    kinds: np.ndarray | None = None
    logdirty, dirty = False, np.zeros(0, np.int64)
    records: list[Any] = []
    for record in reader:
        match record:
            case EndRecord():
                break
            case OpaqueRecord(type=rtype, body=body, offset=offset) if rtype in (
                    HVLAB_DOMAIN_RECORD, HVLAB_FRAMES_RECORD, HVLAB_P2M_RECORD):
                if rtype == HVLAB_DOMAIN_RECORD:
                    try:
                        meta = json.loads(body)
                        nr_pages, posted = meta["nr_pages"], meta["posted_mfn"]
                        if not isinstance(nr_pages, int) or nr_pages <= 0:
                            raise ValueError(f"nr_pages {nr_pages!r}")
                        if not isinstance(posted, int) or posted < 0:
                            raise ValueError(f"posted_mfn {posted!r}")
                    except (ValueError, KeyError, TypeError) as err:
                        raise StreamError(f"unreadable: {err}", offset=offset,
                                          record=record.name) from None
                    mfns = np.full(nr_pages, INVALID_MFN, np.uint64)
                    records.append(record)
                    continue
                if mfns is None or meta is None:
                    raise StreamError("P2M records before HVLAB_DOMAIN", offset=offset,
                                      record=record.name)
                if rtype == HVLAB_FRAMES_RECORD:
                    runs = _array(body, 3, offset, record.name)
                    if runs.size and int((runs[:, 0] + runs[:, 2]).max()) > mfns.size:
                        raise StreamError("a run lies beyond the domain", offset=offset,
                                          record=record.name)
                    for gfn, first, count in runs.tolist():
                        mfns[gfn : gfn + count] = np.arange(first, first + count,
                                                            dtype=np.uint64)
                    continue
                logdirty = bool(_COUNT.unpack_from(body)[0])
                rest = body[_COUNT.size:]
                kinds = _array(rest, 3, offset, record.name, trailing=True)
                tail = rest[_COUNT.size + 24 * len(kinds):]
                dirty = _array(tail, 1, offset, record.name)[:, 0].astype(np.int64)
            case _:
                records.append(record)
    if meta is None or mfns is None or kinds is None:
        raise StreamError("no HVLAB_DOMAIN or no HVLAB_P2M", offset=reader.offset, record="END")
    n = mfns.size
    if int(kinds[:, 1].sum()) != n or (dirty.size and int(dirty.max()) >= n):
        raise StreamError("the p2m types do not cover the domain", offset=reader.offset,
                          record="HVLAB_P2M")
    values = np.repeat(kinds[:, 2], kinds[:, 1].astype(np.int64))
    bitmap = np.zeros(n, bool)
    bitmap[dirty] = True
    try:
        p2m = P2M.restore(P2MState(
            n, mfns.astype("<u8").tobytes(), (values & 0xFF).astype(np.uint8).tobytes(),
            (values >> 8).astype(np.uint8).tobytes(), logdirty,
            np.packbits(bitmap, bitorder="little").tobytes()))
    except P2MError as err:
        raise StreamError(str(err), offset=reader.offset, record="HVLAB_P2M") from None
    return DomainHandover(meta, mfns, np.zeros(0, np.uint64), kind="hvm", hvm_p2m=p2m,
                          posted_mfn=meta["posted_mfn"], hvm_records=records)


def read_manifest(directory: Path) -> dict[str, Any]:
    try:
        return json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        raise HandoverError(f"hand-over manifest in {directory}: {err}") from None


_KEPT = frozenset({HVLAB_FRAMES_RECORD, HVLAB_TABLES_RECORD, HVLAB_TYPEINFO_RECORD,
                   HVLAB_DOMAIN_RECORD, HVLAB_P2M_RECORD})


def read_handover(directory: Path, ahead: Mapping[str, DomainMemory] | None = None,
                  resolve: bool = True) -> list[DomainHandover]:
    """The new build reads every domain's stream (StreamError names record and offset).

    A stream that refers to one sent ahead takes its frames (and tables, unless
    resent) from `ahead`, read before the pause, or else from disk now. With
    `resolve` false (reading back what was just written) such streams are
    checked but left without frames.
    """
    manifest = read_manifest(directory)
    domains = []
    for name in manifest["streams"]:
        path = directory / name
        try:
            with path.open("rb") as f:
                reader = StreamReader(f, keep=_KEPT)
                if reader.domain_header.type == DomainType.X86_HVM:
                    domains.append(_read_hvm_domain(reader))
                    continue
                parts = _collect(reader)
        except (StreamError, OSError) as err:
            raise HandoverError(f"hand-over stream {path.name}: {err}") from None
        sent = parts.meta.get("precopy") if parts.meta is not None else None
        memory, from_disk = None, False
        if isinstance(sent, dict) and resolve:
            stream = str(sent.get("stream"))
            if Path(stream).name != stream or not stream.endswith(".precopy"):
                raise HandoverError(f"hand-over stream {path.name}: HVLAB_DOMAIN names "
                                    f"'{stream}', not a stream sent ahead")
            memory = (ahead or {}).get(stream)
            if memory is None:
                memory, from_disk = read_precopy(directory, stream), True
        try:
            domains.append(_read_domain(parts, memory, resolve))
        except StreamError as err:
            raise HandoverError(f"hand-over stream {path.name}: {err}") from None
        if from_disk and memory is not None:
            domains[-1].entries_read = memory.entries
    return domains


@dataclass
class _Parts:
    """A PV stream's records, before they are put together."""

    meta: dict[str, Any] | None = None
    nr_pages: int | None = None
    runs: list[tuple[np.ndarray, int, str]] = field(default_factory=list)
    tables: list[tuple[np.ndarray, int, str]] = field(default_factory=list)
    typeinfo: list[np.ndarray] = field(default_factory=list)
    contexts: dict[int, VcpuGuestContext] = field(default_factory=dict)
    end: int = 0


def _collect(reader: StreamReader) -> _Parts:
    parts = _Parts()
    for record in reader:
        match record:
            case OpaqueRecord(type=rtype, body=body, offset=offset):
                if rtype == HVLAB_DOMAIN_RECORD:
                    try:
                        parts.meta = json.loads(body)
                        if not isinstance(parts.meta, dict):
                            raise ValueError("not a JSON object")
                    except ValueError as err:
                        raise StreamError(f"unreadable: {err}", offset=offset,
                                          record=record.name) from None
                elif rtype == HVLAB_FRAMES_RECORD:
                    parts.runs.append((_array(body, 3, offset, record.name), offset, record.name))
                elif rtype == HVLAB_TABLES_RECORD:
                    words = _array(body, 1, offset, record.name)[:, 0]
                    parts.tables.append((words, offset, record.name))
                else:  # HVLAB_TYPEINFO
                    parts.typeinfo.append(_array(body, 5, offset, record.name))
            case X86PvVcpuBasicRecord(vcpu_id=vid):
                parts.contexts[vid] = record.guest_context()
            case X86PvP2mFramesRecord(end_pfn=end_pfn):
                parts.nr_pages = end_pfn + 1
            case EndRecord():
                break
    parts.end = reader.offset
    return parts


def _memory(parts: _Parts, sent: DomainMemory | None) -> DomainMemory:
    """Frames and tables from this stream's records, or from those sent ahead."""
    if sent is not None:
        nr_pages, p2m = sent.p2m.size, sent.p2m
    elif parts.nr_pages is None:
        raise StreamError("no X86_PV_P2M_FRAMES", offset=parts.end, record="END")
    else:
        nr_pages, p2m = parts.nr_pages, np.zeros(parts.nr_pages, np.uint64)
    entries = 0
    for runs, offset, name in parts.runs if sent is None else ():
        if runs.size and int((runs[:, 0] + runs[:, 2]).max()) > nr_pages:
            raise StreamError("a run lies beyond the domain", offset=offset, record=name)
        for pfn, first, count in runs.tolist():
            p2m[pfn : pfn + count] = np.arange(first, first + count, dtype=np.uint64)
        entries += len(runs)
    for words, offset, name in parts.tables:
        if words.size and int((words & np.uint64(PFN_MASK)).max()) >= nr_pages:
            raise StreamError("a table lies beyond the domain", offset=offset, record=name)
    tables = (np.concatenate([words for words, _, _ in parts.tables]) if parts.tables
              else np.zeros(0, np.uint64))
    if sent is not None:
        merged, changed = _apply_delta(sent.tables, tables)
        return DomainMemory(p2m, merged, int(tables.size), changed)
    return DomainMemory(p2m, tables, entries + int(tables.size))


def _apply_delta(tables: np.ndarray, delta: np.ndarray) -> tuple[np.ndarray, int]:
    """A page-table list (words by pfn) updated by a delta: every pfn the delta names
    takes its word there, or leaves the list if the delta says NOTAB. Also returns how
    many entries that changed (a frame whose type count alone changed changes none)."""
    if not delta.size:
        return tables, 0
    mask = np.uint64(PFN_MASK)
    listed = np.isin(delta & mask, tables & mask)
    table = (delta >> np.uint64(60)) != Pfinfo.NOTAB
    changed = int(((table & ~np.isin(delta, tables)) | (~table & listed)).sum())
    kept = tables[~np.isin(tables & mask, delta & mask)]
    merged = np.concatenate([kept, delta[table]])
    return merged[np.argsort(merged & mask, kind="stable")], changed


def _read_domain(parts: _Parts, sent: DomainMemory | None, resolve: bool) -> DomainHandover:
    if parts.meta is None:
        raise StreamError("no HVLAB_DOMAIN", offset=parts.end, record="END")
    if isinstance(parts.meta.get("precopy"), dict) and not resolve:
        return DomainHandover(parts.meta, np.zeros(0, np.uint64), np.zeros(0, np.uint64),
                              parts.contexts)
    memory = _memory(parts, sent)
    nr_pages = memory.p2m.size
    handover = DomainHandover(parts.meta, memory.p2m, memory.tables, parts.contexts)
    if sent is not None:
        handover.tables_changed = memory.changed
    if parts.typeinfo:
        runs = np.concatenate(parts.typeinfo).view(np.int64)
        starts = np.concatenate([[0], np.cumsum(runs[:, 1])[:-1]])
        if (runs[:, 1] <= 0).any() or (runs[:, 0] != starts).any() or runs[:, 1].sum() != nr_pages:
            raise StreamError(f"the type-state runs do not cover the domain's {nr_pages} "
                              "pages in order", offset=parts.end, record="HVLAB_TYPEINFO")
        handover.type_runs = runs
    return handover


def _array(body: bytes, width: int, offset: int, name: str,
           trailing: bool = False) -> np.ndarray:
    """A counted array of `width`-word rows, its length checked against the body
    (with `trailing`, more may follow it)."""
    if len(body) < _COUNT.size:
        raise StreamError("no count", offset=offset, record=name)
    (count,) = _COUNT.unpack_from(body)
    size = _COUNT.size + 8 * width * count
    if len(body) < size if trailing else len(body) != size:
        raise StreamError(f"{count} entries do not fill a {len(body)}-octet body",
                          offset=offset, record=name)
    return np.frombuffer(body, "<u8", count * width, _COUNT.size).reshape(count, width)


def state_counts(hv: Hypervisor) -> dict[str, int]:
    """How much non-memory state the hand-over carries, as the cost model prices it:
    bound event channels, armed timers, vCPU contexts and HVM records (LAPIC and
    LAPIC_REGS per vCPU, TSC_INFO and HVM_PARAMS per domain; CPU records are contexts)."""
    counts = {"event_channels": 0, "timers": 0, "vcpu_contexts": 0, "hvm_records": 0}
    for dom in hv.domains:
        counts["vcpu_contexts"] += len(dom.vcpus)
        if dom.hvm is not None:
            counts["hvm_records"] += 2 * len(dom.vcpus) + 2
            counts["timers"] += sum(1 for v in dom.vcpus
                                    if v.hvm is not None and v.hvm.lapic.timer_running)
            continue
        if dom.evtchn is not None:
            counts["event_channels"] += sum(1 for p in dom.evtchn.state.ports.values()
                                            if p.state != "free")
        counts["timers"] += sum(1 for v in dom.vcpus if v.timer_deadline_ns is not None)
    return counts
