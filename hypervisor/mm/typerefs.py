"""Reference implementation of Xen's PV page typing ("typerefs").

Plain Python, written to be read side by side with xen/arch/x86/mm.c: methods
carry the names of the Xen functions they model (get_page_type, put_page_type,
get_page_from_l1e..l4e, promote_lN_table / demote_lN_table (alloc_/free_ in
older Xen), the linear page-table rules, mod_lN_entry) and follow their order of
checks and their error codes. `hypervisor.mm.bulk` must produce exactly the frame
table this module produces; `hypervisor.mm.check` recomputes it independently.

The rules, in short (docs/design.md §3):

- a frame's type may change only while its type count is 0; a change clears
  PGT_validated; a count > 0 of another type refuses the request (-EINVAL);
- the first reference of a page-table type validates the page: every present
  entry takes its references (L1: general ref + PGT_writable if RW; L2 -> PGT_l1;
  L3 -> PGT_l2; L4 -> PGT_l3), recursively for targets whose count goes 0 -> 1;
- entries may only use allowed flags; L4 slots 256-271 are the hypervisor's;
- linear (same-level) entries must be read-only, point at an already validated
  table, and may not chain (linear_pt_count);
- L2 and L3 validation checks for preemption after each entry (L4 through its
  L3s): -ERESTART keeps the progress in nr_validated_ptes / partial_flags and the
  page PGT_partial, and the next get of the same type continues exactly there;
- when a page-table page's type count falls to 0 it is devalidated, dropping
  every entry's references; writable and seg_desc pages keep their type.

Deliberate differences from Xen (the model is single-threaded and must be
checkable byte for byte):

- no cmpxchg loops, page locks or waiting for another CPU's validation;
- a refused operation run through `run_transaction` is undone exactly, so the
  frame table is byte-identical afterwards (Xen leaves a failed page's type at
  PGT_none and defers tearing down a half-validated table to old_guest_table);
- if the failed operation was continuing a preempted validation, the partial
  state the earlier calls left is then torn down at once (Xen: old_guest_table,
  on the next hypercall), so no reference leaks; frames those earlier calls
  retyped keep their new type at count 0, as in Xen;
- devalidation is never preempted (Xen may preempt it and finish it later);
- nr_validated_ptes / partial_flags are zeroed when a (de)validation completes
  (Xen leaves them stale), so a preempted validation ends byte-identical to one
  done in one go;
- page contents are never rewritten (Xen writes its own L4 slots and the guest's
  _PAGE_USER adjustments into validated tables; the model's MMU handles both);
- no I/O memory, grant mappings, cache attributes, 32-bit PV or shadow paging.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from hypervisor.mm.builds import PageType, TypeInfo
from hypervisor.mm.errors import (
    EBUSY,
    EINTR,
    EINVAL,
    EPERM,
    ERESTART,
    MmError,
    TypingInvariantError,
)
from hypervisor.mm.frametable import (
    DOMID_INVALID,
    DOMID_IO,
    PGC_ALLOCATED,
    PGC_COUNT_MASK,
    PTF_PARTIAL_SET,
    FrameTable,
)
from hypervisor.mm.pte import (
    ENTRIES_PER_TABLE,
    FASTPATH_FLAG_WHITELIST,
    INVALID_MFN_IN_PTE,
    L1_DISALLOW_MASK,
    LN_DISALLOW_MASK,
    PTE_ACCESSED,
    PTE_DIRTY,
    PTE_PRESENT,
    PTE_PSE,
    PTE_RW,
    is_guest_l4_slot,
    pte_changed,
    pte_mfn,
)

# Flags of get/put operations (mm.c's PTF_*); PTF_partial_set is in frametable.
PTF_PREEMPTIBLE = 1 << 2
PTF_RETAIN_REF_ON_RESTART = 1 << 4

PreemptCheck = Callable[[], bool]


@dataclass(frozen=True)
class Root:
    """A reference that anchors a page-table tree: a pin, or a (user) CR3."""

    mfn: int
    level: int = 4
    pinned: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.level <= 4:
            raise MmError(f"root {self.mfn:#x}: level {self.level} is not in 1..4")
        if not self.pinned and self.level != 4:
            raise MmError(f"root {self.mfn:#x}: a CR3 reference is to an L4, not an L{self.level}")


@dataclass(frozen=True)
class RootFailure:
    """Root number `index` of a list was refused with `rc`."""

    index: int
    root: Root
    rc: int


class PreemptAfter:
    """A hypercall_preempt_check() that asks to preempt after `checks` checks."""

    def __init__(self, checks: int) -> None:
        self.checks = checks
        self.remaining = checks

    def reset(self) -> None:
        self.remaining = self.checks

    def __call__(self) -> bool:
        if self.remaining <= 0:
            return True
        self.remaining -= 1
        return False


def take_writable_reference(typing: PageTyping, mfn: int) -> int:
    """A writable mapping holds a PGT_writable_page type reference on its frame, refused
    (-EBUSY, Xen's could_not_pin) while the frame has another type: page tables are never
    writable by the guest."""
    return -EBUSY if typing.get_page_type(mfn, PageType.WRITABLE) != 0 else 0


class PageTyping:
    """Xen's typing rules over one FrameTable and the host memory it describes.

    `mem` is the 1-D uint64 view of host memory. `preempt_check` plays
    hypercall_preempt_check() during preemptible validation (None: never).
    `on_type_change(mfn)` is called when a frame changes type at count 0, where
    Xen flushes the TLBs that may still map the frame under its old type.
    `writable_mapping(typing, mfn)` replaces `take_writable_reference` (a lab's seam).
    """

    def __init__(
        self,
        frames: FrameTable,
        mem: np.ndarray,
        *,
        preempt_check: PreemptCheck | None = None,
        on_type_change: Callable[[int], None] | None = None,
        writable_mapping: Callable[[PageTyping, int], int] | None = None,
    ) -> None:
        self.frames = frames
        # the rule for a writable mapping: Xen's, or a lab's (hypervisor/core/seams.py)
        self.writable_mapping = writable_mapping or take_writable_reference
        self.mem = frames.check_mem(mem).reshape(-1)
        self.layout = frames.layout
        self.preempt_check = preempt_check
        self.on_type_change = on_type_change
        self._journal: list[tuple[np.ndarray, int, int]] | None = None
        self._abandoned: list[int] = []

    # ------------------------------------------------------------------
    # Frame-table access (journaled so that a refusal can be undone)
    # ------------------------------------------------------------------

    def _set(self, array: np.ndarray, mfn: int, value: int) -> None:
        if self._journal is not None:
            self._journal.append((array, mfn, array[mfn].item()))
        if array is self.frames.type_info and self.frames.type_log is not None:
            self.frames.type_log.add(mfn)
        array[mfn] = value

    def _info(self, mfn: int) -> TypeInfo:
        return self.layout.decode(int(self.frames.type_info[mfn]))

    def _set_info(self, mfn: int, info: TypeInfo) -> None:
        self._set(self.frames.type_info, mfn, self.layout.encode_info(info))

    def _mfn_valid(self, mfn: int) -> bool:
        return 0 <= mfn < self.frames.nr_frames

    def _owner(self, mfn: int) -> int:
        return int(self.frames.owner[mfn])

    def _entries(self, mfn: int) -> list[int]:
        base = mfn * ENTRIES_PER_TABLE
        return self.mem[base : base + ENTRIES_PER_TABLE].tolist()

    def _preempt(self) -> bool:
        return self.preempt_check is not None and self.preempt_check()

    # ------------------------------------------------------------------
    # Transactions
    # ------------------------------------------------------------------

    def run_transaction(self, op: Callable[[], int]) -> int:
        """Run one guest-visible operation; undo it exactly if it is refused.

        `op` returns 0, -ERESTART (kept: its partial state is the continuation)
        or another negative errno (undone; then any preempted validation that
        `op` tried and failed to continue is torn down, see the module doc).
        """
        if self._journal is not None:
            raise MmError("typing transactions do not nest")
        self._journal = []
        self._abandoned = []
        try:
            rc = op()
        except BaseException:
            self._rollback()
            raise
        if rc < 0 and rc != -ERESTART:
            self._rollback()
            for mfn in reversed(self._abandoned):
                if self._info(mfn).partial:
                    self._put_page_type(mfn, PTF_PARTIAL_SET, None)
        self._journal = None
        self._abandoned = []
        return rc

    def _rollback(self) -> None:
        journal, self._journal = self._journal, None
        for array, mfn, old in reversed(journal or []):
            array[mfn] = old

    # ------------------------------------------------------------------
    # General references (count_info)
    # ------------------------------------------------------------------

    def page_get_owner_and_reference(self, mfn: int) -> int | None:
        """Take a general reference; the owner, or None if the frame is not allocated."""
        ci = int(self.frames.count_info[mfn])
        # Count 0: not allocated. Count -1/-2: would wrap (-2 is get_page_light's).
        if ((ci + 2) & PGC_COUNT_MASK) <= 2:
            return None
        self._set(self.frames.count_info, mfn, ci + 1)
        return self._owner(mfn)

    def get_page(self, mfn: int, domid: int) -> bool:
        if not self._mfn_valid(mfn):
            return False
        owner = self.page_get_owner_and_reference(mfn)
        if owner == domid:
            return True
        if owner is not None:
            self.put_page(mfn)
        return False

    get_page_from_mfn = get_page

    def get_page_light(self, mfn: int) -> None:
        ci = int(self.frames.count_info[mfn])
        if not ci & PGC_COUNT_MASK:
            raise TypingInvariantError(f"get_page_light on unallocated mfn {mfn:#x}")
        self._set(self.frames.count_info, mfn, ci + 1)

    def put_page(self, mfn: int) -> None:
        ci = int(self.frames.count_info[mfn])
        if not ci & PGC_COUNT_MASK:
            raise TypingInvariantError(f"put_page on mfn {mfn:#x} with no references")
        ci -= 1
        self._set(self.frames.count_info, mfn, ci)
        if not ci & PGC_COUNT_MASK:
            # Last reference gone: the frame goes back to the heap
            # (cleanup_page_mappings + free_domheap_page).
            self._set(self.frames.type_info, mfn, 0)
            self._set(self.frames.count_info, mfn, ci & ~PGC_ALLOCATED)
            self._set(self.frames.owner, mfn, DOMID_INVALID)

    # ------------------------------------------------------------------
    # Linear page tables (define_get_linear_pagetable)
    # ------------------------------------------------------------------

    def _inc_linear_entries(self, pg: int) -> bool:
        nc = int(self.frames.linear_pt_count[pg]) + 1
        if nc <= 0 or nc > np.iinfo(np.int16).max:  # in use as a linear table, or overflow
            return False
        self._set(self.frames.linear_pt_count, pg, nc)
        return True

    def _dec_linear_entries(self, pg: int) -> None:
        oc = int(self.frames.linear_pt_count[pg])
        if oc <= 0:
            raise TypingInvariantError(f"mfn {pg:#x}: no linear entries to drop")
        self._set(self.frames.linear_pt_count, pg, oc - 1)

    def _inc_linear_uses(self, pg: int) -> bool:
        nc = int(self.frames.linear_pt_count[pg]) - 1
        if nc >= 0 or nc < np.iinfo(np.int16).min:  # has linear entries itself, or overflow
            return False
        self._set(self.frames.linear_pt_count, pg, nc)
        return True

    def _dec_linear_uses(self, pg: int) -> None:
        oc = int(self.frames.linear_pt_count[pg])
        if oc >= 0:
            raise TypingInvariantError(f"mfn {pg:#x}: no linear uses to drop")
        self._set(self.frames.linear_pt_count, pg, oc + 1)

    def get_linear_pagetable(self, level: int, pde: int, pde_mfn: int, domid: int) -> bool:
        """get_l{2,3,4}_linear_pagetable: accept `pde` (in table `pde_mfn`) as a linear entry."""
        if pde & PTE_RW:
            return False  # write access to one's own page tables
        mfn = pte_mfn(pde)
        if mfn == pde_mfn:
            return True  # self-map: no references, which also lets a table map itself
        if self._owner(pde_mfn) != domid:
            return False
        if not self.get_page_from_mfn(mfn, domid):
            return False
        if not self._inc_linear_entries(pde_mfn):
            self.put_page(mfn)
            return False
        if not self._inc_linear_uses(mfn):
            self._dec_linear_entries(pde_mfn)
            self.put_page(mfn)
            return False
        x = self._info(mfn)
        if x.count == self.layout.count_mask or x.type != PageType(level) or not x.validated:
            self._dec_linear_uses(mfn)
            self._dec_linear_entries(pde_mfn)
            self.put_page(mfn)
            return False
        self._set_info(mfn, replace(x, count=x.count + 1))
        return True

    # ------------------------------------------------------------------
    # get_page_from_lNe / put_page_from_lNe
    # ------------------------------------------------------------------

    def get_page_from_l1e(self, l1e: int, domid: int) -> int:
        """References for one present L1 entry of `domid`: 0 or -errno."""
        mfn = pte_mfn(l1e)
        if l1e & L1_DISALLOW_MASK:
            return -EINVAL
        real_owner = None
        if self._mfn_valid(mfn):
            real_owner = self.page_get_owner_and_reference(mfn)
        if not self._mfn_valid(mfn) or real_owner == DOMID_IO:
            # I/O memory: the model's domains have no iomem capabilities.
            if self._mfn_valid(mfn):
                self.put_page(mfn)
            return -EINVAL if mfn == INVALID_MFN_IN_PTE else -EPERM
        if real_owner != domid:
            if real_owner is not None:
                self.put_page(mfn)
            return -EBUSY  # could_not_pin: free or foreign frame
        if l1e & PTE_RW and (rc := self.writable_mapping(self, mfn)) != 0:
            self.put_page(mfn)
            return rc
        return 0

    def put_page_from_l1e(self, l1e: int, domid: int) -> None:
        mfn = pte_mfn(l1e)
        if not l1e & PTE_PRESENT or self._is_iomem_page(mfn):
            return
        if l1e & PTE_RW:
            self.put_page_and_type(mfn)
        else:
            self.put_page(mfn)

    def _is_iomem_page(self, mfn: int) -> bool:
        return not self._mfn_valid(mfn) or self._owner(mfn) == DOMID_IO

    def get_page_and_type_from_mfn(self, mfn: int, type: PageType, domid: int,
                                   flags: int = 0) -> int:
        """A general and a type reference (the general one kept per Xen's rules)."""
        partial_set = bool(flags & PTF_PARTIAL_SET)
        if not partial_set and not self.get_page_from_mfn(mfn, domid):
            return -EINVAL
        rc = self._get_page_type(mfn, type, bool(flags & PTF_PREEMPTIBLE))
        if rc == 0 or partial_set:
            pass
        elif flags & PTF_RETAIN_REF_ON_RESTART and rc == -ERESTART:
            pass  # the parent's partial_flags now own this general reference
        else:
            self.put_page(mfn)
        return rc

    def get_page_from_l2e(self, l2e: int, l2mfn: int, domid: int, flags: int = 0) -> int:
        if l2e & LN_DISALLOW_MASK:
            return -EINVAL
        rc = self.get_page_and_type_from_mfn(pte_mfn(l2e), PageType.L1, domid, flags)
        if rc == -EINVAL and self.get_linear_pagetable(2, l2e, l2mfn, domid):
            rc = 0
        return rc

    def get_page_from_l3e(self, l3e: int, l3mfn: int, domid: int, flags: int = 0) -> int:
        if l3e & LN_DISALLOW_MASK:
            return -EINVAL
        rc = self.get_page_and_type_from_mfn(pte_mfn(l3e), PageType.L2, domid,
                                             flags | PTF_PREEMPTIBLE)
        if rc == -EINVAL and self.get_linear_pagetable(3, l3e, l3mfn, domid):
            rc = 0
        return rc

    def get_page_from_l4e(self, l4e: int, l4mfn: int, domid: int, flags: int = 0) -> int:
        if l4e & LN_DISALLOW_MASK:
            return -EINVAL
        rc = self.get_page_and_type_from_mfn(pte_mfn(l4e), PageType.L3, domid,
                                             flags | PTF_PREEMPTIBLE)
        if rc == -EINVAL and self.get_linear_pagetable(4, l4e, l4mfn, domid):
            rc = 0
        return rc

    def _put_pt_page(self, pg: int, ptpg: int, flags: int) -> int:
        rc = self._put_page_type(pg, flags, ptpg)
        if rc == 0:
            self.put_page(pg)
        return rc

    def _put_page_from_lne(self, entry: int, table: int, flags: int) -> int:
        """put_page_from_l{2,3,4}e: 1 if the entry held nothing, else put_pt_page's rc."""
        mfn = pte_mfn(entry)
        if not entry & PTE_PRESENT or mfn == table:
            return 1  # not present, or a self-map (which took no references)
        if entry & PTE_PSE:
            raise TypingInvariantError(f"superpage entry in validated table {table:#x}")
        return self._put_pt_page(mfn, table, flags)

    def put_page_from_l2e(self, l2e: int, l2mfn: int, flags: int = 0) -> int:
        return self._put_page_from_lne(l2e, l2mfn, flags)

    def put_page_from_l3e(self, l3e: int, l3mfn: int, flags: int = 0) -> int:
        return self._put_page_from_lne(l3e, l3mfn, flags)

    def put_page_from_l4e(self, l4e: int, l4mfn: int, flags: int = 0) -> int:
        return self._put_page_from_lne(l4e, l4mfn, flags)

    # ------------------------------------------------------------------
    # promote_lN_table (validation)
    # ------------------------------------------------------------------

    def promote_l1_table(self, page: int) -> int:
        domid = self._owner(page)
        entries = self._entries(page)
        for i, l1e in enumerate(entries):
            if not l1e & PTE_PRESENT:
                continue
            rc = self.get_page_from_l1e(l1e, domid)
            if rc:
                for j in range(i - 1, -1, -1):
                    self.put_page_from_l1e(entries[j], domid)
                return rc
        return 0

    def promote_l2_table(self, page: int) -> int:
        domid = self._owner(page)
        entries = self._entries(page)
        start = int(self.frames.nr_validated_ptes[page])
        first_flags = int(self.frames.partial_flags[page])
        rc = 0
        for i in range(start, ENTRIES_PER_TABLE):
            partial_flags = first_flags if i == start else 0
            l2e = entries[i]
            if i > start and self._preempt():
                rc = -EINTR
            elif not l2e & PTE_PRESENT:
                continue
            else:
                rc = self.get_page_from_l2e(l2e, page, domid, partial_flags)
            if rc == -EINTR and i:
                self._set(self.frames.nr_validated_ptes, page, i)
                self._set(self.frames.partial_flags, page, partial_flags)
                rc = -ERESTART
            if rc < 0:
                break
        return rc

    def promote_l3_table(self, page: int) -> int:
        domid = self._owner(page)
        entries = self._entries(page)
        start = int(self.frames.nr_validated_ptes[page])
        first_flags = int(self.frames.partial_flags[page])
        rc = 0
        for i in range(start, ENTRIES_PER_TABLE):
            partial_flags = first_flags if i == start else 0
            l3e = entries[i]
            if i > start and self._preempt():
                rc = -EINTR
            elif not l3e & PTE_PRESENT:
                continue
            else:
                rc = self.get_page_from_l3e(l3e, page, domid,
                                            partial_flags | PTF_RETAIN_REF_ON_RESTART)
            if rc == -ERESTART:
                # The L2 at slot i is partially validated; our entry owns its refs.
                self._set(self.frames.nr_validated_ptes, page, i)
                self._set(self.frames.partial_flags, page, PTF_PARTIAL_SET)
            elif rc == -EINTR and i:
                self._set(self.frames.nr_validated_ptes, page, i)
                self._set(self.frames.partial_flags, page, partial_flags)
                rc = -ERESTART
            if rc < 0:
                break
        return rc

    def promote_l4_table(self, page: int) -> int:
        domid = self._owner(page)
        entries = self._entries(page)
        start = int(self.frames.nr_validated_ptes[page])
        first_flags = int(self.frames.partial_flags[page])
        rc = 0
        for i in range(start, ENTRIES_PER_TABLE):
            partial_flags = first_flags if i == start else 0
            if not is_guest_l4_slot(i):
                continue
            l4e = entries[i]
            if not l4e & PTE_PRESENT:
                continue
            rc = self.get_page_from_l4e(l4e, page, domid,
                                        partial_flags | PTF_RETAIN_REF_ON_RESTART)
            if rc == -ERESTART:
                self._set(self.frames.nr_validated_ptes, page, i)
                self._set(self.frames.partial_flags, page, PTF_PARTIAL_SET)
            elif rc == -EINTR and i:
                self._set(self.frames.nr_validated_ptes, page, i)
                self._set(self.frames.partial_flags, page, partial_flags)
                rc = -ERESTART
            if rc < 0:
                break
        return rc

    alloc_l1_table = promote_l1_table
    alloc_l2_table = promote_l2_table
    alloc_l3_table = promote_l3_table
    alloc_l4_table = promote_l4_table

    # ------------------------------------------------------------------
    # demote_lN_table (devalidation; never preempted in the model)
    # ------------------------------------------------------------------

    def demote_l1_table(self, page: int) -> int:
        domid = self._owner(page)
        for l1e in self._entries(page):
            self.put_page_from_l1e(l1e, domid)
        return 0

    def _demote_lN_table(self, page: int, level: int) -> int:
        """demote_l{2,3,4}_table: put entries nr_validated_ptes-1 .. 0 (or from the
        partially validated one at nr_validated_ptes)."""
        entries = self._entries(page)
        partial_flags = int(self.frames.partial_flags[page])
        i = int(self.frames.nr_validated_ptes[page]) - (0 if partial_flags & PTF_PARTIAL_SET else 1)
        while i >= 0:
            if level != 4 or is_guest_l4_slot(i):
                rc = self._put_page_from_lne(entries[i], page, partial_flags)
                if rc < 0:
                    raise TypingInvariantError(f"devalidation of {page:#x} failed with {rc}")
            partial_flags = 0
            i -= 1
        return 0

    def demote_l2_table(self, page: int) -> int:
        return self._demote_lN_table(page, 2)

    def demote_l3_table(self, page: int) -> int:
        return self._demote_lN_table(page, 3)

    def demote_l4_table(self, page: int) -> int:
        return self._demote_lN_table(page, 4)

    free_l1_table = demote_l1_table
    free_l2_table = demote_l2_table
    free_l3_table = demote_l3_table
    free_l4_table = demote_l4_table

    # ------------------------------------------------------------------
    # validate_page / devalidate_page
    # ------------------------------------------------------------------

    def validate_page(self, page: int, type: PageType, preemptible: bool) -> int:
        if type == PageType.L1:
            rc = self.promote_l1_table(page)
        elif type == PageType.L2:
            rc = self.promote_l2_table(page)
        elif type == PageType.L3:
            rc = self.promote_l3_table(page)
        elif type == PageType.L4:
            rc = self.promote_l4_table(page)
        else:
            # Descriptor-table pages would be checked here (validate_segdesc_page);
            # the model does not type them through get_page_type.
            raise MmError(f"cannot validate mfn {page:#x} as {type.name}")
        x = self._info(page)
        if rc == 0:
            self._set_info(page, replace(x, validated=True))
            self._clear_progress(page)
        elif rc == -EINTR:
            self._set_info(page, replace(x, count=0))
        elif rc == -ERESTART:
            # PGT_partial owns the type reference and this extra general one.
            self.get_page_light(page)
            self._set_info(page, replace(x, partial=True))
        else:
            self._set(self.frames.type_info, page, 0)
        return rc

    def devalidate_page(self, page: int, x: TypeInfo) -> int:
        if not x.partial:
            self._set(self.frames.nr_validated_ptes, page, ENTRIES_PER_TABLE)
            self._set(self.frames.partial_flags, page, 0)
        if x.type == PageType.L1:
            return self.demote_l1_table(page)
        if x.type == PageType.L2:
            return self.demote_l2_table(page)
        if x.type == PageType.L3:
            return self.demote_l3_table(page)
        if x.type == PageType.L4:
            return self.demote_l4_table(page)
        raise TypingInvariantError(f"devalidate_page of {x.type.name} mfn {page:#x}")

    # ------------------------------------------------------------------
    # get_page_type / put_page_type
    # ------------------------------------------------------------------

    def _get_page_type(self, page: int, type: PageType, preemptible: bool) -> int:
        x = self._info(page)
        if x.count + 1 > self.layout.count_mask:
            return -EINVAL  # type count overflow
        if x.count == 0:
            if x.type.is_page_table and x.validated:
                raise TypingInvariantError(f"mfn {page:#x}: {x.type.name} validated at count 0")
            nx = replace(x, count=1)
            if x.type != type:
                if self.on_type_change is not None:
                    self.on_type_change(page)
                # A new type starts unvalidated; data types need no validation.
                nx = replace(nx, type=type,
                             validated=type in (PageType.WRITABLE, PageType.SHARED))
        elif x.type != type:
            return -EINVAL
        elif not x.validated:
            if not x.partial:
                raise TypingInvariantError(f"mfn {page:#x} is being validated by nobody")
            # Take over a preempted validation: the type reference PGT_partial
            # held becomes ours, so the count does not change.
            nx = replace(x, partial=False)
        else:
            nx = replace(x, count=x.count + 1)
        self._set_info(page, nx)

        rc = 0
        if not nx.validated:
            if not x.partial:
                self._set(self.frames.nr_validated_ptes, page, 0)
                self._set(self.frames.partial_flags, page, 0)
                self._set(self.frames.linear_pt_count, page, 0)
            rc = self.validate_page(page, type, preemptible)
            if x.partial and rc not in (0, -ERESTART):
                self._abandoned.append(page)
        if x.partial and not nx.partial:
            self.put_page(page)  # the general reference PGT_partial held
        return rc

    def get_page_type(self, page: int, type: PageType) -> int:
        """Non-preemptible get: 0 or -errno."""
        rc = self._get_page_type(page, type, False)
        if rc in (-EINTR, -ERESTART):
            raise TypingInvariantError("non-preemptible get_page_type was preempted")
        return rc

    def get_page_type_preemptible(self, page: int, type: PageType) -> int:
        return self._get_page_type(page, type, True)

    def _put_final_page_type(self, page: int, x: TypeInfo, ptpg: int | None) -> int:
        rc = self.devalidate_page(page, x)
        if ptpg is not None and x.validated and self._info(ptpg).type == x.type:
            # Dropping a linear reference: adjust both tables' linear counts.
            self._dec_linear_uses(page)
            self._dec_linear_entries(ptpg)
        cur = self._info(page)
        self._set_info(page, replace(cur, count=cur.count - 1))
        self._clear_progress(page)
        return rc

    def _clear_progress(self, page: int) -> None:
        # Only meaningful while PGT_partial is set (Xen leaves stale values, which
        # share storage with the TLB-flush timestamp): the model zeroes them once a
        # (de)validation completes, so a preempted validation ends byte-identical
        # to one done in one go.
        self._set(self.frames.nr_validated_ptes, page, 0)
        self._set(self.frames.partial_flags, page, 0)

    def _put_page_type(self, page: int, flags: int, ptpg: int | None) -> int:
        x = self._info(page)
        if not flags & PTF_PARTIAL_SET:
            if x.partial or not x.validated:
                raise TypingInvariantError(f"put_page_type of unvalidated mfn {page:#x}")
        elif not x.partial:
            return 0  # someone else finished the validation we held a partial ref to
        elif x.count != 1:
            raise TypingInvariantError(f"partial mfn {page:#x} has type count {x.count}")
        if x.count == 0:
            raise TypingInvariantError(f"put_page_type of mfn {page:#x} with type count 0")

        if x.count == 1 and x.type.is_page_table and (x.validated or x.partial):
            # Page-table pages are devalidated when their count reaches zero.
            self._set_info(page, replace(x, validated=False, partial=False))
            rc = self._put_final_page_type(page, x, ptpg)
            if x.partial:
                self.put_page(page)
            return rc

        self._set_info(page, replace(x, count=x.count - 1))
        if ptpg is not None and self._info(ptpg).type == x.type:
            self._dec_linear_uses(page)
            self._dec_linear_entries(ptpg)
        return 0

    def put_page_type(self, page: int) -> None:
        rc = self._put_page_type(page, 0, None)
        if rc:
            raise TypingInvariantError(f"put_page_type of mfn {page:#x} returned {rc}")

    def put_page_and_type(self, page: int) -> None:
        self.put_page_type(page)
        self.put_page(page)

    # ------------------------------------------------------------------
    # mod_lN_entry: one page-table update (do_mmu_update's per-entry work)
    # ------------------------------------------------------------------

    def _write_entry(self, index: int, old: int, new: int, preserve_ad: bool) -> None:
        if preserve_ad:
            new |= old & (PTE_ACCESSED | PTE_DIRTY)
        self.mem[index] = new

    def mod_l1_entry(self, table: int, slot: int, nl1e: int, domid: int,
                     preserve_ad: bool = False) -> int:
        index = table * ENTRIES_PER_TABLE + slot
        ol1e = int(self.mem[index])
        if nl1e & PTE_PRESENT:
            if nl1e & L1_DISALLOW_MASK:
                return -EINVAL
            if not pte_changed(ol1e, nl1e, FASTPATH_FLAG_WHITELIST):
                self._write_entry(index, ol1e, nl1e, preserve_ad)
                return 0
            rc = self.get_page_from_l1e(nl1e, domid)
            if rc:
                return rc
        self._write_entry(index, ol1e, nl1e, preserve_ad)
        self.put_page_from_l1e(ol1e, domid)
        return 0

    def _mod_lN_entry(self, level: int, table: int, slot: int, nle: int, domid: int,
                      preserve_ad: bool) -> int:
        if level == 4 and not is_guest_l4_slot(slot):
            return -EINVAL  # the hypervisor's own L4 slots
        index = table * ENTRIES_PER_TABLE + slot
        ole = int(self.mem[index])
        if nle & PTE_PRESENT:
            if nle & LN_DISALLOW_MASK:
                return -EINVAL
            if not pte_changed(ole, nle, FASTPATH_FLAG_WHITELIST):
                self._write_entry(index, ole, nle, preserve_ad)
                return 0
            get = {2: self.get_page_from_l2e, 3: self.get_page_from_l3e,
                   4: self.get_page_from_l4e}[level]
            rc = get(nle, table, domid, 0)
            if rc < 0:
                return rc
        self._write_entry(index, ole, nle, preserve_ad)
        self._put_page_from_lne(ole, table, 0)
        return 0

    def mod_l2_entry(self, table: int, slot: int, nl2e: int, domid: int,
                     preserve_ad: bool = False) -> int:
        return self._mod_lN_entry(2, table, slot, nl2e, domid, preserve_ad)

    def mod_l3_entry(self, table: int, slot: int, nl3e: int, domid: int,
                     preserve_ad: bool = False) -> int:
        return self._mod_lN_entry(3, table, slot, nl3e, domid, preserve_ad)

    def mod_l4_entry(self, table: int, slot: int, nl4e: int, domid: int,
                     preserve_ad: bool = False) -> int:
        return self._mod_lN_entry(4, table, slot, nl4e, domid, preserve_ad)

    # ------------------------------------------------------------------
    # Guest-visible operations (each one transaction)
    # ------------------------------------------------------------------

    def pin_table(self, mfn: int, level: int, domid: int) -> int:
        """MMUEXT_PIN_Ln_TABLE: 0, -ERESTART (call again to continue) or -errno."""
        type = PageType.for_level(level)

        def op() -> int:
            if not self.get_page(mfn, domid):
                return -EINVAL
            rc = self.get_page_type_preemptible(mfn, type)
            if rc:
                self.put_page(mfn)
                return -ERESTART if rc == -EINTR else rc
            x = self._info(mfn)
            if x.pinned:
                self.put_page_and_type(mfn)  # pins do not nest
                return -EINVAL
            self._set_info(mfn, replace(x, pinned=True))
            return 0

        return self.run_transaction(op)

    def unpin_table(self, mfn: int, domid: int) -> int:
        """MMUEXT_UNPIN_TABLE: drop the pin's type and general references."""

        def op() -> int:
            if not self.get_page(mfn, domid):
                return -EINVAL
            x = self._info(mfn)
            if not x.pinned:
                self.put_page(mfn)
                return -EINVAL
            self._set_info(mfn, replace(x, pinned=False))
            self.put_page_and_type(mfn)
            self.put_page(mfn)
            return 0

        return self.run_transaction(op)

    def get_root_ref(self, mfn: int, domid: int) -> int:
        """A CR3 reference (new_guest_cr3's get): 0, -ERESTART or -errno."""

        def op() -> int:
            rc = self.get_page_and_type_from_mfn(mfn, PageType.L4, domid, PTF_PREEMPTIBLE)
            return -ERESTART if rc == -EINTR else rc

        return self.run_transaction(op)

    def put_root_ref(self, mfn: int) -> None:
        """Drop a CR3 reference."""

        def op() -> int:
            self.put_page_and_type(mfn)
            return 0

        self.run_transaction(op)

    def apply_roots(self, roots: Sequence[Root], domid: int) -> list[RootFailure]:
        """Pin / CR3-reference every root in order, continuing preempted ones.

        Refused roots are left out (the frame table is as if they were not
        there) and reported; this is what `bulk.bulk_validate` must reproduce.
        """
        failures: list[RootFailure] = []
        for index, root in enumerate(roots):
            while True:
                if root.pinned:
                    rc = self.pin_table(root.mfn, root.level, domid)
                else:
                    rc = self.get_root_ref(root.mfn, domid)
                if rc != -ERESTART:
                    break
                if isinstance(self.preempt_check, PreemptAfter):
                    self.preempt_check.reset()
            if rc:
                failures.append(RootFailure(index, root, rc))
        return failures
