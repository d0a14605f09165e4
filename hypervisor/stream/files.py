"""Opening image files, plain or zstd-compressed (chosen by a ``.zst`` suffix).

Compression wraps the whole stream (headers included) in standard zstd
frames, so ``zstd -d image.bin.zst`` gives the plain image and vice versa.
Both directions stream: nothing holds the whole image.  A corrupt zstd frame
surfaces as :class:`StreamError` (part ``zstd stream``) like any other
malformed input.
"""

from __future__ import annotations

import io
import os
from typing import Any, BinaryIO

from .framing import StreamError

ZSTD_SUFFIX = ".zst"
ZSTD_LEVEL = 3


def is_compressed(path: str | os.PathLike[str]) -> bool:
    return os.fspath(path).endswith(ZSTD_SUFFIX)


def _zstd() -> Any:
    try:
        import zstandard
    except ModuleNotFoundError:  # pragma: no cover - zstandard is a declared dependency
        raise ModuleNotFoundError(
            "reading or writing .zst images needs the 'zstandard' package"
        ) from None
    return zstandard


class _ZstdReader(io.RawIOBase):
    """Decompressed view of a zstd file that reports corruption as StreamError."""

    def __init__(self, raw: BinaryIO) -> None:
        super().__init__()
        zstd = _zstd()
        self._error_type = zstd.ZstdError
        self._raw = raw
        self._reader = zstd.ZstdDecompressor().stream_reader(
            raw, read_across_frames=True, closefd=False
        )
        self._pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            n = self._reader.readinto(buffer)
        except self._error_type as err:
            raise StreamError(
                f"decompression failed: {err}", offset=self._pos, part="zstd stream"
            ) from None
        self._pos += n
        return int(n)

    def close(self) -> None:
        if not self.closed:
            try:
                self._reader.close()
            finally:
                self._raw.close()
        super().close()


def open_image_for_read(path: str | os.PathLike[str]) -> BinaryIO:
    """Binary file object positioned at the image header (decompressing ``.zst``)."""
    raw = open(path, "rb")  # noqa: SIM115 - returned to the caller, who closes it
    if not is_compressed(path):
        return raw
    try:
        return _ZstdReader(raw)  # type: ignore[return-value]
    except BaseException:
        raw.close()
        raise


def open_image_for_write(path: str | os.PathLike[str]) -> BinaryIO:
    """Binary file object for :class:`StreamWriter`; closing it finishes the zstd frame."""
    raw = open(path, "wb")  # noqa: SIM115 - returned to the caller, who closes it
    if not is_compressed(path):
        return raw
    try:
        compressor = _zstd().ZstdCompressor(level=ZSTD_LEVEL)
        return compressor.stream_writer(raw, closefd=True)  # type: ignore[no-any-return]
    except BaseException:
        raw.close()
        raise
