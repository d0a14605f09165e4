"""PV domains: the builder, the PV TLB fill, the PV MMU hypercalls, save and restore.

- `builder`: start-of-day memory of a PV guest (page tables, start_info).
- `mmu`: the one-stage PV walk the physical CPUs' TLB-fill hook uses.
- `mmu_ops`: mmu_update and mmuext_op on top of the typing reference in `hypervisor.mm`.
- `save` / `restore`: a domain to and from a migration-v2 stream.
- `linux`: what Debian's stock Linux kernel needs (bzImage, Xen notes, initramfs,
  Xen's start-of-day layout, console ring, xenstore); see docs/linux-guest.md.
"""
