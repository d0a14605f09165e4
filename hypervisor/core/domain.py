"""Domains: a guest's memory, vCPUs, console, events and fate."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from hypervisor.core.evtchn import EventChannels
from hypervisor.core.vcpu import Vcpu

if TYPE_CHECKING:
    from hypervisor.core.policy import DomainPolicy

SHUTDOWN_REASONS = {0: "poweroff", 1: "reboot", 2: "suspend", 3: "crash", 4: "watchdog"}


@dataclass(frozen=True)
class Shutdown:
    reason: str
    code: int | None
    virtual_ns: int


@dataclass
class Domain:
    domid: int
    name: str
    policy: DomainPolicy  # what this kind of domain does differently (PV or HVM)
    p2m: np.ndarray  # pfn -> mfn (uint64)
    shared_info_mfn: int
    vcpus: list[Vcpu] = field(default_factory=list)
    console: bytearray = field(default_factory=bytearray)
    shutdown: Shutdown | None = None
    crash_report: str | None = None
    evtchn: EventChannels | None = None
    start_info_va: int = 0
    virt_base: int = 0
    shared_info_pfn: int = 0
    # the guest's clock minus the hypervisor's: a restored domain's time goes on
    # from where it was saved (like a TSC offset)
    time_offset: int = 0
    hvm: Any = None  # an HvmDomain (P2M/EPT, layout, EPT violations) for HVM domains
    backends: Any = None  # console ring and xenstore of a Linux PV domain (pv/linux/backends)
    # address -> "symbol+offset" for crash reports (hypervisor/kernel_symbols.py)
    describe_address: Any = None
    grant_table: Any = None  # a PV domU's GrantTable (pv/xen/grant_table)
    kernel_file: str = ""  # Linux PV: the kernel file that was booted (its real name)
    guest_os: str = ""  # a PV kernel's GUEST_OS note ("hvlab": sched_shutdown has a verdict)

    @property
    def kind(self) -> str:
        """"pv" or "hvm"."""
        return self.policy.name

    @property
    def nr_pages(self) -> int:
        return int(self.p2m.size)

    @property
    def alive(self) -> bool:
        return self.shutdown is None

    def wake_vcpu(self, vcpu_id: int) -> None:
        """An event became pending for this vCPU (the event channels' kick)."""
        self.vcpus[vcpu_id].wake()

    @property
    def events(self) -> EventChannels:
        """The event channels of a PV domain (every PV domain has them)."""
        if self.evtchn is None:
            raise RuntimeError(f"domain {self.name} has no event channels")
        return self.evtchn

    def console_text(self) -> str:
        return self.console.decode("utf-8", errors="replace")
