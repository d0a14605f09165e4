"""What the image tools share: their exception, opening an image, PFINFO helpers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import numpy.typing as npt

from hypervisor.lib.errors import HvlabError
from hypervisor.stream import Pfinfo, StreamError, StreamReader, open_image_for_read
from hypervisor.stream.framing import record_type_name
from hypervisor.stream.hvlab_records import HVLAB_DOMAIN_RECORD, HVLAB_MACHINE_FRAMES_RECORD

HVLAB_DOMAIN_NAME = "HVLAB_DOMAIN"


class ImageError(HvlabError):
    """An image the tools cannot read, or arguments they cannot act on (one line)."""


# Indexed by the 4-bit PFINFO type: the page-table level it carries (0: none)
# and whether it is a pinned table.
_LEVEL_OF = np.zeros(16, dtype=np.uint8)
_PINNED_OF = np.zeros(16, dtype=bool)
for _level in (1, 2, 3, 4):
    _LEVEL_OF[Pfinfo.L1TAB + _level - 1] = _level
    _LEVEL_OF[Pfinfo.L1TAB_PIN + _level - 1] = _level
    _PINNED_OF[Pfinfo.L1TAB_PIN + _level - 1] = True


def pfinfo_levels(types: npt.NDArray[np.integer]) -> npt.NDArray[np.uint8]:
    """Page-table level (1..4) of each PFINFO type; 0 for pages that are not tables."""
    return _LEVEL_OF[np.asarray(types, dtype=np.uint8) & 0xF]


def pfinfo_pinned(types: npt.NDArray[np.integer]) -> npt.NDArray[np.bool_]:
    """Whether each PFINFO type is a pinned table (L1TAB_PIN..L4TAB_PIN)."""
    return _PINNED_OF[np.asarray(types, dtype=np.uint8) & 0xF]


def pfinfo_name(value: int) -> str:
    try:
        return Pfinfo(value).name
    except ValueError:
        return f"type {value:#x}"


def record_name(rtype: int) -> str:
    """Record type name for reports: Xen's names, and hvlab's own records' in an image."""
    if rtype == HVLAB_MACHINE_FRAMES_RECORD:
        return "HVLAB_MACHINE_FRAMES"
    return HVLAB_DOMAIN_NAME if rtype == HVLAB_DOMAIN_RECORD else record_type_name(rtype)


def file_size(path: str | os.PathLike[str]) -> int:
    try:
        return os.path.getsize(path)
    except OSError as err:
        raise ImageError(f"{path}: {err.strerror or err}") from None


@contextmanager
def read_image(path: str | os.PathLike[str]) -> Iterator[StreamReader]:
    """A reader over `path` (plain or .zst) that keeps the HVLAB_DOMAIN record.

    Any stream error inside the block becomes one ImageError line naming the
    file, the record and its offset.
    """
    try:
        f = open_image_for_read(path)
    except OSError as err:
        raise ImageError(f"{path}: {err.strerror or err}") from None
    with f:
        try:
            yield StreamReader(f, keep=frozenset({HVLAB_DOMAIN_RECORD}))
        except StreamError as err:
            raise ImageError(f"{path}: {err}") from None
        except OSError as err:
            raise ImageError(f"{path}: {err.strerror or err}") from None
