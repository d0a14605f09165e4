"""Building a Linux PV domain the way Xen's toolstack does, and starting it at CPL 3.

The kernel file (a bzImage or its ELF) is placed by its Xen notes; the
start of day is Xen's (layout.py), pinned through hvlab's typerefs; the
shared_info page is a hypervisor frame the domain owns (Xen's
share_xen_page_with_guest), mapped by the guest itself through the machine
address start_info gives it; so are its grant frames (grant_table.py).
The console ring's event channel is port 1, xenstore's port 2 (an in-memory
store on the ring, xenstore.py); both backends run when the guest sends on an
event channel and after every slice.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from emulator.addr import PAGE_SIZE
from hypervisor.core.domain import Domain
from hypervisor.core.evtchn import MAX_LEGACY_VCPUS, EventChannels
from hypervisor.core.hypervisor import Hypervisor, until_done
from hypervisor.core.vcpu import RUNNABLE, Vcpu
from hypervisor.lib.errors import HvlabError
from hypervisor.mm.errors import errno_name
from hypervisor.pv.linux.backends import BackendPoll, Backends
from hypervisor.pv.linux.console_ring import ConsoleRing
from hypervisor.pv.linux.initramfs import build_initramfs_file
from hypervisor.pv.linux.kernel_image import KernelImageError, read_kernel_elf
from hypervisor.pv.linux.layout import build_start_of_day, init_shared_info
from hypervisor.pv.linux.xen_notes import KernelLoadPlan, XenNotesError, plan_kernel_load
from hypervisor.pv.linux.xenstore import Xenstore
from hypervisor.pv.xen.grant_table import create_grant_table
from hypervisor.pv.xen.mmu import XenAbiMmu
from hypervisor.pv.xen.policy import xen_pv_policy
from hypervisor.pv.xen.poll import wake_pollers
from hypervisor.pv.xen.state import XenVcpu

CONSOLE_EVTCHN = 1  # the ports the backends use, allocated before the guest runs
STORE_EVTCHN = 2
VCPU_TIME_OFFSET = 32
BZIMAGE_MAGIC_OFFSET, BZIMAGE_MAGIC = 0x202, b"HdrS"


def uses_xen_abi(kernel_path: str | Path) -> bool:
    """A kernel built for Xen's PV ABI at CPL 3: a bzImage, or an ELF with Xen notes and no
    HYPERCALL_PAGE (hvlab's own guests have neither and keep the CPL-0 ABI)."""
    try:
        with open(kernel_path, "rb") as f:
            head = f.read(BZIMAGE_MAGIC_OFFSET + 4)
    except OSError:
        return False  # the loader that runs next names the problem
    if head[BZIMAGE_MAGIC_OFFSET:] == BZIMAGE_MAGIC:
        return True
    if head[:4] != b"\x7fELF":
        return False
    try:
        plan = plan_kernel_load(Path(kernel_path).read_bytes(), str(kernel_path))
    except XenNotesError:
        return False
    return plan.notes.hypercall_page is None


def load_plan(kernel_path: str | Path) -> KernelLoadPlan:
    try:
        return plan_kernel_load(read_kernel_elf(kernel_path), f"kernel {kernel_path}")
    except (KernelImageError, XenNotesError):
        raise
    except (OSError, ValueError) as err:
        raise HvlabError(f"kernel {kernel_path}: {err}") from None


def toolstack_nodes(name: str, domid: int, memory: int, vcpus: int) -> dict[str, bytes]:
    """What xl writes under /local/domain/<id> before the guest runs (relative paths)."""
    kib = str(memory // 1024).encode()
    nodes = {"name": name.encode(), "domid": str(domid).encode(), "memory/target": kib,
             "memory/static-max": kib}
    nodes.update({f"cpu/{i}/availability": b"online" for i in range(vcpus)})
    return nodes


def create_linux_domain(hv: Hypervisor, name: str, kernel_path: str | Path, memory: int,
                        vcpus: int, cmdline: str, busybox: str | Path | None) -> Domain:
    if not 1 <= vcpus <= MAX_LEGACY_VCPUS:  # each has a vcpu_info slot in shared_info
        raise HvlabError(f"domain {name}: vcpus must be 1..{MAX_LEGACY_VCPUS}, got {vcpus}")
    plan = load_plan(kernel_path)
    try:
        initrd = build_initramfs_file(busybox) if busybox is not None else b""
    except OSError as err:
        raise HvlabError(f"domain {name}: busybox {busybox}: {err.strerror}") from None
    nr_pages = memory // PAGE_SIZE
    domid = len(hv.domains)
    policy = xen_pv_policy(hv)
    xen_gdt_ma, m2p_mas = policy.support.xen_pages()
    shared_info = hv.frames.alloc_one(f"domain {name}'s shared_info")
    hv.frame_table.assign(np.array([shared_info], dtype=np.uint64), domid)
    grant_table = create_grant_table(hv, domid, name)  # Xen makes it with the domain
    built = build_start_of_day(hv.memory, hv.frames, hv.frame_table, hv.typing, domid, plan,
                               nr_pages, initrd, cmdline, shared_info * PAGE_SIZE,
                               STORE_EVTCHN, CONSOLE_EVTCHN)
    p2m = built.p2m
    hv.m2p[p2m.astype(np.int64)] = np.arange(p2m.size, dtype=np.uint64)
    policy.support.refresh_m2p()
    rc = until_done(lambda: hv.typing.get_root_ref(built.l4_mfn, domid))
    if rc:
        raise HvlabError(f"domain {name}: CR3 reference on the initial L4 refused "
                         f"({errno_name(rc)})")
    layout = built.layout
    dom = Domain(domid, name, policy, p2m, shared_info,
                 start_info_va=layout.va(layout.start_info_pfn), virt_base=layout.virt_base,
                 kernel_file=Path(kernel_path).resolve().name)
    dom.grant_table = grant_table
    page = hv.memory.frame_u8(shared_info)
    init_shared_info(page)
    for vid in range(vcpus):  # pvclock: a 1 GHz TSC that counts virtual ns (mul 2^31, shift 1)
        at = 64 * vid + VCPU_TIME_OFFSET
        page[at:at + 32] = np.frombuffer(struct.pack("<IIQQIbB2x", 2, 0, 0, 0, 0x8000_0000, 1,
                                                     0), np.uint8)
    dom.evtchn = EventChannels(domid, vcpus, page, kick=dom.wake_vcpu,
                               peer=hv.evtchn_of, pollers=lambda port: wake_pollers(dom, port))
    ports = [dom.evtchn.alloc_unbound(0) for _ in range(2)]
    assert ports == [CONSOLE_EVTCHN, STORE_EVTCHN]
    console_page = hv.memory.frame_u8(int(p2m[layout.console_pfn]))
    store_page = hv.memory.frame_u8(int(p2m[layout.xenstore_pfn]))
    store = Xenstore(store_page, domid, lambda: dom.events.set_pending(STORE_EVTCHN))
    for path, value in toolstack_nodes(name, domid, memory, vcpus).items():
        store.write(path, value)
    dom.backends = Backends(ConsoleRing(console_page, dom.console.extend,
                                        lambda: dom.events.set_pending(CONSOLE_EVTCHN)), store)
    hv.slice_hooks.append(BackendPoll(dom))
    for vid in range(vcpus):
        v = Vcpu(dom, vid, XenAbiMmu(hv.memory, xen_gdt_ma, m2p_mas), xen=XenVcpu())
        dom.vcpus.append(v)
        hv.scheduler.place(v)
    hv.domains.append(dom)
    regs = built.registers
    boot = dom.vcpus[0]
    policy.support.start_vcpu(boot, regs.rip, regs.rsp, regs.rsi, built.l4_mfn * PAGE_SIZE)
    boot.runstate = RUNNABLE
    return dom


def install_linux_domain(hv: Hypervisor, name: str, p2m: np.ndarray, shared_info: int,
                         start_info_va: int, virt_base: int, nr_vcpus: int,
                         console_pfn: int, xenstore_pfn: int, kernel_file: str) -> Domain:
    """A restored Linux PV domain of claimed, typed frames: its event channels over the
    hypervisor's shared_info page, its backends on the rings, CPL-3 vCPUs (not started)."""
    domid = len(hv.domains)
    policy = xen_pv_policy(hv)
    dom = Domain(domid, name, policy, p2m, shared_info, start_info_va=start_info_va,
                 virt_base=virt_base, kernel_file=kernel_file)
    dom.evtchn = EventChannels(domid, nr_vcpus, hv.memory.frame_u8(shared_info),
                               kick=dom.wake_vcpu, peer=hv.evtchn_of,
                               pollers=lambda port: wake_pollers(dom, port))
    console_page = hv.memory.frame_u8(int(p2m[console_pfn]))
    store = Xenstore(hv.memory.frame_u8(int(p2m[xenstore_pfn])), domid,
                     lambda: dom.events.set_pending(STORE_EVTCHN))
    dom.backends = Backends(ConsoleRing(console_page, dom.console.extend,
                                        lambda: dom.events.set_pending(CONSOLE_EVTCHN)), store)
    hv.slice_hooks.append(BackendPoll(dom))
    xen_gdt_ma, m2p_mas = policy.support.xen_pages()
    for vid in range(nr_vcpus):
        v = Vcpu(dom, vid, XenAbiMmu(hv.memory, xen_gdt_ma, m2p_mas), xen=XenVcpu())
        dom.vcpus.append(v)
        hv.scheduler.place(v)
    hv.domains.append(dom)
    return dom
