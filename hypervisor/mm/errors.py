"""The memory-typing exceptions, and Xen's error numbers (from hypervisor.lib.errno).

Operations that a guest can make fail return a negative errno, as Xen does.
Exceptions are for misuse by the hypervisor itself (bad arguments, a frame
table in an impossible state).
"""

from hypervisor.lib.errno import (  # noqa: F401 - re-exported for the mm modules
    EACCES,
    EBUSY,
    EFAULT,
    EILSEQ,
    EINTR,
    EINVAL,
    EIO,
    ENOENT,
    ENOMEM,
    ENOSYS,
    EOPNOTSUPP,
    EPERM,
    ERESTART,
    ESRCH,
    errno_name,
)


class MmError(Exception):
    """Misuse of the memory-typing model (never a guest-caused refusal)."""


class FrameTableError(MmError):
    """A frame number, domain or array does not fit the frame table."""


class TypingInvariantError(MmError):
    """The frame table is in a state the typing rules can never produce."""
