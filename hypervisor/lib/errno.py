"""Xen's error numbers (xen/include/public/errno.h): hypercalls return -errno."""

EPERM = 1
ENOENT = 2
ESRCH = 3
EINTR = 4
EIO = 5
ENOMEM = 12
EACCES = 13
EFAULT = 14
EBUSY = 16
EEXIST = 17
EINVAL = 22
ENOSPC = 28
ENOSYS = 38
ETIME = 62
EILSEQ = 84
ERESTART = 85
EOPNOTSUPP = 95
EOVERFLOW = 75

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
