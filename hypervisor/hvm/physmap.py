"""Guest-physical memory of one HVM domain: its P2M and EPT, PoD and log-dirty.

- **Backing.** RAM is gfns 0 .. nr_pages-1. Without populate-on-demand every gfn is
  backed at creation, from host frames chosen so that EPT can use superpages: each
  1 GiB / 2 MiB-aligned run of gfns gets an equally aligned run of free host frames
  while such runs exist, the rest comes lowest-first. The EPT is then built with 1 GiB
  and 2 MiB leaves wherever the P2M below them is uniform and contiguous.
- **Populate-on-demand** (a per-domain option): only the gfns the builder writes are
  backed at creation; every other gfn is PoD, not present in EPT, so the first access
  is an EPT violation. Serving it (`populate`) backs the whole 2 MiB-aligned range
  around the gfn with one aligned 2 MiB host run when the range is all PoD and such a
  run is free (Xen's p2m_pod_demand_populate tries order 9 before order 0), else the
  one gfn; new frames are zeroed. Frames come straight from the host allocator (hvlab
  has no PoD cache or target): when host memory runs out the caller crashes the domain,
  as Xen does when its PoD cache is empty. Populated ranges stay 4 KiB leaves in EPT.
- **Log-dirty** follows the P2M (hypervisor/hvm/p2m.py): write-protect all RAM, a write
  violation marks the gfn dirty and makes it writable again, `take_dirty` is CLEAN.

Every change goes through the P2M, which keeps the EPT in step and bumps its
`generation`; MMUs and TLBs use that to know when to forget cached translations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from emulator.addr import MFN, PAGE_SHIFT, PFN
from emulator.memory import HostMemory
from hypervisor.core.frames import FrameAllocator, OutOfFrames
from hypervisor.hvm.ept import EPT_LAYOUTS, INVALID_MFN, EptLayout, EptTables, P2mType
from hypervisor.hvm.p2m import P2M, P2MError
from hypervisor.lib.errors import HvlabError

#: The EPT software-bit layout each hypervisor build uses. 4.4 predates the recalc bit
#: but keeps the p2m type (52-57) and access (58-61) where 4.12 has them, so hvlab
#: gives it the 4.12 layout.
EPT_LAYOUT_OF_BUILD: dict[str, str] = {"4.4": "4.12", "4.12": "4.12", "4.19": "4.19"}

SUPERPAGE_ORDERS = (18, 9)  # 1 GiB, 2 MiB
POD_ORDER = 9


class PhysmapError(HvlabError):
    """A domain's guest-physical memory cannot be set up as asked."""


def ept_layout_for(build: str) -> EptLayout:
    """The EPT layout of hypervisor build `build` ("4.4", "4.12", "4.19")."""
    try:
        return EPT_LAYOUTS[EPT_LAYOUT_OF_BUILD[build]]
    except KeyError:
        known = ", ".join(sorted(EPT_LAYOUT_OF_BUILD))
        raise PhysmapError(f"build {build!r} has no EPT layout (known: {known})") from None


@dataclass
class PhysmapStats:
    pod_faults: int = 0  # PoD violations served
    pod_pages: int = 0  # gfns populated on demand
    pod_superpages: int = 0  # of those faults, served with a whole 2 MiB run
    logdirty_faults: int = 0  # write violations that marked a gfn dirty


class GuestPhysmap:
    """gfn -> host frame for one HVM domain, with its EPT in host memory."""

    def __init__(self, memory: HostMemory, frames: FrameAllocator, nr_pages: int,
                 layout: EptLayout, owner: str, *, pod: bool = False,
                 prepopulate: range | None = None) -> None:
        """Back the domain's RAM (all of it, or with `pod` only `prepopulate`) and build EPT.

        On failure every frame taken is given back and PhysmapError says why.
        """
        if nr_pages <= 0:
            raise PhysmapError(f"{owner}: memory must be at least one page")
        self.memory = memory
        self.frames = frames
        self.owner = owner
        self.pod = pod
        self.stats = PhysmapStats()
        #: Bumped by every change that takes permissions away (log-dirty write-protect):
        #: only those leave stale TLB entries; populating or unprotecting adds rights.
        self.restrictions = 0
        self.p2m = P2M(nr_pages)
        self._ept_frames: list[int] = []
        taken: list[np.ndarray] = []
        try:
            if pod:
                span = prepopulate if prepopulate is not None else range(0)
                if span.start < 0 or span.stop > nr_pages:
                    raise PhysmapError(f"{owner}: prepopulated gfns {span} outside RAM")
                self.p2m.mark_pod(PFN(0), nr_pages)
                if len(span):
                    mfns = frames.alloc(len(span), f"{owner} memory")
                    taken.append(mfns)
                    self.p2m.set_range(PFN(span.start), mfns, P2mType.RAM_RW)
            else:
                mfns = _alloc_superpage_friendly(frames, nr_pages, f"{owner} memory")
                taken.append(mfns)
                self.p2m.set_range(PFN(0), mfns, P2mType.RAM_RW)
            self.p2m.build_ept(layout, memory.u64, self._alloc_table, self._free_table)
        except (OutOfFrames, P2MError) as err:
            for mfns in taken:
                frames.release(mfns)
            for f in self._ept_frames:
                frames.release([f])
            raise PhysmapError(f"{owner}: {err}") from None

    @classmethod
    def adopt(cls, memory: HostMemory, frames: FrameAllocator, p2m: P2M, layout: EptLayout,
              owner: str, *, pod: bool) -> GuestPhysmap:
        """A live update: take over a P2M whose frames are already this domain's (marked
        used in `frames`) and build its EPT in `layout`. Only EPT table frames are taken;
        on failure they are given back and PhysmapError says why."""
        self = cls.__new__(cls)
        self.memory, self.frames, self.owner, self.pod = memory, frames, owner, pod
        self.stats = PhysmapStats()
        self.restrictions = 0
        self.p2m = p2m
        self._ept_frames = []
        try:
            p2m.build_ept(layout, memory.u64, self._alloc_table, self._free_table)
        except (OutOfFrames, P2MError) as err:
            for f in list(self._ept_frames):
                self._free_table(f)
            raise PhysmapError(f"{owner}: {err}") from None
        return self

    def ept_entries(self) -> int:
        """Non-zero entries in this domain's EPT tables (what building them wrote)."""
        tables = np.array(sorted(self.ept.frames), dtype=np.int64)
        return int(np.count_nonzero(self.memory.u64.reshape(-1, 512)[tables]))

    # -- EPT table frames -------------------------------------------------------------

    def _alloc_table(self) -> int:
        mfn = int(self.frames.alloc_one(f"{self.owner} EPT"))
        self.memory.zero_frame(MFN(mfn))
        self._ept_frames.append(mfn)
        return mfn

    def _free_table(self, mfn: int) -> None:
        self.memory.zero_frame(MFN(mfn))
        self.frames.release([mfn])
        self._ept_frames.remove(mfn)

    # -- reading ----------------------------------------------------------------------

    @property
    def ept(self) -> EptTables:
        ept = self.p2m.ept
        assert ept is not None  # built in __init__; only a live update swaps it
        return ept

    @property
    def nr_pages(self) -> int:
        return self.p2m.nr_gfns

    @property
    def ram_bytes(self) -> int:
        return self.nr_pages << PAGE_SHIFT

    def gpa_to_ma(self, gpa: int) -> int | None:
        """Machine address of `gpa` from the P2M, or None where no frame backs it."""
        gfn = gpa >> PAGE_SHIFT
        if not 0 <= gfn < self.nr_pages:
            return None
        mfn = int(self.p2m.mfns[gfn])
        if mfn == INVALID_MFN:
            return None
        return (mfn << PAGE_SHIFT) | (gpa & 0xFFF)

    def p2m_type(self, gfn: int) -> P2mType | None:
        """The gfn's p2m type, or None outside RAM."""
        if not 0 <= gfn < self.nr_pages:
            return None
        return P2mType(int(self.p2m.types[gfn]))

    def owned_frames(self) -> np.ndarray:
        """Every host frame this domain's memory uses: RAM, then EPT tables."""
        mfns = self.p2m.mfns
        ram = mfns[mfns != INVALID_MFN]
        return np.concatenate([ram, np.array(sorted(self.ept.frames), dtype=np.uint64)])

    def superpage_counts(self) -> dict[str, int]:
        """How many EPT leaves of each size map this domain (for reports)."""
        lookup = self.ept.lookup_many(np.arange(self.nr_pages, dtype=np.uint64))
        level = lookup.level
        return {"4K": int(np.count_nonzero(level == 1)),
                "2M": int(np.count_nonzero(level == 2)) // 512,
                "1G": int(np.count_nonzero(level == 3)) // (512 * 512)}

    # -- populate-on-demand -----------------------------------------------------------

    def populate(self, gfn: int) -> int:
        """Back PoD gfn `gfn`; returns how many gfns were populated (512 or 1).

        Raises OutOfFrames when host memory is exhausted (nothing changed then).
        """
        if self.p2m_type(gfn) is not P2mType.POPULATE_ON_DEMAND:
            raise PhysmapError(f"{self.owner}: gfn {gfn:#x} is not populate-on-demand")
        base = gfn & ~((1 << POD_ORDER) - 1)
        size = 1 << POD_ORDER
        types = self.p2m.types
        if base + size <= self.nr_pages and bool(
                (types[base:base + size] == P2mType.POPULATE_ON_DEMAND).all()):
            run = _take_aligned_runs(self.frames, POD_ORDER, 1)
            if run.size:
                start = int(run[0])
                self.memory.u64[start * 512:(start + size) * 512] = 0
                mfns = np.arange(start, start + size, dtype=np.uint64)
                self.p2m.set_range(PFN(base), mfns, P2mType.RAM_RW,
                                   self.p2m.accesses[base:base + size].copy())
                self.stats.pod_faults += 1
                self.stats.pod_superpages += 1
                self.stats.pod_pages += size
                return size
        mfn = self.frames.alloc_one(f"{self.owner} populate-on-demand")
        self.memory.zero_frame(mfn)
        self.p2m.populate(PFN(gfn), mfn)
        self.stats.pod_faults += 1
        self.stats.pod_pages += 1
        return 1

    # -- log-dirty --------------------------------------------------------------------

    def enable_logdirty(self) -> None:
        self.p2m.enable_logdirty()
        self.restrictions += 1

    def disable_logdirty(self) -> None:
        self.p2m.disable_logdirty()

    @property
    def logdirty(self) -> bool:
        return self.p2m.logdirty

    def mark_dirty(self, gfn: int) -> None:
        """A write to a write-protected (log-dirty) gfn: record it, make it writable."""
        self.p2m.mark_dirty(PFN(gfn))
        self.stats.logdirty_faults += 1

    def take_dirty(self) -> np.ndarray:
        """Gfns written since the last call (Xen's CLEAN); they are write-protected again."""
        dirty = self.p2m.take_dirty()
        self.restrictions += 1
        return dirty


def _take_aligned_runs(frames: FrameAllocator, order: int, limit: int) -> np.ndarray:
    """First mfns of up to `limit` free, aligned runs of 2**order frames, now taken."""
    size = 1 << order
    nblocks = frames.nr_frames // size
    if nblocks == 0 or limit <= 0:
        return np.zeros(0, dtype=np.uint64)
    whole = frames.free[: nblocks * size].reshape(nblocks, size).all(axis=1)
    starts = (np.flatnonzero(whole)[:limit] * size).astype(np.uint64)
    for start in starts.tolist():
        frames.mark_used(np.arange(start, start + size, dtype=np.int64))
    return starts


def _alloc_superpage_friendly(frames: FrameAllocator, count: int, what: str) -> np.ndarray:
    """`count` frames for gfns 0..count-1, aligned runs first so EPT can use superpages.

    On OutOfFrames nothing stays taken.
    """
    mfns = np.empty(count, dtype=np.uint64)
    taken_runs: list[tuple[int, int]] = []
    gfn = 0
    try:
        for order in SUPERPAGE_ORDERS:
            size = 1 << order
            for start in _take_aligned_runs(frames, order, (count - gfn) // size).tolist():
                taken_runs.append((start, size))
                mfns[gfn:gfn + size] = np.arange(start, start + size, dtype=np.uint64)
                gfn += size
        if gfn < count:
            mfns[gfn:] = frames.alloc(count - gfn, what)
    except OutOfFrames:
        for start, size in taken_runs:
            frames.release(np.arange(start, start + size, dtype=np.int64))
        raise
    return mfns
