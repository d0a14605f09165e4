"""The xAPIC MMIO page of each physical CPU, routed to the vLAPIC of the vCPU loaded on it.

Every physical CPU maps one MMIO page at machine address `memory.size` (right above
host RAM). An HVM vCPU's MMU maps the guest's LAPIC page (GPA 0xFEE00000) there, so an
access to it runs the device model inside the engine's MMIO callback, with no exit:
the callback finds the vCPU loaded on that pCPU and calls its `VLapic.mmio_read` /
`mmio_write` at the vCPU's current virtual time (`PhysicalCpu.tsc`).

A write can change what the hypervisor must do next (EOI or TPR unblocking a lower
vector, an IPI, a new timer deadline), so after every write the run stops after the
current instruction: the callback sets the pCPU's remaining instruction budget to zero,
the run ends as an exhausted budget, and the hypervisor's entry path looks at the LAPIC
again before the guest continues.

Accesses that are not aligned 32-bit register accesses are the vLAPIC's business
(illegal register address in ESR); widths the vLAPIC cannot take (wider than 8 bytes)
read as zero and are ignored, never an exception inside the engine.
"""

from __future__ import annotations

from collections.abc import Callable

from emulator.addr import PAGE_SIZE
from emulator.engine import PhysicalCpu
from hypervisor.hvm.vcpu import HvmVcpu
from hypervisor.hvm.vlapic import VLapicError

CurrentVcpu = Callable[[], HvmVcpu | None]


class LapicWindow:
    """The LAPIC MMIO page, installed on each physical CPU once."""

    def __init__(self, machine_address: int) -> None:
        self.ma = machine_address
        self._installed: set[int] = set()

    def install(self, cpu: PhysicalCpu, current: CurrentVcpu) -> None:
        """Map the page on `cpu`; `current()` names the HVM vCPU loaded there (or None)."""
        if cpu.index in self._installed:
            return

        def read(offset: int, size: int) -> int:
            hv = current()
            if hv is None:
                return 0
            hv.lapic_reads += 1
            try:
                return hv.lapic.mmio_read(offset, size, now_ns=cpu.tsc())
            except VLapicError:
                return 0

        def write(offset: int, size: int, value: int) -> None:
            hv = current()
            if hv is None:
                return
            hv.lapic_writes += 1
            now = cpu.tsc()
            try:
                hv.lapic.mmio_write(offset, size, value, now_ns=now)
            except VLapicError:
                return
            hv.track_timer(now)
            # Stop after this instruction so the hypervisor re-evaluates the LAPIC.
            hv.lapic_exit = True
            cpu.end_run_after_this_instruction()

        cpu.map_mmio(self.ma, PAGE_SIZE, read, write)
        self._installed.add(cpu.index)
