"""Translation policies the hypervisor gives the physical CPUs' TLB-fill hook.

`PvMmu` is the one-stage PV walk: the guest's page tables hold machine frame
numbers and the walk starts at the base pointer the *hypervisor* holds for
the vCPU (`BasePointers`: set by NEW_BASEPTR / NEW_USER_BASEPTR, the builder
or a restore; `active_root` picks the kernel's or the user's), never the CPU's
CR3 register. The hypervisor's own range (L4 slots 256-271) is never walked
through guest tables: `pv/xen/mmu.py` shows Xen's pages there (its GDT page,
the read-only M2P), and nothing else maps.

TLB fills take a scalar fast path (`_fill`): plain-int word reads, and the
upper three levels of a walk cached per 2 MiB of address space for the
current root, like a CPU's paging-structure caches. The cache holds only
walks that succeeded and is forgotten whenever the TLB is (`flush`: every
hypervisor TLB flush, and after every page-table hypercall of the domain,
whether or not the guest asks for a flush) and when the root changes. Only
the hypervisor writes a PV guest's page tables (they are never writable to
the guest), so nothing else can make a cached entry stale. When a lab plugs
its own writable-mapping rule, that may no longer hold and the hypervisor
turns the cache off (`cache_walks`). During a lazy live update every fill
takes the full walk, which validates as it goes.
"""

from __future__ import annotations

from typing import Protocol

from emulator.engine import PERM_R, PERM_W, PERM_X
from emulator.memory import HostMemory
from emulator.paging import (
    ACCESSED,
    ADDR_MASK,
    DIRTY,
    NX,
    PF_FETCH,
    PF_PRESENT,
    PF_RSVD,
    PF_WRITE,
    PRESENT,
    PSE,
    RW,
    Translation,
    WalkFault,
    canonical,
    walk,
)
from hypervisor.pv.base_pointers import BasePointers


class PendingTyping(Protocol):
    """A domain's type state still being rebuilt (a lazy live update): a walk validates
    the tables it goes through first, and no page table is mapped writable."""

    def may_map_writable(self, mfn: int) -> bool: ...

    def validate_walk(self, mem_u64, base_ma: int, gva: int) -> None: ...

    def finish(self) -> None: ...

HYPERVISOR_START = 0xFFFF_8000_0000_0000  # L4 slot 256
HYPERVISOR_END = 0xFFFF_8800_0000_0000  # end of slot 271


class PvMmu:
    def __init__(self, memory: HostMemory, gdt_ma: int, cache_walks: bool = True) -> None:
        self.memory = memory
        self.gdt_ma = gdt_ma  # Xen's GDT page (pv/xen/mmu.py maps it)
        self.roots = BasePointers()  # the vCPU's page-table roots (Vcpu.roots)
        self.last_fault: WalkFault | None = None
        self.fills = 0
        # while the domain's type state is rebuilt after a live update (lazy): validates
        # the tables a walk goes through, never maps a page table writable
        self.pending_typing: PendingTyping | None = None
        self._words = memory.words
        # Paging-structure cache: gva >> 21 -> (L1 table's machine address,
        # writable, executable so far), for walks from `_cached_root`.
        self._upper: dict[int, tuple[int, bool, bool]] = {}
        self._cached_root = -1
        self.cache_walks = cache_walks

    def flush(self) -> None:
        """Forget cached upper levels (the TLB was flushed, or page tables changed)."""
        self._upper.clear()

    def translate(self, gva: int, access: str) -> tuple[int, int] | None:
        self.fills += 1
        if HYPERVISOR_START <= gva < HYPERVISOR_END:  # Xen's pages: pv/xen/mmu.py
            self.last_fault = WalkFault(gva, 1 | (2 if access == "write" else 0), 4)
            return None
        if self.pending_typing is None:
            return self._fill(gva, access)
        result = self.lookup(gva, access)
        if isinstance(result, WalkFault):
            self.last_fault = result
            return None
        perms = _perms(result)
        pending = self.pending_typing
        if pending is not None and not pending.may_map_writable(result.ma >> 12):
            perms &= ~PERM_W
        return result.ma, perms

    def lookup(self, gva: int, access: str) -> Translation | WalkFault:
        """A walk for the hypervisor's own guest accesses (copy to/from guest)."""
        if self.pending_typing is not None:
            self.pending_typing.validate_walk(self.memory.u64, self.roots.kernel_ma, gva)
        return walk(self.memory.u64, self.roots.kernel_ma, gva, access)


    @property
    def active_root(self) -> int:
        """The root fills walk from (a CPL-3 vCPU's user mode has another)."""
        return self.roots.kernel_ma

    def _fill(self, gva: int, access: str) -> tuple[int, int] | None:
        """`walk` for a TLB fill, same result and A/D updates, in plain ints."""
        root = self.active_root
        if root != self._cached_root or not self.cache_walks:
            self._upper.clear()
            self._cached_root = root
        upper = self._upper.get(gva >> 21)
        write = access == "write"
        fetch = access == "fetch"
        if upper is None:
            found = self._walk_upper(root, gva, write, fetch)
            if isinstance(found, WalkFault):
                self.last_fault = found
                return None
            upper = self._upper[gva >> 21] = found
        l1_ma, writable, executable = upper
        words = self._words
        index = (l1_ma >> 3) + ((gva >> 12) & 0x1FF)
        pte = words[index]
        if not pte & PRESENT:
            self.last_fault = WalkFault(gva, _code(False, write, fetch), 1)
            return None
        writable = writable and pte & RW != 0
        executable = executable and not pte & NX
        if not pte & ACCESSED:
            pte |= ACCESSED
            words[index] = pte
        if (write and not writable) or (fetch and not executable):
            self.last_fault = WalkFault(gva, _code(True, write, fetch), 1)
            return None
        if write and not pte & DIRTY:
            pte |= DIRTY
            words[index] = pte
        perms = PERM_R
        if writable and pte & DIRTY:
            perms |= PERM_W
        if executable:
            perms |= PERM_X
        return pte & ADDR_MASK, perms

    def _walk_upper(self, root: int, gva: int, write: bool, fetch: bool
                    ) -> tuple[int, bool, bool] | WalkFault:
        """L4 to L2 of `walk`: the L1 table's address and the rights so far."""
        if not canonical(gva):
            return WalkFault(gva, 0, 4)
        words = self._words
        table = root
        writable = executable = True
        for level, shift in ((4, 39), (3, 30), (2, 21)):
            index = (table >> 3) + ((gva >> shift) & 0x1FF)
            entry = words[index]
            if not entry & PRESENT:
                return WalkFault(gva, _code(False, write, fetch), level)
            writable = writable and entry & RW != 0
            executable = executable and not entry & NX
            if level != 4 and entry & PSE:  # 4 KiB pages only (see paging.walk)
                return WalkFault(gva, _code(True, write, fetch) | PF_RSVD, level)
            if not entry & ACCESSED:
                words[index] = entry | ACCESSED
            table = entry & ADDR_MASK
        return table, writable, executable


def _code(present: bool, write: bool, fetch: bool) -> int:
    return (PF_PRESENT if present else 0) | (PF_WRITE if write else 0) | (PF_FETCH if fetch else 0)


def _perms(t: Translation) -> int:
    perms = PERM_R
    if t.writable and t.dirty:
        perms |= PERM_W
    if t.executable:
        perms |= PERM_X
    return perms
