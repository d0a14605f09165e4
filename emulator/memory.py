"""Host memory: one page-aligned mapping with numpy views over it.

Anonymous memory is mapped with MAP_NORESERVE so a 64 GiB machine costs only
the pages that are touched. File-backed memory (MAP_SHARED on a file) lets a
second process map the same machine memory, as a live update across processes
needs.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

import numpy as np

from emulator.addr import MFN, PAGE_SIZE

_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)


class HostMemoryError(Exception):
    """Host memory could not be set up as asked."""


class HostMemory:
    """All machine memory of the emulated host.

    `u8` and `u64` are numpy views over the whole mapping. The mmap object is
    kept alive here for as long as this object lives: unicorn maps the buffer
    by pointer and keeps no reference of its own, so freeing it while an
    engine still maps it would crash the process.
    """

    def __init__(self, size: int, path: str | os.PathLike[str] | None = None) -> None:
        if size <= 0 or size % PAGE_SIZE:
            raise HostMemoryError(f"host memory size {size} is not a positive multiple of 4 KiB")
        self.size = size
        self.path = Path(path) if path is not None else None
        if self.path is None:
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE
            self._mmap = mmap.mmap(-1, size, flags=flags)
        else:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                if os.fstat(fd).st_size < size:
                    os.ftruncate(fd, size)  # sparse: untouched pages cost no disk
                self._mmap = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
            finally:
                os.close(fd)
        self._anchor = ctypes.c_char.from_buffer(self._mmap)
        self.address = ctypes.addressof(self._anchor)
        self.u8 = np.frombuffer(self._mmap, dtype=np.uint8)
        self.u64 = np.frombuffer(self._mmap, dtype=np.uint64)
        # The same 64-bit words without numpy: one word read or written is a
        # plain Python int, a few times cheaper than a numpy scalar (TLB fills).
        self.words = memoryview(self._mmap).cast("Q")

    @property
    def nr_frames(self) -> int:
        return self.size // PAGE_SIZE

    def frame_u64(self, mfn: MFN | int) -> np.ndarray:
        """The 512 64-bit words of one machine frame (a view, not a copy)."""
        base = mfn * (PAGE_SIZE // 8)
        return self.u64[base : base + PAGE_SIZE // 8]

    def frame_u8(self, mfn: MFN | int) -> np.ndarray:
        base = mfn * PAGE_SIZE
        return self.u8[base : base + PAGE_SIZE]

    def read(self, ma: int, size: int) -> bytes:
        return self._mmap[ma : ma + size]

    def write(self, ma: int, data: bytes) -> None:
        self._mmap[ma : ma + len(data)] = data

    def write_u64(self, ma: int, value: int) -> None:
        self._mmap[ma : ma + 8] = value.to_bytes(8, "little")

    def zero_frame(self, mfn: MFN) -> None:
        self.frame_u64(mfn)[:] = 0

    def resident_frames(self) -> np.ndarray | None:
        """Which frames have ever been touched (anonymous memory only), else None.

        An anonymous page the host never faulted in is still all zero, so
        savers can skip reading it; mincore(2) tells which ones those are.
        File-backed pages may hold data while not resident: no answer there.
        """
        if self.path is not None:
            return None
        libc = ctypes.CDLL(None, use_errno=True)
        vec = np.zeros(self.nr_frames, dtype=np.uint8)
        rc = libc.mincore(ctypes.c_void_p(self.address), ctypes.c_size_t(self.size),
                          vec.ctypes.data_as(ctypes.c_void_p))
        if rc != 0:
            return None
        return (vec & 1).astype(bool)

    def flush(self) -> None:
        """Write a file-backed mapping through to its file."""
        if self.path is not None:
            self._mmap.flush()
