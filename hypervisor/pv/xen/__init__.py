"""Xen's 64-bit PV ABI at CPL 3: the guest kernel and its users both run in ring 3.

Used for domains whose kernel asks for it through its ELF notes (a Linux
kernel: no HYPERCALL_PAGE note, a bare `syscall` is the hypercall);
hvlab's own PV guests keep the CPL-0 ABI (docs/pv-abi.md lists the
departures).
"""
