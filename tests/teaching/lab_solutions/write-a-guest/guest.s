/* Reference solution of lab write-a-guest (the tests grade it: full marks). */
    .intel_syntax noprefix
    .include "xen.inc"

    .section .rodata
    .globl  guest_name
guest_name: .asciz "myguest"

    .section .text.entry, "ax"
    .globl  _start
_start:
    PRINT   "hello, hvlab"
    xor     eax, eax                /* rax = sum, rcx = i */
    mov     ecx, 1
1:  add     rax, rcx
    inc     ecx
    cmp     ecx, 100
    jbe     1b
    push    rax
    call    con_begin
    STR     rdi, "sum 1..100 = "
    call    con_str
    pop     rdi
    call    con_dec
    call    con_end
    mov     edi, 42
    jmp     shutdown
