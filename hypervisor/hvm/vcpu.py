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
from dataclasses import dataclass, field

from emulator.irqsource import InterruptSource
from emulator.posted import PostedInterruptDescriptor
from hypervisor.hvm.vlapic import REG_TIMER_INITIAL, VLapic

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
