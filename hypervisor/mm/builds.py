"""Hypervisor builds and the layouts of their internal state.

A live update replaces one hypervisor build by another while the guests keep
running. Each build lays out its internal per-frame state in its own way, so the
new build must not read the old build's frame table as if it were its own: it
rebuilds it (or translates it with a translator written for that pair of builds).

`TypeInfoLayout` describes one build's `page_info.type_info` word and encodes and
decodes it, on Python ints and vectorised on numpy uint64 arrays. The layouts
registered here follow Xen's `asm-x86/mm.h` of the named release:

- 4.19 (``PG_mask(x, 3)`` types): type in bits 63-61, locked 60, pinned 59,
  validated 58, pae_xen_l2 57, partial 56, non_coherent 55, count in bits 54-0.
- 4.12: the same flags, but no non_coherent bit (it came with XSA-402, Xen 4.17),
  so the count field is 56 bits wide (bits 55-0).
- 4.4 (``PG_mask(x, 4)`` types, Xen 4.0 up to at least 4.5): a 4-bit type field in
  bits 63-60 with different codes (writable 7, shared 8), pinned 59, validated 58,
  pae_xen_l2 57, partial 56, locked 55, count in bits 54-0.

4.12 and 4.19 differ only at bit 55 (4.12's top count bit is 4.19's non_coherent
flag), so they misread each other only for such frames; 4.4 and the later builds
misread each other's type field for almost every typed frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from functools import cached_property
from typing import overload

import numpy as np

# A type code that the layout does not define (seen when a build decodes another
# build's frame table): what the vectorised decoders return for such frames.
UNDEFINED_TYPE = 0xFF


class BuildError(ValueError):
    """A build or a layout was asked for something it does not have."""


class PageType(IntEnum):
    """What a machine frame is used as (Xen's PGT_* types).

    The values are current Xen's codes; each layout maps them to its own codes.
    """

    NONE = 0
    L1 = 1
    L2 = 2
    L3 = 3
    L4 = 4
    SEG_DESC = 5
    SHARED = 6
    WRITABLE = 7

    @property
    def is_page_table(self) -> bool:
        return PageType.L1 <= self <= PageType.L4

    @classmethod
    def for_level(cls, level: int) -> PageType:
        if not 1 <= level <= 4:
            raise BuildError(f"page-table level {level} is not in 1..4")
        return cls(level)


@dataclass(frozen=True)
class TypeInfo:
    """One decoded type_info word."""

    type: PageType
    count: int
    pinned: bool = False
    validated: bool = False
    partial: bool = False
    locked: bool = False


@dataclass(frozen=True, kw_only=True)
class TypeInfoLayout:
    """Bit positions of one build's type_info word.

    `type_codes[t]` is the code this build stores for `PageType(t)`. Single-bit
    fields are given by bit number; the type count occupies bits
    `count_width - 1 .. 0`. Bits a layout has but the model does not use
    (pae_xen_l2, non_coherent) are recorded so that overlaps are checked and
    misreadings are faithful.
    """

    type_shift: int
    type_width: int
    type_codes: tuple[int, ...]
    locked_bit: int
    pinned_bit: int
    validated_bit: int
    partial_bit: int
    count_width: int
    pae_xen_l2_bit: int | None = None
    non_coherent_bit: int | None = None

    def __post_init__(self) -> None:
        if len(self.type_codes) != len(PageType):
            raise BuildError(f"type_codes needs {len(PageType)} codes, got {len(self.type_codes)}")
        if len(set(self.type_codes)) != len(self.type_codes):
            raise BuildError(f"type_codes {self.type_codes} are not distinct")
        if any(not 0 <= c < (1 << self.type_width) for c in self.type_codes):
            raise BuildError(
                f"a type code of {self.type_codes} does not fit {self.type_width} bits"
            )
        if self.type_shift + self.type_width > 64 or self.count_width < 1:
            raise BuildError("type or count field outside the 64-bit word")
        fields = {
            "type": ((1 << self.type_width) - 1) << self.type_shift,
            "count": (1 << self.count_width) - 1,
        }
        for name in ("locked_bit", "pinned_bit", "validated_bit", "partial_bit",
                     "pae_xen_l2_bit", "non_coherent_bit"):
            bit = getattr(self, name)
            if bit is not None:
                if not 0 <= bit < 64:
                    raise BuildError(f"{name} {bit} is not a bit of a 64-bit word")
                fields[name] = 1 << bit
        seen = 0
        for name, mask in fields.items():
            if seen & mask:
                raise BuildError(f"type_info field {name} overlaps another field")
            seen |= mask

    # --- derived masks -------------------------------------------------------

    @cached_property
    def count_mask(self) -> int:
        return (1 << self.count_width) - 1

    @cached_property
    def type_mask(self) -> int:
        return ((1 << self.type_width) - 1) << self.type_shift

    @cached_property
    def _code_to_type(self) -> np.ndarray:
        table = np.full(1 << self.type_width, UNDEFINED_TYPE, dtype=np.uint8)
        for t, code in enumerate(self.type_codes):
            table[code] = t
        return table

    @cached_property
    def _type_to_field(self) -> np.ndarray:
        return np.array([c << self.type_shift for c in self.type_codes], dtype=np.uint64)

    # --- Python ints -------------------------------------------------------

    def decode(self, value: int) -> TypeInfo:
        """Decode one word; an undefined type code raises BuildError."""
        code = (value >> self.type_shift) & ((1 << self.type_width) - 1)
        t = int(self._code_to_type[code])
        if t == UNDEFINED_TYPE:
            raise BuildError(f"type_info {value:#018x} has type code {code}, undefined here")
        return TypeInfo(
            type=PageType(t),
            count=value & self.count_mask,
            pinned=bool(value >> self.pinned_bit & 1),
            validated=bool(value >> self.validated_bit & 1),
            partial=bool(value >> self.partial_bit & 1),
            locked=bool(value >> self.locked_bit & 1),
        )

    def encode_info(self, info: TypeInfo) -> int:
        return self.encode(info.type, info.count, pinned=info.pinned, validated=info.validated,
                           partial=info.partial, locked=info.locked)

    # --- ints or arrays --------------------------------------------------------

    @overload
    def encode(self, type: int, count: int, *, pinned: bool = ..., validated: bool = ...,
               partial: bool = ..., locked: bool = ...) -> int: ...
    @overload
    def encode(self, type: np.ndarray, count: np.ndarray | int, *, pinned: np.ndarray | bool = ...,
               validated: np.ndarray | bool = ..., partial: np.ndarray | bool = ...,
               locked: np.ndarray | bool = ...) -> np.ndarray: ...

    def encode(self, type, count, *, pinned=False, validated=False, partial=False, locked=False):
        """Build type_info word(s). Arrays in, uint64 array out; ints in, int out."""
        if isinstance(type, np.ndarray) or isinstance(count, np.ndarray):
            types = np.asarray(type)
            if types.size and int(types.max()) >= len(PageType):
                raise BuildError("encode() got a type value that is not a PageType")
            counts = np.asarray(count, dtype=np.uint64)
            if counts.size and int(counts.max()) > self.count_mask:
                raise BuildError(f"a type count exceeds this layout's {self.count_width}-bit field")
            word = self._type_to_field[types.astype(np.intp)] | counts
            for flag, bit in ((pinned, self.pinned_bit), (validated, self.validated_bit),
                              (partial, self.partial_bit), (locked, self.locked_bit)):
                word = word | (np.asarray(flag, dtype=np.uint64) << np.uint64(bit))
            return word
        if not 0 <= count <= self.count_mask:
            raise BuildError(f"type count {count} does not fit this layout's "
                             f"{self.count_width}-bit field")
        return (
            (self.type_codes[PageType(type)] << self.type_shift)
            | count
            | (int(bool(pinned)) << self.pinned_bit)
            | (int(bool(validated)) << self.validated_bit)
            | (int(bool(partial)) << self.partial_bit)
            | (int(bool(locked)) << self.locked_bit)
        )

    def type_of(self, value):
        """PageType of word(s); arrays give uint8 values (UNDEFINED_TYPE if undefined)."""
        if isinstance(value, np.ndarray):
            codes = (value >> np.uint64(self.type_shift)) & np.uint64((1 << self.type_width) - 1)
            return self._code_to_type[codes.astype(np.intp)]
        return self.decode(int(value)).type

    def count_of(self, value):
        if isinstance(value, np.ndarray):
            return value & np.uint64(self.count_mask)
        return int(value) & self.count_mask

    def _flag(self, value, bit: int):
        if isinstance(value, np.ndarray):
            return ((value >> np.uint64(bit)) & np.uint64(1)).astype(bool)
        return bool(int(value) >> bit & 1)

    def pinned_of(self, value):
        return self._flag(value, self.pinned_bit)

    def validated_of(self, value):
        return self._flag(value, self.validated_bit)

    def partial_of(self, value):
        return self._flag(value, self.partial_bit)

    def locked_of(self, value):
        return self._flag(value, self.locked_bit)


@dataclass(frozen=True, kw_only=True)
class Build:
    """One hypervisor build: its version and the layouts of its internal state."""

    version: str
    type_info: TypeInfoLayout
    summary: str = ""


_CURRENT_TYPE_CODES = tuple(int(t) for t in PageType)  # 3-bit field, codes == PageType values
# Xen 4.0-4.5-era codes (4-bit field): writable 7, shared 8; 6 was unused.
_OLD_TYPE_CODES = (0, 1, 2, 3, 4, 5, 8, 7)

BUILDS: dict[str, Build] = {
    "4.19": Build(
        version="4.19",
        summary="current Xen: 3-bit type, 55-bit type count",
        type_info=TypeInfoLayout(
            type_shift=61, type_width=3, type_codes=_CURRENT_TYPE_CODES,
            locked_bit=60, pinned_bit=59, validated_bit=58, pae_xen_l2_bit=57,
            partial_bit=56, non_coherent_bit=55, count_width=55,
        ),
    ),
    "4.12": Build(
        version="4.12",
        summary="Xen 4.12: 3-bit type, 56-bit type count (no non_coherent bit)",
        type_info=TypeInfoLayout(
            type_shift=61, type_width=3, type_codes=_CURRENT_TYPE_CODES,
            locked_bit=60, pinned_bit=59, validated_bit=58, pae_xen_l2_bit=57,
            partial_bit=56, count_width=56,
        ),
    ),
    "4.4": Build(
        version="4.4",
        summary="Xen 4.4: 4-bit type field, locked bit 55, 55-bit type count",
        type_info=TypeInfoLayout(
            type_shift=60, type_width=4, type_codes=_OLD_TYPE_CODES,
            pinned_bit=59, validated_bit=58, pae_xen_l2_bit=57, partial_bit=56,
            locked_bit=55, count_width=55,
        ),
    ),
}

LATEST_BUILD = "4.19"


def get_build(version: str) -> Build:
    """The registered build `version`; BuildError names the known ones otherwise."""
    try:
        return BUILDS[version]
    except KeyError:
        known = ", ".join(sorted(BUILDS))
        raise BuildError(f"unknown hypervisor build {version!r} (known builds: {known})") from None
