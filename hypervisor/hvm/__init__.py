"""HVM domains: guest-physical memory behind EPT, two-stage translation, LAPIC, interrupts.

- `physmap`: a domain's P2M and EPT, superpage-friendly backing, populate-on-demand,
  log-dirty.
- `builder`: loads an ELF kernel at guest-physical addresses, builds its page tables,
  GDT, IDT, stacks and `hvm_start_info`.
- `mmu`: the two-stage TLB fill (guest tables in GPA space, every access through EPT).
- `apic`: the xAPIC MMIO page of each physical CPU, routed to the loaded vCPU's vLAPIC.
- `vcpu`: per-vCPU HVM state: vLAPIC, posted-interrupt descriptor, interrupt sources.
- `interrupts`: injection through the guest IDT (RFLAGS.IF, the STI/MOV-SS shadow).
- `policy`: the HVM answers to the core's questions (entry, exits, timers, reports) and
  HVM domain creation.
- `hypercalls`: the HVM hypercall table.
- `vlapic`, `ept`, `p2m`: the vLAPIC state machine, EPT tables, the P2M.
- `image`: HVM save and restore records.

The guest's view (entry state, memory map, LAPIC, hypercalls) is in README.md, "HVM guests".
"""
