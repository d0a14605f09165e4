"""The device backends of a Linux PV domain: its console ring (and, when wired, xenstore).

Run when the guest kicks an event channel and after every scheduling slice
(a console daemon polls as well): output is copied to the domain's console.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypervisor.pv.linux.console_ring import ConsoleRing
from hypervisor.pv.linux.xenstore import Xenstore


@dataclass
class Backends:
    console: ConsoleRing
    xenstore: Xenstore | None = None

    def kick(self) -> None:
        self.console.drain()
        if self.xenstore is not None:
            self.xenstore.service()


class BackendPoll:
    """The backends' turn after every slice (a slice hook of the hypervisor) while the
    domain lives: what a console daemon's poll does."""

    def __init__(self, dom) -> None:
        self.dom = dom

    def after_slice(self, now: int) -> None:
        if self.dom.alive and self.dom.backends is not None:
            self.dom.backends.kick()

    def finish_now(self) -> None:
        self.after_slice(0)
