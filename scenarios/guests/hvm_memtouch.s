/*
 * hvm_memtouch: touch a large range of guest-physical memory, for EPT fills
 * and populate-on-demand.
 *
 * The guest takes the highest RAM range of the memory map in hvm_start_info
 * (everything after the builder's start-of-day region), writes the first
 * qword of every page of it (with populate-on-demand, every 2 MiB of it is an
 * EPT violation the hypervisor serves by backing the range), then reads every
 * page ROUNDS times.  Before each round it reloads CR3 with its own value,
 * which empties the TLB, so every page costs a two-stage TLB fill: the
 * guest's four table levels and the page itself, each through EPT.
 *
 * Page i holds (its address) xor PATTERN; every read is compared with that.
 *
 * Checks (the shutdown code is the number of the first one that failed):
 *   1  hvm_start_info magic
 *   2  the memory map has a RAM range above 1 MiB
 *   3  no page read back anything but what was written
 * Extra vCPUs go down at once (cli; hlt).
 */
    .intel_syntax noprefix
    .include "xen.inc"
    .include "hvm.inc"

    .equ    ROUNDS,         8
    .equ    PATTERN,        0x5A5A0000A5A5

    .section .rodata
    .globl  guest_name
guest_name: .asciz "hvm_memtouch"

    .section .text.entry, "ax"
    .globl  _start
_start:
    test    rdi, rdi
    jnz     park
    mov     rbx, rsi                    /* rbx = hvm_start_info */

    mov     edi, [rbx + HSI_MAGIC]
    mov     esi, HVM_START_MAGIC
    CHECK_HEX 1, "hvm_start_info magic"
    test    eax, eax
    jz      finish

/* r12 = base, r13 = pages of the highest RAM range. */
    xor     r12d, r12d
    xor     r13d, r13d
    mov     rsi, [rbx + HSI_MEMMAP_PADDR]
    mov     ecx, [rbx + HSI_MEMMAP_ENTRIES]
1:  test    ecx, ecx
    jz      3f
    cmp     dword ptr [rsi + MEMMAP_TYPE], E820_RAM
    jne     2f
    mov     rax, [rsi + MEMMAP_ADDR]
    cmp     rax, r12
    jb      2f
    mov     r12, rax
    mov     r13, [rsi + MEMMAP_SIZE]
    shr     r13, PAGE_SHIFT
2:  add     rsi, MEMMAP_ENTRY_SIZE
    dec     ecx
    jmp     1b
3:  xor     edi, edi
    cmp     r12, 0x100000
    setae   dil
    test    r13, r13
    setnz   al
    and     dil, al
    mov     esi, 1
    CHECK_DEC 2, "RAM range above 1 MiB found"
    test    eax, eax
    jz      finish

    call    con_begin
    STR     rdi, "touching "
    call    con_str
    mov     rdi, r13
    call    con_dec
    STR     rdi, " pages from "
    call    con_str
    mov     rdi, r12
    call    con_hex
    STR     rdi, ", then reading them 8 times"
    call    con_str
    call    con_end

/* The writes: the first touch of each page. */
    movabs  r15, PATTERN
    mov     rsi, r12
    mov     rcx, r13
4:  mov     rax, rsi
    xor     rax, r15
    mov     [rsi], rax
    add     rsi, PAGE_SIZE
    dec     rcx
    jnz     4b

/* The rounds: r14 = mismatches. */
    xor     r14d, r14d
    mov     ebp, ROUNDS
5:  mov     rax, cr3                    /* same CR3 again: empty the TLB */
    mov     cr3, rax
    mov     rsi, r12
    mov     rcx, r13
6:  mov     rax, rsi
    xor     rax, r15
    cmp     rax, [rsi]                  /* the access that needs a TLB fill */
    je      7f
    inc     r14
7:  add     rsi, PAGE_SIZE
    dec     rcx
    jnz     6b
    dec     ebp
    jnz     5b

    mov     rdi, r14
    xor     esi, esi
    CHECK_DEC 3, "pages that read back wrong"
    jmp     finish

park:
    cli
    hlt
    jmp     park
