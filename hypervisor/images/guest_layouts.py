"""Page-table layouts added to a booted PV domain, for generated images.

A layout writes new page tables into the domain's free frames (the pfns after
the builder's start-of-day region, which the workload kernel never touches)
and then makes them live through the typing rules, so the frame table is
exactly what a guest issuing the same pins and updates would have:

* ``linux-like``: a direct map of all guest RAM with 4 KiB pages at
  0xffff888000000000 (L4 slot 273, as Linux), data read-write and every
  page-table frame read-only, hooked into the running L4 (the kernel's
  init_mm); plus a few processes whose pinned L4s share the kernel's L3s and
  map some user pages (one of them twice). The shape of
  `hypervisor.mm.layouts.build_linux_like`, laid over a live domain.
* ``dense``: every pfn mapped once, from virtual address 0, in the fewest
  tables that can do it (full L1s), under one pinned L4.
* ``sparse``: a few scattered mappings (one per 4096 pages, at least 64) at
  random addresses across the guest half of the address space: nearly one
  L1, L2 and L3 per mapping, under one pinned L4.
* ``aliased``: a small pool of data frames mapped again and again (one L1
  entry per 8 pages of RAM), the L3 shared by two slots of the L4 and by a
  second pinned L4: large type counts from few frames.

Everything is vectorised: L1 entries are written in chunks of a million, and
the new trees are validated by `mm.bulk.bulk_validate`, so a 64 GiB direct
map (16.8 M entries) takes seconds. The rng is the only source of choice, so
the same seed gives the same tables.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from hypervisor.lib.errors import HvlabError
from hypervisor.mm.builds import PageType
from hypervisor.mm.bulk import bulk_validate
from hypervisor.mm.errors import errno_name
from hypervisor.mm.pte import (
    ENTRIES_PER_TABLE,
    PTE_ACCESSED,
    PTE_DIRTY,
    PTE_GLOBAL,
    PTE_NX,
    PTE_PRESENT,
    PTE_RW,
    PTE_USER,
    XEN_L4_FIRST_SLOT,
    XEN_L4_LAST_SLOT,
)
from hypervisor.mm.typerefs import Root

LAYOUTS = ("linux-like", "dense", "sparse", "aliased")

LINUX_DIRECT_MAP_L4_SLOT = 273  # 0xffff888000000000
TABLE_FLAGS = PTE_PRESENT | PTE_RW | PTE_ACCESSED | PTE_DIRTY
USER_TABLE_FLAGS = TABLE_FLAGS | PTE_USER
KERNEL_DATA_FLAGS = PTE_PRESENT | PTE_RW | PTE_ACCESSED | PTE_DIRTY | PTE_GLOBAL | PTE_NX
KERNEL_RO_FLAGS = PTE_PRESENT | PTE_ACCESSED | PTE_GLOBAL | PTE_NX
USER_DATA_FLAGS = PTE_PRESENT | PTE_RW | PTE_USER | PTE_ACCESSED | PTE_DIRTY | PTE_NX
USER_RO_FLAGS = PTE_PRESENT | PTE_USER | PTE_ACCESSED | PTE_NX

NR_PROCESSES = 4
USER_PAGES_PER_PROCESS = 2 * ENTRIES_PER_TABLE - 16
ALIAS_POOL = 64  # data frames the aliased layout maps over and over
_CHUNK = 1 << 20  # L1 entries written per step
_VPN_BITS = 36  # 48-bit virtual addresses, 4 KiB pages
_GUEST_L4_SLOTS = np.array([s for s in range(ENTRIES_PER_TABLE)
                            if not XEN_L4_FIRST_SLOT <= s <= XEN_L4_LAST_SLOT])

EntryFn = Callable[[np.ndarray, int, int], np.ndarray]  # (vpns, start, stop) -> PTEs


class LayoutError(HvlabError):
    """A layout cannot be laid over this domain (too small, or refused by the rules)."""


@dataclass
class AddedTables:
    """What a layout added: new table frames per level, pins, L1 entries written."""

    tables: dict[int, int] = field(default_factory=lambda: {1: 0, 2: 0, 3: 0, 4: 0})
    pins: int = 0
    l1_entries: int = 0

    def count(self, table_pfns: dict[int, np.ndarray]) -> None:
        for level, pfns in table_pfns.items():
            self.tables[level] += int(pfns.size)


@dataclass
class _Tree:
    """A 4-level tree over sorted virtual page numbers: the table keys of each level."""

    vpns: np.ndarray  # sorted, unique (48-bit VA >> 12)
    keys: dict[int, np.ndarray]  # level 1..3 -> sorted unique (vpn >> 9*level)

    @classmethod
    def over(cls, vpns: np.ndarray) -> _Tree:
        keys = {level: _sorted_unique(vpns >> np.int64(9 * level)) for level in (1, 2, 3)}
        return cls(vpns, keys)

    @property
    def tables_needed(self) -> dict[int, int]:
        return {level: int(k.size) for level, k in self.keys.items()}


def _sorted_unique(sorted_values: np.ndarray) -> np.ndarray:
    keep = np.ones(sorted_values.size, dtype=bool)
    keep[1:] = sorted_values[1:] != sorted_values[:-1]
    return sorted_values[keep]


def _ptes(mfns: np.ndarray, flags: np.ndarray | int) -> np.ndarray:
    return (mfns.astype(np.uint64) << np.uint64(12)) | np.asarray(flags, dtype=np.uint64)


class Builder:
    """Lays page tables over one booted PV domain of a scratch hypervisor."""

    def __init__(self, hv, dom, first_free_pfn: int, seed: int) -> None:
        self.hv = hv
        self.dom = dom
        self.p2m = dom.p2m.astype(np.int64)
        self.nr_pages = int(self.p2m.size)
        self.mem2d = hv.memory.u64.reshape(-1, ENTRIES_PER_TABLE)
        self.rng = np.random.default_rng(seed)
        self.first_free = first_free_pfn
        # Every frame that is (or will be) a page table: mapped read-only.
        ft = hv.frame_table
        types = ft.types(self.p2m)
        self.is_table = (types >= PageType.L1) & (types <= PageType.L4) & (
            ft.type_counts(self.p2m) > 0)
        self.used = np.zeros(self.nr_pages, dtype=bool)  # free pfns taken by this layout
        self.added = AddedTables()

    # ----------------------------------------------------------------- frames

    def take(self, count: int, *, table: bool) -> np.ndarray:
        """`count` distinct free pfns, at random (deterministic from the seed)."""
        free_total = self.nr_pages - self.first_free
        if count > free_total - int(self.used.sum()):
            raise LayoutError(f"the domain's {free_total} free pages cannot hold {count} more "
                              "pages for this layout: give it more memory")
        picked = np.empty(0, dtype=np.int64)
        while picked.size < count:
            want = count - picked.size
            draw = self.rng.integers(self.first_free, self.nr_pages, size=want + want // 8 + 16)
            draw = draw[~self.used[draw]]
            _, first = np.unique(draw, return_index=True)
            draw = draw[np.sort(first)][:want]
            self.used[draw] = True
            picked = np.concatenate([picked, draw])
        if table:
            self.is_table[picked] = True
        return picked

    # ----------------------------------------------------------------- trees

    def tree_tables(self, tree: _Tree) -> dict[int, np.ndarray]:
        """Table pfns for every L1..L3 table `tree` needs (marked as tables)."""
        need = tree.tables_needed
        pfns = self.take(sum(need.values()), table=True)
        out, pos = {}, 0
        for level in (1, 2, 3):
            out[level] = pfns[pos : pos + need[level]]
            pos += need[level]
        self.added.count(out)
        return out

    def write_tree(self, tree: _Tree, tables: dict[int, np.ndarray], l4_row: np.ndarray,
                   entries: EntryFn, upper_flags: int) -> None:
        """Write the tables of `tree` (L1 entries from `entries`) and fill `l4_row`."""
        mem2d = self.mem2d
        l1_mfns = self.p2m[tables[1]]
        for start in range(0, tree.vpns.size, _CHUNK):
            v = tree.vpns[start : start + _CHUNK]
            table = np.searchsorted(tree.keys[1], v >> np.int64(9))
            mem2d[l1_mfns[table], v & np.int64(511)] = entries(v, start, start + v.size)
        self.added.l1_entries += int(tree.vpns.size)
        for level in (2, 3):
            child_keys = tree.keys[level - 1]
            parent = np.searchsorted(tree.keys[level], child_keys >> np.int64(9))
            mem2d[self.p2m[tables[level]][parent], child_keys & np.int64(511)] = _ptes(
                self.p2m[tables[level - 1]], upper_flags)
        l3_keys = tree.keys[3]
        l4_row[l3_keys & np.int64(511)] = _ptes(self.p2m[tables[3]], upper_flags)

    # ----------------------------------------------------------------- typing

    def validate(self, roots: list[Root], what: str) -> None:
        """Pin / reference `roots` (MFNs) through the vectorised validator: all must pass."""
        result = bulk_validate(self.hv.memory.u64, self.hv.frame_table, self.dom.domid, roots)
        if result.failures:
            f = result.failures[0]
            pfn = int(self.hv.m2p[f.root.mfn])
            raise LayoutError(f"{what}: the L{f.root.level} table at pfn {pfn:#x} was refused "
                              f"({errno_name(f.rc)}); the layout is inconsistent")
        self.added.pins += sum(r.pinned for r in roots)

    def transaction(self, op: Callable[[], int], what: str) -> None:
        """Run a bare typing operation (mod_lN_entry) as one guest-visible transaction."""
        self.check(self.hv.typing.run_transaction(op), what)

    def check(self, rc: int, what: str) -> None:
        if rc:
            raise LayoutError(f"{what}: refused ({errno_name(rc)})")

    def reserve_l4(self) -> int:
        """A free pfn for a new L4 (reserved before any mapping is written)."""
        self.added.tables[4] += 1
        return int(self.take(1, table=True)[0])

    def pin_l4(self, pfn: int, row: np.ndarray) -> None:
        """Write `row` into the L4 at `pfn` and pin it (validating everything below)."""
        row = row.copy()
        row[XEN_L4_FIRST_SLOT : XEN_L4_LAST_SLOT + 1] = 0
        self.mem2d[self.p2m[pfn]] = row
        self.validate([Root(int(self.p2m[pfn]), 4)], f"pin of the new L4 at pfn {pfn:#x}")


# --------------------------------------------------------------------------- the layouts


def _boot_l4_mfn(hv, dom) -> int:
    return dom.vcpus[0].roots.kernel_ma >> 12


def linux_like(b: Builder) -> None:
    n = b.nr_pages
    base = np.int64(LINUX_DIRECT_MAP_L4_SLOT) << np.int64(27)
    tree = _Tree.over(base + np.arange(n, dtype=np.int64))
    if tree.keys[3].size > ENTRIES_PER_TABLE - LINUX_DIRECT_MAP_L4_SLOT - 1:
        raise LayoutError(f"{n} pages do not fit the direct-map L4 slots")
    tables = b.tree_tables(tree)
    # Reserve the processes' tables now, so the direct map maps them read-only.
    process_tables = [b.take(6, table=True) for _ in range(NR_PROCESSES)]
    is_table = b.is_table

    def direct_map(v: np.ndarray, start: int, stop: int) -> np.ndarray:
        pfn = v - base
        flags = np.where(is_table[pfn], KERNEL_RO_FLAGS, KERNEL_DATA_FLAGS)
        return _ptes(b.p2m[pfn], flags)

    staging = np.zeros(ENTRIES_PER_TABLE, dtype=np.uint64)
    b.write_tree(tree, tables, staging, direct_map, TABLE_FLAGS)
    # Hook the direct map into the running kernel's L4 (init_mm), as the guest
    # would: validate each L3 under a temporary pin, make the L4 entry with
    # mod_l4_entry (a type reference on a validated L3 costs nothing), unpin.
    l3_mfns = b.p2m[tables[3]]
    b.validate([Root(int(m), 3) for m in l3_mfns], "the direct map")
    b.added.pins -= len(l3_mfns)
    l4 = _boot_l4_mfn(b.hv, b.dom)
    typing = b.hv.typing
    for slot in np.flatnonzero(staging).tolist():
        hook = functools.partial(typing.mod_l4_entry, l4, slot, int(staging[slot]), b.dom.domid)
        b.transaction(hook, f"hooking the direct map into L4 slot {slot}")
    for m in l3_mfns.tolist():
        b.check(typing.unpin_table(m, b.dom.domid), "unpinning a direct-map L3")

    kernel_row = b.mem2d[l4].copy()
    # Up to two L1s of user pages each, fewer in a small guest.
    per_process = min(USER_PAGES_PER_PROCESS, (b.nr_pages - b.first_free) // (4 * NR_PROCESSES))
    for pt in process_tables:
        p_l4, u_l4, u_l3, u_l2 = (int(x) for x in pt[:4])
        u_l1 = pt[4:]
        b.added.count({4: pt[:2], 3: pt[2:3], 2: pt[3:4], 1: u_l1})
        pages = b.take(per_process, table=False)
        pages[1] = pages[0]  # one page mapped twice
        flags = np.where(b.rng.random(pages.size) < 0.8, USER_DATA_FLAGS, USER_RO_FLAGS)
        user = np.zeros(2 * ENTRIES_PER_TABLE, dtype=np.uint64)
        user[: pages.size] = _ptes(b.p2m[pages], flags)
        b.mem2d[b.p2m[u_l1]] = user.reshape(2, ENTRIES_PER_TABLE)
        b.added.l1_entries += pages.size
        row = np.zeros(ENTRIES_PER_TABLE, dtype=np.uint64)
        row[:2] = _ptes(b.p2m[u_l1], USER_TABLE_FLAGS)
        b.mem2d[b.p2m[u_l2]] = row
        row = np.zeros(ENTRIES_PER_TABLE, dtype=np.uint64)
        row[0] = _ptes(b.p2m[u_l2], USER_TABLE_FLAGS)
        b.mem2d[b.p2m[u_l3]] = row
        user_l4 = np.zeros(ENTRIES_PER_TABLE, dtype=np.uint64)
        user_l4[0] = _ptes(b.p2m[u_l3], USER_TABLE_FLAGS)
        process_l4 = kernel_row.copy()  # shares the kernel's L3s
        process_l4[0] = user_l4[0]
        b.mem2d[b.p2m[p_l4]] = process_l4
        b.mem2d[b.p2m[u_l4]] = user_l4
        b.validate([Root(int(b.p2m[p_l4]), 4), Root(int(b.p2m[u_l4]), 4)],
                   f"process L4s at pfns {p_l4:#x} and {u_l4:#x}")


def dense(b: Builder) -> None:
    tree = _Tree.over(np.arange(b.nr_pages, dtype=np.int64))
    tables = b.tree_tables(tree)
    l4 = b.reserve_l4()
    is_table = b.is_table

    def identity(v: np.ndarray, start: int, stop: int) -> np.ndarray:
        flags = np.where(is_table[v], USER_RO_FLAGS, USER_DATA_FLAGS)
        return _ptes(b.p2m[v], flags)

    row = np.zeros(ENTRIES_PER_TABLE, dtype=np.uint64)
    b.write_tree(tree, tables, row, identity, USER_TABLE_FLAGS)
    b.pin_l4(l4, row)


def sparse(b: Builder) -> None:
    count = max(64, b.nr_pages // 4096)
    slots = b.rng.choice(_GUEST_L4_SLOTS, size=count).astype(np.int64)
    low = b.rng.integers(0, 1 << 27, size=count, dtype=np.int64)
    vpns = np.unique((slots << np.int64(27)) | low)
    tree = _Tree.over(vpns)
    tables = b.tree_tables(tree)
    pages = b.take(vpns.size, table=False)
    flags = np.where(b.rng.random(vpns.size) < 0.7, USER_DATA_FLAGS, USER_RO_FLAGS)
    ptes = _ptes(b.p2m[pages], flags)
    row = np.zeros(ENTRIES_PER_TABLE, dtype=np.uint64)
    b.write_tree(tree, tables, row, lambda v, start, stop: ptes[start:stop], USER_TABLE_FLAGS)
    b.pin_l4(b.reserve_l4(), row)


def aliased(b: Builder) -> None:
    nr_l1 = max(1, b.nr_pages // 8 // ENTRIES_PER_TABLE)
    tree = _Tree.over(np.arange(nr_l1 * ENTRIES_PER_TABLE, dtype=np.int64))
    tables = b.tree_tables(tree)
    pool = b.take(ALIAS_POOL, table=False)
    pool_ptes = _ptes(b.p2m[pool], np.where(np.arange(ALIAS_POOL) % 2 == 0, USER_DATA_FLAGS,
                                            USER_RO_FLAGS))
    order = b.rng.permutation(ALIAS_POOL)

    def pooled(v: np.ndarray, start: int, stop: int) -> np.ndarray:
        return pool_ptes[order[v % ALIAS_POOL]]

    row = np.zeros(ENTRIES_PER_TABLE, dtype=np.uint64)
    b.write_tree(tree, tables, row, pooled, USER_TABLE_FLAGS)
    used = np.flatnonzero(row)
    if used.size == 1:  # the same L3 again, in the next slot
        row[used[0] + 1] = row[used[0]]
    b.pin_l4(b.reserve_l4(), row)
    second = np.zeros(ENTRIES_PER_TABLE, dtype=np.uint64)
    second[0] = row[used[0]]
    b.pin_l4(b.reserve_l4(), second)


BUILDERS: dict[str, Callable[[Builder], None]] = {
    "linux-like": linux_like,
    "dense": dense,
    "sparse": sparse,
    "aliased": aliased,
}
