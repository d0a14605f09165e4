"""hvlab from Python (a notebook, a script): boot a scenario, run it bit by bit, look inside.

    from hypervisor.api import Machine
    m = Machine.boot("scenarios/pv-hello.toml")
    m.run(until=lambda m: "all checks passed" in m.console("hello"))
    m.registers("hello")["rip"]

Looking never changes the guest: registers and memory are read without
setting accessed bits or populating memory, so a run that is looked at ends
exactly as one that is not. Times are virtual nanoseconds (one instruction
is one nanosecond). Guest memory is read by guest-virtual address (through
the vCPU's own page tables) or guest-physical address (a PV guest's pseudo-
physical frame number, an HVM guest's gpa). docs/api.md has worked examples.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from emulator.addr import PAGE_SIZE
from emulator.exits import Exit
from emulator.paging import WalkFault, walk
from hypervisor.core.domain import Domain
from hypervisor.core.hypervisor import Hypervisor
from hypervisor.core.seams import Seams
from hypervisor.core.vcpu import Vcpu
from hypervisor.lib.errors import HvlabError
from hypervisor.mm.builds import PageType
from hypervisor.mm.frametable import FrameTable
from hypervisor.mm.pte import (
    PTE_ACCESSED,
    PTE_DIRTY,
    PTE_GLOBAL,
    PTE_NX,
    PTE_PRESENT,
    PTE_PSE,
    PTE_RW,
    PTE_USER,
    pte_mfn,
)
from hypervisor.runner import boot_scenario, describe
from hypervisor.scenario import Scenario, load_scenario

_FLAGS = ((PTE_PRESENT, "P"), (PTE_RW, "RW"), (PTE_USER, "US"), (PTE_ACCESSED, "A"),
          (PTE_DIRTY, "D"), (PTE_PSE, "PSE"), (PTE_GLOBAL, "G"), (PTE_NX, "NX"))


def _flag_names(entry: int) -> str:
    return " ".join(name for bit, name in _FLAGS if entry & bit)


def _frame(ft: FrameTable, mfn: int) -> dict[str, Any]:
    return {"mfn": mfn, "type": ft.page_type(mfn).name, "type_count": ft.type_count(mfn),
            "pinned": ft.is_pinned(mfn), "validated": ft.is_validated(mfn)}


class ApiError(HvlabError):
    """A question the machine cannot answer: no such domain, an unmapped address ..."""


@dataclass(frozen=True)
class ExitEvent:
    """What an exit hook is given: which vCPU stopped, why, and when."""

    domain: str
    vcpu: int
    kind: str  # the exit's name in the run's `exits` counts: hypercall, page_fault ...
    virtual_ns: int
    exit: Exit  # the emulator's own record (emulator/exits.py): rip, vector, ...


class Machine:
    """A booted scenario: a hypervisor with its domains, stopped at `now`."""

    def __init__(self, hv: Hypervisor, scenario: Scenario) -> None:
        self.hv = hv
        self.scenario = scenario
        self.stop_reason: str | None = None
        self._started = time.perf_counter()

    @classmethod
    def boot(cls, scenario: str | Path, build: str | None = None,
             seams: Seams | None = None) -> Machine:
        """Boot a scenario file (its [[update]]s are not applied: see `hvlab update`)."""
        sc = load_scenario(scenario)
        return cls(boot_scenario(sc, build, seams=seams), sc)

    # ------------------------------------------------------------------ running
    @property
    def now(self) -> int:
        """Virtual time, ns."""
        return self.hv.now

    @property
    def finished(self) -> bool:
        """Every domain has shut down (or crashed)."""
        return not any(d.alive for d in self.hv.domains)

    def step(self, ns: int = 1) -> str:
        """Run every pCPU `ns` more nanoseconds (= instructions); returns why it stopped."""
        if ns < 1:
            raise ApiError(f"step: ns must be at least 1, got {ns}")
        self.stop_reason = self.hv.run(self.hv.now + ns)
        return self.stop_reason

    def run(self, until_ns: int | None = None,
            until: Callable[[Machine], bool] | None = None, every_ns: int = 10_000) -> str:
        """Run to virtual time `until_ns` (default: the scenario's limit), or until
        `until(machine)` is true, asked every `every_ns`; returns why it stopped:
        "condition", "time-limit", "shutdown" or "idle"."""
        limit = self.scenario.virtual_time_ns if until_ns is None else until_ns
        if until is None:
            self.stop_reason = self.hv.run(limit)
            return self.stop_reason
        while not until(self):
            self.stop_reason = self.hv.run(min(limit, self.hv.now + every_ns))
            if self.stop_reason != "time-limit" or self.hv.now >= limit:
                return self.stop_reason
        self.stop_reason = "condition"
        return self.stop_reason

    def on_exit(self, hook: Callable[[ExitEvent], None]) -> Callable[[], None]:
        """Call `hook` at every exit that stops a vCPU; returns a function that unhooks it."""

        def on_exit(v: Vcpu, exit_: Exit, kind: str) -> None:
            hook(ExitEvent(v.domain.name, v.vcpu_id, kind, self.hv.now, exit_))

        self.hv.exit_hooks.append(on_exit)
        return lambda: self.hv.exit_hooks.remove(on_exit)

    def report(self) -> dict[str, Any]:
        """What `hvlab run --json` prints for the run so far."""
        return describe(self.hv, self.scenario, self.stop_reason or "running",
                        time.perf_counter() - self._started)

    # ------------------------------------------------------------------ looking
    def domain(self, name: str) -> Domain:
        for dom in self.hv.domains:
            if dom.name == name:
                return dom
        names = ", ".join(d.name for d in self.hv.domains)
        raise ApiError(f"no domain '{name}' (domains: {names})")

    def console(self, domain: str) -> str:
        return self.domain(domain).console_text()

    def vcpu(self, domain: str, vcpu: int = 0) -> Vcpu:
        dom = self.domain(domain)
        if not 0 <= vcpu < len(dom.vcpus):
            raise ApiError(f"domain {domain} has no vCPU {vcpu} (it has {len(dom.vcpus)})")
        return dom.vcpus[vcpu]

    def registers(self, domain: str, vcpu: int = 0) -> dict[str, int]:
        """Every architectural register of the vCPU (general, rip, rflags, segments, CRs)."""
        v = self.vcpu(domain, vcpu)
        if v.context is None:
            raise ApiError(f"{domain} vCPU {vcpu} has not been started")
        return self.hv.read_vcpu_registers(v)

    def read_virtual(self, domain: str, va: int, size: int, vcpu: int = 0) -> bytes:
        """`size` bytes at guest-virtual `va`, through the vCPU's current page tables."""
        v = self.vcpu(domain, vcpu)
        if v.hvm is not None:
            data = v.mmu.peek(va, size)  # type: ignore[attr-defined]
            if data is None:
                raise ApiError(f"{domain}: {va:#x} is not mapped to RAM")
            return data
        out = bytearray()
        while len(out) < size:
            at = va + len(out)
            t = walk(self.hv.memory.u64, v.roots.kernel_ma, at & ~0xFFF, "read",
                     set_accessed=False)
            if isinstance(t, WalkFault):
                raise ApiError(f"{domain}: {at:#x} is not mapped (a read would fault at "
                               f"level {t.level})")
            n = min(size - len(out), PAGE_SIZE - (at & 0xFFF))
            out += self.hv.memory.read(t.ma + (at & 0xFFF), n)
        return bytes(out)

    def page_walk(self, domain: str, va: int, vcpu: int = 0) -> list[dict[str, Any]]:
        """The PV page walk of `va`: per level (4 to 1) the table's frame, the entry's
        machine address and value, its flags, and the frame it points at with that
        frame's page type, type count, pinned and validated; then the final frame
        (level 0)."""
        v = self.vcpu(domain, vcpu)
        if v.hvm is not None:
            raise ApiError(f"{domain} is an HVM domain: page_walk shows PV walks")
        t = walk(self.hv.memory.u64, v.roots.kernel_ma, va & ~0xFFF, "read", set_accessed=False)
        if isinstance(t, WalkFault):
            raise ApiError(f"{domain}: {va:#x} is not mapped (the walk stops at level "
                           f"{t.level})")
        ft = self.hv.frame_table
        rows = []
        for level, entry_ma in zip((4, 3, 2, 1), t.entry_mas, strict=False):
            entry = int(self.hv.memory.u64[entry_ma // 8])
            rows.append({"level": level, "table": entry_ma >> 12, "entry_ma": entry_ma,
                         "entry": entry,
                         "flags": _flag_names(entry), **_frame(ft, pte_mfn(entry))})
        rows.append({"level": 0, **_frame(ft, t.ma >> 12)})
        return rows

    def read_physical(self, domain: str, address: int, size: int) -> bytes:
        """`size` bytes at a guest-physical address (PV: pfn << 12 + offset)."""
        dom = self.domain(domain)
        out = bytearray()
        while len(out) < size:
            at = address + len(out)
            ma = self._machine_address(dom, at)
            n = min(size - len(out), PAGE_SIZE - (at & 0xFFF))
            out += self.hv.memory.read(ma, n)
        return bytes(out)

    def _machine_address(self, dom: Domain, gpa: int) -> int:
        if dom.hvm is not None:
            ma = dom.hvm.physmap.gpa_to_ma(gpa)
            if ma is None:
                raise ApiError(f"{dom.name}: guest-physical {gpa:#x} is not backed by RAM")
            return ma
        pfn = gpa >> 12
        if not 0 <= pfn < dom.nr_pages:
            raise ApiError(f"{dom.name}: pfn {pfn:#x} is beyond its {dom.nr_pages} pages")
        return int(dom.p2m[pfn]) * PAGE_SIZE + (gpa & 0xFFF)

    def frame_table(self, domain: str | None = None) -> dict[str, np.ndarray]:
        """The frame table as columns, one row per machine frame (of `domain`, if given):
        mfn, pfn (M2P), type (PageType names), type_count, pinned, validated,
        general_count, owner."""
        ft = self.hv.frame_table
        if domain is None:
            mfns = np.arange(ft.nr_frames, dtype=np.int64)
        else:
            mfns = ft.frames_of(self.domain(domain).domid).astype(np.int64)
        names = np.array([t.name for t in PageType])
        return {"mfn": mfns, "pfn": self.hv.m2p[mfns].astype(np.int64),
                "type": names[ft.types(mfns).astype(np.int64)],
                "type_count": ft.type_counts(mfns), "pinned": ft.pinned(mfns),
                "validated": ft.validated(mfns), "general_count": ft.general_counts(mfns),
                "owner": ft.owner[mfns]}
