/*
 * check.s: self-checks and the final verdict.
 *
 *   check_hex(rdi = found, rsi = expected, edx = code, rcx = what)
 *   check_dec(...)           same, numbers printed in decimal
 *       print "<guest>: what = found ok" or "... FAILED (expected ...)";
 *       on failure remember `code` unless an earlier check already failed;
 *       return eax = 1 if found == expected, else 0.
 *   finish()                 print the verdict, then shutdown(first failed code)
 *   shutdown(edi = code)     sched_op(SCHEDOP_shutdown, {poweroff, code})
 *
 * Use them through the CHECK_HEX / CHECK_DEC macros of xen.inc.
 */
    .intel_syntax noprefix
    .include "xen.inc"

    .bss
    .balign 4
    .globl  first_failed_check
first_failed_check: .skip 4        /* 0 = no check has failed (yet) */

    .text

    .globl  check_hex
check_hex:
    mov     r8d, 1                  /* print in hex */
    jmp     check_value

    .globl  check_dec
check_dec:
    xor     r8d, r8d                /* print in decimal */

check_value:
    push    rbx
    push    r12
    push    r13
    push    r14
    push    r15
    mov     rbx, rdi                /* found */
    mov     r12, rsi                /* expected */
    mov     r13d, edx               /* check code */
    mov     r14, rcx                /* what */
    mov     r15d, r8d               /* 1: hex, 0: decimal */

    call    con_begin
    mov     rdi, r14
    call    con_str
    STR     rdi, " = "
    call    con_str
    mov     rdi, rbx
    call    print_value
    cmp     rbx, r12
    jne     1f

    STR     rdi, " ok"
    call    con_str
    call    con_end
    mov     eax, 1
    jmp     2f

1:  STR     rdi, " FAILED (expected "
    call    con_str
    mov     rdi, r12
    call    print_value
    STR     rdi, ")"
    call    con_str
    call    con_end
    cmp     dword ptr [rip + first_failed_check], 0
    jne     3f
    mov     [rip + first_failed_check], r13d
3:  xor     eax, eax

2:  pop     r15
    pop     r14
    pop     r13
    pop     r12
    pop     rbx
    ret

/* print_value(rdi): con_hex or con_dec, as r15 of check_value says. */
print_value:
    test    r15d, r15d
    jnz     con_hex
    jmp     con_dec

    .globl  finish
finish:
    mov     ebx, [rip + first_failed_check]
    test    ebx, ebx
    jnz     1f
    PRINT   "all checks passed"
    xor     edi, edi
    jmp     shutdown
1:  call    con_begin
    STR     rdi, "check "
    call    con_str
    mov     edi, ebx
    call    con_dec
    STR     rdi, " failed"
    call    con_str
    call    con_end
    mov     edi, ebx
    jmp     shutdown

    .globl  shutdown
shutdown:
    sub     rsp, 8                  /* struct sched_shutdown on the stack */
    mov     dword ptr [rsp], SHUTDOWN_poweroff      /* reason */
    mov     dword ptr [rsp + 4], edi                /* code: our verdict */
    mov     edi, SCHEDOP_shutdown
    mov     rsi, rsp
    HYPERCALL sched_op
    ud2                             /* shutdown never returns: if it did, */
                                    /* crash loudly rather than run on    */
