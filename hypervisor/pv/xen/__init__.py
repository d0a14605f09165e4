"""Xen's 64-bit PV ABI at CPL 3: the guest kernel and its users both run in ring 3.

The one PV ABI of hvlab, for Linux and hvlab's own guests alike (docs/pv-abi.md,
which also lists the departures from Xen).
"""
