"""Intel EPT tables in host memory, with each hypervisor build's software-bit layout.

An EPT entry (Intel SDM vol. 3, "EPT paging structures") has fixed hardware bits:
R 0, W 1, X 2, memory type 3-5, ignore-PAT 6, superpage 7, accessed 8, dirty 9,
MFN 12-51, suppress-#VE 63. Xen keeps its own data in the bits the CPU ignores:
the p2m type, the p2m access and a "recalc" flag. Where those live is a property of
the build (`EptLayout`), so a new build cannot read the old build's tables: it
rebuilds them from the P2M (see hypervisor/hvm/p2m.py).

Layout facts, from xen.git `asm/hvm/vmx/vmx.h` `ept_entry_t`:
- recalc bit 10 and sa_p2mt bits 52-57 (6 bits) have not moved since Xen 4.5.
- access was bits 58-61 up to and including Xen 4.19 (bit 62: VT-d "tm", later
  reserved). A December 2024 patch ("Rename _rsvd field to pw and move it to the
  bit 58", for EPT paging-write) moved access to bits 59-62. hvlab's "4.19" build
  uses that current layout, as docs/design.md §3 states; "4.12" uses the 4.12 layout.
- Much older Xen (3.x) kept a 4-bit p2m type in bits 8-11; not modelled.

Levels: a leaf at level 1 maps 4 KiB, level 2 is a 2 MiB superpage, level 3 a
1 GiB superpage; level 4 is the root (PML4-equivalent), never a leaf.

Table frames come from `alloc_frame() -> mfn` and go back through `free_frame(mfn)`;
frame `mfn`'s 512 entries are `mem[mfn*512:(mfn+1)*512]` of the host-memory u64 view.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Final, Generic, NamedTuple, TypeVar

import numpy as np
import numpy.typing as npt

from emulator.addr import GPA, MFN, PFN

U64Array = npt.NDArray[np.uint64]
U8Array = npt.NDArray[np.uint8]
AllocFrame = Callable[[], int]
FreeFrame = Callable[[int], None]


class EptError(Exception):
    """Bad input to an EPT operation, or EPT tables that cannot be what they claim to be."""


class P2mType(IntEnum):
    """Xen's `p2m_type_t` (x86 asm/p2m.h); the numbers are what the EPT entries hold."""

    RAM_RW = 0
    INVALID = 1
    RAM_LOGDIRTY = 2
    RAM_RO = 3
    MMIO_DM = 4
    MMIO_DIRECT = 5
    POPULATE_ON_DEMAND = 6
    GRANT_MAP_RW = 7
    GRANT_MAP_RO = 8
    RAM_PAGING_OUT = 9
    RAM_PAGED = 10
    RAM_PAGING_IN = 11
    RAM_SHARED = 12
    RAM_BROKEN = 13
    MAP_FOREIGN = 14
    IOREQ_SERVER = 15


class P2mAccess(IntEnum):
    """Xen's `p2m_access_t`; values 0-7 are an R=1/W=2/X=4 mask, like EPT's own bits."""

    N = 0
    R = 1
    W = 2
    RW = 3
    X = 4
    RX = 5
    WX = 6
    RWX = 7
    RX2RW = 8
    N2RWX = 9


PERM_R: Final = 1
PERM_W: Final = 2
PERM_X: Final = 4
PERM_RWX: Final = 7

#: Access of gfns that map nothing, and of new entries when none is given (Xen's default).
DEFAULT_ACCESS: Final = P2mAccess.RWX
INVALID_MFN: Final = 0xFFFF_FFFF_FFFF_FFFF
MAX_MFN: Final = (1 << 40) - 1
#: A 4-level EPT translates 48-bit guest-physical addresses: 36 bits of gfn.
GFN_LIMIT: Final = 1 << 36
ENTRIES_PER_TABLE: Final = 512

# Hardware bits of an EPT entry (fixed for every build).
EPTE_PERM_MASK: Final = 0x7
EPTE_EMT_SHIFT: Final = 3
EPTE_IPAT: Final = 1 << 6
EPTE_SUPERPAGE: Final = 1 << 7
EPTE_ACCESSED: Final = 1 << 8
EPTE_DIRTY: Final = 1 << 9
EPTE_MFN_SHIFT: Final = 12
EPTE_MFN_FIELD: Final = MAX_MFN << EPTE_MFN_SHIFT
EPTE_SUPPRESS_VE: Final = 1 << 63
EMT_UC: Final = 0
EMT_WB: Final = 6

# EPTP: paging-structure memory type in bits 0-2, page-walk length minus one in bits 3-5.
EPTP_MEMORY_TYPE_WB: Final = 6
EPTP_WALK_LENGTH_SHIFT: Final = 3
EPTP_WALK_LENGTH_4: Final = 3

# Bits the CPU ignores in a leaf entry, hence where software may keep data:
# 10 and 11 (11 is VT-d snoop only when EPT is shared with the IOMMU) and 52-62.
SOFTWARE_BITS: Final = frozenset({10, 11, *range(52, 63)})

#: Pages mapped by one entry of each level.
LEVEL_PAGES: Final = (0, 1, 512, 512 * 512, 512 * 512 * 512)


def _type_table() -> tuple[list[int], list[bool], list[int]]:
    """Per-type hardware permissions, whether the type maps a frame, and its memory-type bits.

    Permissions follow Xen's ept_p2m_type_to_flags (no PML, no read-only MMIO ranges):
    log-dirty and read-only RAM lose W so writes exit; PoD, mmio_dm and paged-out
    memory are not present at all so every access exits.
    """
    perms = [0] * 256
    has_mfn = [False] * 256
    rw, rx, r = PERM_R | PERM_W, PERM_R | PERM_X, PERM_R
    perm_of = {
        P2mType.RAM_RW: PERM_RWX,
        P2mType.RAM_LOGDIRTY: rx,
        P2mType.RAM_RO: rx,
        P2mType.MMIO_DIRECT: PERM_RWX,
        P2mType.GRANT_MAP_RW: rw,
        P2mType.GRANT_MAP_RO: r,
        P2mType.RAM_SHARED: rx,
        P2mType.MAP_FOREIGN: rw,
        P2mType.IOREQ_SERVER: r,
    }
    unbacked = {
        P2mType.INVALID,
        P2mType.MMIO_DM,
        P2mType.POPULATE_ON_DEMAND,
        P2mType.RAM_PAGED,
        P2mType.RAM_PAGING_IN,
    }
    emt_bits = [0] * 256
    for t in P2mType:
        perms[t] = perm_of.get(t, 0)
        has_mfn[t] = t not in unbacked
        if has_mfn[t]:
            # Xen's choice for a domain without passed-through devices: WB (UC for MMIO),
            # guest PAT ignored.
            emt = EMT_UC if t == P2mType.MMIO_DIRECT else EMT_WB
            emt_bits[t] = (emt << EPTE_EMT_SHIFT) | EPTE_IPAT
    return perms, has_mfn, emt_bits


_PERMS_LIST, _HAS_MFN_LIST, _EMT_LIST = _type_table()
_TYPE_PERMS: Final = np.array(_PERMS_LIST, dtype=np.uint64)
_TYPE_HAS_MFN: Final = np.array(_HAS_MFN_LIST, dtype=bool)
_TYPE_EMT_BITS: Final = np.array(_EMT_LIST, dtype=np.uint64)
_TYPE_VALID: Final = np.zeros(256, dtype=bool)
_TYPE_VALID[[int(t) for t in P2mType]] = True

# How each access value restricts the type's permissions (Xen: rx2rw acts as rx, n2rwx as n).
_ACCESS_MASK_LIST = [0] * 256
for _a in P2mAccess:
    _ACCESS_MASK_LIST[_a] = int(_a) & PERM_RWX if _a <= P2mAccess.RWX else 0
_ACCESS_MASK_LIST[P2mAccess.RX2RW] = PERM_R | PERM_X
_ACCESS_MASK: Final = np.array(_ACCESS_MASK_LIST, dtype=np.uint64)
_ACCESS_VALID: Final = np.zeros(256, dtype=bool)
_ACCESS_VALID[[int(a) for a in P2mAccess]] = True

# Enum members by raw value, for cheap decoding; raw ints where no member exists
# (what a build sees when it decodes another build's bits).
_TYPE_BY_VALUE: Final[tuple[int, ...]] = tuple(
    P2mType(v) if v in P2mType._value2member_map_ else v for v in range(256)
)
_ACCESS_BY_VALUE: Final[tuple[int, ...]] = tuple(
    P2mAccess(v) if v in P2mAccess._value2member_map_ else v for v in range(256)
)

_U64_ARANGE_512: Final = np.arange(ENTRIES_PER_TABLE, dtype=np.uint64)
_LEVEL_PAGES_ARRAY: Final = np.array(LEVEL_PAGES, dtype=np.uint64)
# Marks a summarised entry whose children differ, so its parent cannot be uniform.
_MIXED: Final = 255


def type_permissions(p2m_type: int, access: int) -> int:
    """Hardware R/W/X (bit mask) of a leaf with this type and access."""
    return _PERMS_LIST[p2m_type] & _ACCESS_MASK_LIST[access]


def type_has_mfn(p2m_type: int) -> bool:
    """Whether entries of this type map a machine frame (PoD, mmio_dm, paged-out: no)."""
    return _HAS_MFN_LIST[p2m_type]


T = TypeVar("T")


class EptFields(NamedTuple, Generic[T]):
    """Every field of EPT entries, as ints (`decode_entry`) or arrays (`decode`)."""

    perms: T
    memory_type: T
    ignore_pat: T
    superpage: T
    accessed: T
    dirty: T
    recalc: T
    mfn: T
    p2m_type: T
    access: T
    suppress_ve: T


def _field_bits(shift: int, width: int) -> set[int]:
    return set(range(shift, shift + width))


@dataclass(frozen=True)
class EptLayout:
    """Where one hypervisor build keeps its software bits in EPT entries."""

    build: str
    type_shift: int
    type_width: int
    access_shift: int
    access_width: int
    recalc_bit: int

    def __post_init__(self) -> None:
        if self.type_width < 4 or self.access_width < 4:
            raise EptError(
                f"EPT layout {self.build}: p2m type and access need at least 4 bits each "
                f"(got {self.type_width} and {self.access_width})"
            )
        fields = {
            "p2m type": _field_bits(self.type_shift, self.type_width),
            "access": _field_bits(self.access_shift, self.access_width),
            "recalc": {self.recalc_bit},
        }
        for name, bits in fields.items():
            if not bits <= SOFTWARE_BITS:
                raise EptError(
                    f"EPT layout {self.build}: {name} bits {sorted(bits - SOFTWARE_BITS)} "
                    "are used by the CPU (software may use bits 10, 11 and 52-62)"
                )
        names = list(fields)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                if fields[a] & fields[b]:
                    raise EptError(f"EPT layout {self.build}: {a} and {b} bits overlap")

    @property
    def type_mask(self) -> int:
        return (1 << self.type_width) - 1

    @property
    def access_mask(self) -> int:
        return (1 << self.access_width) - 1

    # -- single entries ---------------------------------------------------------------

    def encode_leaf(
        self, mfn: int, p2m_type: int, access: int, level: int = 1, *, recalc: bool = False
    ) -> int:
        """The leaf entry mapping one 4 KiB page (level 1) or superpage (2, 3) at `mfn`.

        An INVALID type encodes as 0, an empty slot. Types that map no frame
        (PoD, mmio_dm, paged) ignore `mfn` and store 0 there.
        """
        t, a = int(p2m_type), int(access)
        if not (0 <= t < 256 and _TYPE_VALID[t]):
            raise EptError(f"unknown p2m type {p2m_type!r}")
        if not (0 <= a < 256 and _ACCESS_VALID[a]):
            raise EptError(f"unknown p2m access {access!r}")
        if level not in (1, 2, 3):
            raise EptError(f"EPT leaf level must be 1, 2 or 3 (4K, 2M, 1G), not {level!r}")
        if t == P2mType.INVALID:
            return 0
        entry = (_PERMS_LIST[t] & _ACCESS_MASK_LIST[a]) | _EMT_LIST[t] | EPTE_SUPPRESS_VE
        if _HAS_MFN_LIST[t]:
            if not isinstance(mfn, int | np.integer) or not 0 <= mfn <= MAX_MFN:
                raise EptError(f"mfn {mfn!r} does not fit the 40-bit EPT MFN field")
            mfn = int(mfn)
            if mfn % LEVEL_PAGES[level]:
                raise EptError(f"mfn {mfn:#x} is not aligned for a level-{level} superpage")
            entry |= mfn << EPTE_MFN_SHIFT
        if level > 1:
            entry |= EPTE_SUPERPAGE
        if recalc:
            entry |= 1 << self.recalc_bit
        return entry | (t << self.type_shift) | (a << self.access_shift)

    def decode_entry(self, entry: int) -> EptFields[int]:
        """All fields of one entry, raw (no meaning given to an empty or foreign entry)."""
        e = int(entry)
        return EptFields(
            perms=e & EPTE_PERM_MASK,
            memory_type=(e >> EPTE_EMT_SHIFT) & 7,
            ignore_pat=(e >> 6) & 1,
            superpage=(e >> 7) & 1,
            accessed=(e >> 8) & 1,
            dirty=(e >> 9) & 1,
            recalc=(e >> self.recalc_bit) & 1,
            mfn=(e >> EPTE_MFN_SHIFT) & MAX_MFN,
            p2m_type=_TYPE_BY_VALUE[(e >> self.type_shift) & self.type_mask],
            access=_ACCESS_BY_VALUE[(e >> self.access_shift) & self.access_mask],
            suppress_ve=(e >> 63) & 1,
        )

    # -- arrays -----------------------------------------------------------------------

    def encode_leaves(
        self, mfn: npt.ArrayLike, p2m_type: npt.ArrayLike, access: npt.ArrayLike, level: int = 1
    ) -> U64Array:
        """Vectorised `encode_leaf` (arguments broadcast against each other)."""
        if level not in (1, 2, 3):
            raise EptError(f"EPT leaf level must be 1, 2 or 3 (4K, 2M, 1G), not {level!r}")
        m, t, a = np.broadcast_arrays(
            np.asarray(mfn), np.asarray(p2m_type), np.asarray(access)
        )
        t8, a8 = _as_code(t, _TYPE_VALID, "p2m type"), _as_code(a, _ACCESS_VALID, "p2m access")
        m64 = _as_u64(m, "mfn")
        backed = _TYPE_HAS_MFN[t8]
        bad = backed & ((m64 > MAX_MFN) | (m64 % np.uint64(LEVEL_PAGES[level]) != 0))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise EptError(
                f"mfn {int(m64.flat[i]):#x} (element {i}) does not fit the 40-bit EPT MFN "
                f"field or is not aligned for a level-{level} leaf"
            )
        return self._encode_valid(m64, t8, a8, level)

    def _encode_valid(self, mfn: U64Array, t8: U8Array, a8: U8Array, level: int) -> U64Array:
        """encode_leaves without checks: callers have validated every element."""
        entries = (_TYPE_PERMS[t8] & _ACCESS_MASK[a8]) | _TYPE_EMT_BITS[t8]
        entries |= np.where(_TYPE_HAS_MFN[t8], mfn, np.uint64(0)) << np.uint64(EPTE_MFN_SHIFT)
        entries |= t8.astype(np.uint64) << np.uint64(self.type_shift)
        entries |= a8.astype(np.uint64) << np.uint64(self.access_shift)
        entries |= np.uint64(EPTE_SUPPRESS_VE | (EPTE_SUPERPAGE if level > 1 else 0))
        entries[t8 == P2mType.INVALID] = 0
        return entries

    def decode(self, entries: npt.ArrayLike) -> EptFields[np.ndarray]:
        """Vectorised `decode_entry`: every field as an array (p2m_type/access as uint8)."""
        e = _as_u64(np.asarray(entries), "EPT entries")

        def bits(shift: int, mask: int) -> np.ndarray:
            return (e >> np.uint64(shift)) & np.uint64(mask)

        return EptFields(
            perms=bits(0, 7).astype(np.uint8),
            memory_type=bits(EPTE_EMT_SHIFT, 7).astype(np.uint8),
            ignore_pat=bits(6, 1).astype(bool),
            superpage=bits(7, 1).astype(bool),
            accessed=bits(8, 1).astype(bool),
            dirty=bits(9, 1).astype(bool),
            recalc=bits(self.recalc_bit, 1).astype(bool),
            mfn=bits(EPTE_MFN_SHIFT, MAX_MFN),
            p2m_type=bits(self.type_shift, self.type_mask).astype(np.uint8),
            access=bits(self.access_shift, self.access_mask).astype(np.uint8),
            suppress_ve=bits(63, 1).astype(bool),
        )


#: Each build's layout, keyed by build version string.
EPT_LAYOUTS: Final[dict[str, EptLayout]] = {
    "4.12": EptLayout(
        build="4.12", type_shift=52, type_width=6, access_shift=58, access_width=4, recalc_bit=10
    ),
    "4.19": EptLayout(
        build="4.19", type_shift=52, type_width=6, access_shift=59, access_width=4, recalc_bit=10
    ),
}


def _as_code(values: np.ndarray, valid: np.ndarray, what: str) -> U8Array:
    """Small enum codes as uint8, refusing anything that is not a known value."""
    if values.dtype.kind not in "iub":
        raise EptError(f"{what} values must be integers, not {values.dtype}")
    out_of_range = (values < 0) | (values > 255) if values.dtype.kind == "i" else values > 255
    if out_of_range.any():
        raise EptError(f"unknown {what} {int(values[out_of_range].flat[0])}")
    codes = values.astype(np.uint8)
    bad = ~valid[codes]
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise EptError(f"unknown {what} {int(codes.flat[i])} (element {i})")
    return codes


def _as_u64(values: np.ndarray, what: str) -> U64Array:
    if values.dtype == np.uint64:
        return values
    if values.dtype.kind not in "iu":
        raise EptError(f"{what} must be integers, not {values.dtype}")
    if values.dtype.kind == "i" and (values < 0).any():
        raise EptError(f"{what} must not be negative")
    return values.astype(np.uint64)


def _nonleaf(table_mfn: int) -> int:
    """A non-leaf entry: full permissions (the leaves restrict), pointing at a table."""
    return PERM_RWX | (table_mfn << EPTE_MFN_SHIFT)


def make_eptp(root_mfn: int) -> int:
    """EPTP for a 4-level EPT rooted at `root_mfn`, paging structures write-back."""
    return (
        (root_mfn << EPTE_MFN_SHIFT)
        | (EPTP_WALK_LENGTH_4 << EPTP_WALK_LENGTH_SHIFT)
        | EPTP_MEMORY_TYPE_WB
    )


class EptWalk(NamedTuple):
    """One translation. `mfn` is the 4 KiB frame holding the address (INVALID_MFN for
    types that map none); `perms` the R/W/X the hardware grants (0: every access exits)."""

    mfn: MFN
    p2m_type: int
    access: int
    level: int
    perms: int


@dataclass(frozen=True)
class EptLookup:
    """Translations of many gfns. Unmapped gfns: INVALID_MFN, INVALID, DEFAULT_ACCESS,
    level 0, perms 0."""

    mfn: U64Array
    p2m_type: U8Array
    access: U8Array
    level: U8Array
    perms: U8Array


@dataclass(frozen=True)
class _Tree:
    root: int
    frames: dict[int, int]  # table mfn -> level of the entries it holds


def _check_mem(mem: np.ndarray) -> None:
    if not isinstance(mem, np.ndarray) or mem.dtype != np.uint64 or mem.ndim != 1:
        raise EptError("host memory must be a 1-D numpy uint64 array")
    if mem.size % ENTRIES_PER_TABLE:
        raise EptError("host memory must be a whole number of 4 KiB frames")


def _summarise(
    m: U64Array, t: U8Array, a: U8Array, child_level: int
) -> tuple[U64Array, U8Array, U8Array]:
    """Summarise 512 entries of `child_level` into one entry of the level above.

    The summary is uniform (and could be one leaf) when all children are uniform with
    the same type and access and, for types with frames, map contiguous frames starting
    at a frame aligned to the parent's span. Otherwise its type is _MIXED.
    """
    span = LEVEL_PAGES[child_level]
    m2, t2, a2 = m.reshape(-1, 512), t.reshape(-1, 512), a.reshape(-1, 512)
    t0, a0, m0 = t2[:, 0], a2[:, 0], m2[:, 0]
    uniform = (t0 != _MIXED) & (t2 == t0[:, None]).all(axis=1) & (a2 == a0[:, None]).all(axis=1)
    backed = _TYPE_HAS_MFN[t0]
    step = _U64_ARANGE_512 * np.uint64(span)
    contiguous = (m2 == m0[:, None] + step).all(axis=1) & (m0 % np.uint64(span * 512) == 0)
    leafable = uniform & (~backed | contiguous)
    return (
        np.where(leafable & backed, m0, np.uint64(0)),
        np.where(leafable, t0, np.uint8(_MIXED)).astype(np.uint8),
        np.where(leafable, a0, np.uint8(0)).astype(np.uint8),
    )


def _pad(arr: np.ndarray, fill: int) -> np.ndarray:
    extra = (-arr.size) % ENTRIES_PER_TABLE
    if extra == 0 and arr.size:
        return arr
    if arr.size == 0:
        extra = ENTRIES_PER_TABLE
    return np.concatenate([arr, np.full(extra, fill, dtype=arr.dtype)])


def _build_tree(
    mem: U64Array,
    layout: EptLayout,
    mfn: U64Array,
    t: U8Array,
    a: U8Array,
    alloc_frame: AllocFrame,
    free_frame: FreeFrame,
    max_leaf_level: int,
) -> _Tree:
    """Build a whole EPT for validated P2M arrays: superpages wherever allowed."""
    # Canonical values where they carry no meaning, so they cannot break uniformity.
    invalid = P2mType.INVALID
    m1 = np.where(_TYPE_HAS_MFN[t], mfn, np.uint64(0))
    a1 = np.where(t == invalid, np.uint8(0), a).astype(np.uint8)
    per_level = {1: (_pad(m1, 0), _pad(t, invalid), _pad(a1, 0))}
    for level in (2, 3, 4):
        m_s, t_s, a_s = _summarise(*per_level[level - 1], child_level=level - 1)
        per_level[level] = (_pad(m_s, 0), _pad(t_s, invalid), _pad(a_s, 0))
    if per_level[4][1].size != ENTRIES_PER_TABLE:
        raise EptError("P2M larger than a 4-level EPT can map")

    # Top-down: which entries are leaves and which point at a table of the level below.
    has_table = {4: per_level[4][1] != invalid}
    leaf: dict[int, np.ndarray] = {}
    for level in (3, 2):
        t_l = per_level[level][1]
        parent = np.repeat(has_table[level + 1][: t_l.size // 512], 512)
        empty = t_l == invalid
        leaf[level] = parent & ~empty & (t_l != _MIXED) & (level <= max_leaf_level)
        has_table[level] = parent & ~empty & ~leaf[level]

    frames: dict[int, int] = {}
    n_frames = mem.size // ENTRIES_PER_TABLE

    def take_frame(level: int) -> int:
        f = alloc_frame()
        if not isinstance(f, int | np.integer) or not 0 <= int(f) < n_frames:
            raise EptError(f"alloc_frame returned {f!r}, not a frame of host memory")
        if int(f) in frames:
            raise EptError(f"alloc_frame returned frame {int(f):#x} twice")
        frames[int(f)] = level
        return int(f)

    child_mfn: dict[int, U64Array] = {}
    try:
        root = take_frame(4)
        for level in (4, 3, 2):
            children = np.zeros(has_table[level].size, dtype=np.uint64)
            for j in np.flatnonzero(has_table[level]):
                children[j] = take_frame(level - 1)
            child_mfn[level] = children
    except BaseException:
        for f in frames:
            free_frame(f)
        raise

    def entries_of(level: int) -> U64Array:
        m_l, t_l, a_l = per_level[level]
        if level == 1:
            return layout._encode_valid(m_l, t_l, a_l, 1)
        out = np.zeros(t_l.size, dtype=np.uint64)
        if level in leaf:
            sel = leaf[level]
            out[sel] = layout._encode_valid(m_l[sel], t_l[sel], a_l[sel], level)
        sel = has_table[level]
        out[sel] = np.uint64(PERM_RWX) | (child_mfn[level][sel] << np.uint64(EPTE_MFN_SHIFT))
        return out

    mem[root * 512 : (root + 1) * 512] = entries_of(4)
    for level in (4, 3, 2):
        js = np.flatnonzero(has_table[level])
        if js.size == 0:
            continue
        slots = (child_mfn[level][js][:, None] * np.uint64(512) + _U64_ARANGE_512).ravel()
        mem[slots] = entries_of(level - 1).reshape(-1, 512)[js].ravel()
    return _Tree(root=root, frames=frames)


def check_p2m_arrays(
    mfn: npt.ArrayLike, p2m_type: npt.ArrayLike, access: npt.ArrayLike
) -> tuple[U64Array, U8Array, U8Array]:
    """Validate pfn-indexed P2M arrays; return them as (uint64, uint8, uint8) arrays."""
    m, t, a = np.asarray(mfn), np.asarray(p2m_type), np.asarray(access)
    if m.ndim != 1 or t.shape != m.shape or a.shape != m.shape:
        raise EptError(
            f"P2M arrays must be 1-D and of one length (mfn {m.shape}, type {t.shape}, "
            f"access {a.shape})"
        )
    if m.size > GFN_LIMIT:
        raise EptError(f"P2M of {m.size} gfns exceeds the 2**36 a 4-level EPT maps")
    t8 = _as_code(t, _TYPE_VALID, "p2m type")
    a8 = _as_code(a, _ACCESS_VALID, "p2m access")
    m64 = _as_u64(m, "mfn")
    bad = _TYPE_HAS_MFN[t8] & (m64 > MAX_MFN)
    if bad.any():
        g = int(np.flatnonzero(bad)[0])
        raise EptError(
            f"gfn {g:#x}: type {P2mType(int(t8[g])).name} needs an mfn, got {int(m64[g]):#x}"
        )
    return m64, t8, a8


class EptTables:
    """A 4-level EPT in host memory for one P2M, in one build's layout."""

    def __init__(
        self,
        mem: U64Array,
        layout: EptLayout,
        tree: _Tree,
        alloc_frame: AllocFrame,
        free_frame: FreeFrame,
        max_leaf_level: int,
    ) -> None:
        """Use `build` or `from_eptp`."""
        self._mem = mem
        self._layout = layout
        self._root = tree.root
        self._frames = dict(tree.frames)
        self._alloc_frame = alloc_frame
        self._free_frame = free_frame
        self._max_leaf_level = max_leaf_level
        self._n_frames = mem.size // ENTRIES_PER_TABLE
        self._destroyed = False
        # Layout constants as plain ints: walk() is on the TLB-fill path.
        self._type_shift = layout.type_shift
        self._type_mask = layout.type_mask
        self._access_shift = layout.access_shift
        self._access_mask = layout.access_mask
        #: Bumped by every change, so translation caches know to flush.
        self.generation = 0

    # -- construction -----------------------------------------------------------------

    @classmethod
    def build(
        cls,
        mem: U64Array,
        layout: EptLayout,
        mfn: npt.ArrayLike,
        p2m_type: npt.ArrayLike,
        access: npt.ArrayLike,
        alloc_frame: AllocFrame,
        free_frame: FreeFrame,
        *,
        max_leaf_level: int = 3,
    ) -> EptTables:
        """Build tables mapping gfn i as (mfn[i], p2m_type[i], access[i]).

        2 MiB / 1 GiB leaves wherever the gfns below are uniform in type and access and
        (for types with frames) contiguous from an aligned frame; `max_leaf_level` 1
        forbids superpages, 2 allows only 2 MiB ones. If alloc_frame fails, every frame
        taken so far is freed and the exception propagates.
        """
        _check_mem(mem)
        if max_leaf_level not in (1, 2, 3):
            raise EptError(f"max_leaf_level must be 1, 2 or 3, not {max_leaf_level!r}")
        m, t, a = check_p2m_arrays(mfn, p2m_type, access)
        tree = _build_tree(mem, layout, m, t, a, alloc_frame, free_frame, max_leaf_level)
        return cls(mem, layout, tree, alloc_frame, free_frame, max_leaf_level)

    @classmethod
    def from_eptp(
        cls,
        mem: U64Array,
        eptp: int,
        layout: EptLayout,
        alloc_frame: AllocFrame,
        free_frame: FreeFrame,
    ) -> EptTables:
        """Adopt tables already in host memory, reading their software bits with `layout`.

        Finding the table frames needs only hardware bits, so any build can adopt (and
        free) another build's tables; their types and access decode right only with the
        layout that wrote them.
        """
        _check_mem(mem)
        if eptp & 7 != EPTP_MEMORY_TYPE_WB or (eptp >> EPTP_WALK_LENGTH_SHIFT) & 7 != 3:
            raise EptError(f"EPTP {eptp:#x} is not a write-back 4-level EPTP")
        n_frames = mem.size // ENTRIES_PER_TABLE
        root = (eptp >> EPTE_MFN_SHIFT) & MAX_MFN
        if root >= n_frames:
            raise EptError(f"EPTP {eptp:#x} points outside host memory")
        frames = {root: 4}
        current = np.array([root], dtype=np.uint64)
        for level in (4, 3, 2):
            slots = (current[:, None] * np.uint64(512) + _U64_ARANGE_512).ravel()
            e = mem[slots]
            nonleaf = (e & np.uint64(EPTE_PERM_MASK)) != 0
            if level < 4:  # bit 7 is reserved in the root, "superpage" below it
                nonleaf &= (e & np.uint64(EPTE_SUPERPAGE)) == 0
            current = (e[nonleaf] >> np.uint64(EPTE_MFN_SHIFT)) & np.uint64(MAX_MFN)
            for f in current.tolist():
                if f >= n_frames or f in frames:
                    raise EptError(
                        f"EPT at {eptp:#x} is not a tree of host frames (table {f:#x})"
                    )
                frames[f] = level - 1
        return cls(mem, layout, _Tree(root, frames), alloc_frame, free_frame, 3)

    # -- properties -------------------------------------------------------------------

    @property
    def layout(self) -> EptLayout:
        return self._layout

    @property
    def root_mfn(self) -> int:
        return self._root

    @property
    def eptp(self) -> int:
        """EPTP: root MFN, write-back paging structures, 4-level walk."""
        return make_eptp(self._root)

    @property
    def frames(self) -> dict[int, int]:
        """Table frames in use: mfn -> level of the entries in it (4 = root)."""
        return dict(self._frames)

    # -- translation ------------------------------------------------------------------

    def walk(self, gpa: GPA) -> EptWalk | None:
        """Translate one guest-physical address by reading the tables in host memory.

        None when nothing is mapped (including addresses beyond 48 bits). Entries that
        exist but grant no access (PoD, mmio_dm) come back with perms 0.
        """
        if self._destroyed:
            raise EptError("EPT tables were destroyed")
        if gpa < 0:
            raise EptError(f"negative guest-physical address {gpa}")
        if gpa >> 48:
            return None
        item = self._mem.item
        table = self._root
        perms = PERM_RWX
        gfn = gpa >> 12
        for level in (4, 3, 2, 1):
            e = item(table * 512 + ((gfn >> (9 * (level - 1))) & 511))
            if e == 0:
                return None
            if level == 1 or (level < 4 and e & EPTE_SUPERPAGE):
                return self._leaf(e, level, gfn, perms)
            perms &= e
            if not perms & PERM_RWX:
                return None
            table = (e >> EPTE_MFN_SHIFT) & MAX_MFN
            if table >= self._n_frames:
                raise EptError(f"EPT entry {e:#x} points outside host memory")
        raise AssertionError("unreachable")  # pragma: no cover

    def _leaf(self, e: int, level: int, gfn: int, path_perms: int) -> EptWalk | None:
        t = (e >> self._type_shift) & self._type_mask
        if t == P2mType.INVALID:
            return None
        a = (e >> self._access_shift) & self._access_mask
        if _HAS_MFN_LIST[t]:
            mfn = MFN(((e >> EPTE_MFN_SHIFT) & MAX_MFN) + (gfn & (LEVEL_PAGES[level] - 1)))
        else:
            mfn = MFN(INVALID_MFN)
        return EptWalk(mfn, _TYPE_BY_VALUE[t], _ACCESS_BY_VALUE[a], level, e & path_perms & 7)

    def lookup_many(self, gfns: npt.ArrayLike) -> EptLookup:
        """Vectorised translation of many gfns (a level-by-level walk over all of them)."""
        if self._destroyed:
            raise EptError("EPT tables were destroyed")
        g = _as_u64(np.asarray(gfns).ravel(), "gfns")
        if g.size and int(g.max()) >= GFN_LIMIT:
            raise EptError(f"gfn {int(g.max()):#x} is beyond what a 4-level EPT maps")
        mem = self._mem
        n = g.size
        entry = np.zeros(n, dtype=np.uint64)
        level = np.zeros(n, dtype=np.uint8)
        path_perms = np.full(n, PERM_RWX, dtype=np.uint64)
        pos = np.arange(n)
        table = np.full(n, self._root, dtype=np.uint64)
        perm_mask = np.uint64(EPTE_PERM_MASK)
        for lvl in (4, 3, 2, 1):
            if pos.size == 0:
                break
            shift = np.uint64(9 * (lvl - 1))
            e = mem[table * np.uint64(512) + ((g[pos] >> shift) & np.uint64(511))]
            present = e != 0
            if lvl == 1:
                is_leaf = present
            elif lvl == 4:
                is_leaf = np.zeros(pos.size, dtype=bool)
            else:
                is_leaf = present & ((e & np.uint64(EPTE_SUPERPAGE)) != 0)
            entry[pos[is_leaf]] = e[is_leaf]
            level[pos[is_leaf]] = lvl
            go = present & ~is_leaf & ((e & perm_mask) != 0)
            pos = pos[go]
            path_perms[pos] &= e[go] & perm_mask
            table = (e[go] >> np.uint64(EPTE_MFN_SHIFT)) & np.uint64(MAX_MFN)
            if table.size and int(table.max()) >= self._n_frames:
                raise EptError("EPT entry points outside host memory")

        fields = self._layout.decode(entry)
        t, a = fields.p2m_type, fields.access
        mapped = (level != 0) & (t != P2mType.INVALID)
        backed = mapped & _TYPE_HAS_MFN[t]
        offset = g & (_LEVEL_PAGES_ARRAY[level] - np.uint64(1))
        return EptLookup(
            mfn=np.where(backed, fields.mfn + offset, np.uint64(INVALID_MFN)),
            p2m_type=np.where(mapped, t, np.uint8(P2mType.INVALID)).astype(np.uint8),
            access=np.where(mapped, a, np.uint8(DEFAULT_ACCESS)).astype(np.uint8),
            level=np.where(mapped, level, np.uint8(0)).astype(np.uint8),
            perms=np.where(mapped, fields.perms & path_perms, 0).astype(np.uint8),
        )

    # -- updates ----------------------------------------------------------------------

    def set_entry(self, gfn: PFN, mfn: MFN, p2m_type: int, access: int) -> None:
        """Map one 4 KiB gfn, splitting any superpage over it (other gfns keep their
        translations). INVALID unmaps. If alloc_frame fails nothing changes."""
        if self._destroyed:
            raise EptError("EPT tables were destroyed")
        if not 0 <= gfn < GFN_LIMIT:
            raise EptError(f"gfn {gfn:#x} is beyond what a 4-level EPT maps")
        new = self._layout.encode_leaf(mfn, p2m_type, access, 1)
        mem = self._mem
        table = self._root
        for level in (4, 3, 2):
            slot = table * 512 + ((gfn >> (9 * (level - 1))) & 511)
            e = mem.item(slot)
            if e == 0 or (level < 4 and e & EPTE_SUPERPAGE):
                break
            table = (e >> EPTE_MFN_SHIFT) & MAX_MFN
        else:
            mem[table * 512 + (gfn & 511)] = new
            self.generation += 1
            return
        # The walk stopped at `level`: an empty slot or a superpage covering gfn.
        if e == 0 and new == 0:
            return
        if e != 0 and self._superpage_entry_for(e, level, gfn) == new:
            return  # the superpage already says exactly this
        frames = self._take_frames(level - 1)
        links: list[tuple[int, int]] = []
        parent_slot, cur, cur_level = slot, e, level
        for f in frames:
            contents = (
                self._split(cur, cur_level) if cur else np.zeros(512, dtype=np.uint64)
            )
            mem[f * 512 : (f + 1) * 512] = contents
            self._frames[f] = cur_level - 1
            links.append((parent_slot, f))
            cur_level -= 1
            i = (gfn >> (9 * (cur_level - 1))) & 511
            cur = int(contents[i])
            parent_slot = f * 512 + i
        mem[parent_slot] = new
        # Link deepest first, so a concurrent walker sees either the old or the new subtree.
        for parent, f in reversed(links):
            mem[parent] = _nonleaf(f)
        self.generation += 1

    def _take_frames(self, count: int) -> list[int]:
        taken: list[int] = []
        try:
            for _ in range(count):
                f = self._alloc_frame()
                if not isinstance(f, int | np.integer) or not 0 <= int(f) < self._n_frames:
                    raise EptError(f"alloc_frame returned {f!r}, not a frame of host memory")
                if int(f) in self._frames or int(f) in taken:
                    raise EptError(f"alloc_frame returned frame {int(f):#x}, already in use")
                taken.append(int(f))
        except BaseException:
            for f in taken:
                self._free_frame(f)
            raise
        return taken

    def _superpage_type(self, e: int) -> int:
        t = (e >> self._type_shift) & self._type_mask
        if not _TYPE_VALID[t]:
            raise EptError(
                f"superpage entry {e:#x} has p2m type {t}, unknown in the {self._layout.build} "
                "layout: cannot split it"
            )
        return t

    def _split(self, e: int, level: int) -> U64Array:
        """The 512 entries one level down that map exactly what superpage `e` maps."""
        t = self._superpage_type(e)
        child_level = level - 1
        base = e & ~EPTE_MFN_FIELD
        if child_level == 1:
            base &= ~EPTE_SUPERPAGE
        entries = np.full(512, base, dtype=np.uint64)
        if _HAS_MFN_LIST[t]:
            first = (e >> EPTE_MFN_SHIFT) & MAX_MFN
            mfns = np.uint64(first) + _U64_ARANGE_512 * np.uint64(LEVEL_PAGES[child_level])
            entries |= mfns << np.uint64(EPTE_MFN_SHIFT)
        return entries

    def _superpage_entry_for(self, e: int, level: int, gfn: int) -> int:
        """The 4 KiB entry superpage `e` implies for `gfn`."""
        t = self._superpage_type(e)
        entry = e & ~EPTE_SUPERPAGE
        if _HAS_MFN_LIST[t]:
            first = (e >> EPTE_MFN_SHIFT) & MAX_MFN
            entry = (entry & ~EPTE_MFN_FIELD) | (
                (first + (gfn & (LEVEL_PAGES[level] - 1))) << EPTE_MFN_SHIFT
            )
        return entry

    def change_type_global(self, old: int, new: int) -> int:
        """Retype every leaf of type `old` to `new` in place (superpages stay whole).

        Both types must agree on mapping a frame. Returns how many entries changed.
        Xen defers this with the recalc bit and EPT misconfigurations; hvlab rewrites
        the leaves at once, which gives the guest the same view.
        """
        if self._destroyed:
            raise EptError("EPT tables were destroyed")
        for what, t in (("old", old), ("new", new)):
            if not (0 <= int(t) < 256 and _TYPE_VALID[int(t)]) or t == P2mType.INVALID:
                raise EptError(f"change_type_global: {what} type {t!r} is not a mappable type")
        if _HAS_MFN_LIST[old] != _HAS_MFN_LIST[new]:
            raise EptError(
                f"change_type_global: {P2mType(old).name} and {P2mType(new).name} "
                "differ in whether they map a frame"
            )
        changed = 0
        for level in (1, 2, 3):
            tables = np.array([f for f, lv in self._frames.items() if lv == level], np.uint64)
            if tables.size == 0:
                continue
            slots = (tables[:, None] * np.uint64(512) + _U64_ARANGE_512).ravel()
            e = self._mem[slots]
            fields = self._layout.decode(e)
            is_leaf = (e != 0) if level == 1 else fields.superpage
            sel = is_leaf & (fields.p2m_type == old)
            if not sel.any():
                continue
            new_t = np.full(int(sel.sum()), int(new), dtype=np.uint8)
            self._mem[slots[sel]] = self._layout._encode_valid(
                fields.mfn[sel], new_t, fields.access[sel], level
            )
            changed += int(sel.sum())
        if changed:
            self.generation += 1
        return changed

    def reload(self, mfn: npt.ArrayLike, p2m_type: npt.ArrayLike, access: npt.ArrayLike) -> None:
        """Replace every mapping with these P2M arrays, keeping the root (and EPTP).

        The new tree is built completely before anything is swapped in, so a failure
        leaves the old tables untouched.
        """
        if self._destroyed:
            raise EptError("EPT tables were destroyed")
        m, t, a = check_p2m_arrays(mfn, p2m_type, access)
        tree = _build_tree(
            self._mem,
            self._layout,
            m,
            t,
            a,
            self._alloc_frame,
            self._free_frame,
            self._max_leaf_level,
        )
        old = [f for f in self._frames if f != self._root]
        self._mem[self._root * 512 : (self._root + 1) * 512] = self._mem[
            tree.root * 512 : (tree.root + 1) * 512
        ]
        new_frames = dict(tree.frames)
        del new_frames[tree.root]
        self._free_frame(tree.root)
        self._frames = {self._root: 4, **new_frames}
        for f in old:
            self._free_frame(f)
        self.generation += 1

    def destroy(self) -> None:
        """Give every table frame back through free_frame; the object is then unusable."""
        if self._destroyed:
            raise EptError("EPT tables were already destroyed")
        self._destroyed = True
        frames, self._frames = list(self._frames), {}
        for f in frames:
            self._free_frame(f)
