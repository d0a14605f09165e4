"""How the new build rebuilds typerefs: full-walk, transfer, lazy, prevalidate.

Each strategy runs in the new build after ownership is restored and before
the vCPUs' state is (docs/design.md §4). Each returns counters; those named
`blackout_*` happened inside the blackout and are priced by costs.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from hypervisor.lib.errors import HvlabError
from hypervisor.lib.extents import runs_of
from hypervisor.liveupdate.handover import PFN_MASK, DomainHandover, start_type_log
from hypervisor.mm.builds import PageType, get_build
from hypervisor.mm.frametable import DOMID_INVALID, FrameTable
from hypervisor.mm.rebuild import rebuild_from_roots
from hypervisor.mm.typerefs import Root
from hypervisor.stream.vcpu_context import VcpuGuestContext

if TYPE_CHECKING:
    from hypervisor.core.hypervisor import Hypervisor

STRATEGIES = ("full-walk", "transfer", "lazy", "prevalidate")
PIN_FLAG = 0x8
LEVEL_MASK = 0x7
# The lazy sweeper's share of each scheduling quantum, in page-table entries:
# 128 Ki entries at ~2 ns each is ~0.25 ms of a 1 ms quantum natively.
SWEEP_BUDGET_PTES = 128 * 1024


class StrategyError(HvlabError):
    pass


def _table_levels(tables: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(pfns, PFINFO types) of the page tables a hand-over lists (levels 1..4)."""
    pfns = (tables & np.uint64(PFN_MASK)).astype(np.int64)
    info = (tables >> np.uint64(60)).astype(np.int64)
    levels = info & LEVEL_MASK
    keep = (levels >= 1) & (levels <= 4) & (info < 0xD)
    return pfns[keep], info[keep]


def pins_of(p2m: np.ndarray, tables: np.ndarray) -> dict[int, int]:
    """The pinned page tables (mfn -> level), in pfn order."""
    pfns, info = _table_levels(tables)
    pinned = (info & PIN_FLAG) != 0
    return dict(zip(p2m[pfns[pinned]].tolist(), (info[pinned] & LEVEL_MASK).tolist(),
                    strict=True))


def cr3s_of(contexts: dict[int, VcpuGuestContext]) -> list[int]:
    """One L4 MFN per CR3 and per user CR3 reference, by vCPU."""
    cr3s = []
    for _vid, ctx in sorted(contexts.items()):
        cr3s.append(ctx.ctrlreg[3] >> 12)
        if ctx.user_table is not None:
            cr3s.append(ctx.user_table)
    return cr3s


def roots_of(ho: DomainHandover) -> list[Root]:
    """Pins (pfn order), then CR3 references, of a handed-over domain."""
    return ([Root(m, lv, True) for m, lv in pins_of(ho.p2m, ho.tables).items()]
            + [Root(m, 4, False) for m in cr3s_of(ho.contexts)])


def table_frames(p2m: np.ndarray, tables: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every page table the old build had typed: (mfns, levels)."""
    pfns, info = _table_levels(tables)
    return p2m[pfns].astype(np.int64), info & LEVEL_MASK


def _validated_tables(frames: FrameTable, p2m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The page tables a (running) build has typed among `p2m`'s frames: (mfns, levels)."""
    mfns = p2m.astype(np.int64)
    types = frames.types(mfns)
    is_table = (types >= PageType.L1) & (types <= PageType.L4) & (frames.type_counts(mfns) > 0)
    return mfns[is_table], types[is_table].astype(np.int64)


def typed_work(frames: FrameTable, mfns: np.ndarray) -> dict[str, int]:
    """What validating these frames amounted to: PTEs read, tables validated, refs taken."""
    types = frames.types(mfns)
    counts = frames.type_counts(mfns)
    is_table = (types >= PageType.L1) & (types <= PageType.L4) & (counts > 0)
    # a validator reads every entry of a table but Xen's 16 L4 slots
    l4s = int((types[is_table] == PageType.L4).sum())
    return {"ptes_examined": int(is_table.sum()) * 512 - 16 * l4s,
            "pages_validated": int(is_table.sum()),
            "refs_taken": int(counts.sum())}


def _full_walk_domain(hv: Hypervisor, domid: int, ho: DomainHandover) -> dict[str, int]:
    if hv.seams.full_walk_domain is not None:  # a lab's full walk (hypervisor/seams.py)
        hv.seams.full_walk_domain(hv.typing, domid, roots_of(ho))
        return typed_work(hv.frame_table, ho.p2m.astype(np.int64))
    result = rebuild_from_roots(hv.memory.u64, hv.frame_table, domid, roots_of(ho),
                                table_frames(ho.p2m, ho.tables))
    if not result.ok:
        first = result.failures[0]
        raise StrategyError(f"domain {ho.meta['name']}: the old build's page tables failed "
                            f"revalidation: {first}")
    return typed_work(hv.frame_table, ho.p2m.astype(np.int64))


def full_walk(hv: Hypervisor, handovers: list[DomainHandover]) -> dict[str, int]:
    """Re-pin every pinned root and take every CR3 reference before resuming."""
    total: dict[str, int] = {}
    for domid, ho in enumerate(handovers):
        if ho.kind != "pv":
            continue  # HVM memory has no PV page types: EPT is rebuilt from the P2M
        for key, value in _full_walk_domain(hv, domid, ho).items():
            total[f"blackout_{key}"] = total.get(f"blackout_{key}", 0) + value
    return total


# ------------------------------------------------------------------- transfer
Translator = Callable[[np.ndarray], np.ndarray]


def _layout_translator(old: str, new: str) -> Translator:
    old_layout, new_layout = get_build(old).type_info, get_build(new).type_info

    def translate(type_info: np.ndarray) -> np.ndarray:
        counts = old_layout.count_of(type_info)
        if (counts > new_layout.count_mask).any():
            raise StrategyError(f"transfer {old}->{new}: a type count does not fit the new "
                                f"layout's {new_layout.count_width}-bit count")
        return new_layout.encode(old_layout.type_of(type_info), counts,
                                 pinned=old_layout.pinned_of(type_info),
                                 validated=old_layout.validated_of(type_info),
                                 partial=old_layout.partial_of(type_info),
                                 locked=old_layout.locked_of(type_info))

    translate.__name__ = f"type_info_{old.replace('.', '_')}_to_{new.replace('.', '_')}"
    return translate


# One explicit translator per ordered pair of builds (the thread's objection:
# every pair needs one). A pair missing here is refused before the pause.
TRANSLATORS: dict[tuple[str, str], Translator] = {
    pair: _layout_translator(*pair)
    for pair in (("4.12", "4.19"), ("4.19", "4.12"), ("4.12", "4.12"), ("4.19", "4.19"))
}


def translator_for(old: str, new: str) -> Translator:
    try:
        return TRANSLATORS[(old, new)]
    except KeyError:
        pairs = ", ".join(f"{a}->{b}" for a, b in TRANSLATORS)
        raise StrategyError(f"strategy transfer: no translator from build {old} to {new} "
                            f"(translators exist for {pairs})") from None


def transfer(hv: Hypervisor, handovers: list[DomainHandover], old_build: str) -> dict[str, int]:
    """Install the old build's per-frame type state, translated into this build's layout
    (each run of equal state is translated once, then written to its frames)."""
    translate = translator_for(old_build, hv.build)
    ft = hv.frame_table
    translated = 0
    for ho in handovers:
        if ho.kind != "pv":
            continue
        if ho.type_runs is None:
            raise StrategyError(f"domain {ho.meta['name']}: the hand-over carries no type state")
        runs = ho.type_runs
        counts = runs[:, 1]
        columns = {"type_info": np.repeat(translate(runs[:, 2].view(np.uint64)), counts),
                   "count_info": np.repeat(runs[:, 3].view(np.uint64), counts),
                   "linear_pt_count": np.repeat(runs[:, 4], counts)}
        owned = runs_of(ho.p2m)
        selections = ([(slice(pfn, pfn + n), slice(first, first + n))
                       for pfn, first, n in owned.tolist()] if owned is not None
                      else [(slice(None), ho.p2m.astype(np.int64))])
        for pfns, rows in selections:
            for name, values in columns.items():
                column = getattr(ft, name)
                column[rows] = values[pfns].astype(column.dtype)
        translated += ho.p2m.size
    return {"frames_translated": translated, "translator": translate.__name__}  # type: ignore


# ---------------------------------------------------------------- prevalidate
@dataclass
class Prevalidation:
    """The new build's type state, prepared while the guests still run: in the new
    build's own staged tables, or in a table of its own to be copied over."""

    build: str
    frames: FrameTable
    domains: list[int] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)


def prevalidate(old: Hypervisor, new_build: str, staged: FrameTable | None = None,
                ) -> Prevalidation:
    """Before the pause: validate every PV domain in the new layout (into `staged`, the
    new build's tables with the guests' frames claimed, if given) and start logging
    type changes: a domain with any is redone in the blackout."""
    frames = staged if staged is not None else FrameTable(old.memory.nr_frames,
                                                          get_build(new_build))
    prep = Prevalidation(new_build, frames)
    for dom in old.domains:
        if dom.hvm is not None:
            continue  # no PV page types to prepare
        if staged is None:
            frames.assign(dom.p2m, dom.domid)
        pins = old.frame_table.pinned(dom.p2m.astype(np.int64))
        roots = [Root(int(m), int(old.frame_table.page_type(int(m))), True)
                 for m in dom.p2m[pins]]
        roots += [Root(mfn, 4, False) for v in dom.vcpus for mfn in v.roots.referenced()]
        result = rebuild_from_roots(old.memory.u64, frames, dom.domid, roots,
                                    _validated_tables(old.frame_table, dom.p2m))
        if not result.ok:
            raise StrategyError(f"prevalidation of {dom.name} failed: {result.failures[0]}")
        for key, value in typed_work(frames, dom.p2m.astype(np.int64)).items():
            prep.counters[f"prevalidate_{key}"] = prep.counters.get(f"prevalidate_{key}", 0) + value
        prep.domains.append(dom.domid)
    start_type_log(old)
    return prep


def clear_types(frames: FrameTable, p2m: np.ndarray, domid: int) -> None:
    """A domain's frames back to bare ownership: owned, untyped, unreferenced."""
    rows = p2m.astype(np.int64)
    for name in ("type_info", "count_info", "nr_validated_ptes", "partial_flags",
                 "linear_pt_count"):
        getattr(frames, name)[rows] = 0
    frames.owner[rows] = DOMID_INVALID
    frames.assign(p2m, domid)


def install_prevalidated(hv: Hypervisor, handovers: list[DomainHandover], prep: Prevalidation,
                         changed: set[int]) -> dict[str, int]:
    """In the blackout: keep (or copy) the prepared rows; redo only changed domains."""
    ft, prepared = hv.frame_table, prep.frames
    in_place = prepared is ft  # prevalidated into this build's staged tables
    counters = {"frames_copied": 0, "domains_redone": 0}
    for domid, ho in enumerate(handovers):
        if ho.kind != "pv":
            continue
        if domid in changed or domid not in prep.domains:
            counters["domains_redone"] += 1
            if in_place:
                clear_types(ft, ho.p2m, domid)
            for key, value in _full_walk_domain(hv, domid, ho).items():
                counters[f"blackout_{key}"] = counters.get(f"blackout_{key}", 0) + value
            continue
        if in_place:
            continue
        runs = runs_of(ho.p2m)
        selections = ([slice(first, first + count) for _, first, count in runs.tolist()]
                      if runs is not None else [ho.p2m.astype(np.int64)])
        for rows in selections:  # contiguous runs copy at memory speed
            for name in ("type_info", "count_info", "owner", "nr_validated_ptes",
                         "partial_flags", "linear_pt_count"):
                getattr(ft, name)[rows] = getattr(prepared, name)[rows]
        counters["frames_copied"] += ho.p2m.size
    return counters
