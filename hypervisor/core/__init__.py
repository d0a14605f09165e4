"""The hypervisor core: machine, domains, vCPUs, scheduler, the exit dispatcher, hypercalls.

Modelled on Xen's common/ and arch/x86 entry code; what PV and HVM guests answer
differently lives in `hypervisor.pv` and `hypervisor.hvm`. Layout: docs/design.md.
"""
