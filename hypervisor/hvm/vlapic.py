"""Virtual local APIC in xAPIC mode (Intel SDM vol. 3, ch. 11), as a pure state machine.

The guest reaches it as MMIO in the 4 KiB page at GPA 0xFEE00000; the hypervisor forwards
each access as ``mmio_read(offset, size)`` / ``mmio_write(offset, size, value)``.

Model choices (where the SDM leaves room or the model simplifies):

* **Register page.** The first 1 KiB of the APIC page is kept as a bytearray laid out exactly
  like the hardware page (each register a little-endian u32 at a 16-byte aligned offset, the
  other 12 bytes zero), so the Xen LAPIC_REGS record is that page. Fields that live outside
  the page (APIC base MSR, pending ESR bits, timer progress, counters) are separate.
* **Accesses.** Only aligned 32-bit accesses to architectural registers are legal. Any other
  guest access (other size, misaligned, reserved offset, 0x400-0xFFF) sets ESR bit 7
  (illegal register address) and reads 0 / is ignored. Writes to read-only registers are
  ignored. An access outside the 4 KiB page or of a size other than 1/2/4/8 bytes is a bug
  in the caller, not the guest, and raises :class:`VLapicError`.
* **Version** reads 0x00050014 (xAPIC version 0x14, max LVT entry 5), the value Xen
  presents. The CMCI LVT register is still kept (stored, maskable) for software that probes it.
* **Time** is virtual. ``now_ns`` is passed in by the caller; every method that takes it
  first runs the timer up to that instant (:meth:`advance`), and methods that do not take it
  act at the last instant the LAPIC was told. Time going backwards raises.
* **Timer clock.** The timer counts at ``bus_hz / divide``. The default ``bus_hz`` of
  1_000_000_000 gives one tick per nanosecond at divide-by-1. Writing the initial count
  (re)arms at that instant; 0 stops the timer; a one-shot timer stops after firing. Changing
  the divide configuration while the timer runs keeps the current count and continues
  counting it down at the new rate from that instant (the partially elapsed tick is
  discarded), as hardware does. TSC-deadline mode is not offered (unicorn cannot trap the
  IA32_TSC_DEADLINE MSR): LVT timer bit 18 reads 0.
* **Timer expiries** are counted in closed form, so a caller that advances late pays
  nothing per missed period. Every expiry counts in ``timer_fires``; expiries that found the
  vector already in IRR count in ``timer_coalesced`` (IRR is one bit, as on hardware);
  expiries that were not accepted at all (LVT masked, APIC disabled, illegal vector) count in
  ``timer_masked``. A masked timer keeps counting and a masked one-shot still stops.
* **Disabled APIC.** While software-disabled (SVR bit 8 clear) or hardware-disabled (APIC
  base MSR bit 11 clear) fixed interrupts are dropped on acceptance and nothing is
  pending, as in Xen; the SVR write that disables the APIC sets every LVT mask bit, and
  while disabled the mask bits cannot be cleared. The reset state is software-disabled
  (SVR = 0xFF), so a guest must set SVR bit 8 before interrupts are accepted.
* **Acknowledge.** :meth:`ack` with nothing deliverable returns the spurious vector (SVR bits
  7:0) and changes nothing, like an INTA cycle that lost a race against a TPR raise.
* **EOI** clears the highest ISR bit; if its TMR bit is set (level-triggered) the TMR bit is
  cleared too. No IOAPIC is modelled, so no directed EOI leaves the LAPIC.
* **IPIs.** Writing ICR low sends. Only the fixed delivery mode in physical destination mode
  is supported; other delivery modes, and logical destination mode without a shorthand, are
  ignored and counted in ``ipis_rejected``. A vector below 16 sets ESR bit 5 (send illegal
  vector) and is not sent. The trigger-mode bit is ignored (IPIs arrive edge-triggered).
  Shorthand ``self`` is accepted locally without calling ``send_ipi``; every other case calls
  ``send_ipi(dest_apic_id, vector, shorthand)``, which routes to the target LAPICs: for
  ``none`` the destination is ICR bits 63:56 (0xFF is the xAPIC physical broadcast id), for
  ``all-including-self`` / ``all-excluding-self`` it is ``None`` and the callee delivers to
  every LAPIC (including the sender in the first case). The delivery-status bit always
  reads 0 (idle).
* **ESR** has write-to-latch semantics (Xen's ``pending_esr``): errors accumulate in a
  hidden register, a write to ESR moves them into the readable ESR and clears them. The LVT
  error entry is raised once per newly set error bit (Xen's per-bit behaviour); an LVT error
  vector below 16 sets "receive illegal vector" instead.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from enum import Enum
from typing import Literal, TypeAlias

from hypervisor.stream.hvm_records import (
    HVM_HW_LAPIC_SIZE,
    HVM_SAVE_LAPIC,
    HVM_SAVE_LAPIC_REGS,
    HvmHwLapic,
)

# --- architectural constants -------------------------------------------------------------

APIC_MMIO_BASE = 0xFEE0_0000
APIC_PAGE_SIZE = 4096
REGS_SIZE = 1024  # the part of the page that holds registers (and the LAPIC_REGS record)

XAPIC_VERSION = 0x0005_0014  # version 0x14, max LVT entry 5 (as Xen presents it)

REG_ID = 0x020
REG_VERSION = 0x030
REG_TPR = 0x080
REG_APR = 0x090
REG_PPR = 0x0A0
REG_EOI = 0x0B0
REG_RRD = 0x0C0
REG_LDR = 0x0D0
REG_DFR = 0x0E0
REG_SVR = 0x0F0
REG_ISR = 0x100  # 8 registers, 0x100-0x170
REG_TMR = 0x180  # 8 registers, 0x180-0x1F0
REG_IRR = 0x200  # 8 registers, 0x200-0x270
REG_ESR = 0x280
REG_LVT_CMCI = 0x2F0
REG_ICR_LOW = 0x300
REG_ICR_HIGH = 0x310
REG_LVT_TIMER = 0x320
REG_LVT_THERMAL = 0x330
REG_LVT_PERF = 0x340
REG_LVT_LINT0 = 0x350
REG_LVT_LINT1 = 0x360
REG_LVT_ERROR = 0x370
REG_TIMER_INITIAL = 0x380
REG_TIMER_CURRENT = 0x390
REG_TIMER_DIVIDE = 0x3E0

LVT_REGISTERS = (
    REG_LVT_CMCI,
    REG_LVT_TIMER,
    REG_LVT_THERMAL,
    REG_LVT_PERF,
    REG_LVT_LINT0,
    REG_LVT_LINT1,
    REG_LVT_ERROR,
)
LVT_MASKED = 1 << 16
LVT_TIMER_PERIODIC = 1 << 17
LVT_TIMER_MODE_MASK = 3 << 17

SVR_APIC_ENABLED = 1 << 8

APIC_BASE_BSP = 1 << 8
APIC_BASE_X2APIC = 1 << 10
APIC_BASE_ENABLED = 1 << 11

ESR_SEND_CHECKSUM = 1 << 0
ESR_RECEIVE_CHECKSUM = 1 << 1
ESR_SEND_ACCEPT = 1 << 2
ESR_RECEIVE_ACCEPT = 1 << 3
ESR_REDIRECTABLE_IPI = 1 << 4
ESR_SEND_ILLEGAL_VECTOR = 1 << 5
ESR_RECEIVE_ILLEGAL_VECTOR = 1 << 6
ESR_ILLEGAL_REGISTER_ADDRESS = 1 << 7

ICR_DELIVERY_MODE_FIXED = 0
ICR_LOGICAL_DESTINATION = 1 << 11

# Divide configuration register: bits 3,1,0 select the divisor (SDM figure "Divide
# Configuration Register"). Index = bit3 << 2 | bits 1:0.
DIVIDE_BY_ENCODING = (2, 4, 8, 16, 32, 64, 128, 1)

# Xen HVM save records (xen/include/public/arch-x86/hvm/save.h).
HVM_SAVE_TYPE_LAPIC = HVM_SAVE_LAPIC
HVM_SAVE_TYPE_LAPIC_REGS = HVM_SAVE_LAPIC_REGS
# struct hvm_hw_lapic: u64 apic_base_msr, u32 disabled, u32 timer_divisor, u64 tdt_msr,
# u32 pending_esr, then 4 bytes of tail padding (the struct is 8-byte aligned) that must be 0.
HVM_LAPIC_RECORD_SIZE = HVM_HW_LAPIC_SIZE  # 32: the record's layout is stream/hvm_records.py's
HVM_LAPIC_REGS_RECORD_SIZE = REGS_SIZE
VLAPIC_SW_DISABLED = 0x1  # Xen's flags in hvm_hw_lapic.disabled
VLAPIC_HW_DISABLED = 0x2

DEFAULT_BUS_HZ = 1_000_000_000  # one timer tick per ns at divide-by-1
_NS_PER_S = 1_000_000_000

IpiShorthand = Literal["none", "self", "all-including-self", "all-excluding-self"]
_SHORTHANDS: tuple[IpiShorthand, ...] = (
    "none",
    "self",
    "all-including-self",
    "all-excluding-self",
)
SendIpi = Callable[[int | None, int, IpiShorthand], None]
"""``send_ipi(dest_apic_id, vector, shorthand)``: route a fixed IPI to other LAPICs."""

_U32 = struct.Struct("<I")

# Writable bits of the plainly stored registers; a register missing here is read-only
# or handled by a dedicated write method.
_WRITE_MASK = {
    REG_ID: 0xFF00_0000,
    REG_TPR: 0x0000_00FF,
    REG_LDR: 0xFF00_0000,
    REG_DFR: 0xF000_0000,
    REG_SVR: 0x0000_03FF,
    REG_ICR_HIGH: 0xFF00_0000,
    REG_ICR_LOW: 0x000C_CFFF,  # all but delivery status (12) and reserved bits
    REG_LVT_CMCI: 0x0001_07FF,
    REG_LVT_TIMER: 0x0003_00FF,  # bit 18 (TSC-deadline) not offered
    REG_LVT_THERMAL: 0x0001_07FF,
    REG_LVT_PERF: 0x0001_07FF,
    REG_LVT_LINT0: 0x0001_A7FF,
    REG_LVT_LINT1: 0x0001_A7FF,
    REG_LVT_ERROR: 0x0001_00FF,
    REG_TIMER_INITIAL: 0xFFFF_FFFF,
    REG_TIMER_DIVIDE: 0x0000_000B,
}
_DFR_RESERVED_ONES = 0x0FFF_FFFF

_VECTOR_BANKS = tuple(range(8))
_LEGAL_REGISTERS = frozenset(
    {
        REG_ID,
        REG_VERSION,
        REG_TPR,
        REG_APR,
        REG_PPR,
        REG_EOI,
        REG_RRD,
        REG_LDR,
        REG_DFR,
        REG_SVR,
        REG_ESR,
        REG_ICR_LOW,
        REG_ICR_HIGH,
        REG_TIMER_INITIAL,
        REG_TIMER_CURRENT,
        REG_TIMER_DIVIDE,
        *LVT_REGISTERS,
        *(base + 0x10 * i for base in (REG_ISR, REG_TMR, REG_IRR) for i in _VECTOR_BANKS),
    }
)


class VLapicError(ValueError):
    """A caller or a record asked the vLAPIC for something impossible; nothing was changed."""


class _Acceptance(Enum):
    ACCEPTED = "accepted"  # IRR bit went 0 -> 1
    COALESCED = "coalesced"  # IRR bit was already set
    DROPPED = "dropped"  # illegal vector or APIC disabled


@dataclass
class VLapicCounters:
    """Event counts for reports. Mutable on the live LAPIC; snapshotted into a State.

    ``accepted`` / ``coalesced`` / ``dropped`` count every arrival of a fixed interrupt,
    whatever its source (``accept``, self-IPI, each timer expiry, LVT error).
    """

    accepted: int = 0  # interrupts that newly set an IRR bit
    coalesced: int = 0  # interrupts whose IRR bit was already set
    dropped: int = 0  # illegal vector, or APIC disabled
    acks: int = 0  # vectors moved IRR -> ISR
    spurious: int = 0  # acks that found nothing deliverable
    eois: int = 0  # EOIs that cleared an ISR bit
    timer_fires: int = 0  # every timer expiry
    timer_coalesced: int = 0  # expiries whose vector was already in IRR
    timer_reinjected: int = 0  # coalesced expiries delivered later, one per EOI
    timer_masked: int = 0  # expiries not accepted (LVT masked, APIC disabled, bad vector)
    ipis_sent: int = 0  # IPIs sent, self-IPIs included
    ipis_rejected: int = 0  # unsupported delivery/destination mode or illegal vector


@dataclass(frozen=True)
class VLapicState:
    """Everything a VLapic holds, as pure data (no callables, no views)."""

    regs: bytes  # the 1 KiB register page
    apic_base_msr: int
    pending_esr: int
    bus_hz: int
    now_ns: int  # last instant this LAPIC was told
    timer_running: bool
    timer_anchor_ns: int  # instant the count was (re)loaded
    timer_anchor_count: int  # ticks from the anchor to the first expiry after it
    timer_expiries: int  # expiries since the anchor
    counters: tuple[tuple[str, int], ...]
    timer_missed: int = 0  # coalesced periodic expiries still owed to the guest


class VLapic:
    """One vCPU's local APIC in xAPIC mode. See the module docstring for the model choices."""

    State: TypeAlias = VLapicState  # the convention: every stateful component has a State

    def __init__(
        self,
        apic_id: int,
        send_ipi: SendIpi,
        *,
        bus_hz: int = DEFAULT_BUS_HZ,
        bsp: bool = False,
        now_ns: int = 0,
        timer_rule: TimerRule | None = None,
    ) -> None:
        """A LAPIC in its power-on state.

        ``bus_hz`` is the timer's input clock before the divider (default one tick per ns at
        divide-by-1); ``bsp`` sets the BSP flag in the APIC base MSR; ``now_ns`` is the
        virtual time at creation. ``timer_rule`` replaces `timer_expiries` (a lab's seam,
        hypervisor/core/seams.py).
        """
        if not isinstance(apic_id, int) or not 0 <= apic_id <= 0xFF:
            raise VLapicError(f"xAPIC id must be 0..255, got {apic_id!r}")
        _check_bus_hz(bus_hz)
        _check_time(now_ns)
        self._send_ipi = send_ipi
        self._timer_rule = timer_rule or timer_expiries
        self._bus_hz = bus_hz
        self._regs = bytearray(REGS_SIZE)
        self._apic_base_msr = APIC_MMIO_BASE | APIC_BASE_ENABLED | (APIC_BASE_BSP if bsp else 0)
        self._pending_esr = 0
        self._now_ns = now_ns
        self._timer_running = False
        self._timer_anchor_ns = now_ns
        self._timer_anchor_count = 0
        self._timer_expiries = 0
        self._timer_missed = 0
        self.counters = VLapicCounters()
        self._reset_registers(apic_id)

    def _reset_registers(self, apic_id: int) -> None:
        self._put(REG_ID, apic_id << 24)
        self._put(REG_VERSION, XAPIC_VERSION)
        self._put(REG_DFR, 0xFFFF_FFFF)
        self._put(REG_SVR, 0xFF)
        for lvt in LVT_REGISTERS:
            self._put(lvt, LVT_MASKED)

    # --- raw register page ---------------------------------------------------------------

    def _get(self, offset: int) -> int:
        return _U32.unpack_from(self._regs, offset)[0]

    def _put(self, offset: int, value: int) -> None:
        _U32.pack_into(self._regs, offset, value)

    def _bitmap(self, base: int) -> int:
        """The 256-bit vector bitmap (ISR, TMR or IRR) starting at ``base`` as one int."""
        bits = 0
        for bank in _VECTOR_BANKS:
            bits |= self._get(base + 0x10 * bank) << (32 * bank)
        return bits

    def _highest(self, base: int) -> int | None:
        for bank in reversed(_VECTOR_BANKS):
            word = self._get(base + 0x10 * bank)
            if word:
                return 32 * bank + word.bit_length() - 1
        return None

    def _byte_of(self, base: int, vector: int) -> tuple[int, int]:
        return base + 0x10 * (vector >> 5) + ((vector & 31) >> 3), 1 << (vector & 7)

    def _test(self, base: int, vector: int) -> bool:
        index, bit = self._byte_of(base, vector)
        return bool(self._regs[index] & bit)

    def _set(self, base: int, vector: int) -> None:
        index, bit = self._byte_of(base, vector)
        self._regs[index] |= bit

    def _clear(self, base: int, vector: int) -> None:
        index, bit = self._byte_of(base, vector)
        self._regs[index] &= ~bit & 0xFF

    # --- derived state -------------------------------------------------------------------

    @property
    def apic_id(self) -> int:
        return self._get(REG_ID) >> 24

    @property
    def apic_base_msr(self) -> int:
        return self._apic_base_msr

    @property
    def bus_hz(self) -> int:
        return self._bus_hz

    @property
    def now_ns(self) -> int:
        """The last virtual instant this LAPIC was told about."""
        return self._now_ns

    @property
    def software_enabled(self) -> bool:
        return bool(self._get(REG_SVR) & SVR_APIC_ENABLED)

    @property
    def enabled(self) -> bool:
        """Hardware-enabled (APIC base MSR) and software-enabled (SVR)."""
        return bool(self._apic_base_msr & APIC_BASE_ENABLED) and self.software_enabled

    @property
    def tpr(self) -> int:
        return self._get(REG_TPR) & 0xFF

    @property
    def ppr(self) -> int:
        """Processor priority (SDM "Processor Priority Register"): TPR unless the highest
        in-service vector's class is higher, in which case that class with sub-class 0."""
        tpr = self.tpr
        isrv = self._highest(REG_ISR) or 0
        return tpr if (tpr >> 4) >= (isrv >> 4) else isrv & 0xF0

    @property
    def apr(self) -> int:
        """Arbitration priority (SDM "Arbitration Priority Register"), P6-family rule."""
        tpr = self.tpr
        top = max(self._highest(REG_IRR) or 0, self._highest(REG_ISR) or 0)
        return tpr if (tpr >> 4) >= (top >> 4) else top & 0xF0

    @property
    def pending_esr(self) -> int:
        """Errors recorded since the last ESR write (not yet visible in ESR)."""
        return self._pending_esr

    @property
    def divide(self) -> int:
        dcr = self._get(REG_TIMER_DIVIDE)
        return DIVIDE_BY_ENCODING[((dcr >> 1) & 4) | (dcr & 3)]

    @property
    def timer_periodic(self) -> bool:
        return bool(self._get(REG_LVT_TIMER) & LVT_TIMER_PERIODIC)

    @property
    def timer_running(self) -> bool:
        return self._timer_running

    def irr_vectors(self) -> list[int]:
        return _vectors_of(self._bitmap(REG_IRR))

    def isr_vectors(self) -> list[int]:
        return _vectors_of(self._bitmap(REG_ISR))

    def tmr_vectors(self) -> list[int]:
        return _vectors_of(self._bitmap(REG_TMR))

    def counters_dict(self) -> dict[str, int]:
        return asdict(self.counters)

    # --- interrupt acceptance, acknowledge, EOI ------------------------------------------

    def accept(self, vector: int, level_trigger: bool = False) -> bool:
        """Receive a fixed interrupt into IRR (TMR records the trigger mode).

        Returns True if the IRR bit went 0 -> 1. Vectors 0-15 are illegal: ESR bit 6 is set
        and the interrupt is dropped. A disabled APIC drops fixed interrupts.
        """
        _check_vector(vector)
        return self._accept(vector, level_trigger) is _Acceptance.ACCEPTED

    def _accept(self, vector: int, level_trigger: bool, times: int = 1) -> _Acceptance:
        """Accept ``times`` back-to-back arrivals of ``vector``; all after the first coalesce."""
        if vector < 16:
            self._record_error(ESR_RECEIVE_ILLEGAL_VECTOR)
            self.counters.dropped += times
            return _Acceptance.DROPPED
        if not self.enabled:
            self.counters.dropped += times
            return _Acceptance.DROPPED
        if level_trigger:
            self._set(REG_TMR, vector)
        else:
            self._clear(REG_TMR, vector)
        if self._test(REG_IRR, vector):
            self.counters.coalesced += times
            return _Acceptance.COALESCED
        self._set(REG_IRR, vector)
        self.counters.accepted += 1
        self.counters.coalesced += times - 1
        return _Acceptance.ACCEPTED

    def pending_vector(self) -> int | None:
        """The vector the LAPIC would present to the CPU now, or None.

        That is the highest IRR vector whose priority class (vector >> 4) is above the PPR's
        class. Whether the CPU takes it (RFLAGS.IF, interrupt shadow) is the caller's business.
        """
        if not self.enabled:
            return None
        irrv = self._highest(REG_IRR)
        if irrv is None or (irrv >> 4) <= (self.ppr >> 4):
            return None
        return irrv

    def ack(self) -> int:
        """The CPU's interrupt acknowledge: move the pending vector IRR -> ISR and return it.

        The hypervisor then delivers it through the guest IDT. With nothing deliverable this
        returns the spurious vector (SVR bits 7:0) and changes no IRR/ISR bit.
        """
        vector = self.pending_vector()
        if vector is None:
            self.counters.spurious += 1
            return self._get(REG_SVR) & 0xFF
        self._clear(REG_IRR, vector)
        self._set(REG_ISR, vector)
        self.counters.acks += 1
        return vector

    def eoi(self) -> int | None:
        """End of interrupt: clear the highest ISR bit (and its TMR bit if level-triggered).

        Returns the vector retired, or None if nothing was in service. This is what a write to
        the EOI register does.
        """
        vector = self._highest(REG_ISR)
        if vector is None:
            return None
        self._clear(REG_ISR, vector)
        if self._test(REG_TMR, vector):
            self._clear(REG_TMR, vector)
        self.counters.eois += 1
        self._reinject_missed_tick(vector)
        return vector

    def _reinject_missed_tick(self, retired: int) -> None:
        """After the timer's vector is retired, owe one coalesced expiry less.

        A periodic expiry that found its vector still in IRR (the guest had interrupts
        off, or no hypervisor ran: a live update's blackout) is kept, not lost, and
        delivered one per EOI, like Xen's virtual platform timers accumulating missed
        ticks: a guest counting ticks sees every one of them.
        """
        lvt = self._get(REG_LVT_TIMER)
        if (self._timer_missed and retired == lvt & 0xFF and not lvt & LVT_MASKED
                and not self._test(REG_IRR, retired)):
            if self._accept(retired, False) is _Acceptance.ACCEPTED:
                self._timer_missed -= 1
                self.counters.timer_reinjected += 1

    def _record_error(self, error_bit: int) -> None:
        if self._pending_esr & error_bit:
            return
        self._pending_esr |= error_bit
        lvt_error = self._get(REG_LVT_ERROR)
        if not self.enabled or lvt_error & LVT_MASKED:
            return
        vector = lvt_error & 0xFF
        if vector < 16:
            # An illegal LVT vector is itself a receive error; do not recurse into accept.
            self._pending_esr |= ESR_RECEIVE_ILLEGAL_VECTOR
        else:
            self._accept(vector, False)

    # --- MMIO ----------------------------------------------------------------------------

    def mmio_read(self, offset: int, size: int, *, now_ns: int | None = None) -> int:
        """A guest read of ``size`` bytes at ``offset`` in the APIC page."""
        _check_access(offset, size)
        if now_ns is not None:
            self.advance(now_ns)
        if size != 4 or offset not in _LEGAL_REGISTERS:
            self._record_error(ESR_ILLEGAL_REGISTER_ADDRESS)
            return 0
        if offset == REG_PPR:
            return self.ppr
        if offset == REG_APR:
            return self.apr
        if offset == REG_TIMER_CURRENT:
            return self._current_count()
        return self._get(offset)

    def mmio_write(self, offset: int, size: int, value: int, *, now_ns: int | None = None) -> None:
        """A guest write of ``size`` bytes at ``offset`` in the APIC page."""
        _check_access(offset, size)
        if not isinstance(value, int) or not 0 <= value < 1 << (8 * size):
            raise VLapicError(f"value {value:#x} does not fit a {size}-byte APIC write")
        if now_ns is not None:
            self.advance(now_ns)
        if size != 4 or offset not in _LEGAL_REGISTERS:
            self._record_error(ESR_ILLEGAL_REGISTER_ADDRESS)
            return
        if offset == REG_EOI:
            self.eoi()
        elif offset == REG_ESR:
            # Write-to-latch: the value written is irrelevant.
            self._put(REG_ESR, self._pending_esr)
            self._pending_esr = 0
        elif offset == REG_SVR:
            self._write_svr(value)
        elif offset in LVT_REGISTERS:
            masked = 0 if self.software_enabled else LVT_MASKED
            self._put(offset, (value & _WRITE_MASK[offset]) | masked)
        elif offset == REG_ICR_LOW:
            self._put(offset, value & _WRITE_MASK[offset])
            self._send_icr(value)
        elif offset == REG_TIMER_INITIAL:
            self._put(offset, value)
            self._arm_timer(value)
        elif offset == REG_TIMER_DIVIDE:
            self._write_divide(value & _WRITE_MASK[offset])
        elif offset == REG_DFR:
            self._put(offset, (value & _WRITE_MASK[offset]) | _DFR_RESERVED_ONES)
        elif offset in _WRITE_MASK:
            self._put(offset, value & _WRITE_MASK[offset])
        # Anything else is read-only: the write is ignored, as on an xAPIC.

    def _write_svr(self, value: int) -> None:
        self._put(REG_SVR, value & _WRITE_MASK[REG_SVR])
        if not value & SVR_APIC_ENABLED:
            for lvt in LVT_REGISTERS:
                self._put(lvt, self._get(lvt) | LVT_MASKED)

    def _send_icr(self, icr_low: int) -> None:
        vector = icr_low & 0xFF
        delivery_mode = (icr_low >> 8) & 7
        shorthand = _SHORTHANDS[(icr_low >> 18) & 3]
        if delivery_mode != ICR_DELIVERY_MODE_FIXED:
            self.counters.ipis_rejected += 1
            return
        if shorthand == "none" and icr_low & ICR_LOGICAL_DESTINATION:
            self.counters.ipis_rejected += 1
            return
        if vector < 16:
            self._record_error(ESR_SEND_ILLEGAL_VECTOR)
            self.counters.ipis_rejected += 1
            return
        self.counters.ipis_sent += 1
        if shorthand == "self":
            self._accept(vector, False)
        elif shorthand == "none":
            self._send_ipi(self._get(REG_ICR_HIGH) >> 24, vector, shorthand)
        else:
            self._send_ipi(None, vector, shorthand)

    # --- timer ---------------------------------------------------------------------------

    def _ticks_to_ns(self, ticks: int) -> int:
        """Nanoseconds needed for ``ticks`` timer ticks at the current divide, rounded up."""
        return -(-ticks * self.divide * _NS_PER_S // self._bus_hz)

    def _ns_to_ticks(self, ns: int) -> int:
        """Whole timer ticks elapsed in ``ns`` nanoseconds at the current divide."""
        return ns * self._bus_hz // (self.divide * _NS_PER_S)

    def _next_expiry_tick(self) -> int:
        """Ticks from the anchor to the next expiry."""
        period = self._get(REG_TIMER_INITIAL)
        return self._timer_anchor_count + self._timer_expiries * period

    def _current_count(self) -> int:
        if not self._timer_running:
            return 0
        elapsed = self._ns_to_ticks(self._now_ns - self._timer_anchor_ns)
        return self._next_expiry_tick() - elapsed

    def _arm_timer(self, initial_count: int) -> None:
        self._timer_anchor_ns = self._now_ns
        self._timer_anchor_count = initial_count
        self._timer_expiries = 0
        self._timer_running = initial_count != 0

    def _write_divide(self, dcr: int) -> None:
        remaining = self._current_count()
        self._put(REG_TIMER_DIVIDE, dcr)
        if self._timer_running:
            # Keep the count, run it down at the new rate from now.
            self._timer_anchor_ns = self._now_ns
            self._timer_anchor_count = remaining
            self._timer_expiries = 0

    def next_deadline_ns(self) -> int | None:
        """The virtual instant of the next timer expiry, or None if the timer is stopped.

        A masked timer still reports its deadline: it still counts (and a one-shot stops).
        """
        if not self._timer_running:
            return None
        return self._timer_anchor_ns + self._ticks_to_ns(self._next_expiry_tick())

    def advance(self, now_ns: int) -> int:
        """Run the timer up to ``now_ns``, accepting its vector for every due expiry.

        Returns the number of expiries. Late calls are handled in closed form.
        """
        _check_time(now_ns)
        if now_ns < self._now_ns:
            raise VLapicError(f"time went backwards: now_ns {now_ns} < {self._now_ns}")
        self._now_ns = now_ns
        if not self._timer_running:
            return 0
        elapsed = self._ns_to_ticks(now_ns - self._timer_anchor_ns)
        first_due = self._next_expiry_tick()
        if elapsed < first_due:
            return 0
        fired, self._timer_running = self._timer_rule(elapsed, first_due,
                                                      self._get(REG_TIMER_INITIAL),
                                                      self.timer_periodic)
        if fired < 1:  # only a lab's rule can get here: never let time stand still
            raise VLapicError(f"timer rule: {fired} expiries when one was due "
                              f"({elapsed} ticks elapsed, first due at {first_due})")
        self._timer_expiries += fired
        self._deliver_timer(fired)
        return fired

    def _deliver_timer(self, fired: int) -> None:
        self.counters.timer_fires += fired
        lvt = self._get(REG_LVT_TIMER)
        if lvt & LVT_MASKED:
            self.counters.timer_masked += fired
            return
        # No guest runs between these expiries, so after the first the IRR bit is set.
        outcome = self._accept(lvt & 0xFF, False, times=fired)
        if outcome is _Acceptance.DROPPED:
            self.counters.timer_masked += fired
        else:
            newly = 1 if outcome is _Acceptance.ACCEPTED else 0
            self.counters.timer_coalesced += fired - newly
            if self.timer_periodic:
                self._timer_missed += fired - newly

    # --- save / restore ------------------------------------------------------------------

    def save(self) -> VLapicState:
        return VLapicState(
            regs=bytes(self._regs),
            apic_base_msr=self._apic_base_msr,
            pending_esr=self._pending_esr,
            bus_hz=self._bus_hz,
            now_ns=self._now_ns,
            timer_running=self._timer_running,
            timer_anchor_ns=self._timer_anchor_ns,
            timer_anchor_count=self._timer_anchor_count,
            timer_expiries=self._timer_expiries,
            counters=tuple(asdict(self.counters).items()),
            timer_missed=self._timer_missed,
        )

    def restore(self, state: VLapicState) -> None:
        """Become exactly the LAPIC that produced ``state`` (send_ipi stays as constructed)."""
        if not isinstance(state, VLapicState):
            raise VLapicError(f"expected a VLapic.State, got {type(state).__name__}")
        if not isinstance(state.regs, bytes) or len(state.regs) != REGS_SIZE:
            raise VLapicError(f"VLapic.State.regs must be {REGS_SIZE} bytes")
        _check_bus_hz(state.bus_hz)
        _check_time(state.now_ns)
        numbers = (
            state.apic_base_msr,
            state.pending_esr,
            state.timer_anchor_ns,
            state.timer_anchor_count,
            state.timer_expiries,
            state.timer_missed,
        )
        if any(not isinstance(n, int) or n < 0 for n in numbers):
            raise VLapicError("VLapic.State: MSR, ESR and timer fields must be non-negative ints")
        names = {f.name for f in fields(VLapicCounters)}
        if {name for name, _ in state.counters} != names:
            raise VLapicError("VLapic.State.counters does not name exactly the vLAPIC counters")
        self._regs = bytearray(state.regs)
        self._apic_base_msr = state.apic_base_msr
        self._pending_esr = state.pending_esr
        self._bus_hz = state.bus_hz
        self._now_ns = state.now_ns
        self._timer_running = state.timer_running
        self._timer_anchor_ns = state.timer_anchor_ns
        self._timer_anchor_count = state.timer_anchor_count
        self._timer_expiries = state.timer_expiries
        self._timer_missed = state.timer_missed
        self.counters = VLapicCounters(**dict(state.counters))

    # --- Xen HVM save records ------------------------------------------------------------

    def hvm_lapic_record(self) -> bytes:
        """Payload of the Xen HVM save record LAPIC (typecode 5), 32 bytes, little-endian.

        The caller folds the vCPU's posted-interrupt PIR into IRR (``accept`` each vector
        taken from the descriptor) before saving, as Xen does, so no posted interrupt is
        left behind. ``tdt_msr`` is 0: TSC-deadline mode is not offered.
        """
        disabled = 0 if self.software_enabled else VLAPIC_SW_DISABLED
        if not self._apic_base_msr & APIC_BASE_ENABLED:
            disabled |= VLAPIC_HW_DISABLED
        return HvmHwLapic(self._apic_base_msr, disabled, self.divide, 0, self._pending_esr).pack()

    def hvm_lapic_regs_record(self, *, now_ns: int | None = None) -> bytes:
        """Payload of the Xen HVM save record LAPIC_REGS (typecode 6): the 1 KiB page.

        Computed registers (APR, PPR, current count) hold what a read would return at the
        current instant. Fold PIR into IRR first (see :meth:`hvm_lapic_record`).
        """
        if now_ns is not None:
            self.advance(now_ns)
        page = bytearray(self._regs)
        _U32.pack_into(page, REG_APR, self.apr)
        _U32.pack_into(page, REG_PPR, self.ppr)
        _U32.pack_into(page, REG_TIMER_CURRENT, self._current_count())
        return bytes(page)

    @classmethod
    def from_hvm_records(
        cls,
        lapic: bytes,
        regs: bytes,
        now_ns: int,
        send_ipi: SendIpi,
        *,
        bus_hz: int = DEFAULT_BUS_HZ,
    ) -> VLapic:
        """A LAPIC rebuilt from Xen LAPIC and LAPIC_REGS record payloads at ``now_ns``.

        The timer resumes from the current-count slot of the page (the count saved by
        :meth:`hvm_lapic_regs_record`), so a save/restore at the same instant loses at most
        the partially elapsed tick. A periodic timer whose saved current count is 0 restarts
        with a full period (what Xen does on load); a one-shot with count 0 stays stopped.
        Computed registers in the page (version, APR, PPR) are recomputed, not trusted.
        """
        if len(lapic) != HVM_LAPIC_RECORD_SIZE:
            raise VLapicError(
                f"LAPIC record must be {HVM_LAPIC_RECORD_SIZE} bytes, got {len(lapic)}"
            )
        if len(regs) != HVM_LAPIC_REGS_RECORD_SIZE:
            raise VLapicError(
                f"LAPIC_REGS record must be {HVM_LAPIC_REGS_RECORD_SIZE} bytes, got {len(regs)}"
            )
        _check_bus_hz(bus_hz)
        _check_time(now_ns)
        record = HvmHwLapic.unpack(lapic)
        base, disabled, divisor = record.apic_base_msr, record.disabled, record.timer_divisor
        tdt_msr, pending_esr = record.tdt_msr, record.pending_esr
        padding = bytes(lapic[HVM_LAPIC_RECORD_SIZE - 4:]) != bytes(4)  # Xen's pad, zero
        page = bytearray(regs)

        def reg(offset: int) -> int:
            return _U32.unpack_from(page, offset)[0]

        if padding:
            raise VLapicError("LAPIC record: padding after pending_esr must be zero")
        if base & APIC_BASE_X2APIC:
            raise VLapicError("LAPIC record: apic_base_msr has x2APIC mode on; not supported")
        flag_bits = base & 0xFFF
        if flag_bits & ~(APIC_BASE_BSP | APIC_BASE_ENABLED) or base - flag_bits != APIC_MMIO_BASE:
            raise VLapicError(
                f"LAPIC record: apic_base_msr {base:#x} is not an xAPIC at {APIC_MMIO_BASE:#x}"
            )
        if disabled & ~(VLAPIC_SW_DISABLED | VLAPIC_HW_DISABLED):
            raise VLapicError(f"LAPIC record: unknown 'disabled' flags {disabled:#x}")
        if bool(disabled & VLAPIC_SW_DISABLED) == bool(reg(REG_SVR) & SVR_APIC_ENABLED):
            raise VLapicError("LAPIC record: 'disabled' disagrees with SVR bit 8")
        if bool(disabled & VLAPIC_HW_DISABLED) == bool(base & APIC_BASE_ENABLED):
            raise VLapicError("LAPIC record: 'disabled' disagrees with apic_base_msr bit 11")
        dcr = reg(REG_TIMER_DIVIDE)
        if DIVIDE_BY_ENCODING[((dcr >> 1) & 4) | (dcr & 3)] != divisor:
            raise VLapicError(
                f"LAPIC record: timer_divisor {divisor} disagrees with divide config {dcr:#x}"
            )
        if tdt_msr:
            raise VLapicError("LAPIC record: TSC-deadline timer in use; not supported")
        if reg(REG_LVT_TIMER) & ~_WRITE_MASK[REG_LVT_TIMER] & LVT_TIMER_MODE_MASK:
            raise VLapicError("LAPIC_REGS record: LVT timer in TSC-deadline/reserved mode")
        initial, current = reg(REG_TIMER_INITIAL), reg(REG_TIMER_CURRENT)
        if current > initial:
            raise VLapicError(
                f"LAPIC_REGS record: current count {current} exceeds initial count {initial}"
            )
        for base_reg, name in ((REG_IRR, "IRR"), (REG_ISR, "ISR")):
            if reg(base_reg) & 0xFFFF:
                raise VLapicError(f"LAPIC_REGS record: {name} has bits set for vectors 0-15")

        apic = cls(reg(REG_ID) >> 24, send_ipi, bus_hz=bus_hz, now_ns=now_ns)
        _U32.pack_into(page, REG_VERSION, XAPIC_VERSION)
        for computed in (REG_APR, REG_PPR, REG_TIMER_CURRENT):
            _U32.pack_into(page, computed, 0)
        apic._regs = page
        apic._apic_base_msr = base
        apic._pending_esr = pending_esr
        periodic = bool(reg(REG_LVT_TIMER) & LVT_TIMER_PERIODIC)
        remaining = current if current else (initial if periodic else 0)
        apic._arm_timer(remaining)
        return apic


# --- helpers -----------------------------------------------------------------------------


def timer_expiries(elapsed: int, first_due: int, period: int, periodic: bool,
                   ) -> tuple[int, bool]:
    """(expiries, still running) once ``elapsed`` ticks reached the expiry due at
    ``first_due``: a one-shot timer fires once and stops; a periodic one fires for every
    period that ended by now (a late look finds several) and runs on."""
    if not periodic:
        return 1, False
    return (elapsed - first_due) // period + 1, True


TimerRule: TypeAlias = Callable[[int, int, int, bool], tuple[int, bool]]


def _vectors_of(bitmap: int) -> list[int]:
    return [v for v in range(256) if bitmap >> v & 1]


def _check_vector(vector: int) -> None:
    if not isinstance(vector, int) or not 0 <= vector <= 0xFF:
        raise VLapicError(f"interrupt vector must be 0..255, got {vector!r}")


def _check_time(now_ns: int) -> None:
    if not isinstance(now_ns, int) or now_ns < 0:
        raise VLapicError(f"now_ns must be a non-negative int of virtual ns, got {now_ns!r}")


def _check_bus_hz(bus_hz: int) -> None:
    if not isinstance(bus_hz, int) or bus_hz <= 0:
        raise VLapicError(f"bus_hz must be a positive int, got {bus_hz!r}")


def _check_access(offset: int, size: int) -> None:
    if size not in (1, 2, 4, 8):
        raise VLapicError(f"APIC access size must be 1, 2, 4 or 8 bytes, got {size!r}")
    if not isinstance(offset, int) or not 0 <= offset <= APIC_PAGE_SIZE - size:
        raise VLapicError(f"APIC access at offset {offset:#x} (+{size}) leaves the 4 KiB page")
