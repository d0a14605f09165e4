/*
 * xen_notes.s: the Xen ELF notes of an hvlab PV kernel (public/elfnote.h).
 *
 * Xen's loader reads them to place and start the kernel, as it does for
 * Linux: the kernel is loaded by physical address + VIRT_BASE - PADDR_OFFSET
 * (kernel.ld links it with physical = virtual addresses, so at its link
 * addresses), entered at ENTRY (xen_entry, lib/xen_entry.s, which goes on
 * to the guest's _start), and the hypervisor writes its hypercall
 * stubs into the page at HYPERCALL_PAGE.  GUEST_OS "hvlab" also tells hvlab
 * that sched_shutdown carries the guest's verdict after the reason
 * (lib/check.s; docs/pv-abi.md).
 */
    .intel_syntax noprefix
    .include "xen.inc"

    .equ    XEN_ELFNOTE_ENTRY,          1
    .equ    XEN_ELFNOTE_HYPERCALL_PAGE, 2
    .equ    XEN_ELFNOTE_VIRT_BASE,      3
    .equ    XEN_ELFNOTE_PADDR_OFFSET,   4
    .equ    XEN_ELFNOTE_XEN_VERSION,    5
    .equ    XEN_ELFNOTE_GUEST_OS,       6
    .equ    XEN_ELFNOTE_LOADER,         8
    .equ    XEN_ELFNOTE_FEATURES,       10

    ELFNOTE XEN_ELFNOTE_GUEST_OS,       .asciz, "hvlab"
    ELFNOTE XEN_ELFNOTE_XEN_VERSION,    .asciz, "xen-3.0"
    ELFNOTE XEN_ELFNOTE_LOADER,         .asciz, "generic"
    ELFNOTE XEN_ELFNOTE_VIRT_BASE,      .quad, VIRT_BASE
    ELFNOTE XEN_ELFNOTE_PADDR_OFFSET,   .quad, VIRT_BASE
    ELFNOTE XEN_ELFNOTE_ENTRY,          .quad, xen_entry
    ELFNOTE XEN_ELFNOTE_HYPERCALL_PAGE, .quad, hypercall_page
    ELFNOTE XEN_ELFNOTE_FEATURES,       .asciz, "pae_pgdir_above_4gb"
