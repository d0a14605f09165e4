"""Grant table v1 for a PV domU as Xen keeps it (public/grant_table.h, common/grant_table.c).

The shared frames are hypervisor pages the domain owns, like shared_info: Xen
starts a domain with one, grows the table up to `max_frames` when setup_table
asks for more, and hands a PV guest their machine frame numbers to map itself.
Only version 1 exists here: set_version(2) gets the -ENOSYS Xen gives when its
`gnttab=max-ver:1` forbids v2. Mapping, transfer and copy ops are not modelled.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from hypervisor.core.hypercalls import GuestAccessError
from hypervisor.lib.errno import EINVAL, ENOSYS

if TYPE_CHECKING:
    from hypervisor.core.hypervisor import Hypervisor
    from hypervisor.core.vcpu import Vcpu

GNTTABOP_SETUP_TABLE = 2
GNTTABOP_QUERY_SIZE = 6
GNTTABOP_SET_VERSION = 8

GNTST_OKAY = 0
GNTST_GENERAL_ERROR = -1
GNTST_BAD_DOMAIN = -2
GNTST_BAD_VIRT_ADDR = -5

DOMID_SELF = 0x7FF0
INITIAL_NR_GRANT_FRAMES = 1  # Xen's grant_table_init grows the table to this at creation
DEFAULT_MAX_GRANT_FRAMES = 64  # Xen's gnttab_max_frames default

# struct gnttab_query_size: domid_t dom (IN); uint32 nr_frames, max_nr_frames; int16 status
QUERY_SIZE = struct.Struct("<H2xIIh2x")
# struct gnttab_setup_table: domid_t dom; uint32 nr_frames; int16 status; handle frame_list
SETUP_TABLE = struct.Struct("<H2xIh6xQ")
SET_VERSION = struct.Struct("<I")


@dataclass
class GrantTable:
    """A domain's grant table: its shared frames (machine frame numbers) and version."""

    max_frames: int = DEFAULT_MAX_GRANT_FRAMES
    frames: list[int] = field(default_factory=list)
    version: int = 0  # 0 until the guest sets one or calls setup_table (then 1)


def create_grant_table(hv: Hypervisor, domid: int, name: str,
                       max_frames: int = DEFAULT_MAX_GRANT_FRAMES) -> GrantTable:
    table = GrantTable(max_frames)
    grow(hv, table, domid, name, INITIAL_NR_GRANT_FRAMES)
    return table


def grow(hv: Hypervisor, table: GrantTable, domid: int, name: str, nr_frames: int) -> None:
    while len(table.frames) < nr_frames:
        mfn = hv.frames.alloc_one(f"domain {name}'s grant frame {len(table.frames)}")
        hv.memory.frame_u8(mfn)[:] = 0
        hv.frame_table.assign(np.array([mfn], dtype=np.uint64), domid)
        table.frames.append(int(mfn))


def _target_ok(v: Vcpu, dom_arg: int) -> bool:
    """Xen looks the domain up by id (DOMID_SELF or a real one); a domU may name only itself."""
    return dom_arg in (DOMID_SELF, v.domain.domid)


def grant_table_op(hv: Hypervisor, v: Vcpu, cmd: int, uop: int, count: int, *_: int) -> int:
    table: GrantTable | None = v.domain.grant_table
    if table is None:
        return -ENOSYS
    if cmd == GNTTABOP_QUERY_SIZE:
        return _once(count, lambda: query_size(hv, v, table, uop))
    if cmd == GNTTABOP_SETUP_TABLE:
        return _once(count, lambda: setup_table(hv, v, table, uop))
    if cmd == GNTTABOP_SET_VERSION:
        return _once(count, lambda: set_version(hv, v, table, uop))
    return -ENOSYS  # map/unmap/transfer/copy/get_version: not modelled


def _once(count: int, op) -> int:
    # these three ops take exactly one argument structure (Xen: count != 1 is -EINVAL)
    return op() if count == 1 else -EINVAL


def query_size(hv: Hypervisor, v: Vcpu, table: GrantTable, uop: int) -> int:
    dom, _nr, _max, _status = QUERY_SIZE.unpack(hv.copy_from_guest(v, uop, QUERY_SIZE.size))
    if _target_ok(v, dom):
        reply = (dom, len(table.frames), table.max_frames, GNTST_OKAY)
    else:
        reply = (dom, 0, 0, GNTST_BAD_DOMAIN)
    hv.copy_to_guest(v, uop, QUERY_SIZE.pack(*reply))
    return 0


def setup_table(hv: Hypervisor, v: Vcpu, table: GrantTable, uop: int) -> int:
    dom, nr_frames, _status, frame_list = SETUP_TABLE.unpack(
        hv.copy_from_guest(v, uop, SETUP_TABLE.size))
    status = GNTST_OKAY
    if nr_frames > table.max_frames:
        status = GNTST_GENERAL_ERROR
    elif not _target_ok(v, dom):
        status = GNTST_BAD_DOMAIN
    else:
        if table.version == 0:
            table.version = 1
        grow(hv, table, v.domain.domid, v.domain.name, nr_frames)
        try:  # a PV guest gets machine frames: it maps them itself
            hv.copy_to_guest(v, frame_list, struct.pack(f"<{nr_frames}Q",
                                                        *table.frames[:nr_frames]))
        except GuestAccessError:  # Xen's answer to an unwritable frame list
            status = GNTST_BAD_VIRT_ADDR
    hv.copy_to_guest(v, uop + 8, struct.pack("<h", status))
    return 0


def set_version(hv: Hypervisor, v: Vcpu, table: GrantTable, uop: int) -> int:
    (version,) = SET_VERSION.unpack(hv.copy_from_guest(v, uop, SET_VERSION.size))
    if version not in (1, 2):
        rc = -EINVAL
    elif version == 2:
        rc = -ENOSYS  # v1 only: Xen's answer when max-ver is 1
    else:
        table.version, rc = 1, 0
    hv.copy_to_guest(v, uop, SET_VERSION.pack(table.version))
    return rc
