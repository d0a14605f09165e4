"""Shared by the image tests: cutting images into records, gluing them back, and
checking that a refused restore left the host exactly as it was."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest

from hypervisor.core.hypervisor import Hypervisor, MachineConfig
from hypervisor.images.domains import restore_domain
from hypervisor.lib.errors import RestoreError

HEADERS = 24 + 16  # image header + domain header


def records_at(image: bytes) -> list[tuple[int, int, bytes]]:
    """(offset, type, body) of every record."""
    out, pos = [], HEADERS
    while pos < len(image):
        rtype, length = struct.unpack_from("<II", image, pos)
        out.append((pos, rtype, image[pos + 8 : pos + 8 + length]))
        pos += 8 + (length + 7) // 8 * 8
    return out


def records(image: bytes) -> list[tuple[int, bytes]]:
    """(type, body) of every record."""
    return [(rtype, body) for _, rtype, body in records_at(image)]


def rebuild(image: bytes, recs: list[tuple[int, bytes]]) -> bytes:
    out = bytearray(image[:HEADERS])
    for rtype, body in recs:
        out += struct.pack("<II", rtype, len(body)) + body + bytes(-len(body) % 8)
    return bytes(out)


def edit_first(image: bytes, rtype: int, edit) -> bytes:
    """Apply `edit(body)` to the first record of type `rtype`."""
    recs = records(image)
    i = next(i for i, (t, _) in enumerate(recs) if t == rtype)
    recs[i] = (rtype, edit(bytearray(recs[i][1])))
    return rebuild(image, recs)


def host_fingerprint(hv: Hypervisor):
    return (hv.frames.nr_free, hv.frames.free.copy(), hv.frame_table.snapshot(),
            hashlib.sha256(hv.memory.u8.tobytes()).hexdigest(), len(hv.domains),
            [len(q) for q in hv.scheduler.runqueues])


def assert_refused_cleanly(tmp_path, image: bytes, *messages: str, pcpus: int = 1,
                           memory: int = 16 << 20) -> str:
    """Restoring `image` fails with one line holding `messages`; the host is unchanged."""
    path = tmp_path / "bad.img"
    path.write_bytes(image)
    hv = Hypervisor(MachineConfig(pcpus, memory))
    before = host_fingerprint(hv)
    with pytest.raises(RestoreError) as info:
        restore_domain(hv, path)
    after = host_fingerprint(hv)
    assert before[0] == after[0] and np.array_equal(before[1], after[1])
    assert before[2].differences(after[2]) == []
    assert before[3:] == after[3:]
    text = str(info.value)
    assert "\n" not in text
    for message in messages:
        assert message in text, text
    return text
