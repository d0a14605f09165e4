"""lazy: resume at once, validate what the vCPUs stand on, sweep the rest while they run.

After the blackout (in which only the roots' own references are taken and
the tables on the path of each vCPU's RIP and RSP are validated) the
domain's MMUs run in shadow mode: a TLB fill first validates every
not-yet-validated table its walk goes through ("faults become typerefs"),
and never maps a page-table frame writable, validated yet or not. A
background sweeper validates the rest, a budget per scheduling quantum. When
nothing is left, shadow mode switches off and the proof of the type state
runs (a loud failure if it differs from the old build's).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from emulator.paging import ADDR_MASK, P
from hypervisor.liveupdate.costs import deferred_ns
from hypervisor.liveupdate.handover import DomainHandover
from hypervisor.liveupdate.proof import ProofFailed
from hypervisor.liveupdate.strategies.base import (
    NewBuild,
    StagedState,
    Strategy,
    UpdateSettings,
    cr3s_of,
    pins_of,
    table_frames,
)

if TYPE_CHECKING:
    from hypervisor.core.domain import Domain
    from hypervisor.core.hypervisor import Hypervisor
    from hypervisor.mm.frametable import FrameTable
    from hypervisor.mm.incremental import IncrementalTyping


class LazyDomain:
    """The MMU-side face of one domain's incremental typing."""

    def __init__(self, typing: IncrementalTyping, dom: Domain, update: LazyUpdate) -> None:
        self.typing = typing
        self.dom = dom
        self.update = update
        self.fill_wall_s = 0.0

    def may_map_writable(self, mfn: int) -> bool:
        return self.typing.may_map_writable(mfn)

    def validate_walk(self, mem_u64: np.ndarray, base_ma: int, gva: int) -> None:
        started = time.perf_counter()
        path = [base_ma >> 12]
        table = base_ma
        for level in (4, 3, 2):
            entry = int(mem_u64[(table >> 3) + ((gva >> (12 + 9 * (level - 1))) & 0x1FF)])
            if not entry & P:
                break
            table = entry & ADDR_MASK
            path.append(table >> 12)
        self.typing.validate_path(path)
        self.fill_wall_s += time.perf_counter() - started

    def finish(self) -> None:
        """Validate the rest now (a page-table hypercall is about to change the tables)."""
        self.typing.finish()
        self.update.domain_done(self)


class Lazy(Strategy):
    name = "lazy"
    proves_types_at_resume = False  # proved per domain when its validation completes

    def before_pause(self, hv: Hypervisor, settings: UpdateSettings,
                     staged: StagedState | None) -> None:
        """Set each domain's incremental typing up in the staged tables, from the
        hand-over sent ahead (with `--exec` it is set up in the blackout instead)."""
        if staged is None:
            return
        for domid, sent in staged.sent.items():
            staged.typing[domid] = stage_typing(hv.memory.u64, staged.frame_table, domid,
                                                sent.p2m, sent.tables)

    def domain_installed(self, nb: NewBuild, dom: Domain, ho: DomainHandover) -> None:
        # what was set up ahead holds if no page table changed since
        lazy = start_lazy(nb.hv, dom, ho, nb.settings.sweep_budget_ptes,
                          None if ho.tables_changed else nb.typing.get(dom.domid))
        nb.counters.update(lazy.update.blackout)  # the roots and RIP/RSP paths: in the blackout

    def resumed(self, nb: NewBuild, report: dict[str, Any], prove: Any) -> None:
        """Count the blackout's share, start the lazy period and prove each domain's type
        state the moment its validation completes (before its guest can change a table)."""
        lazy = lazy_update_of(nb.hv)
        if lazy is None:  # no PV domain: nothing is validated lazily (HVM has no page types)
            report["proof_after_lazy"] = {"ok": True, "problems": [], "domains": 0}
            report["deferred_work_ns"] = 0
            return
        lazy.resumed()
        problems: list[str] = []

        def on_domain_done(dom: Domain) -> None:
            problems.extend(prove(dom))
            if problems:
                raise ProofFailed("lazy typeref reconstruction differs: "
                                  + "; ".join(problems[:5]))

        def on_done() -> None:
            report["proof_after_lazy"] = {"ok": not problems, "problems": problems,
                                          "domains": len(lazy.domains)}
            counters = lazy.counters(nb.hv)
            report["counters"].update(counters)
            report["deferred_work_ns"] = deferred_ns(report["counters"], nb.settings.costs)
            ns = counters["shadow_off_virtual_ns"]
            instructions = counters["lazy_period_instructions"]
            throughput = report.setdefault("throughput", {})
            throughput["during_lazy"] = round(instructions / (ns / 1e6), 1) if ns else None
            # hvlab's clock counts guest instructions, so the validation work after the
            # resume takes no virtual time; natively it stalls the guest's CPU (the sweeper
            # and the fills run there): the rate had it taken its modelled time
            stalled = ns + report["deferred_work_ns"]
            throughput["during_lazy_modelled"] = (round(instructions / (stalled / 1e6), 1)
                                                  if stalled else None)

        lazy.on_domain_done = on_domain_done
        lazy.on_done = on_done


class LazyUpdate:
    """Every lazily validated domain of a hypervisor, the sweeper and shadow-off: a slice
    hook of the new build (`Hypervisor.slice_hooks`) until shadow mode is off."""

    def __init__(self, hv: Hypervisor, budget_ptes: int) -> None:
        self.hv = hv
        self.budget_ptes = budget_ptes
        self.domains: list[tuple[Domain, LazyDomain]] = []
        self.started_ns = hv.now
        self.shadow_off_ns: int | None = None
        self.sweeper_steps = 0
        self.on_done: Callable[[], None] | None = None
        # called once per domain the moment its tables are all validated, before
        # the guest can change any of them: that is when its type state is proved
        self.on_domain_done: Callable[[Domain], None] | None = None
        self._proved: set[int] = set()
        self.instructions_at_start = 0
        self.instructions_at_end = 0
        self.blackout: dict[str, int] = {}
        self.background_wall_s = 0.0  # sweeper and fill validations, after the blackout

    def resumed(self) -> None:
        """The guests run again (every domain installed, the downtime passed): the lazy
        period's virtual time and instructions count from here."""
        self.started_ns = self.hv.now
        self.instructions_at_start = _instructions(self.hv)

    def add(self, dom: Domain, lazy: LazyDomain) -> None:
        self.domains.append((dom, lazy))
        for v in dom.vcpus:
            v.mmu.pending_typing = lazy

    def after_slice(self, now: int) -> None:
        """One quantum's worth of background validation (a slice hook)."""
        started = time.perf_counter()
        try:
            self._sweep(now)
        finally:
            self.background_wall_s += time.perf_counter() - started

    def _sweep(self, now: int) -> None:
        budget = self.budget_ptes
        for _dom, lazy in self.domains:
            if lazy.typing.done or budget <= 0:
                self.domain_done(lazy)
                continue
            step = lazy.typing.sweep(budget)
            budget -= max(step.ptes, 1)
            self.sweeper_steps += 1
            self.domain_done(lazy)
        if all(lazy.typing.done for _, lazy in self.domains):
            self._shadow_off(now)

    def domain_done(self, lazy: LazyDomain) -> None:
        if lazy.typing.done and lazy.dom.domid not in self._proved:
            self._proved.add(lazy.dom.domid)
            for v in lazy.dom.vcpus:  # this domain's shadow mode ends here
                v.mmu.pending_typing = None
            if self.on_domain_done is not None:
                self.on_domain_done(lazy.dom)

    def _shadow_off(self, now: int) -> None:
        for dom, _ in self.domains:
            for v in dom.vcpus:
                v.mmu.pending_typing = None
        for cpu in self.hv.pcpus:
            cpu.flush_tlb()  # read-only shadow mappings may now be writable ones
        self.hv.slice_hooks.remove(self)
        self.shadow_off_ns = now
        self.instructions_at_end = _instructions(self.hv)
        if self.on_done is not None:
            self.on_done()

    def finish_now(self) -> None:
        """Validate everything left at once (the run is ending, or must)."""
        if self.shadow_off_ns is None:
            for _, lazy in self.domains:
                lazy.finish()
            self._shadow_off(self.hv.now)

    def counters(self, hv: Hypervisor) -> dict[str, Any]:
        t = [lazy.typing for _, lazy in self.domains]
        return {
            "lazy_fill_validations": sum(x.fill_validations for x in t),
            "sweeper_steps": self.sweeper_steps,
            "lazy_ptes_examined": sum(x.ptes_examined for x in t),
            "lazy_pages_validated": sum(x.pages_validated for x in t),
            "lazy_refs_taken": sum(x.refs_taken for x in t),
            "shadow_off_virtual_ns": (None if self.shadow_off_ns is None
                                      else self.shadow_off_ns - self.started_ns),
            "lazy_period_instructions": self.instructions_at_end - self.instructions_at_start,
            "lazy_background_wall_s": round(
                self.background_wall_s + sum(lazy.fill_wall_s for _, lazy in self.domains), 6),
        }


def _instructions(hv: Hypervisor) -> int:
    return sum(v.instructions for d in hv.domains for v in d.vcpus)


def stage_typing(mem: np.ndarray, frames: FrameTable, domid: int, p2m: np.ndarray,
                 tables: np.ndarray) -> IncrementalTyping:
    """A domain's incremental typing set up from its page-table list, all but the CR3
    references (before the pause, from the hand-over sent ahead, or in the blackout)."""
    from hypervisor.mm.incremental import IncrementalTyping

    return IncrementalTyping(mem, frames, domid, table_frames(p2m, tables),
                             pins_of(p2m, tables), None)


def start_lazy(hv: Hypervisor, dom: Domain, ho: DomainHandover, budget_ptes: int,
               typing: IncrementalTyping | None = None) -> LazyDomain:
    """Roots referenced, RIP/RSP paths validated, shadow mode on, sweeper armed
    (`typing`: set up before the pause)."""
    if typing is None:
        typing = stage_typing(hv.memory.u64, hv.frame_table, dom.domid, ho.p2m, ho.tables)
    typing.take_root_refs(cr3s_of(ho.contexts))
    update = lazy_update_of(hv)
    if update is None:
        update = LazyUpdate(hv, budget_ptes)
        hv.slice_hooks.append(update)
    lazy = LazyDomain(typing, dom, update)
    update.add(dom, lazy)
    for v in dom.vcpus:
        if v.context is not None:
            regs = hv.read_vcpu_registers(v)
            root = getattr(v.mmu, "active_root", v.roots.kernel_ma)  # CPL 3: user or kernel
            for gva in (regs["rip"], regs["rsp"]):
                lazy.validate_walk(hv.memory.u64, root, gva)
    # the blackout's own work (roots and the RIP/RSP paths) is priced; fills come later
    for key in ("ptes_examined", "pages_validated", "refs_taken"):
        update.blackout[f"blackout_{key}"] = (update.blackout.get(f"blackout_{key}", 0)
                                              + getattr(typing, key))
    typing.fill_validations = 0
    return lazy


def lazy_update_of(hv: Hypervisor) -> LazyUpdate | None:
    """The lazy update still validating on `hv`, if any."""
    return next((h for h in hv.slice_hooks if isinstance(h, LazyUpdate)), None)


STRATEGY = Lazy()
