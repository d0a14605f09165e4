/*
 * Your own PV guest (lab write-a-guest, see README.md).
 *
 * Goal: print "hello, hvlab", print "sum 1..100 = " followed by the sum
 * computed by a loop, and power off with shutdown code 42.
 *
 * Your kernel runs in ring 3 on Xen's PV ABI (docs/pv-abi.md).  At entry:
 * rsi = start_info, rsp = top of the boot stack, event delivery masked.  The library linked in gives you:
 *     PRINT "text"            one console line "<guest_name>: text"
 *     con_begin / con_str (rdi = string) / con_dec (rdi = number) / con_end
 *                             build one line piece by piece
 *     STR rdi, "text"         rdi = address of a constant string
 *     shutdown                power off with code edi (never returns)
 */
    .intel_syntax noprefix
    .include "xen.inc"

    .section .rodata
    .globl  guest_name          /* the console prefix */
guest_name: .asciz "myguest"

    .section .text.entry, "ax"
    .globl  _start
_start:
    /* TODO: say hello, compute and print the sum, shut down with code 42 */
    xor     edi, edi
    jmp     shutdown
