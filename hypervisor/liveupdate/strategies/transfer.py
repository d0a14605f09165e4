"""transfer: hand over each frame's type state in the old layout and translate it in place.

Fast (no page table is read), but it needs a translator for every ordered pair of
builds: the objection raised against it. A pair without one is refused before the pause.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from hypervisor.lib.extents import runs_of
from hypervisor.liveupdate.handover import DomainHandover
from hypervisor.liveupdate.strategies.base import (
    NewBuild,
    Strategy,
    StrategyError,
    UpdateSettings,
)
from hypervisor.mm.builds import get_build

if TYPE_CHECKING:
    from hypervisor.core.hypervisor import Hypervisor

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


class Transfer(Strategy):
    name = "transfer"
    hands_over_types = True

    def check(self, old_build: str, settings: UpdateSettings) -> None:
        translator_for(old_build, settings.to_build)

    def rebuild(self, nb: NewBuild) -> dict[str, Any]:
        """Install the old build's per-frame type state, translated into this build's
        layout (each run of equal state is translated once, then written to its frames)."""
        return install_translated(nb.hv, nb.handovers, nb.old_build)


def install_translated(hv: Hypervisor, handovers: list[DomainHandover], old_build: str
                       ) -> dict[str, Any]:
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
        # the hypervisor pages it owns (shared_info, grant frames): their general references
        kept = np.array((ho.meta.get("kept_pages") or {}).get("type_state", []),
                        np.uint64).reshape(-1, 4)
        if kept.size:
            mfns = kept[:, 0].astype(np.int64)
            ft.type_info[mfns] = translate(kept[:, 1]).astype(ft.type_info.dtype)
            ft.count_info[mfns] = kept[:, 2].astype(ft.count_info.dtype)
            ft.linear_pt_count[mfns] = kept[:, 3].astype(ft.linear_pt_count.dtype)
            translated += len(kept)
    return {"frames_translated": translated, "translator": translate.__name__}  # type: ignore


STRATEGY = Transfer()
