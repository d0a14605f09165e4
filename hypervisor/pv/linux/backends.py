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
