"""`hvlab image info`: what an image holds, read in one streaming pass.

Only counters are kept while reading (a record is in memory at a time), so a
64 GiB image costs no more memory than a 64 MiB one.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np

from hypervisor.stream import (
    DomainType,
    HvmContextRecord,
    OpaqueRecord,
    PageDataRecord,
    Pfinfo,
    X86PvP2mFramesRecord,
    X86PvVcpuBasicRecord,
    X86TscInfoRecord,
    iter_hvm_context,
)
from hypervisor.stream.files import is_compressed
from hypervisor.stream.framing import PAGE_SIZE, REC_HEADER_SIZE, padded_length
from hypervisor.stream.hvlab_records import HVLAB_DOMAIN_RECORD
from hypervisor.stream.hvm_records import HVM_SAVE_CPU, HvmHwCpu
from hypervisor.stream.vcpu_context import VGCF_ONLINE

from .common import HVLAB_DOMAIN_NAME, ImageError, file_size, read_image, record_name
from .pt_stats import PageTableStats

_LEVEL_NAMES = ("L1", "L2", "L3", "L4")


@dataclass
class _Tally:
    """Counters filled while streaming."""

    records: dict[str, list[int]] = field(default_factory=dict)  # name -> [count, bytes]
    types: np.ndarray = field(default_factory=lambda: np.zeros(16, dtype=np.int64))
    max_pfn: int = -1
    p2m_end: int | None = None
    vcpus: list[dict[str, Any]] = field(default_factory=list)
    tsc: dict[str, int] | None = None
    hvlab: dict[str, Any] | None = None
    page_tables: PageTableStats = field(default_factory=PageTableStats)

    def count(self, name: str, size: int) -> None:
        entry = self.records.setdefault(name, [0, 0])
        entry[0] += 1
        entry[1] += size


def image_info(path: str | os.PathLike[str], as_json: bool = False,
               out: TextIO | None = None) -> dict[str, Any]:
    """Describe the image at `path`; print a table (or JSON) to `out`; return the data.

    Raises ImageError (one line naming the record and offset) for a file that is
    not a readable image.
    """
    out = sys.stdout if out is None else out
    size_on_disk = file_size(path)
    tally = _Tally()
    with read_image(path) as reader:
        for record in reader:
            size = reader.offset - record.offset
            rtype = int(getattr(record, "TYPE", getattr(record, "type", -1)))
            tally.count(record_name(rtype), size)
            _take(tally, record, path)
        header, domain = reader.image_header, reader.domain_header
        stream_bytes = reader.offset
        for skipped in reader.skipped:
            tally.count(record_name(skipped.type),
                        REC_HEADER_SIZE + padded_length(skipped.body_length))
    info = _summarise(tally, path, size_on_disk, stream_bytes, header.version, domain)
    if as_json:
        json.dump(info, out, indent=2)
        out.write("\n")
    else:
        print_info(info, out)
    return info


def _take(tally: _Tally, record: object, path: str | os.PathLike[str]) -> None:
    match record:
        case PageDataRecord(pfns=pfns, types=types, pages=pages):
            tally.types += np.bincount(types, minlength=16)
            tally.max_pfn = max(tally.max_pfn, int(pfns.max()))
            tally.page_tables.add_page_data(pfns, types, pages)
        case X86PvP2mFramesRecord(end_pfn=end):
            tally.p2m_end = end
            tally.page_tables.nr_pages = end + 1
        case X86PvVcpuBasicRecord(vcpu_id=vid):
            ctx = record.guest_context()
            tally.vcpus.append({
                "id": vid,
                "online": bool(ctx.flags & VGCF_ONLINE),
                "rip": ctx.user_regs.rip,
                "rsp": ctx.user_regs.rsp,
                "cr3_pfn": ctx.ctrlreg[3] >> 12,
                "user_cr3_pfn": ctx.user_table,
            })
            if ctx.ctrlreg[3]:
                tally.page_tables.add_cr3(ctx.ctrlreg[3] >> 12)
            tally.page_tables.add_cr3(ctx.user_table)
        case HvmContextRecord(blob=blob):
            for entry in iter_hvm_context(blob):
                if entry.typecode == HVM_SAVE_CPU:
                    cpu = HvmHwCpu.unpack(entry.payload)
                    tally.vcpus.append({"id": entry.instance, "online": True, "rip": cpu.rip,
                                        "rsp": cpu.rsp, "cr3_pfn": cpu.cr3 >> 12,
                                        "user_cr3_pfn": None})
        case X86TscInfoRecord(mode=mode, khz=khz, nsec=nsec, incarnation=inc):
            tally.tsc = {"mode": mode, "khz": khz, "nsec": nsec, "incarnation": inc}
        case OpaqueRecord(type=rtype, body=body) if rtype == HVLAB_DOMAIN_RECORD:
            tally.hvlab = hvlab_summary(body, path, record.offset)


def hvlab_summary(body: bytes, path: str | os.PathLike[str], offset: int) -> dict[str, Any]:
    """The HVLAB_DOMAIN record reduced to what a reader wants at a glance."""
    try:
        state = json.loads(body)
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as err:
        raise ImageError(f"{path}: record {HVLAB_DOMAIN_NAME} at offset {offset:#x}: "
                         f"unreadable JSON: {err}") from None
    summary: dict[str, Any] = {}
    for key, value in state.items():
        if key == "console" and isinstance(value, str):
            lines = [line for line in value.splitlines() if line.strip()]
            summary["console_bytes"] = len(value)
            summary["console_last_line"] = lines[-1] if lines else ""
        elif key == "evtchn" and isinstance(value, dict):
            summary["evtchn_ports"] = len(value.get("ports", ()))
        elif key == "vcpus" and isinstance(value, list):
            summary["vcpus"] = [
                {k: v.get(k) for k in ("runstate", "instructions", "upcalls")}
                for v in value if isinstance(v, dict)
            ]
        elif value is None or isinstance(value, int | float | str | bool):
            summary[key] = value
    return summary


def _summarise(t: _Tally, path: str | os.PathLike[str], size_on_disk: int, stream_bytes: int,
               version: int, domain: Any) -> dict[str, Any]:
    nr_pages = t.p2m_end + 1 if t.p2m_end is not None else t.max_pfn + 1
    types = {p.name: int(t.types[p]) for p in Pfinfo if t.types[p]}
    pins = {_LEVEL_NAMES[lvl]: int(t.types[Pfinfo.L1TAB_PIN + lvl]) for lvl in range(4)}
    tables = {_LEVEL_NAMES[lvl]: int(t.types[Pfinfo.L1TAB + lvl] + t.types[Pfinfo.L1TAB_PIN + lvl])
              for lvl in range(4)}
    in_stream = int(t.types.sum())
    no_data = int(t.types[[Pfinfo.XALLOC, Pfinfo.BROKEN, Pfinfo.XTAB]].sum())
    return {
        "path": os.fspath(path),
        "file_bytes": size_on_disk,
        "stream_bytes": stream_bytes,
        "compressed": is_compressed(path),
        "image_version": version,
        "domain_type": "pv" if domain.type == DomainType.X86_PV else "hvm",
        "build": f"{domain.xen_major}.{domain.xen_minor}",
        "nr_pages": nr_pages,
        "memory_bytes": nr_pages * PAGE_SIZE,
        "pages_in_stream": in_stream,
        "data_pages": in_stream - no_data,
        "records": [{"type": name, "count": c, "bytes": b} for name, (c, b) in t.records.items()],
        "page_types": types,
        "page_tables": {**tables, "total": sum(tables.values())},
        "pins": {**pins, "total": sum(pins.values())},
        "page_table_stats": t.page_tables.summary(),
        "vcpus": {"count": len(t.vcpus), "online": sum(v["online"] for v in t.vcpus),
                  "list": t.vcpus},
        "tsc": t.tsc,
        "hvlab_domain": t.hvlab,
    }


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} B"


def print_info(info: dict[str, Any], out: TextIO) -> None:
    """The readable form of `image_info`'s result."""
    w = out.write
    w(f"image       {info['path']}\n")
    w(f"size        {info['file_bytes']:,} bytes on disk"
      f"{' (zstd)' if info['compressed'] else ''}, {info['stream_bytes']:,} bytes of stream\n")
    w(f"format      Xen migration stream v2 (header version field {info['image_version']}), "
      f"x86 {info['domain_type'].upper()}, "
      f"saved by build {info['build']}\n")
    w(f"memory      {info['nr_pages']:,} pages ({_size(info['memory_bytes'])}); "
      f"{info['pages_in_stream']:,} in PAGE_DATA, {info['data_pages']:,} with data\n")
    w("records     type                       count            bytes\n")
    for r in info["records"]:
        w(f"            {r['type']:<24} {r['count']:>7,} {r['bytes']:>16,}\n")
    types = "  ".join(f"{k} {v:,}" for k, v in info["page_types"].items())
    w(f"page types  {types or '-'}\n")
    tables, pins = info["page_tables"], info["pins"]
    w("tables      " + "  ".join(f"{lvl} {tables[lvl]:,}" for lvl in _LEVEL_NAMES)
      + f"  (total {tables['total']:,})\n")
    w("pins        " + "  ".join(f"{lvl} {pins[lvl]:,}" for lvl in _LEVEL_NAMES)
      + f"  (total {pins['total']:,})\n")
    if info["page_table_stats"] is not None:
        _print_page_table_stats(info["page_table_stats"], w)
    vcpus = info["vcpus"]
    w(f"vcpus       {vcpus['count']} ({vcpus['online']} online)\n")
    for v in vcpus["list"]:
        user = f" user-cr3 pfn {v['user_cr3_pfn']:#x}" if v["user_cr3_pfn"] is not None else ""
        w(f"            v{v['id']:<3} {'online ' if v['online'] else 'offline'} "
          f"rip {v['rip']:#018x}  cr3 pfn {v['cr3_pfn']:#x}{user}\n")
    if info["tsc"] is not None:
        t = info["tsc"]
        w(f"tsc         mode {t['mode']}, {t['khz']:,} kHz, at {t['nsec']:,} ns\n")
    hv = info["hvlab_domain"]
    if hv is not None:
        parts = [f"{k} {v:#x}" if isinstance(v, int) and (k.endswith("_pfn") or k == "virt_base")
                 else f"{k} {v!r}"
                 for k, v in hv.items() if k not in ("vcpus", "console_last_line")]
        w(f"hvlab       {', '.join(parts)}\n")
        if hv.get("console_last_line"):
            w(f"console     ...{hv['console_last_line']}\n")


def _print_page_table_stats(s: dict[str, Any], w: Any) -> None:
    present, mean = s["present_entries"], s["entries_per_table"]
    w("entries     " + "  ".join(f"{lvl} {present[lvl]:,}" for lvl in _LEVEL_NAMES)
      + f"  present (total {present['total']:,}); per table "
      + "  ".join(f"{lvl} {mean[lvl]:.1f}" for lvl in _LEVEL_NAMES) + "\n")
    empty = s["empty_tables"]
    w("empty       " + "  ".join(f"{lvl} {empty[lvl]:,}" for lvl in _LEVEL_NAMES)
      + f"  tables with no present entry (total {empty['total']:,})\n")
    r = s["roots"]
    w(f"roots       {r['total']:,} L4 roots: {r['kernel']:,} kernel, {r['user']:,} user "
      f"({r['pinned']:,} pinned, {r['cr3_not_pinned']:,} CR3s not pinned)\n")
    w(f"L1 entries  {s['l1_present']:,} present, {s['writable_mappings']:,} writable, "
      f"{s['table_mappings']:,} map page tables; {s['mapped_frames']:,} frames mapped\n")
    w(f"linear      {s['linear_entries']:,} entries onto tables of their own level, "
      f"{s['self_maps']:,} self-maps"
      + (f"; {s['beyond_domain']:,} entries map pfns beyond the domain" if s["beyond_domain"]
         else "") + "\n")
