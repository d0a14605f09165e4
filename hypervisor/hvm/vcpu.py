"""What an HVM vCPU has beyond its registers: a vLAPIC, a posted-interrupt descriptor, sources.

Interrupts reach the vLAPIC's IRR three ways: its own timer (`VLapic.advance`), IPIs
from other vLAPICs (`VLapic.accept`, routed by the hypervisor) and devices, which post
into the vCPU's posted-interrupt descriptor in host memory; the descriptor's PIR is
folded into IRR (`fold_pir`) on every entry, before saving the LAPIC, and whenever the
hypervisor checks whether a sleeping vCPU should wake.

Accounting per source, so that nothing is lost silently:
`posted` (every occurrence) = `coalesced` (found its PIR bit already set, lost as a
separate event, as in hardware) + `dropped` (reached a disabled LAPIC) + `irr_coalesced`
(found its IRR bit still set) + `delivered` (acknowledged and injected) + what is still
pending in PIR or IRR.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from emulator.irqsource import InterruptSource, InterruptSourceError, InterruptSourceState
from emulator.posted import PostedInterruptDescriptor
from hypervisor.core.vcpu import BLOCKED, DOWN, RUNNABLE
from hypervisor.hvm.vlapic import REG_TIMER_INITIAL, VLapic, VLapicError, VLapicState

if TYPE_CHECKING:
    from hypervisor.core.vcpu import Vcpu

Notify = Callable[[int, int], None]  # a source's post-notification: (ndst, nv)

_NS_PER_S = 1_000_000_000


class HvmSource:
    """An interrupt source wired to one vCPU, optionally stopping after `limit` occurrences."""

    def __init__(self, source: InterruptSource, vcpu_id: int, limit: int | None = None) -> None:
        self.source = source
        self.vcpu_id = vcpu_id
        self.limit = limit
        self.delivered = 0
        self.dropped = 0
        self.irr_coalesced = 0
        self._advanced_to = 0

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def vector(self) -> int:
        return self.source.vector

    @property
    def _last_ns(self) -> int | None:
        if self.limit is None:
            return None
        return self.source.start_ns + (self.limit - 1) * self.source.period_ns

    def advance(self, now_ns: int) -> int:
        """Post every occurrence due by `now_ns` (never beyond the limit)."""
        last = self._last_ns
        if last is not None:
            now_ns = min(now_ns, last)
        if now_ns < self._advanced_to:
            return 0
        self._advanced_to = now_ns
        return self.source.advance(now_ns)

    def next_deadline_ns(self) -> int | None:
        if self.limit is not None and self.source.posted >= self.limit:
            return None
        return self.source.next_deadline_ns()

    def save(self) -> SourceState:
        return SourceState(self.source.save(), self.limit, self.delivered, self.dropped,
                           self.irr_coalesced, self._advanced_to)

    @classmethod
    def restored(cls, state: SourceState, descriptor: PostedInterruptDescriptor, vcpu_id: int,
                 notify: Notify | None = None) -> HvmSource:
        """The source `state` describes, posting into `descriptor`."""
        s = state.state
        source = InterruptSource(s.name, descriptor, s.vector, s.period_ns, s.start_ns,
                                 notify=notify)
        source.restore(s)
        restored = cls(source, vcpu_id, state.limit)
        restored.delivered, restored.dropped = state.delivered, state.dropped
        restored.irr_coalesced, restored._advanced_to = state.irr_coalesced, state.advanced_to
        return restored

    def report(self) -> dict[str, int | str]:
        counters = self.source.counters()
        return {"name": self.name, "vector": self.vector, "posted": counters["posted"],
                "delivered": self.delivered, "coalesced": counters["coalesced"],
                "irr_coalesced": self.irr_coalesced, "dropped": self.dropped}


@dataclass
class HvmVcpu:
    """Per-vCPU HVM state (the architectural registers stay in the engine's context)."""

    lapic: VLapic
    posted: PostedInterruptDescriptor
    sources: list[HvmSource] = field(default_factory=list)
    ipis_received: int = 0
    delivered: Counter[int] = field(default_factory=Counter)  # injections by vector
    timer_ns: int = 0  # virtual ns the LAPIC timer ran in periodic mode (closed spans)
    timer_since: int | None = None  # start of the current periodic span
    timer_period_ns: int = 0  # period of the last periodic arming
    lapic_reads: int = 0  # guest accesses to the LAPIC page
    lapic_writes: int = 0
    lapic_exit: bool = False  # the last run ended because of a LAPIC write
    window: int = 0  # interrupt-window polls since the last injection (backoff)
    shadow_stepped: bool = False  # one instruction was run for an interrupt shadow

    @property
    def apic_id(self) -> int:
        return self.lapic.apic_id

    @property
    def interrupts_delivered(self) -> int:
        return sum(self.delivered.values())

    def source_for(self, vector: int) -> HvmSource | None:
        for s in self.sources:
            if s.vector == vector:
                return s
        return None

    # ------------------------------------------------------------------- time
    def next_deadline_ns(self) -> int | None:
        """Earliest of the LAPIC timer's next expiry and the sources' next posts."""
        deadlines = [d for d in (s.next_deadline_ns() for s in self.sources) if d is not None]
        timer = self.lapic.next_deadline_ns()
        if timer is not None:
            deadlines.append(timer)
        return min(deadlines) if deadlines else None

    def advance(self, now_ns: int) -> None:
        """Let the sources post and the LAPIC timer fire up to `now_ns`."""
        for s in self.sources:
            s.advance(now_ns)
        if now_ns > self.lapic.now_ns:
            self.lapic.advance(now_ns)

    # ------------------------------------------------------------- interrupts
    def fold_pir(self) -> int:
        """Move posted vectors from the descriptor's PIR into IRR; returns how many."""
        if not self.posted.pending():
            return 0
        vectors = self.posted.take_pir()
        for vector in vectors:
            source = self.source_for(vector)
            if source is not None and (vector < 16 or not self.lapic.enabled):
                source.dropped += 1
                self.lapic.accept(vector)
            elif not self.lapic.accept(vector) and source is not None:
                source.irr_coalesced += 1
        return len(vectors)

    def acknowledge(self) -> int | None:
        """The CPU's INTA: the vector to inject now (IRR -> ISR), or None."""
        if self.lapic.pending_vector() is None:
            return None
        vector = self.lapic.ack()
        self.delivered[vector] += 1
        source = self.source_for(vector)
        if source is not None:
            source.delivered += 1
        return vector

    def receive_ipi(self, vector: int) -> None:
        self.ipis_received += 1
        self.lapic.accept(vector)

    # ---------------------------------------------------------- timer accounting
    def track_timer(self, now_ns: int) -> None:
        """Called after every LAPIC write: close the running periodic span, open a new one."""
        if self.timer_since is not None:
            self.timer_ns += now_ns - self.timer_since
            self.timer_since = None
        lapic = self.lapic
        if lapic.timer_running and lapic.timer_periodic:
            self.timer_since = now_ns
            initial = lapic.mmio_read(REG_TIMER_INITIAL, 4)
            self.timer_period_ns = -(-initial * lapic.divide * _NS_PER_S // lapic.bus_hz)

    def timer_report(self) -> dict[str, int]:
        running = 0 if self.timer_since is None else self.lapic.now_ns - self.timer_since
        return {"timer_ticks": self.lapic.counters.timer_fires,
                "timer_ns": self.timer_ns + running,
                "timer_period_ns": self.timer_period_ns}

    # ------------------------------------------------------------- save records
    def lapic_records(self, now_ns: int) -> tuple[bytes, bytes]:
        """Xen HVM save records LAPIC (5) and LAPIC_REGS (6), PIR folded into IRR first."""
        self.advance(now_ns)
        self.fold_pir()
        return self.lapic.hvm_lapic_record(), self.lapic.hvm_lapic_regs_record()


# ------------------------------------------------------------------------ state
@dataclass(frozen=True)
class SourceState:
    """An interrupt source wired to a vCPU, as plain data."""

    state: InterruptSourceState
    limit: int | None = None
    delivered: int = 0
    dropped: int = 0
    irr_coalesced: int = 0
    advanced_to: int = 0


@dataclass(frozen=True, kw_only=True)
class HvmVcpuState:
    """Everything an HVM vCPU holds but its registers, as plain data: what a save and a
    live update's hand-over carry (hypervisor/hvm/image.py) and the proof compares
    (hypervisor/liveupdate/proof.py). Written as JSON by `stream.plain`."""

    runstate: str
    instructions: int = 0
    upcalls: int = 0
    pcpu: int = 0
    cr3: int = 0  # the guest's CR3 as last seen (the engine's when the vCPU is loaded)
    lapic_mapped: bool = False  # the LAPIC page is mapped into this vCPU's MMU
    window: int = 0
    shadow_stepped: bool = False
    lapic_exit: bool = False
    ipis_received: int = 0
    delivered: dict[int, int] = field(default_factory=dict)  # injections by vector
    timer_ns: int = 0
    timer_since: int | None = None
    timer_period_ns: int = 0
    lapic_reads: int = 0
    lapic_writes: int = 0
    lapic: VLapicState
    posted: bytes  # the 64-byte posted-interrupt descriptor
    sources: tuple[SourceState, ...] = ()


def save_hvm_vcpu(v: Vcpu) -> HvmVcpuState:
    """`v`'s HVM state now (nothing folded or advanced)."""
    hvm: HvmVcpu = v.hvm
    return HvmVcpuState(
        runstate=v.runstate, instructions=v.instructions, upcalls=v.upcalls, pcpu=v.pcpu,
        cr3=v.mmu.cr3(), lapic_mapped=v.mmu.lapic_mapped, window=hvm.window,
        shadow_stepped=hvm.shadow_stepped, lapic_exit=hvm.lapic_exit,
        ipis_received=hvm.ipis_received, delivered=dict(sorted(hvm.delivered.items())),
        timer_ns=hvm.timer_ns, timer_since=hvm.timer_since,
        timer_period_ns=hvm.timer_period_ns, lapic_reads=hvm.lapic_reads,
        lapic_writes=hvm.lapic_writes, lapic=hvm.lapic.save(), posted=hvm.posted.raw(),
        sources=tuple(s.save() for s in hvm.sources))


def check_hvm_vcpu_state(state: HvmVcpuState, vcpu_id: int) -> None:
    """Refuse a state the models would not take (ValueError), using scratch objects."""
    if state.runstate not in (RUNNABLE, BLOCKED, DOWN):
        raise ValueError(f"runstate {state.runstate!r}")
    if len(state.posted) != 64:
        raise ValueError("posted-interrupt descriptor must be 64 bytes")
    try:
        VLapic(vcpu_id, lambda *_: None).restore(state.lapic)
        scratch = PostedInterruptDescriptor(np.zeros(64, dtype=np.uint8))
        for s in state.sources:
            HvmSource.restored(s, scratch, vcpu_id)
    except (VLapicError, InterruptSourceError, TypeError) as err:
        raise ValueError(str(err)) from None


def restore_hvm_vcpu(v: Vcpu, state: HvmVcpuState, *, write_descriptor: bool,
                     notify: Notify | None = None) -> None:
    """Give `v` (made fresh) the HVM state in `state`, checked by `check_hvm_vcpu_state`.

    The caller places the vCPU (`pcpu`), sets its CR3 reader and, once its registers
    are loaded, its `runstate`. A live update adopts the descriptor in place
    (`write_descriptor` False): sources may have posted into it during the blackout.
    """
    hvm: HvmVcpu = v.hvm
    v.mmu.lapic_mapped = state.lapic_mapped
    v.instructions, v.upcalls = state.instructions, state.upcalls
    hvm.lapic.restore(state.lapic)
    if write_descriptor:
        hvm.posted.load(state.posted)
    hvm.sources = [HvmSource.restored(s, hvm.posted, v.vcpu_id, notify) for s in state.sources]
    hvm.window, hvm.shadow_stepped, hvm.lapic_exit = (state.window, state.shadow_stepped,
                                                      state.lapic_exit)
    hvm.ipis_received = state.ipis_received
    hvm.delivered = Counter(state.delivered)
    hvm.timer_ns, hvm.timer_since = state.timer_ns, state.timer_since
    hvm.timer_period_ns = state.timer_period_ns
    hvm.lapic_reads, hvm.lapic_writes = state.lapic_reads, state.lapic_writes
