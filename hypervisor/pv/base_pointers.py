"""A PV vCPU's page-table roots, Xen's guest_table and guest_table_user.

They are held here and nowhere else: the MMU walks from `kernel_ma`, the
hypercalls (NEW_BASEPTR, NEW_USER_BASEPTR) change them, save and the
hand-over write them out, restore and the typeref strategies take their
references, and the live-update proof compares them. The CPU's CR3 register
of a PV vCPU is only the guest's view of `kernel_ma` (Xen emulates a PV
kernel's CR3 read as its guest_table): the hypervisor writes it whenever
`kernel_ma` changes and never reads it back.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class BasePointers:
    kernel_ma: int = 0  # the L4 the vCPU translates through; 0 before it is started
    user_ma: int = 0  # NEW_USER_BASEPTR's L4; 0 for none (machine frame 0 is never a guest's)

    def referenced(self) -> list[int]:
        """The L4 mfns these roots hold a type reference on (a started vCPU's)."""
        return [ma >> 12 for ma in (self.kernel_ma, self.user_ma) if ma]
