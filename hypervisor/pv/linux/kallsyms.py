"""The kernel's own symbol table (kallsyms) read from a vmlinux image, as Linux 6.1 builds it.

Debian's vmlinuz carries no ELF symbol table and its System.map is a
placeholder, but scripts/kallsyms.c put every symbol into .rodata:

    kallsyms_offsets        int32[num_syms]  (base-relative, absolute per-CPU)
    kallsyms_relative_base  u64
    kallsyms_num_syms       u32
    kallsyms_names          per symbol: a length (7 bits, a second byte when the
                            high bit is set) and that many token indices
    kallsyms_markers        u32[ceil(num_syms / 256)]: offset of every 256th name
    kallsyms_token_table    256 NUL-terminated tokens
    kallsyms_token_index    u16[256]: each token's offset in the table

each table starting 8-aligned. Without symbols to name them, the tables are
found from their shape: the token table holds "0".."9" as ten consecutive
one-character tokens, its index must agree with it, the markers end just
before it, and num_syms sits right before names. Every step is checked; a
kernel that does not match gets a KallsymsError, never a guessed table.
"""

from __future__ import annotations

import struct

import numpy as np

from hypervisor.lib.errors import HvlabError

SEARCH_WINDOW = 64 << 20  # how far before the token table the other tables may start
DIGIT_TOKENS = b"".join(bytes([c]) + b"\0" for c in b"0123456789")


class KallsymsError(HvlabError):
    """The image holds no kallsyms table hvlab can read."""


def _align8(n: int) -> int:
    return (n + 7) & ~7


def _token_table(data: bytes) -> tuple[int, list[bytes], int]:
    """(start, tokens, index_start) of the token table, checked against its index."""
    at = data.find(DIGIT_TOKENS)
    while at >= 0:
        found = _token_table_around(data, at)
        if found is not None:
            return found
        at = data.find(DIGIT_TOKENS, at + 1)
    raise KallsymsError("no kallsyms token table (is CONFIG_KALLSYMS set?)")


def _token_table_around(data: bytes, digits_at: int) -> tuple[int, list[bytes], int] | None:
    # token i == chr(i) while that character is used: "0" is token 0x30, so 48
    # non-empty tokens precede it
    start = digits_at
    for _ in range(ord("0")):
        if start < 2 or data[start - 1] != 0:
            return None
        start = data.rfind(b"\0", 0, start - 1) + 1
        if start >= digits_at - 1 or data[start] == 0:
            return None
    tokens, offsets, pos = [], [], start
    for _ in range(256):
        end = data.find(b"\0", pos)
        if end <= pos:
            return None
        tokens.append(data[pos:end])
        offsets.append(pos - start)
        pos = end + 1
    index_start = start + _align8(pos - start)
    if index_start + 512 > len(data) or start % 8:
        return None
    index = struct.unpack_from("<256H", data, index_start)
    if list(index) != offsets:
        return None
    return start, tokens, index_start


def _marker_runs(data: bytes, token_start: int):
    """Candidate kallsyms_markers, nearest the token table first: (start, run), the run an
    increasing sequence of u32s from 0 (the markers, perhaps followed by data that happens
    to increase too: the symbol count decides where they end)."""
    low = max(0, (token_start - SEARCH_WINDOW) & ~7)
    words = np.frombuffer(data, dtype="<u4", count=(token_start - low) // 4, offset=low)
    for z in np.flatnonzero(words == 0)[::-1].tolist():
        run = 1
        while z + run < words.size and words[z + run] > words[z + run - 1]:
            run += 1
        if (low + 4 * z) % 8 == 0:
            yield low + 4 * z, words[z:z + run].tolist()


def _names(data: bytes, names_start: int, count: int, limit: int) -> list[bytes] | None:
    """`count` compressed names from names_start (token indices), None if they overrun."""
    out, pos = [], names_start
    for _ in range(count):
        if pos >= limit:
            return None
        length = data[pos]
        pos += 1
        if length & 0x80:  # a "big" symbol: 14-bit length over two bytes
            length = (length & 0x7F) | data[pos] << 7
            pos += 1
        if length == 0 or pos + length > limit:
            return None
        out.append(data[pos:pos + length])
        pos += length
    return out


def _name_offsets(entries: list[bytes]) -> list[int]:
    offsets, pos = [], 0
    for raw in entries:
        offsets.append(pos)
        pos += len(raw) + (2 if len(raw) > 0x7F else 1)
    return offsets


def decode_kallsyms(data: bytes) -> dict[str, int]:
    """Every symbol in the image's kallsyms table: name -> address (text and data)."""
    token_start, tokens, _index = _token_table(data)
    for markers_start, markers in _marker_runs(data, token_start):
        found = _names_before(data, markers_start, markers, token_start)
        if found is not None:
            names_start, entries = found
            return _with_addresses(data, names_start - 8, len(entries), entries, tokens)
    raise KallsymsError("kallsyms_markers/kallsyms_names not found before the token table")


def _names_before(data: bytes, markers_start: int, run: list[int],
                  token_start: int) -> tuple[int, list[bytes]] | None:
    """kallsyms_names (and num_syms 8 bytes before it) ending at the markers."""
    # names hold at least the first 256 names' bytes (run[1]) when there are more
    highest = markers_start - (run[1] if len(run) > 1 else 1)
    highest -= highest % 8
    low = max(8, highest - SEARCH_WINDOW)
    starts = np.arange(low, highest + 1, 8)[::-1]
    counts = (np.frombuffer(data, dtype="<u8", count=starts.size, offset=low - 8)[::-1]
              & 0xFFFF_FFFF).astype(np.int64)
    nr_markers = (counts + 255) // 256
    fits = (counts > 0) & (nr_markers <= len(run))
    for names_start, num_syms in zip(starts[fits].tolist(), counts[fits].tolist(), strict=True):
        markers = run[:(num_syms + 255) // 256]
        markers_end = _align8(markers_start + 4 * len(markers))
        if token_start - markers_end not in (0, _align8(3 * num_syms)):
            continue  # seqs_of_names (3 bytes a symbol) may sit between them
        if names_start + markers[-1] >= markers_start:
            continue
        entries = _names(data, names_start, num_syms, markers_start)
        if entries is None:
            continue
        offsets = _name_offsets(entries)
        if [offsets[i * 256] for i in range(len(markers))] != markers:
            continue
        names_end = names_start + offsets[-1] + len(entries[-1]) + (
            2 if len(entries[-1]) > 0x7F else 1)
        if _align8(names_end) == markers_start:
            return names_start, entries
    return None


def _with_addresses(data: bytes, num_syms_at: int, count: int, entries: list[bytes],
                    tokens: list[bytes]) -> dict[str, int]:
    base_at = num_syms_at - 8
    (relative_base,) = struct.unpack_from("<Q", data, base_at)
    offsets_at = base_at - _align8(4 * count)
    if offsets_at < 0 or relative_base >> 47 != 0x1FFFF:
        raise KallsymsError("kallsyms_relative_base is not a kernel address")
    offsets = np.frombuffer(data, dtype="<i4", count=count, offset=offsets_at).astype(np.int64)
    # absolute per-CPU: non-negative offsets are absolute, negative ones relative
    relative = np.uint64(relative_base) + np.maximum(-1 - offsets, 0).astype(np.uint64)
    addresses = np.where(offsets >= 0, offsets.astype(np.uint64), relative)
    symbols: dict[str, int] = {}
    for raw, address in zip(entries, addresses.tolist(), strict=True):
        text = b"".join(tokens[t] for t in raw).decode("ascii", "replace")
        symbols.setdefault(text[1:], int(address))  # text[0]: type
    return symbols
