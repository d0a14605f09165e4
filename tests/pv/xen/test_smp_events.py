"""SMP events and scheduling of CPL-3 domains: SCHEDOP_poll, EVTCHNOP_bind_vcpu, per-vCPU
one-shot timers and cross-pCPU flushes, as Xen does them."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from hypervisor.core.evtchn import (
    VIRQ_DEBUG,
    VIRQ_TIMER,
    EventChannels,
    SharedInfoBits,
)
from hypervisor.lib.errno import EFAULT, EINVAL, ENOENT, ETIME
from hypervisor.pv.xen.hypercalls import call
from hypervisor.pv.xen.vcpu_init import initialise_xen_vcpu
from hypervisor.stream.vcpu_context import (
    VGCF_IN_KERNEL,
    VGCF_ONLINE,
    CpuUserRegs,
    VcpuGuestContext,
)
from tests.pv.xen.guest import ENTRY, Asm, boot

VIRQ_CONSOLE = 2
SCHED_OP, VCPU_OP, EVTCHN_OP, UPDATE_VA_MAPPING = 29, 24, 32, 14
SCHEDOP_POLL = 3
EVTCHNOP_SEND, EVTCHNOP_BIND_VCPU = 4, 8


# ------------------------------------------------------------ bind_vcpu (no CPU)
def channels(pollers=None) -> tuple[EventChannels, list[int]]:
    kicks: list[int] = []
    ev = EventChannels(0, 2, np.zeros(4096, np.uint8), kick=kicks.append,
                       peer=lambda d: None, pollers=pollers)
    return ev, kicks


def test_bind_vcpu_moves_unbound_interdomain_and_global_virq_ports_only():
    ev, kicks = channels()
    unbound = ev.alloc_unbound(0)
    ipi = ev.bind_ipi(0)
    timer = ev.bind_virq(VIRQ_TIMER, 0)
    debug = ev.bind_virq(VIRQ_DEBUG, 1)
    console = ev.bind_virq(VIRQ_CONSOLE, 0)
    assert ev.bind_virq(VIRQ_CONSOLE, 1) == -EINVAL  # a global VIRQ is bound on vCPU 0
    assert ev.bind_vcpu(unbound, 1) == 0 and ev.port_info(unbound).notify_vcpu == 1
    assert ev.bind_vcpu(console, 1) == 0 and ev.port_info(console).notify_vcpu == 1
    for fixed in (ipi, timer, debug):
        assert ev.bind_vcpu(fixed, 1) == -EINVAL
    assert ev.bind_vcpu(unbound, 2) == -ENOENT
    assert ev.bind_vcpu(4000, 1) == -EINVAL
    # the global VIRQ is still raised as vCPU 0's and now notifies vCPU 1
    assert ev.raise_virq(0, VIRQ_CONSOLE) and kicks == [1]
    assert ev.bits.upcall_pending(1) and not ev.bits.upcall_pending(0)
    assert ev.close(console) == 0 and ev.bind_virq(VIRQ_CONSOLE, 0) > 0


def test_the_hypercall_form_of_bind_vcpu():
    ev, _ = channels()
    port = ev.alloc_unbound(0)
    assert ev.op(EVTCHNOP_BIND_VCPU, struct.pack("<II", port, 1), 0) == (0, None)
    assert ev.port_info(port).notify_vcpu == 1


def test_pollers_hear_of_every_newly_pending_port_masked_or_not():
    heard: list[int] = []
    ev, kicks = channels(heard.append)
    port = ev.bind_ipi(1)
    ev.bits.test_and_set(SharedInfoBits.MASK, port)
    ev.send(port)
    assert heard == [port] and kicks == []  # masked: no upcall, but the poller hears
    ev.send(port)
    assert heard == [port]  # already pending: nothing new


# ------------------------------------------------------- guests on two vCPUs
def two_pass(build) -> tuple[bytes, dict[str, int]]:
    """Assemble twice: the second pass knows every label's address."""
    first = build({})
    first.bytes()
    final = build({name: ENTRY + at for name, at in first.labels.items()})
    code = final.bytes()
    assert final.labels == first.labels
    return code, {name: ENTRY + at for name, at in final.labels.items()}


def online_ap(hv, rip: int, stack_top: int) -> None:
    """vCPU 1 up at `rip` from a Linux-like context (as VCPUOP_initialise + up)."""
    dom = hv.domains[0]
    ctx = VcpuGuestContext(flags=VGCF_IN_KERNEL | VGCF_ONLINE, kernel_ss=0x18,
                           kernel_sp=stack_top,
                           user_regs=CpuUserRegs(rip=rip, rsp=stack_top, cs=0x10, ss=0x18,
                                                 rflags=0x1000))
    ctx.ctrlreg[3] = dom.vcpus[0].roots.kernel_ma
    assert initialise_xen_vcpu(hv, dom.vcpus[1], ctx) == 0


def poll_guest(port: int, timeout: int = 0) -> tuple[bytes, dict[str, int]]:
    """vCPU 1 polls `port`, then sets a flag; vCPU 0 spins, samples the flag, sends on
    the port and waits for the flag."""
    def build(at: dict[str, int]) -> Asm:
        return (Asm()
                .emit("b9").imm32(3_000_000).emit("ffc9").emit("75fc")  # spin
                .emit("8b05").rip_rel("flag").emit("4989c4")  # r12 = flag before the send
                .emit("b8").imm32(EVTCHN_OP).emit("bf").imm32(EVTCHNOP_SEND)
                .emit("488d35").rip_rel("port").emit("0f05")
                .label("wait")
                .emit("8b05").rip_rel("flag").emit("85c0").emit("750d")
                .emit("b8").imm32(SCHED_OP).emit("31ff").emit("31f6").emit("0f05")  # yield
                .emit("ebe9")
                .shutdown(0)
                .label("ap")
                .emit("b8").imm32(SCHED_OP).emit("bf").imm32(SCHEDOP_POLL)
                .emit("488d35").rip_rel("poll_arg").emit("0f05")
                .emit("8905").rip_rel("poll_rc")
                .emit("b8").imm32(1).emit("8905").rip_rel("flag")
                .label("block")
                .emit("b8").imm32(SCHED_OP).emit("bf").imm32(1).emit("31f6").emit("0f05")
                .emit("ebf0")
                .label("flag").imm32(0).label("poll_rc").imm32(0xFFFF)
                .label("port").imm32(port)
                .label("poll_arg").imm64(at.get("port", 0)).imm32(1).imm32(0).imm64(timeout)
                .data(bytes(0x200)).label("stack_top"))

    return two_pass(build)


@pytest.mark.parametrize("pcpus", [1, 2])
def test_a_vcpu_polling_a_masked_port_sleeps_until_it_is_sent(tmp_path, pcpus):
    port = 3  # the first port after the console's and xenstore's
    code, at = poll_guest(port)
    hv = boot(tmp_path, code, vcpus=2, pcpus=pcpus)
    dom = hv.domains[0]
    assert dom.events.bind_ipi(1) == port
    dom.events.bits.test_and_set(SharedInfoBits.MASK, port)  # as Linux's lock kicker
    online_ap(hv, at["ap"], at["stack_top"])
    assert hv.run(200_000_000) == "shutdown"
    assert dom.shutdown.reason == "poweroff", dom.crash_report
    regs = hv.read_vcpu_registers(dom.vcpus[0])
    assert regs["r12"] == 0  # vCPU 1 was still asleep in its poll after 6 M instructions
    mem = hv.copy_from_guest(dom.vcpus[0], at["poll_rc"], 4)
    assert struct.unpack("<I", mem)[0] == 0
    assert dom.vcpus[1].instructions < 100  # it slept: no spinning
    assert not dom.vcpus[1].xen.polling
    assert dom.vcpus[1].xen.hypercalls["sched_op"] == 2  # the poll, then the block


def test_a_poll_times_out_at_its_absolute_deadline(tmp_path):
    port = 3
    code, at = poll_guest(port, timeout=2_000_000)
    hv = boot(tmp_path, code, vcpus=2, pcpus=2)
    dom = hv.domains[0]
    assert dom.events.bind_ipi(1) == port
    dom.events.bits.test_and_set(SharedInfoBits.MASK, port)
    online_ap(hv, at["ap"], at["stack_top"])
    assert hv.run(200_000_000) == "shutdown"
    regs = hv.read_vcpu_registers(dom.vcpus[0])
    assert regs["r12"] == 1  # woken by its timeout (2 ms) before vCPU 0 sent (6 ms)


def _scratch(hv, data: bytes) -> int:
    """Guest memory for hypercall arguments: a page of the domain's mapped region."""
    va = hv.domains[0].virt_base + 0x300000
    hv.copy_to_guest(hv.domains[0].vcpus[0], va, data)
    return va


def test_poll_answers_at_once_or_refuses_without_blocking(tmp_path):
    hv = boot(tmp_path, Asm().shutdown(0).bytes(), vcpus=2)
    dom = hv.domains[0]
    v = dom.vcpus[0]
    port = dom.events.bind_ipi(0)

    def poll(ports, timeout=0, nr=None):
        ports_va = _scratch(hv, struct.pack(f"<{len(ports)}I", *ports))
        arg = _scratch_at(hv, 0x301000, struct.pack("<QI4xQ", ports_va,
                                                      len(ports) if nr is None else nr,
                                                      timeout))
        return call(hv, v, SCHED_OP, (SCHEDOP_POLL, arg, 0, 0, 0))

    assert poll([port], nr=129) == -EINVAL
    assert poll([4000]) == -EINVAL
    hv._clock = 10
    assert poll([port], timeout=5) == 0 and v.runstate == "runnable"  # deadline past
    dom.events.send(port)
    assert poll([port, 4000]) == 0 and v.runstate == "runnable"  # pending before the bad one
    assert call(hv, v, SCHED_OP, (SCHEDOP_POLL, 0x1000, 0, 0, 0)) == -EFAULT
    assert not v.xen.polling


def _scratch_at(hv, offset: int, data: bytes) -> int:
    va = hv.domains[0].virt_base + offset
    hv.copy_to_guest(hv.domains[0].vcpus[0], va, data)
    return va


def test_one_shot_timers_are_each_vcpus_own(tmp_path):
    hv = boot(tmp_path, Asm().shutdown(0).bytes(), vcpus=2)
    dom = hv.domains[0]
    v0, v1 = dom.vcpus
    arg = _scratch(hv, struct.pack("<QI4x", 5_000_000, 0))
    assert call(hv, v0, VCPU_OP, (8, 1, arg, 0, 0)) == -EINVAL  # vCPU 1's, from vCPU 0
    assert call(hv, v0, VCPU_OP, (9, 1, 0, 0, 0)) == -EINVAL
    assert v1.timer_deadline_ns is None
    assert call(hv, v0, VCPU_OP, (8, 0, arg, 0, 0)) == 0
    assert v0.timer_deadline_ns == 5_000_000
    hv._clock = 10_000_000
    future = _scratch(hv, struct.pack("<QI4x", 6_000_000, 1))  # VCPU_SSHOTTMR_future
    assert call(hv, v0, VCPU_OP, (8, 0, future, 0, 0)) == -ETIME
    assert v0.timer_deadline_ns == 5_000_000


@pytest.mark.parametrize("flags, flushed", [(1, {0}), (1 | 4, {0, 1}), (2 | 4, {0, 1}),
                                             (0, set())])
def test_update_va_mapping_flushes_where_asked(tmp_path, flags, flushed):
    hv = boot(tmp_path, Asm().shutdown(0).bytes(), vcpus=2, pcpus=2)
    dom = hv.domains[0]
    v = dom.vcpus[0]
    seen: set[int] = set()
    for cpu in hv.pcpus:
        cpu.flush_tlb = lambda i=cpu.index: seen.add(i)  # type: ignore[method-assign]
    va = dom.virt_base + 0x300000
    from hypervisor.pv.xen.hypercalls import l1_entry_ma
    pte = int(hv.memory.u64[l1_entry_ma(hv, v, va) >> 3])
    assert call(hv, v, UPDATE_VA_MAPPING, (va, pte, flags, 0, 0)) == 0
    assert seen == flushed


def test_update_va_mapping_reads_a_vcpu_bitmap(tmp_path):
    hv = boot(tmp_path, Asm().shutdown(0).bytes(), vcpus=2, pcpus=2)
    dom = hv.domains[0]
    v = dom.vcpus[0]
    va = dom.virt_base + 0x300000
    from hypervisor.pv.xen.hypercalls import l1_entry_ma
    pte = int(hv.memory.u64[l1_entry_ma(hv, v, va) >> 3])
    mask = _scratch_at(hv, 0x301000, struct.pack("<Q", 0b10))
    assert call(hv, v, UPDATE_VA_MAPPING, (va, pte, mask | 1, 0, 0)) == 0
    assert call(hv, v, UPDATE_VA_MAPPING, (va, pte, 0x1000 | 1, 0, 0)) == -EFAULT


KERNEL_CS_DPL0, KERNEL_DS_DPL0 = 0x00AF_9B00_0000_FFFF, 0x00CF_9300_0000_FFFF


def test_a_vcpu_on_its_kernels_own_selectors_can_iret_to_itself(tmp_path):
    """Linux's iret_to_self on a vCPU started on 0x13: the CPU loads the guest's GDT
    descriptor, whose DPL Xen raised to 3."""
    def build(at: dict[str, int]) -> Asm:
        asm = (Asm()
               .label("wait")
               .emit("8b05").rip_rel("flag").emit("85c0").emit("750d")
               .emit("b8").imm32(SCHED_OP).emit("31ff").emit("31f6").emit("0f05")
               .emit("ebe9")
               .shutdown(0)
               .label("ap")
               .emit("8cd0").emit("50").emit("54").emit("4883042408").emit("9c")
               .emit("8cc8").emit("50").emit("68").imm32(at.get("back", 0))
               .emit("48cf")  # iretq to the same CS:RIP
               .label("back")
               .emit("b8").imm32(1).emit("8905").rip_rel("flag")
               .label("block")
               .emit("b8").imm32(SCHED_OP).emit("bf").imm32(1).emit("31f6").emit("0f05")
               .emit("ebf0")
               .label("flag").imm32(0)
               .data(bytes(0x200)).label("stack_top"))
        asm.data(bytes(-len(asm.code) % 4096)).label("gdt")
        return asm.data(struct.pack("<4Q", 0, 0, KERNEL_CS_DPL0, KERNEL_DS_DPL0))

    code, at = two_pass(build)
    hv = boot(tmp_path, code, vcpus=2, pcpus=2)
    dom = hv.domains[0]
    gdt_mfn = int(dom.p2m[(at["gdt"] - dom.virt_base) >> 12])
    ctx = VcpuGuestContext(flags=VGCF_IN_KERNEL | VGCF_ONLINE, kernel_ss=0x18,
                           kernel_sp=at["stack_top"], gdt_ents=32,
                           user_regs=CpuUserRegs(rip=at["ap"], rsp=at["stack_top"], cs=0x10,
                                                 ss=0x18, rflags=0x1000))
    ctx.gdt_frames[0] = gdt_mfn
    ctx.ctrlreg[3] = dom.vcpus[0].roots.kernel_ma
    assert initialise_xen_vcpu(hv, dom.vcpus[1], ctx) == 0
    gdt = hv.memory.u64[gdt_mfn * 512:gdt_mfn * 512 + 4]
    assert [int(d) >> 45 & 3 for d in gdt] == [0, 0, 3, 3]  # present code/data: DPL 3
    assert hv.run(50_000_000) == "shutdown"
    assert dom.shutdown.reason == "poweroff", dom.crash_report
    cpu = hv.switch_to(1, dom.vcpus[1])
    assert cpu.reg("cs") == 0x13 and cpu.reg("ss") == 0x1B and cpu.in_ring3


def test_update_descriptor_raises_the_dpl_of_code_and_data_only(tmp_path):
    hv = boot(tmp_path, Asm().shutdown(0).bytes())
    dom = hv.domains[0]
    v = dom.vcpus[0]
    ma = int(dom.p2m[0x300]) << 12
    tss = 0x0000_8900_0000_0067  # a present system descriptor: left alone
    for desc, stored in ((KERNEL_CS_DPL0, KERNEL_CS_DPL0 | 3 << 45), (tss, tss), (0, 0)):
        assert call(hv, v, 10, (ma, desc, 0, 0, 0)) == 0
        assert int(hv.memory.u64[ma >> 3]) == stored


OPS = st.lists(st.tuples(st.sampled_from(["unbound", "ipi", "virq", "bind_vcpu", "close",
                                          "send"]),
                         st.integers(0, 8), st.integers(0, 2)), max_size=40)


@settings(max_examples=300, deadline=None)
@given(OPS)
@example([("virq", 2, 0), ("bind_vcpu", 0, 1), ("close", 0, 0)])  # a moved global VIRQ
def test_bind_vcpu_keeps_the_port_table_consistent(ops):
    """Whatever the sequence: every VIRQ port is found where raise_virq looks (global
    ones as vCPU 0's), notify vCPUs stay in range, and closing never fails on a bound port."""
    ev, _ = channels()
    for op, a, b in ops:
        ports = sorted(ev.state.ports)
        port = ports[a % len(ports)] if ports else 1
        if op == "unbound":
            ev.alloc_unbound(0)
        elif op == "ipi":
            ev.bind_ipi(b)
        elif op == "virq":
            ev.bind_virq(a % 4, b)  # TIMER, DEBUG (per vCPU), CONSOLE, DOM_EXC (global)
        elif op == "bind_vcpu":
            ev.bind_vcpu(port, b)
        elif op == "close" and ports:
            assert ev.close(port) == 0
        elif op == "send" and ports:
            ev.send(port)
    virqs = {p: info for p, info in ev.state.ports.items() if info.state == "virq"}
    assert sorted(ev.state.virq_ports.values()) == sorted(virqs)
    for (vcpu, virq), port in ev.state.virq_ports.items():
        info = virqs[port]
        assert info.virq == virq
        assert vcpu == (info.notify_vcpu if virq in (VIRQ_TIMER, VIRQ_DEBUG) else 0)
    assert all(0 <= info.notify_vcpu < 2 for info in ev.state.ports.values())


def test_which_descriptors_an_iret_to_cpl3_loads():
    from hypervisor.pv.xen.descriptors import fix_descriptor, loadable_at_cpl3
    user_cs, user_ds = 0x00AF_FB00_0000_FFFF, 0x00CF_F300_0000_FFFF
    user32_cs = 0x00CF_FB00_0000_FFFF
    assert loadable_at_cpl3(user_cs, code=True) and loadable_at_cpl3(user32_cs, code=True)
    assert loadable_at_cpl3(user_ds, code=False) and not loadable_at_cpl3(user_ds, code=True)
    assert not loadable_at_cpl3(user_cs, code=False)  # code is no stack
    assert not loadable_at_cpl3(KERNEL_CS_DPL0, code=True)  # DPL 0: until Xen fixes it up
    assert loadable_at_cpl3(fix_descriptor(KERNEL_CS_DPL0), code=True)
    assert not loadable_at_cpl3(user_cs & ~(1 << 47), code=True)  # not present
    assert not loadable_at_cpl3(0x0000_E900_0000_0067, code=True)  # a TSS
