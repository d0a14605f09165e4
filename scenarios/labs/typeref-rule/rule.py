"""Lab typeref-rule: the rule for a writable mapping (read README.md first).

hvlab calls `writable_mapping(typing, mfn)` whenever a guest's page-table
entry maps machine frame `mfn` writable: an L1 entry with _PAGE_RW, met while
a page table is validated (pinning it, or making it a CR3) or written by
mmu_update. The frame is the guest's own and its general reference is taken.

Return 0 to allow the mapping, or a negative errno to refuse it (refusing
refuses the whole request; hvlab undoes what it did). `typing` is hvlab's
`PageTyping` (hypervisor/mm/typerefs.py): `typing.get_page_type(mfn, type)`
takes a type reference (0, or -errno if the frame has another type in use),
and `typing.frames` is the frame table (`page_type(mfn)`, `type_count(mfn)`).
"""

from hypervisor.mm.builds import PageType  # noqa: F401 - you will need it
from hypervisor.mm.errors import EBUSY  # noqa: F401 - you will need it


def writable_mapping(typing, mfn):
    # TODO: a frame mapped writable must hold a writable type reference, and a
    # frame that is a page table in use must never be mapped writable.
    return 0
