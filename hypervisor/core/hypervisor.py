"""The hypervisor: domains and vCPUs on a machine of N physical CPUs."""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from emulator.addr import PAGE_SIZE
from emulator.engine import PhysicalCpu
from emulator.exits import Cpuid, Exit, PortIO
from emulator.memory import HostMemory
from emulator.paging import WalkFault
from hypervisor.core.dispatch import ExitDispatcher
from hypervisor.core.domain import SHUTDOWN_REASONS, Domain, Shutdown
from hypervisor.core.elf import load_kernel
from hypervisor.core.evtchn import VCPU_INFO_SIZE, VIRQ_TIMER, EventChannels
from hypervisor.core.frames import FrameAllocator
from hypervisor.core.hypercalls import GuestAccessError
from hypervisor.core.scheduler import Scheduler
from hypervisor.core.vcpu import DOWN, REGISTERS, RUNNABLE, TrapEntry, Vcpu
from hypervisor.hvm.domain import SourceConfig
from hypervisor.hvm.support import HvmSupport
from hypervisor.lib.errno import EINVAL
from hypervisor.lib.errors import HvlabError
from hypervisor.lib.extents import runs_of
from hypervisor.mm.builds import get_build
from hypervisor.mm.check import Difference, check_typerefs
from hypervisor.mm.errors import ERESTART, errno_name
from hypervisor.mm.frametable import DOMID_INVALID, FrameTable
from hypervisor.mm.typerefs import PageTyping
from hypervisor.pv.builder import build_pv_memory
from hypervisor.pv.mmu import GDT_VA, PvMmu
from hypervisor.pv.xen.support import XenPvSupport
from hypervisor.seams import HVLAB_OWN, Seams
from hypervisor.stream.vcpu_context import VcpuGuestContext

if TYPE_CHECKING:
    from hypervisor.liveupdate.strategies.lazy import LazyUpdate
    from hypervisor.tracing import Tracer

DEFAULT_QUANTUM_NS = 1_000_000  # 1 ms of virtual time = 1 M instructions
KERNEL_CS, KERNEL_DS = 0x08, 0x10
# null, 64-bit code (DPL 0), data (DPL 0)
GDT = struct.pack("<QQQ", 0, 0x00AF_9A00_0000_FFFF, 0x00CF_9200_0000_FFFF)
INITIAL_RFLAGS = 0x2
CR0_PE_PG = 0x8005_0033  # PE, MP, ET, NE, WP, AM, PG: what a 64-bit kernel runs with
CR4_PAE = 0x20
MXCSR_RESET = 0x1F80  # all SSE exceptions masked, as after a CPU reset
VCPU_TIME_OFFSET = 32  # vcpu_time_info inside vcpu_info
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
        lab's code in place of hvlab's own (hypervisor/seams.py)."""
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
        self.hvm = HvmSupport(self)  # HVM domains: builder, entry path, exits, reports
        self.xen_pv = XenPvSupport(self)  # CPL-3 PV domains: Xen's pages, exits, upcalls
        self.now = 0  # virtual ns at the start of the current slice
        self.exits: Counter[str] = Counter()
        self.tracer: Tracer | None = None
        # called with (vCPU, exit, its name) at every exit, once counted (hypervisor/api.py)
        self.exit_hooks: list[Callable[[Vcpu, Exit, str], None]] = []
        # called with the slice's end time after every slice (a lazy sweeper, say)
        self.slice_hooks: list[Callable[[int], None]] = []
        self.lazy_update: LazyUpdate | None = None  # a lazy live update, until shadow-off
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
            self._scrub_and_release(np.array([self.gdt_mfn], dtype=np.uint64))
        xen_pages = self.xen_pv.own_frames()  # CPL-3 PV: Xen's GDT page and read-only M2P
        xen_pages = xen_pages[~self.frames.free[xen_pages.astype(np.int64)]]
        if xen_pages.size:
            self._scrub_and_release(xen_pages)
        for dom in self.domains:  # HVM: the EPT tables are this build's, in its layout
            if dom.hvm is not None:
                tables = np.array(sorted(dom.hvm.physmap.ept.frames), dtype=np.uint64)
                tables = tables[~self.frames.free[tables.astype(np.int64)]]
                self._scrub_and_release(tables)
        self.domains = []

    @property
    def build_version(self) -> tuple[int, int]:
        major, minor = self.build.split(".")[:2]
        return int(major), int(minor)

    # ---------------------------------------------------------------- domains
    def create_pv_domain(self, name: str, kernel_path: str, memory: int, vcpus: int) -> Domain:
        kernel = load_kernel(kernel_path)
        nr_pages = memory // PAGE_SIZE
        if nr_pages <= 0:
            raise HvlabError(f"domain {name}: memory must be at least 4 KiB")
        if not 1 <= vcpus <= 32:
            raise HvlabError(f"domain {name}: vcpus must be between 1 and 32")
        p2m = self.frames.alloc(nr_pages, f"domain {name}")
        try:
            layout, l4_ma = build_pv_memory(self.memory, kernel, p2m, name)
        except HvlabError:
            self._scrub_and_release(p2m)
            raise
        domid = len(self.domains)
        self.claim_frames(p2m, domid)
        # As Xen's builder: the initial L4 is pinned, which validates the whole
        # bootstrap tree, and vCPU 0's CR3 takes its own reference.
        l4_mfn = l4_ma >> 12
        for what, op in (("pin", lambda: self.typing.pin_table(l4_mfn, 4, domid)),
                         ("CR3 reference", lambda: self.typing.get_root_ref(l4_mfn, domid))):
            rc = until_done(op)
            if rc:
                raise HvlabError(f"domain {name}: initial page tables refused ({what}: "
                                 f"{errno_name(rc)})")
        dom = self.install_pv_domain(name, p2m, layout.shared_info_pfn,
                                     layout.va(layout.start_info_pfn), layout.virt_base, vcpus)
        self._init_shared_info(dom, vcpus)
        boot = dom.vcpus[0]
        self._start_vcpu(boot, {"rip": kernel.entry, "rsp": layout.stack_top,
                                "rsi": dom.start_info_va, "rflags": INITIAL_RFLAGS}, l4_ma)
        boot.runstate = RUNNABLE
        return dom

    def create_hvm_domain(self, name: str, kernel_path: str, memory: int, vcpus: int, *,
                          pod: bool = False, sources: tuple[SourceConfig, ...] = ()) -> Domain:
        """An HVM domain behind EPT, all vCPUs runnable at the kernel entry (hypervisor/hvm)."""
        return self.hvm.create_domain(name, kernel_path, memory, vcpus, pod=pod,
                                      sources=sources)

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
        self._scrub_and_release(p2m)

    def install_pv_domain(self, name: str, p2m: np.ndarray, shared_info_pfn: int,
                          start_info_va: int, virt_base: int, nr_vcpus: int) -> Domain:
        """A domain whose frames are claimed and filled: events and vCPUs (not yet started)."""
        domid = len(self.domains)
        shared_info = int(p2m[shared_info_pfn])
        dom = Domain(domid, name, "pv", p2m, shared_info, start_info_va=start_info_va,
                     virt_base=virt_base, shared_info_pfn=shared_info_pfn)
        dom.evtchn = EventChannels(domid, nr_vcpus, self.memory.frame_u8(shared_info),
                                   kick=dom.wake_vcpu,
                                   peer=self._domain_evtchn)
        for vid in range(nr_vcpus):
            # A lab's writable-mapping rule may let a guest write its own page
            # tables, behind any cache's back: then every fill walks afresh.
            mmu = PvMmu(self.memory, self.gdt_mfn * PAGE_SIZE,
                        cache_walks=self.seams.writable_mapping is None)
            vcpu = Vcpu(dom, vid, mmu)
            dom.vcpus.append(vcpu)
            self.scheduler.place(vcpu)
        self.domains.append(dom)
        return dom

    def start_vcpu_with(self, v: Vcpu, setup: Callable[[PhysicalCpu], None]) -> None:
        """Give an HVM vCPU its first architectural state: `setup` writes it on a reset CPU."""
        cpu = self.pcpus[v.pcpu]
        self._unload(v.pcpu)
        cpu.reset()
        cpu.mmu = v.mmu
        setup(cpu)
        v.context = cpu.save_context()
        self.loaded[v.pcpu] = v

    def start_vcpu(self, v: Vcpu, registers: dict[str, int], base_ma: int) -> None:
        """Give a (restored) vCPU its architectural state."""
        self._start_vcpu(v, registers, base_ma)

    def domain_events(self, domid: int) -> EventChannels | None:
        """The event channels of live domain `domid` (an interdomain peer), or None."""
        return self._domain_evtchn(domid)

    def _domain_evtchn(self, domid: int) -> EventChannels | None:
        if 0 <= domid < len(self.domains) and self.domains[domid].alive:
            return self.domains[domid].evtchn
        return None

    def _init_shared_info(self, dom: Domain, nr_vcpus: int) -> None:
        page = self.memory.frame_u8(dom.shared_info_mfn)
        for vid in range(nr_vcpus):
            base = VCPU_INFO_SIZE * vid
            page[base + 1] = 1  # evtchn_upcall_mask: events masked until the guest is ready
            # vcpu_time_info: version 2, tsc_timestamp 0, system_time 0, mul 2^31, shift 1
            t = base + VCPU_TIME_OFFSET
            page[t : t + 32] = np.frombuffer(struct.pack("<IIQQIbB2x", 2, 0, 0, 0,
                                                         0x8000_0000, 1, 0), np.uint8)

    def _scrub_and_release(self, mfns: np.ndarray) -> None:
        self.memory.u64.reshape(-1, 512)[mfns.astype(np.int64)] = 0
        self.frames.release(mfns)

    # ------------------------------------------------------------------ vCPUs
    def _start_vcpu(self, v: Vcpu, regs: dict[str, int], base_ma: int) -> None:
        """Give a vCPU its first architectural state: 64-bit mode on the hypervisor GDT."""
        cpu = self.pcpus[v.pcpu]
        self._unload(v.pcpu)
        cpu.reset()
        v.roots.kernel_ma = base_ma
        cpu.mmu = v.mmu
        cpu.set_reg("cr4", CR4_PAE)
        cpu.set_reg("cr3", base_ma)  # the guest's view of its root
        cpu.set_reg("cr0", CR0_PE_PG)
        cpu.set_descriptor_table("gdtr", GDT_VA, len(GDT) - 1)
        cpu.set_reg("cs", KERNEL_CS)
        for seg in ("ss", "ds", "es"):
            cpu.set_reg(seg, KERNEL_DS)
        cpu.set_reg("mxcsr", MXCSR_RESET)
        for name, value in regs.items():
            cpu.set_reg(name, value)
        v.context = cpu.save_context()
        self.loaded[v.pcpu] = v

    def initialise_vcpu(self, v: Vcpu, ctx: VcpuGuestContext) -> int:
        """VCPUOP_initialise: a second vCPU from a `vcpu_guest_context`."""
        base_ma = ctx.ctrlreg[3] & ~0xFFF
        if base_ma == 0 or base_ma >> 12 >= self.memory.nr_frames:
            return -EINVAL
        # the CR3 reference changes the domain's type state: a lazy update's
        # validation (and its proof) completes first, as before a page-table hypercall
        self.before_page_table_hypercall(v.domain)
        rc = until_done(lambda: self.typing.get_root_ref(base_ma >> 12, v.domain.domid))
        if rc:
            return rc
        r = ctx.user_regs
        regs = {name: getattr(r, name) for name in (
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip")}
        regs["rflags"] = (r.rflags | INITIAL_RFLAGS) & 0x3F7FD7 & ~(1 << 9)
        calling = self.loaded[v.pcpu]
        self._start_vcpu(v, regs, base_ma)
        if calling is not None and calling is not v and calling.pcpu == v.pcpu:
            self._switch(v.pcpu, calling)
        v.event_callback = ctx.event_callback_eip
        v.failsafe_callback = ctx.failsafe_callback_eip
        v.syscall_callback = ctx.syscall_callback_eip
        v.trap_table.update({t.vector: TrapEntry(t.vector, t.flags, t.cs, t.address)
                             for t in ctx.trap_ctxt if t.address})
        v.runstate = DOWN
        return 0

    def read_vcpu_registers(self, v: Vcpu) -> dict[str, int]:
        """Every architectural register the vCPU's state is made of (REGISTERS)."""
        cpu = self._switch(v.pcpu, v)
        return {name: cpu.reg(name) for name in REGISTERS}

    def before_page_table_hypercall(self, dom: Domain) -> None:
        """A domain still being validated lazily is finished before its type state
        changes (its tables, pins, base pointers, or a new vCPU's CR3 reference)."""
        lazy = dom.vcpus[0].mmu.lazy if dom.vcpus else None
        if lazy is not None:
            lazy.finish()

    def set_base_pointer(self, v: Vcpu, base_ma: int) -> None:
        """NEW_BASEPTR: the vCPU now translates through another (referenced) L4.

        Its CR3 register follows, as Xen's emulated CR3 read would: the guest sees
        its new root, and a later save or live update, which load CR3 from the
        root, give back the register the guest had."""
        v.roots.kernel_ma = base_ma
        cpu = self._switch(v.pcpu, v)
        cpu.set_reg("cr3", base_ma)
        cpu.flush_tlb()

    def check_typerefs(self, dom: Domain) -> list[Difference]:
        """Every frame's type state recomputed from the domain's tables, pins and CR3s."""
        if dom.hvm is not None:
            return []  # HVM memory carries no PV page types
        owned = self.frame_table.frames_of(dom.domid)
        pinned = owned[self.frame_table.pinned(owned)]
        pins = {int(m): int(self.frame_table.page_type(int(m))) for m in pinned}
        cr3s = [mfn for v in dom.vcpus for mfn in v.roots.referenced()]
        return check_typerefs(self.memory.u64, self.frame_table, dom.domid, pins, cr3s)

    def _unload(self, pcpu: int) -> None:
        current = self.loaded[pcpu]
        if current is not None:
            self.pcpus[pcpu].update_context(current.context)
            self.loaded[pcpu] = None

    def _switch(self, pcpu: int, v: Vcpu) -> PhysicalCpu:
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

    def write_vcpu_info(self, v: Vcpu, offset: int, data: bytes) -> None:
        ma = v.domain.shared_info_mfn * PAGE_SIZE + VCPU_INFO_SIZE * v.vcpu_id + offset
        self.memory.write(ma, data)

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
                hook(end)
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
            if v.hvm is not None:  # LAPIC timer, interrupt sources, waking from hlt
                self.hvm.on_time(v, now)
                continue
            if v.timer_deadline_ns is not None and v.timer_deadline_ns <= now and v.domain.alive:
                v.timer_deadline_ns = None
                v.domain.events.raise_virq(v.vcpu_id, VIRQ_TIMER)

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
        cpu = self._switch(pcpu, v)
        used = 0
        v.yield_requested = False
        while used < budget and v.runnable and not v.yield_requested:
            if v.event_callback and v.domain.events.upcall_deliverable(v.vcpu_id):
                self.dispatcher.deliver_upcall(cpu, v)
                if not v.runnable:
                    break
            run_budget = budget - used
            if v.hvm is not None:  # HVM: sync the LAPIC, inject, cut at its deadlines
                self._clock = start + used
                run_budget = self.hvm.enter(cpu, v, start + used, run_budget)
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


def _virtual_tsc(cpu: PhysicalCpu, base_ns: int, executed_at_base: int) -> Callable[[], int]:
    """rdtsc's answer: the guest's time at the instruction (1 instruction = 1 ns)."""
    return lambda: base_ns + (cpu.executed - executed_at_base)


def until_done(op) -> int:
    """Run a preemptible typing operation to completion (hvlab never defers it)."""
    rc = op()
    while rc == -ERESTART:
        rc = op()
    return rc
