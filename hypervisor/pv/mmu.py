"""Translation policies the hypervisor gives the physical CPUs' TLB-fill hook.

`PvMmu` is the one-stage PV walk: the guest's page tables hold machine frame
numbers and the walk starts at the base pointer the *hypervisor* holds for
the vCPU (`BasePointers.kernel_ma`: set by NEW_BASEPTR, the builder or a
restore), never the CPU's CR3 register, which a CPL-0 guest could load with
anything. The hypervisor's own range (L4
slots 256-271) is never walked through guest tables: it maps only the
hypervisor's read-only GDT page.
"""

from __future__ import annotations

from typing import Protocol

from emulator.engine import PERM_R, PERM_W, PERM_X
from emulator.memory import HostMemory
from emulator.paging import Translation, WalkFault, walk
from hypervisor.pv.base_pointers import BasePointers


class LazyTyping(Protocol):
    def may_map_writable(self, mfn: int) -> bool: ...

    def validate_walk(self, mem_u64, base_ma: int, gva: int) -> None: ...

    def finish(self) -> None: ...

HYPERVISOR_START = 0xFFFF_8000_0000_0000  # L4 slot 256
HYPERVISOR_END = 0xFFFF_8800_0000_0000  # end of slot 271
GDT_VA = HYPERVISOR_START


class PvMmu:
    def __init__(self, memory: HostMemory, gdt_ma: int) -> None:
        self.memory = memory
        self.gdt_ma = gdt_ma
        self.roots = BasePointers()  # the vCPU's page-table roots (Vcpu.roots)
        self.last_fault: WalkFault | None = None
        self.fills = 0
        # During a lazy live update: validates the tables a walk goes through and
        # forbids writable mappings of any page table, validated yet or not.
        self.lazy: LazyTyping | None = None

    def translate(self, gva: int, access: str) -> tuple[int, int] | None:
        self.fills += 1
        if HYPERVISOR_START <= gva < HYPERVISOR_END:
            if gva >> 12 == GDT_VA >> 12 and access == "read":
                return self.gdt_ma, PERM_R
            self.last_fault = WalkFault(gva, 1 | (2 if access == "write" else 0), 4)
            return None
        result = self.lookup(gva, access)
        if isinstance(result, WalkFault):
            self.last_fault = result
            return None
        perms = _perms(result)
        if self.lazy is not None and not self.lazy.may_map_writable(result.ma >> 12):
            perms &= ~PERM_W
        return result.ma, perms

    def lookup(self, gva: int, access: str) -> Translation | WalkFault:
        """A walk for the hypervisor's own guest accesses (copy to/from guest)."""
        if self.lazy is not None:
            self.lazy.validate_walk(self.memory.u64, self.roots.kernel_ma, gva)
        return walk(self.memory.u64, self.roots.kernel_ma, gva, access)


def _perms(t: Translation) -> int:
    perms = PERM_R
    if t.writable and t.dirty:
        perms |= PERM_W
    if t.executable:
        perms |= PERM_X
    return perms
