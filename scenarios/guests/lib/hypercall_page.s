/*
 * hypercall_page.s: the page the hypervisor fills with hypercall stubs.
 *
 * The ELF symbol `hypercall_page` tells the domain builder where this page
 * is.  Before the guest starts, the hypervisor writes at offset 32*N the stub
 * for hypercall N:  mov eax, N; vmcall; ret.  The guest calls
 * hypercall_page + 32*N (see the HYPERCALL macro in xen.inc) and never needs
 * to know which instruction the hypervisor traps on.
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
