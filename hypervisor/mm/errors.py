"""Xen's error numbers (public/errno.h) and the memory-typing exceptions.

Operations that a guest can make fail return a negative errno, as Xen does.
Exceptions are for misuse by the hypervisor itself (bad arguments, a frame
table in an impossible state).
"""

EPERM = 1
ENOENT = 2
ESRCH = 3
EINTR = 4
EIO = 5
ENOMEM = 12
EACCES = 13
EFAULT = 14
EBUSY = 16
EINVAL = 22
ENOSYS = 38
EILSEQ = 84
ERESTART = 85
EOPNOTSUPP = 95

_NAMES = {
    value: name
    for name, value in dict(globals()).items()
    if name.startswith("E") and isinstance(value, int)
}


def errno_name(rc: int) -> str:
    """'-EINVAL' for -22, '0' for 0, the number otherwise."""
    if rc == 0:
        return "0"
    name = _NAMES.get(-rc)
    return f"-{name}" if name and rc < 0 else str(rc)


class MmError(Exception):
    """Misuse of the memory-typing model (never a guest-caused refusal)."""


class FrameTableError(MmError):
    """A frame number, domain or array does not fit the frame table."""


class TypingInvariantError(MmError):
    """The frame table is in a state the typing rules can never produce."""
