"""prevalidate: build the new build's type state while the guests still run.

Before the pause every PV domain is validated in the new layout (into the new build's
staged tables when they exist) and type changes start being logged; in the blackout
only the domains whose tables changed since are validated again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from hypervisor.lib.extents import runs_of
from hypervisor.liveupdate.handover import (
    DomainHandover,
    handed_over_pages,
    kept_pages,
    start_type_log,
)
from hypervisor.liveupdate.strategies.base import (
    NewBuild,
    StagedState,
    Strategy,
    StrategyError,
    UpdateSettings,
    clear_types,
    full_walk_domain,
    owned_frames,
    typed_work,
)
from hypervisor.mm.builds import PageType, get_build
from hypervisor.mm.frametable import FrameTable
from hypervisor.mm.rebuild import rebuild_from_roots
from hypervisor.mm.typerefs import Root

if TYPE_CHECKING:
    from hypervisor.core.hypervisor import Hypervisor


class Prevalidate(Strategy):
    name = "prevalidate"

    def before_pause(self, hv: Hypervisor, settings: UpdateSettings,
                     staged: StagedState | None) -> Prevalidation:
        return prevalidate(hv, settings.to_build,
                           staged.frame_table if staged is not None else None)

    def ahead_counters(self, ahead: Prevalidation | None) -> dict[str, Any]:
        return {} if ahead is None else dict(ahead.counters)

    def rebuild(self, nb: NewBuild) -> dict[str, Any]:
        if nb.ahead is None:
            raise StrategyError("strategy prevalidate: nothing was prepared before the pause")
        return install_prevalidated(nb.hv, nb.handovers, nb.ahead, nb.changed)

    def reset(self, nb: NewBuild) -> None:
        super().reset(nb)
        if nb.ahead is not None and nb.ahead.frames is nb.hv.frame_table:
            nb.changed.update(range(len(nb.handovers)))  # prepared in place, now gone: redo all


@dataclass
class Prevalidation:
    """The new build's type state, prepared while the guests still run: in the new
    build's own staged tables, or in a table of its own to be copied over."""

    build: str
    frames: FrameTable
    domains: list[int] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)


def _validated_tables(frames: FrameTable, p2m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The page tables a (running) build has typed among `p2m`'s frames: (mfns, levels)."""
    mfns = p2m.astype(np.int64)
    types = frames.types(mfns)
    is_table = (types >= PageType.L1) & (types <= PageType.L4) & (frames.type_counts(mfns) > 0)
    return mfns[is_table], types[is_table].astype(np.int64)


def prevalidate(old: Hypervisor, new_build: str, staged: FrameTable | None = None
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
        if staged is None:  # (staged tables own them already)
            frames.assign(np.concatenate([dom.p2m, kept_pages(dom)]), dom.domid)
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
                clear_types(ft, owned_frames(ho), domid)
            for key, value in full_walk_domain(hv, domid, ho).items():
                counters[f"blackout_{key}"] = counters.get(f"blackout_{key}", 0) + value
            continue
        if in_place:
            continue
        runs = runs_of(ho.p2m)
        selections: list[slice | np.ndarray] = (
            [slice(first, first + count) for _, first, count in runs.tolist()]
            if runs is not None else [ho.p2m.astype(np.int64)])
        selections.append(handed_over_pages(ho.meta).astype(np.int64))  # shared_info, grants
        for rows in selections:  # contiguous runs copy at memory speed
            for name in ("type_info", "count_info", "owner", "nr_validated_ptes",
                         "partial_flags", "linear_pt_count"):
                getattr(ft, name)[rows] = getattr(prepared, name)[rows]
        counters["frames_copied"] += ho.p2m.size
    return counters


STRATEGY = Prevalidate()
