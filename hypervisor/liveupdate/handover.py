"""The live-update hand-over: one migration-stream v2 per domain, memory left in place.

Guest memory does not travel: instead of PAGE_DATA (which must carry page
contents for typed pages), `HVLAB_FRAMES` records give the pfn->mfn map as
runs of consecutive frames (a handful for a whole guest) and `HVLAB_TABLES`
records the PFINFO type of every page-table pfn (PAGE_DATA's pfn-word format),
so the hand-over grows with page tables, not with memory. vCPU contexts carry
CR3s as MFNs (nothing is normalised). For the `transfer` strategy,
`HVLAB_TYPEINFO` records carry each frame's type_info, count_info and linear
count in the *old* build's layout. Everything else Xen's records do not hold
is in `HVLAB_DOMAIN` (as in saved images).
A manifest (JSON) names the streams and the machine-level state.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hypervisor.errors import HvlabError
from hypervisor.extents import runs_of
from hypervisor.save import (
    HVLAB_DOMAIN_RECORD,
    classify_pages,
    domain_state,
    p2m_frame_pfns,
    vcpu_context,
)
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
from hypervisor.stream.vcpu_context import VcpuGuestContext

if TYPE_CHECKING:
    from hypervisor.domain import Domain
    from hypervisor.hypervisor import Hypervisor

HVLAB_FRAMES_RECORD = 0x8000_4802
HVLAB_TYPEINFO_RECORD = 0x8000_4803
HVLAB_TABLES_RECORD = 0x8000_4804
FRAMES_PER_RECORD = 1 << 20  # keeps each record far below the 128 MiB record limit
_RANGE = struct.Struct("<QQ")
_COUNT = struct.Struct("<Q")
PFN_MASK = (1 << 52) - 1
MANIFEST = "manifest.json"


class HandoverError(HvlabError):
    pass


@dataclass
class DomainHandover:
    """One domain as the new build reads it."""

    meta: dict[str, Any]
    p2m: np.ndarray
    pfinfo: np.ndarray
    contexts: dict[int, VcpuGuestContext] = field(default_factory=dict)
    type_info: np.ndarray | None = None  # old layout, per pfn (transfer)
    count_info: np.ndarray | None = None
    linear_pt_count: np.ndarray | None = None


def write_handover(hv: Hypervisor, directory: Path, with_type_state: bool) -> dict[str, Any]:
    """The old build writes every domain's stream and the manifest; returns counters."""
    directory.mkdir(parents=True, exist_ok=True)
    streams = []
    counters = {"handover_bytes": 0, "handover_frames": 0, "handover_entries": 0,
                "ownership_runs": 0}
    for dom in hv.domains:
        path = directory / f"dom{dom.domid}.stream"
        with path.open("wb") as f:
            written, runs, tables = _write_domain(f, hv, dom, with_type_state)
            counters["handover_bytes"] += written
            counters["ownership_runs"] += runs
            counters["handover_entries"] += runs + tables
        counters["handover_frames"] += dom.nr_pages
        streams.append(path.name)
    manifest = {"build": hv.build, "virtual_ns": hv.now, "streams": streams,
                "machine": {"pcpus": hv.machine.pcpus, "memory": hv.machine.memory,
                            "quantum_ns": hv.machine.quantum_ns}}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return counters


def _write_domain(f, hv: Hypervisor, dom: Domain,
                  with_type_state: bool) -> tuple[int, int, int]:
    """One domain's stream; returns (bytes, ownership runs, page-table entries)."""
    if dom.kind != "pv":
        raise HandoverError(f"domain {dom.name}: live update of {dom.kind} domains "
                            "is not supported yet")
    major, minor = hv.build_version
    w = StreamWriter(f, DomainType.X86_PV, xen_major=major, xen_minor=minor)
    w.write_x86_pv_info(8, 4)
    w.write_x86_pv_p2m_frames(0, dom.nr_pages - 1, p2m_frame_pfns(hv, dom))
    runs = runs_of(dom.p2m)
    if runs is None:  # fragmented: every frame its own run (correct, only larger)
        runs = np.stack([np.arange(dom.nr_pages), dom.p2m.astype(np.int64),
                         np.ones(dom.nr_pages, np.int64)], axis=1)
    for start in range(0, len(runs), FRAMES_PER_RECORD):
        chunk = runs[start : start + FRAMES_PER_RECORD]
        w.write_record(HVLAB_FRAMES_RECORD,
                       _COUNT.pack(len(chunk)) + chunk.astype("<u8").tobytes())
    types = classify_pages(hv, dom).types
    tables = np.flatnonzero(types != Pfinfo.NOTAB)
    for start in range(0, tables.size, FRAMES_PER_RECORD):
        pfns = tables[start : start + FRAMES_PER_RECORD]
        words = pfns.astype(np.uint64) | (types[pfns].astype(np.uint64) << np.uint64(60))
        w.write_record(HVLAB_TABLES_RECORD, _COUNT.pack(pfns.size) + words.astype("<u8").tobytes())
    if with_type_state:
        ft = hv.frame_table
        for start in range(0, dom.nr_pages, FRAMES_PER_RECORD):
            stop = min(start + FRAMES_PER_RECORD, dom.nr_pages)
            mfns = dom.p2m[start:stop].astype(np.int64)
            w.write_record(HVLAB_TYPEINFO_RECORD, b"".join((
                _RANGE.pack(start, stop - start), ft.type_info[mfns].astype("<u8").tobytes(),
                ft.count_info[mfns].astype("<u8").tobytes(),
                ft.linear_pt_count[mfns].astype("<i8").tobytes())))
    for v in dom.vcpus:
        if v.context is not None:
            w.write_x86_pv_vcpu_basic(v.vcpu_id, vcpu_context(hv, v, normalise=False))
    state = domain_state(hv, dom)
    state["build"] = hv.build
    w.write_record(HVLAB_DOMAIN_RECORD, json.dumps(state).encode())
    w.write_end()
    return w.offset, len(runs), int(tables.size)


def read_manifest(directory: Path) -> dict[str, Any]:
    try:
        return json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        raise HandoverError(f"hand-over manifest in {directory}: {err}") from None


def read_handover(directory: Path) -> list[DomainHandover]:
    """The new build reads every domain's stream (StreamError names record and offset)."""
    manifest = read_manifest(directory)
    domains = []
    for name in manifest["streams"]:
        path = directory / name
        try:
            with path.open("rb") as f:
                domains.append(_read_domain(StreamReader(f, keep=frozenset(
                    {HVLAB_FRAMES_RECORD, HVLAB_TABLES_RECORD, HVLAB_TYPEINFO_RECORD,
                     HVLAB_DOMAIN_RECORD}))))
        except StreamError as err:
            raise HandoverError(f"hand-over stream {path.name}: {err}") from None
        except OSError as err:
            raise HandoverError(f"hand-over stream {path.name}: {err}") from None
    return domains


def _read_domain(reader: StreamReader) -> DomainHandover:
    meta: dict[str, Any] | None = None
    p2m = pfinfo = type_info = count_info = linear = None
    contexts: dict[int, VcpuGuestContext] = {}
    nr_pages = 0
    for record in reader:
        match record:
            case OpaqueRecord(type=rtype, body=body, offset=offset):
                if rtype == HVLAB_DOMAIN_RECORD:
                    meta = json.loads(body)
                    continue
                if p2m is None:
                    raise StreamError("frames before X86_PV_P2M_FRAMES", offset=offset,
                                      record=record.name)
                if rtype == HVLAB_FRAMES_RECORD:
                    runs = _array(body, 3, offset, record.name)
                    if runs.size and int((runs[:, 0] + runs[:, 2]).max()) > nr_pages:
                        raise StreamError("a run lies beyond the domain", offset=offset,
                                          record=record.name)
                    for pfn, first, count in runs.tolist():
                        p2m[pfn : pfn + count] = np.arange(first, first + count, dtype=np.uint64)
                elif rtype == HVLAB_TABLES_RECORD:
                    words = _array(body, 1, offset, record.name)[:, 0]
                    pfns = (words & PFN_MASK).astype(np.int64)
                    if pfns.size and int(pfns.max()) >= nr_pages:
                        raise StreamError("a table lies beyond the domain", offset=offset,
                                          record=record.name)
                    pfinfo[pfns] = (words >> 60).astype(np.uint8)
                else:  # HVLAB_TYPEINFO
                    start, count = _RANGE.unpack_from(body)
                    if start + count > nr_pages or len(body) != _RANGE.size + 24 * count:
                        raise StreamError(f"frames {start}+{count} do not fit the domain",
                                          offset=offset, record=record.name)
                    if type_info is None:
                        type_info = np.zeros(nr_pages, np.uint64)
                        count_info = np.zeros(nr_pages, np.uint64)
                        linear = np.zeros(nr_pages, np.int64)
                    type_info[start : start + count] = np.frombuffer(body, "<u8", count,
                                                                     _RANGE.size)
                    count_info[start : start + count] = np.frombuffer(
                        body, "<u8", count, _RANGE.size + 8 * count)
                    linear[start : start + count] = np.frombuffer(
                        body, "<i8", count, _RANGE.size + 16 * count)
            case X86PvVcpuBasicRecord(vcpu_id=vid):
                contexts[vid] = record.guest_context()
            case EndRecord():
                break
            case X86PvP2mFramesRecord(end_pfn=end_pfn):
                nr_pages = end_pfn + 1
                p2m = np.zeros(nr_pages, np.uint64)
                pfinfo = np.zeros(nr_pages, np.uint8)
    if meta is None or p2m is None:
        raise StreamError("no HVLAB_DOMAIN or no frames", offset=reader.offset, record="END")
    return DomainHandover(meta, p2m, pfinfo, contexts, type_info, count_info, linear)


def _array(body: bytes, width: int, offset: int, name: str) -> np.ndarray:
    """A counted array of `width`-word rows, its length checked against the body."""
    (count,) = _COUNT.unpack_from(body)
    if len(body) != _COUNT.size + 8 * width * count:
        raise StreamError(f"{count} entries do not fill a {len(body)}-octet body",
                          offset=offset, record=name)
    return np.frombuffer(body, "<u8", count * width, _COUNT.size).reshape(count, width)
