"""The hypervisor: domains and vCPUs on a machine of N physical CPUs.

This is the part every domain shares: the machine (host memory, physical CPUs, the
frame allocator, page_info and the M2P), the run loop in slices of virtual time,
loading vCPUs onto physical CPUs, guest memory access through a vCPU's MMU, and a
domain's fate. What PV and HVM domains do differently is asked of `dom.policy`
(`hypervisor/core/policy.py`); domains are built by `hypervisor/pv/` and
`hypervisor/hvm/`.
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from emulator.addr import PAGE_SIZE
from emulator.engine import PhysicalCpu
from emulator.exits import Cpuid, Exit, PortIO
from emulator.memory import HostMemory
from emulator.paging import WalkFault
from hypervisor.core.dispatch import ExitDispatcher
from hypervisor.core.domain import SHUTDOWN_REASONS, Domain, Shutdown
from hypervisor.core.evtchn import EventChannels
from hypervisor.core.frames import FrameAllocator
from hypervisor.core.hypercalls import GuestAccessError
from hypervisor.core.policy import DomainPolicy
from hypervisor.core.scheduler import Scheduler
from hypervisor.core.seams import HVLAB_OWN, Seams
from hypervisor.core.vcpu import REGISTERS, Vcpu
from hypervisor.lib.errors import HvlabError
from hypervisor.lib.extents import runs_of
from hypervisor.mm.builds import get_build
from hypervisor.mm.check import Difference
from hypervisor.mm.errors import ERESTART
from hypervisor.mm.frametable import DOMID_INVALID, FrameTable
from hypervisor.mm.typerefs import PageTyping

DEFAULT_QUANTUM_NS = 1_000_000  # 1 ms of virtual time = 1 M instructions
TSC_KHZ = 1_000_000  # one instruction per nanosecond: a 1 GHz TSC
KERNEL_CS, KERNEL_DS = 0x08, 0x10
# The hypervisor's own GDT (PV guests run on it): null, 64-bit code (DPL 0), data (DPL 0)
GDT = struct.pack("<QQQ", 0, 0x00AF_9A00_0000_FFFF, 0x00CF_9200_0000_FFFF)
INVALID_PFN = 0xFFFF_FFFF_FFFF_FFFF


@dataclass
class StagedTables:
    """A hypervisor's per-frame tables, empty: the frame allocator, page_info and M2P.

    A live update can make the new build's before the pause (`staged`), their
    memory already faulted in, as a new hypervisor image is loaded ahead of a
    kexec; the blackout then only fills them in.
    """

    allocator: FrameAllocator
    frame_table: FrameTable
    m2p: np.ndarray

    @classmethod
    def empty(cls, nr_frames: int, build: str, touch: bool = False) -> StagedTables:
        staged = cls(FrameAllocator(nr_frames), FrameTable(nr_frames, get_build(build)),
                     np.full(nr_frames, INVALID_PFN, dtype=np.uint64))
        if touch:  # fault every page in now rather than in the blackout
            ft = staged.frame_table
            for array in (ft.type_info, ft.count_info, ft.nr_validated_ptes,
                          ft.partial_flags, ft.linear_pt_count):
                array.fill(0)
        return staged

    def claim(self, p2m: np.ndarray, domid: int) -> int:
        """Give frames that already hold a domain's data to it (ahead of a live update's
        pause); returns how many runs of consecutive frames that took."""
        self.allocator.mark_used(p2m)
        return assign_frames(self.frame_table, self.m2p, p2m, domid)


def assign_frames(frame_table: FrameTable, m2p: np.ndarray, p2m: np.ndarray, domid: int) -> int:
    """Ownership and the M2P of a domain's frames; returns how many runs of consecutive
    frames that took (one per frame when they are scattered)."""
    runs = runs_of(p2m)
    if runs is None:
        frame_table.assign(p2m, domid)
        m2p[p2m.astype(np.int64)] = np.arange(p2m.size, dtype=np.uint64)
        return int(p2m.size)
    frame_table.assign_runs(runs, domid)
    for pfn, first, count in runs.tolist():
        m2p[first : first + count] = np.arange(pfn, pfn + count, dtype=np.uint64)
    return len(runs)


@dataclass(frozen=True)
class MachineConfig:
    pcpus: int
    memory: int  # bytes
    quantum_ns: int = DEFAULT_QUANTUM_NS


class Hypervisor:
    def __init__(self, machine: MachineConfig, build: str = "4.19",
                 memory: HostMemory | None = None,
                 in_use: list[np.ndarray] | None = None,
                 staged: StagedTables | None = None,
                 seams: Seams | None = None) -> None:
        """Boot on `machine`. A live update passes the host memory it keeps and the
        frames the guests hold (`in_use`), so this build allocates around them, and
        may pass the per-frame tables it staged before the pause. `seams` plugs a
        lab's code in place of hvlab's own (hypervisor/core/seams.py)."""
        self.machine = machine
        self.seams = seams if seams is not None else HVLAB_OWN
        self.build = build
        self.memory = memory if memory is not None else HostMemory(machine.memory)
        if staged is None:
            staged = StagedTables.empty(self.memory.nr_frames, build)
        elif staged.frame_table.build.version != build or staged.m2p.size != self.memory.nr_frames:
            raise HvlabError("staged tables do not fit this build and machine")
        self.frames = staged.allocator
        for frames in in_use or ():
            self.frames.mark_used(frames)
        # page_info for every machine frame, in this build's layout (docs/design.md §3)
        self.frame_table = staged.frame_table
        self.typing = PageTyping(self.frame_table, self.memory.u64,
                                 writable_mapping=self.seams.writable_mapping)
        self.m2p = staged.m2p
        self.pcpus = [PhysicalCpu(i, self.memory) for i in range(machine.pcpus)]
        self.loaded: list[Vcpu | None] = [None] * machine.pcpus
        self.gdt_mfn = self.frames.alloc_one("the hypervisor GDT")
        self.memory.write(self.gdt_mfn * PAGE_SIZE, GDT)
        self.domains: list[Domain] = []
        self.scheduler = Scheduler(machine.pcpus)
        self.dispatcher = ExitDispatcher(self)
        self.policies: dict[str, DomainPolicy] = {}  # per domain kind, made on first use
        self.now = 0  # virtual ns at the start of the current slice
        self.exits: Counter[str] = Counter()
        self.tracer: ExitTracer | None = None  # `hvlab trace` (hypervisor/tracing.py)
        # called with (vCPU, exit, its name) at every exit, once counted (hypervisor/api.py)
        self.exit_hooks: list[Callable[[Vcpu, Exit, str], None]] = []
        # work that runs after every slice until it is done (a lazy update's sweeper)
        self.slice_hooks: list[SliceHook] = []
        for cpu in self.pcpus:
            cpu.sync_exit = self._sync_exit_for(cpu)

    def teardown(self) -> None:
        """Leave the machine: engines gone, the hypervisor's own frames scrubbed and freed.

        Guest frames and their contents stay where they are (a live update).
        Tearing down twice is harmless (a teardown interrupted is finished).
        """
        for cpu in self.pcpus:
            cpu.close()
        self.pcpus = []
        self.loaded = []
        if not self.frames.free[self.gdt_mfn]:
            self.scrub_and_release(np.array([self.gdt_mfn], dtype=np.uint64))
        for dom in self.domains:  # what this build holds in its own layout (HVM: EPT)
            tables = np.array(sorted(dom.policy.release(dom)), dtype=np.uint64)
            tables = tables[~self.frames.free[tables.astype(np.int64)]]
            self.scrub_and_release(tables)
        self.domains = []

    @property
    def build_version(self) -> tuple[int, int]:
        major, minor = self.build.split(".")[:2]
        return int(major), int(minor)

    # ---------------------------------------------------------------- domains
    def policy_for(self, kind: str, make: Callable[[Hypervisor], DomainPolicy]
                   ) -> DomainPolicy:
        """This hypervisor's policy object for domain kind `kind` (`make(self)` once)."""
        policy = self.policies.get(kind)
        if policy is None:
            policy = self.policies[kind] = make(self)
        return policy

    def claim_frames(self, p2m: np.ndarray, domid: int) -> int:
        """Give allocated frames to domain `domid`: ownership and the M2P (returns runs)."""
        return assign_frames(self.frame_table, self.m2p, p2m, domid)

    def unclaim_frames(self, p2m: np.ndarray) -> None:
        """Undo `claim_frames` and everything typed since: the rows return to free."""
        rows = p2m.astype(np.int64)
        ft = self.frame_table
        ft.type_info[rows] = 0
        ft.count_info[rows] = 0
        ft.owner[rows] = ft.owner.dtype.type(DOMID_INVALID)
        ft.nr_validated_ptes[rows] = 0
        ft.partial_flags[rows] = 0
        ft.linear_pt_count[rows] = 0
        self.m2p[rows] = INVALID_PFN
        self.scrub_and_release(p2m)

    def start_vcpu_with(self, v: Vcpu, setup: Callable[[PhysicalCpu], None]) -> None:
        """Give a vCPU its first architectural state: `setup` writes it on a reset CPU."""
        cpu = self.pcpus[v.pcpu]
        self._unload(v.pcpu)
        cpu.reset()
        cpu.mmu = v.mmu
        setup(cpu)
        v.context = cpu.save_context()
        self.loaded[v.pcpu] = v

    def evtchn_of(self, domid: int) -> EventChannels | None:
        """A live domain's event channels (an interdomain channel's peer), or None."""
        if 0 <= domid < len(self.domains) and self.domains[domid].alive:
            return self.domains[domid].evtchn
        return None

    def scrub_and_release(self, mfns: np.ndarray) -> None:
        """Zero frames and give them back to the allocator."""
        self.memory.u64.reshape(-1, 512)[mfns.astype(np.int64)] = 0
        self.frames.release(mfns)

    # ------------------------------------------------------------------ vCPUs
    def read_vcpu_registers(self, v: Vcpu) -> dict[str, int]:
        """Every architectural register the vCPU's state is made of (REGISTERS)."""
        cpu = self.switch_to(v.pcpu, v)
        return {name: cpu.reg(name) for name in REGISTERS}

    def check_typerefs(self, dom: Domain) -> list[Difference]:
        """The domain's page-type invariant recomputed independently ([]: clean)."""
        return dom.policy.check_typerefs(dom)

    def _unload(self, pcpu: int) -> None:
        current = self.loaded[pcpu]
        if current is not None:
            self.pcpus[pcpu].update_context(current.context)
            self.loaded[pcpu] = None

    def switch_to(self, pcpu: int, v: Vcpu) -> PhysicalCpu:
        """Load `v` onto physical CPU `pcpu` (its context saved back when it leaves)."""
        cpu = self.pcpus[pcpu]
        if self.loaded[pcpu] is not v:
            self._unload(pcpu)
            cpu.load_context(v.context)
            cpu.mmu = v.mmu
            self.loaded[pcpu] = v
        return cpu

    def _sync_exit_for(self, cpu: PhysicalCpu):
        def on_sync(exit_: Exit) -> bool:
            v = self.loaded[cpu.index]
            assert v is not None and isinstance(exit_, Cpuid | PortIO)
            return self.dispatcher.handle_sync(cpu, v, exit_)

        return on_sync

    # ----------------------------------------------------------- guest memory
    def copy_from_guest(self, v: Vcpu, gva: int, size: int) -> bytes:
        return b"".join(self.memory.read(ma, n) for ma, n in self._guest_pages(v, gva, size,
                                                                               "read"))

    def copy_to_guest(self, v: Vcpu, gva: int, data: bytes) -> None:
        pos = 0
        for ma, n in self._guest_pages(v, gva, len(data), "write"):
            self.memory.write(ma, data[pos : pos + n])
            pos += n

    def _guest_pages(self, v: Vcpu, gva: int, size: int, access: str):
        while size > 0:
            n = min(size, PAGE_SIZE - (gva & 0xFFF))
            t = v.mmu.lookup(gva & ~0xFFF, access)
            if isinstance(t, WalkFault):
                raise GuestAccessError(f"{gva:#x}")
            yield t.ma + (gva & 0xFFF), n
            gva += n
            size -= n

    # ------------------------------------------------------------- lifecycle
    def shutdown_domain(self, dom: Domain, reason: int, code: int | None) -> None:
        if dom.alive:
            dom.shutdown = Shutdown(SHUTDOWN_REASONS.get(reason, f"reason {reason}"), code,
                                    self.vcpu_time(dom))

    def crash_domain(self, dom: Domain, report: str) -> None:
        if dom.alive:
            dom.crash_report = report
            dom.shutdown = Shutdown("crash", None, self.vcpu_time(dom))

    def vcpu_time(self, dom: Domain) -> int:
        """The domain's own clock now (restored domains keep theirs)."""
        return self._clock + dom.time_offset

    def count_exit(self, name: str) -> None:
        self.exits[name] += 1

    # -------------------------------------------------------------------- run
    _clock = 0  # virtual time of the instruction being handled

    def run(self, until_ns: int) -> str:
        """Run until every domain has shut down or virtual time reaches `until_ns`.

        Returns why it stopped: "shutdown", "time-limit", "idle" (every vCPU
        blocked with no timer pending: nothing can ever happen again) or
        "trace-limit".
        """
        while True:
            if not any(d.alive for d in self.domains):
                return "shutdown"
            if self.now >= until_ns:
                return "time-limit"
            if self.tracer is not None and self.tracer.exhausted:
                return "trace-limit"
            end = min(self.now + self.machine.quantum_ns, until_ns)
            busy = False
            reached = self.now
            for pcpu in range(len(self.pcpus)):
                ran, t = self._run_slice(pcpu, self.now, end)
                busy |= ran
                reached = max(reached, t)
            for hook in list(self.slice_hooks):
                hook.after_slice(end)
            if not any(d.alive for d in self.domains):
                self.now = reached  # the run ends when the last guest stopped, not at the slice end
                return "shutdown"
            if not busy:
                nxt = self._next_deadline(self.now)
                if nxt is None:
                    return "idle"
                end = max(end, min(nxt, until_ns))  # skip idle time: asleep costs nothing
            self.now = end

    def _next_deadline(self, after: int) -> int | None:
        deadlines = [d for p in range(len(self.pcpus))
                     if (d := self.scheduler.next_deadline(p, after)) is not None]
        return min(deadlines) if deadlines else None

    def _fire_timers(self, pcpu: int, now: int) -> None:
        for v in self.scheduler.vcpus_on(pcpu):
            v.domain.policy.on_time(v, now)

    def finish_background_work(self) -> None:
        """Complete every slice hook's work now (before a live update, or at the end)."""
        for hook in list(self.slice_hooks):
            hook.finish_now()

    def _run_slice(self, pcpu: int, start: int, end: int) -> tuple[bool, int]:
        """Run pCPU `pcpu` from virtual time `start` to `end`.

        Returns whether any vCPU ran and the virtual time the pCPU reached.
        """
        t = start
        ran = False
        while t < end:
            self._fire_timers(pcpu, t)
            v = self.scheduler.pick(pcpu)
            if v is None:
                nxt = self.scheduler.next_deadline(pcpu, t)
                if nxt is None or nxt >= end:
                    break
                t = nxt  # idle until the next timer on this pCPU
                continue
            limit = end
            if v.timer_deadline_ns is not None:
                limit = min(limit, max(v.timer_deadline_ns, t + 1))
            t += self._run_vcpu(pcpu, v, t, limit - t)
            ran = True
        return ran, t

    def _run_vcpu(self, pcpu: int, v: Vcpu, start: int, budget: int) -> int:
        """Run `v` for up to `budget` instructions; returns the virtual ns used."""
        cpu = self.switch_to(pcpu, v)
        used = 0
        v.yield_requested = False
        policy = v.domain.policy
        while used < budget and v.runnable and not v.yield_requested:
            # what is due before the guest runs: an event upcall, an interrupt
            self._clock = start + used
            run_budget = policy.enter(cpu, v, start + used, budget - used)
            if not v.runnable:
                break
            base_time = start + used
            before = cpu.executed
            guest_time = base_time + v.domain.time_offset
            cpu.tsc = _virtual_tsc(cpu, guest_time, before)
            self._clock = base_time
            exit_ = cpu.run(run_budget)
            ran = cpu.executed - before
            used += ran
            v.instructions += ran
            self._clock = start + used
            self.dispatcher.handle(cpu, v, exit_)
            if ran == 0 and not v.runnable:
                break
        return max(used, 1)  # even a vCPU that stops at once costs a nanosecond


class ExitTracer(Protocol):
    """Watches every exit; the run stops when it has seen enough."""

    @property
    def exhausted(self) -> bool: ...

    def exit(self, v: Vcpu, exit_: Exit) -> None: ...


class SliceHook(Protocol):
    """Work done a share at a time after every slice (a lazy update's sweeper, say)."""

    def after_slice(self, now: int) -> None: ...

    def finish_now(self) -> None: ...


def _virtual_tsc(cpu: PhysicalCpu, base_ns: int, executed_at_base: int) -> Callable[[], int]:
    """rdtsc's answer: the guest's time at the instruction (1 instruction = 1 ns)."""
    return lambda: base_ns + (cpu.executed - executed_at_base)


def until_done(op) -> int:
    """Run a preemptible typing operation to completion (hvlab never defers it)."""
    rc = op()
    while rc == -ERESTART:
        rc = op()
    return rc
