"""The translation policy of a CPL-3 PV vCPU: the active root and Xen's own mappings.

Kernel and user mode walk different roots (guest_table, guest_table_user).
Every entry of a 64-bit PV guest carries USER (Xen adjusts them), so the
walk ignores U/S: isolation comes from the user root not mapping the kernel.
Xen's reserved range (L4 slots 256-271) shows the guest two things:

- the read-only M2P at RO_MPT_VIRT_START (Linux reads mfn_to_pfn from it,
  with a fault fixup past its end);
- the GDT at GDT_VA: pages 0-13 are the guest's frames (set_gdt), page 14
  is Xen's, holding the flat ring-3 selectors.
"""

from __future__ import annotations

from emulator.engine import PERM_R, PERM_W, PERM_X
from emulator.memory import HostMemory
from emulator.paging import Translation, WalkFault, fill_direct, walk_direct
from hypervisor.pv.mmu import HYPERVISOR_END, HYPERVISOR_START, PvMmu

RO_MPT_VIRT_START = 0xFFFF_8000_0000_0000
GDT_VA = 0xFFFF_8200_0000_0000  # Xen's per-domain area
GDT_PAGES = 16
XEN_GDT_PAGE = 14  # entries 7168.. (selector 0xe000 on) are Xen's
GDT_LIMIT = GDT_PAGES * 4096 - 1


class XenAbiMmu(PvMmu):
    def __init__(self, memory: HostMemory, xen_gdt_ma: int, m2p_mas: tuple[int, ...]) -> None:
        super().__init__(memory, xen_gdt_ma)
        self.m2p_mas = m2p_mas  # machine addresses of the read-only M2P's pages
        self.user_mode = False
        self.guest_gdt: tuple[int, ...] = ()  # mfns of set_gdt's frames
        self._u64 = memoryview(memory.u64)  # type: ignore[arg-type]  # Python ints, fast

    def translate(self, gva: int, access: str) -> tuple[int, int] | None:
        if HYPERVISOR_START <= gva < HYPERVISOR_END:
            self.fills += 1
            ma = self._xen_page(gva) if access == "read" else None
            if ma is None:
                self.last_fault = WalkFault(gva, 1 | (2 if access == "write" else 0)
                                            | (16 if access == "fetch" else 0), 4)
                return None
            return ma, PERM_R
        if self.pending_typing is not None:  # a lazy live update: PvMmu's guarded walk
            return super().translate(gva, access)
        self.fills += 1
        result = fill_direct(self._u64, self.active_root, gva, access)
        if isinstance(result, WalkFault):
            self.last_fault = result
            return None
        ma, writable, executable, dirty = result  # as PvMmu's perms: W once dirty
        return ma, PERM_R | (PERM_W if writable and dirty else 0) | (PERM_X if executable else 0)

    def _xen_page(self, gva: int) -> int | None:
        page = (gva - RO_MPT_VIRT_START) >> 12
        if 0 <= page < len(self.m2p_mas):
            return self.m2p_mas[page]
        page = (gva - GDT_VA) >> 12
        if page == XEN_GDT_PAGE:
            return self.gdt_ma
        if 0 <= page < len(self.guest_gdt):
            return self.guest_gdt[page] << 12
        return None

    @property
    def active_root(self) -> int:
        return self.roots.user_ma if self.user_mode else self.roots.kernel_ma

    def lookup(self, gva: int, access: str) -> Translation | WalkFault:
        if self.pending_typing is not None:  # a lazy live update: what the walk uses first
            self.pending_typing.validate_walk(self.memory.u64, self.active_root, gva)
        return walk_direct(self._u64, self.active_root, gva, access)
