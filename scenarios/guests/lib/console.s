/*
 * console.s: build one line of text, then write it with console_io.
 *
 *   con_begin()          start a line with "<guest_name>: "
 *   con_str(rdi)         append a NUL-terminated string
 *   con_dec(rdi)         append rdi as an unsigned decimal number
 *   con_hex(rdi)         append rdi as 0x... (no leading zeros)
 *   con_end()            append "\n" and write the line to the console
 *   con_line(rdi)        con_begin + con_str(rdi) + con_end
 *
 * Every guest defines the NUL-terminated string `guest_name`.  One line
 * buffer is shared, so only one vCPU at a time may print.  Too long lines
 * are cut at LINE_MAX - 1 characters.
 */
    .intel_syntax noprefix
    .include "xen.inc"

    .equ    LINE_MAX, 160

    .bss
    .balign 8
line_len:   .skip   8               /* characters in line_buf */
line_buf:   .skip   LINE_MAX

    .section .rodata
hex_digits: .ascii  "0123456789abcdef"

    .text

    .globl  con_begin
con_begin:
    mov     qword ptr [rip + line_len], 0
    lea     rdi, [rip + guest_name]
    call    con_str
    STR     rdi, ": "
    jmp     con_str                 /* tail call */

/* con_char(dil): append one character, keeping room for the final "\n". */
con_char:
    mov     rax, [rip + line_len]
    cmp     rax, LINE_MAX - 1
    jae     1f                      /* full: drop it */
    lea     rcx, [rip + line_buf]
    mov     [rcx + rax], dil
    inc     rax
    mov     [rip + line_len], rax
1:  ret

    .globl  con_str
con_str:
    push    rbx
    mov     rbx, rdi
1:  movzx   edi, byte ptr [rbx]
    test    edi, edi
    jz      2f
    call    con_char
    inc     rbx
    jmp     1b
2:  pop     rbx
    ret

    .globl  con_dec
con_dec:
    push    rbx
    push    r12
    sub     rsp, 24                 /* room for the 20 digits of 2^64 - 1 */
    lea     rbx, [rsp + 24]         /* digits are produced last one first, */
    mov     r12, rbx                /* so fill the buffer from its end     */
    mov     rax, rdi
    mov     ecx, 10
1:  xor     edx, edx
    div     rcx                     /* rax = rax / 10, rdx = next digit */
    add     dl, '0'
    dec     rbx
    mov     [rbx], dl
    test    rax, rax
    jnz     1b
2:  movzx   edi, byte ptr [rbx]
    call    con_char
    inc     rbx
    cmp     rbx, r12
    jne     2b
    add     rsp, 24
    pop     r12
    pop     rbx
    ret

    .globl  con_hex
con_hex:
    push    rbx
    push    r12
    mov     rbx, rdi                /* the value */
    mov     edi, '0'
    call    con_char
    mov     edi, 'x'
    call    con_char
    mov     r12d, 60                /* bit position of the current nibble */
1:  test    r12d, r12d              /* skip leading zero nibbles, */
    jz      2f                      /* but always print the last one */
    mov     rax, rbx
    mov     ecx, r12d
    shr     rax, cl
    test    al, 0xf
    jnz     2f
    sub     r12d, 4
    jmp     1b
2:  mov     rax, rbx
    mov     ecx, r12d
    shr     rax, cl
    and     eax, 0xf
    lea     rcx, [rip + hex_digits]
    movzx   edi, byte ptr [rcx + rax]
    call    con_char
    sub     r12d, 4
    jns     2b
    pop     r12
    pop     rbx
    ret

    .globl  con_end
con_end:
    mov     rax, [rip + line_len]
    lea     rdx, [rip + line_buf]
    mov     byte ptr [rdx + rax], 10    /* "\n" */
    lea     rsi, [rax + 1]
    mov     edi, CONSOLEIO_write    /* console_io(CONSOLEIO_write, len, buf) */
    HYPERCALL console_io
    mov     qword ptr [rip + line_len], 0
    ret

    .globl  con_line
con_line:
    push    rbx
    mov     rbx, rdi
    call    con_begin
    mov     rdi, rbx
    call    con_str
    call    con_end
    pop     rbx
    ret
