"""The HVM hypercall table: what an HVM guest may call in hvlab.

Xen's HVM table has more; HVM domains here have no event channels, grant tables
or PV MMU, and of sched_op only yield and shutdown.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hypervisor.core.hypercalls import (
    HYPERVISOR_CONSOLE_IO,
    HYPERVISOR_SCHED_OP,
    HYPERVISOR_XEN_VERSION,
    SCHEDOP_SHUTDOWN,
    SCHEDOP_SHUTDOWN_CODE,
    SCHEDOP_YIELD,
    Hypercall,
    console_io,
    sched_op,
    xen_version,
)
from hypervisor.lib.errno import ENOSYS

if TYPE_CHECKING:
    from hypervisor.core.hypervisor import Hypervisor
    from hypervisor.core.vcpu import Vcpu

HVM_SCHEDOPS = frozenset({SCHEDOP_YIELD, SCHEDOP_SHUTDOWN, SCHEDOP_SHUTDOWN_CODE})


def hvm_sched_op(hv: Hypervisor, v: Vcpu, cmd: int, *args: int) -> int:
    """sched_op without blocking on events (an HVM guest sleeps in `hlt`)."""
    if cmd not in HVM_SCHEDOPS:
        return -ENOSYS
    return sched_op(hv, v, cmd, *args)


HVM_HYPERCALLS: dict[int, Hypercall] = {
    HYPERVISOR_XEN_VERSION: Hypercall("xen_version", xen_version),
    HYPERVISOR_CONSOLE_IO: Hypercall("console_io", console_io),
    HYPERVISOR_SCHED_OP: Hypercall("sched_op", hvm_sched_op),
}
