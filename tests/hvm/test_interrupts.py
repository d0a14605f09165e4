"""HVM interrupt and exception delivery: shadows, windows, sources, the IDT, hlt, log-dirty.

The guest-level tests boot an HVM domain and replace the code at its entry point with a
few hand-assembled instructions (assembly alongside), so each test shows one behaviour.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest

from emulator.irqsource import InterruptSource
from emulator.posted import PostedInterruptDescriptor
from hypervisor.core.hypervisor import Hypervisor, MachineConfig
from hypervisor.hvm.interrupts import in_interrupt_shadow, window_budget
from hypervisor.hvm.policy import create_hvm_domain, hvm_policy
from hypervisor.hvm.vcpu import HvmSource, HvmVcpu
from hypervisor.hvm.vlapic import REG_IRR, REG_SVR, VLapic
from tests import GUESTS

MB = 1 << 20


# ------------------------------------------------------------------ the CPU's part

class CodeBefore:
    """A stand-in MMU whose only RAM is `code`, ending at `rip`."""

    def __init__(self, code: bytes, rip: int = 0x2000) -> None:
        self.code, self.rip = code, rip

    def peek(self, gva: int, size: int) -> bytes | None:
        start = self.rip - len(self.code)
        if gva < start or gva + size > self.rip:
            return None
        return self.code[gva - start:gva - start + size]


@pytest.mark.parametrize(("code", "shadow"), [
    (b"\x90\xfb", True),  # sti
    (b"\x8e\xd0", True),  # mov ss, ax
    (b"\x66\x8e\xd3", True),  # mov ss, bx (with an operand-size prefix)
    (b"\x90\x17", True),  # pop ss (invalid in 64-bit mode, still a shadow if it ran)
    (b"\x90\x90", False),
    (b"\x8e\xd8", False),  # mov ds, ax: no shadow
    (b"\xfb", False),  # cannot read 2 bytes before RIP: no shadow assumed
])
def test_the_interrupt_shadow_is_read_from_the_instruction_before_rip(code, shadow):
    assert in_interrupt_shadow(CodeBefore(code), 0x2000) is shadow  # type: ignore[arg-type]


def test_interrupt_windows_step_one_instruction_for_a_shadow_and_back_off_otherwise():
    assert window_budget(0, True) == 1
    assert [window_budget(n, False) for n in range(10)] == \
        [16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 4096]


# ----------------------------------------------------- per-vCPU interrupt state

def hvm_vcpu(enabled: bool = True) -> HvmVcpu:
    lapic = VLapic(0, lambda *a: None)
    if enabled:
        lapic.mmio_write(REG_SVR, 4, 0x1FF)
    return HvmVcpu(lapic, PostedInterruptDescriptor(np.zeros(64, dtype=np.uint8)))


def attach(hv: HvmVcpu, vector: int, period: int, start: int, limit: int | None) -> HvmSource:
    source = HvmSource(InterruptSource(f"s{vector}", hv.posted, vector, period, start), 0,
                       limit)
    hv.sources.append(source)
    return source


def test_a_source_with_a_count_posts_exactly_that_many_then_has_no_deadline():
    hv = hvm_vcpu()
    src = attach(hv, 0x50, 100, 100, 3)
    assert hv.next_deadline_ns() == 100
    for now in (100, 150, 250, 10_000):
        hv.advance(now)
        hv.fold_pir()
        while hv.acknowledge() is not None:
            hv.lapic.eoi()
    assert src.report() == {"name": "s80", "vector": 0x50, "posted": 3, "delivered": 3,
                            "coalesced": 0, "irr_coalesced": 0, "dropped": 0}
    assert src.next_deadline_ns() is None and hv.next_deadline_ns() is None


def test_posted_interrupts_are_accounted_when_they_coalesce_or_are_dropped():
    hv = hvm_vcpu()
    src = attach(hv, 0x60, 10, 10, None)
    hv.advance(35)  # three occurrences, PIR is one bit: two coalesce there
    hv.fold_pir()
    hv.advance(40)  # one more while IRR still holds the first
    hv.fold_pir()
    assert hv.acknowledge() == 0x60
    r = src.report()
    assert (r["posted"], r["coalesced"], r["irr_coalesced"], r["delivered"]) == (4, 2, 1, 1)
    off = hvm_vcpu(enabled=False)
    lost = attach(off, 0x61, 10, 10, 1)
    off.advance(10)
    off.fold_pir()
    assert lost.report()["dropped"] == 1 and off.acknowledge() is None


def test_lapic_save_records_fold_posted_interrupts_into_irr_first():
    hv = hvm_vcpu()
    hv.posted.post(0x70)
    record, regs = hv.lapic_records(5)
    assert len(record) == 32 and len(regs) == 1024
    irr = struct.unpack_from("<I", regs, REG_IRR + 0x10 * (0x70 >> 5))[0]
    assert irr >> (0x70 & 31) & 1 and not hv.posted.pending()
    restored = VLapic.from_hvm_records(record, regs, 5, lambda *a: None)
    assert restored.pending_vector() == 0x70


# --------------------------------------------- exceptions through the guest IDT

def boot(code: bytes, gates: dict[int, int] | None = None, handler: bytes = b"",
         vcpus: int = 1):
    """An HVM domain whose entry runs `code`; `gates` maps vectors to handler offsets."""
    hv = Hypervisor(MachineConfig(1, 64 * MB))
    dom = create_hvm_domain(hv, "t", str(GUESTS / "hvm_memtouch.elf"), 4 * MB, vcpus)
    pm, layout = dom.hvm.physmap, dom.hvm.layout
    entry = 0x101000  # hvm_memtouch's _start, right after its hypercall page

    def write(gpa: int, data: bytes) -> None:
        hv.memory.write(pm.gpa_to_ma(gpa), data)

    write(entry, code)
    write(entry + 0x100, handler)
    for vector, offset in (gates or {}).items():
        target = entry + offset
        write(layout.idt + 16 * vector, struct.pack("<HHBBHII", target & 0xFFFF, 0x08, 0,
                                                    0x8E, target >> 16, 0, 0))
    return hv, dom


def test_int3_is_taken_through_the_guest_idt_and_cli_hlt_powers_off():
    # entry: int3; cli; hlt           handler: mov ebx, 0x1234; iretq
    hv, dom = boot(b"\xcc\xfa\xf4", {3: 0x100}, b"\xbb\x34\x12\x00\x00\x48\xcf")
    assert hv.run(10**9) == "shutdown"
    # Xen's hvm_hlt: hlt with IF clear takes the vCPU down; no vCPU up: power off
    assert dom.shutdown.reason == "poweroff" and dom.crash_report is None
    (v,) = dom.vcpus
    assert v.runstate == "down"
    regs = hv.read_vcpu_registers(v)
    assert regs["rbx"] == 0x1234 and regs["rip"] == 0x101003
    assert hv.exits["exception"] == 1 and hv.exits["halt"] == 1


def test_a_guest_page_fault_is_delivered_with_cr2_and_its_error_code():
    # entry: mov rax, [0x40000000]    handler: pop rax; mov rbx, cr2; cli; hlt
    hv, dom = boot(b"\x48\x8b\x04\x25\x00\x00\x00\x40", {14: 0x100},
                   b"\x58\x0f\x20\xd3\xfa\xf4")
    hv.run(10**9)
    regs = hv.read_vcpu_registers(dom.vcpus[0])
    assert regs["rbx"] == 0x40000000 and regs["rax"] == 0  # not present, read, kernel
    return_rip = struct.unpack("<Q", hv.copy_from_guest(dom.vcpus[0], regs["rsp"], 8))[0]
    assert return_rip == 0x101000  # the faulting instruction restarts
    assert hv.exits["page_fault"] == 1


def test_a_fault_without_an_idt_gate_crashes_the_domain_with_a_report():
    hv, dom = boot(b"\x0f\x0b")  # ud2, and the IDT the builder loaded is empty
    hv.run(10**9)
    assert dom.shutdown.reason == "crash"
    assert dom.crash_report.startswith(
        "t/v0: unhandled #UD (vector 6, IDT gate 6 not present) at RIP 0x101000: ud2;")


def test_spare_vcpus_go_down_and_the_domain_keeps_running():
    hv = Hypervisor(MachineConfig(1, 64 * MB, quantum_ns=10_000))  # both get a turn
    dom = create_hvm_domain(hv, "t", str(GUESTS / "hvm_memtouch.elf"), 8 * MB, 2)
    hv.run(10**9)
    assert dom.shutdown.reason == "poweroff" and dom.shutdown.code == 0, dom.console_text()
    assert [v.runstate for v in dom.vcpus] == ["runnable", "down"]


def test_log_dirty_tracks_every_page_the_guest_writes():
    hv = Hypervisor(MachineConfig(1, 64 * MB))
    dom = create_hvm_domain(hv, "t", str(GUESTS / "hvm_memtouch.elf"), 4 * MB, 1)
    hvm_policy(hv).enable_logdirty(dom)
    hv.run(10**9)
    assert dom.shutdown.code == 0, dom.console_text()
    dirty = set(hvm_policy(hv).take_dirty(dom).tolist())
    layout = dom.hvm.layout
    touched = set(range(layout.region_end >> 12, layout.ram_end >> 12))
    assert touched <= dirty  # every page the guest wrote
    tables = layout.page_tables >> 12
    assert tables in dirty  # the L4: its Accessed bits were written by the walker
    assert dom.hvm.violations["log_dirty"] == len(dirty)
    assert hvm_policy(hv).take_dirty(dom).size == 0
