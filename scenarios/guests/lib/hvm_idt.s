/*
 * hvm_idt.s: filling the IDT the HVM builder loaded.
 *
 *   idt_set_gate(edi = vector, rsi = handler)
 *       write a present 64-bit interrupt gate (DPL 0, KERNEL_CS, no IST) for
 *       `vector` into the IDT that IDTR points to.
 *
 * Linked into HVM guests only.
 */
    .intel_syntax noprefix
    .include "xen.inc"

    .text

    .globl  idt_set_gate
idt_set_gate:
    sub     rsp, 16
    sidt    [rsp + 6]               /* limit at +6, base at +8 (aligned) */
    mov     rdx, [rsp + 8]
    add     rsp, 16
    mov     eax, edi
    shl     rax, 4
    add     rdx, rax                /* rdx = &idt[vector] */
    mov     rax, rsi
    mov     word ptr [rdx], si      /* offset 15:0 */
    mov     word ptr [rdx + 2], KERNEL_CS
    mov     byte ptr [rdx + 4], 0   /* IST: none */
    mov     byte ptr [rdx + 5], 0x8E    /* present, DPL 0, interrupt gate */
    shr     rax, 16
    mov     word ptr [rdx + 6], ax  /* offset 31:16 */
    shr     rax, 16
    mov     dword ptr [rdx + 8], eax    /* offset 63:32 */
    mov     dword ptr [rdx + 12], 0
    ret
