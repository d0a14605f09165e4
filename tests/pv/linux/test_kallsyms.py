"""The kallsyms decoder: a synthetic table laid out as Linux 6.1's scripts/kallsyms.c does,
damaged tables refused, and the real Debian kernel's table (with scenarios/linux/build/)."""

from __future__ import annotations

import random
import struct

import pytest

from hypervisor.pv.linux.kallsyms import KallsymsError, decode_kallsyms
from hypervisor.pv.linux.xen_notes import plan_kernel_load

RELATIVE_BASE = 0xFFFF_FFFF_8100_0000
SINGLE = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_."


def _tokens() -> list[bytes]:
    """Token i is chr(i) for the characters symbols use; the others are pairs."""
    pairs = iter([b"xen_", b"do_", b"sys_", b"init", b"_page", b"tT", b"lock", b"ir"]
                 + [bytes([a, b]) for a in b"etaoinsrhld" for b in b"abcdefghijklmnopqrstuvwxyz"])
    return [bytes([i]) if i in SINGLE else next(pairs) for i in range(256)]


def _compress(text: bytes, tokens: list[bytes]) -> bytes:
    out, pos = bytearray(), 0
    by_length = sorted(range(256), key=lambda i: -len(tokens[i]))
    while pos < len(text):
        i = next(i for i in by_length if text.startswith(tokens[i], pos))
        out.append(i)
        pos += len(tokens[i])
    return bytes(out)


def _align(buf: bytearray) -> None:
    buf += bytes(-len(buf) % 8)


def synthetic_image(symbols: list[tuple[str, str, int]], seqs: bool, seed: int = 1,
                    base: int = RELATIVE_BASE) -> bytes:
    """Random bytes around the tables (type, name, address), as kallsyms.c writes them."""
    rng = random.Random(seed)
    tokens = _tokens()
    out = bytearray(rng.randbytes(4000))
    _align(out)
    for _t, _n, address in symbols:  # absolute per-CPU: small ones absolute, others relative
        offset = address if address < 1 << 31 else base - 1 - address
        out += struct.pack("<i", offset)
    _align(out)
    out += struct.pack("<Q", base)
    out += struct.pack("<I", len(symbols))
    _align(out)
    names_start, markers = len(out), []
    for i, (kind, name, _a) in enumerate(symbols):
        if i % 256 == 0:
            markers.append(len(out) - names_start)
        raw = _compress((kind + name).encode(), tokens)
        length = len(raw)
        out += bytes([length]) if length < 0x80 else bytes([0x80 | length & 0x7F, length >> 7])
        out += raw
    _align(out)
    out += struct.pack(f"<{len(markers)}I", *markers)
    _align(out)
    if seqs:  # Debian's 6.1 has kallsyms_seqs_of_names here (3 bytes a symbol)
        out += rng.randbytes(3 * len(symbols))
        _align(out)
    table_start = len(out)
    index = []
    for token in tokens:
        index.append(len(out) - table_start)
        out += token + b"\0"
    _align(out)
    out += struct.pack("<256H", *index)
    out += rng.randbytes(3000)
    return bytes(out)


def _symbols(count: int) -> list[tuple[str, str, int]]:
    rng = random.Random(7)
    symbols = [("A", "fixed_percpu_data", 0), ("D", "per_cpu_counter", 0x2A08)]
    address = RELATIVE_BASE
    for i in range(count):
        kind = "T" if i % 3 else "t"
        symbols.append((kind, f"xen_do_sys_{i}_init_page_lock", address))
        address += rng.randrange(16, 4096)
    symbols.append(("T", "a_big_rust_symbol_" + "Q" * 180, address))
    return symbols


@pytest.mark.parametrize("seqs", [False, True])
def test_a_synthetic_table_decodes_to_every_symbol(seqs):
    symbols = _symbols(700)  # three markers, a two-byte length, absolute and relative
    decoded = decode_kallsyms(synthetic_image(symbols, seqs))
    assert decoded == {name: address for _k, name, address in symbols}


def test_a_damaged_table_is_refused_not_guessed():
    image = synthetic_image(_symbols(300), seqs=False)
    assert len(decode_kallsyms(image)) == 303
    index_end = len(image) - 3000  # the random tail follows the token index
    broken_index = bytearray(image)  # an index that disagrees with the token table
    struct.pack_into("<H", broken_index, index_end - 2, 1)
    with pytest.raises(KallsymsError, match="token table"):
        decode_kallsyms(bytes(broken_index))
    count_at = image.find(struct.pack("<QI", RELATIVE_BASE, 303)) + 8
    broken_count = bytearray(image)  # one symbol fewer: the names no longer meet the markers
    struct.pack_into("<I", broken_count, count_at, 302)
    with pytest.raises(KallsymsError, match="kallsyms_names"):
        decode_kallsyms(bytes(broken_count))
    with pytest.raises(KallsymsError, match="token table"):
        decode_kallsyms(image[:image.find(b"0\x001\x002\x00")])


def test_the_debian_kernel_table(vmlinux):
    symbols = decode_kallsyms(vmlinux)
    plan = plan_kernel_load(vmlinux, "vmlinux")
    assert len(symbols) > 50_000
    assert symbols["startup_xen"] == plan.notes.entry
    assert symbols["_text"] == plan.notes.virt_base + 0x1000000
    assert symbols["pvh_start_xen"] - plan.notes.virt_base == plan.notes.phys32_entry
    assert symbols["fixed_percpu_data"] == 0  # an absolute per-CPU symbol
