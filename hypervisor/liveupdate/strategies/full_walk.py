"""full-walk: re-pin every pinned root and take every CR3 reference before resuming.

The new build validates each PV domain's page tables from scratch, in the blackout:
downtime grows with the number of present PTEs (the baseline the others improve on).
"""

from __future__ import annotations

from typing import Any

from hypervisor.liveupdate.strategies.base import NewBuild, Strategy, full_walk_domain


class FullWalk(Strategy):
    name = "full-walk"

    def rebuild(self, nb: NewBuild) -> dict[str, Any]:
        total: dict[str, Any] = {}
        for domid, ho in enumerate(nb.handovers):
            if ho.kind != "pv":
                continue  # HVM memory has no PV page types: EPT is rebuilt from the P2M
            for key, value in full_walk_domain(nb.hv, domid, ho).items():
                total[f"blackout_{key}"] = total.get(f"blackout_{key}", 0) + value
        return total


STRATEGY = FullWalk()
