"""The HVM answers to the core's questions (`hypervisor/core/policy.py`), and HVM domains.

One `HvmPolicy` per hypervisor. It builds HVM domains, runs the entry path of HVM
vCPUs (time, posted interrupts, injection), answers the dispatcher where an HVM vCPU's
exit means something else (EPT violations, `hlt`, exceptions through the guest IDT, the
few hypercalls HVM guests make, `hypervisor/hvm/hypercalls.py`) and reports.

vCPU bring-up: real INIT/SIPI start an AP in real mode, which hvlab does not model.
Every HVM vCPU starts runnable at the kernel's ELF entry in 64-bit mode, with its APIC
id in `rdi`, the `hvm_start_info` address in `rsi` and its own stack in `rsp` (like
firmware that hands parked APs to the kernel). The kernel tells them apart by `rdi`.

Time: a vCPU's LAPIC and its interrupt sources live on the timeline of the physical CPU
it is placed on (virtual time there only moves forward). On each entry they are
advanced to the vCPU's time, PIR is folded into IRR, a deliverable vector is injected,
and the run is cut at the vCPU's next timer or source deadline so interrupts arrive on
the exact nanosecond. A vCPU in `hlt` with IF set sleeps (no host time) until a timer
expiry, an IPI or a device post makes a vector deliverable; `hlt` with IF clear takes the
vCPU down, and the domain powers off when no vCPU is left up (Xen's hvm_hlt).

EPT violations, in order: the LAPIC page (first access: map the MMIO window, retry),
populate-on-demand (back the page, retry), a write to a log-dirty page (mark dirty,
retry), anything else: the domain crashes with a report naming the guest-physical
address, the access, RIP and the instruction. A violation that comes back at once at
the same RIP was not resolved and crashes the domain too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from emulator.addr import PAGE_SIZE
from emulator.disasm import disassemble_with
from emulator.engine import GPRS, PhysicalCpu
from emulator.exits import BudgetExhausted, Exit, MmuFault
from emulator.interrupts import DeliveryError
from emulator.irqsource import InterruptSource, InterruptSourceError
from emulator.posted import PostedInterruptDescriptor
from hypervisor.core.dispatch import EXIT_NAMES, VECTOR_NAMES
from hypervisor.core.domain import Domain
from hypervisor.core.elf import load_kernel
from hypervisor.core.frames import OutOfFrames
from hypervisor.core.vcpu import BLOCKED, DOWN, RUNNABLE, Vcpu
from hypervisor.hvm.apic import LapicWindow
from hypervisor.hvm.builder import (
    GDT,
    IDT_LIMIT,
    KERNEL_CS,
    KERNEL_DS,
    HvmLayout,
    build_hvm_memory,
    plan_hvm_layout,
)
from hypervisor.hvm.domain import HvmDomain, SourceConfig
from hypervisor.hvm.ept import P2mType
from hypervisor.hvm.hypercalls import HVM_HYPERCALLS
from hypervisor.hvm.interrupts import (
    deliver_vector,
    in_interrupt_shadow,
    interrupts_enabled,
    window_budget,
)
from hypervisor.hvm.mmu import EptViolation, HvmMmu
from hypervisor.hvm.physmap import GuestPhysmap, PhysmapError, ept_layout_for
from hypervisor.hvm.vcpu import HvmSource, HvmVcpu
from hypervisor.hvm.vlapic import REG_ESR, IpiShorthand, VLapic
from hypervisor.lib.errors import HvlabError

if TYPE_CHECKING:
    from hypervisor.core.hypervisor import Hypervisor

MAX_VCPUS = 32  # 64-byte descriptors, one host page per domain would hold 64
POSTED_NOTIFICATION_VECTOR = 0xF2  # NV: the vector a real CPU would be notified with
CR0_PE_PG = 0x8005_0033  # PE, MP, ET, NE, WP, AM, PG
CR4_PAE = 0x20
INITIAL_RFLAGS = 0x2
MAX_REPEATS = 3  # the same EPT violation at the same RIP: not resolved
BROADCAST_APIC_ID = 0xFF



class HvmPolicy:
    """HVM domains on one hypervisor (see the module docstring)."""

    name = "hvm"
    hypercalls = HVM_HYPERCALLS

    def __init__(self, hv: Hypervisor) -> None:
        self.hv = hv
        self.lapic_window = LapicWindow(hv.memory.size)

    # ================================================================ creation
    def create_domain(self, name: str, kernel_path: str, memory: int, vcpus: int, *,
                      pod: bool = False, sources: Sequence[SourceConfig] = ()) -> Domain:
        """Build an HVM domain and make all its vCPUs runnable at the kernel entry."""
        hv = self.hv
        kernel = load_kernel(kernel_path)
        if not 1 <= vcpus <= MAX_VCPUS:
            raise HvlabError(f"domain {name}: vcpus must be between 1 and {MAX_VCPUS}")
        nr_pages = memory // PAGE_SIZE
        layout = plan_hvm_layout(kernel, nr_pages, vcpus, name)
        _check_sources(name, sources, vcpus)
        physmap = GuestPhysmap(hv.memory, hv.frames, nr_pages, ept_layout_for(hv.build),
                               f"domain {name}", pod=pod, prepopulate=layout.builder_gfns)
        try:
            posted_mfn = hv.frames.alloc_one(f"domain {name} posted-interrupt descriptors")
        except OutOfFrames:
            _release_physmap(hv, physmap)
            raise
        hv.memory.zero_frame(posted_mfn)
        build_hvm_memory(hv.memory, kernel, layout, physmap.gpa_to_ma)

        dom = Domain(len(hv.domains), name, self, physmap.p2m.mfns, 0)
        dom.hvm = HvmDomain(physmap, layout, int(posted_mfn))
        for cpu in hv.pcpus:
            self.lapic_window.install(cpu, self._current_on(cpu.index))
        for vid in range(vcpus):
            dom.vcpus.append(self._create_vcpu(dom, vid, int(posted_mfn)))
        for spec in sources:
            self._attach_source(dom, spec)
        hv.domains.append(dom)
        for v in dom.vcpus:
            hv.start_vcpu_with(v, partial(self._initial_state, v=v, entry=kernel.entry))
            v.runstate = RUNNABLE
        return dom

    def _create_vcpu(self, dom: Domain, vid: int, posted_mfn: int) -> Vcpu:
        hv = self.hv
        physmap = _hd(dom).physmap
        mmu = HvmMmu(hv.memory, physmap, lambda: 0, hv.memory.size,  # CR3 reader: below
                     resolve=partial(self._resolve, dom))
        v = Vcpu(dom, vid, mmu)  # type: ignore[arg-type]
        hv.scheduler.place(v)
        mmu.cr3 = self._cr3_reader(v, _hd(dom).layout.page_tables)
        base = posted_mfn * PAGE_SIZE + 64 * vid
        descriptor = PostedInterruptDescriptor(hv.memory.u8[base:base + 64])
        descriptor.nv = POSTED_NOTIFICATION_VECTOR
        descriptor.ndst = vid << 8  # xAPIC: the destination APIC id in bits 15:8
        lapic = VLapic(vid, self._ipi_router(dom, vid), bsp=vid == 0, now_ns=hv.now,
                       timer_rule=hv.seams.lapic_timer)
        v.hvm = HvmVcpu(lapic, descriptor)
        return v

    def _attach_source(self, dom: Domain, spec: SourceConfig) -> None:
        v = dom.vcpus[spec.vcpu]
        start = self.hv.now + (spec.period_ns if spec.start_ns is None else spec.start_ns)
        source = InterruptSource(spec.name, _hvm(v).posted, spec.vector, spec.period_ns, start,
                                 notify=partial(self._notified, v))
        _hvm(v).sources.append(HvmSource(source, spec.vcpu, spec.count))

    def _cr3_reader(self, v: Vcpu, initial: int) -> Callable[[], int]:
        """The guest's CR3 is the CPU's CR3 while `v` is loaded; else the last one seen."""
        last = [initial]
        hv = self.hv

        def cr3() -> int:
            if hv.loaded[v.pcpu] is v:
                last[0] = hv.pcpus[v.pcpu].reg("cr3")
            return last[0]

        return cr3

    def _current_on(self, pcpu: int) -> Callable[[], HvmVcpu | None]:
        def current() -> HvmVcpu | None:
            v = self.hv.loaded[pcpu]
            return None if v is None else v.hvm

        return current

    def _initial_state(self, cpu: PhysicalCpu, *, v: Vcpu, entry: int) -> None:
        layout: HvmLayout = _hd(v.domain).layout
        cpu.set_reg("cr4", CR4_PAE)
        cpu.set_reg("cr3", layout.page_tables)
        cpu.set_reg("cr0", CR0_PE_PG)
        cpu.set_descriptor_table("gdtr", layout.gdt, len(GDT) - 1)
        cpu.set_descriptor_table("idtr", layout.idt, IDT_LIMIT)
        cpu.set_reg("cs", KERNEL_CS)
        for seg in ("ss", "ds", "es"):
            cpu.set_reg(seg, KERNEL_DS)
        for reg, value in (("rip", entry), ("rsp", layout.stack_top(v.vcpu_id)),
                           ("rdi", _hvm(v).apic_id), ("rsi", layout.start_info),
                           ("rflags", INITIAL_RFLAGS)):
            cpu.set_reg(reg, value)

    # ============================================================ interrupts
    def _ipi_router(self, dom: Domain, sender: int):
        def send_ipi(dest: int | None, vector: int, shorthand: IpiShorthand) -> None:
            for t in dom.vcpus:
                if shorthand == "all-excluding-self" and t.vcpu_id == sender:
                    continue
                if shorthand == "none" and dest not in (_hvm(t).apic_id, BROADCAST_APIC_ID):
                    continue
                _hvm(t).receive_ipi(vector)
                self._wake_if_deliverable(t)

        return send_ipi

    def _notified(self, v: Vcpu, _ndst: int, _nv: int) -> None:
        """A source's post-notification: what wakes a vCPU sleeping in hlt (Xen's pi_wakeup)."""
        self._wake_if_deliverable(v)

    def _wake_if_deliverable(self, v: Vcpu) -> None:
        if v.runstate != BLOCKED or not v.domain.alive:
            return
        _hvm(v).fold_pir()
        if _hvm(v).lapic.pending_vector() is not None:
            v.wake()

    def next_deadline(self, v: Vcpu) -> int | None:
        """The LAPIC timer's or a source's next deadline, in hypervisor time."""
        deadline = _hvm(v).next_deadline_ns()
        return None if deadline is None else deadline - v.domain.time_offset

    def on_time(self, v: Vcpu, now: int) -> None:
        """Virtual time on `v`'s pCPU reached `now`: timers fire, sources post, sleepers wake."""
        if v.domain.alive:
            _hvm(v).advance(now + v.domain.time_offset)  # the LAPIC runs on the guest's clock
            self._wake_if_deliverable(v)

    def enter(self, cpu: PhysicalCpu, v: Vcpu, now: int, budget: int) -> int:
        """Before `v` runs at `now`: sync interrupts, inject one if the guest can take it.

        Returns the instruction budget for this run: cut at the vCPU's next deadline and,
        while a vector waits for IF or an interrupt shadow, kept short (see interrupts.py).
        """
        hvm = _hvm(v)
        mmu: HvmMmu = v.mmu  # type: ignore[assignment]
        now += v.domain.time_offset  # the LAPIC and the sources run on the guest's clock
        hvm.advance(now)
        hvm.fold_pir()
        if mmu.needs_flush():
            cpu.flush_tlb()
        run = budget
        if hvm.lapic.pending_vector() is not None:
            rip = cpu.reg("rip")
            if not interrupts_enabled(cpu):
                run = window_budget(hvm.window, False)
                hvm.window += 1
                hvm.shadow_stepped = False
            elif not hvm.shadow_stepped and in_interrupt_shadow(mmu, rip):
                run = window_budget(hvm.window, True)
                hvm.shadow_stepped = True
            else:
                hvm.window = 0
                hvm.shadow_stepped = False
                vector = hvm.acknowledge()
                assert vector is not None
                try:
                    deliver_vector(cpu, mmu, vector, rip)
                except DeliveryError as err:
                    self.hv.crash_domain(v.domain, self._report(
                        cpu, v, f"cannot deliver interrupt vector {vector:#x} ({err})", rip))
                    return 1
        else:
            hvm.window = 0
            hvm.shadow_stepped = False
        deadline = hvm.next_deadline_ns()
        if deadline is not None:
            run = min(run, max(deadline - now, 1))
        return max(1, min(run, budget))

    # ================================================================= exits
    # ------------------------------------------------------------------ exits
    # (the dispatcher, hypervisor/core/dispatch.py, asks these for HVM vCPUs)
    def exit_name(self, v: Vcpu, exit_: Exit) -> str:
        """The name an exit is counted under; a run stopped right after a LAPIC write is
        one (the mark is used up here)."""
        hvm = _hvm(v)
        lapic_write, hvm.lapic_exit = hvm.lapic_exit, False
        if isinstance(exit_, MmuFault) and isinstance(exit_.reason, EptViolation):
            return "ept_violation"
        if isinstance(exit_, BudgetExhausted) and lapic_write:
            return "lapic_write"
        return EXIT_NAMES[type(exit_)]

    def handle_exit(self, cpu: PhysicalCpu, v: Vcpu, exit_: Exit) -> bool:
        return False

    def answer_cpuid(self, cpu: PhysicalCpu, v: Vcpu, leaf: int) -> bool:
        return False

    def memory_fault(self, cpu: PhysicalCpu, v: Vcpu, exit_: MmuFault) -> bool:
        if isinstance(exit_.reason, EptViolation):
            self.ept_violation(cpu, v, exit_, exit_.reason)
            return True
        return False  # a guest page-table walk refused: the guest's #PF

    def halt(self, cpu: PhysicalCpu, v: Vcpu) -> None:
        if not interrupts_enabled(cpu):
            # Xen's hvm_hlt: halting with interrupts off means "stop this vCPU".
            v.runstate = DOWN
            if all(u.runstate == DOWN for u in v.domain.vcpus):
                self.hv.shutdown_domain(v.domain, 0, None)
            return
        _hvm(v).fold_pir()
        if _hvm(v).lapic.pending_vector() is None:
            v.runstate = BLOCKED

    def exception(self, cpu: PhysicalCpu, v: Vcpu, vector: int, error_code: int | None,
                   cr2: int | None, return_rip: int, fault_rip: int) -> None:
        """Deliver a fault or `int n` through the guest IDT, as the CPU would."""
        if vector == 14 and cr2 is not None:
            cpu.set_reg("cr2", cr2)
        try:
            deliver_vector(cpu, v.mmu, vector, return_rip, error_code)  # type: ignore[arg-type]
        except DeliveryError as err:
            name = VECTOR_NAMES.get(vector, f"vector {vector}")
            details = f"unhandled {name} (vector {vector}, {err})"
            if error_code is not None:
                details += f"; error code {error_code:#x}"
            if cr2 is not None and vector == 14:
                details += f"; CR2 {cr2:#x}"
            self.hv.crash_domain(v.domain, self._report(cpu, v, details, fault_rip))

    # -------------------------------------------------------- EPT violations
    def _resolve(self, dom: Domain, violation: EptViolation, *, from_exit: bool = False
                 ) -> bool:
        """Serve a violation that is not the guest's fault; False if it is genuine."""
        hd = _hd(dom)
        if violation.lapic:
            return False  # mapped per vCPU, by the exit handler
        if violation.p2m_type == P2mType.POPULATE_ON_DEMAND:
            try:
                hd.physmap.populate(violation.gfn)
            except OutOfFrames:
                if from_exit:
                    raise
                return False
            hd.violations["populate_on_demand"] += 1
            return True
        if violation.p2m_type == P2mType.RAM_LOGDIRTY and violation.access == "write":
            hd.physmap.mark_dirty(violation.gfn)
            hd.violations["log_dirty"] += 1
            return True
        return False

    def ept_violation(self, cpu: PhysicalCpu, v: Vcpu, exit_: MmuFault,
                       violation: EptViolation) -> None:
        dom = v.domain
        hd = _hd(dom)
        if not violation.paging_structure and not violation.lapic:
            exact = (violation.gpa & ~0xFFF) | (exit_.gva & 0xFFF)
            violation = dataclasses.replace(violation, gpa=exact, gva=exit_.gva)
        key = (v.vcpu_id, exit_.rip, violation.gpa >> 12, violation.access)
        hd.repeats = hd.repeats + 1 if key == hd.last_violation else 0
        hd.last_violation = key
        if hd.repeats >= MAX_REPEATS:
            self._crash_ept(cpu, v, violation, exit_.rip, "not resolved")
            return
        if violation.lapic and violation.access != "fetch":
            v.mmu.lapic_mapped = True  # type: ignore[attr-defined]
            hd.violations["lapic"] += 1
            return
        try:
            if self._resolve(dom, violation, from_exit=True):
                return
        except OutOfFrames:
            self._crash_ept(cpu, v, violation, exit_.rip,
                            "populate-on-demand: host memory exhausted")
            return
        hd.violations["crash"] += 1
        self._crash_ept(cpu, v, violation, exit_.rip, None)

    def _crash_ept(self, cpu: PhysicalCpu, v: Vcpu, violation: EptViolation, rip: int,
                   why: str | None) -> None:
        text = f"EPT violation at {violation.describe()}"
        if why:
            text += f", {why}"
        text += f", guest-virtual {violation.gva:#x}"
        self.hv.crash_domain(v.domain, self._report(cpu, v, text, rip))

    def _report(self, cpu: PhysicalCpu, v: Vcpu, what: str, rip: int) -> str:
        regs = " ".join(f"{r}={cpu.reg(r):#x}" for r in GPRS[:8])
        return (f"{v.name}: {what} at RIP {rip:#x}: "
                f"{disassemble_with(_ram_reader(v.mmu), rip)}; {regs}")  # type: ignore[arg-type]

    # ============================================================ log-dirty
    def enable_logdirty(self, dom: Domain) -> None:
        _hd(dom).physmap.enable_logdirty()

    def take_dirty(self, dom: Domain) -> np.ndarray:
        return _hd(dom).physmap.take_dirty()

    def lapic_records(self, v: Vcpu, now: int) -> tuple[bytes, bytes]:
        """Xen's LAPIC and LAPIC_REGS save records of `v` (PIR folded in first)."""
        return _hvm(v).lapic_records(now)

    # =============================================================== reports
    def check_typerefs(self, dom: Domain) -> list:
        return []  # HVM memory carries no PV page types

    def release(self, dom: Domain) -> list[int]:
        """The EPT tables: this build's, in its own layout (the new build makes its own)."""
        return list(_hd(dom).physmap.ept.frames)

    def describe(self, dom: Domain) -> dict[str, Any]:
        hd = _hd(dom)
        stats = hd.physmap.stats
        return {"hvm": {"populate_on_demand": hd.physmap.pod,
                "pod_pages_populated": stats.pod_pages,
                "pod_faults": stats.pod_faults,
                "pod_superpage_faults": stats.pod_superpages,
                "ept_violations": dict(sorted(hd.violations.items())),
                "ept_leaves": hd.physmap.superpage_counts(),
                "log_dirty": hd.physmap.logdirty}}

    def describe_vcpu(self, v: Vcpu) -> dict[str, Any]:
        hvm = _hvm(v)
        counters = hvm.lapic.counters
        return {**hvm.timer_report(),
                "timer_coalesced": counters.timer_coalesced,
                "ipis_sent": counters.ipis_sent,
                "ipis_received": hvm.ipis_received,
                "interrupts_delivered": hvm.interrupts_delivered,
                "lapic_reads": hvm.lapic_reads,
                "lapic_writes": hvm.lapic_writes,
                # ESR as the guest reads it, and errors since its last ESR write
                "esr": hvm.lapic.mmio_read(REG_ESR, 4),
                "esr_pending": hvm.lapic.pending_esr,
                "sources": [s.report() for s in hvm.sources]}


def _hvm(v: Vcpu) -> HvmVcpu:
    assert v.hvm is not None, f"{v.name} is not an HVM vCPU"
    return v.hvm


def _hd(dom: Domain) -> HvmDomain:
    assert dom.hvm is not None, f"domain {dom.name} is not an HVM domain"
    return dom.hvm


def _ram_reader(mmu: HvmMmu) -> Callable[[int, int], bytes]:
    def read(gva: int, size: int) -> bytes:
        data = mmu.peek(gva, size)
        if data is None:
            raise ValueError(f"{gva:#x} is not guest RAM")
        return data

    return read


def _check_sources(domain: str, sources: Sequence[SourceConfig], vcpus: int) -> None:
    seen: set[str] = set()
    for s in sources:
        where = f"domain {domain}: interrupt source {s.name!r}"
        if s.name in seen:
            raise HvlabError(f"{where}: names must be unique")
        seen.add(s.name)
        if not 0 <= s.vcpu < vcpus:
            raise HvlabError(f"{where}: vcpu {s.vcpu} does not exist (the domain has {vcpus})")
        if not 32 <= s.vector <= 255:
            raise HvlabError(f"{where}: vector must be 32..255, got {s.vector}")
        if s.count is not None and s.count <= 0:
            raise HvlabError(f"{where}: count must be positive, got {s.count}")
        try:
            InterruptSource(s.name, _SCRATCH_DESCRIPTOR, s.vector, s.period_ns, s.start_ns or 0)
        except InterruptSourceError as err:
            raise HvlabError(f"{where}: {err}") from None
    pairs = [(s.vcpu, s.vector) for s in sources]
    if len(set(pairs)) != len(pairs):
        raise HvlabError(f"domain {domain}: two interrupt sources share a vCPU and a vector")


_SCRATCH_DESCRIPTOR = PostedInterruptDescriptor(np.zeros(64, dtype=np.uint8))


def _release_physmap(hv: Hypervisor, physmap: GuestPhysmap) -> None:
    frames = physmap.owned_frames()
    hv.memory.u64.reshape(-1, 512)[frames.astype(np.int64)] = 0
    hv.frames.release(frames)


def hvm_policy(hv: Hypervisor) -> HvmPolicy:
    """The hypervisor's HVM policy (made on first use)."""
    policy = hv.policy_for(HvmPolicy.name, HvmPolicy)
    assert isinstance(policy, HvmPolicy)
    return policy


def create_hvm_domain(hv: Hypervisor, name: str, kernel_path: str, memory: int, vcpus: int, *,
                      pod: bool = False, sources: Sequence[SourceConfig] = ()) -> Domain:
    """An HVM domain behind EPT, all vCPUs runnable at the kernel entry."""
    return hvm_policy(hv).create_domain(name, kernel_path, memory, vcpus, pod=pod,
                                        sources=sources)


__all__ = ["HvmPolicy", "PhysmapError", "SourceConfig", "create_hvm_domain", "hvm_policy"]
