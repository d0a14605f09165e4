"""The interface every typeref strategy implements, and what they share.

A strategy decides how the new build rebuilds page-type references (typerefs) during
a live update (docs/design.md §4, §6). The orchestrator calls it at fixed points and
never asks which strategy it is:

- `check`: before anything is paused (refuse a plan that cannot work);
- `before_pause`: while the guests still run (work done ahead; its result comes back
  as `NewBuild.ahead`);
- `rebuild`: the blackout's typeref phase, after ownership is restored;
- `reset`: a failed `rebuild` is about to be done again from bare ownership;
- `domain_installed`: a PV domain of the new build exists (vCPUs not yet run);
- `resumed`: the guests run again (work left for after the blackout starts here).

Counters a strategy returns whose names start with `blackout_` happened inside the
blackout and are priced by costs.py. Adding a strategy is one module in this package
defining `STRATEGY`, an instance of a `Strategy` subclass (see `registry`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from hypervisor.lib.errors import HvlabError
from hypervisor.liveupdate.handover import PFN_MASK, DomainHandover, handed_over_pages
from hypervisor.mm.builds import PageType
from hypervisor.mm.frametable import DOMID_INVALID, FrameTable
from hypervisor.mm.rebuild import rebuild_from_roots
from hypervisor.mm.typerefs import Root
from hypervisor.stream.vcpu_context import VcpuGuestContext

if TYPE_CHECKING:
    from hypervisor.core.domain import Domain
    from hypervisor.core.hypervisor import Hypervisor
    from hypervisor.mm.incremental import IncrementalTyping

PIN_FLAG = 0x8
LEVEL_MASK = 0x7
# Work left for after the resume gets this share of each scheduling quantum, in
# page-table entries: 128 Ki entries at ~2 ns each is ~0.25 ms of a 1 ms quantum natively.
SWEEP_BUDGET_PTES = 128 * 1024


class StrategyError(HvlabError):
    pass


@dataclass
class UpdateSettings:
    """What a strategy may read of the update's plan."""

    to_build: str
    sweep_budget_ptes: int  # page-table entries per quantum for work left after resume
    costs: dict[str, float] = field(default_factory=dict)  # to price work done after resume


@dataclass
class StagedState:
    """The new build's tables made before the pause (None with `--exec`: the new
    process does not exist yet), for `before_pause` to add to."""

    frame_table: FrameTable
    sent: dict[int, Any]  # domid -> the domain's memory as sent ahead (handover.DomainMemory)
    typing: dict[int, IncrementalTyping] = field(default_factory=dict)  # set up ahead, by domid


@dataclass
class NewBuild:
    """What a strategy works on in the blackout."""

    hv: Hypervisor  # the new build
    handovers: list[DomainHandover]  # by domid
    settings: UpdateSettings
    old_build: str
    ahead: Any  # what `before_pause` returned (None if it did not run)
    changed: set[int]  # domids whose page tables changed since the hand-over was sent ahead
    typing: dict[int, IncrementalTyping]  # typing staged before the pause, by domid
    counters: dict[str, Any] = field(default_factory=dict)  # the update's counters


class Strategy:
    """One way of rebuilding typerefs (see the module docstring). The defaults do nothing."""

    name = ""
    hands_over_types = False  # the hand-over carries each frame's type state (old layout)
    proves_types_at_resume = True  # else the proof of type state runs when it is rebuilt

    def check(self, old_build: str, settings: UpdateSettings) -> None:
        """Refuse, before the pause, an update this strategy cannot do."""

    def before_pause(self, hv: Hypervisor, settings: UpdateSettings,
                     staged: StagedState | None) -> Any:
        """Work done while the guests still run; returned as `NewBuild.ahead`."""
        return None

    def ahead_counters(self, ahead: Any) -> dict[str, Any]:
        """What `before_pause` did, counted (priced by costs.before_pause_ns)."""
        return {}

    def rebuild(self, nb: NewBuild) -> dict[str, Any]:
        """The blackout's typeref phase; returns counters."""
        return {}

    def reset(self, nb: NewBuild) -> None:
        """`rebuild` failed half way and starts over: every PV domain back to bare ownership."""
        for domid, ho in enumerate(nb.handovers):
            if ho.kind == "pv":
                clear_types(nb.hv.frame_table, owned_frames(ho), domid)

    def domain_installed(self, nb: NewBuild, dom: Domain, ho: DomainHandover) -> None:
        """A handed-over PV domain exists in the new build; its vCPUs have not run."""

    def resumed(self, nb: NewBuild, report: dict[str, Any],
                prove: Any) -> None:
        """The guests run again. `prove(dom)` checks a domain's type state against the
        old build's (raising ProofFailed) for strategies that finish after resuming."""


# ------------------------------------------------------------------ helpers
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


def full_walk_domain(hv: Hypervisor, domid: int, ho: DomainHandover) -> dict[str, int]:
    """Validate a handed-over domain from its roots (pins, then CR3s); what it took."""
    if hv.seams.full_walk_domain is not None:  # a lab's full walk (hypervisor/core/seams.py)
        hv.seams.full_walk_domain(hv.typing, domid, roots_of(ho))
        return typed_work(hv.frame_table, ho.p2m.astype(np.int64))
    result = rebuild_from_roots(hv.memory.u64, hv.frame_table, domid, roots_of(ho),
                                table_frames(ho.p2m, ho.tables))
    if not result.ok:
        first = result.failures[0]
        raise StrategyError(f"domain {ho.meta['name']}: the old build's page tables failed "
                            f"revalidation: {first}")
    return typed_work(hv.frame_table, ho.p2m.astype(np.int64))


def owned_frames(ho: DomainHandover) -> np.ndarray:
    """A handed-over PV domain's frames: its RAM, then the hypervisor pages it owns."""
    return np.concatenate([ho.p2m, handed_over_pages(ho.meta)])


def clear_types(frames: FrameTable, p2m: np.ndarray, domid: int) -> None:
    """A domain's frames back to bare ownership: owned, untyped, unreferenced."""
    rows = p2m.astype(np.int64)
    for name in ("type_info", "count_info", "nr_validated_ptes", "partial_flags",
                 "linear_pt_count"):
        getattr(frames, name)[rows] = 0
    frames.owner[rows] = DOMID_INVALID
    frames.assign(p2m, domid)


