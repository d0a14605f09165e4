/*
 * expect.s: silent self-checks for guests that check thousands of things,
 * and errno names for hypercall results.
 *
 *   expect_eq(rdi = found, rsi = expected, edx = code, rcx = what)
 *       found == expected: count it in checks_passed, print nothing;
 *       else print "<guest>: what = found FAILED (expected ...)" in hex and
 *       remember `code` if it is the first failed check (as check_hex does).
 *       Returns eax = 1 on a pass, 0 on a failure.
 *   expect_rc(...)      same for hypercall results: the line names them,
 *                       "what = -EBUSY FAILED (expected 0)"
 *   con_errno(rdi = rc) append "0", "-EINVAL" (Xen's names) or the number
 *
 * Use them through the EXPECT / EXPECT_RC macros of xen.inc.  The verdict
 * is check.s's: `finish` shuts down with the first failed code.
 */
    .intel_syntax noprefix
    .include "xen.inc"

    .bss
    .balign 8
    .globl  checks_passed
checks_passed:  .skip 8             /* EXPECT / EXPECT_RC passes so far */

    .section .rodata
    .balign 8
/* {u64 errno, u64 name} pairs, ended by errno 0. */
errno_names:
    .irp    name, EPERM, ENOENT, ESRCH, EINTR, ENOMEM, EACCES, EFAULT, EBUSY, EINVAL, ENOSYS, ERESTART, EOPNOTSUPP
    .quad   \name
    .pushsection .rodata.str, "aMS", @progbits, 1
.Lname_\name: .asciz "\name"
    .popsection
    .quad   .Lname_\name
    .endr
    .quad   0, 0

    .text

    .globl  expect_eq
expect_eq:
    cmp     rdi, rsi
    jne     check_hex               /* prints, records the code, returns 0 */
    inc     qword ptr [rip + checks_passed]
    mov     eax, 1
    ret

    .globl  expect_rc
expect_rc:
    cmp     rdi, rsi
    jne     1f
    inc     qword ptr [rip + checks_passed]
    mov     eax, 1
    ret
1:  push    rbx
    push    r12
    push    r13
    push    r14
    sub     rsp, 8                  /* keep the stack 16-byte aligned */
    mov     rbx, rdi                /* found */
    mov     r12, rsi                /* expected */
    mov     r13d, edx               /* code */
    mov     r14, rcx                /* what */
    call    con_begin
    mov     rdi, r14
    call    con_str
    STR     rdi, " = "
    call    con_str
    mov     rdi, rbx
    call    con_errno
    STR     rdi, " FAILED (expected "
    call    con_str
    mov     rdi, r12
    call    con_errno
    STR     rdi, ")"
    call    con_str
    call    con_end
    cmp     dword ptr [rip + first_failed_check], 0
    jne     2f
    mov     [rip + first_failed_check], r13d
2:  xor     eax, eax
    add     rsp, 8
    pop     r14
    pop     r13
    pop     r12
    pop     rbx
    ret

    .globl  con_errno
con_errno:
    test    rdi, rdi
    jns     con_dec                 /* 0 or positive: the number */
    push    rbx
    mov     rbx, rdi
    neg     rbx                     /* the errno */
    STR     rdi, "-"
    call    con_str
    lea     rcx, [rip + errno_names]
1:  mov     rax, [rcx]
    test    rax, rax
    jz      2f                      /* not a name we know: the number */
    cmp     rax, rbx
    je      3f
    add     rcx, 16
    jmp     1b
2:  mov     rdi, rbx
    pop     rbx
    jmp     con_dec
3:  mov     rdi, [rcx + 8]
    pop     rbx
    jmp     con_str
