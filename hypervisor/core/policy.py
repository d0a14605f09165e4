"""The domain-kind policy: what the core asks where PV and HVM domains differ.

The core (the run loop, the exit dispatcher, teardown, reports) never tests a
domain's kind; it asks the domain's `policy`. `hypervisor/pv/policy.py` and
`hypervisor/hvm/policy.py` are the two implementations, one object of each per
hypervisor (`Hypervisor.policy_for`), made on first use by the kind's own code,
so the core imports neither package. Xen has the same split: `pv_*` and `hvm_*`
functions behind `is_pv_*()` / `is_hvm_*()` tests and per-kind hypercall tables.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from emulator.engine import PhysicalCpu
    from emulator.exits import Exit, MmuFault
    from hypervisor.core.domain import Domain
    from hypervisor.core.hypercalls import Hypercall
    from hypervisor.core.vcpu import Vcpu
    from hypervisor.mm.check import Difference


class DomainPolicy(Protocol):
    """One domain kind's answers (see the module docstring)."""

    @property
    def name(self) -> str:
        """"pv" or "hvm": the `type` a report shows."""
        ...

    @property
    def hypercalls(self) -> Mapping[int, Hypercall]:
        """The hypercalls this kind of guest may make (by number)."""
        ...

    # ------------------------------------------------------------ running
    def enter(self, cpu: PhysicalCpu, v: Vcpu, now: int, budget: int) -> int:
        """Before `v` runs at virtual time `now`: deliver what is due (an event upcall,
        an interrupt); returns the instruction budget for this run (at most `budget`)."""
        ...

    def on_time(self, v: Vcpu, now: int) -> None:
        """Virtual time on `v`'s pCPU reached `now`: its timers fire."""
        ...

    def next_deadline(self, v: Vcpu) -> int | None:
        """`v`'s next timer deadline in hypervisor time, or None."""
        ...

    # -------------------------------------------------------------- exits
    def exit_name(self, v: Vcpu, exit_: Exit) -> str:
        """The name an exit is counted under."""
        ...

    def halt(self, cpu: PhysicalCpu, v: Vcpu) -> None:
        """The guest executed `hlt`."""
        ...

    def exception(self, cpu: PhysicalCpu, v: Vcpu, vector: int, error_code: int | None,
                  cr2: int | None, return_rip: int, fault_rip: int) -> None:
        """Deliver a fault (or crash the domain when the guest cannot take it)."""
        ...

    def memory_fault(self, cpu: PhysicalCpu, v: Vcpu, exit_: MmuFault) -> bool:
        """A refused TLB fill the kind handles itself (an EPT violation); False when it
        is the guest's own page fault."""
        ...

    def handle_exit(self, cpu: PhysicalCpu, v: Vcpu, exit_: Exit) -> bool:
        """The whole exit, for a kind whose exits mean something else entirely (a guest
        on Xen's ABI at CPL 3); False: the dispatcher's own handling applies."""
        ...

    def answer_cpuid(self, cpu: PhysicalCpu, v: Vcpu, leaf: int) -> bool:
        """Answer `cpuid` for the guest; False: the dispatcher's table answers."""
        ...

    # --------------------------------------------------- state and reports
    def check_typerefs(self, dom: Domain) -> list[Difference]:
        """The page-type invariant recomputed ([] where the kind has no page types)."""
        ...

    def release(self, dom: Domain) -> list[int]:
        """At teardown: the frames this build holds for `dom` in its own layout."""
        ...

    def describe(self, dom: Domain) -> dict[str, Any]:
        """Kind-specific sections for the domain's entry in the run report ({} for none)."""
        ...

    def describe_vcpu(self, v: Vcpu) -> dict[str, Any]:
        """Kind-specific per-vCPU figures for the run report."""
        ...
