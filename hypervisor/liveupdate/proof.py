"""The proof that a live update lost nothing.

At the pause the old build's view is captured: a hash of every guest frame,
each frame's type state decoded from the old layout, every vCPU's registers,
event-channel tables and timers. For HVM domains: a hash of every P2M-backed
gfn, the whole P2M (mfn, type, access, log-dirty), what the EPT grants each gfn
(read from its tables: a rebuilt EPT must grant what the old one did),
registers and each vCPU's `HvmVcpuState` field by field (hypervisor/hvm/vcpu.py),
its vLAPIC with PIR folded into IRR (on a copy: neither side is changed).
For PV domains the hypervisor pages they own (a CPL-3 domain's shared_info,
grant frames) are hashed and type-checked with their RAM, and a CPL-3
domain's Xen state is compared field by field (`XenView`): each vCPU's
XenVcpu (mode, kernel stack, the other mode's GS base, CR4, assists, GDT
frames, counters) and MMU mode, the console ring's and xenstore's State, the
grant table, the shared_info frame and the P2M.
After the update the same is read from the new build (type state decoded
from *its* layout) and compared field by field. Any difference is a loud
failure.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from emulator.irqsource import InterruptSourceState
from emulator.memory import HostMemory
from hypervisor.core.vcpu import Vcpu, VcpuState
from hypervisor.liveupdate.handover import kept_pages

if TYPE_CHECKING:
    from hypervisor.core.hypervisor import Hypervisor

# A fixed random odd multiplier per word: a multilinear hash of a frame's
# 512 words, vectorised (numpy wraps uint64 arithmetic modulo 2^64).
_HASH_KEYS = (np.random.default_rng(0x6876_6C61_62).integers(0, 2**63, 512, dtype=np.uint64)
              * np.uint64(2) + np.uint64(1))
_CHUNK = 1 << 14


def frame_hashes(memory: HostMemory, mfns: np.ndarray) -> np.ndarray:
    """One 64-bit hash per frame; frames the host never touched hash to 0 unread."""
    mfns = mfns.astype(np.int64)
    out = np.zeros(mfns.size, dtype=np.uint64)
    resident = memory.resident_frames()
    todo = np.flatnonzero(resident[mfns]) if resident is not None else np.arange(mfns.size)
    words = memory.u64.reshape(-1, 512)
    for start in range(0, todo.size, _CHUNK):
        idx = todo[start : start + _CHUNK]
        with np.errstate(over="ignore"):
            out[idx] = (words[mfns[idx]] * _HASH_KEYS).sum(axis=1, dtype=np.uint64)
    return out


def type_state(hv: Hypervisor, mfns: np.ndarray) -> dict[str, np.ndarray]:
    """Per-frame type state in layout-independent terms.

    A frame's type and validated flag only mean something while its type
    count is non-zero: at count 0 Xen leaves whatever type the frame last had
    (writable pages keep it), which is history, not state any rebuild from
    pins and CR3s can or should reproduce. Those are compared as "none".
    """
    ft = hv.frame_table
    mfns = mfns.astype(np.int64)
    counts = ft.type_counts(mfns)
    live = counts > 0
    return {"type": np.where(live, ft.types(mfns).astype(np.int64), 0), "count": counts,
            "pinned": ft.pinned(mfns), "validated": ft.validated(mfns) & live,
            "general": ft.general_counts(mfns),
            "linear": ft.linear_pt_count[mfns].astype(np.int64)}


def proof_frames(dom) -> np.ndarray:
    """A PV domain's frames the proof hashes and type-checks: its RAM in pfn order, then
    the hypervisor pages it owns (`kept_pages`)."""
    return np.concatenate([dom.p2m, kept_pages(dom)])


@dataclass
class XenView:
    """A CPL-3 (Xen-PV ABI) domain's state beyond memory, vCPU registers and events."""

    vcpus: dict[int, Any]  # vcpu_id -> a copy of its XenVcpu
    mmu_modes: dict[int, tuple[bool, tuple[int, ...]]]  # user mode, guest GDT frames
    console_ring: Any  # ConsoleRingState
    xenstore: Any  # XenstoreState
    grant_table: tuple[int, tuple[int, ...], int] | None  # max frames, frames, version
    shared_info_mfn: int
    p2m: bytes


def xen_view(dom) -> XenView | None:
    if not any(v.xen is not None for v in dom.vcpus):
        return None
    b = dom.backends
    table = dom.grant_table
    return XenView(
        {v.vcpu_id: _xen_vcpu(v.xen) for v in dom.vcpus},
        {v.vcpu_id: (v.mmu.user_mode, tuple(v.mmu.guest_gdt)) for v in dom.vcpus},
        b.console.save() if b is not None else None,
        b.xenstore.save() if b is not None and b.xenstore is not None else None,
        None if table is None else (table.max_frames, tuple(table.frames), table.version),
        int(dom.shared_info_mfn), dom.p2m.tobytes())


def _xen_vcpu(x: Any) -> Any:
    """A copy of a XenVcpu; debug registers never set count as 0 (a restore lists all)."""
    out = copy.deepcopy(x)
    out.debugregs = {i: x.debugregs.get(i, 0) for i in (0, 1, 2, 3, 6, 7)}
    return out


def _compare_xen(name: str, old: XenView | None, new: XenView | None) -> list[str]:
    if old is None or new is None:
        return [] if old is new else [f"{name}: Xen PV ABI state present on one side only"]
    problems = []
    for vid, before in old.vcpus.items():
        after = new.vcpus.get(vid)
        differ = [f.name for f in fields(before)
                  if after is None or getattr(after, f.name) != getattr(before, f.name)]
        if differ:
            problems.append(f"{name}/v{vid}: Xen vCPU state differs: {', '.join(differ)}")
    others = [f.name for f in fields(XenView)
              if f.name != "vcpus" and getattr(old, f.name) != getattr(new, f.name)]
    if others:
        problems.append(f"{name}: Xen domain state differs: {', '.join(others)}")
    return problems


@dataclass
class Snapshot:
    hashes: dict[int, np.ndarray] = field(default_factory=dict)
    types: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    vcpus: dict[tuple[int, int], VcpuState] = field(default_factory=dict)
    evtchn: dict[int, Any] = field(default_factory=dict)
    hvm: dict[int, dict[str, Any]] = field(default_factory=dict)
    xen: dict[int, XenView | None] = field(default_factory=dict)


def hvm_view(hv: Hypervisor, dom) -> dict[str, Any]:
    """An HVM domain's device and memory state in build-independent terms (read only)."""
    from hypervisor.hvm.ept import INVALID_MFN
    from hypervisor.hvm.image import folded_lapic_state
    from hypervisor.hvm.vcpu import save_hvm_vcpu

    p2m = dom.hvm.physmap.p2m
    state = p2m.save()
    backed = p2m.mfns[p2m.mfns != INVALID_MFN]
    view: dict[str, Any] = {
        "p2m": (state.mfn, state.p2m_type, state.access, state.logdirty, state.dirty_bitmap),
        "hashes": frame_hashes(hv.memory, backed),
        "ept": ept_view(dom.hvm.physmap.ept, p2m.nr_gfns),
        "pod": dom.hvm.physmap.pod,
        "shutdown": (dom.shutdown, dom.crash_report, bytes(dom.console), dom.time_offset),
    }
    for v in dom.vcpus:  # the vCPU's HVM state, its LAPIC as if PIR were folded in now
        state = replace(save_hvm_vcpu(v), lapic=folded_lapic_state(v))
        for f in fields(state):
            view[f"{v.name} {f.name}"] = getattr(state, f.name)
    return view


def ept_view(ept, nr_gfns: int) -> dict[str, np.ndarray]:
    """What the EPT grants each gfn, read by walking its tables in host memory: frame,
    type, access and effective R/W/X. The layout and the superpage sizes are the
    build's own business and stay out: two builds must agree on these."""
    found = ept.lookup_many(np.arange(nr_gfns, dtype=np.uint64))
    return {"mfn": found.mfn, "type": found.p2m_type, "access": found.access,
            "perms": found.perms}


def _compare_ept(name: str, before: dict[str, np.ndarray],
                 now: dict[str, np.ndarray]) -> list[str]:
    problems = []
    for key, old in before.items():
        bad = np.flatnonzero(now[key] != old)
        if bad.size:
            gfn = int(bad[0])
            problems.append(f"{name}: EPT {key} differs on {bad.size} gfns, first gfn "
                            f"{gfn:#x}: {int(old[gfn]):#x} -> {int(now[key][gfn]):#x}")
    return problems


def _compare_hvm(name: str, before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    problems = _compare_ept(name, before["ept"], now["ept"])
    differ = np.flatnonzero(now["hashes"] != before["hashes"])
    if before["hashes"].size != now["hashes"].size:
        problems.append(f"{name}: {before['hashes'].size} backed gfns before, "
                        f"{now['hashes'].size} after")
    elif differ.size:
        problems.append(f"{name}: {differ.size} backed gfns changed, the first is backed "
                        f"gfn #{differ[0]}")
    for key, old in before.items():
        if key not in ("hashes", "ept") and now.get(key) != old:
            problems.append(f"{name}: {key} differs")
    return problems


def _vcpu_state(hv: Hypervisor, v: Vcpu) -> VcpuState:
    return v.save(hv.read_vcpu_registers(v) if v.context is not None else {})


def _compare_vcpu(old: VcpuState, new: VcpuState, name: str) -> list[str]:
    problems = []
    regs = [r for r, value in old.registers.items() if new.registers.get(r) != value]
    if regs:
        problems.append(f"{name}: registers differ: {', '.join(regs)}")
    others = [f.name for f in fields(VcpuState)
              if f.name != "registers" and getattr(old, f.name) != getattr(new, f.name)]
    if others:
        problems.append(f"{name}: vCPU state differs: {', '.join(others)}")
    return problems


def compare_types(name: str, old: dict[str, np.ndarray],
                  now: dict[str, np.ndarray]) -> list[str]:
    """Every per-frame type field that differs, named with its first pfn."""
    problems = []
    for key, before in old.items():
        bad = np.flatnonzero(now[key] != before)
        if bad.size:
            problems.append(f"{name}: type state '{key}' differs on {bad.size} frames, "
                            f"first frame #{bad[0]} (pfn order, then hypervisor pages): "
                            f"{before[bad[0]]} -> {now[key][bad[0]]}")
    return problems


def capture(hv: Hypervisor) -> Snapshot:
    snap = Snapshot()
    for dom in hv.domains:
        for v in dom.vcpus:
            snap.vcpus[(dom.domid, v.vcpu_id)] = _vcpu_state(hv, v)
        if dom.hvm is not None:
            snap.hvm[dom.domid] = hvm_view(hv, dom)
            continue
        frames = proof_frames(dom)
        snap.hashes[dom.domid] = frame_hashes(hv.memory, frames)
        snap.types[dom.domid] = type_state(hv, frames)
        ev = dom.events.save()
        snap.evtchn[dom.domid] = (ev.ports, ev.virq_ports)
        snap.xen[dom.domid] = xen_view(dom)
    return snap


def verify(before: Snapshot, hv: Hypervisor, check_types: bool = True) -> dict[str, Any]:
    """Compare the new build's state with the snapshot; {'ok': bool, 'checks': …, 'problems': …}."""
    problems: list[str] = []
    checks = {"frames_hashed": 0, "frames_type_checked": 0, "vcpus": 0, "domains": 0}
    for dom in hv.domains:
        checks["domains"] += 1
        for v in dom.vcpus:
            checks["vcpus"] += 1
            problems += _compare_vcpu(before.vcpus[(dom.domid, v.vcpu_id)],
                                      _vcpu_state(hv, v), v.name)
        if dom.hvm is not None:
            view = hvm_view(hv, dom)
            problems += _compare_hvm(dom.name, before.hvm[dom.domid], view)
            checks["frames_hashed"] += view["hashes"].size
            checks["hvm_domains"] = checks.get("hvm_domains", 0) + 1
            continue
        frames = proof_frames(dom)
        hashes = frame_hashes(hv.memory, frames)
        checks["frames_hashed"] += hashes.size
        if hashes.size != before.hashes[dom.domid].size:
            problems.append(f"{dom.name}: {before.hashes[dom.domid].size} frames before, "
                            f"{hashes.size} after")
        else:
            differ = np.flatnonzero(hashes != before.hashes[dom.domid])
            if differ.size:
                problems.append(f"{dom.name}: {differ.size} frames changed, first frame "
                                f"#{differ[0]} (pfn order, then hypervisor pages)")
        if check_types and hashes.size == before.hashes[dom.domid].size:
            problems += compare_types(dom.name, before.types[dom.domid], type_state(hv, frames))
            checks["frames_type_checked"] += frames.size
        ev = dom.events.save()
        if (ev.ports, ev.virq_ports) != before.evtchn[dom.domid]:
            problems.append(f"{dom.name}: event-channel table differs")
        xen_now = xen_view(dom)
        if xen_now is not None or before.xen.get(dom.domid) is not None:
            checks["xen_domains"] = checks.get("xen_domains", 0) + 1
            problems += _compare_xen(dom.name, before.xen.get(dom.domid), xen_now)
    return {"ok": not problems, "checks": checks, "problems": problems}


def _due_by(state: InterruptSourceState, limit: int | None, now_ns: int) -> int:
    """Occurrences of a source (saved as `state`) not posted yet and due by `now_ns`."""
    last = now_ns if limit is None else min(now_ns, state.start_ns
                                            + (limit - 1) * state.period_ns)
    if last < state.start_ns:
        return 0
    return max(0, (last - state.start_ns) // state.period_ns + 1 - state.next_occurrence)


def blackout_posts(before: Snapshot, hv: Hypervisor) -> dict[str, Any]:
    """After the resume time is set: every interrupt source posted exactly the
    occurrences that fell due since the pause (reckoned from the old build's saved
    source state, not the new build's) and each such vector waits in PIR or IRR."""
    problems: list[str] = []
    due_total = made_total = 0
    for dom in hv.domains:
        if dom.hvm is None or not dom.alive:
            continue
        now = hv.now + dom.time_offset  # sources run on the guest's clock
        for v in dom.vcpus:
            h = v.hvm
            assert h is not None  # every vCPU of an HVM domain
            old = before.hvm[dom.domid][f"{v.name} sources"]
            for saved, s in zip(old, h.sources, strict=True):
                due = _due_by(saved.state, saved.limit, now)
                made = s.source.posted - saved.state.posted
                due_total += due
                made_total += made
                if made != due:
                    problems.append(f"{v.name} source {s.name}: {due} posts fell due during "
                                    f"the blackout, {made} were made")
                elif due and not (h.posted.is_posted(s.vector)
                                  or s.vector in h.lapic.irr_vectors()):
                    problems.append(f"{v.name} source {s.name}: vector {s.vector:#x} fell due "
                                    "during the blackout but is in neither PIR nor IRR")
    return {"ok": not problems, "due": due_total, "posted": made_total,
            "problems": problems}


class ProofFailed(Exception):
    """A live update lost or changed something: never silently ignored."""

    exit_status = 1  # errors.RUN_FAILED: the update ran and its proof says no
    headline = "PROOF FAILED"
