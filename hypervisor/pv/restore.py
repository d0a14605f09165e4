"""Restoring a PV domain from a migration-stream v2 image (docs/images.md).

All or nothing: the image is read record by record into freshly allocated
frames (a CPL-3 image's own frames again when they are free: HVLAB_MACHINE_FRAMES,
pv/xen/image.py); page tables are *localised* (PFN -> new MFN); then, as Xen's restore
does, the pinned tables are pinned through get_page_type, which validates
every table reachable from them, and each vCPU's CR3 takes its reference.
Any problem raises `RestoreError` naming the record and its offset, after
the hypervisor has been put back exactly as it was (no frame allocated, the
frame table rows of the would-be domain free again). HVM images are restored by
hypervisor/hvm/image.py; `hypervisor/images/domains.py` restores either kind.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from emulator.addr import PAGE_SIZE
from emulator.paging import ADDR_MASK, P
from hypervisor.core.domain import Shutdown
from hypervisor.core.evtchn import EventChannelState
from hypervisor.core.vcpu import TrapEntry
from hypervisor.lib.errors import RestoreError
from hypervisor.mm.errors import errno_name
from hypervisor.mm.rebuild import rebuild_from_roots
from hypervisor.mm.typerefs import Root
from hypervisor.pv.domain import install_pv_domain
from hypervisor.pv.save import FXSAVE_MXCSR, FXSAVE_XMM0, HVLAB_DOMAIN_VERSION, port_from_json
from hypervisor.pv.vcpu import PvVcpuState, restore_pv_vcpu, start_pv_vcpu
from hypervisor.pv.xen import image as xen_image
from hypervisor.stream import (
    EndRecord,
    OpaqueRecord,
    PageDataRecord,
    Pfinfo,
    SharedInfoRecord,
    StreamError,
    StreamReader,
    X86PvInfoRecord,
    X86PvP2mFramesRecord,
    X86PvVcpuBasicRecord,
    X86TscInfoRecord,
    check_pfns,
)
from hypervisor.stream.hvlab_records import HVLAB_DOMAIN_RECORD, HVLAB_MACHINE_FRAMES_RECORD
from hypervisor.stream.plain import from_plain
from hypervisor.stream.vcpu_context import VGCF_ONLINE, VcpuGuestContext

if TYPE_CHECKING:
    from hypervisor.core.domain import Domain
    from hypervisor.core.hypervisor import Hypervisor

MAX_VCPUS = 32
PFN_BITS_MASK = (1 << 52) - 1


@dataclass
class _Pending:
    """What has been read so far, before the domain exists."""

    nr_pages: int = 0
    p2m: np.ndarray | None = None
    p2m_list_pfns: np.ndarray | None = None
    seen: np.ndarray | None = None
    pins: list[tuple[int, int, int]] = field(default_factory=list)  # (pfn, level, offset)
    tables: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # (pfns, levels)
    shared_info: bytes | None = None
    vcpus: dict[int, tuple[VcpuGuestContext, int]] = field(default_factory=dict)
    tsc_nsec: int | None = None
    hvlab: dict[str, Any] | None = None
    # a CPL-3 domain's hypervisor pages, claimed: shared_info, then its grant frames
    hypervisor_pages: list[int] = field(default_factory=list)
    in_place: bool = False  # on the machine frames it was saved from


def restore_pv_domain(hv: Hypervisor, reader: StreamReader, path: Path,
                      name: str | None = None) -> Domain:
    """Restore the PV image `reader` is positioned in (after its headers) as a new domain.

    Raises RestoreError (or StreamError, which the caller words) with `hv` left as it was.
    """
    state = _Pending()
    domid = len(hv.domains)
    try:
        for record in reader:
            _apply(hv, state, record, domid, path)
            if isinstance(record, EndRecord):
                break
        return _finish(hv, state, domid, path, name)
    except BaseException:
        _undo(hv, state)
        raise


def _fail(path: Path, record: str, offset: int, reason: str) -> RestoreError:
    return RestoreError(f"{path}: record {record} at offset {offset:#x}: {reason}")


def _apply(hv: Hypervisor, st: _Pending, record, domid: int, path: Path) -> None:
    match record:
        case X86PvInfoRecord(guest_width=width, pt_levels=levels):
            if (width, levels) != (8, 4):
                raise _fail(path, "X86_PV_INFO", record.offset,
                            f"only 64-bit 4-level guests (got width {width}, {levels} levels)")
        case X86PvP2mFramesRecord(start_pfn=start, end_pfn=end, p2m_pfns=pfns):
            if st.seen is not None:
                raise _fail(path, "X86_PV_P2M_FRAMES", record.offset, "a second P2M_FRAMES")
            if start != 0 or end < 0:
                raise _fail(path, "X86_PV_P2M_FRAMES", record.offset,
                            f"p2m range {start}..{end} does not start at pfn 0")
            st.nr_pages = end + 1
            if st.nr_pages > hv.frames.nr_free:
                raise _fail(path, "X86_PV_P2M_FRAMES", record.offset,
                            f"the domain needs {st.nr_pages} frames, the host has "
                            f"{hv.frames.nr_free} free")
            if pfns.size and int(pfns.max()) >= st.nr_pages:
                raise _fail(path, "X86_PV_P2M_FRAMES", record.offset,
                            "a P2M list frame lies beyond the domain")
            st.p2m_list_pfns = pfns.astype(np.int64)
            st.seen = np.zeros(st.nr_pages, dtype=bool)
        case OpaqueRecord(type=rtype, body=body) if rtype == HVLAB_MACHINE_FRAMES_RECORD:
            _place(hv, st, body, record.offset, domid, path)
        case PageDataRecord():
            if st.seen is not None and st.p2m is None:
                _allocate(hv, st, domid, path)
            _load_pages(hv, st, record, path)
        case SharedInfoRecord(page=page):
            st.shared_info = bytes(page)
        case X86PvVcpuBasicRecord(vcpu_id=vid):
            if not 0 <= vid < MAX_VCPUS or vid in st.vcpus:
                raise _fail(path, "X86_PV_VCPU_BASIC", record.offset,
                            f"vCPU id {vid} is out of range or repeated")
            st.vcpus[vid] = (record.guest_context(), record.offset)
        case X86TscInfoRecord(nsec=nsec):
            st.tsc_nsec = nsec
        case OpaqueRecord(type=rtype, body=body) if rtype == HVLAB_DOMAIN_RECORD:
            try:
                st.hvlab = json.loads(body)
                if st.hvlab.get("version") != HVLAB_DOMAIN_VERSION:
                    raise ValueError(f"version {st.hvlab.get('version')}")
            except (ValueError, AttributeError) as err:
                raise _fail(path, "HVLAB_DOMAIN", record.offset, f"unreadable: {err}") from None


def _allocate(hv: Hypervisor, st: _Pending, domid: int, path: Path) -> None:
    """Fresh frames for the domain, wherever the allocator has them."""
    st.p2m = hv.frames.alloc(st.nr_pages, f"restored domain {path.name}")
    hv.claim_frames(st.p2m, domid)


def _place(hv: Hypervisor, st: _Pending, body: bytes, offset: int, domid: int,
           path: Path) -> None:
    """The machine frames the image was saved from: claim them if all are free, else
    relocate, which an image saved before its P2M list was published refuses."""
    name = "HVLAB_MACHINE_FRAMES"
    if st.seen is None or st.p2m is not None:
        raise _fail(path, name, offset, "must come after X86_PV_P2M_FRAMES, before PAGE_DATA")
    try:
        raw = json.loads(body)
        p2m = xen_image.machine_frames_p2m(raw, st.nr_pages)
        pages = np.array([int(m) for m in raw["hypervisor_pages"]], dtype=np.int64)
        relocatable = bool(raw["relocatable"])
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise _fail(path, name, offset, f"unreadable: {err}") from None
    wanted = np.concatenate((p2m, pages))
    inside = (wanted > 0) & (wanted < hv.frames.nr_frames)
    busy = ~inside
    busy[inside] = ~hv.frames.free[wanted[inside]]
    if not busy.any() and np.unique(wanted).size == wanted.size:
        hv.frames.mark_used(wanted)
        st.p2m = p2m.astype(np.uint64)
        hv.claim_frames(st.p2m, domid)
        st.hypervisor_pages = pages.tolist()
        hv.frame_table.assign(pages.astype(np.uint64), domid)
        st.in_place = True
    elif relocatable:
        _allocate(hv, st, domid, path)
    else:
        raise _fail(path, name, offset,
                    "saved before the guest published its P2M list in shared_info, so it restores "
                    f"only onto the machine frames it was saved from, and {int(busy.sum())} of "
                    f"them are in use or beyond this machine's {hv.frames.nr_frames} frames")


def _load_pages(hv: Hypervisor, st: _Pending, record: PageDataRecord, path: Path) -> None:
    if st.p2m is None or st.seen is None:
        raise _fail(path, "PAGE_DATA", record.offset, "page data before X86_PV_P2M_FRAMES")
    pfns = record.pfns.astype(np.int64)
    types = record.types
    try:
        check_pfns(record.pfns, st.nr_pages, st.seen, offset=record.offset)
    except StreamError as err:
        raise RestoreError(f"{path}: {err}") from None
    if np.isin(types, (Pfinfo.BROKEN, Pfinfo.XTAB)).any():
        raise _fail(path, "PAGE_DATA", record.offset, "broken or XTAB pages cannot be restored")
    has_data = ~np.isin(types, (Pfinfo.XALLOC, Pfinfo.BROKEN, Pfinfo.XTAB))
    data = record.pages.copy()
    levels = np.where(np.isin(types & 0x7, (1, 2, 3, 4)) & has_data, types & 0x7, 0)
    data_levels = levels[has_data]
    tables = data_levels > 0
    if tables.any():
        data[tables] = _localise(data[tables], st, record, path, pfns[has_data][tables])
    hv.memory.u8.reshape(-1, PAGE_SIZE)[st.p2m[pfns[has_data]].astype(np.int64)] = data
    pinned = np.flatnonzero((types & 0x8).astype(bool) & (levels > 0))
    st.pins += [(int(pfns[i]), int(levels[i]), record.offset) for i in pinned]
    st.tables.append((pfns[levels > 0], levels[levels > 0]))


def _localise(pages: np.ndarray, st: _Pending, record: PageDataRecord, path: Path,
              pfns: np.ndarray) -> np.ndarray:
    entries = pages.view(np.uint64).reshape(-1, 512)
    present = (entries & np.uint64(P)) != 0
    target = ((entries & np.uint64(ADDR_MASK)) >> np.uint64(12)).astype(np.int64)
    beyond = present & (target >= st.nr_pages)
    if beyond.any():
        page, slot = np.argwhere(beyond)[0]
        raise _fail(path, "PAGE_DATA", record.offset,
                    f"page table at pfn {int(pfns[page])} entry {int(slot)} points to pfn "
                    f"{int(target[page, slot])}, beyond the domain's {st.nr_pages} pages")
    assert st.p2m is not None  # allocated when X86_PV_P2M_FRAMES was read
    mfn = st.p2m[np.where(present, target, 0)].astype(np.uint64)
    local = (entries & ~np.uint64(ADDR_MASK)) | (mfn << np.uint64(12))
    return np.where(present, local, entries).view(np.uint8).reshape(-1, PAGE_SIZE)


def _finish(hv: Hypervisor, st: _Pending, domid: int, path: Path, name: str | None) -> Domain:
    if st.seen is None:
        raise RestoreError(f"{path}: the image has no X86_PV_P2M_FRAMES record")
    if st.p2m is None:
        _allocate(hv, st, domid, path)
    assert st.p2m is not None
    if st.hvlab is None:
        raise RestoreError(f"{path}: no HVLAB_DOMAIN record: hvlab needs its start_info and "
                           f"shared_info pfns (docs/images.md)")
    if 0 not in st.vcpus:
        raise RestoreError(f"{path}: no X86_PV_VCPU_BASIC record for vCPU 0")
    meta = st.hvlab
    meta.setdefault("virtual_ns", st.tsc_nsec or 0)
    linux = meta.get("linux")
    pfns_named = [(meta, "start_info_pfn")] + ([(linux, "console_pfn"), (linux, "xenstore_pfn")]
                                               if linux else [(meta, "shared_info_pfn")])
    for where, key in pfns_named:
        if not 0 <= int(where.get(key, -1)) < st.nr_pages:
            raise RestoreError(f"{path}: record HVLAB_DOMAIN: {key} lies outside the domain")
    try:
        vcpu_states(meta)
    except (ValueError, TypeError) as err:
        raise RestoreError(f"{path}: record HVLAB_DOMAIN: {err}") from None
    # The guest's own copies of machine addresses: its P2M list and start_info.
    _rewrite_p2m_list(hv, st)
    start_info_ma = int(st.p2m[meta["start_info_pfn"]]) * PAGE_SIZE
    if linux:  # Xen's shared_info and grant frames, mapped again where the guest had them
        _hypervisor_pages(hv, st, linux, domid, path)
        shared_info_mfn = st.hypervisor_pages[0]
        for offset, key in ((56, "xenstore_pfn"), (72, "console_pfn")):
            hv.memory.write_u64(start_info_ma + offset, int(st.p2m[linux[key]]))
    else:
        shared_info_mfn = int(st.p2m[meta["shared_info_pfn"]])
    if st.shared_info is not None:
        hv.memory.write(shared_info_mfn * PAGE_SIZE, st.shared_info)
    hv.memory.write_u64(start_info_ma + 40, shared_info_mfn * PAGE_SIZE)
    # Restoring validates, as Xen's restore does: pin what was pinned, then take each
    # vCPU's CR3 references. The bulk validator gives exactly the reference's frame
    # table (and refusals) in vectorised passes: a 64 GiB guest in seconds; the
    # saved levels tell which entries are linear, and their targets are
    # validated first (mm/rebuild.py).
    roots: list[Root] = []
    blame: list[tuple[str, int, str]] = []  # per root: record, offset, what it was
    for pfn, level, offset in st.pins:
        roots.append(Root(int(st.p2m[pfn]), level, True))
        blame.append(("PAGE_DATA", offset, f"pinning the L{level} table at pfn {pfn}"))
    bases: dict[int, tuple[int, int]] = {}
    for vid, (ctx, offset) in sorted(st.vcpus.items()):
        cr3_pfn, user_pfn = ctx.ctrlreg[3] >> 12, ctx.user_table
        if cr3_pfn >= st.nr_pages or (user_pfn or 0) >= st.nr_pages:
            raise _fail(path, "X86_PV_VCPU_BASIC", offset, "CR3 lies beyond the domain")
        base = int(st.p2m[cr3_pfn])
        user = int(st.p2m[user_pfn]) if user_pfn is not None else 0
        for root in (base, user) if user else (base,):
            roots.append(Root(root, 4, False))
            blame.append(("X86_PV_VCPU_BASIC", offset, f"vCPU {vid}'s page tables"))
        bases[vid] = (base, user)
    pfns = np.concatenate([t[0] for t in st.tables] or [np.empty(0, np.int64)])
    levels = np.concatenate([t[1] for t in st.tables] or [np.empty(0, np.int64)])
    result = rebuild_from_roots(hv.memory.u64, hv.frame_table, domid, roots,
                                (st.p2m[pfns].astype(np.int64), levels))
    if result.failures:
        failure = result.failures[0]
        record, offset, what = blame[failure.index]
        raise _fail(path, record, offset, f"{what} failed validation ({errno_name(failure.rc)})")
    contexts = {vid: ctx for vid, (ctx, _) in st.vcpus.items()}
    if linux:
        return install_xen_abi_domain(hv, meta, st.p2m, st.hypervisor_pages[0], contexts, bases,
                                      name or meta.get("name") or path.stem,
                                      grant_frames=st.hypervisor_pages[1:])
    return install_domain(hv, meta, st.p2m, contexts, bases, name or meta.get("name") or path.stem)


def _hypervisor_pages(hv: Hypervisor, st: _Pending, linux: dict[str, Any], domid: int,
                      path: Path) -> None:
    """shared_info and the grant frames: the saved frames (claimed in place) or fresh ones,
    the grant frames' contents, and every entry that mapped one of them."""
    assert st.p2m is not None
    grants = linux.get("grant_table") or {"frames": []}
    wanted = 1 + len(grants["frames"])
    if not st.hypervisor_pages:
        pages = hv.frames.alloc(wanted, "restored shared_info and grant frames")
        st.hypervisor_pages = [int(m) for m in pages]
        hv.frame_table.assign(pages, domid)
    if len(st.hypervisor_pages) != wanted:
        raise RestoreError(f"{path}: records HVLAB_MACHINE_FRAMES and HVLAB_DOMAIN disagree "
                           f"on the number of grant frames")
    for mfn, content in zip(st.hypervisor_pages[1:], grants["frames"], strict=True):
        hv.memory.frame_u8(mfn)[:] = np.frombuffer(bytes.fromhex(content), np.uint8) \
            if content is not None else 0
    for pfn, slot, flags, page in hypervisor_page_mappings(linux):
        if not (0 <= pfn < st.nr_pages and 0 <= slot < 512 and 0 <= page < wanted):
            raise RestoreError(f"{path}: record HVLAB_DOMAIN: a mapping of a hypervisor page "
                               "outside the domain's tables")
        hv.memory.u64[int(st.p2m[pfn]) * 512 + slot] = np.uint64(
            flags & ~ADDR_MASK | st.hypervisor_pages[page] << 12)


def hypervisor_page_mappings(linux: dict[str, Any]) -> list[tuple[int, int, int, int]]:
    """(table pfn, slot, entry flags, page: 0 shared_info, 1 + n grant frame n) of every
    entry that mapped a hypervisor page when the domain was saved."""
    mappings = [(e[0], e[1], e[2], 0) for e in linux.get("shared_info_entries", [])]
    return mappings + [(e[0], e[1], e[2], 1 + e[3]) for e in linux.get("grant_entries", [])]


def install_xen_abi_domain(hv: Hypervisor, meta: dict[str, Any], p2m: np.ndarray,
                           shared_info: int, contexts: dict[int, VcpuGuestContext],
                           bases: dict[int, tuple[int, int]], name: str,
                           grant_frames: list[int] | None = None) -> Domain:
    """A restored CPL-3 (Linux) domain: Xen's vCPU state, its backends, its events, and
    its grant table when `grant_frames` (claimed, filled) are given."""
    from hypervisor.pv.linux.domain import install_linux_domain  # loads the Linux parts
    from hypervisor.pv.xen.grant_table import GrantTable

    linux = meta["linux"]
    raw_vcpus = meta.get("vcpus", [])  # each with its "xen" part (xen_image.xen_vcpu_meta)
    vmeta = vcpu_states(meta)
    nr_vcpus = max(len(vmeta), max(contexts) + 1)
    virt_base = int(meta["virt_base"])
    dom = install_linux_domain(hv, name, p2m, shared_info,
                               virt_base + int(meta["start_info_pfn"]) * PAGE_SIZE, virt_base,
                               nr_vcpus, linux["console_pfn"], linux["xenstore_pfn"],
                               linux.get("kernel_file", ""))
    from hypervisor.pv.xen.policy import xen_pv_policy

    support = xen_pv_policy(hv).support
    support.refresh_m2p()
    grants = linux.get("grant_table")
    if grants is not None and grant_frames is not None:
        dom.grant_table = GrantTable(grants["max_frames"], list(grant_frames),
                                     grants["version"])
    _restore_common(hv, dom, meta)
    assert dom.backends is not None and dom.backends.xenstore is not None
    dom.backends.console.restore(xen_image.console_from_json(linux["console_ring"]))
    dom.backends.xenstore.restore(xen_image.xenstore_from_json(linux["xenstore"]))
    for v in dom.vcpus:
        if v.vcpu_id not in contexts:
            continue
        ctx = contexts[v.vcpu_id]
        xen_extra = raw_vcpus[v.vcpu_id].get("xen", {}) if v.vcpu_id < len(raw_vcpus) else {}
        v.xen = xen_image.restore_xen_vcpu(v, ctx, xen_extra, lambda pfn: int(p2m[pfn]))
        base, user = bases[v.vcpu_id]
        v.roots.kernel_ma, v.roots.user_ma = base * PAGE_SIZE, user * PAGE_SIZE
        regs = _registers(ctx)
        regs["cs"], regs["ss"] = ctx.user_regs.cs, ctx.user_regs.ss
        regs["gs_base"] = ctx.gs_base_kernel if v.xen.kernel_mode else ctx.gs_base_user
        regs["cr2"] = xen_extra.get("cpu_cr2", ctx.ctrlreg[2])
        support.resume_vcpu(v, regs, xen_extra.get("cpu_cr4", ctx.ctrlreg[4]))
        if v.xen.vcpu_info_ma is not None:
            start = v.xen.vcpu_info_ma
            dom.events.bits._moved[v.vcpu_id] = hv.memory.u8[start:start + 64]
        _restore_vcpu_common(v, ctx, vmeta)
    return dom


def install_domain(hv: Hypervisor, meta: dict[str, Any], p2m: np.ndarray,
                   contexts: dict[int, VcpuGuestContext], bases: dict[int, tuple[int, int]],
                   name: str | None = None) -> Domain:
    """Make a domain of claimed, typed frames: events, vCPUs, clock (restore and live update).

    `bases` gives each vCPU's CR3 and user CR3 as MFNs (references already taken).
    """
    nr_vcpus = max(len(meta.get("vcpus", [])), max(contexts) + 1)
    virt_base = int(meta["virt_base"])
    dom = install_pv_domain(hv, name or meta["name"], p2m, int(meta["shared_info_pfn"]),
                               virt_base + int(meta["start_info_pfn"]) * PAGE_SIZE,
                               virt_base, nr_vcpus)
    _restore_common(hv, dom, meta)
    vmeta = vcpu_states(meta)
    for v in dom.vcpus:
        if v.vcpu_id not in contexts:
            continue
        ctx = contexts[v.vcpu_id]
        base, user = bases[v.vcpu_id]
        start_pv_vcpu(hv, v, _registers(ctx), base * PAGE_SIZE)
        v.roots.user_ma = user * PAGE_SIZE
        _restore_vcpu_common(v, ctx, vmeta)
    return dom


def _restore_common(hv: Hypervisor, dom: Domain, meta: dict[str, Any]) -> None:
    """Clock, console, shutdown and event channels: the same for every PV domain."""
    dom.time_offset = int(meta["virtual_ns"]) - hv.now
    dom.console += meta.get("console", "").encode("latin-1")
    if meta.get("shutdown") is not None:
        dom.shutdown = Shutdown(**meta["shutdown"])
        dom.crash_report = meta.get("crash_report")
    ev = meta.get("evtchn", {})
    ports = dict(port_from_json(p) for p in ev.get("ports", []))
    virqs = {(p.notify_vcpu, p.virq): port for port, p in ports.items() if p.state == "virq"}
    dom.events.restore(EventChannelState(ports, virqs, ev.get("sent", 0), ev.get("raised", 0)))


def _restore_vcpu_common(v, ctx: VcpuGuestContext, vmeta: list[PvVcpuState]) -> None:
    """Callbacks, trap table, runstate, timer and counters of a restored vCPU."""
    v.event_callback = ctx.event_callback_eip
    v.failsafe_callback = ctx.failsafe_callback_eip
    v.syscall_callback = ctx.syscall_callback_eip
    v.trap_table = {t.vector: TrapEntry(t.vector, t.flags, t.cs, t.address)
                    for t in ctx.trap_ctxt if t.address}
    state = vmeta[v.vcpu_id] if v.vcpu_id < len(vmeta) else PvVcpuState()
    restore_pv_vcpu(v, state, bool(ctx.flags & VGCF_ONLINE))


def vcpu_states(meta: dict[str, Any]) -> list[PvVcpuState]:
    """HVLAB_DOMAIN's per-vCPU state (ValueError or TypeError if damaged)."""
    return [from_plain(PvVcpuState, extra, f"vCPU {vid}")
            for vid, extra in enumerate(meta.get("vcpus", []))]


def _rewrite_p2m_list(hv: Hypervisor, st: _Pending) -> None:
    assert st.p2m is not None and st.p2m_list_pfns is not None
    listing = st.p2m.astype(np.uint64).view(np.uint8)
    for i, pfn in enumerate(st.p2m_list_pfns.tolist()):
        chunk = listing[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
        if chunk.size:
            hv.memory.frame_u8(int(st.p2m[pfn]))[: chunk.size] = chunk


def _registers(ctx: VcpuGuestContext) -> dict[str, int]:
    r = ctx.user_regs
    regs = {name: getattr(r, name) for name in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11",
        "r12", "r13", "r14", "r15", "rip", "rflags")}
    regs["cr2"] = ctx.ctrlreg[2]
    regs["fs_base"] = ctx.fs_base
    regs["gs_base"] = ctx.gs_base_kernel
    fpu = ctx.fpu_ctxt
    regs["mxcsr"] = int.from_bytes(fpu[FXSAVE_MXCSR : FXSAVE_MXCSR + 4], "little")
    for i in range(16):
        start = FXSAVE_XMM0 + 16 * i
        regs[f"xmm{i}"] = int.from_bytes(fpu[start : start + 16], "little")
    return regs


def _undo(hv: Hypervisor, st: _Pending) -> None:
    if st.p2m is not None:
        hv.unclaim_frames(st.p2m)
        st.p2m = None
    if st.hypervisor_pages:
        hv.unclaim_frames(np.array(st.hypervisor_pages, dtype=np.uint64))
        st.hypervisor_pages = []
