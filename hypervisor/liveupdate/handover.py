"""The live-update hand-over: one migration-stream v2 per domain, memory left in place.

Guest memory does not travel: instead of PAGE_DATA (which must carry page
contents for typed pages), an `HVLAB_FRAMES` record gives each pfn's machine
frame and PFINFO type. vCPU contexts carry CR3s as MFNs (nothing is
normalised). For the `transfer` strategy, `HVLAB_TYPEINFO` records carry each
frame's type_info and count_info in the *old* build's layout. Everything
else Xen's records do not hold is in `HVLAB_DOMAIN` (as in saved images).
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
FRAMES_PER_RECORD = 1 << 20  # keeps each record far below the 128 MiB record limit
_RANGE = struct.Struct("<QQ")
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
    counters = {"handover_bytes": 0, "handover_frames": 0}
    for dom in hv.domains:
        path = directory / f"dom{dom.domid}.stream"
        with path.open("wb") as f:
            counters["handover_bytes"] += _write_domain(f, hv, dom, with_type_state)
        counters["handover_frames"] += dom.nr_pages
        streams.append(path.name)
    manifest = {"build": hv.build, "virtual_ns": hv.now, "streams": streams,
                "machine": {"pcpus": hv.machine.pcpus, "memory": hv.machine.memory,
                            "quantum_ns": hv.machine.quantum_ns}}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return counters


def _write_domain(f, hv: Hypervisor, dom: Domain, with_type_state: bool) -> int:
    if dom.kind != "pv":
        raise HandoverError(f"domain {dom.name}: live update of {dom.kind} domains "
                            "is not supported yet")
    major, minor = hv.build_version
    w = StreamWriter(f, DomainType.X86_PV, xen_major=major, xen_minor=minor)
    w.write_x86_pv_info(8, 4)
    w.write_x86_pv_p2m_frames(0, dom.nr_pages - 1, p2m_frame_pfns(hv, dom))
    types = classify_pages(hv, dom).types
    ft = hv.frame_table
    for start in range(0, dom.nr_pages, FRAMES_PER_RECORD):
        stop = min(start + FRAMES_PER_RECORD, dom.nr_pages)
        w.write_record(HVLAB_FRAMES_RECORD, b"".join((
            _RANGE.pack(start, stop - start), dom.p2m[start:stop].astype("<u8").tobytes(),
            types[start:stop].tobytes())))
        if with_type_state:
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
    return w.offset


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
                    {HVLAB_FRAMES_RECORD, HVLAB_TYPEINFO_RECORD, HVLAB_DOMAIN_RECORD}))))
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
                start, count = _RANGE.unpack_from(body)
                if p2m is None:
                    raise StreamError("frames before X86_PV_P2M_FRAMES", offset=offset,
                                      record="HVLAB_FRAMES")
                need = 9 * count if rtype == HVLAB_FRAMES_RECORD else 24 * count
                if start + count > nr_pages or len(body) != _RANGE.size + need:
                    raise StreamError(f"frames {start}+{count} do not fit the domain",
                                      offset=offset, record="HVLAB_FRAMES")
                words = np.frombuffer(body, "<u8", count, _RANGE.size)
                if rtype == HVLAB_FRAMES_RECORD:
                    p2m[start : start + count] = words
                    pfinfo[start : start + count] = np.frombuffer(
                        body, np.uint8, count, _RANGE.size + 8 * count)
                else:
                    if type_info is None:
                        type_info = np.zeros(nr_pages, np.uint64)
                        count_info = np.zeros(nr_pages, np.uint64)
                        linear = np.zeros(nr_pages, np.int64)
                    type_info[start : start + count] = words
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
