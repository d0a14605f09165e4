/*
 * hypercall_page.s: the page the hypervisor fills with hypercall stubs.
 *
 * A PV kernel's HYPERCALL_PAGE note (lib/xen_notes.s), an HVM kernel's ELF
 * symbol `hypercall_page`, tells the builder where this page is.  Before the
 * guest starts, the hypervisor writes at 32*N the stub for hypercall N (Xen's
 * `syscall` stub for a PV kernel, mov eax, N; vmcall; ret for HVM).  The guest
 * calls hypercall_page + 32*N (HYPERCALL in xen.inc), whatever the stub is.
 *
 * The linker script puts this section first, at VIRT_BASE.
 */
    .intel_syntax noprefix

    .section .text.hypercall_page, "ax", @progbits
    .balign 4096
    .globl  hypercall_page
    .type   hypercall_page, @object
hypercall_page:
    .fill   4096, 1, 0              /* zeros until the hypervisor fills it */
    .size   hypercall_page, 4096
