/*
 * pv_faults: exceptions in a PV guest.
 *
 * A PV guest has no IDT of its own: it gives the hypervisor a trap table
 * (set_trap_table) of {vector, flags, cs, handler address} entries, and the
 * hypervisor delivers each fault to the registered handler with Xen's
 * bounce frame on the current stack:
 *
 *     [rsp + 0]   RCX, [rsp + 8] R11   (what they held when the fault hit)
 *     [rsp + 16]  error code      (only for #DF, #TS, #NP, #SS, #GP, #PF, #AC)
 *     [rsp + 16]  RIP             (+8 when there is an error code)
 *     [rsp + 24]  CS
 *     [rsp + 32]  RFLAGS
 *     [rsp + 40]  RSP
 *     [rsp + 48]  SS
 *
 * Each handler starts with BOUNCE_ENTRY (pops rcx and r11: the hardware
 * frame is left) and returns with BOUNCE_IRET (HYPERVISOR_iret), after
 * dropping the error code.  Our kernel runs in ring 3, so reading CR2 is a
 * privileged instruction the hypervisor emulates.
 *
 * The guest raises, in turn:
 *   #DE  "div rcx" with rcx = 0.  A fault: the saved RIP is the div itself;
 *        the handler records it and skips the 3-byte div (DIV_LEN).
 *   #BP  three int3.  A trap: the saved RIP is after the int3, so the
 *        handler just counts and returns.
 *   #PF  three 3-byte moves through rax (PF_INSN_LEN): a write and a read
 *        of UNMAPPED (outside the bootstrap mapping), then a write to our
 *        own L4 page, which the hypervisor maps read-only.  The handler
 *        records the error code, CR2 (register and vcpu_info.arch.cr2) and
 *        RIP, and skips the instruction.
 *
 * The instructions that fault are emitted by FAULTING, which checks their
 * length at assembly time, so the handlers can skip them by a known amount.
 *
 * Checks (the shutdown code is the number of the first one that failed):
 *   1  set_trap_table returned 0
 *   2  #DE handler ran once        3  ... with RIP = the div
 *   4  #BP handler ran 3 times     5  ... last RIP = after the third int3
 *   6  #PF (write, not present): error code 0x2   7  CR2   8  vcpu_info cr2   9  RIP
 *  10  #PF (read, not present):  error code 0x0  11  CR2  12  vcpu_info cr2
 *  13  #PF (write, read-only page table): error code 0x3  14  CR2
 *  15  the L4 entry we tried to overwrite is unchanged
 *  16  the #PF handler ran 3 times
 */
    .intel_syntax noprefix
    .include "xen.inc"

    .equ    UNMAPPED,       0xffffffff90000000  /* VIRT_BASE + 256 MiB: not mapped */
    .equ    DIV_LEN,        3                   /* div rcx:           48 f7 f1 */
    .equ    PF_INSN_LEN,    3                   /* mov [rax], rbx:    48 89 18 */
                                                /* mov rbx, [rax]:    48 8b 18 */

    .equ    PF_PROT,        1 << 0              /* #PF error code: page was present */
    .equ    PF_WRITE,       1 << 1              /*                 access was a write */

/* FAULTING label, len, insn: emit `insn` at `label`; fail the build unless
 * it is exactly `len` bytes long. */
.macro FAULTING label, len, insn:vararg
\label:
    \insn
    .if . - \label - \len
    .error "faulting instruction does not have the length its handler skips"
    .endif
.endm

    .section .rodata
    .globl  guest_name
guest_name: .asciz "pv_faults"

    .data
    .balign 8
/* The trap table: one entry per vector we handle, ended by address 0. */
trap_table:
    TRAP_ENTRY 0,  divide_error_handler     /* #DE */
    TRAP_ENTRY 3,  int3_handler             /* #BP */
    TRAP_ENTRY 14, page_fault_handler       /* #PF */
    .quad   0, 0

    .bss
    .balign 8
start_info:     .skip 8
vcpu_info:      .skip 8     /* our vcpu_info: vcpu_info[0] in shared_info */
de_count:       .skip 8     /* #DE: how many, and the RIP of the last one */
de_rip:         .skip 8
bp_count:       .skip 8     /* #BP */
bp_rip:         .skip 8
pf_count:       .skip 8     /* #PF: how many, and what the last one said */
pf_error:       .skip 8
pf_cr2:         .skip 8
pf_vcpu_cr2:    .skip 8
pf_rip:         .skip 8

    .section .text.entry, "ax"
    .globl  _start
_start:
    mov     [rip + start_info], rsi
    lea     rax, [rip + shared_info_page]   /* mapped there by xen_entry */
    mov     [rip + vcpu_info], rax      /* vcpu_info[0] is at its start */

/* 1: install the trap table. */
    PRINT   "installing handlers for #DE, #BP and #PF"
    lea     rdi, [rip + trap_table]
    HYPERCALL set_trap_table
    mov     rdi, rax
    xor     esi, esi
    CHECK_DEC 1, "set_trap_table returned"

/* 2, 3: divide by zero. */
    PRINT   "dividing by zero"
    xor     ecx, ecx
    mov     eax, 1
    xor     edx, edx
    FAULTING div_insn, DIV_LEN, div rcx
    mov     rdi, [rip + de_count]
    mov     esi, 1
    CHECK_DEC 2, "#DE count"
    mov     rdi, [rip + de_rip]
    lea     rsi, [rip + div_insn]
    CHECK_HEX 3, "#DE RIP (expected the div)"

/* 4, 5: breakpoints. */
    PRINT   "executing int3 three times"
    int3
    int3
    int3
after_int3:
    mov     rdi, [rip + bp_count]
    mov     esi, 3
    CHECK_DEC 4, "#BP count"
    mov     rdi, [rip + bp_rip]
    lea     rsi, [rip + after_int3]
    CHECK_HEX 5, "#BP RIP (expected after the last int3)"

/* 6-9: write to an address nothing maps. */
    PRINT   "writing to unmapped 0xffffffff90000000"
    call    forget_page_fault
    mov     rax, UNMAPPED
    xor     ebx, ebx
    FAULTING pf_write, PF_INSN_LEN, mov [rax], rbx
    mov     rdi, [rip + pf_error]
    mov     esi, PF_WRITE
    CHECK_HEX 6, "#PF error code (write, not present)"
    mov     rdi, [rip + pf_cr2]
    mov     rsi, UNMAPPED
    CHECK_HEX 7, "#PF cr2"
    mov     rdi, [rip + pf_vcpu_cr2]
    mov     rsi, UNMAPPED
    CHECK_HEX 8, "#PF vcpu_info.arch.cr2"
    mov     rdi, [rip + pf_rip]
    lea     rsi, [rip + pf_write]
    CHECK_HEX 9, "#PF RIP (expected the mov)"

/* 10-12: read the same address. */
    PRINT   "reading from unmapped 0xffffffff90000000"
    call    forget_page_fault
    mov     rax, UNMAPPED
    FAULTING pf_read, PF_INSN_LEN, mov rbx, [rax]
    mov     rdi, [rip + pf_error]
    xor     esi, esi
    CHECK_HEX 10, "#PF error code (read, not present)"
    mov     rdi, [rip + pf_cr2]
    mov     rsi, UNMAPPED
    CHECK_HEX 11, "#PF cr2"
    mov     rdi, [rip + pf_vcpu_cr2]
    mov     rsi, UNMAPPED
    CHECK_HEX 12, "#PF vcpu_info.arch.cr2"

/* 13-15: write to our own L4, which is mapped read-only.  Write back the
 * value it already holds, so that nothing breaks even if the write went
 * through. */
    PRINT   "writing to our own L4 page table (mapped read-only)"
    call    forget_page_fault
    mov     rax, [rip + start_info]
    mov     rax, [rax + SI_PT_BASE]
    mov     r12, [rax]                  /* r12 = L4[0], as it was */
    mov     rbx, r12
    FAULTING pf_pt_write, PF_INSN_LEN, mov [rax], rbx
    mov     rdi, [rip + pf_error]
    mov     esi, PF_PROT | PF_WRITE
    CHECK_HEX 13, "#PF error code (write, present, read-only)"
    mov     rdi, [rip + pf_cr2]
    mov     rsi, [rip + start_info]
    mov     rsi, [rsi + SI_PT_BASE]
    CHECK_HEX 14, "#PF cr2 (expected pt_base)"
    mov     rdi, [rip + start_info]
    mov     rdi, [rdi + SI_PT_BASE]
    mov     rdi, [rdi]
    mov     rsi, r12
    CHECK_HEX 15, "L4[0] after the refused write"

    mov     rdi, [rip + pf_count]
    mov     esi, 3
    CHECK_DEC 16, "#PF count"

    jmp     finish

    .text

/* forget_page_fault(): set the #PF record to all ones, so that a stale value
 * from the previous fault cannot pass the next check. */
forget_page_fault:
    mov     rax, -1
    mov     [rip + pf_error], rax
    mov     [rip + pf_cr2], rax
    mov     [rip + pf_vcpu_cr2], rax
    mov     [rip + pf_rip], rax
    ret

/* #DE: a fault; [rsp] (after BOUNCE_ENTRY) = RIP of the div.  Record it, then resume after it. */
divide_error_handler:
    BOUNCE_ENTRY
    push    rax
    mov     rax, [rsp + 8]              /* saved RIP (above the pushed rax) */
    mov     [rip + de_rip], rax
    inc     qword ptr [rip + de_count]
    add     qword ptr [rsp + 8], DIV_LEN
    pop     rax
    BOUNCE_IRET

/* #BP: a trap; [rsp] (after BOUNCE_ENTRY) = RIP after the int3 already. */
int3_handler:
    BOUNCE_ENTRY
    push    rax
    mov     rax, [rsp + 8]
    mov     [rip + bp_rip], rax
    inc     qword ptr [rip + bp_count]
    pop     rax
    BOUNCE_IRET

/* #PF: [rsp] (after BOUNCE_ENTRY) = error code, [rsp + 8] = RIP of the faulting instruction. */
page_fault_handler:
    BOUNCE_ENTRY
    push    rax
    push    rcx
    mov     rax, [rsp + 16]             /* error code */
    mov     [rip + pf_error], rax
    mov     rax, [rsp + 24]             /* RIP */
    mov     [rip + pf_rip], rax
    mov     rax, cr2                    /* the faulting address (emulated read) */
    mov     [rip + pf_cr2], rax
    mov     rcx, [rip + vcpu_info]      /* ... and as the hypervisor reports it */
    mov     rax, [rcx + VI_ARCH_CR2]
    mov     [rip + pf_vcpu_cr2], rax
    inc     qword ptr [rip + pf_count]
    add     qword ptr [rsp + 24], PF_INSN_LEN   /* skip the instruction */
    pop     rcx
    pop     rax
    add     rsp, 8                      /* drop the error code */
    BOUNCE_IRET
