"""Two-stage translation for HVM vCPUs: the guest's page tables in guest-physical space, then EPT.

The TLB-fill hook asks `translate(gva, access)`. The walk starts at the guest's CR3 (the
CPU's CR3 register, read through a callable the hypervisor gives), which is a
guest-physical address; the L4 itself, every further table and the final page are
translated through the domain's EPT (`EptTables.walk`, reading the real entries in host
memory). The guest walk is `emulator.paging.walk` with a `table_to_ma` that does that
EPT step, so Accessed and Dirty bits land in the guest's own entries as hardware sets them.

Rules, as on Intel hardware with EPT A/D flags enabled (what Xen turns on for PML):
- a guest paging-structure access needs EPT read *and* write permission (A/D updates
  count as writes), so write-protecting a page-table page for log-dirty catches them;
- the final page needs EPT permission for the access itself (read R, write W, fetch X);
- the permissions given to the TLB are the guest's AND EPT's: write only once the
  guest's D bit is set and EPT allows it, execute where both allow it.

A refused fill records why in `last_fault`: a `WalkFault` (a guest #PF, CR2 and error
code) or an `EptViolation` (guest-physical address, access, whether the walker was
reading a guest table, and the p2m type found there) for the exit handler.

The LAPIC page (GPA 0xFEE00000) is not in EPT. The first access to it is an EPT
violation; the hypervisor then sets `lapic_mapped` (as Xen maps the APIC-access page)
and from then on fills map it to the physical CPU's MMIO window (`lapic_ma`), readable
and writable, never executable.

Hypervisor-side accesses (hypercall buffers, the IDT and stack during injection) use
`lookup`, which only ever yields RAM and, given a `resolve` callback, lets the
hypervisor serve populate-on-demand and log-dirty violations on the guest's behalf.

Translations of guest-physical frames are cached per MMU and forgotten whenever the
EPT's `generation` changes. That is the model's EPT TLB; the engine's own TLB is flushed
by the hypervisor when EPT took rights away (`needs_flush`).

TLB fills (`translate`) take a scalar fast path: the same two-stage walk as `_walk`
(which the hypervisor's own accesses use), written out in plain ints over the host
memory's words with no per-level calls. Guest page-table walks are not cached: an HVM
guest writes its tables directly and flushes with a native `mov cr3` or `invlpg` that
the model does not see, so every fill reads all four guest levels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from emulator.addr import GPA
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
from hypervisor.hvm.builder import LAPIC_GPA
from hypervisor.hvm.ept import PERM_R as EPT_R
from hypervisor.hvm.ept import PERM_W as EPT_W
from hypervisor.hvm.ept import PERM_X as EPT_X
from hypervisor.hvm.ept import EptTables, P2mType
from hypervisor.hvm.physmap import GuestPhysmap

LAPIC_GFN = LAPIC_GPA >> 12
_NEEDED = {"read": EPT_R, "write": EPT_W, "fetch": EPT_X}
_TABLE_NEEDS = EPT_R | EPT_W
_UNMAPPED = (0, 0, None)  # (mfn, EPT perms, p2m type) of a gfn nothing maps


@dataclass(frozen=True)
class EptViolation:
    """Why EPT refused an access: what the hypervisor needs to handle the exit."""

    gpa: int  # guest-physical byte address (a table entry's, or the page's at the offset)
    access: str  # read | write | fetch: what the guest needed at gpa
    gva: int  # the guest-virtual address being translated
    p2m_type: int | None  # the p2m type at gpa; None where nothing is mapped
    paging_structure: bool  # True: the walker was reading a guest page-table entry

    @property
    def gfn(self) -> int:
        return self.gpa >> 12

    @property
    def lapic(self) -> bool:
        return self.gfn == LAPIC_GFN

    def describe(self) -> str:
        if self.lapic:
            what = "the LAPIC page"
        elif self.p2m_type is None:
            what = "nothing mapped there"
        else:
            what = f"p2m type {P2mType(self.p2m_type).name.lower()}"
        table = ", guest page-table access" if self.paging_structure else ""
        return f"GPA {self.gpa:#x} ({self.access}, {what}{table})"


Resolve = Callable[[EptViolation], bool]


class HvmMmu:
    """The two-stage translation of one HVM vCPU (see the module docstring)."""

    def __init__(self, memory: HostMemory, physmap: GuestPhysmap, cr3: Callable[[], int],
                 lapic_ma: int, resolve: Resolve | None = None) -> None:
        self.memory = memory
        self.physmap = physmap
        self.cr3 = cr3
        self.lapic_ma = lapic_ma
        self.resolve = resolve
        self.lapic_mapped = False
        self.last_fault: WalkFault | EptViolation | None = None
        self.fills = 0
        self._u64 = memory.u64
        self._words = memory.words
        self._cache: dict[int, tuple[int, int, int | None]] = {}
        self._cached_ept: EptTables | None = None
        self._cached_generation = -1
        self._flushed: tuple[int, int] = (-1, -1)

    # ------------------------------------------------------------------ TLB fills
    def translate(self, gva: int, access: str) -> tuple[int, int] | None:
        self.fills += 1
        result = self._fill(gva, access)
        if not isinstance(result, tuple):
            self.last_fault = result
            return None
        return result

    def _fill(self, gva: int, access: str) -> tuple[int, int] | WalkFault | EptViolation:
        """`_walk` and the TLB's permissions, in plain ints (same result, same A/D writes)."""
        ept = self.physmap.p2m.ept
        assert ept is not None
        cache = self._cache
        if ept is not self._cached_ept or ept.generation != self._cached_generation:
            cache.clear()
            self._cached_ept = ept
            self._cached_generation = ept.generation
        words = self._words
        write = access == "write"
        fetch = access == "fetch"
        cr3 = self.cr3() & ADDR_MASK
        gfn = cr3 >> 12
        hit = cache.get(gfn) or self._ept_miss(ept, gfn)
        if hit[1] & _TABLE_NEEDS != _TABLE_NEEDS:
            return _table_violation(cr3 + 8 * ((gva >> 39) & 511), gva, hit[1], hit[2])
        if not canonical(gva):
            return WalkFault(gva, 0, 4)
        table_ma = hit[0] << 12
        writable = executable = True
        for level, shift in ((4, 39), (3, 30), (2, 21)):
            index = (table_ma >> 3) + ((gva >> shift) & 0x1FF)
            entry = words[index]
            if not entry & PRESENT:
                return WalkFault(gva, _code(False, write, fetch), level)
            writable = writable and entry & RW != 0
            executable = executable and not entry & NX
            if level != 4 and entry & PSE:  # 4 KiB pages only (see paging.walk)
                return WalkFault(gva, _code(True, write, fetch) | PF_RSVD, level)
            if not entry & ACCESSED:
                entry |= ACCESSED
                words[index] = entry
            table_gpa = entry & ADDR_MASK
            gfn = table_gpa >> 12
            hit = cache.get(gfn) or self._ept_miss(ept, gfn)
            if hit[1] & _TABLE_NEEDS != _TABLE_NEEDS:
                entry_gpa = table_gpa + 8 * ((gva >> (shift - 9)) & 0x1FF)
                return _table_violation(entry_gpa, gva, hit[1], hit[2])
            table_ma = hit[0] << 12
        index = (table_ma >> 3) + ((gva >> 12) & 0x1FF)
        pte = words[index]
        if not pte & PRESENT:
            return WalkFault(gva, _code(False, write, fetch), 1)
        writable = writable and pte & RW != 0
        executable = executable and not pte & NX
        if not pte & ACCESSED:
            pte |= ACCESSED
            words[index] = pte
        page_gpa = pte & ADDR_MASK
        gfn = page_gpa >> 12
        if gfn == LAPIC_GFN:
            if fetch or not self.lapic_mapped:
                return EptViolation(page_gpa | (gva & 0xFFF), access, gva, None, False)
            ept_perms = EPT_R | EPT_W
            ma = self.lapic_ma
        else:
            mfn, ept_perms, ptype = cache.get(gfn) or self._ept_miss(ept, gfn)
            if not ept_perms & _NEEDED[access] or not ept_perms & EPT_R:
                return EptViolation(page_gpa | (gva & 0xFFF), access, gva, ptype, False)
            ma = mfn << 12
        if (write and not writable) or (fetch and not executable):
            return WalkFault(gva, _code(True, write, fetch), 1)
        if write and not pte & DIRTY:
            pte |= DIRTY
            words[index] = pte
        perms = PERM_R
        if writable and pte & DIRTY and ept_perms & EPT_W:
            perms |= PERM_W
        if executable and ept_perms & EPT_X and ma != self.lapic_ma:
            perms |= PERM_X
        return ma, perms

    def _ept_miss(self, ept: EptTables, gfn: int) -> tuple[int, int, int | None]:
        w = ept.walk(GPA(gfn << 12))
        hit = _UNMAPPED if w is None else (int(w.mfn), int(w.perms), int(w.p2m_type))
        self._cache[gfn] = hit
        return hit

    # --------------------------------------------------- the hypervisor's accesses
    def lookup(self, gva: int, access: str) -> Translation | WalkFault:
        """Translate for a hypervisor-side access: RAM only, fixable violations served."""
        for _ in range(4):
            result = self._walk(gva, access)
            if isinstance(result, tuple):
                if result[2]:
                    break  # the LAPIC page is not memory the hypervisor reads or writes
                return result[0]
            if isinstance(result, WalkFault):
                return result
            if result.lapic or self.resolve is None or not self.resolve(result):
                break
        return WalkFault(gva, 0, 1)

    def peek(self, gva: int, size: int) -> bytes | None:
        """Read guest RAM without side effects on the P2M (None if not plain RAM)."""
        out = bytearray()
        while size > 0:
            chunk = min(size, 0x1000 - (gva & 0xFFF))
            result = self._walk(gva & ~0xFFF, "read")
            if not isinstance(result, tuple) or result[2]:
                return None
            ma = result[0].ma + (gva & 0xFFF)
            out += self.memory.read(ma, chunk)
            gva += chunk
            size -= chunk
        return bytes(out)

    def needs_flush(self) -> bool:
        """Whether EPT took rights away (or was replaced) since the last call said so.

        Then TLB entries filled before may allow what EPT no longer does. Changes that
        only add rights (populating a PoD page, a log-dirty write fault) need no flush:
        a refused fill leaves nothing in the TLB.
        """
        now = (self.physmap.restrictions, id(self.physmap.ept))
        if now != self._flushed:
            self._flushed = now
            return True
        return False

    # --------------------------------------------------------------------- walking
    def _ept_lookup(self) -> Callable[[int], tuple[int, int, int | None]]:
        """gfn -> (mfn, EPT perms, p2m type) through the per-MMU cache, valid for one walk."""
        ept = self.physmap.p2m.ept
        assert ept is not None
        cache = self._cache
        if ept is not self._cached_ept or ept.generation != self._cached_generation:
            cache.clear()
            self._cached_ept = ept
            self._cached_generation = ept.generation

        def lookup(gfn: int) -> tuple[int, int, int | None]:
            hit = cache.get(gfn)
            if hit is None:
                w = ept.walk(GPA(gfn << 12))
                hit = _UNMAPPED if w is None else (int(w.mfn), int(w.perms), int(w.p2m_type))
                cache[gfn] = hit
            return hit

        return lookup

    def _walk(self, gva: int, access: str
              ) -> tuple[Translation, int, bool] | WalkFault | EptViolation:
        ept = self._ept_lookup()
        cr3 = self.cr3() & ADDR_MASK
        mfn, perms, ptype = ept(cr3 >> 12)
        if perms & _TABLE_NEEDS != _TABLE_NEEDS:
            return _table_violation(cr3 + 8 * ((gva >> 39) & 511), gva, perms, ptype)
        violation: list[EptViolation] = []
        final: list[int] = []  # EPT perms of the final page
        level = [4]  # the level whose entry holds the address being translated

        def table_to_ma(gpa: int) -> int | None:
            lv = level[0]
            level[0] = lv - 1
            gfn = gpa >> 12
            if lv > 1:  # gpa is the next table; the walker reads the entry for gva in it
                mfn, perms, ptype = ept(gfn)
                if perms & _TABLE_NEEDS != _TABLE_NEEDS:
                    entry = gpa + 8 * ((gva >> (12 + 9 * (lv - 2))) & 511)
                    violation.append(_table_violation(entry, gva, perms, ptype))
                    return None
                return mfn << 12
            if gfn == LAPIC_GFN:
                if access == "fetch" or not self.lapic_mapped:
                    violation.append(EptViolation(gpa | (gva & 0xFFF), access, gva, None,
                                                  False))
                    return None
                final.append(EPT_R | EPT_W)
                return self.lapic_ma
            mfn, perms, ptype = ept(gfn)
            if not perms & _NEEDED[access] or not perms & EPT_R:
                violation.append(EptViolation(gpa | (gva & 0xFFF), access, gva, ptype, False))
                return None
            final.append(perms)
            return mfn << 12

        result = walk(self._u64, mfn << 12, gva, access, table_to_ma)
        if violation:
            return violation[0]
        if isinstance(result, WalkFault):
            return result
        return result, final[0], result.ma == self.lapic_ma


def _code(present: bool, write: bool, fetch: bool) -> int:
    return (PF_PRESENT if present else 0) | (PF_WRITE if write else 0) | (PF_FETCH if fetch else 0)


def _table_violation(entry_gpa: int, gva: int, perms: int, ptype: int | None) -> EptViolation:
    # A readable but write-protected table: the A/D update is the write that was refused.
    access = "write" if perms & EPT_R else "read"
    return EptViolation(entry_gpa, access, gva, ptype, True)
