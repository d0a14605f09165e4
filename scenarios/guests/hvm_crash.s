/*
 * hvm_crash: an HVM guest that reads a guest-physical address where nothing
 * is mapped.
 *
 * It follows its own page tables from CR3 (identity-mapped, so table
 * addresses are usable as pointers) down to the L1 table that maps the first
 * 2 MiB, points the entry for virtual address 0x1000 (a page this guest does
 * not use) at guest-physical BAD_GPA, far beyond its RAM, flushes that TLB
 * entry and reads it.  The guest walk succeeds; EPT has nothing at BAD_GPA:
 * an EPT violation the hypervisor cannot resolve, so the domain crashes with a
 * report naming the address, the access, RIP and the instruction.  Another
 * domain in the same scenario is unaffected.
 */
    .intel_syntax noprefix
    .include "xen.inc"
    .include "hvm.inc"

    .equ    BAD_GPA,        0x7FFF0000
    .equ    VICTIM_VA,      0x1000

    .section .rodata
    .globl  guest_name
guest_name: .asciz "hvm_crash"

    .section .text.entry, "ax"
    .globl  _start
_start:
    test    rdi, rdi
    jnz     park
    PRINT   "reading guest-physical 0x7fff0000, which is not mapped"
    movabs  rcx, 0x000FFFFFFFFFF000     /* address bits of an entry */
    mov     rax, cr3
    and     rax, rcx                    /* L4 */
    mov     rax, [rax]                  /* L4[0] */
    and     rax, rcx                    /* L3 */
    mov     rax, [rax]                  /* L3[0] */
    and     rax, rcx                    /* L2 */
    mov     rax, [rax]                  /* L2[0] */
    and     rax, rcx                    /* L1 for 0..2 MiB */
    mov     qword ptr [rax + 8 * (VICTIM_VA >> PAGE_SHIFT)], BAD_GPA | 3
    invlpg  [VICTIM_VA]
    mov     rax, [VICTIM_VA]            /* EPT violation */
    PRINT   "still running after the bad access"
    mov     edi, 1
    jmp     shutdown

park:
    cli
    hlt
    jmp     park
