"""Saving a PV domain as a migration-stream v2 image (docs/images.md).

The domain must be paused (the hypervisor is between slices). Page-table
pages are *normalised* (each present entry's MFN replaced by its PFN) so the
image does not depend on the host frames it came from; pages that are all
zero go out as XALLOC without data. HVM domains are saved by hypervisor/hvm/image.py;
`hypervisor/images/domains.py` saves either kind.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from emulator.addr import PAGE_SIZE
from emulator.paging import ADDR_MASK, P
from hypervisor.core.evtchn import Port
from hypervisor.core.hypervisor import TSC_KHZ
from hypervisor.core.vcpu import DOWN
from hypervisor.lib.errors import SaveError
from hypervisor.lib.extents import runs_of
from hypervisor.mm.builds import PageType
from hypervisor.pv.vcpu import save_pv_vcpu
from hypervisor.pv.xen import image as xen_image
from hypervisor.stream import DomainType, Pfinfo, StreamWriter, open_image_for_write
from hypervisor.stream.hvlab_records import HVLAB_DOMAIN_RECORD, HVLAB_MACHINE_FRAMES_RECORD
from hypervisor.stream.hvlab_records import PAGE_DATA_BATCH as BATCH
from hypervisor.stream.plain import to_plain
from hypervisor.stream.vcpu_context import (
    VGCF_I387_VALID,
    VGCF_IN_KERNEL,
    VGCF_ONLINE,
    CpuUserRegs,
    TrapInfo,
    VcpuGuestContext,
)

if TYPE_CHECKING:
    from hypervisor.core.domain import Domain
    from hypervisor.core.hypervisor import Hypervisor
    from hypervisor.mm.frametable import FrameTable

HVLAB_DOMAIN_VERSION = 1
HYPERVISOR_L4_SLOTS = slice(256, 272)
FXSAVE_MXCSR, FXSAVE_XMM0 = 24, 160
PIN_OFFSET = Pfinfo.L1TAB_PIN - Pfinfo.L1TAB  # L1TAB_PIN .. L4TAB_PIN follow L1TAB .. L4TAB

_USER_REG_NAMES = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8",
                   "rax", "rcx", "rdx", "rsi", "rdi", "rip", "rflags", "rsp",
                   "cs", "ss", "ds", "es")


@dataclass(frozen=True)
class PageClasses:
    """The PFINFO type of every pfn of a domain (vectorised)."""

    types: np.ndarray  # uint8 per pfn: NOTAB, LnTAB or LnTAB_PIN
    levels: np.ndarray  # uint8 per pfn: 0, or the page-table level


def classify_pages(hv: Hypervisor, dom: Domain) -> PageClasses:
    """Decode every frame's type once; counts and pins only for page-table candidates
    (a few thousand frames of a 64 GiB guest, not millions)."""
    ft = hv.frame_table
    mfns = dom.p2m.view(np.int64) if dom.p2m.dtype == np.uint64 else dom.p2m.astype(np.int64)
    types = _frame_types(ft, mfns)
    candidates = np.flatnonzero((types >= PageType.L1) & (types <= PageType.L4))
    pfinfo = np.full(mfns.size, Pfinfo.NOTAB, dtype=np.uint8)
    pfinfo[candidates] = table_pfinfo(ft, mfns[candidates])
    levels = np.where(pfinfo != Pfinfo.NOTAB, types, 0).astype(np.uint8)
    return PageClasses(pfinfo, levels)


def table_pfinfo(ft: FrameTable, mfns: np.ndarray) -> np.ndarray:
    """The PFINFO type (uint8) of the given frames: LnTAB or LnTAB_PIN for a page table
    in use (type count > 0), NOTAB for anything else."""
    types = ft.types(mfns)
    live = (types >= PageType.L1) & (types <= PageType.L4) & (ft.type_counts(mfns) > 0)
    pfinfo = np.full(mfns.size, Pfinfo.NOTAB, dtype=np.uint8)
    pfinfo[live] = (types[live] + np.where(ft.pinned(mfns[live]), PIN_OFFSET, 0)).astype(np.uint8)
    return pfinfo


def _frame_types(ft, mfns: np.ndarray, chunk: int = 1 << 20) -> np.ndarray:
    """The type of every frame (uint8), decoded a chunk at a time from contiguous runs of
    the frame table where the frames are consecutive (no gather): temporaries of a few
    MB, reused, instead of hundreds of fresh MB for a 64 GiB guest."""
    out = np.empty(mfns.size, dtype=np.uint8)
    runs = runs_of(mfns)
    if runs is None:
        for start in range(0, mfns.size, chunk):
            out[start : start + chunk] = ft.types(mfns[start : start + chunk])
        return out
    for index, first, count in runs.tolist():
        for offset in range(0, count, chunk):
            n = min(chunk, count - offset)
            rows = slice(first + offset, first + offset + n)
            out[index + offset : index + offset + n] = ft.layout.type_of(ft.type_info[rows])
    return out


def normalise_tables(pages: np.ndarray, levels: np.ndarray, m2p: np.ndarray) -> np.ndarray:
    """Page-table pages with present entries' MFNs replaced by PFNs (a copy)."""
    entries = pages.view(np.uint64).reshape(-1, 512).copy()
    present = (entries & np.uint64(P)) != 0
    mfn = (entries & np.uint64(ADDR_MASK)) >> np.uint64(12)
    pfn = m2p[np.where(present, mfn, 0).astype(np.int64)]
    normalised = (entries & ~np.uint64(ADDR_MASK)) | (pfn << np.uint64(12))
    entries = np.where(present, normalised, entries)
    entries[levels == 4, HYPERVISOR_L4_SLOTS] = 0
    return entries.view(np.uint8).reshape(-1, PAGE_SIZE)


def vcpu_context(hv: Hypervisor, v, normalise: bool = True) -> VcpuGuestContext:
    """The vCPU as Xen's vcpu_guest_context; CR3s as PFNs (images) or MFNs (hand-over)."""
    regs = hv.read_vcpu_registers(v)
    user = CpuUserRegs(**{name: regs[name] for name in _USER_REG_NAMES})
    fpu = bytearray(512)
    fpu[FXSAVE_MXCSR : FXSAVE_MXCSR + 4] = regs["mxcsr"].to_bytes(4, "little")
    for i in range(16):
        start = FXSAVE_XMM0 + 16 * i
        fpu[start : start + 16] = regs[f"xmm{i}"].to_bytes(16, "little")
    ctx = VcpuGuestContext(fpu_ctxt=bytes(fpu), user_regs=user)
    ctx.flags = VGCF_IN_KERNEL | VGCF_I387_VALID | (0 if v.runstate == DOWN else VGCF_ONLINE)
    for entry in v.trap_table.values():
        ctx.trap_ctxt[entry.vector] = TrapInfo(entry.vector, entry.flags, entry.cs, entry.address)
    def frame(ma: int) -> int:
        return int(hv.m2p[ma >> 12]) if normalise else ma >> 12

    ctx.ctrlreg = [regs["cr0"], 0, regs["cr2"], 0, regs["cr4"], 0, 0, 0]
    ctx.ctrlreg[3] = frame(v.roots.kernel_ma) << 12
    if v.roots.user_ma:
        ctx.user_table = frame(v.roots.user_ma)
    ctx.event_callback_eip = v.event_callback
    ctx.failsafe_callback_eip = v.failsafe_callback
    ctx.syscall_callback_eip = v.syscall_callback
    ctx.fs_base = regs["fs_base"]
    ctx.gs_base_kernel = regs["gs_base"]
    ctx.kernel_ss = regs["ss"]
    if v.xen is not None:  # Xen's PV ABI at CPL 3: mode, stacks, GS bases, GDT, assists
        xen_image.fill_vcpu_context(ctx, v, regs, frame)
    return ctx


def domain_state(hv: Hypervisor, dom: Domain,
                 page_entries: list[list[int]] | None = None) -> dict[str, Any]:
    """hvlab's own state that Xen's records do not carry (the HVLAB_DOMAIN record)."""
    ev = dom.events.save()
    xen_abi = xen_image.is_xen_abi(dom)
    state: dict[str, Any] = {
        "version": HVLAB_DOMAIN_VERSION,
        "name": dom.name,
        "virtual_ns": hv.now + dom.time_offset,
        "console": dom.console.decode("latin-1"),  # byte-exact round trip
        "start_info_pfn": (dom.start_info_va - dom.virt_base) // PAGE_SIZE,
        # a CPL-3 domain's shared_info is a hypervisor page, no pfn of the guest
        "shared_info_pfn": None if xen_abi else dom.shared_info_pfn,
        "virt_base": dom.virt_base,
        "evtchn": {
            "ports": [{"port": port, **vars(p)} for port, p in sorted(ev.ports.items())],
            "sent": ev.sent,
            "raised": ev.raised,
        },
        "shutdown": None if dom.shutdown is None else vars(dom.shutdown),
        "crash_report": dom.crash_report,
        "vcpus": [to_plain(save_pv_vcpu(v)) for v in dom.vcpus],
    }
    if xen_abi:
        for v, entry in zip(dom.vcpus, state["vcpus"], strict=True):
            entry["xen"] = xen_image.xen_vcpu_meta(hv, v, hv.read_vcpu_registers(v))
        state["linux"] = xen_image.linux_meta(hv, dom, page_entries or [])
    return state


def port_from_json(entry: dict[str, Any]) -> tuple[int, Port]:
    fields = {k: v for k, v in entry.items() if k != "port"}
    return entry["port"], Port(**fields)


def save_pv_domain(hv: Hypervisor, dom: Domain, path: str | Path) -> dict[str, Any]:
    """Write PV domain `dom` to `path` (zstd if it ends in .zst); returns statistics."""
    if not dom.alive:
        raise SaveError(f"domain {dom.name} has shut down: nothing to save")
    started = time.perf_counter()
    classes = classify_pages(hv, dom)
    nr_pages = dom.nr_pages
    mfns = dom.p2m.astype(np.int64)
    resident = hv.memory.resident_frames()
    frames = hv.memory.u8.reshape(-1, PAGE_SIZE)
    stats: dict[str, int | float] = {"pages": nr_pages, "data_pages": 0, "xalloc_pages": 0,
                                     "page_tables": 0, "pins": 0}
    p2m_frames = p2m_frame_pfns(hv, dom)
    xen_abi = xen_image.is_xen_abi(dom)
    page_entries = (xen_image.hypervisor_page_entries(hv, dom, np.flatnonzero(classes.levels))
                    if xen_abi else [])
    hidden: dict[int, list[int]] = {}  # table pfn -> slots mapping a hypervisor page
    for pfn, slot, _flags, _page in page_entries:
        hidden.setdefault(pfn, []).append(slot)
    major, minor = hv.build_version
    with open_image_for_write(path) as f:
        w = StreamWriter(f, DomainType.X86_PV, xen_major=major, xen_minor=minor)
        w.write_x86_pv_info(8, 4)
        w.write_x86_pv_p2m_frames(0, nr_pages - 1, p2m_frames)
        if xen_abi:  # where it lived: a restore puts it back there if it can
            published = xen_image.linear_p2m_pfns(hv, dom) is not None
            w.write_record(HVLAB_MACHINE_FRAMES_RECORD, json.dumps(
                xen_image.machine_frames(dom, relocatable=published)).encode())
        for start in range(0, nr_pages, BATCH):
            stop = min(start + BATCH, nr_pages)
            batch_mfns = mfns[start:stop]
            types = classes.types[start:stop].copy()
            levels = classes.levels[start:stop]
            touched = resident[batch_mfns] if resident is not None else np.ones(stop - start, bool)
            pages = frames[batch_mfns[touched]]
            nonzero = np.zeros(stop - start, dtype=bool)
            nonzero[touched] = pages.any(axis=1)
            keep = nonzero | (levels > 0)  # a table travels as a table even when empty
            types[~keep] = Pfinfo.XALLOC
            data = frames[batch_mfns[keep]]
            is_table = levels[keep] > 0
            if is_table.any():
                data[is_table] = normalise_tables(data[is_table], levels[keep][is_table], hv.m2p)
            for row, kept_pfn in enumerate(np.flatnonzero(keep) + start if hidden else ()):
                for slot in hidden.get(int(kept_pfn), ()):  # hypervisor pages: not present
                    data[row].view(np.uint64)[slot] = 0
            w.write_page_data(np.arange(start, stop, dtype=np.uint64), types, data)
            stats["data_pages"] += int(keep.sum())
            stats["xalloc_pages"] += int((~keep).sum())
            stats["page_tables"] += int((levels > 0).sum())
            stats["pins"] += int(((types >= Pfinfo.L1TAB_PIN) & (types <= Pfinfo.L4TAB_PIN)).sum())
        w.write_shared_info(bytes(hv.memory.frame_u8(dom.shared_info_mfn)))
        for v in dom.vcpus:
            if v.context is not None:
                w.write_x86_pv_vcpu_basic(v.vcpu_id, vcpu_context(hv, v))
        w.write_x86_tsc_info(0, TSC_KHZ, hv.now + dom.time_offset, 0)
        w.write_record(HVLAB_DOMAIN_RECORD,
                       json.dumps(domain_state(hv, dom, page_entries)).encode())
        w.write_end()
        stats["bytes"] = w.offset
    stats["wall_s"] = round(time.perf_counter() - started, 6)
    return stats


def p2m_frame_pfns(hv: Hypervisor, dom: Domain) -> np.ndarray:
    """The pfns of the pages holding the guest's P2M list: the one Linux published in
    shared_info, else the one start_info.mfn_list names."""
    if xen_image.is_xen_abi(dom):
        try:
            linear = xen_image.linear_p2m_pfns(hv, dom)
            if linear is not None:
                return linear
            return xen_image.start_info_p2m_pfns(hv, dom, dom.vcpus[0].roots.kernel_ma)
        except ValueError as err:
            raise SaveError(f"domain {dom.name}: its P2M list cannot be read: {err}") from None
    start_info = hv.memory.read(int(dom.p2m[(dom.start_info_va - dom.virt_base) // PAGE_SIZE])
                                * PAGE_SIZE, 112)
    first = (int.from_bytes(start_info[104:112], "little") - dom.virt_base) // PAGE_SIZE
    return np.arange(first, first + -(-dom.nr_pages * 8 // PAGE_SIZE), dtype=np.uint64)


def domain_digest(hv: Hypervisor, dom: Domain) -> list[str]:
    """A hash of every pfn's contents, page tables normalised: equal across hosts."""
    import hashlib

    classes = classify_pages(hv, dom)
    frames = hv.memory.u8.reshape(-1, PAGE_SIZE)
    digests = []
    for start in range(0, dom.nr_pages, BATCH):
        stop = min(start + BATCH, dom.nr_pages)
        pages = frames[dom.p2m[start:stop].astype(np.int64)]
        levels = classes.levels[start:stop]
        if (levels > 0).any():
            pages[levels > 0] = normalise_tables(pages[levels > 0], levels[levels > 0], hv.m2p)
        digests += [hashlib.sha256(page.tobytes()).hexdigest()[:16] for page in pages]
    return digests
