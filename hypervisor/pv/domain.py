"""PV domains on a hypervisor: building one from a kernel, installing one (build, restore,
live update)."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import numpy as np

from emulator.addr import PAGE_SIZE
from hypervisor.core.domain import Domain
from hypervisor.core.elf import load_kernel
from hypervisor.core.evtchn import VCPU_INFO_SIZE, EventChannels
from hypervisor.core.hypervisor import until_done
from hypervisor.core.vcpu import RUNNABLE, Vcpu
from hypervisor.lib.errors import HvlabError
from hypervisor.mm.errors import errno_name
from hypervisor.pv.builder import build_pv_memory
from hypervisor.pv.mmu import PvMmu
from hypervisor.pv.policy import pv_policy
from hypervisor.pv.vcpu import INITIAL_RFLAGS, start_pv_vcpu

if TYPE_CHECKING:
    from hypervisor.core.hypervisor import Hypervisor

VCPU_TIME_OFFSET = 32  # vcpu_time_info inside vcpu_info


def create_pv_domain(hv: Hypervisor, name: str, kernel_path: str, memory: int,
                     vcpus: int) -> Domain:
    """Build a PV domain from an ELF kernel; vCPU 0 runnable at its entry."""
    kernel = load_kernel(kernel_path)
    nr_pages = memory // PAGE_SIZE
    if nr_pages <= 0:
        raise HvlabError(f"domain {name}: memory must be at least 4 KiB")
    if not 1 <= vcpus <= 32:
        raise HvlabError(f"domain {name}: vcpus must be between 1 and 32")
    p2m = hv.frames.alloc(nr_pages, f"domain {name}")
    try:
        layout, l4_ma = build_pv_memory(hv.memory, kernel, p2m, name)
    except HvlabError:
        hv.scrub_and_release(p2m)
        raise
    domid = len(hv.domains)
    hv.claim_frames(p2m, domid)
    # As Xen's builder: the initial L4 is pinned, which validates the whole
    # bootstrap tree, and vCPU 0's CR3 takes its own reference.
    l4_mfn = l4_ma >> 12
    for what, op in (("pin", lambda: hv.typing.pin_table(l4_mfn, 4, domid)),
                     ("CR3 reference", lambda: hv.typing.get_root_ref(l4_mfn, domid))):
        rc = until_done(op)
        if rc:
            raise HvlabError(f"domain {name}: initial page tables refused ({what}: "
                             f"{errno_name(rc)})")
    dom = install_pv_domain(hv, name, p2m, layout.shared_info_pfn,
                            layout.va(layout.start_info_pfn), layout.virt_base, vcpus)
    _init_shared_info(hv, dom, vcpus)
    boot = dom.vcpus[0]
    start_pv_vcpu(hv, boot, {"rip": kernel.entry, "rsp": layout.stack_top,
                             "rsi": dom.start_info_va, "rflags": INITIAL_RFLAGS}, l4_ma)
    boot.runstate = RUNNABLE
    return dom


def install_pv_domain(hv: Hypervisor, name: str, p2m: np.ndarray, shared_info_pfn: int,
                      start_info_va: int, virt_base: int, nr_vcpus: int) -> Domain:
    """A domain whose frames are claimed and filled: events and vCPUs (not yet started)."""
    domid = len(hv.domains)
    shared_info = int(p2m[shared_info_pfn])
    dom = Domain(domid, name, pv_policy(hv), p2m, shared_info, start_info_va=start_info_va,
                 virt_base=virt_base, shared_info_pfn=shared_info_pfn)
    dom.evtchn = EventChannels(domid, nr_vcpus, hv.memory.frame_u8(shared_info),
                               kick=dom.wake_vcpu, peer=hv.evtchn_of)
    for vid in range(nr_vcpus):
        # A lab's writable-mapping rule may let a guest write its own page
        # tables, behind any cache's back: then every fill walks afresh.
        mmu = PvMmu(hv.memory, hv.gdt_mfn * PAGE_SIZE,
                    cache_walks=hv.seams.writable_mapping is None)
        vcpu = Vcpu(dom, vid, mmu)
        dom.vcpus.append(vcpu)
        hv.scheduler.place(vcpu)
    hv.domains.append(dom)
    return dom


def _init_shared_info(hv: Hypervisor, dom: Domain, nr_vcpus: int) -> None:
    page = hv.memory.frame_u8(dom.shared_info_mfn)
    for vid in range(nr_vcpus):
        base = VCPU_INFO_SIZE * vid
        page[base + 1] = 1  # evtchn_upcall_mask: events masked until the guest is ready
        # vcpu_time_info: version 2, tsc_timestamp 0, system_time 0, mul 2^31, shift 1
        t = base + VCPU_TIME_OFFSET
        page[t : t + 32] = np.frombuffer(struct.pack("<IIQQIbB2x", 2, 0, 0, 0,
                                                     0x8000_0000, 1, 0), np.uint8)
