"""Synthetic PV page-table trees for benchmarks and tests.

`build_linux_like` lays out what a 64-bit Linux PV guest has once it runs: a
direct map of all guest RAM with 4 KiB pages (every data frame mapped
read-write, every page-table frame read-only, as Xen requires of PV guests), a
kernel-image mapping, and a few processes whose L4s share the kernel's L3s. It
is vectorised, so a 64 GiB guest (16.8 M L1 entries) takes seconds.

`build_random_tree` makes small random trees for property tests: shared L1s,
aliased data mappings, linear (same-level) entries and, on request, hostile
entries (bad flags, foreign frames, writable mappings of page tables, tables
used at two levels) that the typing rules must refuse.

Both are deterministic from their seed and only write page-table frames; data
frames are never touched, so memory from `anonymous_memory` stays cheap.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass, field

import numpy as np

from hypervisor.mm.errors import FrameTableError
from hypervisor.mm.frametable import DOMID_INVALID, FrameTable
from hypervisor.mm.pte import (
    ENTRIES_PER_TABLE,
    PTE_ACCESSED,
    PTE_DIRTY,
    PTE_GLOBAL,
    PTE_NX,
    PTE_PCD,
    PTE_PRESENT,
    PTE_PSE,
    PTE_RW,
    PTE_USER,
    XEN_L4_FIRST_SLOT,
    XEN_L4_LAST_SLOT,
    make_pte,
)
from hypervisor.mm.typerefs import Root

# Linux x86-64 PV: the direct map starts at 0xffff888000000000 (L4 slot 273),
# the kernel image at 0xffffffff80000000 (L4 slot 511, L3 slot 510).
LINUX_DIRECT_MAP_L4_SLOT = 273
LINUX_KERNEL_L4_SLOT = 511
LINUX_KERNEL_L3_SLOT = 510

TABLE_FLAGS = PTE_PRESENT | PTE_RW | PTE_ACCESSED | PTE_DIRTY
KERNEL_DATA_FLAGS = PTE_PRESENT | PTE_RW | PTE_ACCESSED | PTE_DIRTY | PTE_GLOBAL | PTE_NX
KERNEL_RO_FLAGS = PTE_PRESENT | PTE_ACCESSED | PTE_GLOBAL | PTE_NX
USER_DATA_FLAGS = PTE_PRESENT | PTE_RW | PTE_USER | PTE_ACCESSED | PTE_DIRTY | PTE_NX
USER_RO_FLAGS = PTE_PRESENT | PTE_USER | PTE_ACCESSED


@dataclass
class PvTree:
    """What a generator built: the domain's frames, its page tables and its roots."""

    domid: int
    p2m: np.ndarray  # pfn -> mfn of every frame of the domain
    roots: list[Root]  # pins and CR3 references, in the order a restore applies them
    tables: dict[int, np.ndarray] = field(default_factory=dict)  # level -> table mfns

    @property
    def pins(self) -> dict[int, int]:
        return {r.mfn: r.level for r in self.roots if r.pinned}

    @property
    def cr3_refs(self) -> list[int]:
        return [r.mfn for r in self.roots if not r.pinned]

    @property
    def nr_l1_entries(self) -> int:
        return len(self.tables.get(1, ())) * ENTRIES_PER_TABLE


def anonymous_memory(nr_frames: int) -> np.ndarray:
    """Zeroed host memory of `nr_frames` frames as a uint64 view (MAP_NORESERVE:
    only the frames written cost RAM)."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0x4000)
    buf = mmap.mmap(-1, nr_frames * ENTRIES_PER_TABLE * 8, flags=flags)
    return np.frombuffer(buf, dtype=np.uint64)  # the array keeps the mmap alive


def _free_frames(frames: FrameTable, count: int) -> np.ndarray:
    free = np.flatnonzero((frames.owner == DOMID_INVALID) & (frames.count_info == 0))
    free = free[free != 0]  # mfn 0 is never a guest's
    if free.size < count:
        raise FrameTableError(f"need {count} free frames, the frame table has {free.size}")
    return free[:count]


def _write_tables(mem2d: np.ndarray, mfns: np.ndarray, entries: np.ndarray) -> None:
    """Write rows of 512 entries (padding a short last row with zeros)."""
    flat = np.zeros(len(mfns) * ENTRIES_PER_TABLE, dtype=np.uint64)
    flat[: entries.size] = entries
    mem2d[mfns] = flat.reshape(-1, ENTRIES_PER_TABLE)


def _ptes(mfns: np.ndarray, flags: np.ndarray | int) -> np.ndarray:
    return (mfns.astype(np.uint64) << np.uint64(12)) | np.asarray(flags, dtype=np.uint64)


def build_linux_like(
    frames: FrameTable,
    mem: np.ndarray,
    domid: int,
    guest_pages: int,
    *,
    nr_processes: int = 4,
    seed: int = 0,
    pin_process_l1s: bool = False,
) -> PvTree:
    """A Linux-like PV guest of `guest_pages` frames, taken from the free frames.

    Roots: the kernel's L4 (init_mm), then each process's kernel and user L4
    (and, with `pin_process_l1s`, its L1s, as Linux pins them with split PTE
    locks), then vCPU 0's CR3 and user CR3 (the first process).
    """
    if guest_pages < 64 or nr_processes < 0:
        raise FrameTableError(f"a Linux-like guest needs >= 64 pages, got {guest_pages}")
    mem2d = frames.check_mem(mem)
    rng = np.random.default_rng(seed)
    p2m = rng.permutation(_free_frames(frames, guest_pages)).astype(np.int64)
    frames.assign(p2m, domid)

    # Page-table frames come from guest RAM like everything else.
    n_l1 = -(-guest_pages // ENTRIES_PER_TABLE)
    n_l2 = -(-n_l1 // ENTRIES_PER_TABLE)
    n_l3 = -(-n_l2 // ENTRIES_PER_TABLE)
    if LINUX_DIRECT_MAP_L4_SLOT + n_l3 > LINUX_KERNEL_L4_SLOT:
        raise FrameTableError(f"{guest_pages} pages do not fit the direct-map L4 slots")
    kernel_l1s = 4
    per_process = 6  # kernel L4, user L4, user L3, user L2, 2 user L1s
    n_pt = n_l1 + n_l2 + n_l3 + 1 + 2 + kernel_l1s + per_process * nr_processes
    if n_pt * 2 > guest_pages:
        raise FrameTableError(f"{guest_pages} pages are too few for {n_pt} page tables")
    pt_pfns = rng.choice(guest_pages, size=n_pt, replace=False)
    is_pt = np.zeros(guest_pages, dtype=bool)
    is_pt[pt_pfns] = True
    data_pfns = np.flatnonzero(~is_pt)
    pt_mfns = iter(p2m[pt_pfns].tolist())

    def alloc(n: int) -> np.ndarray:
        return np.array([next(pt_mfns) for _ in range(n)], dtype=np.int64)

    dm_l1, dm_l2, dm_l3 = alloc(n_l1), alloc(n_l2), alloc(n_l3)
    k_l4, k_l3, k_l2 = (int(m) for m in alloc(3))
    k_l1 = alloc(kernel_l1s)

    # Direct map: pfn p at L1 entry p; page tables read-only.
    flags = np.where(is_pt, KERNEL_RO_FLAGS, KERNEL_DATA_FLAGS).astype(np.uint64)
    _write_tables(mem2d, dm_l1, _ptes(p2m, flags))
    _write_tables(mem2d, dm_l2, _ptes(dm_l1, TABLE_FLAGS))
    _write_tables(mem2d, dm_l3, _ptes(dm_l2, TABLE_FLAGS))

    # Kernel image: the first data frames, text read-only and the rest writable.
    image = p2m[data_pfns[: kernel_l1s * ENTRIES_PER_TABLE]]
    image_flags = np.full(image.size, KERNEL_DATA_FLAGS, dtype=np.uint64)
    image_flags[: image.size // 2] = KERNEL_RO_FLAGS & ~PTE_NX
    _write_tables(mem2d, k_l1, _ptes(image, image_flags))
    _write_tables(mem2d, np.array([k_l2]), _ptes(k_l1, TABLE_FLAGS))
    kl3 = np.zeros(ENTRIES_PER_TABLE, dtype=np.uint64)
    kl3[LINUX_KERNEL_L3_SLOT] = make_pte(k_l2, TABLE_FLAGS)
    mem2d[k_l3] = kl3

    kernel_l4 = np.zeros(ENTRIES_PER_TABLE, dtype=np.uint64)
    dm_slots = slice(LINUX_DIRECT_MAP_L4_SLOT, LINUX_DIRECT_MAP_L4_SLOT + n_l3)
    kernel_l4[dm_slots] = _ptes(dm_l3, TABLE_FLAGS)
    kernel_l4[LINUX_KERNEL_L4_SLOT] = make_pte(k_l3, TABLE_FLAGS)
    mem2d[k_l4] = kernel_l4

    roots = [Root(k_l4, 4)]
    tables: dict[int, list[int]] = {
        4: [k_l4], 3: [*map(int, dm_l3), k_l3], 2: [*map(int, dm_l2), k_l2],
        1: [*map(int, dm_l1), *map(int, k_l1)],
    }
    user_l4s: list[tuple[int, int]] = []
    for _ in range(nr_processes):
        p_l4, u_l4, u_l3, u_l2 = (int(m) for m in alloc(4))
        u_l1 = alloc(2)
        # User memory: random data frames, some read-only, one aliased twice.
        pages = p2m[rng.choice(data_pfns, size=2 * ENTRIES_PER_TABLE - 16, replace=False)]
        pages[1] = pages[0]
        uflags = np.where(rng.random(pages.size) < 0.8, USER_DATA_FLAGS, USER_RO_FLAGS)
        _write_tables(mem2d, u_l1, _ptes(pages, uflags.astype(np.uint64)))
        _write_tables(mem2d, np.array([u_l2]), _ptes(u_l1, TABLE_FLAGS | PTE_USER))
        _write_tables(mem2d, np.array([u_l3]), _ptes(np.array([u_l2]), TABLE_FLAGS | PTE_USER))
        row = kernel_l4.copy()  # shares the kernel's L3s
        row[0] = make_pte(u_l3, TABLE_FLAGS | PTE_USER)
        mem2d[p_l4] = row
        user_row = np.zeros(ENTRIES_PER_TABLE, dtype=np.uint64)
        user_row[0] = row[0]
        mem2d[u_l4] = user_row
        roots += [Root(p_l4, 4), Root(u_l4, 4)]
        if pin_process_l1s:
            roots += [Root(int(m), 1) for m in u_l1]
        user_l4s.append((p_l4, u_l4))
        tables[4] += [p_l4, u_l4]
        tables[3].append(u_l3)
        tables[2].append(u_l2)
        tables[1] += [int(m) for m in u_l1]
    if user_l4s:
        roots += [Root(user_l4s[0][0], 4, pinned=False), Root(user_l4s[0][1], 4, pinned=False)]
    else:
        roots.append(Root(k_l4, 4, pinned=False))
    return PvTree(domid=domid, p2m=p2m, roots=roots,
                  tables={lvl: np.array(m, dtype=np.int64) for lvl, m in tables.items()})


# ---------------------------------------------------------------------------
# Random trees
# ---------------------------------------------------------------------------

_GUEST_L4_SLOTS = np.array(
    [s for s in range(ENTRIES_PER_TABLE) if not XEN_L4_FIRST_SLOT <= s <= XEN_L4_LAST_SLOT]
)


def build_random_tree(
    frames: FrameTable,
    mem: np.ndarray,
    domid: int,
    seed: int,
    *,
    nr_pages: int = 64,
    hostile: float = 0.0,
    linear: float = 0.15,
    foreign_domid: int | None = None,
) -> PvTree:
    """A small random PV tree over `nr_pages` free frames.

    `linear` is the chance that a table gets a read-only same-level entry (onto
    itself or another table); `hostile` the chance, per table and per root, of an
    entry or root the typing rules refuse. With `foreign_domid`, four more free
    frames are given to that domain, for hostile entries to point at.
    """
    rng = np.random.default_rng(seed)
    mem2d = frames.check_mem(mem)
    p2m = _free_frames(frames, nr_pages).astype(np.int64)
    frames.assign(p2m, domid)
    foreign = np.empty(0, dtype=np.int64)
    if foreign_domid is not None:
        foreign = _free_frames(frames, 4).astype(np.int64)
        frames.assign(foreign, foreign_domid)

    counts = {4: int(rng.integers(1, 4)), 3: int(rng.integers(1, 5)),
              2: int(rng.integers(1, 6)), 1: int(rng.integers(2, 9))}
    shuffled = rng.permutation(p2m)
    tables: dict[int, np.ndarray] = {}
    pos = 0
    for level in (4, 3, 2, 1):
        tables[level] = shuffled[pos : pos + counts[level]]
        pos += counts[level]
    data = shuffled[pos:]
    all_tables = shuffled[:pos]

    def hostile_entry(level: int) -> int:
        kind = int(rng.integers(0, 5))
        if kind == 0:  # a flag Xen refuses at this level
            bad = PTE_PCD if level == 1 else int(rng.choice([PTE_PSE, PTE_PCD, PTE_GLOBAL]))
            return make_pte(int(rng.choice(data)), TABLE_FLAGS | bad)
        if kind == 1 and foreign.size:  # someone else's frame
            return make_pte(int(rng.choice(foreign)), TABLE_FLAGS)
        if kind == 2:  # a writable mapping of a page table / a table at a wrong level
            return make_pte(int(rng.choice(all_tables)), TABLE_FLAGS)
        if kind == 3:  # a frame outside the frame table
            return make_pte(frames.nr_frames + int(rng.integers(0, 8)), TABLE_FLAGS)
        return make_pte(int(rng.choice(data)), TABLE_FLAGS)  # data used as a table

    for level in (4, 3, 2, 1):
        for table in tables[level]:
            row = np.zeros(ENTRIES_PER_TABLE, dtype=np.uint64)
            slots_pool = _GUEST_L4_SLOTS if level == 4 else np.arange(ENTRIES_PER_TABLE)
            n = int(rng.integers(1, 4)) if level > 1 else int(rng.integers(1, 24))
            slots = rng.choice(slots_pool, size=n + 2, replace=False)
            for slot in slots[:n]:
                if level > 1:
                    child = int(rng.choice(tables[level - 1]))  # shared children happen
                    user = PTE_USER if rng.random() < 0.5 else 0
                    row[slot] = make_pte(child, TABLE_FLAGS | user)
                else:
                    target = int(rng.choice(data)) if rng.random() < 0.85 else int(
                        rng.choice(all_tables))
                    writable = target in data and rng.random() < 0.7
                    row[slot] = make_pte(target, USER_DATA_FLAGS if writable else USER_RO_FLAGS)
            if level > 1 and rng.random() < linear:
                # A read-only same-level entry: onto itself or another table.
                target = int(table) if rng.random() < 0.5 else int(rng.choice(tables[level]))
                row[slots[n]] = make_pte(target, PTE_PRESENT | PTE_ACCESSED)
            if rng.random() < hostile:
                row[slots[n + 1]] = hostile_entry(level)
            if level == 1 and n > 1 and rng.random() < 0.5:
                row[slots[1]] = row[slots[0]]  # an aliased mapping
            mem2d[table] = row

    roots = [Root(int(m), 4) for m in rng.permutation(tables[4])]
    for level in (3, 2, 1):
        for m in tables[level]:
            if rng.random() < 0.25:
                roots.insert(int(rng.integers(0, len(roots) + 1)), Root(int(m), level))
    for _ in range(int(rng.integers(0, 3))):
        roots.append(Root(int(rng.choice(tables[4])), 4, pinned=False))
    if rng.random() < hostile:
        bad_level = int(rng.integers(1, 5))
        roots.insert(int(rng.integers(0, len(roots) + 1)),
                     Root(int(rng.choice(all_tables)), bad_level))
    return PvTree(domid=domid, p2m=p2m, roots=roots, tables=tables)
