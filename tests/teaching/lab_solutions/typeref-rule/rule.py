"""Reference solution of lab typeref-rule (the tests grade it: full marks)."""

from hypervisor.mm.builds import PageType
from hypervisor.mm.errors import EBUSY


def writable_mapping(typing, mfn):
    # a writable mapping holds a writable type reference; a page table in use refuses it
    return -EBUSY if typing.get_page_type(mfn, PageType.WRITABLE) != 0 else 0
