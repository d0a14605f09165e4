/*
 * pv_crash: a guest that faults with no handler.
 *
 * It installs no trap table, prints one line and executes ud2 (#UD,
 * vector 6, "invalid opcode").  With nowhere to deliver the fault, the
 * hypervisor must crash this domain, and only this one: the other domains
 * of the scenario (pv-crash.toml runs pv_hello beside it) carry on.
 *
 * If the guest is still running after the ud2, the hypervisor got it wrong:
 * the guest says so and shuts down with code 1.
 */
    .intel_syntax noprefix
    .include "xen.inc"

    .section .rodata
    .globl  guest_name
guest_name: .asciz "pv_crash"

    .section .text.entry, "ax"
    .globl  _start
_start:
    PRINT   "executing ud2 with no trap table: the hypervisor must crash this domain only"
crash_here:
    ud2
    PRINT   "still running after ud2: the fault was not fatal"
    mov     edi, 1
    jmp     shutdown
