"""Address kinds and page geometry.

Distinct address spaces get distinct types so that a guest-virtual address can
never be passed where a machine address is expected without a visible cast.
"""

from typing import NewType

GVA = NewType("GVA", int)  # guest virtual address
GPA = NewType("GPA", int)  # guest physical address (HVM)
PFN = NewType("PFN", int)  # guest physical frame number
MA = NewType("MA", int)  # machine (host physical) address
MFN = NewType("MFN", int)  # machine frame number

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
ENTRIES_PER_TABLE = 512

