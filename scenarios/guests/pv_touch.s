/*
 * pv_touch: many TLB fills, for benchmarks.
 *
 * The guest reads one qword from every page of its bootstrap mapping, from
 * VIRT_BASE up to the end of the 512 KiB padding after the stack, ROUNDS
 * times.  In hvlab every TLB miss is a page-table walk done by the
 * hypervisor, so the run measures how many TLB fills per second the MMU
 * path sustains.  (A PV guest cannot map new pages without mmu_update, so it
 * walks what the domain builder mapped for it.)
 *
 * To make every round miss, the guest empties its TLB before each round
 * with mmuext_op(MMUEXT_TLB_FLUSH_LOCAL), as Linux on Xen does (a "mov cr3"
 * would do too, but in ring 3 it is a #GP the hypervisor emulates: two
 * exits, a read and a write, instead of one hypercall).  The hypervisor
 * flushes nothing while one vCPU keeps its pCPU, so without the flush only
 * the first round would miss.
 *
 * Nothing writes the first qword of any page of the region during the
 * rounds, so every round must read exactly the same data: each round folds
 * what it read into a checksum (rol + xor, so the order counts), and all
 * rounds must agree with the first.
 *
 * Checks (the shutdown code is the number of the first one that failed):
 *   1  the region (VIRT_BASE .. rsp at entry + 512 KiB) fits in nr_pages
 *   2  every round's checksum equals the first round's
 */
    .intel_syntax noprefix
    .include "xen.inc"

    .equ    ROUNDS,         1000

    .section .rodata
    .globl  guest_name
guest_name: .asciz "pv_touch"

    .balign 8
flush_op:                               /* struct mmuext_op: flush our TLB */
    .long   MMUEXT_TLB_FLUSH_LOCAL, 0
    .quad   0, 0

    .section .text.entry, "ax"
    .globl  _start
_start:
    mov     r12, VIRT_BASE              /* r12 = first page */
    lea     r13, [rsp + BOOT_PADDING]
    sub     r13, r12
    shr     r13, PAGE_SHIFT             /* r13 = pages in the region */
    mov     rbx, [rsi + SI_NR_PAGES]    /* (rsi is clobbered by calls) */

    call    con_begin
    STR     rdi, "reading one qword from each of "
    call    con_str
    mov     rdi, r13
    call    con_dec
    STR     rdi, " pages, 1000 rounds"
    call    con_str
    call    con_end

/* 1: the region is within the domain's memory. */
    xor     edi, edi
    cmp     r13, rbx
    setbe   dil
    mov     esi, 1
    CHECK_DEC 1, "region fits in nr_pages"

/* The rounds: r14 = rounds left, r15 = first round's checksum,
 * rbx = rounds that agreed with it. */
    call    touch_region
    mov     r15, rax
    mov     ebx, 1
    mov     r14d, ROUNDS - 1
1:  call    touch_region
    cmp     rax, r15
    jne     2f
    inc     rbx
2:  dec     r14d
    jnz     1b

/* 2: all rounds read the same. */
    mov     rdi, rbx
    mov     esi, ROUNDS
    CHECK_DEC 2, "rounds that read the same data as the first"
    jmp     finish

    .text

/* touch_region(): empty the TLB, then read the first qword of each of r13
 * pages from r12 on; return rax = checksum of what was read.  Registers
 * only, no stores. */
touch_region:
    lea     rdi, [rip + flush_op]       /* mmuext_op(&flush_op, 1, NULL, DOMID_SELF) */
    mov     esi, 1
    xor     edx, edx
    mov     r10d, DOMID_SELF
    HYPERCALL mmuext_op
    mov     rsi, r12
    mov     rcx, r13
    xor     eax, eax
1:  rol     rax, 7
    xor     rax, [rsi]                  /* the access that needs a TLB entry */
    add     rsi, PAGE_SIZE
    dec     rcx
    jnz     1b
    ret
