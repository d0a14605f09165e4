"""x86-64 page-table entry format and the flags Xen lets a PV guest use.

PV guests' page tables hold machine frame numbers. Xen accepts only a subset of
the flag bits (``base_disallow_mask`` in mm.c): the guest may set P, RW, US, A, D,
the software bits 9-11 and 52-62, and NX. PWT/PCD/PAT are refused too, because the
model's domains have no I/O memory capabilities; GLOBAL is allowed in L1 entries
only, and PSE (superpages) nowhere.
"""

PTE_PRESENT = 1 << 0
PTE_RW = 1 << 1
PTE_USER = 1 << 2
PTE_PWT = 1 << 3
PTE_PCD = 1 << 4
PTE_ACCESSED = 1 << 5
PTE_DIRTY = 1 << 6
PTE_PSE = 1 << 7  # PAT in an L1 entry
PTE_PAT = PTE_PSE
PTE_GLOBAL = 1 << 8
PTE_AVAIL = 0x7 << 9
PTE_AVAIL_HIGH = 0x7FF << 52
PTE_NX = 1 << 63

PTE_ADDR_MASK = ((1 << 52) - 1) & ~0xFFF  # Xen's PADDR_MASK & PAGE_MASK: bits 51-12
MFN_FIELD_BITS = 40
# All-ones MFN field: Xen's INVALID_MFN as it appears in a PTE (refused with -EINVAL,
# any other MFN outside the frame table with -EPERM).
INVALID_MFN_IN_PTE = (1 << MFN_FIELD_BITS) - 1

L1_DISALLOW_MASK = PTE_PWT | PTE_PCD | PTE_PAT
LN_DISALLOW_MASK = PTE_PWT | PTE_PCD | PTE_PSE | PTE_GLOBAL  # L2, L3 and L4 entries

# Flags a guest may change in place without re-validating the entry (mm.c's
# FASTPATH_FLAG_WHITELIST): everything else changes translation or Xen's safety.
FASTPATH_FLAG_WHITELIST = (
    PTE_NX | PTE_AVAIL_HIGH | PTE_AVAIL | PTE_GLOBAL | PTE_DIRTY | PTE_ACCESSED | PTE_USER
)

ENTRIES_PER_TABLE = 512
ENTRY_SHIFT = 9  # log2(ENTRIES_PER_TABLE)

# L4 slots 256-271 map the hypervisor: a guest cannot write them and their
# contents take no references (Xen's ROOT_PAGETABLE_{FIRST,LAST}_XEN_SLOT).
XEN_L4_FIRST_SLOT = 256
XEN_L4_LAST_SLOT = 271


def disallow_mask(level: int) -> int:
    return L1_DISALLOW_MASK if level == 1 else LN_DISALLOW_MASK


def pte_mfn(entry: int) -> int:
    return (entry & PTE_ADDR_MASK) >> 12


def make_pte(mfn: int, flags: int) -> int:
    return ((mfn << 12) & PTE_ADDR_MASK) | flags


def is_guest_l4_slot(slot: int) -> bool:
    return slot < XEN_L4_FIRST_SLOT or slot > XEN_L4_LAST_SLOT


def pte_changed(old: int, new: int, ignored_flags: int) -> bool:
    """Whether two entries differ in their address or in a flag not in `ignored_flags`."""
    return bool((old ^ new) & ~ignored_flags & ((1 << 64) - 1))
