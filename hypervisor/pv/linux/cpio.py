"""The "newc" cpio format (SVR4, no CRC) that the Linux kernel unpacks as an initramfs.

Each member is a 110-byte ASCII header ("070701" and 13 eight-digit hex fields),
the NUL-terminated name padded to a multiple of 4 bytes (header included), then
the data padded likewise; the archive ends with a member named "TRAILER!!!".
The writer is deterministic: members in the order given, inode numbers 1, 2, ...
in that order, mtime 0, owner root.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable
from dataclasses import dataclass

from hypervisor.lib.errors import HvlabError

MAGIC = b"070701"
HEADER_SIZE = 110
TRAILER = "TRAILER!!!"
_FIELDS = ("ino", "mode", "uid", "gid", "nlink", "mtime", "filesize", "devmajor", "devminor",
           "rdevmajor", "rdevminor", "namesize", "check")


class CpioError(HvlabError):
    """A byte string that is not a well-formed newc archive."""


@dataclass(frozen=True)
class CpioMember:
    name: str  # relative, no leading "/": "bin/busybox"
    mode: int  # file type and permission bits (stat.S_IFREG | 0o755, ...)
    data: bytes = b""  # file contents, or a symlink's target
    rdev: tuple[int, int] = (0, 0)  # (major, minor) of a device node
    uid: int = 0
    gid: int = 0
    mtime: int = 0

    @staticmethod
    def directory(name: str, perm: int = 0o755) -> CpioMember:
        return CpioMember(name, stat.S_IFDIR | perm)

    @staticmethod
    def file(name: str, data: bytes, perm: int = 0o644) -> CpioMember:
        return CpioMember(name, stat.S_IFREG | perm, data)

    @staticmethod
    def symlink(name: str, target: str) -> CpioMember:
        return CpioMember(name, stat.S_IFLNK | 0o777, target.encode())

    @staticmethod
    def char_device(name: str, major: int, minor: int, perm: int = 0o600) -> CpioMember:
        return CpioMember(name, stat.S_IFCHR | perm, rdev=(major, minor))


def _pad4(n: int) -> int:
    return -n % 4


def _member_bytes(member: CpioMember, ino: int) -> bytes:
    name = member.name.encode() + b"\0"
    values = {
        "ino": ino, "mode": member.mode, "uid": member.uid, "gid": member.gid,
        "nlink": 2 if stat.S_ISDIR(member.mode) else 1, "mtime": member.mtime,
        "filesize": len(member.data), "devmajor": 0, "devminor": 0,
        "rdevmajor": member.rdev[0], "rdevminor": member.rdev[1], "namesize": len(name),
        "check": 0,
    }
    header = MAGIC + b"".join(b"%08X" % values[field] for field in _FIELDS)
    return (header + name + b"\0" * _pad4(HEADER_SIZE + len(name))
            + member.data + b"\0" * _pad4(len(member.data)))


def write_cpio(members: Iterable[CpioMember]) -> bytes:
    out, seen = [], set()
    for ino, member in enumerate(members, start=1):
        if not member.name or member.name.startswith("/") or member.name == TRAILER:
            raise CpioError(f"cpio member name {member.name!r} is not a relative path")
        if member.name in seen:
            raise CpioError(f"cpio member {member.name!r} appears twice")
        seen.add(member.name)
        if member.data and not (stat.S_ISREG(member.mode) or stat.S_ISLNK(member.mode)):
            raise CpioError(f"cpio member {member.name!r}: only files and symlinks have data")
        out.append(_member_bytes(member, ino))
    out.append(_member_bytes(CpioMember(TRAILER, 0), 0))
    return b"".join(out)


def read_cpio(archive: bytes) -> list[CpioMember]:
    """The members of a newc archive, up to its trailer."""
    members: list[CpioMember] = []
    pos = 0
    while True:
        if pos + HEADER_SIZE > len(archive):
            raise CpioError(f"cpio archive truncated at {pos:#x}: no trailer")
        header = archive[pos:pos + HEADER_SIZE]
        if header[:6] != MAGIC:
            raise CpioError(f"cpio archive: bad magic {header[:6]!r} at {pos:#x}")
        try:
            f = dict(zip(_FIELDS, (int(header[6 + 8 * i:14 + 8 * i], 16) for i in range(13)),
                         strict=True))
        except ValueError:
            raise CpioError(f"cpio archive: a header field at {pos:#x} is not hex") from None
        name_at = pos + HEADER_SIZE
        data_at = name_at + f["namesize"] + _pad4(HEADER_SIZE + f["namesize"])
        end = data_at + f["filesize"] + _pad4(f["filesize"])
        if data_at + f["filesize"] > len(archive) or f["namesize"] == 0:
            raise CpioError(f"cpio archive truncated in the member at {pos:#x}")
        name = archive[name_at:name_at + f["namesize"] - 1].decode()
        if name == TRAILER:
            return members
        members.append(CpioMember(name, f["mode"], archive[data_at:data_at + f["filesize"]],
                                  (f["rdevmajor"], f["rdevminor"]), f["uid"], f["gid"],
                                  f["mtime"]))
        pos = end
