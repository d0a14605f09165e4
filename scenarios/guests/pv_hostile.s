/*
 * pv_hostile: a PV guest that attacks the page-type rules of the hypervisor.
 *
 * A PV guest's page tables hold machine frame numbers, so the only thing
 * that keeps a guest inside its own memory is the hypervisor's checking of
 * every entry it installs (Xen's page types, DESIGN.md §3).  Each attack
 * below tries to break one rule through mmu_update / mmuext_op; each must be
 * refused with the error code Xen gives (the errno is what Xen's mm.c returns
 * and what hvlab's model, hypervisor/mm, returns) and must change nothing:
 * where the guest can read what it attacked (an entry of its own tables, the
 * window it tried to map, the hypervisor's GDT, a data page) it checks that
 * it is unchanged, and a frame it tried to turn into a table can still be
 * mapped writable (no page-table type was left on it).
 *
 *  #  attack                                                        Xen says
 *  1  map our own L4 writable (a new L1 entry in a window)          -EBUSY
 *  2  map the L1 that maps the kernel writable                      -EBUSY
 *  3  make our read-only mapping of the L4 writable (set RW)        -EBUSY
 *  4  pin a new L1 that maps our L4 writable                        -EBUSY
 *  5  hook that L1 into our L2 instead                              -EBUSY
 *  6  pin a data page that is mapped writable (our .data) as an L1  -EINVAL
 *  7  ... as an L4                                                  -EINVAL
 *  8  map MFN 1, the hypervisor's frame (read-only even)            -EBUSY
 *  9  map the frame after our last one (and our shared_info page):
 *     not ours (Xen's or the next domain's in pv-hostile.toml)      -EBUSY
 * 10  map a frame beyond the machine's memory                       -EPERM
 * 11  write the hypervisor's L4 slot 256                            -EINVAL
 * 12  ... slot 271                                                  -EINVAL
 *     (then, legally: pin a second L4 "B" and give our L4 a
 *      read-only linear entry to it; read through it, see that
 *      writing through it faults)
 * 13  a linear entry in B, which is used as a linear table (chain)  -EINVAL
 * 14  a linear entry to our L4, which has linear entries (chain)    -EINVAL
 * 15  a writable linear entry to B                                  -EINVAL
 * 16  a writable self-map of our L4                                 -EINVAL
 * 17  PSE (a 2 MiB superpage) in an entry of our L2                 -EINVAL
 * 18  pin an L2 that has a PSE entry                                -EINVAL
 * 19  unpin a table that is not pinned (our bootstrap L3)           -EINVAL
 * 20  unpin a data page                                             -EINVAL
 * 21  pin our L4 a second time (the builder pinned it)              -EINVAL
 * 22  pin a fresh L1 twice                                          -EINVAL
 * 23  mmu_update into a frame we do not own (MFN 1, the GDT)        -EINVAL
 *     (Into a frame of our own that is not a page table, Xen does
 *      the write: a data page takes a writable type for the moment
 *      of the write.  That is not an attack, so the refused variant,
 *      a foreign frame, is the one tried.)
 * 24  mmu_update with foreigndom = a domain that does not exist     -ESRCH
 *     (Xen gives -EPERM, from its XSM policy, when the domain exists
 *      and we are not privileged over it; hvlab's model gives -ESRCH
 *      there too, so the attack names a domain id no domain has.)
 * 25  MMU_MACHPHYS_UPDATE of a frame we do not own                  -EINVAL
 * 26  NEW_BASEPTR to an L4 with an entry to a writable data page    -EINVAL
 * 27  NEW_BASEPTR to an L4 with a reserved bit (PCD) in an entry    -EINVAL
 * 28  NEW_BASEPTR to our L3                                         -EINVAL
 * 29  pin our kernel L1 as an L2                                    -EINVAL
 * 30  pin MFN 1, a frame we do not own                              -EINVAL
 *
 * Each prints "attack N: <name>: refused with -EXXX ok".  Then
 * "attacks refused: 30/30", a sanity check that normal operation still
 * works (map a free page, write and read it, unmap it: the address faults
 * again), and power off with code 0 if every attack was refused and every
 * check passed.  Otherwise the code is the number of the first attack that
 * was not refused as it should be, 100 + n for the n-th failed setup or
 * sanity check (in source order), 255 for a fatal error of lib/mm.s.
 */
    .intel_syntax noprefix
    .include "xen.inc"

    .equ    W0,             0               /* windows of lib/mm.s */
    .equ    W0_VA,          MM_WINDOW_BASE + W0 * PAGE_SIZE
    .equ    KERNEL_SLOT,    511             /* L4 slot that maps VIRT_BASE */
    .equ    LINEAR_SLOT,    2               /* our legal linear entry to B */
    .equ    FREE_L2_SLOT,   5               /* an empty entry of the kernel L2 */
    .equ    GDT_VA,         0xffff800000000000  /* the hypervisor's GDT, read-only */
    .equ    GDT_MFN,        1               /* the first frame the hypervisor allocates */
    .equ    GDT_TARGET,     7               /* the GDT entry attack 23 aims at */
    .equ    BEYOND_MEMORY,  0x0fffffff      /* an MFN 1 TiB up: no such frame */
    .equ    NO_DOMAIN,      999             /* no domain has this id */
    .equ    PATTERN,        0x486f7374696c6521
    .equ    PF_PROT_WRITE,  3

/* Setup and sanity checks: shutdown code 100 + their number in source order. */
    .set    site, 100
.macro OK text
    .set    site, site + 1
    EXPECT_OK site, "\text"
.endm
.macro EQ text
    .set    site, site + 1
    EXPECT  site, "\text"
.endm

/*
 * REPORT errno, "name": the attack just made left its result in r12 and
 * r13 = 1 if what it attacked is unchanged (0 if not).  Print the verdict;
 * a refusal with -errno that changed nothing counts as refused.
 */
    .set    attack_no, 0
.macro REPORT errno, text
    .set    attack_no, attack_no + 1
    mov     edi, attack_no
    STR     rsi, "\text"
    mov     rdx, r12
    mov     rcx, -\errno
    mov     r8, r13
    call    report_attack
.endm

    .section .rodata
    .globl  guest_name
guest_name: .asciz "pv_hostile"

    .data
    .balign 8
trap_table:
    TRAP_ENTRY 14, mm_page_fault_handler    /* probes of lib/mm.s */
    .quad   0, 0

/* A data page of ours, mapped writable by the bootstrap tables. */
    .balign 4096
victim:
    .fill   PAGE_SIZE / 8, 8, PATTERN

    .bss
    .balign 8
victim_mfn:     .skip 8
attacks_made:   .skip 8
attacks_refused: .skip 8
saved:          .skip 8             /* a value an attack must not change */
frame_b_pfn:    .skip 8             /* the second L4 of the linear attacks */
frame_b:        .skip 8
frame_c_pfn:    .skip 8             /* ... and a third */
frame_c:        .skip 8
scratch_pfn:    .skip 8             /* a free frame an attack builds a table in */
scratch:        .skip 8
pool_at_start:  .skip 8

    .section .text.entry, "ax"
    .globl  _start
_start:
    mov     rbx, rsi
    lea     rdi, [rip + trap_table]
    HYPERCALL set_trap_table
    OK      "set_trap_table"
    mov     rdi, rbx
    call    mm_init
    mov     rax, [rip + mm_pool_count]
    mov     [rip + pool_at_start], rax
    lea     rdi, [rip + victim]
    mov     rax, VIRT_BASE
    sub     rdi, rax
    shr     rdi, PAGE_SHIFT
    call    pfn_to_mfn
    mov     [rip + victim_mfn], rax
    mov     edi, GDT_MFN
    call    mfn_to_pfn
    mov     rdi, rax
    mov     rsi, -1
    EQ      "our pfn of MFN 1 (-1: it is not ours)"
    PRINT   "attacking the page-type rules of the hypervisor"

/* ---- 1-5: writable mappings of page tables ------------------------------- */

    mov     edi, W0
    mov     rsi, [rip + mm_l4_mfn]
    mov     edx, PTE_DATA_RW
    call    kmap
    mov     r12, rax
    call    window_empty
    mov     r13, rax
    REPORT  EBUSY, "a writable mapping of our own L4"

    mov     edi, W0
    mov     rsi, [rip + mm_kl1_mfn]
    mov     edx, PTE_DATA_RW
    call    kmap
    mov     r12, rax
    call    window_empty
    mov     r13, rax
    REPORT  EBUSY, "a writable mapping of the L1 that maps the kernel"

    /* The kernel L1 maps pfn i of the bootstrap region at index i. */
    mov     rbx, [rip + mm_l4_va]
    mov     rax, VIRT_BASE
    sub     rbx, rax
    shr     rbx, PAGE_SHIFT                 /* rbx = index of the L4's mapping */
    mov     rdi, [rip + mm_kl1_mfn]
    mov     esi, ebx
    call    read_entry
    mov     [rip + saved], rax
    mov     rdi, [rip + mm_kl1_mfn]
    mov     esi, ebx
    mov     rdx, [rip + saved]
    or      rdx, _PAGE_RW | _PAGE_DIRTY
    call    set_pte
    mov     r12, rax
    mov     rdi, [rip + mm_kl1_mfn]
    mov     esi, ebx
    call    read_entry
    cmp     rax, [rip + saved]
    sete    r13b
    movzx   r13d, r13b
    REPORT  EBUSY, "making our read-only mapping of the L4 writable"

    /* A new L1 whose entry 0 maps our L4 writable. */
    call    scratch_alloc
    mov     rdx, [rip + mm_l4_mfn]
    shl     rdx, PAGE_SHIFT
    or      rdx, PTE_DATA_RW
    xor     esi, esi
    call    scratch_build
    mov     edi, 1
    mov     rsi, [rip + scratch]
    call    pin_table
    mov     r12, rax
    call    scratch_is_plain
    mov     r13, rax
    REPORT  EBUSY, "pinning a new L1 that maps our L4 writable"

    mov     rdi, [rip + mm_kl2_mfn]
    mov     esi, FREE_L2_SLOT
    mov     rdx, [rip + scratch]
    shl     rdx, PAGE_SHIFT
    or      rdx, PTE_TABLE
    call    set_pte
    mov     r12, rax
    mov     rdi, [rip + mm_kl2_mfn]
    mov     esi, FREE_L2_SLOT
    call    read_entry
    xor     r13d, r13d
    test    rax, rax
    jnz     1f
    call    scratch_is_plain
    mov     r13, rax
1:  REPORT  EBUSY, "hooking a new L1 that maps our L4 writable into our L2"
    call    scratch_free

/* ---- 6-7: a writable data page as a page table --------------------------- */

    mov     edi, 1
    mov     rsi, [rip + victim_mfn]
    call    pin_table
    mov     r12, rax
    call    victim_writable
    mov     r13, rax
    REPORT  EINVAL, "pinning a data page that is mapped writable, as an L1"

    mov     edi, 4
    mov     rsi, [rip + victim_mfn]
    call    pin_table
    mov     r12, rax
    call    victim_writable
    mov     r13, rax
    REPORT  EINVAL, "pinning a data page that is mapped writable, as an L4"

/* ---- 8-10: frames that are not ours -------------------------------------- */

    mov     edi, W0
    mov     esi, GDT_MFN
    mov     edx, PTE_DATA_RO
    call    kmap
    mov     r12, rax
    call    window_empty
    mov     r13, rax
    REPORT  EBUSY, "mapping MFN 1 (the hypervisor's), even read-only"

    call    frame_after_ours
    mov     rsi, rax
    mov     edi, W0
    mov     edx, PTE_DATA_RO
    call    kmap
    mov     r12, rax
    call    window_empty
    mov     r13, rax
    REPORT  EBUSY, "mapping the frame after our last one (not ours)"

    mov     edi, W0
    mov     esi, BEYOND_MEMORY
    mov     edx, PTE_DATA_RO
    call    kmap
    mov     r12, rax
    call    window_empty
    mov     r13, rax
    REPORT  EPERM, "mapping a frame beyond the machine's memory"

/* ---- 11-12: the hypervisor's L4 slots ------------------------------------ */

    mov     ebx, XEN_L4_FIRST_SLOT
    call    attack_xen_slot
    REPORT  EINVAL, "writing the hypervisor's L4 slot 256"
    mov     ebx, XEN_L4_LAST_SLOT
    call    attack_xen_slot
    REPORT  EINVAL, "writing the hypervisor's L4 slot 271"

/* ---- 13-16: linear page tables -------------------------------------------- */

    /* Legal: a second L4 "B" (kernel slot only), pinned, and a read-only
     * linear entry from our L4 to it. */
    call    copy_of_l4
    mov     [rip + frame_b_pfn], rax
    mov     [rip + frame_b], rdx
    mov     edi, 4
    mov     rsi, rdx
    call    pin_table
    OK      "pinning a second L4, B"
    mov     rdi, [rip + mm_l4_mfn]
    mov     esi, LINEAR_SLOT
    mov     rdx, [rip + frame_b]
    shl     rdx, PAGE_SHIFT
    or      rdx, PTE_DATA_RO
    call    set_pte
    OK      "a read-only linear entry from our L4 to B (allowed)"
    call    tlb_flush
    OK      "TLB flush"
    call    read_through_linear_entry

    mov     rdi, [rip + frame_b]
    mov     esi, 3
    mov     rdx, [rip + mm_l4_mfn]
    shl     rdx, PAGE_SHIFT
    or      rdx, PTE_DATA_RO
    call    set_pte
    mov     r12, rax
    mov     rdi, [rip + frame_b]
    mov     esi, 3
    call    read_entry
    test    rax, rax
    sete    r13b
    movzx   r13d, r13b
    REPORT  EINVAL, "a linear entry in B, itself used as a linear table (a chain)"

    call    copy_of_l4
    mov     [rip + frame_c_pfn], rax
    mov     [rip + frame_c], rdx
    mov     edi, 4
    mov     rsi, rdx
    call    pin_table
    OK      "pinning a third L4, C"
    mov     rdi, [rip + frame_c]
    mov     esi, 3
    mov     rdx, [rip + mm_l4_mfn]
    shl     rdx, PAGE_SHIFT
    or      rdx, PTE_DATA_RO
    call    set_pte
    mov     r12, rax
    mov     rdi, [rip + frame_c]
    mov     esi, 3
    call    read_entry
    test    rax, rax
    sete    r13b
    movzx   r13d, r13b
    REPORT  EINVAL, "a linear entry in C to our L4, which has linear entries (a chain)"

    mov     rdi, [rip + mm_l4_mfn]
    mov     esi, 3
    mov     rdx, [rip + frame_b]
    shl     rdx, PAGE_SHIFT
    or      rdx, PTE_TABLE                  /* read-write */
    call    set_pte
    mov     r12, rax
    mov     rax, [rip + mm_l4_va]
    cmp     qword ptr [rax + 3 * 8], 0
    sete    r13b
    movzx   r13d, r13b
    REPORT  EINVAL, "a writable linear entry from our L4 to B"

    mov     rdi, [rip + mm_l4_mfn]
    mov     esi, 4
    mov     rdx, [rip + mm_l4_mfn]
    shl     rdx, PAGE_SHIFT
    or      rdx, PTE_TABLE
    call    set_pte
    mov     r12, rax
    mov     rax, [rip + mm_l4_va]
    cmp     qword ptr [rax + 4 * 8], 0
    sete    r13b
    movzx   r13d, r13b
    REPORT  EINVAL, "a writable self-map of our L4"

    /* Take the legal linear entry away again; unpin B and C. */
    mov     rdi, [rip + mm_l4_mfn]
    mov     esi, LINEAR_SLOT
    xor     edx, edx
    call    set_pte
    OK      "removing the linear entry"
    call    tlb_flush
    OK      "TLB flush"
    mov     rdi, [rip + frame_b]
    call    unpin_table
    OK      "unpinning B"
    mov     rdi, [rip + frame_c]
    call    unpin_table
    OK      "unpinning C"
    mov     rdi, [rip + frame_b]
    call    is_plain
    mov     rdi, rax
    mov     esi, 1
    EQ      "B can be mapped writable again"
    mov     rdi, [rip + frame_c]
    call    is_plain
    mov     rdi, rax
    mov     esi, 1
    EQ      "C can be mapped writable again"
    mov     rdi, [rip + frame_b_pfn]
    call    frame_free
    mov     rdi, [rip + frame_c_pfn]
    call    frame_free

/* ---- 17-18: superpages ------------------------------------------------------ */

    call    scratch_alloc
    mov     rdi, [rip + mm_kl2_mfn]
    mov     esi, FREE_L2_SLOT
    mov     rdx, [rip + scratch]
    shl     rdx, PAGE_SHIFT
    or      rdx, PTE_DATA_RW | _PAGE_PSE
    call    set_pte
    mov     r12, rax
    mov     rdi, [rip + mm_kl2_mfn]
    mov     esi, FREE_L2_SLOT
    call    read_entry
    test    rax, rax
    sete    r13b
    movzx   r13d, r13b
    REPORT  EINVAL, "a PSE (superpage) entry in our L2"

    mov     rdx, [rip + victim_mfn]
    shl     rdx, PAGE_SHIFT
    or      rdx, PTE_DATA_RW | _PAGE_PSE
    xor     esi, esi
    call    scratch_build
    mov     edi, 2
    mov     rsi, [rip + scratch]
    call    pin_table
    mov     r12, rax
    call    scratch_is_plain
    mov     r13, rax
    REPORT  EINVAL, "pinning an L2 that has a PSE entry"
    call    scratch_free

/* ---- 19-22: pins -------------------------------------------------------------- */

    mov     rdi, [rip + mm_kl3_mfn]
    call    unpin_table
    mov     r12, rax
    call    kernel_slot_intact
    mov     r13, rax
    REPORT  EINVAL, "unpinning a table that is not pinned (our L3)"

    mov     rdi, [rip + victim_mfn]
    call    unpin_table
    mov     r12, rax
    call    victim_writable
    mov     r13, rax
    REPORT  EINVAL, "unpinning a data page"

    mov     edi, 4
    mov     rsi, [rip + mm_l4_mfn]
    call    pin_table
    mov     r12, rax
    call    kernel_slot_intact
    mov     r13, rax
    REPORT  EINVAL, "pinning our L4 a second time"

    call    scratch_alloc
    xor     edx, edx                        /* an empty L1 */
    xor     esi, esi
    call    scratch_build
    mov     edi, 1
    mov     rsi, [rip + scratch]
    call    pin_table
    OK      "pinning a fresh L1"
    mov     edi, 1
    mov     rsi, [rip + scratch]
    call    pin_table
    mov     r12, rax
    mov     rdi, [rip + scratch]
    call    unpin_table
    OK      "unpinning the fresh L1"
    call    scratch_is_plain                /* one unpin undid everything */
    mov     r13, rax
    REPORT  EINVAL, "pinning a fresh L1 twice"
    call    scratch_free

/* ---- 23-25: mmu_update on what is not ours ------------------------------------ */

    mov     rax, GDT_VA
    mov     rbx, [rax + GDT_TARGET * 8]     /* the GDT entry as it is */
    mov     rdi, GDT_MFN << PAGE_SHIFT | GDT_TARGET * 8 | MMU_NORMAL_PT_UPDATE
    mov     rsi, rbx
    not     rsi                             /* something it is not */
    call    mmu_update1
    mov     r12, rax
    mov     rax, GDT_VA
    cmp     [rax + GDT_TARGET * 8], rbx
    sete    r13b
    movzx   r13d, r13b
    REPORT  EINVAL, "mmu_update into a frame we do not own (MFN 1, the GDT)"

    mov     rdi, [rip + mm_kl1_mfn]
    shl     rdi, PAGE_SHIFT
    add     rdi, (MM_WINDOW_SLOT + W0) * 8
    mov     rsi, [rip + victim_mfn]
    shl     rsi, PAGE_SHIFT
    or      rsi, PTE_DATA_RO
    mov     edx, NO_DOMAIN
    call    mmu_update_foreign
    mov     r12, rax
    call    window_empty
    mov     r13, rax
    REPORT  ESRCH, "mmu_update with foreigndom = a domain that does not exist"

    mov     edi, GDT_MFN << PAGE_SHIFT | MMU_MACHPHYS_UPDATE
    xor     esi, esi
    call    mmu_update1
    mov     r12, rax
    mov     r13d, 1                         /* the M2P is not ours to read */
    REPORT  EINVAL, "MMU_MACHPHYS_UPDATE of a frame we do not own"

/* ---- 26-28: base pointers ---------------------------------------------------- */

    call    scratch_alloc
    mov     rdx, [rip + victim_mfn]         /* slot 1 -> a writable data page */
    shl     rdx, PAGE_SHIFT
    or      rdx, PTE_TABLE
    mov     esi, 1
    call    scratch_build
    call    scratch_add_kernel_slot
    mov     rdi, [rip + scratch]
    call    new_baseptr
    mov     r12, rax
    call    victim_writable
    mov     r13, rax
    call    scratch_is_plain
    and     r13, rax
    REPORT  EINVAL, "NEW_BASEPTR to an L4 with an entry to a writable data page"

    mov     rdx, [rip + mm_l4_va]           /* the kernel slot, with PCD */
    mov     rdx, [rdx + KERNEL_SLOT * 8]
    or      rdx, _PAGE_PCD
    mov     esi, KERNEL_SLOT
    call    scratch_build
    mov     rdi, [rip + scratch]
    call    new_baseptr
    mov     r12, rax
    call    scratch_is_plain
    mov     r13, rax
    REPORT  EINVAL, "NEW_BASEPTR to an L4 with a reserved bit (PCD) in an entry"
    call    scratch_free

    mov     rdi, [rip + mm_kl3_mfn]
    call    new_baseptr
    mov     r12, rax
    call    kernel_slot_intact
    mov     r13, rax
    REPORT  EINVAL, "NEW_BASEPTR to our L3"

/* ---- 29-30: pins of the wrong kind -------------------------------------------- */

    mov     edi, 2
    mov     rsi, [rip + mm_kl1_mfn]
    call    pin_table
    mov     r12, rax
    call    kernel_slot_intact
    mov     r13, rax
    REPORT  EINVAL, "pinning our kernel L1 as an L2"

    mov     edi, 1
    mov     esi, GDT_MFN
    call    pin_table
    mov     r12, rax
    mov     r13d, 1
    REPORT  EINVAL, "pinning MFN 1, a frame we do not own"

/* ---- verdict and sanity --------------------------------------------------------- */

    call    con_begin
    STR     rdi, "attacks refused: "
    call    con_str
    mov     rdi, [rip + attacks_refused]
    call    con_dec
    STR     rdi, "/"
    call    con_str
    mov     rdi, [rip + attacks_made]
    call    con_dec
    call    con_end

    PRINT   "sanity: mapping, using and unmapping a free page"
    call    scratch_alloc
    mov     edi, W0
    mov     rsi, [rip + scratch]
    mov     edx, PTE_DATA_RW
    call    kmap
    OK      "mapping a free page writable"
    mov     rdi, W0_VA
    mov     rsi, PATTERN
    call    frame_fill
    mov     rdi, W0_VA
    mov     rsi, PATTERN
    call    frame_mismatches
    mov     rdi, rax
    xor     esi, esi
    EQ      "words of the page that differ from what was written"
    mov     edi, W0
    call    kunmap
    OK      "unmapping it"
    call    window_empty
    mov     rdi, rax
    mov     esi, 1
    EQ      "the window is empty and faults again"
    call    scratch_free
    mov     rdi, [rip + mm_pool_count]
    mov     rsi, [rip + pool_at_start]
    EQ      "every frame is back in the pool"
    mov     rdi, [rip + mm_done_errors]
    xor     esi, esi
    EQ      "hypercalls whose `done` disagreed with their result"
    call    con_begin
    STR     rdi, "sanity checks passed: "
    call    con_str
    mov     rdi, [rip + checks_passed]
    call    con_dec
    call    con_end
    jmp     finish

    .text

/* report_attack(edi = n, rsi = name, rdx = rc, rcx = expected rc, r8 = 1 if
 * the target is unchanged). */
report_attack:
    push    rbx
    push    r12
    push    r13
    push    r14
    push    r15
    mov     ebx, edi
    mov     r12, rsi
    mov     r13, rdx
    mov     r14, rcx
    mov     r15, r8
    inc     qword ptr [rip + attacks_made]
    call    con_begin
    STR     rdi, "attack "
    call    con_str
    mov     edi, ebx
    call    con_dec
    STR     rdi, ": "
    call    con_str
    mov     rdi, r12
    call    con_str
    cmp     r13, r14
    jne     1f
    STR     rdi, ": refused with "
    call    con_str
    mov     rdi, r13
    call    con_errno
    test    r15, r15
    jz      2f
    STR     rdi, " ok"
    call    con_str
    call    con_end
    inc     qword ptr [rip + attacks_refused]
    jmp     4f
1:  STR     rdi, ": FAILED: returned "
    call    con_str
    mov     rdi, r13
    call    con_errno
    STR     rdi, ", expected "
    call    con_str
    mov     rdi, r14
    call    con_errno
    jmp     3f
2:  STR     rdi, " but FAILED: what it attacked changed"
    call    con_str
3:  call    con_end
    cmp     dword ptr [rip + first_failed_check], 0
    jne     4f
    mov     [rip + first_failed_check], ebx
4:  pop     r15
    pop     r14
    pop     r13
    pop     r12
    pop     rbx
    ret

/* window_empty() -> rax = 1 if window W0's entry is empty and reading it faults. */
window_empty:
    mov     rdi, [rip + mm_kl1_mfn]
    mov     esi, MM_WINDOW_SLOT + W0
    call    read_entry
    test    rax, rax
    jnz     1f
    mov     rdi, W0_VA
    call    probe_read
    xor     eax, 1
    ret
1:  xor     eax, eax
    ret

/* victim_writable() -> rax = 1 if our data page can still be written and read. */
victim_writable:
    push    rbx
    lea     rbx, [rip + victim]
    mov     rdi, rbx
    mov     rsi, PATTERN
    call    probe_write
    test    rax, rax
    jz      1f
    mov     rcx, PATTERN
    xor     eax, eax
    cmp     [rbx], rcx
    sete    al
1:  pop     rbx
    ret

/* kernel_slot_intact() -> rax = 1 if L4[511] still points to the kernel L3. */
kernel_slot_intact:
    mov     rax, [rip + mm_l4_va]
    mov     rax, [rax + KERNEL_SLOT * 8]
    mov     rcx, PTE_ADDR_MASK
    and     rax, rcx
    shr     rax, PAGE_SHIFT
    cmp     rax, [rip + mm_kl3_mfn]
    sete    al
    movzx   eax, al
    ret

/* attack_xen_slot(ebx = slot): write L4[slot] with a copy of the kernel
 * slot; r12 = the result, r13 = 1 if L4[slot] is unchanged. */
attack_xen_slot:
    mov     rax, [rip + mm_l4_va]
    mov     rcx, [rax + rbx * 8]
    mov     [rip + saved], rcx
    mov     rdi, [rip + mm_l4_mfn]
    mov     esi, ebx
    mov     rdx, [rax + KERNEL_SLOT * 8]
    call    set_pte
    mov     r12, rax
    mov     rax, [rip + mm_l4_va]
    mov     rcx, [rax + rbx * 8]
    cmp     rcx, [rip + saved]
    sete    r13b
    movzx   r13d, r13b
    ret

/* frame_after_ours() -> rax = 1 + the highest MFN in our mfn_list or our
 * shared_info page (which is ours too, outside mfn_list), which is not ours
 * (fatal if it is in mfn_list). */
frame_after_ours:
    mov     rdx, [rip + mm_mfn_list]
    mov     rcx, [rip + mm_nr_pages]
    mov     rax, [rip + mm_start_info]
    mov     rax, [rax + SI_SHARED_INFO]
    shr     rax, PAGE_SHIFT
1:  cmp     rax, [rdx + rcx * 8 - 8]
    cmovb   rax, [rdx + rcx * 8 - 8]
    dec     rcx
    jnz     1b
    inc     rax
    push    rax
    mov     rdi, rax
    call    mfn_to_pfn
    cmp     rax, -1
    pop     rax
    jne     2f
    ret
2:  STR     rdi, "the frame after our highest MFN is ours: no foreign frame to try"
    jmp     mm_fatal

/* read_through_linear_entry: with L4[LINEAR_SLOT] -> B read-only, the
 * address below walks L4 -> B (as an L3) -> B[511] = the kernel L3 (as an
 * L2) -> its entry 510 = the kernel L2 (as an L1) -> its entry 0 = the
 * kernel L1, which so appears as a read-only page. */
    .equ    LINEAR_VA, LINEAR_SLOT << L4_SHIFT | KERNEL_SLOT << L3_SHIFT | 510 << L2_SHIFT
read_through_linear_entry:
    push    rbx
    mov     rdi, LINEAR_VA
    call    probe_read
    mov     rbx, rdx
    mov     rdi, rax
    mov     esi, 1
    EQ      "the kernel L1 is readable through the linear entry"
    mov     rdi, [rip + mm_kl1_mfn]
    xor     esi, esi
    call    read_entry
    mov     rdi, rbx
    mov     rsi, rax
    EQ      "kernel L1 entry 0, through the linear entry"
    mov     rdi, LINEAR_VA
    mov     rsi, rbx                        /* the same value, in case */
    call    probe_write
    mov     rdi, rax
    xor     esi, esi
    EQ      "a write through the read-only linear entry went through"
    mov     rdi, [rip + mm_probe_error]
    mov     esi, PF_PROT_WRITE
    EQ      "#PF error code of the write through the linear entry"
    pop     rbx
    ret

/* copy_of_l4() -> rax = pfn, rdx = mfn of a new L4 holding our kernel slot. */
copy_of_l4:
    call    scratch_alloc
    mov     rdx, [rip + mm_l4_va]
    mov     rdx, [rdx + KERNEL_SLOT * 8]
    mov     esi, KERNEL_SLOT
    call    scratch_build
    mov     rax, [rip + scratch_pfn]
    mov     rdx, [rip + scratch]
    ret

/* scratch_alloc(): a free frame in scratch / scratch_pfn. */
scratch_alloc:
    call    frame_alloc
    mov     [rip + scratch_pfn], rax
    mov     [rip + scratch], rdx
    ret

scratch_free:
    mov     rdi, [rip + scratch_pfn]
    jmp     frame_free

/* scratch_build(esi = index, rdx = entry): the scratch frame, zeroed, with
 * that one entry; written through window W0, which is removed afterwards. */
scratch_build:
    push    rbx
    push    r12
    sub     rsp, 8
    mov     ebx, esi
    mov     r12, rdx
    mov     edi, W0
    mov     rsi, [rip + scratch]
    mov     edx, PTE_DATA_RW
    call    kmap
    OK      "mapping a free frame writable to build a table"
    mov     rdi, W0_VA
    call    frame_zero
    mov     rax, W0_VA
    mov     [rax + rbx * 8], r12
    mov     edi, W0
    call    kunmap
    OK      "unmapping it"
    add     rsp, 8
    pop     r12
    pop     rbx
    ret

/* scratch_add_kernel_slot(): also copy our kernel slot into the scratch frame. */
scratch_add_kernel_slot:
    mov     edi, W0
    mov     rsi, [rip + scratch]
    mov     edx, PTE_DATA_RW
    call    kmap
    OK      "mapping the frame writable again"
    mov     rax, [rip + mm_l4_va]
    mov     rcx, [rax + KERNEL_SLOT * 8]
    mov     rax, W0_VA
    mov     [rax + KERNEL_SLOT * 8], rcx
    mov     edi, W0
    call    kunmap
    OK      "unmapping it"
    ret

/* scratch_is_plain() / is_plain(rdi = mfn) -> rax = 1 if the frame can be
 * mapped writable: it has no page-table type (count) left. */
scratch_is_plain:
    mov     rdi, [rip + scratch]
is_plain:
    mov     rsi, rdi
    mov     edi, W0
    mov     edx, PTE_DATA_RW
    call    kmap
    test    rax, rax
    jnz     1f
    mov     edi, W0
    call    kunmap
    test    rax, rax
    jnz     1f
    mov     eax, 1
    ret
1:  xor     eax, eax
    ret
