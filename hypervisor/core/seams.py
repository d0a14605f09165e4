"""Seams: the few named places where a teaching lab plugs a student's code into hvlab.

Each field of `Seams` replaces one piece of hvlab's own implementation; None
(the default) keeps hvlab's. A `Seams` is handed to the `Hypervisor` when it
boots (`boot_scenario(..., seams=...)`) and travels with it through a live
update to the new build. Nothing else can reach these places: the lab runner
(hypervisor/teaching/labs.py) loads a student's file and passes its functions
here, so students never edit hvlab's sources and hvlab's code says exactly
where a replacement may happen.

- `writable_mapping(typing, mfn) -> 0 | -errno`: an L1 entry with _PAGE_RW maps
  frame `mfn`; Xen's rule (typerefs.take_writable_reference) takes a
  PGT_writable_page type reference, refused (-EBUSY) while the frame is typed
  otherwise, so a page table can never be mapped writable.
- `lapic_timer(elapsed, first_due, period, periodic) -> (expiries, running)`:
  how many times the LAPIC timer expired once an expiry is due, and whether it
  keeps running (vlapic.timer_expiries: one-shot or periodic).
- `full_walk_domain(typing, domid, roots) -> None`: the full-walk live-update
  strategy's work for one PV domain: rebuild every typeref from the domain's
  pinned tables and CR3s (`roots`, `typerefs.Root`), in the new build's table.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hypervisor.mm.typerefs import PageTyping, Root

WritableMappingRule = Callable[["PageTyping", int], int]
TimerRule = Callable[[int, int, int, bool], tuple[int, bool]]
FullWalkDomain = Callable[["PageTyping", int, Sequence["Root"]], None]


@dataclass(frozen=True)
class Seams:
    writable_mapping: WritableMappingRule | None = None
    lapic_timer: TimerRule | None = None
    full_walk_domain: FullWalkDomain | None = None

    @property
    def plugged(self) -> bool:
        """True when any seam holds code other than hvlab's own."""
        return any(getattr(self, name) is not None for name in self.__dataclass_fields__)


HVLAB_OWN = Seams()
