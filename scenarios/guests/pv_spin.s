/*
 * pv_spin: pure computation, for benchmarks.
 *
 * SPIN_ITERATIONS rounds of four register-only instructions (add, xor, dec,
 * jnz): 200 million instructions, no memory access and no exit, so the run
 * measures raw guest execution speed.  With 1 ns of virtual time per
 * instruction (docs/pv-abi.md) the loop lasts about 0.2 s of virtual time.
 *
 * Check 1: the final rax matches CHECKSUM, computed offline with the same
 * recurrence (rcx counting down from SPIN_ITERATIONS to 1):
 *     rax += rdx;  rdx ^= rcx
 */
    .intel_syntax noprefix
    .include "xen.inc"

    .equ    SPIN_ITERATIONS, 50000000
    .equ    SEED,            0x9e3779b97f4a7c15
    .equ    CHECKSUM,        0x6ffb152f26c5a480

    .section .rodata
    .globl  guest_name
guest_name: .asciz "pv_spin"

    .section .text.entry, "ax"
    .globl  _start
_start:
    PRINT   "spinning: 50000000 x (add, xor, dec, jnz)"
/* The loop, from spin_begin to spin_end: self-contained (registers only),
 * so `hvlab bench` can also run exactly this code on a bare unicorn. */
    .globl  spin_begin, spin_end
spin_begin:
    xor     eax, eax
    mov     rdx, SEED
    mov     ecx, SPIN_ITERATIONS
spin_loop:
    add     rax, rdx
    xor     rdx, rcx
    dec     rcx
    jnz     spin_loop
spin_end:

    mov     rdi, rax
    mov     rsi, CHECKSUM
    CHECK_HEX 1, "checksum"
    jmp     finish
