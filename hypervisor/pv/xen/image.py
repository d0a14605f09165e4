"""A CPL-3 Xen-PV domain (Linux) in a migration-stream v2 image, both ways.

Xen's own records carry what Xen has: X86_PV_VCPU_BASIC's vcpu_guest_context
holds the mode (VGCF_in_kernel), kernel_ss/sp, the GS bases of both modes,
the guest's CR0.TS and CR4, set_gdt's frames (as PFNs), vm_assist and the
syscall callback's event mask. What only hvlab keeps (virtual IOPL, the
runstate area, where vcpu_info was registered, the backends' State, the
console and xenstore pfns, the grant table) goes in the optional HVLAB_DOMAIN
record.

Three things differ from hvlab's own guests, the first two as Xen's toolstack
has them:
- the guest's P2M list is the one Linux published in shared_info
  (arch.p2m_cr3 / p2m_vaddr); before it has, the list start_info.mfn_list
  names (the builder's, or Linux's new one once it points there);
- shared_info and the grant frames are hypervisor pages, not guest frames:
  the entries mapping them are not present in the image (as after Linux's own
  pre-suspend unmap and gnttab_suspend) and listed in HVLAB_DOMAIN; a restore
  maps the new pages there, with the grant frames' contents;
- Xen saves a PV guest only at its suspend point, where it holds no machine
  frame number outside its P2M list and page tables. hvlab saves at any
  instruction: a pending multicall batch, a register or the P2M list Linux is
  still building may hold MFNs no rewrite can find. So the optional
  HVLAB_MACHINE_FRAMES record says where every pfn and hypervisor page lived;
  a restore puts them back on those very frames when they are free (nothing
  to rewrite, nothing stale), else relocates as Xen does, which an image
  saved before the P2M list was published refuses (`relocatable` false).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from emulator.addr import PAGE_SIZE
from emulator.paging import ADDR_MASK, P
from hypervisor.pv.linux.console_ring import ConsoleRingState
from hypervisor.pv.linux.xenstore import XenstoreState
from hypervisor.pv.xen.state import CR0_GUEST, CR0_TS, XenVcpu
from hypervisor.stream.vcpu_context import VGCF_IN_KERNEL, VGCF_SYSCALL_DISABLES_EVENTS

if TYPE_CHECKING:
    from hypervisor.core.domain import Domain
    from hypervisor.core.hypervisor import Hypervisor
    from hypervisor.core.vcpu import Vcpu
    from hypervisor.stream.vcpu_context import VcpuGuestContext

# shared_info's arch_shared_info (x86-64): after vcpu_info[32], the event bitmaps, wallclock
ARCH_P2M_CR3, ARCH_P2M_VADDR = 3112, 3120
# start_info (x86-64)
SI_STORE_MFN, SI_CONSOLE_MFN, SI_MFN_LIST = 56, 72, 104


def is_xen_abi(dom: Domain) -> bool:
    return any(v.xen is not None for v in dom.vcpus)


# ------------------------------------------------------------------ saving
def fill_vcpu_context(ctx: VcpuGuestContext, v: Vcpu, regs: dict[str, int], frame) -> None:
    """Xen's vcpu_guest_context fields of a CPL-3 vCPU (`frame`: MFN -> image frame)."""
    x = v.xen
    assert x is not None
    if not x.kernel_mode:
        ctx.flags &= ~VGCF_IN_KERNEL
    if x.syscall_masks_events:
        ctx.flags |= VGCF_SYSCALL_DISABLES_EVENTS
    ctx.kernel_ss, ctx.kernel_sp = x.kernel_ss, x.kernel_sp
    active, inactive = regs["gs_base"], x.gs_base_inactive
    ctx.gs_base_kernel, ctx.gs_base_user = (active, inactive) if x.kernel_mode else (inactive,
                                                                                     active)
    ctx.ctrlreg[0] = CR0_GUEST | (CR0_TS if x.cr0_ts else 0)
    ctx.ctrlreg[4] = x.cr4
    for i, mfn in enumerate(x.gdt_frames):
        ctx.gdt_frames[i] = frame(mfn << 12)
    ctx.gdt_ents = x.gdt_entries
    ctx.vm_assist = x.vm_assist
    for reg, value in x.debugregs.items():
        ctx.debugreg[reg] = value
    ctx.user_regs.cs, ctx.user_regs.ss = regs["cs"], regs["ss"]


def xen_vcpu_meta(hv: Hypervisor, v: Vcpu, regs: dict[str, int]) -> dict[str, Any]:
    """What hvlab keeps of a CPL-3 vCPU that vcpu_guest_context has no field for."""
    x = v.xen
    assert x is not None
    info = x.vcpu_info_ma
    return {"iopl": x.iopl, "runstate_area": x.runstate_area, "cpu_cr4": regs["cr4"],
            "cpu_cr2": regs["cr2"],
            "vcpu_info": None if info is None else [int(hv.m2p[info >> 12]), info & 0xFFF],
            "counters": {"privops": x.privops, "forced_cpuids": x.forced_cpuids,
                         "ptwr": x.ptwr, "bounces": x.bounces,
                         "hypercalls": dict(sorted(x.hypercalls.items()))}}


def start_info_ma(dom: Domain) -> int:
    return int(dom.p2m[(dom.start_info_va - dom.virt_base) // PAGE_SIZE]) * PAGE_SIZE


def linux_meta(hv: Hypervisor, dom: Domain, page_entries: list[list[int]]
               ) -> dict[str, Any]:
    """The HVLAB_DOMAIN part of a CPL-3 domain: backends and where its rings are."""
    si = start_info_ma(dom)
    backends = dom.backends
    assert backends is not None and backends.xenstore is not None
    console, store = backends.console.save(), backends.xenstore.save()
    return {
        "console_pfn": int(hv.m2p[int(hv.memory.u64[(si + SI_CONSOLE_MFN) // 8])]),
        "xenstore_pfn": int(hv.m2p[int(hv.memory.u64[(si + SI_STORE_MFN) // 8])]),
        "console_ring": {"pending_input": console.pending_input.decode("latin-1"),
                         "drained": console.drained, "ring_errors": console.ring_errors},
        "xenstore": xenstore_to_json(store),
        # [table pfn, slot, entry flags]: entries mapping shared_info
        "shared_info_entries": [e[:3] for e in page_entries if e[3] == 0],
        # [table pfn, slot, entry flags, grant frame]: entries mapping a grant frame
        "grant_entries": [e[:2] + [e[2], e[3] - 1] for e in page_entries if e[3] > 0],
        "grant_table": grant_table_meta(hv, dom),
        "kernel_file": dom.kernel_file,
    }


def xenstore_to_json(state: XenstoreState) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in vars(state).items():
        out[name] = _jsonable(value)
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return {"bytes": bytes(value).decode("latin-1")}
    if isinstance(value, dict):
        return {"dict": [[_jsonable(k), _jsonable(v)] for k, v in value.items()]}
    if isinstance(value, list | tuple):
        return {"list": [_jsonable(v) for v in value]}
    if isinstance(value, set | frozenset):
        return {"set": sorted((_jsonable(v) for v in value), key=repr)}
    return value


def _from_jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        (kind, inner), = value.items()
        if kind == "bytes":
            return inner.encode("latin-1")
        if kind == "dict":
            return {_hashable(_from_jsonable(k)): _from_jsonable(v) for k, v in inner}
        if kind == "list":
            return [_from_jsonable(v) for v in inner]
        if kind == "set":
            return {_hashable(_from_jsonable(v)) for v in inner}
    return value


def _hashable(value: Any) -> Any:
    return tuple(_hashable(v) for v in value) if isinstance(value, list) else value


def xenstore_from_json(raw: dict[str, Any]) -> XenstoreState:
    fields = {name: _from_jsonable(value) for name, value in raw.items()}
    # JSON has no tuples: the watches' (path, token) and the transactions' (generation,
    # tree) pairs come back as lists; they are tuples in the State, exactly
    fields["watches"] = [tuple(w) for w in fields.get("watches", [])]
    fields["transactions"] = {k: tuple(v) for k, v in fields.get("transactions", {}).items()}
    return XenstoreState(**fields)


def console_from_json(raw: dict[str, Any]) -> ConsoleRingState:
    return ConsoleRingState(raw["pending_input"].encode("latin-1"), raw["drained"],
                            raw["ring_errors"])


def hypervisor_pages(dom: Domain) -> list[int]:
    """The hypervisor pages a CPL-3 domain maps: shared_info, then its grant frames."""
    table = dom.grant_table
    return [int(dom.shared_info_mfn)] + ([] if table is None else list(table.frames))


def hypervisor_page_entries(hv: Hypervisor, dom: Domain, table_pfns: np.ndarray
                            ) -> list[list[int]]:
    """Every present entry of the domain's tables that maps one of its hypervisor pages:
    [table pfn, slot, entry flags, index in hypervisor_pages()]."""
    pages = np.array(hypervisor_pages(dom), dtype=np.uint64)
    tables = hv.memory.u64.reshape(-1, 512)[dom.p2m[table_pfns].astype(np.int64)]
    present = (tables & np.uint64(P)) != 0
    target = (tables & np.uint64(ADDR_MASK)) >> np.uint64(12)
    hits = np.argwhere(present & np.isin(target, pages))
    return [[int(table_pfns[i]), int(slot), int(tables[i, slot] & ~np.uint64(ADDR_MASK)),
             int(np.flatnonzero(pages == target[i, slot])[0])] for i, slot in hits]


def grant_table_meta(hv: Hypervisor, dom: Domain) -> dict[str, Any] | None:
    """The grant table's size, version and frames' contents (hex; null: all zero)."""
    table = dom.grant_table
    if table is None:
        return None
    contents = []
    for mfn in table.frames:
        page = hv.memory.frame_u8(mfn)
        contents.append(page.tobytes().hex() if page.any() else None)
    return {"max_frames": table.max_frames, "version": table.version, "frames": contents}


def machine_frames(dom: Domain, relocatable: bool) -> dict[str, Any]:
    """The HVLAB_MACHINE_FRAMES record: where every pfn (runs of [pfn, mfn, count]) and
    every hypervisor page lived, and whether the guest may be relocated at all."""
    p2m = dom.p2m.astype(np.int64)
    starts = np.concatenate(([0], np.flatnonzero(np.diff(p2m) != 1) + 1)) if p2m.size else p2m
    counts = np.diff(np.concatenate((starts, [p2m.size])))
    return {"relocatable": relocatable,
            "pfn_runs": [[int(s), int(p2m[s]), int(c)] for s, c in zip(starts, counts,
                                                                      strict=True)],
            "hypervisor_pages": hypervisor_pages(dom)}


def machine_frames_p2m(raw: dict[str, Any], nr_pages: int) -> np.ndarray:
    """The saved pfn -> mfn map from HVLAB_MACHINE_FRAMES (ValueError if it is not one)."""
    p2m = np.full(nr_pages, -1, dtype=np.int64)
    for pfn, mfn, count in raw["pfn_runs"]:
        if not (0 <= pfn and pfn + count <= nr_pages and count > 0 and mfn >= 0):
            raise ValueError(f"run {pfn}+{count} lies outside the domain's {nr_pages} pages")
        p2m[pfn:pfn + count] = np.arange(mfn, mfn + count)
    if (p2m < 0).any():
        raise ValueError(f"pfn {int(np.flatnonzero(p2m < 0)[0])} has no machine frame")
    return p2m


def linear_p2m_pfns(hv: Hypervisor, dom: Domain) -> np.ndarray | None:
    """The pfns of the frames of the guest's P2M list, found as Xen's saver finds them:
    the linear list the guest published in shared_info (arch.p2m_cr3, p2m_vaddr).
    None before it has."""
    page = hv.memory.frame_u8(dom.shared_info_mfn)
    cr3 = int(page[ARCH_P2M_CR3:ARCH_P2M_CR3 + 8].view(np.uint64)[0])
    vaddr = int(page[ARCH_P2M_VADDR:ARCH_P2M_VADDR + 8].view(np.uint64)[0])
    if not cr3 or not vaddr:
        return None
    return _list_pfns(hv, dom, cr3 & ADDR_MASK, vaddr)


def start_info_p2m_pfns(hv: Hypervisor, dom: Domain, root_ma: int) -> np.ndarray:
    """The pfns of the P2M list start_info.mfn_list names, through the tables at `root_ma`:
    the builder's list, which is the guest's P2M until Linux points mfn_list at its own."""
    mfn_list = int(hv.memory.u64[(start_info_ma(dom) + SI_MFN_LIST) // 8])
    return _list_pfns(hv, dom, root_ma, mfn_list)


def _list_pfns(hv: Hypervisor, dom: Domain, root_ma: int, vaddr: int) -> np.ndarray:
    nr_frames = -(-dom.nr_pages * 8 // PAGE_SIZE)
    u64 = hv.memory.u64
    pfns = np.empty(nr_frames, dtype=np.uint64)
    for i in range(nr_frames):
        va, table = vaddr + i * PAGE_SIZE, root_ma
        for level in (4, 3, 2, 1):
            entry = int(u64[table // 8 + (va >> (3 + 9 * level) & 0x1FF)])
            if not entry & P:
                raise ValueError(f"the P2M list at {va:#x} is not mapped")
            table = entry & ADDR_MASK
            if level == 2 and entry & 0x80:  # a 2 MiB page
                table += va & 0x1F_F000
                break
        pfns[i] = hv.m2p[table >> 12]
    if (pfns >= dom.nr_pages).any():
        raise ValueError("the P2M list is mapped on frames outside the domain's P2M")
    return pfns


# ----------------------------------------------------------------- restoring
def restore_xen_vcpu(v: Vcpu, ctx: VcpuGuestContext, extra: dict[str, Any],
                     local_frame) -> XenVcpu:
    """The XenVcpu a restored vCPU continues with (`local_frame`: image pfn -> MFN)."""
    counters = extra.get("counters", {})
    x = XenVcpu(kernel_mode=bool(ctx.flags & VGCF_IN_KERNEL), kernel_ss=ctx.kernel_ss,
                kernel_sp=ctx.kernel_sp, iopl=extra.get("iopl", 0),
                cr0_ts=bool(ctx.ctrlreg[0] & CR0_TS), cr4=ctx.ctrlreg[4],
                vm_assist=ctx.vm_assist,
                syscall_masks_events=bool(ctx.flags & VGCF_SYSCALL_DISABLES_EVENTS),
                gdt_frames=tuple(local_frame(f) for f in
                                 ctx.gdt_frames[:-(-ctx.gdt_ents * 8 // PAGE_SIZE)]),
                gdt_entries=ctx.gdt_ents, runstate_area=extra.get("runstate_area", 0),
                debugregs={i: ctx.debugreg[i] for i in (0, 1, 2, 3, 6, 7)},
                privops=counters.get("privops", 0),
                forced_cpuids=counters.get("forced_cpuids", 0), ptwr=counters.get("ptwr", 0),
                bounces=counters.get("bounces", 0))
    x.hypercalls.update(counters.get("hypercalls", {}))
    x.gs_base_inactive = ctx.gs_base_user if x.kernel_mode else ctx.gs_base_kernel
    info = extra.get("vcpu_info")
    if info is not None:
        x.vcpu_info_ma = local_frame(info[0]) << 12 | info[1]
    return x
