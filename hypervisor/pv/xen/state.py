"""What Xen keeps per vCPU for a 64-bit PV guest at CPL 3 (struct pv_vcpu), and its selectors."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

# arch-x86/xen-x86_64.h: Xen's flat selectors, all RPL 3
FLAT_RING3_CS32 = 0xE023
FLAT_RING3_SS = 0xE02B  # also DS32
FLAT_RING3_CS64 = 0xE033
FLAT_KERNEL_CS = FLAT_RING3_CS64
FLAT_KERNEL_SS = FLAT_RING3_SS

# vm_assist types (public/xen.h)
VMASST_TYPE_4GB_SEGMENTS = 0
VMASST_TYPE_4GB_SEGMENTS_NOTIFY = 1
VMASST_TYPE_WRITABLE_PAGETABLES = 2
VMASST_TYPE_PAE_EXTENDED_CR3 = 3
VMASST_TYPE_ARCHITECTURAL_IOPL = 4
VMASST_TYPE_RUNSTATE_UPDATE_FLAG = 5
VMASST_TYPE_M2P_STRICT = 32
VALID_VM_ASSISTS = frozenset({0, 1, 2, 3, 4, 5, 32})

# the guest-visible CR4 a PV vCPU starts with: PAE, OSFXSR, OSXMMEXCPT
INITIAL_CR4 = 0x620
CR4_GUEST_BITS = 0x4 | 0x8 | 0x10000 | 0x40000  # TSD, DE, FSGSBASE, OSXSAVE
CR0_GUEST = 0x8005_0033  # PE, MP, ET, NE, WP, AM, PG; TS is kept virtually
CR0_TS = 0x8


@dataclass
class XenVcpu:
    """A CPL-3 PV vCPU's virtual state beyond the CPU registers."""

    kernel_mode: bool = True  # TF_kernel_mode: kernel and user differ only by this flag
    kernel_ss: int = FLAT_KERNEL_SS  # stack_switch: where bounces from user mode land
    kernel_sp: int = 0
    gs_base_inactive: int = 0  # the other mode's GS base (user's in kernel mode)
    iopl: int = 0  # virtual IOPL (PHYSDEVOP_set_iopl): cli/sti and ports need >= 1
    cr0_ts: bool = False
    cr4: int = INITIAL_CR4
    vm_assist: int = 0
    syscall_masks_events: bool = False  # CALLBACKF_mask_events on the syscall callback
    gdt_frames: tuple[int, ...] = ()  # set_gdt's machine frames (up to 14)
    gdt_entries: int = 0
    runstate_area: int = 0  # VCPUOP_register_runstate_memory_area
    vcpu_info_ma: int | None = None  # VCPUOP_register_vcpu_info (None: shared_info's slot)
    polling: bool = False  # blocked in SCHEDOP_poll (pv/xen/poll.py)
    poll_ports: frozenset[int] | None = None  # the one port polled; None: any port
    poll_deadline_ns: int | None = None  # the poll's timeout, hypervisor time
    debugregs: dict[int, int] = field(default_factory=lambda: {6: 0xFFFF_0FF0, 7: 0x400})
    privops: int = 0  # privileged instructions emulated
    forced_cpuids: int = 0
    ptwr: int = 0  # writes to L1 tables emulated
    bounces: int = 0  # exceptions and events delivered
    hypercalls: Counter[str] = field(default_factory=Counter)

    def assists(self, kind: int) -> bool:
        return bool(self.vm_assist >> kind & 1)
