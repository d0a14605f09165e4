"""The PV hypercall table (`PV_HYPERCALLS`): Xen's numbers, arguments and errno values.

A kernel-mode `syscall` (its hypercall page's stub) is the hypercall (rax the
number; rdi, rsi, rdx, r10, r8 the arguments). Handlers shared with HVM guests
come from hypervisor/core/hypercalls.py, the PV MMU's from
hypervisor/pv/hypercalls.py; this table adds and replaces what Xen's PV ABI
needs (public/xen.h, vcpu.h, memory.h, callback.h, physdev.h).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from emulator.paging import ADDR_MASK, P
from hypervisor.core import hypercalls as core
from hypervisor.core.hypercalls import GuestAccessError, Hypercall
from hypervisor.core.vcpu import DOWN, RUNNABLE
from hypervisor.lib.errno import EFAULT, EINVAL, ENOENT, ENOSYS, EPERM, ETIME
from hypervisor.pv import hypercalls as pvcalls
from hypervisor.pv.hypercalls import VcpuMmuContext
from hypervisor.pv.mmu_ops import (
    MMU_NORMAL_PT_UPDATE,
    MMUEXT_NEW_BASEPTR,
    MMUEXT_SET_LDT,
    FlushKind,
    TlbFlush,
    do_mmu_update,
    do_mmuext_op,
)
from hypervisor.pv.vcpu import finish_pending_typing
from hypervisor.pv.xen.bounce import hypervisor_iret, xen_state
from hypervisor.pv.xen.descriptors import fix_descriptor, fix_gdt_frames
from hypervisor.pv.xen.grant_table import grant_table_op
from hypervisor.pv.xen.mmu import RO_MPT_VIRT_START, XEN_GDT_PAGE
from hypervisor.pv.xen.poll import do_poll
from hypervisor.pv.xen.state import FLAT_KERNEL_SS, VALID_VM_ASSISTS
from hypervisor.pv.xen.vcpu_init import initialise_xen_vcpu
from hypervisor.stream.vcpu_context import VcpuGuestContext

if TYPE_CHECKING:
    from hypervisor.core.hypervisor import Hypervisor
    from hypervisor.core.vcpu import Vcpu

HYPERVISOR_SET_GDT = 2
HYPERVISOR_STACK_SWITCH = 3
HYPERVISOR_FPU_TASKSWITCH = 5
HYPERVISOR_SET_DEBUGREG = 8
HYPERVISOR_GET_DEBUGREG = 9
HYPERVISOR_UPDATE_DESCRIPTOR = 10
HYPERVISOR_MEMORY_OP = 12
HYPERVISOR_MULTICALL = 13
HYPERVISOR_UPDATE_VA_MAPPING = 14
HYPERVISOR_GRANT_TABLE_OP = 20
HYPERVISOR_VM_ASSIST = 21
HYPERVISOR_IRET = 23
HYPERVISOR_SET_SEGMENT_BASE = 25
HYPERVISOR_CALLBACK_OP = 30
HYPERVISOR_EVENT_CHANNEL_OP = 32
HYPERVISOR_PHYSDEV_OP = 33

XENVER_GET_FEATURES = 6
XENVER_PLATFORM_PARAMETERS = 5
XENVER_PAGESIZE = 7
# XENFEAT_ bits Xen gives a 64-bit PV domU (the kernel panics without 5 and 7)
PV_DOMU_FEATURES = sum(1 << b for b in (5, 6, 7, 13, 17, 18, 19, 20))

XENMEM_MAXIMUM_RAM_PAGE, XENMEM_CURRENT_RESERVATION, XENMEM_MAXIMUM_RESERVATION = 2, 3, 4
XENMEM_MEMORY_MAP = 9
XENMEM_MACHPHYS_MAPPING = 12
E820_RAM = 1

VCPUOP_REGISTER_RUNSTATE_MEMORY_AREA = 5
VCPUOP_SET_PERIODIC_TIMER, VCPUOP_STOP_PERIODIC_TIMER = 6, 7
VCPUOP_SET_SINGLESHOT_TIMER, VCPUOP_STOP_SINGLESHOT_TIMER = 8, 9
VCPUOP_REGISTER_VCPU_INFO = 10
VCPU_SSHOTTMR_FUTURE = 1

CALLBACKOP_REGISTER, CALLBACKOP_UNREGISTER = 0, 1
CALLBACKTYPE_EVENT, CALLBACKTYPE_FAILSAFE, CALLBACKTYPE_SYSCALL = 0, 1, 2
CALLBACKTYPE_SYSCALL32, CALLBACKTYPE_NMI, CALLBACKTYPE_SYSENTER = 3, 4, 5
CALLBACKF_MASK_EVENTS = 1

SEGBASE_FS, SEGBASE_GS_USER, SEGBASE_GS_KERNEL, SEGBASE_GS_USER_SEL = 0, 1, 2, 3
PHYSDEVOP_SET_IOPL = 6
EVTCHNOP_SEND = 4
EVTCHNOP_INIT_CONTROL = 11
SCHEDOP_POLL = 3
EVTCHNOP_SET_PRIORITY = 13
UVMF_FLUSHTYPE_MASK, UVMF_INVLPG = 3, 2
UVMF_LOCAL, UVMF_ALL = 0, 4  # else the flags hold a vCPU bitmap's address

MULTICALL_ENTRY = struct.Struct("<8Q")  # op, result, args[6]
MAX_MULTICALLS = 512
MAX_GDT_FRAMES = XEN_GDT_PAGE  # 14: entries below Xen's reserved ones

Handler = Callable[..., int]


def _cpu(hv: Hypervisor, v: Vcpu):
    return hv.pcpus[v.pcpu]


def new_baseptr(hv: Hypervisor, v: Vcpu, mfn: int) -> int:
    """A CR3 write: MMUEXT_NEW_BASEPTR."""
    rc, _ = do_mmuext_op(VcpuMmuContext(hv, v), [[MMUEXT_NEW_BASEPTR, mfn, 0]])
    return rc


def mmuext_op(hv: Hypervisor, v: Vcpu, ops: int, count: int, done_ptr: int, foreigndom: int,
              *_: int) -> int:
    """As hvlab's core, plus SET_LDT with no entries (Linux clears its LDT at boot)."""
    if count > pvcalls.MAX_MMU_REQUESTS:
        return -EINVAL
    raw = np.frombuffer(hv.copy_from_guest(v, ops, count * pvcalls.MMUEXT_OP_SIZE), dtype=np.uint64)
    requests = raw.reshape(count, 3)
    finish_pending_typing(v.domain)
    rc, done = 0, 0
    ctx = VcpuMmuContext(hv, v)
    for i, (word0, arg1, arg2) in enumerate(requests.tolist()):
        if word0 & 0xFFFF_FFFF == MMUEXT_SET_LDT:
            rc = 0 if arg2 == 0 else -ENOSYS  # a non-empty LDT is not modelled
        else:
            rc, _done = do_mmuext_op(ctx, [[word0, arg1, arg2]], foreigndom & 0xFFFF_FFFF)
        if rc:
            break
        done = i + 1
    pvcalls.forget_cached_walks(v.domain)
    if done_ptr:
        hv.copy_to_guest(v, done_ptr, struct.pack("<I", done))
    return rc


def update_va_mapping(hv: Hypervisor, v: Vcpu, va: int, val: int, flags: int,
                      *_: int) -> int:
    """The L1 entry mapping `va` in the current kernel tables := val, then flush here, on
    every pCPU (UVMF_ALL) or where the vCPUs of a bitmap run (UVMF_MULTI)."""
    entry_ma = l1_entry_ma(hv, v, va)
    if entry_ma is None:
        return -EINVAL
    finish_pending_typing(v.domain)
    ctx = VcpuMmuContext(hv, v)
    rc, _done = do_mmu_update(ctx, [[entry_ma | MMU_NORMAL_PT_UPDATE, val]])
    if rc or not flags & UVMF_FLUSHTYPE_MASK:
        return rc
    page = va if flags & UVMF_FLUSHTYPE_MASK == UVMF_INVLPG else None
    where = flags & ~UVMF_FLUSHTYPE_MASK
    if where == UVMF_LOCAL:
        ctx.flush_tlb(TlbFlush(FlushKind.LOCAL, va=page))
    elif where == UVMF_ALL:
        ctx.flush_tlb(TlbFlush(FlushKind.ALL, va=page))
    else:  # a pointer to a vCPU bitmap (read as Xen does: -EFAULT if it cannot be)
        hv.copy_from_guest(v, where, 8)
        ctx.flush_tlb(TlbFlush(FlushKind.MULTI, va=page, vcpumask=where))
    return rc


def l1_entry_ma(hv: Hypervisor, v: Vcpu, va: int) -> int | None:
    """Machine address of the L1 entry for `va` (None when an upper level is absent)."""
    table = v.roots.kernel_ma
    mem = hv.memory.u64
    for level in (4, 3, 2):
        entry = int(mem[(table + 8 * ((va >> (12 + 9 * (level - 1))) & 0x1FF)) >> 3])
        if not entry & P or (level < 4 and entry & 0x80):
            return None
        table = entry & ADDR_MASK
    return table + 8 * ((va >> 12) & 0x1FF)


def multicall(hv: Hypervisor, v: Vcpu, calls: int, count: int, *_: int) -> int:
    if count > MAX_MULTICALLS:
        return -EINVAL
    for i in range(count):
        at = calls + i * MULTICALL_ENTRY.size
        number, _result, *args = MULTICALL_ENTRY.unpack(hv.copy_from_guest(
            v, at, MULTICALL_ENTRY.size))
        if number in (HYPERVISOR_MULTICALL, HYPERVISOR_IRET):
            result = -EINVAL
        else:
            result = call(hv, v, number, tuple(args[:5]))
        hv.copy_to_guest(v, at + 8, struct.pack("<q", result))
        if not v.domain.alive:
            break
    return 0


def set_gdt(hv: Hypervisor, v: Vcpu, frame_list: int, entries: int, *_: int) -> int:
    nr_frames = -(-entries * 8 // 4096)
    if entries > MAX_GDT_FRAMES * 512 or nr_frames > MAX_GDT_FRAMES:
        return -EINVAL
    frames = struct.unpack(f"<{nr_frames}Q", hv.copy_from_guest(v, frame_list, 8 * nr_frames))
    owner = hv.frame_table.owner_of
    if any(f >= hv.memory.nr_frames or owner(f) != v.domain.domid for f in frames):
        return -EINVAL
    fix_gdt_frames(hv.memory.u64, frames, entries)
    x = xen_state(v)
    x.gdt_frames, x.gdt_entries = tuple(frames), entries
    v.mmu.guest_gdt = x.gdt_frames  # type: ignore[attr-defined]
    _cpu(hv, v).flush_tlb()
    return 0


def stack_switch(hv: Hypervisor, v: Vcpu, ss: int, sp: int, *_: int) -> int:
    x = xen_state(v)
    x.kernel_ss, x.kernel_sp = ss | 3 if ss else FLAT_KERNEL_SS, sp
    return 0


def fpu_taskswitch(hv: Hypervisor, v: Vcpu, set_ts: int, *_: int) -> int:
    xen_state(v).cr0_ts = bool(set_ts)
    return 0


def set_debugreg(hv: Hypervisor, v: Vcpu, reg: int, value: int, *_: int) -> int:
    if not 0 <= reg <= 7 or reg in (4, 5):
        return -EINVAL
    xen_state(v).debugregs[reg] = value
    return 0


def get_debugreg(hv: Hypervisor, v: Vcpu, reg: int, *_: int) -> int:
    if not 0 <= reg <= 7 or reg in (4, 5):
        return -EINVAL
    return xen_state(v).debugregs.get(reg, 0)


def update_descriptor(hv: Hypervisor, v: Vcpu, ma: int, desc: int, *_: int) -> int:
    """Write one descriptor into a frame of the domain (its GDT or LDT pages), with
    Xen's DPL fix-up (pv/xen/descriptors.py)."""
    mfn = ma >> 12
    if ma & 7 or mfn >= hv.memory.nr_frames or hv.frame_table.owner_of(mfn) != v.domain.domid:
        return -EINVAL
    hv.memory.u64[ma >> 3] = np.uint64(fix_descriptor(desc))
    return 0


def memory_op(hv: Hypervisor, v: Vcpu, cmd: int, arg: int, *_: int) -> int:
    dom = v.domain
    cmd &= 0xF  # the upper bits carry a continuation's start extent
    if cmd == XENMEM_MEMORY_MAP:
        nr_entries, buffer = struct.unpack("<I4xQ", hv.copy_from_guest(v, arg, 16))
        if nr_entries < 1:
            return -EINVAL
        hv.copy_to_guest(v, buffer, struct.pack("<QQI", 0, dom.nr_pages * 4096, E820_RAM))
        hv.copy_to_guest(v, arg, struct.pack("<I", 1))
        return 0
    if cmd == XENMEM_MACHPHYS_MAPPING:
        end = RO_MPT_VIRT_START + hv.memory.nr_frames * 8
        hv.copy_to_guest(v, arg, struct.pack("<QQQ", RO_MPT_VIRT_START, end,
                                             hv.memory.nr_frames - 1))
        return 0
    if cmd == XENMEM_MAXIMUM_RAM_PAGE:
        return hv.memory.nr_frames - 1
    if cmd in (XENMEM_CURRENT_RESERVATION, XENMEM_MAXIMUM_RESERVATION):
        return dom.nr_pages
    return -ENOSYS


def vm_assist(hv: Hypervisor, v: Vcpu, cmd: int, kind: int, *_: int) -> int:
    if kind not in VALID_VM_ASSISTS or cmd not in (0, 1):
        return -EINVAL
    for w in v.domain.vcpus:  # a domain-wide setting
        x = xen_state(w)
        x.vm_assist = x.vm_assist | 1 << kind if cmd == 0 else x.vm_assist & ~(1 << kind)
    return 0


def iret(hv: Hypervisor, v: Vcpu, *_: int) -> int:
    return hypervisor_iret(hv, _cpu(hv, v), v)


def set_segment_base(hv: Hypervisor, v: Vcpu, which: int, value: int, *_: int) -> int:
    cpu, x = _cpu(hv, v), xen_state(v)
    if which == SEGBASE_FS:
        cpu.set_reg("fs_base", value)
    elif which == SEGBASE_GS_KERNEL:
        cpu.set_reg("gs_base", value) if x.kernel_mode else setattr(x, "gs_base_inactive", value)
    elif which == SEGBASE_GS_USER:
        setattr(x, "gs_base_inactive", value) if x.kernel_mode else cpu.set_reg("gs_base", value)
    elif which == SEGBASE_GS_USER_SEL:
        # load the user GS selector: flat or null, so the user GS base becomes 0
        if x.kernel_mode:
            x.gs_base_inactive = 0
        else:
            cpu.set_reg("gs_base", 0)
    else:
        return -EINVAL
    return 0


def callback_op(hv: Hypervisor, v: Vcpu, cmd: int, arg: int, *_: int) -> int:
    if cmd not in (CALLBACKOP_REGISTER, CALLBACKOP_UNREGISTER):
        return -ENOSYS
    if cmd == CALLBACKOP_REGISTER:
        kind, flags, address = struct.unpack("<HH4xQ", hv.copy_from_guest(v, arg, 16))
    else:
        kind, flags, address = struct.unpack("<H", hv.copy_from_guest(v, arg, 2))[0], 0, 0
    if kind == CALLBACKTYPE_EVENT:
        v.event_callback = address
    elif kind == CALLBACKTYPE_FAILSAFE:
        v.failsafe_callback = address
    elif kind == CALLBACKTYPE_SYSCALL:
        v.syscall_callback = address
        xen_state(v).syscall_masks_events = bool(flags & CALLBACKF_MASK_EVENTS)
    elif kind in (CALLBACKTYPE_SYSCALL32, CALLBACKTYPE_SYSENTER, CALLBACKTYPE_NMI):
        pass  # 32-bit entry points: never used by a 64-bit guest under hvlab
    else:
        return -EINVAL
    return 0


def set_callbacks(hv: Hypervisor, v: Vcpu, event: int, failsafe: int, syscall: int,
                  *_: int) -> int:
    """HYPERVISOR_set_callbacks (x86-64): the three callbacks at once, as CALLBACKOP_register
    of each with no flags."""
    v.event_callback, v.failsafe_callback, v.syscall_callback = event, failsafe, syscall
    xen_state(v).syscall_masks_events = False
    return 0


def vcpu_op(hv: Hypervisor, v: Vcpu, cmd: int, vcpu_id: int, arg: int, *_: int) -> int:
    dom = v.domain
    if not 0 <= vcpu_id < len(dom.vcpus):
        return -ENOENT
    target = dom.vcpus[vcpu_id]
    if cmd == core.VCPUOP_INITIALISE:
        ctx = VcpuGuestContext.unpack(hv.copy_from_guest(v, arg, VcpuGuestContext.SIZE))
        return initialise_xen_vcpu(hv, target, ctx)
    if cmd == VCPUOP_REGISTER_RUNSTATE_MEMORY_AREA:
        xen_state(target).runstate_area = struct.unpack("<Q", hv.copy_from_guest(v, arg, 8))[0]
        return 0
    if cmd == VCPUOP_STOP_PERIODIC_TIMER:
        return 0  # no periodic timer runs (set_periodic_timer is refused)
    if cmd == VCPUOP_SET_PERIODIC_TIMER:
        return -ENOSYS  # Linux stops it and uses the one-shot timer
    if cmd in (VCPUOP_SET_SINGLESHOT_TIMER, VCPUOP_STOP_SINGLESHOT_TIMER) and target is not v:
        return -EINVAL  # as Xen: a vCPU sets and stops only its own one-shot timer
    if cmd == VCPUOP_STOP_SINGLESHOT_TIMER:
        target.timer_deadline_ns = None
        return 0
    if cmd == VCPUOP_SET_SINGLESHOT_TIMER:
        deadline, flags = struct.unpack("<QI", hv.copy_from_guest(v, arg, 12))
        now = hv.vcpu_time(dom) - dom.time_offset
        if flags & VCPU_SSHOTTMR_FUTURE and deadline - dom.time_offset < now:
            return -ETIME
        # a deadline already past fires at once
        target.timer_deadline_ns = max(deadline - dom.time_offset, now)
        return 0
    if cmd == VCPUOP_REGISTER_VCPU_INFO:
        mfn, offset = struct.unpack("<QI", hv.copy_from_guest(v, arg, 12))
        if (offset & 7 or offset + 64 > 4096 or mfn >= hv.memory.nr_frames
                or hv.frame_table.owner_of(mfn) != dom.domid):
            return -EINVAL
        start = mfn * 4096 + offset
        xen_state(target).vcpu_info_ma = start
        dom.events.bits.relocate_vcpu_info(vcpu_id, hv.memory.u8[start:start + 64])
        return 0
    if cmd == core.VCPUOP_UP:
        if target.context is None:
            return -EINVAL
        if target.runstate == DOWN:
            target.runstate = RUNNABLE
        return 0
    if cmd == core.VCPUOP_DOWN:
        target.runstate = DOWN
        if target is v:
            v.yield_requested = True
        return 0
    if cmd == core.VCPUOP_IS_UP:
        return int(target.runstate != DOWN)
    return -ENOSYS  # incl. register_vcpu_time_memory_area (13): Linux does without it


def event_channel_op(hv: Hypervisor, v: Vcpu, cmd: int, arg: int, *rest: int) -> int:
    if cmd in (EVTCHNOP_INIT_CONTROL, EVTCHNOP_SET_PRIORITY):
        return -ENOSYS  # FIFO ABI absent: Linux uses the 2-level one
    rc = core.event_channel_op(hv, v, cmd, arg, *rest)
    if cmd == EVTCHNOP_SEND and v.domain.backends is not None:
        v.domain.backends.kick()
    return rc


def physdev_op(hv: Hypervisor, v: Vcpu, cmd: int, arg: int, *_: int) -> int:
    if cmd == PHYSDEVOP_SET_IOPL:
        iopl = struct.unpack("<I", hv.copy_from_guest(v, arg, 4))[0]
        if iopl > 3:
            return -EINVAL
        xen_state(v).iopl = iopl
        return 0
    return -ENOSYS


def xen_version(hv: Hypervisor, v: Vcpu, cmd: int, buf: int, *_: int) -> int:
    if cmd == XENVER_GET_FEATURES:
        index = struct.unpack("<I", hv.copy_from_guest(v, buf, 4))[0]
        hv.copy_to_guest(v, buf + 4, struct.pack("<I", PV_DOMU_FEATURES if index == 0 else 0))
        return 0
    if cmd == XENVER_PLATFORM_PARAMETERS:
        hv.copy_to_guest(v, buf, struct.pack("<Q", RO_MPT_VIRT_START))
        return 0
    if cmd == XENVER_PAGESIZE:
        return 4096
    return core.xen_version(hv, v, cmd, buf)


def console_io(hv: Hypervisor, v: Vcpu, cmd: int, count: int, buf: int, *_: int) -> int:
    if cmd != core.CONSOLEIO_WRITE:
        return -EPERM  # a domU reads its console through the ring
    return core.console_io(hv, v, cmd, count, buf)


HVLAB_GUEST_OS = "hvlab"  # the GUEST_OS note of hvlab's own kernels


def sched_op(hv: Hypervisor, v: Vcpu, cmd: int, arg: int, *rest: int) -> int:
    """As hvlab's core, except that SCHEDOP_shutdown's argument is Xen's: the reason only
    (a kernel whose GUEST_OS note is "hvlab" appends its verdict code: hvlab's departure;
    a Linux guest's next word is not one), plus SCHEDOP_poll (pv/xen/poll.py)."""
    if cmd == core.SCHEDOP_SHUTDOWN:
        verdict = v.domain.guest_os == HVLAB_GUEST_OS
        reason, *code = struct.unpack("<II" if verdict else "<I",
                                      hv.copy_from_guest(v, arg, 8 if verdict else 4))
        hv.shutdown_domain(v.domain, reason, code[0] if code else 0)
        return 0
    if cmd == SCHEDOP_POLL:
        return do_poll(hv, v, arg)
    return core.sched_op(hv, v, cmd, arg, *rest)


PV_HYPERCALLS: dict[int, Hypercall] = {
    core.HYPERVISOR_SET_TRAP_TABLE: Hypercall("set_trap_table", pvcalls.set_trap_table),
    core.HYPERVISOR_MMU_UPDATE: Hypercall("mmu_update", pvcalls.mmu_update),
    HYPERVISOR_SET_GDT: Hypercall("set_gdt", set_gdt),
    core.HYPERVISOR_SET_CALLBACKS: Hypercall("set_callbacks", set_callbacks),
    HYPERVISOR_STACK_SWITCH: Hypercall("stack_switch", stack_switch),
    HYPERVISOR_FPU_TASKSWITCH: Hypercall("fpu_taskswitch", fpu_taskswitch),
    HYPERVISOR_SET_DEBUGREG: Hypercall("set_debugreg", set_debugreg),
    HYPERVISOR_GET_DEBUGREG: Hypercall("get_debugreg", get_debugreg),
    HYPERVISOR_UPDATE_DESCRIPTOR: Hypercall("update_descriptor", update_descriptor),
    HYPERVISOR_MEMORY_OP: Hypercall("memory_op", memory_op),
    HYPERVISOR_MULTICALL: Hypercall("multicall", multicall),
    HYPERVISOR_UPDATE_VA_MAPPING: Hypercall("update_va_mapping", update_va_mapping),
    core.HYPERVISOR_SET_TIMER_OP: Hypercall("set_timer_op", core.set_timer_op),
    core.HYPERVISOR_XEN_VERSION: Hypercall("xen_version", xen_version),
    core.HYPERVISOR_CONSOLE_IO: Hypercall("console_io", console_io),
    HYPERVISOR_GRANT_TABLE_OP: Hypercall("grant_table_op", grant_table_op),
    HYPERVISOR_VM_ASSIST: Hypercall("vm_assist", vm_assist),
    HYPERVISOR_IRET: Hypercall("iret", iret),
    core.HYPERVISOR_VCPU_OP: Hypercall("vcpu_op", vcpu_op),
    HYPERVISOR_SET_SEGMENT_BASE: Hypercall("set_segment_base", set_segment_base),
    core.HYPERVISOR_MMUEXT_OP: Hypercall("mmuext_op", mmuext_op),
    core.HYPERVISOR_SCHED_OP: Hypercall("sched_op", sched_op),
    HYPERVISOR_CALLBACK_OP: Hypercall("callback_op", callback_op),
    HYPERVISOR_EVENT_CHANNEL_OP: Hypercall("event_channel_op", event_channel_op),
    HYPERVISOR_PHYSDEV_OP: Hypercall("physdev_op", physdev_op),
}


def call(hv: Hypervisor, v: Vcpu, number: int, args: tuple[int, ...]) -> int:
    entry = PV_HYPERCALLS.get(number)
    if entry is None:
        return -ENOSYS
    xen_state(v).hypercalls[entry.name] += 1
    try:
        return entry.handler(hv, v, *args)
    except GuestAccessError:
        return -EFAULT

