/*
 * pv_ptchurn: a PV guest that builds, uses and tears down page tables, round
 * after round, through mmu_update and mmuext_op, as a PV kernel does with
 * its processes' address spaces.
 *
 * A PV guest never writes a page table directly: its tables are mapped
 * read-only and the hypervisor checks every entry it installs (Xen's page
 * types, DESIGN.md §3).  So a new table is made like this:
 *
 *   1. take a free frame and map it WRITABLE in a window (lib/mm.s: kmap);
 *   2. fill it: zero it, then write the entries (machine frame numbers);
 *   3. remove the writable mapping: a frame that is mapped writable can
 *      never become a page table (the pin attempt in step 2 must fail);
 *   4. pin it (MMUEXT_PIN_Ln_TABLE) and/or hook it into a parent with
 *      mmu_update: either validates it and everything below it;
 *   5. flush the TLB before using the new mapping.
 *
 * Start: a persistent L3 ("P3") is hooked into L4 slot P3_SLOT; a second L4
 * is built (a copy of our L4's kernel slot 511 and P3_SLOT), pinned,
 * made the user and then the kernel base pointer, and switched back.
 *
 * Each of ROUNDS rounds (r = 0, 1, ...), with nd = 2 + r % 3 data pages:
 *   - allocate the data pages, fill each through a writable window with the
 *     pattern of seed A (word i = seed + i * K) and check it;
 *   - build an L1 mapping each data page read-write at index i and
 *     read-only at ALIAS_INDEX + i (aliases), an L2 pointing to it and, in
 *     odd rounds, an L3 pointing to the L2;
 *   - shape r % 4 chooses pins and hook:
 *       0: pin the L1, hook the L2 into P3
 *       1: pin the L3, hook it into a free L4 slot (2..5)
 *       2: pin the L2, hook it into P3
 *       3: hook the L3 into a free L4 slot (validating all of it), then pin
 *          the L1 and the L2 (tables already in use);
 *   - check: the hooking entry reads back, the L1 entries read back (through
 *     a read-only window), the tables cannot be mapped writable (-EBUSY);
 *   - read every data page through its read-write mapping and its alias,
 *     write seed B through one and read it back through the other;
 *   - edit an L1 entry to map another data page, check, restore it;
 *   - unmap an alias (a read then faults), map it back together with one
 *     more alias in one two-request mmu_update (done = 2), check a write
 *     through a read-only alias faults;
 *   - every 8th round, switch to a second L4 and back while the round's
 *     tree is live, checking its data through the other base pointer;
 *   - tear down (unhook before or after unpinning, by shape), check the
 *     address faults, unpinning again is refused (-EINVAL), every table
 *     frame can be mapped writable again (no page-table type left on it),
 *     the data pages kept seed B, and give the frames back to the pool
 *     (last freed is first reused, so frames change roles from round to
 *     round: data page, L1, L2, L3, L4).
 * End: unhook P3, check the churn slots of the L4 are empty, pins equal
 * unpins, every frame is back in the pool and every hypercall's `done`
 * matched its result; print a summary and power off.
 *
 * Checks are silent unless they fail (EXPECT, lib/expect.s).  The shutdown
 * code is the number of the first check that failed, counted in source
 * order (the OK / RC / EQ macros below number them), 255 for a fatal error
 * of lib/mm.s (e.g. an unexpected page fault), 0 if all passed.
 */
    .intel_syntax noprefix
    .include "xen.inc"

    .equ    ROUNDS,         96
    .equ    MAX_DATA,       4               /* data pages per round: 2..4 */
    .equ    P3_SLOT,        1               /* L4 slot of the persistent L3 */
    .equ    OWN_L3_SLOT,    2               /* rounds with their own L3: slots 2..5 */
    .equ    OWN_L3_SLOTS,   4
    .equ    KERNEL_SLOT,    511             /* L4 slot that maps VIRT_BASE */
    .equ    ALIAS_INDEX,    256             /* L1 index of the read-only aliases */
    .equ    EXTRA_INDEX,    511             /* L1 index of one more alias */
    .equ    W_DATA,         0               /* windows of lib/mm.s */
    .equ    W_TABLE,        1
    .equ    W_DATA_VA,      MM_WINDOW_BASE + W_DATA * PAGE_SIZE
    .equ    W_TABLE_VA,     MM_WINDOW_BASE + W_TABLE * PAGE_SIZE
    .equ    SEED_A,         0xa
    .equ    SEED_B,         0xb
    .equ    PATTERN_STEP,   0x9e3779b97f4a7c15  /* as frame_fill in lib/mm.s */
    .equ    MARKER,         0x5a5a00c0ffee0001
    .equ    MARKER_OFFSET,  56              /* word 7 of a page */
    .equ    PF_PROT_WRITE,  3               /* #PF error code: present, write */

/* Check sites, numbered in source order: the number is the shutdown code
 * of the first one that fails. */
    .set    site, 0
/* OK "what": the hypercall result in rax is 0. */
.macro OK text
    .set    site, site + 1
    EXPECT_OK site, "\text"
.endm
/* RC errno, "what": the hypercall result in rax is -errno. */
.macro RC errno, text
    .set    site, site + 1
    mov     rdi, rax
    mov     rsi, -\errno
    EXPECT_RC site, "\text"
.endm
/* EQ "what": rdi (found) equals rsi (expected). */
.macro EQ text
    .set    site, site + 1
    EXPECT  site, "\text"
.endm

    .section .rodata
    .globl  guest_name
guest_name: .asciz "pv_ptchurn"

    .data
    .balign 8
trap_table:
    TRAP_ENTRY 14, mm_page_fault_handler    /* probes of lib/mm.s */
    .quad   0, 0

    .bss
    .balign 8
round:          .skip 8
shape:          .skip 8             /* round % 4 */
nd:             .skip 8             /* data pages this round */
data_pfn:       .skip 8 * MAX_DATA
data_mfn:       .skip 8 * MAX_DATA
l1_pfn:         .skip 8
l1_mfn:         .skip 8
l2_pfn:         .skip 8
l2_mfn:         .skip 8
l3_pfn:         .skip 8             /* 0: this round has no L3 of its own */
l3_mfn:         .skip 8
top_mfn:        .skip 8             /* the round's L2 (in P3) or L3 (in the L4) */
parent_mfn:     .skip 8             /* ... and where it is hooked */
parent_index:   .skip 8
tree_va:        .skip 8             /* what the round's L1 maps: tree_va + i pages */
pinned_l1:      .skip 8
pinned_l2:      .skip 8
pinned_l3:      .skip 8
tree_in_p3:     .skip 8             /* a base-pointer switch can check the tree */
p3_pfn:         .skip 8
p3_mfn:         .skip 8
pool_at_start:  .skip 8
tables_pinned:  .skip 8
tables_unpinned: .skip 8
pages_mapped:   .skip 8             /* entries the round tables made present */
window_maps:    .skip 8             /* writable window mappings made */
baseptr_switches: .skip 8
faults_seen:    .skip 8             /* probes that faulted, as they should */
batch:          .skip 2 * MMU_UPDATE_SIZE

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
    call    print_layout

    call    setup_p3
    PRINT   "switching to a second L4 (pinned, also as user base pointer) and back"
    mov     edi, 1
    call    baseptr_switch

    PRINT   "churning page tables: 96 rounds"
1:  call    run_round
    inc     qword ptr [rip + round]
    test    qword ptr [rip + round], 15
    jnz     2f
    call    print_progress
2:  cmp     qword ptr [rip + round], ROUNDS
    jb      1b

    call    teardown_p3

/* The end state: nothing of the churn is left. */
    mov     ebx, P3_SLOT
3:  mov     rax, [rip + mm_l4_va]
    mov     rdi, [rax + rbx * 8]
    xor     esi, esi
    EQ      "an L4 slot of the churn is empty at the end"
    inc     ebx
    cmp     ebx, OWN_L3_SLOT + OWN_L3_SLOTS
    jb      3b
    mov     rdi, [rip + tables_unpinned]
    mov     rsi, [rip + tables_pinned]
    EQ      "tables unpinned = tables pinned"
    mov     rdi, [rip + mm_pool_count]
    mov     rsi, [rip + pool_at_start]
    EQ      "every frame is back in the pool"
    mov     rdi, [rip + mm_done_errors]
    xor     esi, esi
    EQ      "hypercalls whose `done` disagreed with their result"

    call    print_summary
    jmp     finish

    .text

/* ---- one round ------------------------------------------------------------ */

run_round:
    push    rbx
    push    r12
    push    r13
    push    r14
    push    r15

    mov     rax, [rip + round]
    and     eax, 3
    mov     [rip + shape], rax
    mov     rax, [rip + round]
    xor     edx, edx
    mov     ecx, 3
    div     rcx
    add     edx, 2
    mov     [rip + nd], rdx
    xor     eax, eax
    mov     [rip + pinned_l1], rax
    mov     [rip + pinned_l2], rax
    mov     [rip + pinned_l3], rax
    mov     [rip + l3_pfn], rax
    mov     [rip + l3_mfn], rax

/* Data pages: allocate, fill with seed A through the window, check. */
    xor     ebx, ebx
1:  call    frame_alloc
    lea     rcx, [rip + data_pfn]
    mov     [rcx + rbx * 8], rax
    lea     rcx, [rip + data_mfn]
    mov     [rcx + rbx * 8], rdx
    mov     edi, W_DATA
    mov     rsi, rdx
    mov     edx, PTE_DATA_RW
    call    kmap
    OK      "mapping a free frame writable to fill a data page"
    inc     qword ptr [rip + window_maps]
    mov     edi, ebx
    mov     esi, SEED_A
    call    seed
    mov     r12, rax
    mov     rdi, W_DATA_VA
    mov     rsi, r12
    call    frame_fill
    mov     rdi, W_DATA_VA
    mov     rsi, r12
    call    frame_mismatches
    mov     rdi, rax
    xor     esi, esi
    EQ      "words of a data page that differ from what was written"
    mov     edi, W_DATA
    call    kunmap
    OK      "unmapping the data window"
    inc     ebx
    cmp     rbx, [rip + nd]
    jb      1b

/* The L1: data page i read-write at index i, read-only at ALIAS_INDEX + i. */
    call    frame_alloc
    mov     [rip + l1_pfn], rax
    mov     [rip + l1_mfn], rdx
    mov     edi, W_TABLE
    mov     rsi, rdx
    mov     edx, PTE_DATA_RW
    call    kmap
    OK      "mapping a free frame writable to build an L1"
    inc     qword ptr [rip + window_maps]
    mov     rdi, W_TABLE_VA
    call    frame_zero
    mov     r12, W_TABLE_VA
    lea     r13, [rip + data_mfn]
    xor     ebx, ebx
2:  mov     rax, [r13 + rbx * 8]
    shl     rax, PAGE_SHIFT
    lea     rcx, [rax + PTE_DATA_RW]
    mov     [r12 + rbx * 8], rcx
    lea     rcx, [rax + PTE_DATA_RO]
    mov     [r12 + rbx * 8 + ALIAS_INDEX * 8], rcx
    add     qword ptr [rip + pages_mapped], 2
    inc     ebx
    cmp     rbx, [rip + nd]
    jb      2b
    mov     edi, 1
    mov     rsi, [rip + l1_mfn]
    call    pin_table
    RC      EINVAL, "pinning an L1 that is still mapped writable"
    mov     edi, W_TABLE
    call    kunmap
    OK      "unmapping the L1 from its window"

/* Where the tree goes: L2 index j = 1 + r % 7, L3 index k = 1 + (r/2) % 8. */
    mov     rax, [rip + round]
    xor     edx, edx
    mov     ecx, 7
    div     rcx
    lea     r14, [rdx + 1]                  /* r14 = j */
    mov     r15, [rip + round]
    shr     r15, 1
    and     r15d, 7
    inc     r15                             /* r15 = k */

/* The L2: entry j -> the L1. */
    call    frame_alloc
    mov     [rip + l2_pfn], rax
    mov     [rip + l2_mfn], rdx
    mov     rdi, rdx
    mov     esi, r14d
    mov     rdx, [rip + l1_mfn]
    shl     rdx, PAGE_SHIFT
    or      rdx, PTE_TABLE
    call    build_table

    test    qword ptr [rip + shape], 1
    jnz     3f
/* Even shapes: the L2 goes into P3 at index k. */
    mov     rax, [rip + l2_mfn]
    mov     [rip + top_mfn], rax
    mov     rax, [rip + p3_mfn]
    mov     [rip + parent_mfn], rax
    mov     [rip + parent_index], r15
    mov     rax, P3_SLOT << L4_SHIFT
    jmp     4f
/* Odd shapes: an L3 (entry k -> the L2) goes into L4 slot 2 + (r/2) % 4. */
3:  call    frame_alloc
    mov     [rip + l3_pfn], rax
    mov     [rip + l3_mfn], rdx
    mov     [rip + top_mfn], rdx
    mov     rdi, rdx
    mov     esi, r15d
    mov     rdx, [rip + l2_mfn]
    shl     rdx, PAGE_SHIFT
    or      rdx, PTE_TABLE
    call    build_table
    mov     rax, [rip + mm_l4_mfn]
    mov     [rip + parent_mfn], rax
    mov     rax, [rip + round]
    shr     rax, 1
    and     eax, OWN_L3_SLOTS - 1
    add     eax, OWN_L3_SLOT
    mov     [rip + parent_index], rax
    shl     rax, L4_SHIFT
4:  shl     r15, L3_SHIFT
    or      rax, r15
    shl     r14, L2_SHIFT
    or      rax, r14
    mov     [rip + tree_va], rax

/* Pins before the hook. */
    mov     rax, [rip + shape]
    cmp     eax, 0
    jne     5f
    mov     edi, 1
    mov     rsi, [rip + l1_mfn]
    call    pin_table
    OK      "pinning the L1 (shape 0)"
    inc     qword ptr [rip + pinned_l1]
    jmp     7f
5:  cmp     eax, 1
    jne     6f
    mov     edi, 3
    mov     rsi, [rip + l3_mfn]
    call    pin_table
    OK      "pinning the L3, which validates the L2 and the L1 (shape 1)"
    inc     qword ptr [rip + pinned_l3]
    jmp     7f
6:  cmp     eax, 2
    jne     7f
    mov     edi, 2
    mov     rsi, [rip + l2_mfn]
    call    pin_table
    OK      "pinning the L2, which validates the L1 (shape 2)"
    inc     qword ptr [rip + pinned_l2]

/* The hook: one mmu_update on the parent table. */
7:  mov     rdi, [rip + parent_mfn]
    mov     esi, [rip + parent_index]
    mov     rdx, [rip + top_mfn]
    shl     rdx, PAGE_SHIFT
    or      rdx, PTE_TABLE
    call    set_pte
    OK      "hooking the round's tree into its parent"
    mov     rax, [rip + shape]
    and     eax, 1
    xor     eax, 1
    mov     [rip + tree_in_p3], rax

/* Pins after the hook (shape 3): the tables are validated and in use. */
    cmp     qword ptr [rip + shape], 3
    jne     8f
    mov     edi, 1
    mov     rsi, [rip + l1_mfn]
    call    pin_table
    OK      "pinning the L1 of a live tree (shape 3)"
    inc     qword ptr [rip + pinned_l1]
    mov     edi, 2
    mov     rsi, [rip + l2_mfn]
    call    pin_table
    OK      "pinning the L2 of a live tree (shape 3)"
    inc     qword ptr [rip + pinned_l2]
8:  mov     rax, [rip + pinned_l1]
    add     rax, [rip + pinned_l2]
    add     rax, [rip + pinned_l3]
    add     [rip + tables_pinned], rax

/* The entries read back as written. */
    mov     rdi, [rip + parent_mfn]
    mov     esi, [rip + parent_index]
    call    read_entry
    mov     rdi, rax
    mov     rsi, [rip + top_mfn]
    shl     rsi, PAGE_SHIFT
    or      rsi, PTE_TABLE
    EQ      "the hooking entry, read back"
    mov     rdi, [rip + l1_mfn]
    xor     esi, esi
    call    read_entry
    mov     rdi, rax
    mov     rsi, [rip + data_mfn]
    shl     rsi, PAGE_SHIFT
    or      rsi, PTE_DATA_RW
    EQ      "L1 entry 0, read back through a read-only window"
    mov     rdi, [rip + l1_mfn]
    mov     esi, ALIAS_INDEX
    call    read_entry
    mov     rdi, rax
    mov     rsi, [rip + data_mfn]
    shl     rsi, PAGE_SHIFT
    or      rsi, PTE_DATA_RO
    EQ      "L1 alias entry, read back through a read-only window"

/* Tables in use cannot be mapped writable. */
    mov     edi, W_TABLE
    mov     rsi, [rip + l1_mfn]
    mov     edx, PTE_DATA_RW
    call    kmap
    RC      EBUSY, "mapping the live L1 writable"
    mov     edi, W_TABLE
    mov     rsi, [rip + top_mfn]
    mov     edx, PTE_DATA_RW
    call    kmap
    RC      EBUSY, "mapping the live top table writable"

    call    tlb_flush
    OK      "TLB flush after hooking"

/* Data through both mappings; then seed B through one, read through the other. */
    xor     ebx, ebx
9:  mov     edi, ebx
    call    rw_va
    mov     r12, rax
    mov     edi, ebx
    call    alias_va
    mov     r13, rax
    mov     edi, ebx
    mov     esi, SEED_A
    call    seed
    mov     r14, rax
    mov     rdi, r12
    mov     rsi, r14
    call    frame_mismatches
    mov     rdi, rax
    xor     esi, esi
    EQ      "words of a data page that differ, through the new tree"
    mov     rdi, r13
    mov     rsi, r14
    call    frame_mismatches
    mov     rdi, rax
    xor     esi, esi
    EQ      "words of a data page that differ, through its read-only alias"
    mov     edi, ebx
    mov     esi, SEED_B
    call    seed
    mov     r14, rax
    mov     rdi, r12
    mov     rsi, r14
    call    frame_fill
    mov     rdi, r13
    mov     rsi, r14
    call    frame_mismatches
    mov     rdi, rax
    xor     esi, esi
    EQ      "words that differ in the alias after writing the read-write mapping"
    inc     ebx
    cmp     rbx, [rip + nd]
    jb      9b

    call    edit_entries
    call    unmap_and_map

/* Every 8th round (shape 0: the tree is in P3), a base-pointer switch. */
    test    qword ptr [rip + round], 7
    jnz     10f
    mov     rdi, [rip + round]
    shr     rdi, 3
    and     edi, 1
    call    baseptr_switch

10: call    teardown_round
    pop     r15
    pop     r14
    pop     r13
    pop     r12
    pop     rbx
    ret

/* edit_entries: L1[0] -> the last data page, check; then back to page 0. */
edit_entries:
    push    rbx
    push    r12
    push    r13
    mov     rbx, [rip + nd]
    dec     rbx                             /* rbx = the last page */
    mov     rdi, [rip + l1_mfn]
    xor     esi, esi
    lea     rax, [rip + data_mfn]
    mov     rdx, [rax + rbx * 8]
    shl     rdx, PAGE_SHIFT
    or      rdx, PTE_DATA_RW
    call    set_pte
    OK      "changing the frame L1 entry 0 maps"
    inc     qword ptr [rip + pages_mapped]
    xor     edi, edi
    call    rw_va
    mov     r12, rax                        /* r12 = va of entry 0 */
    mov     rdi, r12
    call    invlpg
    OK      "invlpg after the change"
    mov     edi, ebx
    mov     esi, SEED_B
    call    seed
    mov     rdi, r12
    mov     rsi, rax
    call    frame_mismatches
    mov     rdi, rax
    xor     esi, esi
    EQ      "words that differ through entry 0, now mapping the last page"
    /* One word written through entry 0 shows in the last page's alias. */
    mov     edi, ebx
    call    alias_va
    mov     r13, rax
    mov     rcx, [r13 + MARKER_OFFSET]      /* the word as it is */
    push    rcx
    mov     rax, MARKER
    mov     [r12 + MARKER_OFFSET], rax
    mov     rdi, [r13 + MARKER_OFFSET]
    mov     rsi, MARKER
    EQ      "a word written through entry 0, read through the last page's alias"
    pop     rcx
    mov     [r12 + MARKER_OFFSET], rcx      /* put it back */
    mov     rdi, [rip + l1_mfn]
    xor     esi, esi
    mov     rdx, [rip + data_mfn]
    shl     rdx, PAGE_SHIFT
    or      rdx, PTE_DATA_RW
    call    set_pte
    OK      "changing L1 entry 0 back to data page 0"
    inc     qword ptr [rip + pages_mapped]
    mov     rdi, r12
    call    invlpg
    OK      "invlpg after changing it back"
    xor     edi, edi
    mov     esi, SEED_B
    call    seed
    mov     rdi, r12
    mov     rsi, rax
    call    frame_mismatches
    mov     rdi, rax
    xor     esi, esi
    EQ      "words that differ through entry 0, mapping page 0 again"
    pop     r13
    pop     r12
    pop     rbx
    ret

/* unmap_and_map: remove alias 0, see it fault; map it back with one more
 * alias (EXTRA_INDEX) in a single two-request mmu_update. */
unmap_and_map:
    push    rbx
    push    r12
    push    r13
    push    r14
    xor     edi, edi
    call    alias_va
    mov     r12, rax                        /* r12 = alias of page 0 */
    mov     rdi, [rip + l1_mfn]
    mov     esi, ALIAS_INDEX
    xor     edx, edx
    call    set_pte
    OK      "unmapping alias 0"
    mov     rdi, r12
    call    invlpg
    OK      "invlpg after unmapping alias 0"
    mov     rdi, r12
    call    probe_read
    mov     rdi, rax
    xor     esi, esi
    EQ      "alias 0 is readable after it was unmapped"
    inc     qword ptr [rip + faults_seen]

    mov     rax, [rip + l1_mfn]
    shl     rax, PAGE_SHIFT
    mov     rcx, [rip + data_mfn]
    shl     rcx, PAGE_SHIFT
    or      rcx, PTE_DATA_RO
    lea     rdx, [rip + batch]
    lea     r8, [rax + ALIAS_INDEX * 8]     /* MMU_NORMAL_PT_UPDATE */
    mov     [rdx + MU_PTR], r8
    mov     [rdx + MU_VAL], rcx
    lea     r8, [rax + EXTRA_INDEX * 8]
    mov     [rdx + MMU_UPDATE_SIZE + MU_PTR], r8
    mov     [rdx + MMU_UPDATE_SIZE + MU_VAL], rcx
    mov     rdi, rdx
    mov     esi, 2
    call    mmu_update_n
    OK      "two mappings in one mmu_update"
    add     qword ptr [rip + pages_mapped], 2
    mov     edi, [rip + mm_done]
    mov     esi, 2
    EQ      "mmu_update requests done"
    mov     rdi, r12
    call    invlpg
    OK      "invlpg of alias 0"
    mov     r13, [rip + tree_va]
    add     r13, EXTRA_INDEX * PAGE_SIZE    /* r13 = the extra alias */
    mov     rdi, r13
    call    invlpg
    OK      "invlpg of the extra alias"
    xor     edi, edi
    mov     esi, SEED_B
    call    seed
    mov     rbx, rax                        /* word 0 of page 0 */
    mov     rdi, r12
    call    probe_read
    mov     r14, rdx                        /* the word read, if it was */
    mov     rdi, rax
    mov     esi, 1
    EQ      "alias 0 is readable again"
    mov     rdi, r14
    mov     rsi, rbx
    EQ      "word 0 of page 0 through alias 0"
    mov     rdi, r13
    call    probe_read
    mov     rdi, rdx
    mov     rsi, rbx
    EQ      "word 0 of page 0 through the extra alias"
    /* Read-only means read-only. */
    mov     rdi, r13
    mov     rsi, MARKER
    call    probe_write
    mov     rdi, rax
    xor     esi, esi
    EQ      "a write through a read-only alias went through"
    mov     rdi, [rip + mm_probe_error]
    mov     esi, PF_PROT_WRITE
    EQ      "#PF error code of the write through a read-only alias"
    inc     qword ptr [rip + faults_seen]
    pop     r14
    pop     r13
    pop     r12
    pop     rbx
    ret

/* teardown_round: unhook, unpin, check the frames are plain memory again,
 * give them back. */
teardown_round:
    push    rbx
    push    r12
    /* Shapes 1 and 2 unpin while the tree is still hooked, 0 and 3 after. */
    mov     rax, [rip + shape]
    dec     eax
    cmp     eax, 1
    ja      1f
    call    unpin_round_tables
1:  mov     rdi, [rip + parent_mfn]
    mov     esi, [rip + parent_index]
    xor     edx, edx
    call    set_pte
    OK      "unhooking the round's tree"
    mov     qword ptr [rip + tree_in_p3], 0
    call    tlb_flush
    OK      "TLB flush after unhooking"
    xor     edi, edi
    call    rw_va
    mov     rbx, rax
    mov     rdi, rax
    call    probe_read
    mov     rdi, rax
    xor     esi, esi
    EQ      "the tree's first page is readable after unhooking"
    mov     rdi, [rip + mm_probe_cr2]
    mov     rsi, rbx
    EQ      "cr2 of the read after unhooking"
    inc     qword ptr [rip + faults_seen]
    mov     rax, [rip + shape]
    dec     eax
    cmp     eax, 1
    jbe     2f
    call    unpin_round_tables
2:  mov     rsi, [rip + l1_mfn]
    mov     edi, MMUEXT_UNPIN_TABLE
    xor     edx, edx
    call    mmuext1
    RC      EINVAL, "unpinning the round's L1 once more"

/* The table frames are plain memory again: they can be mapped writable. */
    mov     rdi, [rip + l1_mfn]
    call    check_plain
    mov     rdi, [rip + l2_mfn]
    call    check_plain
    mov     rdi, [rip + l3_mfn]
    test    rdi, rdi
    jz      3f
    call    check_plain
3:
/* The data pages kept seed B. */
    xor     ebx, ebx
4:  mov     edi, W_DATA
    lea     rax, [rip + data_mfn]
    mov     rsi, [rax + rbx * 8]
    mov     edx, PTE_DATA_RW
    call    kmap
    OK      "mapping a data page writable again after the teardown"
    inc     qword ptr [rip + window_maps]
    mov     edi, ebx
    mov     esi, SEED_B
    call    seed
    mov     rdi, W_DATA_VA
    mov     rsi, rax
    call    frame_mismatches
    mov     rdi, rax
    xor     esi, esi
    EQ      "words of a data page that differ after the teardown"
    mov     edi, W_DATA
    call    kunmap
    OK      "unmapping the data window after the teardown"
    inc     ebx
    cmp     rbx, [rip + nd]
    jb      4b

/* Back to the pool: data pages first, tables last (so they come out first). */
    xor     ebx, ebx
5:  lea     rax, [rip + data_pfn]
    mov     rdi, [rax + rbx * 8]
    call    frame_free
    inc     ebx
    cmp     rbx, [rip + nd]
    jb      5b
    mov     rdi, [rip + l1_pfn]
    call    frame_free
    mov     rdi, [rip + l2_pfn]
    call    frame_free
    mov     rdi, [rip + l3_pfn]
    test    rdi, rdi
    jz      6f
    call    frame_free
6:  pop     r12
    pop     rbx
    ret

/* unpin_round_tables: unpin what this round pinned (L2 before L1). */
unpin_round_tables:
    cmp     qword ptr [rip + pinned_l3], 0
    je      1f
    mov     rdi, [rip + l3_mfn]
    call    unpin_table
    OK      "unpinning the round's L3"
    inc     qword ptr [rip + tables_unpinned]
1:  cmp     qword ptr [rip + pinned_l2], 0
    je      2f
    mov     rdi, [rip + l2_mfn]
    call    unpin_table
    OK      "unpinning the round's L2"
    inc     qword ptr [rip + tables_unpinned]
2:  cmp     qword ptr [rip + pinned_l1], 0
    je      3f
    mov     rdi, [rip + l1_mfn]
    call    unpin_table
    OK      "unpinning the round's L1"
    inc     qword ptr [rip + tables_unpinned]
3:  ret

/* ---- the persistent L3 ------------------------------------------------------ */

setup_p3:
    call    frame_alloc
    mov     [rip + p3_pfn], rax
    mov     [rip + p3_mfn], rdx
    mov     edi, W_TABLE
    mov     rsi, rdx
    mov     edx, PTE_DATA_RW
    call    kmap
    OK      "mapping a free frame writable to build the persistent L3"
    inc     qword ptr [rip + window_maps]
    mov     rdi, W_TABLE_VA
    call    frame_zero
    mov     edi, W_TABLE
    call    kunmap
    OK      "unmapping the persistent L3 from its window"
    mov     rdi, [rip + mm_l4_mfn]
    mov     esi, P3_SLOT
    mov     rdx, [rip + p3_mfn]
    shl     rdx, PAGE_SHIFT
    or      rdx, PTE_TABLE
    call    set_pte
    OK      "hooking the persistent L3 into the L4"
    mov     rax, [rip + mm_l4_va]
    mov     rdi, [rax + P3_SLOT * 8]
    mov     rsi, [rip + p3_mfn]
    shl     rsi, PAGE_SHIFT
    or      rsi, PTE_TABLE
    EQ      "the L4 entry of the persistent L3, read back"
    ret

teardown_p3:
    mov     rdi, [rip + mm_l4_mfn]
    mov     esi, P3_SLOT
    xor     edx, edx
    call    set_pte
    OK      "unhooking the persistent L3"
    call    tlb_flush
    OK      "TLB flush after unhooking the persistent L3"
    mov     rdi, [rip + p3_mfn]
    call    check_plain
    mov     rdi, [rip + p3_pfn]
    jmp     frame_free

/* ---- base pointers -------------------------------------------------------- */

/* baseptr_switch(edi = 1 to pin the new L4 and make it the user base pointer
 * too, 0 to let NEW_BASEPTR validate it alone). */
baseptr_switch:
    push    rbx
    push    r12
    push    r13
    mov     r12d, edi
    call    frame_alloc
    mov     r13, rax                        /* r13 = pfn */
    mov     rbx, rdx                        /* rbx = mfn of the new L4 */
    mov     edi, W_TABLE
    mov     rsi, rdx
    mov     edx, PTE_DATA_RW
    call    kmap
    OK      "mapping a free frame writable to build a second L4"
    inc     qword ptr [rip + window_maps]
    mov     rdi, W_TABLE_VA
    call    frame_zero
    mov     rax, [rip + mm_l4_va]           /* copy the kernel and P3 slots */
    mov     rdx, W_TABLE_VA
    mov     rcx, [rax + KERNEL_SLOT * 8]
    mov     [rdx + KERNEL_SLOT * 8], rcx
    mov     rcx, [rax + P3_SLOT * 8]
    mov     [rdx + P3_SLOT * 8], rcx
    mov     edi, W_TABLE
    call    kunmap
    OK      "unmapping the second L4 from its window"

    test    r12d, r12d
    jz      1f
    mov     edi, 4
    mov     rsi, rbx
    call    pin_table
    OK      "pinning the second L4"
    inc     qword ptr [rip + tables_pinned]
    mov     rdi, rbx
    call    new_user_baseptr
    OK      "NEW_USER_BASEPTR to the second L4"
1:  mov     rdi, rbx
    call    new_baseptr
    OK      "NEW_BASEPTR to the second L4"
    inc     qword ptr [rip + baseptr_switches]

/* Running on the second L4: the stack, code and data are the kernel's. */
    mov     rdi, rbx
    mov     esi, KERNEL_SLOT
    call    read_entry
    mov     rdi, rax
    mov     rcx, [rip + mm_l4_va]
    mov     rsi, [rcx + KERNEL_SLOT * 8]
    EQ      "kernel slot of the second L4 (read while running on it)"
    mov     edi, W_TABLE
    mov     rsi, rbx
    mov     edx, PTE_DATA_RW
    call    kmap
    RC      EBUSY, "mapping the running L4 writable"
    cmp     qword ptr [rip + tree_in_p3], 0
    je      3f
    xor     r13d, r13d                      /* the round's tree through this L4 */
2:  mov     edi, r13d
    call    rw_va
    push    rax
    mov     edi, r13d
    mov     esi, SEED_B
    call    seed
    pop     rdi
    mov     rsi, rax
    call    frame_mismatches
    mov     rdi, rax
    xor     esi, esi
    EQ      "words of a data page that differ, through the second L4"
    inc     r13d
    cmp     r13, [rip + nd]
    jb      2b

3:  mov     rdi, [rip + mm_l4_mfn]
    call    new_baseptr
    OK      "NEW_BASEPTR back to the boot L4"
    inc     qword ptr [rip + baseptr_switches]
    test    r12d, r12d
    jz      4f
    xor     edi, edi
    call    new_user_baseptr
    OK      "NEW_USER_BASEPTR to none"
    mov     rdi, rbx
    call    unpin_table
    OK      "unpinning the second L4"
    inc     qword ptr [rip + tables_unpinned]
    jmp     5f
4:  mov     rdi, rbx
    call    unpin_table
    RC      EINVAL, "unpinning the second L4, which was never pinned"
5:  mov     rdi, rbx
    call    check_plain
    mov     rdi, rbx
    call    mfn_to_pfn
    mov     rdi, rax
    call    frame_free
    pop     r13
    pop     r12
    pop     rbx
    ret

/* ---- helpers ---------------------------------------------------------------- */

/* build_table(rdi = mfn, esi = index, rdx = entry): a table with that one
 * entry, written through a writable window that is removed afterwards. */
build_table:
    push    rbx
    push    r12
    push    r13
    mov     rbx, rdi
    mov     r12d, esi
    mov     r13, rdx
    mov     edi, W_TABLE
    mov     rsi, rbx
    mov     edx, PTE_DATA_RW
    call    kmap
    OK      "mapping a free frame writable to build a table"
    inc     qword ptr [rip + window_maps]
    mov     rdi, W_TABLE_VA
    call    frame_zero
    mov     rax, W_TABLE_VA
    mov     [rax + r12 * 8], r13
    mov     edi, W_TABLE
    call    kunmap
    OK      "unmapping a table from its window"
    pop     r13
    pop     r12
    pop     rbx
    ret

/* check_plain(rdi = mfn): no page-table type is left on the frame, so the
 * hypervisor lets us map it writable. */
check_plain:
    mov     rsi, rdi
    mov     edi, W_TABLE
    mov     edx, PTE_DATA_RW
    call    kmap
    OK      "mapping a former page table writable"
    inc     qword ptr [rip + window_maps]
    mov     edi, W_TABLE
    call    kunmap
    OK      "unmapping a former page table"
    ret

/* rw_va(edi = i) / alias_va(edi = i) -> rax: data page i in the round's tree. */
rw_va:
    mov     eax, edi
    shl     rax, PAGE_SHIFT
    add     rax, [rip + tree_va]
    ret

alias_va:
    lea     eax, [rdi + ALIAS_INDEX]
    shl     rax, PAGE_SHIFT
    add     rax, [rip + tree_va]
    ret

/* seed(edi = page, esi = SEED_A or SEED_B) -> rax: unique per round, page, seed. */
seed:
    mov     rax, [rip + round]
    shl     rax, 32
    shl     edi, 8
    or      rax, rdi
    or      rax, rsi
    ret

/* ---- output ------------------------------------------------------------------ */

print_layout:
    call    con_begin
    STR     rdi, "L4 at machine frame "
    call    con_str
    mov     rdi, [rip + mm_l4_mfn]
    call    con_hex
    STR     rdi, ", kernel L1 "
    call    con_str
    mov     rdi, [rip + mm_kl1_mfn]
    call    con_hex
    STR     rdi, "; free frames from pfn "
    call    con_str
    mov     rdi, [rip + mm_first_free_pfn]
    call    con_dec
    STR     rdi, ": "
    call    con_str
    mov     rdi, [rip + mm_pool_count]
    call    con_dec
    STR     rdi, " in the pool"
    call    con_str
    jmp     con_end

print_progress:
    call    con_begin
    STR     rdi, "round "
    call    con_str
    mov     rdi, [rip + round]
    call    con_dec
    STR     rdi, ": tables pinned "
    call    con_str
    mov     rdi, [rip + tables_pinned]
    call    con_dec
    STR     rdi, ", pages mapped "
    call    con_str
    mov     rdi, [rip + pages_mapped]
    call    con_dec
    STR     rdi, ", checks passed "
    call    con_str
    mov     rdi, [rip + checks_passed]
    call    con_dec
    jmp     con_end

print_summary:
    call    con_begin
    STR     rdi, "rounds "
    call    con_str
    mov     rdi, [rip + round]
    call    con_dec
    STR     rdi, ", tables pinned "
    call    con_str
    mov     rdi, [rip + tables_pinned]
    call    con_dec
    STR     rdi, ", unpinned "
    call    con_str
    mov     rdi, [rip + tables_unpinned]
    call    con_dec
    STR     rdi, ", pages mapped "
    call    con_str
    mov     rdi, [rip + pages_mapped]
    call    con_dec
    STR     rdi, ", window mappings "
    call    con_str
    mov     rdi, [rip + window_maps]
    call    con_dec
    call    con_end
    call    con_begin
    STR     rdi, "base-pointer switches "
    call    con_str
    mov     rdi, [rip + baseptr_switches]
    call    con_dec
    STR     rdi, ", faults caught "
    call    con_str
    mov     rdi, [rip + faults_seen]
    call    con_dec
    STR     rdi, ", checks passed "
    call    con_str
    mov     rdi, [rip + checks_passed]
    call    con_dec
    jmp     con_end
