"""The VT-d / VMX posted-interrupt descriptor, as the hardware sees it: 64 bytes in host memory.

Layout (little-endian bit numbering over the 64 bytes, docs/design.md §2):

=============  =============  ==========================================================
bits           bytes          field
=============  =============  ==========================================================
255:0          0-31           PIR, one bit per vector
256            32 bit 0       ON, outstanding notification
257            32 bit 1       SN, suppress notification
279:272        34             NV, notification vector
319:288        36-39          NDST, notification destination (xAPIC: APIC id in 15:8)
511:320        40-63          reserved (left untouched)
=============  =============  ==========================================================

The descriptor lives in host memory so that it survives a hypervisor replacement: this class
keeps no state outside those 64 bytes, and has no save/restore because the bytes *are* the
state. Wrap the same memory again after a live update and nothing is lost.

Atomicity: hardware uses locked read-modify-writes. Here each method is atomic with respect
to the Python thread running it; two processes that map the same file-backed memory must not
post and take concurrently (a live update hands over with the old side stopped).
"""

from __future__ import annotations

import numpy as np

DESCRIPTOR_SIZE = 64
PIR_BITS = 256

ON_BIT = 256
SN_BIT = 257
NV_FIRST_BIT = 272
NDST_FIRST_BIT = 288

_CONTROL_BYTE = ON_BIT // 8  # byte 32: ON bit 0, SN bit 1
_ON = 1 << (ON_BIT % 8)
_SN = 1 << (SN_BIT % 8)
_NV_BYTE = NV_FIRST_BIT // 8  # 34
_NDST_WORD32 = NDST_FIRST_BIT // 32  # u32 index 9 = bytes 36-39
_PIR_BYTES = PIR_BITS // 8


class PostedInterruptError(ValueError):
    """Bad use of a posted-interrupt descriptor; nothing was changed."""


class PostedInterruptDescriptor:
    """A view onto one 64-byte posted-interrupt descriptor in host memory.

    ``view`` is a writable, C-contiguous numpy array covering exactly the 64 bytes: either
    ``uint8`` of shape (64,) or ``uint64`` of shape (8,) (little-endian host words). Both are
    viewed as bytes internally; writes go straight to the memory behind the view.
    """

    __slots__ = ("_u8", "_u32")

    def __init__(self, view: np.ndarray) -> None:
        if not isinstance(view, np.ndarray):
            raise PostedInterruptError(
                f"descriptor view must be a numpy array, got {type(view).__name__}"
            )
        shapes = {np.dtype(np.uint8): (DESCRIPTOR_SIZE,), np.dtype(np.uint64): (8,)}
        if shapes.get(view.dtype) != view.shape:
            raise PostedInterruptError(
                "descriptor view must be uint8[64] or uint64[8], "
                f"got {view.dtype}{list(view.shape)}"
            )
        if not view.flags.c_contiguous or not view.flags.writeable:
            raise PostedInterruptError("descriptor view must be writable and C-contiguous")
        self._u8 = view.view(np.uint8)
        self._u32 = self._u8.view("<u4")

    # --- PIR ---------------------------------------------------------------------------

    def post(self, vector: int) -> bool:
        """Post ``vector`` as a device would: set its PIR bit, then ON unless SN is set.

        Returns True if a notification (vector NV to NDST) would be sent now, that is, if ON
        went 0 -> 1 with SN clear. While ON is already set the notification is outstanding
        and another one is not sent.
        """
        _check_vector(vector)
        self._u8[vector >> 3] |= 1 << (vector & 7)
        control = int(self._u8[_CONTROL_BYTE])
        if control & (_SN | _ON):
            return False
        self._u8[_CONTROL_BYTE] = control | _ON
        return True

    def is_posted(self, vector: int) -> bool:
        """Whether ``vector``'s PIR bit is set."""
        _check_vector(vector)
        return bool(self._u8[vector >> 3] & (1 << (vector & 7)))

    def pending(self) -> bool:
        """Whether any PIR bit is set (with SN set, PIR can be pending while ON is clear)."""
        return bool(self._u8[:_PIR_BYTES].any())

    def pir_bits(self) -> int:
        """The 256-bit PIR as an int (bit n = vector n), without clearing it."""
        return int.from_bytes(self._u8[:_PIR_BYTES].tobytes(), "little")

    def take_pir(self) -> list[int]:
        """Read and clear PIR, clear ON; return the posted vectors in ascending order.

        This is what the CPU (or the hypervisor syncing PIR into the vLAPIC IRR) does.
        """
        bits = np.unpackbits(self._u8[:_PIR_BYTES], bitorder="little")
        vectors: list[int] = np.flatnonzero(bits).tolist()
        self._u8[:_PIR_BYTES] = 0
        self._u8[_CONTROL_BYTE] &= ~_ON & 0xFF
        return vectors

    # --- control fields ----------------------------------------------------------------

    @property
    def on(self) -> bool:
        """Outstanding notification (bit 256)."""
        return bool(self._u8[_CONTROL_BYTE] & _ON)

    @property
    def sn(self) -> bool:
        """Suppress notification (bit 257): set by the hypervisor while the vCPU is not running."""
        return bool(self._u8[_CONTROL_BYTE] & _SN)

    @sn.setter
    def sn(self, value: bool) -> None:
        if value:
            self._u8[_CONTROL_BYTE] |= _SN
        else:
            self._u8[_CONTROL_BYTE] &= ~_SN & 0xFF

    @property
    def nv(self) -> int:
        """Notification vector (bits 279:272)."""
        return int(self._u8[_NV_BYTE])

    @nv.setter
    def nv(self, vector: int) -> None:
        _check_vector(vector)
        self._u8[_NV_BYTE] = vector

    @property
    def ndst(self) -> int:
        """Notification destination (bits 319:288), the raw 32-bit field."""
        return int(self._u32[_NDST_WORD32])

    @ndst.setter
    def ndst(self, destination: int) -> None:
        if not isinstance(destination, int) or not 0 <= destination <= 0xFFFF_FFFF:
            raise PostedInterruptError(f"NDST must be a 32-bit value, got {destination!r}")
        self._u32[_NDST_WORD32] = destination

    def raw(self) -> bytes:
        """A copy of the 64 bytes (what a save carries)."""
        return self._u8.tobytes()

    def load(self, data: bytes) -> None:
        """Overwrite the 64 bytes (a restore)."""
        if len(data) != DESCRIPTOR_SIZE:
            raise PostedInterruptError(f"a descriptor is {DESCRIPTOR_SIZE} bytes, got {len(data)}")
        self._u8[:] = np.frombuffer(data, dtype=np.uint8)


def _check_vector(vector: int) -> None:
    if not isinstance(vector, int) or not 0 <= vector < PIR_BITS:
        raise PostedInterruptError(f"interrupt vector must be 0..255, got {vector!r}")
