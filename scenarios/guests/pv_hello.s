/*
 * pv_hello: the smallest complete PV guest.
 *
 * It greets, reads the start-of-day state the domain builder left for it
 * (docs/pv-abi.md, "Start of day"), checks that the layout is the one the
 * ABI promises, runs a little arithmetic to check the CPU, and powers off
 * with code 0 if every check passed.
 *
 * The kernel runs in ring 3 on Xen's PV ABI.  At entry: rsi = start_info,
 * rsp = top of the one-page boot stack, event delivery masked.  The
 * bootstrap region Xen's domain builder lays out, from VIRT_BASE on:
 *
 *     kernel image | mfn_list | start_info | xenstore | console | page tables | stack | padding
 *     ^VIRT_BASE     ^_end                                        ^pt_base              ^rsp
 *
 * (the padding reaches at least 512 KiB past the stack, up to a 4 MiB boundary)
 *
 * Checks (the shutdown code is the number of the first one that failed):
 *   1  start_info.magic is "xen-3.0-x86_64"
 *   2  mfn_list starts right after the image, at _end
 *   3  start_info follows mfn_list, which holds nr_pages 8-byte entries
 *   4  pt_base follows start_info and the xenstore and console pages
 *   5  the stack (1 page) follows the nr_pt_frames page-table pages
 *   6  the whole bootstrap region fits in the domain's nr_pages
 *   7  L4[511], the entry that maps VIRT_BASE, is present
 *   8  L4[511] holds the machine frame of one of the page-table pages:
 *      page tables hold MFNs, and mfn_list translates our PFNs to MFNs
 *   9  the hypervisor filled hypercall_page: stub 18 is Xen's
 *      "push rcx; push r11; mov eax, 18; syscall ..."
 *  10  fib(90) = 2880067194370816120
 *  11  there are 303 primes below 2000 ...
 *  12  ... and their sum is 277050
 */
    .intel_syntax noprefix
    .include "xen.inc"

    .equ    FIB_N,          90
    .equ    FIB_EXPECTED,   2880067194370816120
    .equ    PRIME_LIMIT,    2000
    .equ    PRIME_COUNT,    303
    .equ    PRIME_SUM,      277050
    /* first bytes of hypercall stub 18: 51 (push rcx), 41 53 (push r11),
     * b8 12 00 00 00 (mov eax, 18) */
    .equ    STUB18_BYTES,   0x00000012b8534151

    .section .rodata
    .globl  guest_name
guest_name: .asciz "pv_hello"
xen_magic:  .asciz "xen-3.0-x86_64"
    .equ    XEN_MAGIC_LEN, . - xen_magic    /* 15, with the NUL */

    .bss
    .balign 8
start_info:     .skip 8         /* the pointer we got in rsi */
boot_rsp:       .skip 8         /* rsp at entry: top of the bootstrap stack */
extraversion:   .skip 32        /* XENVER_extraversion fills 16 bytes */

    .section .text.entry, "ax"
    .globl  _start
_start:
    mov     [rip + start_info], rsi
    mov     [rip + boot_rsp], rsp

    /* Which hypervisor are we running on?  major << 16 | minor, then a string. */
    mov     edi, XENVER_version
    xor     esi, esi
    HYPERCALL xen_version
    mov     rbx, rax
    mov     edi, XENVER_extraversion
    lea     rsi, [rip + extraversion]
    HYPERCALL xen_version

    PRINT   "hello from a paravirtualised guest"
    call    con_begin
    STR     rdi, "running on hypervisor version "
    call    con_str
    mov     rdi, rbx
    shr     rdi, 16
    call    con_dec
    STR     rdi, "."
    call    con_str
    movzx   edi, bx
    call    con_dec
    lea     rdi, [rip + extraversion]
    call    con_str
    call    con_end

    mov     r12, [rip + start_info]     /* r12 = start_info for the whole file */
    call    print_start_info

/* 1: magic.  Count the leading bytes equal to "xen-3.0-x86_64\0". */
    lea     rdx, [rip + xen_magic]
    xor     edi, edi
1:  mov     al, [r12 + SI_MAGIC + rdi]
    cmp     al, [rdx + rdi]
    jne     2f
    inc     edi
    cmp     edi, XEN_MAGIC_LEN
    jb      1b
2:  mov     esi, XEN_MAGIC_LEN
    CHECK_DEC 1, "start_info.magic: bytes matching \"xen-3.0-x86_64\" and its NUL"

/* 2: mfn_list comes first after the image. */
    mov     rdi, [r12 + SI_MFN_LIST]
    lea     rsi, [rip + _end]
    CHECK_HEX 2, "start_info.mfn_list (expected _end, the page after the image)"

/* 3: start_info = mfn_list + nr_pages * 8 bytes, rounded up to a page. */
    mov     rdi, r12
    mov     rsi, [r12 + SI_NR_PAGES]
    lea     rsi, [rsi * 8 + PAGE_SIZE - 1]
    and     rsi, -PAGE_SIZE
    add     rsi, [r12 + SI_MFN_LIST]
    CHECK_HEX 3, "start_info address (expected mfn_list + nr_pages * 8, page-rounded)"

/* 4: then the xenstore and console pages, then the page tables. */
    mov     rdi, [r12 + SI_PT_BASE]
    lea     rsi, [r12 + 3 * PAGE_SIZE]
    CHECK_HEX 4, "start_info.pt_base (expected start_info + 3 pages)"

/* 5: then the stack: rsp at entry = pt_base + (nr_pt_frames + 1) pages. */
    mov     rdi, [rip + boot_rsp]
    mov     rsi, [r12 + SI_NR_PT_FRAMES]
    add     rsi, BOOT_STACK_PAGES
    shl     rsi, PAGE_SHIFT
    add     rsi, [r12 + SI_PT_BASE]
    CHECK_HEX 5, "rsp at entry (expected pt_base + nr_pt_frames + 1 stack page)"

/* 6: the region up to 512 KiB after the stack lies within nr_pages. */
    mov     rax, [rip + boot_rsp]
    add     rax, BOOT_PADDING
    mov     rcx, VIRT_BASE
    sub     rax, rcx
    shr     rax, PAGE_SHIFT             /* pages in the bootstrap region */
    xor     edi, edi
    cmp     rax, [r12 + SI_NR_PAGES]
    setbe   dil                         /* rdi = 1 if it fits */
    mov     esi, 1
    CHECK_DEC 6, "bootstrap region fits in nr_pages"

/* 7: L4[511] maps VIRT_BASE (0xffffffff80000000 is in the last 512 GiB). */
    mov     rbx, [r12 + SI_PT_BASE]
    mov     rbx, [rbx + 511 * 8]        /* rbx = the L4 entry */
    mov     rdi, rbx
    and     edi, 1                      /* _PAGE_PRESENT */
    mov     esi, 1
    CHECK_DEC 7, "L4[511] present bit"

/* 8: its frame number (bits 12-51) is the MFN of one of our page-table pages. */
    mov     rax, 0x000ffffffffff000
    and     rbx, rax
    shr     rbx, PAGE_SHIFT             /* rbx = MFN of the L3 table */
    mov     rax, [r12 + SI_PT_BASE]
    mov     rcx, VIRT_BASE
    sub     rax, rcx
    shr     rax, PAGE_SHIFT             /* rax = PFN of the L4 page */
    mov     rcx, [r12 + SI_NR_PT_FRAMES]
    mov     rdx, [r12 + SI_MFN_LIST]
    xor     edi, edi                    /* rdi = 1 once found */
1:  cmp     [rdx + rax * 8], rbx        /* mfn_list[pfn] == that MFN? */
    je      2f
    inc     rax
    dec     rcx
    jnz     1b
    jmp     3f
2:  mov     edi, 1
3:  mov     esi, 1
    CHECK_DEC 8, "L4[511] points to a page-table frame (found via mfn_list)"

/* 9: the hypercall page was filled before we started. */
    mov     rdi, [rip + hypercall_page + 32 * __HYPERVISOR_console_io]
    mov     rsi, STUB18_BYTES
    CHECK_HEX 9, "hypercall_page stub 18, first 8 bytes (push rcx; push r11; mov eax, 18)"

/* 10: Fibonacci: (a, b) = (b, a + b), FIB_N times from (0, 1). */
    xor     eax, eax                    /* a = fib(0) */
    mov     edx, 1                      /* b = fib(1) */
    mov     ecx, FIB_N
1:  lea     rsi, [rax + rdx]
    mov     rax, rdx
    mov     rdx, rsi
    dec     ecx
    jnz     1b
    mov     rdi, rax
    mov     rsi, FIB_EXPECTED
    CHECK_DEC 10, "fib(90)"

/* 11, 12: primes below PRIME_LIMIT by trial division. */
    call    count_primes                /* rax = count, rdx = sum */
    mov     rbx, rdx
    mov     rdi, rax
    mov     esi, PRIME_COUNT
    CHECK_DEC 11, "primes below 2000"
    mov     rdi, rbx
    mov     esi, PRIME_SUM
    CHECK_DEC 12, "sum of the primes below 2000"

    jmp     finish                      /* verdict and shutdown */

    .text

/* count_primes() -> rax = number of primes below PRIME_LIMIT, rdx = their sum. */
count_primes:
    xor     r8d, r8d                    /* count */
    xor     r9d, r9d                    /* sum */
    mov     r10d, 2                     /* candidate n */
1:  mov     r11d, 2                     /* divisor d */
2:  mov     eax, r11d
    imul    eax, r11d
    cmp     eax, r10d                   /* d * d > n: no divisor, n is prime */
    ja      3f
    mov     eax, r10d
    xor     edx, edx
    div     r11d
    test    edx, edx                    /* d divides n: not prime */
    jz      4f
    inc     r11d
    jmp     2b
3:  inc     r8
    add     r9, r10
4:  inc     r10d
    cmp     r10d, PRIME_LIMIT
    jb      1b
    mov     rax, r8
    mov     rdx, r9
    ret

/* print_start_info(): one line per field we use, so students see the values. */
print_start_info:
    push    rbx
    mov     rbx, [rip + start_info]

    call    con_begin
    STR     rdi, "start_info at "
    call    con_str
    mov     rdi, rbx
    call    con_hex
    STR     rdi, ", magic \""
    call    con_str
    lea     rdi, [rbx + SI_MAGIC]
    call    con_str
    STR     rdi, "\", nr_pages "
    call    con_str
    mov     rdi, [rbx + SI_NR_PAGES]
    call    con_dec
    call    con_end

    call    con_begin
    STR     rdi, "mfn_list at "
    call    con_str
    mov     rdi, [rbx + SI_MFN_LIST]
    call    con_hex
    STR     rdi, ", pt_base "
    call    con_str
    mov     rdi, [rbx + SI_PT_BASE]
    call    con_hex
    STR     rdi, " (+"
    call    con_str
    mov     rdi, [rbx + SI_NR_PT_FRAMES]
    call    con_dec
    STR     rdi, " pages), stack top "
    call    con_str
    mov     rdi, [rip + boot_rsp]
    call    con_hex
    call    con_end

    call    con_begin
    STR     rdi, "shared_info at machine address "
    call    con_str
    mov     rdi, [rbx + SI_SHARED_INFO]
    call    con_hex
    STR     rdi, ", our L4 is machine frame "
    call    con_str
    mov     rax, [rbx + SI_PT_BASE]
    mov     rcx, VIRT_BASE
    sub     rax, rcx
    shr     rax, PAGE_SHIFT
    mov     rcx, [rbx + SI_MFN_LIST]
    mov     rdi, [rcx + rax * 8]        /* mfn_list[pfn of pt_base] */
    call    con_hex
    call    con_end

    pop     rbx
    ret
