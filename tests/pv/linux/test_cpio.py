"""The newc cpio writer and reader (hypervisor.pv.linux.cpio), checked against GNU cpio."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hypervisor.pv.linux.cpio import HEADER_SIZE, CpioError, CpioMember, read_cpio, write_cpio

MEMBERS = [
    CpioMember.directory("bin"),
    CpioMember.file("bin/tool", b"\x7fELF-ish" * 3, 0o755),
    CpioMember.symlink("bin/sh", "tool"),
    CpioMember.directory("dev"),
    CpioMember.char_device("dev/console", 5, 1),
    CpioMember.file("init", b"#!/bin/sh\necho hi\n", 0o755),
    CpioMember.file("empty", b""),
]


def test_round_trip_and_determinism():
    archive = write_cpio(MEMBERS)
    assert write_cpio(MEMBERS) == archive
    assert read_cpio(archive) == MEMBERS
    assert archive.endswith(b"\0" * (-len(archive) % 4))
    assert b"TRAILER!!!\0" in archive[-HEADER_SIZE - 16:]


def test_headers_are_aligned_and_numbered():
    archive = write_cpio(MEMBERS)
    starts = [i for i in range(0, len(archive), 4) if archive[i:i + 6] == b"070701"]
    assert len(starts) == len(MEMBERS) + 1  # and the trailer
    inodes = [int(archive[s + 6:s + 14], 16) for s in starts]
    assert inodes == [*range(1, len(MEMBERS) + 1), 0]
    mtimes = {int(archive[s + 46:s + 54], 16) for s in starts}
    assert mtimes == {0}


@pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio is not installed")
def test_gnu_cpio_reads_it(tmp_path):
    archive = write_cpio(MEMBERS)
    listing = subprocess.run(["cpio", "-it", "--quiet"], input=archive, capture_output=True,
                             check=True).stdout.decode().split()
    assert listing == [m.name for m in MEMBERS]
    regular = [m for m in MEMBERS if not stat.S_ISCHR(m.mode)]
    subprocess.run(["cpio", "-idm", "--quiet", *[m.name for m in regular]], input=archive,
                   cwd=tmp_path, check=True)
    assert (tmp_path / "bin/tool").read_bytes() == MEMBERS[1].data
    assert os.readlink(tmp_path / "bin/sh") == "tool"
    assert stat.S_IMODE((tmp_path / "init").stat().st_mode) == 0o755


@pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio is not installed")
def test_we_read_what_gnu_cpio_writes(tmp_path):
    (tmp_path / "a").write_bytes(b"hello")
    (tmp_path / "d").mkdir()
    (tmp_path / "d/l").symlink_to("../a")
    out = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], input=b"a\nd\nd/l\n",
                         cwd=tmp_path, capture_output=True, check=True).stdout
    members = {m.name: m for m in read_cpio(out)}
    assert members["a"].data == b"hello" and stat.S_ISREG(members["a"].mode)
    assert stat.S_ISDIR(members["d"].mode)
    assert members["d/l"].data == b"../a" and stat.S_ISLNK(members["d/l"].mode)


def test_refusals():
    with pytest.raises(CpioError, match="appears twice"):
        write_cpio([CpioMember.file("x", b"1"), CpioMember.file("x", b"2")])
    with pytest.raises(CpioError, match="relative path"):
        write_cpio([CpioMember.file("/abs", b"")])
    with pytest.raises(CpioError, match="only files and symlinks"):
        write_cpio([CpioMember(CpioMember.directory("d").name, stat.S_IFDIR | 0o755, b"x")])
    archive = write_cpio(MEMBERS)
    with pytest.raises(CpioError, match="no trailer|truncated"):
        read_cpio(archive[:-200])
    with pytest.raises(CpioError, match="bad magic"):
        read_cpio(b"070707" + archive[6:])


names = st.text(alphabet="abcdefgh_.-", min_size=1, max_size=12).filter(
    lambda n: n not in (".", ".."))


@given(st.dictionaries(names, st.binary(max_size=300), max_size=8))
def test_any_files_round_trip(files):
    members = [CpioMember.file(name, data) for name, data in sorted(files.items())]
    assert read_cpio(write_cpio(members)) == members
