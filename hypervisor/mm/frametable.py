"""The frame table: Xen's `page_info` for every machine frame, as numpy arrays.

Fields (one element per machine frame):

- ``type_info`` (uint64): type, pinned/validated/partial/locked flags and type
  count, in the layout of the build that owns the table (`hypervisor.mm.builds`).
- ``count_info`` (uint64): bit 63 ``PGC_allocated``; bits 56-0 the general
  reference count (Xen's ``PGC_count_mask`` with shadow paging). An allocated
  frame holds one reference for its allocation, so its count never falls to 0
  while the domain owns it: that is why writable and seg_desc frames keep their
  type at type count 0. This layout is the same in every build of the model.
- ``owner`` (int32): domain id, `DOMID_INVALID` for a free frame.
- ``nr_validated_ptes`` (uint16) and ``partial_flags`` (uint8, `PTF_PARTIAL_SET`):
  progress of a preempted validation.
- ``linear_pt_count`` (int16): > 0, how many same-level (linear) entries this
  page table has; < 0, in how many same-level tables it is used.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from hypervisor.lib.extents import runs_of
from hypervisor.mm.builds import Build, PageType, TypeInfo, TypeInfoLayout
from hypervisor.mm.errors import FrameTableError
from hypervisor.mm.pte import ENTRIES_PER_TABLE

# Domain ids from Xen's public/xen.h.
DOMID_SELF = 0x7FF0
DOMID_IO = 0x7FF1
DOMID_XEN = 0x7FF2
DOMID_COW = 0x7FF3
DOMID_INVALID = 0x7FF4
DOMID_FIRST_RESERVED = 0x7FF0

PGC_ALLOCATED = 1 << 63
PGC_COUNT_WIDTH = 57
PGC_COUNT_MASK = (1 << PGC_COUNT_WIDTH) - 1

# partial_flags: the entry at nr_validated_ptes holds a reference to a page that
# is itself partially (de)validated (Xen's PTF_partial_set).
PTF_PARTIAL_SET = 1 << 0

_ARRAY_FIELDS = (
    ("type_info", np.uint64),
    ("count_info", np.uint64),
    ("owner", np.int32),
    ("nr_validated_ptes", np.uint16),
    ("partial_flags", np.uint8),
    ("linear_pt_count", np.int16),
)


@dataclass(frozen=True)
class FrameTableSnapshot:
    """A byte copy of a frame table; snapshots compare equal iff the tables are identical."""

    build: str
    type_info: bytes
    count_info: bytes
    owner: bytes
    nr_validated_ptes: bytes
    partial_flags: bytes
    linear_pt_count: bytes

    def differences(self, other: FrameTableSnapshot) -> list[tuple[str, int]]:
        """(field, mfn) of every element that differs (for readable test failures)."""
        out: list[tuple[str, int]] = []
        for name, dtype in _ARRAY_FIELDS:
            a = np.frombuffer(getattr(self, name), dtype=dtype)
            b = np.frombuffer(getattr(other, name), dtype=dtype)
            if a.shape != b.shape:
                out.append((name, -1))
                continue
            out.extend((name, int(m)) for m in np.flatnonzero(a != b))
        return out


class FrameTable:
    """Per-frame state of all machine frames, in one build's layout."""

    def __init__(self, nr_frames: int, build: Build) -> None:
        if nr_frames <= 0:
            raise FrameTableError(f"a frame table needs at least one frame, got {nr_frames}")
        self.nr_frames = nr_frames
        self.build = build
        self.type_info = np.zeros(nr_frames, dtype=np.uint64)
        self.count_info = np.zeros(nr_frames, dtype=np.uint64)
        self.owner = np.full(nr_frames, DOMID_INVALID, dtype=np.int32)
        self.nr_validated_ptes = np.zeros(nr_frames, dtype=np.uint16)
        self.partial_flags = np.zeros(nr_frames, dtype=np.uint8)
        self.linear_pt_count = np.zeros(nr_frames, dtype=np.int16)
        # Frames whose type_info the typing rules changed since logging began (None: not
        # logging): what a live update sent ahead may be stale for exactly these.
        self.type_log: set[int] | None = None

    @property
    def layout(self) -> TypeInfoLayout:
        return self.build.type_info

    # --- checks -----------------------------------------------------------

    def check_mfn(self, mfn: int) -> int:
        if not 0 <= mfn < self.nr_frames:
            raise FrameTableError(
                f"mfn {mfn:#x} is outside the frame table (0..{self.nr_frames - 1:#x})"
            )
        return int(mfn)

    def check_mem(self, mem: np.ndarray) -> np.ndarray:
        """`mem` as a (nr_frames, 512) uint64 view; FrameTableError if it does not fit."""
        if mem.dtype != np.uint64 or mem.ndim != 1:
            raise FrameTableError(
                f"host memory must be a 1-D uint64 view, got {mem.dtype} {mem.shape}"
            )
        need = self.nr_frames * ENTRIES_PER_TABLE
        if mem.shape[0] < need:
            raise FrameTableError(f"host memory holds {mem.shape[0] // ENTRIES_PER_TABLE} frames, "
                                  f"the frame table {self.nr_frames}")
        return mem[:need].reshape(self.nr_frames, ENTRIES_PER_TABLE)

    # --- allocation ---------------------------------------------------------

    def assign(self, mfns: Iterable[int] | np.ndarray, domid: int) -> None:
        """Give free frames to `domid`: allocated, one (allocation) reference, no type."""
        if not 0 <= domid < DOMID_FIRST_RESERVED and domid not in (DOMID_XEN, DOMID_IO):
            raise FrameTableError(f"domain id {domid:#x} cannot own frames")
        m = np.asarray(list(mfns) if not isinstance(mfns, np.ndarray) else mfns,
                       dtype=np.int64)
        runs = runs_of(m)
        if runs is not None:
            self.assign_runs(runs, domid)
            return
        m = _sorted_unique(m)
        if m.size == 0:
            return
        if m[0] < 0 or m[-1] >= self.nr_frames:
            raise FrameTableError(f"mfns {m[0]:#x}..{m[-1]:#x} are outside the frame table")
        if m[0] == 0 and domid < DOMID_FIRST_RESERVED:
            # As on Xen (where it belongs to DOM_IO), MFN 0 is never a guest's
            # frame: 0 means "none" for CR3s and base pointers.
            raise FrameTableError("mfn 0 cannot be given to a guest domain")
        busy = m[(self.owner[m] != DOMID_INVALID) | (self.count_info[m] != 0)]
        if busy.size:
            raise FrameTableError(f"mfn {int(busy[0]):#x} is not free (owner "
                                  f"{int(self.owner[busy[0]]):#x})")
        self.owner[m] = domid
        self.count_info[m] = PGC_ALLOCATED | 1
        self.type_info[m] = 0
        self.nr_validated_ptes[m] = 0
        self.partial_flags[m] = 0
        self.linear_pt_count[m] = 0

    def assign_runs(self, runs: np.ndarray, domid: int) -> None:
        """`assign` for runs (index, first mfn, count) of consecutive frames, on slices.

        Fields already zero are not written: a fresh table's pages stay untouched.
        """
        for _index, first, count in runs.tolist():
            last = first + count - 1
            if first < 0 or last >= self.nr_frames:
                raise FrameTableError(f"mfns {first:#x}..{last:#x} are outside the frame table")
            if first == 0 and domid < DOMID_FIRST_RESERVED:
                raise FrameTableError("mfn 0 cannot be given to a guest domain")
            rows = slice(first, first + count)
            busy = np.flatnonzero((self.owner[rows] != DOMID_INVALID)
                                  | (self.count_info[rows] != 0))
            if busy.size:
                mfn = first + int(busy[0])
                raise FrameTableError(f"mfn {mfn:#x} is not free (owner "
                                      f"{int(self.owner[mfn]):#x})")
        for _index, first, count in runs.tolist():
            rows = slice(first, first + count)
            self.owner[rows] = domid
            self.count_info[rows] = PGC_ALLOCATED | 1
            for array in (self.type_info, self.nr_validated_ptes, self.partial_flags,
                          self.linear_pt_count):
                if array[rows].any():
                    array[rows] = 0

    # --- one frame ----------------------------------------------------------

    def info(self, mfn: int) -> TypeInfo:
        return self.layout.decode(int(self.type_info[self.check_mfn(mfn)]))

    def page_type(self, mfn: int) -> PageType:
        return self.info(mfn).type

    def type_count(self, mfn: int) -> int:
        return self.layout.count_of(int(self.type_info[self.check_mfn(mfn)]))

    def is_pinned(self, mfn: int) -> bool:
        return self.layout.pinned_of(int(self.type_info[self.check_mfn(mfn)]))

    def is_validated(self, mfn: int) -> bool:
        return self.layout.validated_of(int(self.type_info[self.check_mfn(mfn)]))

    def is_partial(self, mfn: int) -> bool:
        return self.layout.partial_of(int(self.type_info[self.check_mfn(mfn)]))

    def general_count(self, mfn: int) -> int:
        return int(self.count_info[self.check_mfn(mfn)]) & PGC_COUNT_MASK

    def owner_of(self, mfn: int) -> int:
        return int(self.owner[self.check_mfn(mfn)])

    # --- vectorised -----------------------------------------------------------

    def _select(self, array: np.ndarray, mfns: np.ndarray | None) -> np.ndarray:
        return array if mfns is None else array[np.asarray(mfns, dtype=np.int64)]

    def types(self, mfns: np.ndarray | None = None) -> np.ndarray:
        """PageType values (uint8; builds.UNDEFINED_TYPE where the code is undefined)."""
        return self.layout.type_of(self._select(self.type_info, mfns))

    def type_counts(self, mfns: np.ndarray | None = None) -> np.ndarray:
        return self.layout.count_of(self._select(self.type_info, mfns))

    def pinned(self, mfns: np.ndarray | None = None) -> np.ndarray:
        return self.layout.pinned_of(self._select(self.type_info, mfns))

    def validated(self, mfns: np.ndarray | None = None) -> np.ndarray:
        return self.layout.validated_of(self._select(self.type_info, mfns))

    def partial(self, mfns: np.ndarray | None = None) -> np.ndarray:
        return self.layout.partial_of(self._select(self.type_info, mfns))

    def general_counts(self, mfns: np.ndarray | None = None) -> np.ndarray:
        return self._select(self.count_info, mfns) & np.uint64(PGC_COUNT_MASK)

    def frames_of(self, domid: int) -> np.ndarray:
        return np.flatnonzero(self.owner == domid)

    # --- copies ---------------------------------------------------------------

    def snapshot(self) -> FrameTableSnapshot:
        return FrameTableSnapshot(
            build=self.build.version,
            **{name: getattr(self, name).tobytes() for name, _ in _ARRAY_FIELDS},
        )

    def restore(self, snap: FrameTableSnapshot) -> None:
        """Put back a snapshot taken from a table of the same size and build."""
        if snap.build != self.build.version:
            raise FrameTableError(f"snapshot of build {snap.build} cannot restore a "
                                  f"{self.build.version} frame table")
        if len(snap.owner) != self.owner.nbytes:
            raise FrameTableError("snapshot is of a frame table of another size")
        for name, dtype in _ARRAY_FIELDS:
            getattr(self, name)[:] = np.frombuffer(getattr(snap, name), dtype=dtype)

    def copy(self) -> FrameTable:
        other = FrameTable(self.nr_frames, self.build)
        for name, _ in _ARRAY_FIELDS:
            getattr(other, name)[:] = getattr(self, name)
        return other



def _sorted_unique(values: np.ndarray) -> np.ndarray:
    """np.unique by sorting (numpy 2's hash-based unique is several times slower here)."""
    values = np.sort(values)
    if values.size:
        values = values[np.concatenate(([True], values[1:] != values[:-1]))]
    return values
