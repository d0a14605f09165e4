"""HVM domains: guest-physical memory behind EPT, two-stage translation, LAPIC, interrupts.

- `physmap`: a domain's P2M and EPT, superpage-friendly backing, populate-on-demand,
  log-dirty.
- `builder`: loads an ELF kernel at guest-physical addresses, builds its page tables,
  GDT, IDT, stacks and `hvm_start_info`.
- `mmu`: the two-stage TLB fill (guest tables in GPA space, every access through EPT).
- `apic`: the xAPIC MMIO page of each physical CPU, routed to the loaded vCPU's vLAPIC.
- `vcpu`: per-vCPU HVM state: vLAPIC, posted-interrupt descriptor, interrupt sources.
- `interrupts`: injection through the guest IDT (RFLAGS.IF, the STI/MOV-SS shadow).
- `support`: what the hypervisor and the exit dispatcher delegate HVM work to.

The guest's view (entry state, memory map, LAPIC, hypercalls) is in README.md, "HVM guests".
"""
