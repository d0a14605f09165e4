"""Saving and restoring HVM domains as migration-stream v2 images (docs/images.md, "HVM images").

Records, in order (domain type 2, x86 HVM):

- `HVLAB_DOMAIN` (optional, 0x80004801): hvlab state Xen's records do not carry (JSON,
  below). It comes **first**: hvlab sizes the domain's guest-physical memory (and PoD)
  from it before any page arrives, as libxc's restore learns the size from the toolstack.
- `STATIC_DATA_END` (v3).
- `PAGE_DATA` x n: every *backed* gfn, `NOTAB` with its contents or `XALLOC` (no data)
  when all zero. PoD gfns not yet populated are left out and come back as PoD.
- `X86_TSC_INFO`: mode 0, 1,000,000 kHz, `nsec` = the domain's virtual time.
- `HVM_CONTEXT`: HEADER, per vCPU CPU (2), LAPIC (5), LAPIC_REGS (6) (PIR folded into
  IRR first), END.
- `HVM_PARAMS`: `HVM_PARAM_PAE_ENABLED` = 1 (the only parameter hvlab's HVM guests have).
- `END`.

`HVLAB_DOMAIN` for HVM (version 1): `name`, `virtual_ns`, `console`, `nr_pages`, `pod`,
`log_dirty`, the builder `layout`, physmap statistics, EPT-violation counts, and per vCPU
its `HvmVcpuState` (hypervisor/hvm/vcpu.py, written by `stream.plain`): `runstate`,
`instructions`, `pcpu`, `cr3`, `lapic_mapped`, the interrupt-window state, the HVM
counters, the full vLAPIC state (timer anchor and counters, which LAPIC/LAPIC_REGS cannot
express exactly), the 64-byte posted-interrupt descriptor, and each interrupt source's
state with its limit and delivery counters. The LAPIC is first rebuilt from the Xen
records (so they are validated), then the hvlab state makes it exact.

Restore builds the P2M and EPT in the *restoring* build's layout, writes the pages, and
recreates the vCPUs. All or nothing: any problem is one `RestoreError` naming the record and
offset, and every frame taken is scrubbed and given back.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from emulator.addr import MFN, PAGE_SIZE, PFN
from emulator.engine import GPRS, PERM_R, PERM_W, PhysicalCpu
from emulator.memory import HostMemory
from emulator.paging import ADDR_MASK, PSE, P
from hypervisor.core.domain import Domain, Shutdown
from hypervisor.core.frames import OutOfFrames
from hypervisor.core.hypervisor import TSC_KHZ
from hypervisor.core.vcpu import Vcpu
from hypervisor.hvm.builder import MAX_HVM_MEMORY, HvmLayout
from hypervisor.hvm.domain import HvmDomain
from hypervisor.hvm.ept import INVALID_MFN, P2mType
from hypervisor.hvm.p2m import P2M
from hypervisor.hvm.physmap import GuestPhysmap, PhysmapStats, ept_layout_for
from hypervisor.hvm.policy import hvm_policy
from hypervisor.hvm.vcpu import (
    HvmVcpuState,
    check_hvm_vcpu_state,
    restore_hvm_vcpu,
    save_hvm_vcpu,
)
from hypervisor.hvm.vlapic import VLapic, VLapicError, VLapicState
from hypervisor.lib.errors import HvlabError, RestoreError, SaveError
from hypervisor.stream import (
    DomainType,
    EndRecord,
    HvmContextRecord,
    HvmParamsRecord,
    OpaqueRecord,
    PageDataRecord,
    Pfinfo,
    StreamError,
    StreamReader,
    StreamWriter,
    X86TscInfoRecord,
    check_pfns,
    open_image_for_write,
)
from hypervisor.stream.hvlab_records import HVLAB_DOMAIN_RECORD
from hypervisor.stream.hvlab_records import PAGE_DATA_BATCH as BATCH
from hypervisor.stream.hvm_records import (
    HVM_SAVE_CPU,
    HVM_SAVE_LAPIC,
    HVM_SAVE_LAPIC_REGS,
    XEN_X86_FPU_INITIALISED,
    HvmContext,
    HvmHwCpu,
    HvmRecord,
    HvmSaveHeader,
    hvm_type_name,
)
from hypervisor.stream.plain import from_plain, to_plain

if TYPE_CHECKING:
    from hypervisor.core.hypervisor import Hypervisor

HVLAB_HVM_VERSION = 1
HVM_PARAM_PAE_ENABLED = 4
FXSAVE_MXCSR, FXSAVE_XMM0 = 24, 160
MAX_VCPUS = 32
CR0_PE_PG = 0x8000_0001
EFER_LMA = 1 << 10
SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss")


# ======================================================================= saving


def save_hvm_domain(hv: Hypervisor, dom: Domain, path: str | Path) -> dict[str, Any]:
    """Write HVM domain `dom` to `path` (zstd if it ends in .zst); returns statistics."""
    if not dom.alive:
        raise SaveError(f"domain {dom.name} has shut down: nothing to save")
    assert dom.hvm is not None
    started = time.perf_counter()
    now = hv.now + dom.time_offset  # the guest's clock: LAPICs and sources run on it
    # LAPIC records first: they fold PIR into IRR, and the hvlab state must see the result.
    lapics = {v.vcpu_id: hvm_policy(hv).lapic_records(v, now) for v in dom.vcpus}
    cpus = {v.vcpu_id: cpu_record(hv, v, now) for v in dom.vcpus}
    entries: list[HvmRecord] = []
    for v in dom.vcpus:
        lapic, regs = lapics[v.vcpu_id]
        entries += [HvmRecord(HVM_SAVE_CPU, v.vcpu_id, cpus[v.vcpu_id].pack()),
                    HvmRecord(HVM_SAVE_LAPIC, v.vcpu_id, lapic),
                    HvmRecord(HVM_SAVE_LAPIC_REGS, v.vcpu_id, regs)]
    blob = HvmContext(HvmSaveHeader(gtsc_khz=TSC_KHZ), entries).pack()
    meta = hvm_domain_state(hv, dom)
    stats: dict[str, Any] = {"pages": dom.nr_pages, "data_pages": 0, "xalloc_pages": 0,
                             "pod_pages": 0, "page_tables": 0, "pins": 0}
    mfns = dom.hvm.physmap.p2m.mfns.astype(np.uint64)
    backed = np.flatnonzero(mfns != INVALID_MFN)
    stats["pod_pages"] = dom.nr_pages - int(backed.size)
    resident = hv.memory.resident_frames()
    frames = hv.memory.u8.reshape(-1, PAGE_SIZE)
    major, minor = hv.build_version
    with open_image_for_write(path) as f:
        w = StreamWriter(f, DomainType.X86_HVM, xen_major=major, xen_minor=minor)
        w.write_record(HVLAB_DOMAIN_RECORD, json.dumps(meta).encode())
        for start in range(0, backed.size, BATCH):
            gfns = backed[start:start + BATCH]
            batch_mfns = mfns[gfns].astype(np.int64)
            touched = resident[batch_mfns] if resident is not None else np.ones(gfns.size, bool)
            nonzero = np.zeros(gfns.size, dtype=bool)
            nonzero[touched] = frames[batch_mfns[touched]].any(axis=1)
            types = np.where(nonzero, Pfinfo.NOTAB, Pfinfo.XALLOC).astype(np.uint8)
            w.write_page_data(gfns.astype(np.uint64), types, frames[batch_mfns[nonzero]])
            stats["data_pages"] += int(nonzero.sum())
            stats["xalloc_pages"] += int((~nonzero).sum())
        w.write_x86_tsc_info(0, TSC_KHZ, now, 0)
        w.write_hvm_context(blob)
        w.write_hvm_params([(HVM_PARAM_PAE_ENABLED, 1)])
        w.write_end()
        stats["bytes"] = w.offset
    stats["wall_s"] = round(time.perf_counter() - started, 6)
    return stats


def cpu_record(hv: Hypervisor, v: Vcpu, now: int) -> HvmHwCpu:
    """`struct hvm_hw_cpu` of `v`: what the engine exposes (MSRs it cannot read are 0)."""
    regs = hv.read_vcpu_registers(v)  # also loads `v` on its pCPU
    cpu = hv.pcpus[v.pcpu]
    fpu = bytearray(512)
    fpu[FXSAVE_MXCSR:FXSAVE_MXCSR + 4] = regs["mxcsr"].to_bytes(4, "little")
    for i in range(16):
        fpu[FXSAVE_XMM0 + 16 * i:FXSAVE_XMM0 + 16 * (i + 1)] = regs[f"xmm{i}"].to_bytes(16,
                                                                                       "little")
    gdt_base, gdt_limit = cpu.descriptor_table("gdtr")
    idt_base, idt_limit = cpu.descriptor_table("idtr")
    fields: dict[str, int] = {name: regs[name] for name in (
        *GPRS, "rip", "rflags", "cr0", "cr2", "cr3", "cr4")}
    gdt = _QuietMmu(hv.memory, v.domain.hvm.physmap, regs["cr3"])  # type: ignore[union-attr]
    for seg in SEGMENTS:
        sel = cpu.reg(seg)
        base, limit, arbytes = _descriptor(gdt, gdt_base, gdt_limit, sel)
        fields |= {f"{seg}_sel": sel, f"{seg}_base": base, f"{seg}_limit": limit,
                   f"{seg}_arbytes": arbytes}
    # In 64-bit mode the FS/GS bases are the MSRs, not the descriptors'.
    fields |= {"fs_base": regs["fs_base"], "gs_base": regs["gs_base"],
               "gdtr_base": gdt_base, "gdtr_limit": gdt_limit,
               "idtr_base": idt_base, "idtr_limit": idt_limit,
               "msr_efer": cpu.reg("efer"), "tsc": now, "flags": XEN_X86_FPU_INITIALISED}
    return HvmHwCpu(fpu_regs=bytes(fpu), **fields)


def _descriptor(mmu: _QuietMmu, gdt_base: int, gdt_limit: int, sel: int
                ) -> tuple[int, int, int]:
    """(base, limit, attributes) of GDT selector `sel`, attributes as Xen's 12-bit attr.

    Read without the real walker: saving must not set Accessed bits in guest tables.
    """
    index = sel & ~7
    if index == 0 or sel & 4 or index + 7 > gdt_limit:
        return 0, 0, 0
    gva = gdt_base + index
    page = mmu.translate(gva & ~0xFFF, "read")
    if page is None:
        return 0, 0, 0
    offset = gva & 0xFFF
    if offset > PAGE_SIZE - 8:  # a descriptor across two pages: not worth modelling
        return 0, 0, 0
    d = int.from_bytes(mmu.memory.read(page[0] + offset, 8), "little")
    limit = (d & 0xFFFF) | ((d >> 32) & 0xF_0000)
    if d >> 55 & 1:  # G: limit in pages
        limit = (limit << 12) | 0xFFF
    base = ((d >> 16) & 0xFF_FFFF) | (((d >> 56) & 0xFF) << 24)
    attr = ((d >> 40) & 0xFF) | (((d >> 52) & 0xF) << 8)
    return base, limit, attr


def hvm_domain_state(hv: Hypervisor, dom: Domain) -> dict[str, Any]:
    """The HVLAB_DOMAIN record of an HVM domain (see the module docstring)."""
    hd = dom.hvm
    assert hd is not None
    return {
        "version": HVLAB_HVM_VERSION,
        "name": dom.name,
        "virtual_ns": hv.now + dom.time_offset,
        "console": dom.console.decode("latin-1"),  # byte-exact round trip
        "nr_pages": dom.nr_pages,
        "pod": hd.physmap.pod,
        "log_dirty": hd.physmap.logdirty,
        "layout": asdict(hd.layout),
        "physmap_stats": asdict(hd.physmap.stats),
        "violations": dict(hd.violations),
        "last_violation": None if hd.last_violation is None else list(hd.last_violation),
        "repeats": hd.repeats,
        "vcpus": [to_plain(save_hvm_vcpu(v)) for v in dom.vcpus],
    }


def hvm_domain_digest(hv: Hypervisor, dom: Domain) -> list[str]:
    """A hash of every gfn's contents ("pod" where nothing backs it): equal across hosts."""
    assert dom.hvm is not None
    mfns = dom.hvm.physmap.p2m.mfns
    frames = hv.memory.u8.reshape(-1, PAGE_SIZE)
    return ["pod" if m == INVALID_MFN else hashlib.sha256(frames[m].tobytes()).hexdigest()[:16]
            for m in mfns.tolist()]


# ==================================================================== live update


def folded_lapic_state(v: Vcpu) -> VLapicState:
    """`v`'s vLAPIC state as if PIR were folded into IRR now, leaving both untouched."""
    hvm = v.hvm
    assert hvm is not None
    scratch = VLapic(hvm.apic_id, lambda *_: None)
    scratch.restore(hvm.lapic.save())
    bits = hvm.posted.pir_bits()
    for vector in range(256):
        if bits >> vector & 1:
            scratch.accept(vector)
    return scratch.save()


def hvm_handover_state(hv: Hypervisor, dom: Domain) -> tuple[dict[str, Any], bytes, int]:
    """A live update's HVLAB_DOMAIN, HVM_CONTEXT blob and guest time of `dom`.

    Unlike saving, nothing is advanced or folded: the posted-interrupt descriptors stay
    in host memory with their PIR (the new build adopts them and folds PIR on the next
    entry), so every interrupt is delivered exactly once. The Xen LAPIC records show
    PIR folded into IRR (what they mean), computed on a scratch copy.
    """
    assert dom.hvm is not None
    now = hv.now + dom.time_offset
    entries: list[HvmRecord] = []
    for v in dom.vcpus:
        scratch = VLapic(v.vcpu_id, lambda *_: None)
        scratch.restore(folded_lapic_state(v))
        entries += [HvmRecord(HVM_SAVE_CPU, v.vcpu_id, cpu_record(hv, v, now).pack()),
                    HvmRecord(HVM_SAVE_LAPIC, v.vcpu_id, scratch.hvm_lapic_record()),
                    HvmRecord(HVM_SAVE_LAPIC_REGS, v.vcpu_id, scratch.hvm_lapic_regs_record())]
    blob = HvmContext(HvmSaveHeader(gtsc_khz=TSC_KHZ), entries).pack()
    meta = hvm_domain_state(hv, dom)
    meta["posted_mfn"] = dom.hvm.posted_mfn
    # a domain that has shut down stays down (saving refuses such a domain)
    meta["shutdown"] = None if dom.shutdown is None else asdict(dom.shutdown)
    meta["crash_report"] = dom.crash_report
    return meta, blob, now


def adopt_hvm_domain(hv: Hypervisor, records: list[Any], p2m: P2M, posted_mfn: int,
                     where: Path) -> Domain:
    """A live update's new build: the handed-over HVM domain, memory left in place.

    `p2m` (a `P2M` rebuilt from the hand-over) keeps the guest frames where they are;
    its EPT is built in this build's layout; the posted-interrupt descriptors at
    `posted_mfn` are adopted as they are (PIR posted during the blackout included).
    `records` are the stream's HVLAB_DOMAIN, TSC_INFO, HVM_CONTEXT and HVM_PARAMS.
    On failure only the EPT frames this took are given back: guest frames stay.
    """
    st = _Pending(adopted=True)
    try:
        for record in records:
            match record:
                case OpaqueRecord(type=rtype, body=body) if rtype == HVLAB_DOMAIN_RECORD:
                    _adopt_memory(hv, st, body, record.offset, where, p2m, posted_mfn)
                case _:
                    _apply(hv, st, record, where, None)
        shutdown = _handed_over_shutdown(st, where)
        dom = _finish(hv, st, where, None)
        dom.shutdown = shutdown
        dom.crash_report = st.meta.get("crash_report") if st.meta else None
        return dom
    except BaseException:
        _undo(hv, st)
        raise


def _handed_over_shutdown(st: _Pending, path: Path) -> Shutdown | None:
    if st.meta is None or st.meta.get("shutdown") is None:
        return None
    try:
        shutdown = Shutdown(**st.meta["shutdown"])
        if not isinstance(shutdown.reason, str):
            raise TypeError(f"reason {shutdown.reason!r}")
        report = st.meta.get("crash_report")
        if report is not None and not isinstance(report, str):
            raise TypeError("crash_report must be text")
    except TypeError as err:
        raise _fail(path, "HVLAB_DOMAIN", st.meta_offset, f"shutdown: {err}") from None
    return shutdown


def _adopt_memory(hv: Hypervisor, st: _Pending, body: bytes, offset: int, path: Path,
                  p2m: P2M, posted_mfn: int) -> None:
    try:
        meta = json.loads(body)
        if meta.get("version") != HVLAB_HVM_VERSION:
            raise ValueError(f"version {meta.get('version')}")
        if meta["nr_pages"] != p2m.nr_gfns or not isinstance(meta["pod"], bool):
            raise ValueError("nr_pages or pod disagree with the handed-over P2M")
    except (ValueError, AttributeError, KeyError, TypeError) as err:
        raise _fail(path, "HVLAB_DOMAIN", offset, f"unreadable: {err}") from None
    st.meta, st.meta_offset = meta, offset
    try:
        st.physmap = GuestPhysmap.adopt(hv.memory, hv.frames, p2m, ept_layout_for(hv.build),
                                        f"domain {meta.get('name')}", pod=meta["pod"])
    except HvlabError as err:
        raise _fail(path, "HVLAB_DOMAIN", offset, f"cannot rebuild EPT: {err}") from None
    st.posted_mfn = posted_mfn
    st.seen = np.zeros(p2m.nr_gfns, dtype=bool)


# ===================================================================== restoring


@dataclass
class _Pending:
    """What has been read so far, before the domain exists (and what to give back)."""

    meta: dict[str, Any] | None = None
    meta_offset: int = 0
    physmap: GuestPhysmap | None = None
    posted_mfn: int | None = None
    seen: np.ndarray | None = None
    tsc_nsec: int | None = None
    context: dict[tuple[int, int], tuple[bytes, int]] = field(default_factory=dict)
    context_offset: int = -1
    params: dict[int, int] = field(default_factory=dict)
    adopted: bool = False  # a live update: guest frames and descriptors are not ours to free


def restore_hvm_domain(hv: Hypervisor, reader: StreamReader, path: Path,
                       name: str | None = None) -> Domain:
    """Restore the HVM image `reader` is positioned in (after its headers) as a new domain.

    Raises RestoreError (or StreamError, which the caller words) with `hv` left as it was.
    """
    st = _Pending()
    try:
        for record in reader:
            _apply(hv, st, record, path, name)
            if isinstance(record, EndRecord):
                break
        return _finish(hv, st, path, name)
    except BaseException:
        _undo(hv, st)
        raise


def _fail(path: Path, record: str, offset: int, reason: str) -> RestoreError:
    return RestoreError(f"{path}: record {record} at offset {offset:#x}: {reason}")


def _apply(hv: Hypervisor, st: _Pending, record, path: Path, name: str | None) -> None:
    match record:
        case OpaqueRecord(type=rtype, body=body) if rtype == HVLAB_DOMAIN_RECORD:
            _size_domain(hv, st, body, record.offset, path, name)
        case PageDataRecord():
            _load_pages(hv, st, record, path)
        case X86TscInfoRecord(nsec=nsec):
            st.tsc_nsec = nsec
        case HvmContextRecord(blob=blob):
            if st.context_offset >= 0:
                raise _fail(path, "HVM_CONTEXT", record.offset, "a second HVM_CONTEXT")
            st.context_offset = record.offset
            try:
                for entry in HvmContext.unpack(blob).records:
                    key = (entry.typecode, entry.instance)
                    if entry.typecode not in (HVM_SAVE_CPU, HVM_SAVE_LAPIC, HVM_SAVE_LAPIC_REGS):
                        raise StreamError(f"entry {hvm_type_name(entry.typecode)} is not "
                                          "supported by hvlab")
                    if key in st.context or not 0 <= entry.instance < MAX_VCPUS:
                        raise StreamError(f"{hvm_type_name(entry.typecode)} instance "
                                          f"{entry.instance} repeated or out of range")
                    st.context[key] = (entry.payload, record.offset)
            except StreamError as err:
                raise _fail(path, "HVM_CONTEXT", record.offset, str(err)) from None
        case HvmParamsRecord(params=params):
            st.params.update(params)


def _size_domain(hv: Hypervisor, st: _Pending, body: bytes, offset: int, path: Path,
                 name: str | None) -> None:
    """HVLAB_DOMAIN: the domain's size and PoD mode; back its memory and build its EPT."""
    if st.meta is not None:
        raise _fail(path, "HVLAB_DOMAIN", offset, "a second HVLAB_DOMAIN")
    try:
        meta = json.loads(body)
        if meta.get("version") != HVLAB_HVM_VERSION:
            raise ValueError(f"version {meta.get('version')}")
        nr_pages, pod = meta["nr_pages"], meta["pod"]
        if not isinstance(nr_pages, int) or not 0 < nr_pages <= MAX_HVM_MEMORY // PAGE_SIZE:
            raise ValueError(f"nr_pages {nr_pages!r} out of range")
        if not isinstance(pod, bool):
            raise ValueError("pod must be true or false")
    except (ValueError, AttributeError, KeyError, TypeError) as err:
        raise _fail(path, "HVLAB_DOMAIN", offset, f"unreadable: {err}") from None
    st.meta, st.meta_offset = meta, offset
    owner = f"restored domain {name or meta.get('name') or path.stem}"
    try:
        st.physmap = GuestPhysmap(hv.memory, hv.frames, nr_pages, ept_layout_for(hv.build),
                                  owner, pod=pod, prepopulate=range(0))
        st.posted_mfn = int(hv.frames.alloc_one(f"{owner} posted-interrupt descriptors"))
    except (HvlabError, OutOfFrames) as err:
        raise _fail(path, "HVLAB_DOMAIN", offset, f"cannot back the domain: {err}") from None
    hv.memory.zero_frame(MFN(st.posted_mfn))
    st.seen = np.zeros(nr_pages, dtype=bool)


def _load_pages(hv: Hypervisor, st: _Pending, record: PageDataRecord, path: Path) -> None:
    if st.physmap is None or st.seen is None:
        raise _fail(path, "PAGE_DATA", record.offset,
                    "page data before HVLAB_DOMAIN (hvlab sizes HVM domains from it)")
    physmap = st.physmap
    try:
        check_pfns(record.pfns, physmap.nr_pages, st.seen, offset=record.offset)
    except StreamError as err:
        raise RestoreError(f"{path}: {err}") from None
    types = record.types
    bad = np.flatnonzero((types != Pfinfo.NOTAB) & (types != Pfinfo.XALLOC))
    if bad.size:
        raise _fail(path, "PAGE_DATA", record.offset,
                    f"pfn {int(record.pfns[bad[0]]):#x} has PFINFO type {int(types[bad[0]]):#x}; "
                    "HVM pages are NOTAB or XALLOC")
    gfns = record.pfns.astype(np.int64)
    pod = np.flatnonzero(physmap.p2m.types[gfns] == P2mType.POPULATE_ON_DEMAND)
    if pod.size:  # a gfn that was populated when saved is backed again, one run at a time
        _back(hv, physmap, np.sort(gfns[pod]), record, path)
    mfns = physmap.p2m.mfns[gfns].astype(np.int64)
    frames = hv.memory.u8.reshape(-1, PAGE_SIZE)
    has_data = types == Pfinfo.NOTAB
    frames[mfns[has_data]] = record.pages
    frames[mfns[~has_data]] = 0


def _back(hv: Hypervisor, physmap: GuestPhysmap, gfns: np.ndarray, record: PageDataRecord,
          path: Path) -> None:
    try:
        mfns = hv.frames.alloc(gfns.size, f"{physmap.owner} memory")
    except OutOfFrames as err:
        raise _fail(path, "PAGE_DATA", record.offset, str(err)) from None
    breaks = np.flatnonzero(np.diff(gfns) != 1) + 1
    done = 0
    try:
        for run, run_mfns in zip(np.split(gfns, breaks), np.split(mfns, breaks), strict=True):
            physmap.p2m.set_range(PFN(int(run[0])), run_mfns.astype(np.uint64), P2mType.RAM_RW)
            done += run.size
    except Exception as err:
        hv.frames.release(mfns[done:])  # the rest belongs to the physmap, released with it
        raise _fail(path, "PAGE_DATA", record.offset, f"cannot back pages: {err}") from None


def _count(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {value!r}")
    return value


def _flag(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{what} must be true or false, got {value!r}")
    return value


@dataclass
class _VcpuPlan:
    """One vCPU, checked and decoded, ready to install."""

    cpu: HvmHwCpu
    state: HvmVcpuState


@dataclass
class _DomainPlan:
    name: str
    virtual_ns: int
    console: bytes
    log_dirty: bool
    layout: HvmLayout
    stats: PhysmapStats
    violations: Counter[str]
    last_violation: tuple[int, int, int, str] | None
    repeats: int


def _finish(hv: Hypervisor, st: _Pending, path: Path, name: str | None) -> Domain:
    if st.meta is None or st.physmap is None or st.posted_mfn is None:
        raise RestoreError(f"{path}: no HVLAB_DOMAIN record: hvlab needs the domain's size "
                           "and its device state (docs/images.md)")
    if st.context_offset < 0:
        raise RestoreError(f"{path}: the image has no HVM_CONTEXT record")
    meta = st.meta
    try:
        vmeta = list(meta["vcpus"])
        if not 1 <= len(vmeta) <= MAX_VCPUS:
            raise ValueError(f"{len(vmeta)} vCPUs")
        domain = _plan_domain(meta, st.tsc_nsec, name or meta.get("name") or path.stem)
        if domain.layout.nr_pages != st.physmap.nr_pages or domain.layout.nr_vcpus != len(vmeta):
            raise ValueError("layout disagrees with the domain's size or vCPUs")
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise _fail(path, "HVLAB_DOMAIN", st.meta_offset, f"unreadable: {err}") from None
    plans = [_plan_vcpu(st, vid, extra, path) for vid, extra in enumerate(vmeta)]
    extra_keys = {key for key in st.context if key[1] >= len(vmeta)}
    if extra_keys:
        raise _fail(path, "HVM_CONTEXT", st.context_offset,
                    f"state for vCPU {min(k[1] for k in extra_keys)}, which does not exist")
    return _install(hv, st, domain, plans)


def _plan_domain(meta: dict[str, Any], tsc_nsec: int | None, name: str) -> _DomainPlan:
    if not isinstance(name, str) or not name:
        raise ValueError(f"name {name!r}")
    console = meta.get("console", "")
    if not isinstance(console, str):
        raise ValueError("console must be text")
    last = meta.get("last_violation")
    if last is not None:
        vid, rip, gfn, access = last
        last = (_count(vid, "last_violation"), _count(rip, "last_violation"),
                _count(gfn, "last_violation"), str(access))
    return _DomainPlan(
        name=name,
        virtual_ns=_count(meta.get("virtual_ns", tsc_nsec or 0), "virtual_ns"),
        console=console.encode("latin-1"),
        log_dirty=_flag(meta.get("log_dirty", False), "log_dirty"),
        layout=HvmLayout(**{k: _count(v, f"layout.{k}") for k, v in meta["layout"].items()}),
        stats=PhysmapStats(**{k: _count(v, f"physmap_stats.{k}")
                              for k, v in meta["physmap_stats"].items()}),
        violations=Counter({str(k): _count(n, "violations")
                            for k, n in dict(meta.get("violations", {})).items()}),
        last_violation=last,
        repeats=_count(meta.get("repeats", 0), "repeats"))


def _plan_vcpu(st: _Pending, vid: int, extra: dict[str, Any], path: Path) -> _VcpuPlan:
    def entry(typecode: int) -> bytes:
        if (typecode, vid) not in st.context:
            raise _fail(path, "HVM_CONTEXT", st.context_offset,
                        f"no {hvm_type_name(typecode)} entry for vCPU {vid}")
        return st.context[(typecode, vid)][0]

    try:
        cpu = HvmHwCpu.unpack(entry(HVM_SAVE_CPU))
    except StreamError as err:
        raise _fail(path, "HVM_CONTEXT", st.context_offset, str(err)) from None
    _check_cpu(cpu, vid, st, path)
    where = f"vCPU {vid}"
    try:
        state = from_plain(HvmVcpuState, extra, "vcpu")
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise _fail(path, "HVLAB_DOMAIN", st.meta_offset, f"{where}: unreadable: {err}") from None
    # The Xen records must stand on their own (another reader relies on them) ...
    try:
        VLapic.from_hvm_records(entry(HVM_SAVE_LAPIC), entry(HVM_SAVE_LAPIC_REGS),
                                state.lapic.now_ns, lambda *_: None)
    except VLapicError as err:
        raise _fail(path, "HVM_CONTEXT", st.context_offset, f"{where}: {err}") from None
    # ... and the hvlab state must be one the models accept (checked on scratch objects).
    try:
        check_hvm_vcpu_state(state, vid)
    except ValueError as err:
        raise _fail(path, "HVLAB_DOMAIN", st.meta_offset, f"{where}: {err}") from None
    return _VcpuPlan(cpu, state)


def _check_cpu(cpu: HvmHwCpu, vid: int, st: _Pending, path: Path) -> None:
    """hvlab runs HVM guests in 64-bit paged mode only; selectors must lie in the GDT."""
    def fail(reason: str) -> RestoreError:
        return _fail(path, "HVM_CONTEXT", st.context_offset, f"CPU of vCPU {vid}: {reason}")

    if cpu.cr0 & CR0_PE_PG != CR0_PE_PG or not cpu.msr_efer & EFER_LMA:
        raise fail(f"not in 64-bit paged mode (cr0 {cpu.cr0:#x}, efer {cpu.msr_efer:#x})")
    for seg in SEGMENTS:
        sel = getattr(cpu, f"{seg}_sel")
        index = sel & ~7
        if sel > 0xFFFF or sel & 4 or (index and index + 7 > cpu.gdtr_limit):
            raise fail(f"{seg} selector {sel:#x} is not in the GDT (limit {cpu.gdtr_limit:#x})")
    if cpu.cs_sel & ~7 == 0:
        raise fail("null code segment")
    if cpu.cr3 >> 12 >= (st.physmap.nr_pages if st.physmap else 0):
        raise fail(f"CR3 {cpu.cr3:#x} lies beyond the domain")


def _install(hv: Hypervisor, st: _Pending, plan: _DomainPlan, vcpus: list[_VcpuPlan]
             ) -> Domain:
    """Make the domain: everything was checked, so nothing below is expected to fail."""
    physmap, posted_mfn = st.physmap, st.posted_mfn
    assert physmap is not None and posted_mfn is not None
    support = hvm_policy(hv)
    physmap.stats = plan.stats
    if plan.log_dirty and not st.adopted:  # adopted: the P2M came with its log
        physmap.enable_logdirty()  # a fresh log: what was dirty before the save is not kept
    dom = Domain(len(hv.domains), plan.name, support, physmap.p2m.mfns, 0)
    dom.hvm = HvmDomain(physmap, plan.layout, posted_mfn, plan.violations,
                        plan.last_violation, plan.repeats)
    dom.time_offset = plan.virtual_ns - hv.now
    dom.console += plan.console
    for cpu in hv.pcpus:
        support.lapic_window.install(cpu, support._current_on(cpu.index))
    try:
        for vid, vplan in enumerate(vcpus):
            dom.vcpus.append(_make_vcpu(hv, dom, vid, vplan, posted_mfn, not st.adopted))
        hv.domains.append(dom)
        for v, vplan in zip(dom.vcpus, vcpus, strict=True):
            hv.start_vcpu_with(v, partial(_load_registers, cpu_state=vplan.cpu, physmap=physmap))
            v.runstate = vplan.state.runstate
    except BaseException:
        for v in dom.vcpus:
            hv.scheduler.remove(v)
            if hv.loaded[v.pcpu] is v:
                hv.loaded[v.pcpu] = None
        if hv.domains and hv.domains[-1] is dom:
            hv.domains.pop()
        raise
    return dom


def _make_vcpu(hv: Hypervisor, dom: Domain, vid: int, plan: _VcpuPlan, posted_mfn: int,
               write_descriptor: bool = True) -> Vcpu:
    support = hvm_policy(hv)
    v = support._create_vcpu(dom, vid, posted_mfn)
    state = plan.state
    if state.pcpu != v.pcpu and state.pcpu < len(hv.pcpus):  # keep the saved placement
        hv.scheduler.remove(v)
        v.pcpu = state.pcpu
        hv.scheduler.runqueues[state.pcpu].append(v)
    v.mmu.cr3 = support._cr3_reader(v, plan.cpu.cr3)
    # a live update adopts the descriptor: sources may have posted into it
    restore_hvm_vcpu(v, state, write_descriptor=write_descriptor,
                     notify=partial(support._notified, v))
    return v


class _QuietMmu:
    """A read-only guest walk for the saver's GDT reads and the restorer's selector loads.

    The real walker sets Accessed bits in the guest's page tables, which the guest may have
    cleared on purpose (hvm_memtouch does): saving (or restoring) through it would give the
    guest memory the uninterrupted run never had. This walk only reads. (Unicorn 2.1.4 does
    not read the GDT when a selector is written in 64-bit mode; should it, the restorer's
    loads stay quiet too.)
    """

    def __init__(self, memory: HostMemory, physmap: GuestPhysmap, cr3: int) -> None:
        self.memory, self.physmap, self.cr3 = memory, physmap, cr3
        self.last_fault: object = None

    def flush(self) -> None:
        """Nothing is cached: every translation walks afresh."""

    def translate(self, gva: int, _access: str) -> tuple[int, int] | None:
        u64 = self.memory.u64
        table = self.cr3 & ADDR_MASK
        for level in (4, 3, 2, 1):
            ma = self.physmap.gpa_to_ma(table)
            if ma is None:
                return None
            entry = int(u64[(ma >> 3) + ((gva >> (3 + 9 * level)) & 511)])
            if not entry & P:
                return None
            table = entry & ADDR_MASK
            if level in (3, 2) and entry & PSE:  # a 1 GiB / 2 MiB page
                span = (1 << (3 + 9 * level)) - 1
                table = (table & ~span) | (gva & span & ~0xFFF)
                break
        page = self.physmap.gpa_to_ma(table)
        return None if page is None else (page, PERM_R | PERM_W)


def _load_registers(cpu: PhysicalCpu, *, cpu_state: HvmHwCpu, physmap: GuestPhysmap) -> None:
    """Write a CPU record onto a reset CPU: control state, tables, selectors, then the rest."""
    c = cpu_state
    real_mmu = cpu.mmu
    cpu.mmu = _QuietMmu(cpu.memory, physmap, c.cr3)
    cpu.set_reg("efer", c.msr_efer)
    for name in ("cr4", "cr3", "cr0"):
        cpu.set_reg(name, getattr(c, name))
    cpu.set_descriptor_table("gdtr", c.gdtr_base, c.gdtr_limit)
    cpu.set_descriptor_table("idtr", c.idtr_base, c.idtr_limit)
    for seg in SEGMENTS:  # selectors load their descriptors from the GDT
        cpu.set_reg(seg, getattr(c, f"{seg}_sel"))
    cpu.mmu = real_mmu
    cpu.flush_tlb()  # forget the quiet translations
    for name in (*GPRS, "rip", "rflags", "cr2", "fs_base", "gs_base"):
        cpu.set_reg(name, getattr(c, name))
    fpu = c.fpu_regs
    cpu.set_reg("mxcsr", int.from_bytes(fpu[FXSAVE_MXCSR:FXSAVE_MXCSR + 4], "little"))
    for i in range(16):
        start = FXSAVE_XMM0 + 16 * i
        cpu.set_reg(f"xmm{i}", int.from_bytes(fpu[start:start + 16], "little"))


def _undo(hv: Hypervisor, st: _Pending) -> None:
    """Scrub and give back every frame the restore took (RAM, EPT tables, descriptors)."""
    if st.adopted:  # only the EPT tables were ours; guest frames and descriptors stay
        if st.physmap is not None and st.physmap.p2m.ept is not None:
            st.physmap.p2m.drop_ept()
        st.physmap = st.posted_mfn = None
        return
    if st.physmap is not None:
        frames = st.physmap.owned_frames().astype(np.int64)
        hv.memory.u64.reshape(-1, 512)[frames] = 0
        hv.frames.release(frames)
        st.physmap = None
    if st.posted_mfn is not None:
        hv.memory.zero_frame(MFN(st.posted_mfn))
        hv.frames.release([st.posted_mfn])
        st.posted_mfn = None
