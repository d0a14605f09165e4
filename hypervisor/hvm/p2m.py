"""The P2M of one HVM domain: the authoritative gfn -> (mfn, p2m type, access) map.

Three pfn-indexed numpy arrays hold it. This, not the EPT, is what a live update hands
over (`save()` / `P2M.restore()`), and what the new build rebuilds its EPT from in its
own layout (`build_ept`). While an EPT is attached, every update goes to both.

Populate-on-demand: `mark_pod` makes gfns PoD (no frame yet, not present in EPT, so
the first access exits); `populate(gfn, mfn)` backs one with a frame as ram_rw.

Log-dirty (Xen's HAP scheme): `enable_logdirty` turns every ram_rw gfn into
ram_logdirty (EPT: not writable); a write fault calls `mark_dirty(gfn)`, which turns it
back to ram_rw (splitting a superpage, as Xen does) and records it in the dirty bitmap.
`take_dirty()` is Xen's CLEAN: it returns and clears the bitmap and write-protects the
dirtied pages again. Any gfn given a new frame while log-dirty is on counts as dirty.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from emulator.addr import MFN, PFN
from hypervisor.hvm.ept import (
    DEFAULT_ACCESS,
    GFN_LIMIT,
    INVALID_MFN,
    MAX_MFN,
    AllocFrame,
    EptError,
    EptLayout,
    EptTables,
    FreeFrame,
    P2mAccess,
    P2mType,
    U8Array,
    U64Array,
    check_p2m_arrays,
    type_has_mfn,
)

# Above this many gfns, one update rebuilds the EPT (vectorised) rather than setting
# entries one by one.
_RELOAD_THRESHOLD = 4096


class P2MError(Exception):
    """Bad input to a P2M operation (bad gfn, type, access, mfn or saved state)."""


@dataclass(frozen=True)
class P2mEntry:
    mfn: MFN
    p2m_type: P2mType
    access: P2mAccess


@dataclass(frozen=True)
class P2MState:
    """Everything a P2M is, as plain data (arrays little-endian, bitmap LSB-first)."""

    nr_gfns: int
    mfn: bytes  # u64 per gfn
    p2m_type: bytes  # u8 per gfn
    access: bytes  # u8 per gfn
    logdirty: bool
    dirty_bitmap: bytes  # 1 bit per gfn


class P2M:
    """gfn -> (mfn, type, access) for one HVM domain, kept in step with its EPT."""

    State = P2MState

    def __init__(self, nr_gfns: int) -> None:
        """An empty P2M for gfns 0 .. nr_gfns-1 (all INVALID)."""
        if not isinstance(nr_gfns, int) or not 0 <= nr_gfns <= GFN_LIMIT:
            raise P2MError(f"nr_gfns must be an int in 0..2**36, not {nr_gfns!r}")
        self._mfn = np.full(nr_gfns, INVALID_MFN, dtype=np.uint64)
        self._type = np.full(nr_gfns, P2mType.INVALID, dtype=np.uint8)
        self._access = np.full(nr_gfns, DEFAULT_ACCESS, dtype=np.uint8)
        self._dirty = np.zeros(nr_gfns, dtype=bool)
        self._logdirty = False
        self._ept: EptTables | None = None

    # -- reading ----------------------------------------------------------------------

    @property
    def nr_gfns(self) -> int:
        return int(self._type.size)

    @property
    def mfns(self) -> U64Array:
        """Read-only view: mfn per gfn (INVALID_MFN where the type maps no frame)."""
        return _readonly(self._mfn)

    @property
    def types(self) -> U8Array:
        """Read-only view: P2mType value per gfn."""
        return _readonly(self._type)

    @property
    def accesses(self) -> U8Array:
        """Read-only view: P2mAccess value per gfn."""
        return _readonly(self._access)

    @property
    def ept(self) -> EptTables | None:
        """The EPT kept in step with this P2M, if one was built."""
        return self._ept

    @property
    def logdirty(self) -> bool:
        return self._logdirty

    @property
    def pod_entries(self) -> int:
        """How many gfns are populate-on-demand (Xen's pod.entry_count)."""
        return int(np.count_nonzero(self._type == P2mType.POPULATE_ON_DEMAND))

    def lookup(self, gfn: PFN) -> P2mEntry:
        g = self._check_gfn(gfn)
        return P2mEntry(
            MFN(int(self._mfn[g])), P2mType(int(self._type[g])), P2mAccess(int(self._access[g]))
        )

    # -- updates ----------------------------------------------------------------------

    def set_entry(
        self, gfn: PFN, mfn: MFN | None, p2m_type: int, access: int | None = None
    ) -> None:
        """Set one gfn. `mfn` is None for types that map no frame; `access` defaults to
        rwx. INVALID unmaps the gfn."""
        g = self._check_gfn(gfn)
        m, t, a = self._check_entry(g, mfn, p2m_type, access)
        if self._ept is not None:
            self._ept.set_entry(g, m, t, a)
        self._store(slice(g, g + 1), m, t, a)

    def set_range(
        self,
        first_gfn: PFN,
        mfns: npt.ArrayLike | None,
        p2m_type: npt.ArrayLike,
        access: npt.ArrayLike | None = None,
    ) -> None:
        """Set gfns first_gfn .. first_gfn+len-1 at once (vectorised).

        `mfns` is an array (its length sets the count) or None with an array `p2m_type`
        for types that map no frame; `p2m_type` and `access` may be scalars.
        """
        if mfns is None:
            t_in = np.asarray(p2m_type)
            if t_in.ndim != 1:
                raise P2MError("set_range without mfns needs p2m_type as a 1-D array")
            m_in = np.full(t_in.size, INVALID_MFN, dtype=np.uint64)
        else:
            m_in = np.asarray(mfns)
            if m_in.ndim != 1:
                raise P2MError("set_range: mfns must be a 1-D array")
        count = m_in.size
        first = self._check_gfn(first_gfn) if count else 0
        if first + count > self.nr_gfns:
            raise P2MError(
                f"gfns {first:#x}..{first + count - 1:#x} run past the P2M's {self.nr_gfns:#x}"
            )
        acc = DEFAULT_ACCESS if access is None else access
        try:
            t_arr = np.broadcast_to(np.asarray(p2m_type), (count,))
            a_arr = np.broadcast_to(np.asarray(acc), (count,))
            m, t, a = check_p2m_arrays(m_in, t_arr, a_arr)
        except (EptError, ValueError) as e:
            raise P2MError(f"set_range at gfn {first:#x}: {e}") from None
        unbacked = ~_has_mfn(t)
        if (unbacked & (m != INVALID_MFN)).any():
            g = first + int(np.flatnonzero(unbacked & (m != INVALID_MFN))[0])
            raise P2MError(f"gfn {g:#x}: its type maps no frame, so its mfn must be INVALID_MFN")
        a = np.where(t == P2mType.INVALID, np.uint8(DEFAULT_ACCESS), a).astype(np.uint8)
        span = slice(first, first + count)
        if self._ept is not None:
            if count > _RELOAD_THRESHOLD:
                new_m, new_t, new_a = self._mfn.copy(), self._type.copy(), self._access.copy()
                new_m[span], new_t[span], new_a[span] = m, t, a
                self._ept.reload(new_m, new_t, new_a)
            else:
                for i in range(count):
                    try:
                        self._ept.set_entry(
                            PFN(first + i), MFN(int(m[i])), int(t[i]), int(a[i])
                        )
                    except BaseException:
                        # Out of table frames part-way: keep the P2M equal to the EPT.
                        self._store(slice(first, first + i), m[:i], t[:i], a[:i])
                        raise
        self._store(span, m, t, a)

    def mark_pod(self, first_gfn: PFN, count: int) -> None:
        """Make `count` gfns from `first_gfn` populate-on-demand."""
        if not isinstance(count, int) or count < 0:
            raise P2MError(f"mark_pod: count must be a non-negative int, not {count!r}")
        types = np.full(count, P2mType.POPULATE_ON_DEMAND, dtype=np.uint8)
        self.set_range(first_gfn, None, types)

    def populate(self, gfn: PFN, mfn: MFN) -> None:
        """Back a PoD gfn with frame `mfn` (ram_rw, its access kept)."""
        g = self._check_gfn(gfn)
        if self._type[g] != P2mType.POPULATE_ON_DEMAND:
            raise P2MError(
                f"populate: gfn {g:#x} is {P2mType(int(self._type[g])).name}, not "
                "populate-on-demand"
            )
        self.set_entry(g, mfn, P2mType.RAM_RW, int(self._access[g]))

    # -- log-dirty --------------------------------------------------------------------

    def enable_logdirty(self) -> None:
        """Start tracking writes: every ram_rw gfn becomes ram_logdirty."""
        if self._logdirty:
            raise P2MError("log-dirty mode is already enabled")
        self._retype_all(P2mType.RAM_RW, P2mType.RAM_LOGDIRTY)
        self._dirty[:] = False
        self._logdirty = True

    def disable_logdirty(self) -> None:
        """Stop tracking: ram_logdirty gfns become ram_rw, the bitmap is dropped."""
        if not self._logdirty:
            raise P2MError("log-dirty mode is not enabled")
        self._retype_all(P2mType.RAM_LOGDIRTY, P2mType.RAM_RW)
        self._dirty[:] = False
        self._logdirty = False

    def mark_dirty(self, gfn: PFN) -> None:
        """A write to `gfn` was seen: make it writable again and record it as dirty."""
        g = self._check_gfn(gfn)
        if not self._logdirty:
            raise P2MError("mark_dirty: log-dirty mode is not enabled")
        t = self._type[g]
        if t == P2mType.RAM_LOGDIRTY:
            self.set_entry(g, MFN(int(self._mfn[g])), P2mType.RAM_RW, int(self._access[g]))
        elif t != P2mType.RAM_RW:
            raise P2MError(
                f"mark_dirty: gfn {g:#x} is {P2mType(int(t)).name}, not writable RAM"
            )
        self._dirty[g] = True

    def take_dirty(self) -> U64Array:
        """Dirty gfns since the last call (sorted); clears the bitmap and write-protects
        them again, like Xen's log-dirty CLEAN."""
        if not self._logdirty:
            raise P2MError("take_dirty: log-dirty mode is not enabled")
        dirty = np.flatnonzero(self._dirty).astype(np.uint64)
        self._retype_all(P2mType.RAM_RW, P2mType.RAM_LOGDIRTY)
        self._dirty[:] = False
        return dirty

    # -- EPT --------------------------------------------------------------------------

    def build_ept(
        self,
        layout: EptLayout,
        mem: U64Array,
        alloc_frame: AllocFrame,
        free_frame: FreeFrame,
        *,
        max_leaf_level: int = 3,
    ) -> EptTables:
        """Build this P2M's EPT in host memory in `layout` and keep it in step from now on."""
        if self._ept is not None:
            raise P2MError("this P2M already has EPT tables; drop_ept() first")
        try:
            ept = EptTables.build(
                mem,
                layout,
                self._mfn,
                self._type,
                self._access,
                alloc_frame,
                free_frame,
                max_leaf_level=max_leaf_level,
            )
        except EptError as e:
            raise P2MError(f"build_ept: {e}") from None
        self._ept = ept
        return ept

    def drop_ept(self) -> None:
        """Destroy the attached EPT (its frames go back through free_frame)."""
        if self._ept is None:
            raise P2MError("this P2M has no EPT tables")
        ept, self._ept = self._ept, None
        ept.destroy()

    # -- state ------------------------------------------------------------------------

    def save(self) -> P2MState:
        return P2MState(
            nr_gfns=self.nr_gfns,
            mfn=self._mfn.astype("<u8").tobytes(),
            p2m_type=self._type.tobytes(),
            access=self._access.tobytes(),
            logdirty=self._logdirty,
            dirty_bitmap=np.packbits(self._dirty, bitorder="little").tobytes(),
        )

    @classmethod
    def restore(cls, state: P2MState) -> P2M:
        """A new P2M (with no EPT yet) from saved state; refuses inconsistent state."""
        n = state.nr_gfns
        if not isinstance(n, int) or not 0 <= n <= GFN_LIMIT:
            raise P2MError(f"P2M state: bad nr_gfns {n!r}")
        sizes = {
            "mfn": (state.mfn, 8 * n),
            "p2m_type": (state.p2m_type, n),
            "access": (state.access, n),
            "dirty_bitmap": (state.dirty_bitmap, (n + 7) // 8),
        }
        for name, (blob, size) in sizes.items():
            if not isinstance(blob, bytes) or len(blob) != size:
                raise P2MError(f"P2M state: {name} must be {size} bytes for {n} gfns")
        m = np.frombuffer(state.mfn, dtype="<u8").astype(np.uint64)
        t = np.frombuffer(state.p2m_type, dtype=np.uint8).copy()
        a = np.frombuffer(state.access, dtype=np.uint8).copy()
        try:
            check_p2m_arrays(m, t, a)
        except EptError as e:
            raise P2MError(f"P2M state: {e}") from None
        unbacked = ~_has_mfn(t)
        if (unbacked & (m != INVALID_MFN)).any():
            g = int(np.flatnonzero(unbacked & (m != INVALID_MFN))[0])
            raise P2MError(f"P2M state: gfn {g:#x} maps no frame but has mfn {int(m[g]):#x}")
        if ((t == P2mType.INVALID) & (a != DEFAULT_ACCESS)).any():
            raise P2MError("P2M state: unmapped gfns must carry the default access")
        bits = np.unpackbits(
            np.frombuffer(state.dirty_bitmap, dtype=np.uint8), bitorder="little", count=n
        ).astype(bool)
        if not isinstance(state.logdirty, bool) or (bits.any() and not state.logdirty):
            raise P2MError("P2M state: dirty bits without log-dirty mode")
        p2m = cls(n)
        p2m._mfn, p2m._type, p2m._access = m, t, a
        p2m._dirty = bits
        p2m._logdirty = state.logdirty
        return p2m

    # -- internals --------------------------------------------------------------------

    def _check_gfn(self, gfn: int) -> PFN:
        if not isinstance(gfn, int | np.integer) or not 0 <= gfn < self.nr_gfns:
            raise P2MError(f"gfn {gfn!r} is outside this P2M (0..{self.nr_gfns - 1:#x})")
        return PFN(int(gfn))

    def _check_entry(
        self, gfn: int, mfn: int | None, p2m_type: int, access: int | None
    ) -> tuple[MFN, int, int]:
        try:
            t = int(P2mType(p2m_type))
        except (ValueError, TypeError):
            raise P2MError(f"gfn {gfn:#x}: unknown p2m type {p2m_type!r}") from None
        if access is None:
            a = int(DEFAULT_ACCESS)
        else:
            try:
                a = int(P2mAccess(access))
            except (ValueError, TypeError):
                raise P2MError(f"gfn {gfn:#x}: unknown p2m access {access!r}") from None
        if type_has_mfn(t):
            if not isinstance(mfn, int | np.integer) or not 0 <= mfn <= MAX_MFN:
                raise P2MError(
                    f"gfn {gfn:#x}: type {P2mType(t).name} needs an mfn below 2**40, "
                    f"got {mfn!r}"
                )
            m = MFN(int(mfn))
        else:
            if mfn is not None and mfn != INVALID_MFN:
                raise P2MError(f"gfn {gfn:#x}: type {P2mType(t).name} maps no frame (mfn None)")
            m = MFN(INVALID_MFN)
        if t == P2mType.INVALID:
            a = int(DEFAULT_ACCESS)
        return m, t, a

    def _store(self, span: slice, m: npt.ArrayLike, t: npt.ArrayLike, a: npt.ArrayLike) -> None:
        self._mfn[span], self._type[span], self._access[span] = m, t, a
        if self._logdirty:
            # A new mapping changes what the guest sees there: it must be sent again.
            self._dirty[span] |= self._type[span] == P2mType.RAM_RW

    def _retype_all(self, old: P2mType, new: P2mType) -> None:
        if self._ept is not None:
            self._ept.change_type_global(old, new)
        self._type[self._type == old] = new


def _has_mfn(t: U8Array) -> np.ndarray:
    return np.isin(t, [int(x) for x in P2mType if type_has_mfn(x)])


def _readonly(arr: np.ndarray) -> np.ndarray:
    view = arr.view()
    view.flags.writeable = False
    return view
