/*
 * mm.s: a PV guest's memory management on top of mmu_update and mmuext_op.
 *
 * A PV guest's page tables hold machine frame numbers and are mapped
 * read-only: the guest reads them directly and changes them only through
 * the hypervisor, which checks every new entry (docs/pv-abi.md).  This
 * library gives the guest what it needs for that:
 *
 *   mm_init(rdi = start_info)        learn the bootstrap layout; put every pfn
 *                                    the bootstrap tables do not map in the pool
 *   frame_alloc() -> rax = pfn, rdx = mfn     a free frame (fatal if none)
 *   frame_free(rdi = pfn)            back to the pool (last freed, first reused)
 *   pfn_to_mfn(rdi) -> rax           mfn_list[pfn]
 *   mfn_to_pfn(rdi) -> rax           our pfn of that mfn, or -1 if not ours
 *   bootstrap_va(rdi = mfn) -> rax   its address in the bootstrap region (up to
 *                                    512 KiB past the stack), or 0
 *
 * Hypercalls (each one request; rax = 0 or -errno; the hypervisor's `done`
 * count is compared with the result, mismatches counted in mm_done_errors):
 *   mmu_update1(rdi = ptr, rsi = val)           with foreigndom = DOMID_SELF
 *   mmu_update_foreign(rdi, rsi, edx = domid)   with another foreigndom
 *   mmu_update_n(rdi = reqs, esi = count)       a batch; [mm_done] = done
 *   set_pte(rdi = table mfn, esi = index, rdx = entry)   table[index] = entry
 *   mmuext1(edi = cmd, rsi = arg1, rdx = arg2)
 *   pin_table(edi = level 1-4, rsi = mfn), unpin_table(rdi = mfn)
 *   new_baseptr(rdi = mfn), new_user_baseptr(rdi = mfn, 0 = none)
 *   invlpg(rdi = va), tlb_flush()
 *
 * Windows (bootstrap-L1 slots MM_WINDOW_SLOT.., see xen.inc):
 *   kmap(edi = window, rsi = mfn, rdx = pte flags)  map it, then invlpg
 *   kunmap(edi = window)                            same with an empty entry
 *   read_entry(rdi = table mfn, esi = index) -> rax  through the bootstrap
 *                                    mapping, else a read-only window (fatal
 *                                    if the hypervisor refuses it)
 *
 * Pages:
 *   frame_zero(rdi = va), frame_fill(rdi = va, rsi = seed): word i = seed + i*K
 *   frame_mismatches(rdi = va, rsi = seed) -> rax = words that differ
 *
 * Probing (needs mm_page_fault_handler as the guest's #PF handler):
 *   probe_read(rdi = va) -> rax = 1 and rdx = [va], or rax = 0 if it faulted
 *   probe_write(rdi = va, rsi = value) -> rax = 1, or 0 if it faulted
 *   Any other page fault is fatal.
 *
 * Fatal errors print a line and shut down with code MM_FATAL_CODE.
 * Register conventions as in xen.inc (rbx, rbp, r12-r15 preserved).
 */
    .intel_syntax noprefix
    .include "xen.inc"

    .equ    MM_POOL_MAX,    4096            /* pfns the pool can hold */
    .equ    MM_FATAL_CODE,  255
    .equ    PEEK_WINDOW,    MM_WINDOWS - 1  /* the library's own window */
    .equ    PATTERN_STEP,   0x9e3779b97f4a7c15
    /* indexes of VIRT_BASE in each level */
    .equ    KERNEL_L4_INDEX, (VIRT_BASE >> L4_SHIFT) & 511
    .equ    KERNEL_L3_INDEX, (VIRT_BASE >> L3_SHIFT) & 511
    .equ    KERNEL_L2_INDEX, (VIRT_BASE >> L2_SHIFT) & 511

    .bss
    .balign 8
    .globl  mm_start_info, mm_mfn_list, mm_nr_pages, mm_l4_va, mm_l4_mfn
    .globl  mm_kl3_mfn, mm_kl2_mfn, mm_kl1_mfn, mm_first_free_pfn, mm_region_end_pfn
    .globl  mm_pool_count, mm_done, mm_done_errors, mm_probe_error, mm_probe_cr2
mm_start_info:      .skip 8
mm_mfn_list:        .skip 8         /* u64 mfn[nr_pages] */
mm_nr_pages:        .skip 8
mm_l4_va:           .skip 8         /* pt_base: the bootstrap L4, read-only */
mm_l4_mfn:          .skip 8
mm_kl3_mfn:         .skip 8         /* the bootstrap L3, L2, L1 that map VIRT_BASE */
mm_kl2_mfn:         .skip 8
mm_kl1_mfn:         .skip 8
mm_region_end_pfn:  .skip 8         /* first pfn after the bootstrap region */
mm_first_free_pfn:  .skip 8         /* first pfn the bootstrap tables leave unmapped */
mm_pool_count:      .skip 8
mm_done:            .skip 8         /* u32 `done` of the last hypercall */
mm_done_errors:     .skip 8         /* calls whose `done` did not match rc */
mm_probe_active:    .skip 8
mm_probe_error:     .skip 8         /* #PF error code and CR2 of the last */
mm_probe_cr2:       .skip 8         /* faulting probe */
mm_request:         .skip MMUEXT_OP_SIZE    /* one mmu_update or mmuext_op */
    .balign 4
mm_pool:            .skip 4 * MM_POOL_MAX   /* u32 pfns, a stack */

    .text

/* ---- start of day -------------------------------------------------------- */

    .globl  mm_init
mm_init:
    push    rbx
    push    r12
    sub     rsp, 8
    mov     rbx, rdi
    mov     [rip + mm_start_info], rdi
    mov     rax, [rbx + SI_MFN_LIST]
    mov     [rip + mm_mfn_list], rax
    mov     rax, [rbx + SI_NR_PAGES]
    mov     [rip + mm_nr_pages], rax

    /* The bootstrap region ends 512 KiB after the one-page stack, which
     * follows the nr_pt_frames page tables at pt_base; Xen's builder maps
     * on up to the next 4 MiB boundary.  Pool frames must be mapped
     * nowhere (a frame that becomes a page table may not be writable), so
     * the pool starts there. */
    mov     rax, [rbx + SI_NR_PT_FRAMES]
    add     rax, BOOT_STACK_PAGES
    shl     rax, PAGE_SHIFT
    add     rax, [rbx + SI_PT_BASE]
    add     rax, BOOT_PADDING
    mov     rcx, VIRT_BASE
    sub     rax, rcx
    mov     rdx, rax
    or      rdx, BOOT_MAP_ALIGN - 1
    inc     rdx
    shr     rdx, PAGE_SHIFT
    mov     [rip + mm_first_free_pfn], rdx
    shr     rax, PAGE_SHIFT
    mov     [rip + mm_region_end_pfn], rax
    cmp     rax, MM_WINDOW_SLOT
    jbe     1f
    STR     rdi, "mm_init: the bootstrap region reaches the window slots"
    jmp     mm_fatal
1:  cmp     rdx, [rip + mm_nr_pages]
    jbe     1f
    STR     rdi, "mm_init: the bootstrap region is larger than nr_pages"
    jmp     mm_fatal

    /* The L4, then down the tables that map VIRT_BASE. */
1:  mov     rdi, [rbx + SI_PT_BASE]
    mov     [rip + mm_l4_va], rdi
    mov     rcx, VIRT_BASE
    sub     rdi, rcx
    shr     rdi, PAGE_SHIFT
    call    pfn_to_mfn
    mov     [rip + mm_l4_mfn], rax
    mov     rdi, rax
    mov     esi, KERNEL_L4_INDEX
    call    next_table
    mov     [rip + mm_kl3_mfn], rax
    mov     rdi, rax
    mov     esi, KERNEL_L3_INDEX
    call    next_table
    mov     [rip + mm_kl2_mfn], rax
    mov     rdi, rax
    mov     esi, KERNEL_L2_INDEX
    call    next_table
    mov     [rip + mm_kl1_mfn], rax

    /* The windows start empty: Xen's bootstrap tables map their slots (the
     * padding up to 4 MiB), and a window must fault until it is mapped. */
    xor     r12d, r12d
2:  mov     edi, r12d
    call    kunmap
    test    rax, rax
    jz      3f
    STR     rdi, "mm_init: the hypervisor refused to empty a window"
    jmp     mm_fatal
3:  inc     r12d
    cmp     r12d, MM_WINDOWS
    jb      2b

    /* The pool: every pfn from first_free on, lowest on top of the stack. */
    mov     rcx, [rip + mm_nr_pages]
    sub     rcx, [rip + mm_first_free_pfn]  /* free pfns */
    mov     eax, MM_POOL_MAX
    cmp     rcx, rax
    cmova   rcx, rax
    mov     [rip + mm_pool_count], rcx
    mov     rax, [rip + mm_first_free_pfn]
    add     rax, rcx                        /* highest pfn + 1 goes to the bottom */
    lea     rdx, [rip + mm_pool]
    xor     r8d, r8d
2:  cmp     r8, rcx
    jae     3f
    dec     rax
    mov     [rdx + r8 * 4], eax
    inc     r8
    jmp     2b
3:  add     rsp, 8
    pop     r12
    pop     rbx
    ret

/* next_table(rdi = table mfn in the bootstrap region, esi = index) -> rax =
 * mfn of the present table that entry points to (fatal otherwise). */
next_table:
    push    rbx
    mov     ebx, esi
    call    bootstrap_va
    test    rax, rax
    jz      1f
    mov     rax, [rax + rbx * 8]
    test    eax, _PAGE_PRESENT
    jz      1f
    mov     rcx, PTE_ADDR_MASK
    and     rax, rcx
    shr     rax, PAGE_SHIFT
    pop     rbx
    ret
1:  STR     rdi, "mm_init: the bootstrap tables do not map VIRT_BASE as the ABI says"
    jmp     mm_fatal

/* ---- frames ---------------------------------------------------------------- */

    .globl  pfn_to_mfn
pfn_to_mfn:
    mov     rax, [rip + mm_mfn_list]
    mov     rax, [rax + rdi * 8]
    ret

    .globl  mfn_to_pfn
mfn_to_pfn:
    mov     rdx, [rip + mm_mfn_list]
    mov     rcx, [rip + mm_nr_pages]
    xor     eax, eax
1:  cmp     rax, rcx
    jae     2f
    cmp     [rdx + rax * 8], rdi
    je      3f
    inc     rax
    jmp     1b
2:  mov     rax, -1
3:  ret

    .globl  bootstrap_va
bootstrap_va:
    mov     rdx, [rip + mm_mfn_list]
    mov     rcx, [rip + mm_region_end_pfn]
    xor     eax, eax
1:  cmp     rax, rcx
    jae     2f
    cmp     [rdx + rax * 8], rdi
    je      3f
    inc     rax
    jmp     1b
2:  xor     eax, eax
    ret
3:  shl     rax, PAGE_SHIFT
    mov     rcx, VIRT_BASE
    add     rax, rcx
    ret

    .globl  frame_alloc
frame_alloc:
    mov     rcx, [rip + mm_pool_count]
    test    rcx, rcx
    jz      1f
    dec     rcx
    mov     [rip + mm_pool_count], rcx
    lea     rdx, [rip + mm_pool]
    mov     eax, [rdx + rcx * 4]
    mov     rdx, [rip + mm_mfn_list]
    mov     rdx, [rdx + rax * 8]
    ret
1:  STR     rdi, "frame_alloc: the pool is empty"
    jmp     mm_fatal

    .globl  frame_free
frame_free:
    mov     rcx, [rip + mm_pool_count]
    cmp     rcx, MM_POOL_MAX
    jae     1f
    lea     rdx, [rip + mm_pool]
    mov     [rdx + rcx * 4], edi
    inc     rcx
    mov     [rip + mm_pool_count], rcx
    ret
1:  STR     rdi, "frame_free: the pool is full (a pfn freed twice?)"
    jmp     mm_fatal

/* ---- hypercalls ---------------------------------------------------------- */

    .globl  mmu_update1
mmu_update1:
    mov     edx, DOMID_SELF
    .globl  mmu_update_foreign
mmu_update_foreign:
    mov     [rip + mm_request + MU_PTR], rdi
    mov     [rip + mm_request + MU_VAL], rsi
    mov     r10d, edx                       /* foreigndom */
    lea     rdi, [rip + mm_request]
    mov     esi, 1
    lea     rdx, [rip + mm_done]
    mov     dword ptr [rdx], -1             /* so that an unwritten `done` shows */
    HYPERCALL mmu_update
    mov     esi, 1
    jmp     check_done

    .globl  mmu_update_n
mmu_update_n:
    push    rbx
    mov     ebx, esi
    lea     rdx, [rip + mm_done]
    mov     dword ptr [rdx], -1
    mov     r10d, DOMID_SELF
    HYPERCALL mmu_update
    mov     esi, ebx
    pop     rbx
    jmp     check_done

    .globl  mmuext1
mmuext1:
    mov     [rip + mm_request + MEO_CMD], edi
    mov     dword ptr [rip + mm_request + MEO_CMD + 4], 0
    mov     [rip + mm_request + MEO_ARG1], rsi
    mov     [rip + mm_request + MEO_ARG2], rdx
    lea     rdi, [rip + mm_request]
    mov     esi, 1
    lea     rdx, [rip + mm_done]
    mov     dword ptr [rdx], -1
    mov     r10d, DOMID_SELF
    HYPERCALL mmuext_op
    mov     esi, 1

/* check_done(rax = rc, esi = requests): a call that succeeded did all its
 * requests, a failed single request did none, a failed batch fewer than all.
 * Count the calls where `done` says otherwise. */
check_done:
    mov     ecx, [rip + mm_done]
    test    rax, rax
    jz      1f
    cmp     esi, 1
    jne     2f                              /* a failed batch: any done < count */
    xor     esi, esi                        /* a failed single request: 0 */
1:  cmp     ecx, esi
    je      3f
    inc     qword ptr [rip + mm_done_errors]
    ret
2:  cmp     ecx, esi
    jb      3f
    inc     qword ptr [rip + mm_done_errors]
3:  ret

    .globl  set_pte
set_pte:
    shl     rdi, PAGE_SHIFT
    and     esi, ENTRIES_PER_TABLE - 1
    lea     rdi, [rdi + rsi * 8]            /* MMU_NORMAL_PT_UPDATE: low bits 0 */
    mov     rsi, rdx
    jmp     mmu_update1

    .globl  pin_table
pin_table:
    lea     edi, [rdi + MMUEXT_PIN_L1_TABLE - 1]
    xor     edx, edx
    jmp     mmuext1

    .globl  unpin_table
unpin_table:
    mov     rsi, rdi
    mov     edi, MMUEXT_UNPIN_TABLE
    xor     edx, edx
    jmp     mmuext1

    .globl  new_baseptr
new_baseptr:
    mov     rsi, rdi
    mov     edi, MMUEXT_NEW_BASEPTR
    xor     edx, edx
    jmp     mmuext1

    .globl  new_user_baseptr
new_user_baseptr:
    mov     rsi, rdi
    mov     edi, MMUEXT_NEW_USER_BASEPTR
    xor     edx, edx
    jmp     mmuext1

    .globl  invlpg
invlpg:
    mov     rsi, rdi
    mov     edi, MMUEXT_INVLPG_LOCAL
    xor     edx, edx
    jmp     mmuext1

    .globl  tlb_flush
tlb_flush:
    mov     edi, MMUEXT_TLB_FLUSH_LOCAL
    xor     esi, esi
    xor     edx, edx
    jmp     mmuext1

/* ---- windows ------------------------------------------------------------- */

    .globl  kmap
kmap:
    push    rbx
    mov     ebx, edi
    cmp     ebx, MM_WINDOWS
    jae     1f
    shl     rsi, PAGE_SHIFT
    or      rsi, rdx                        /* the entry */
    mov     rdi, [rip + mm_kl1_mfn]
    shl     rdi, PAGE_SHIFT
    lea     rdi, [rdi + rbx * 8 + MM_WINDOW_SLOT * 8]
    call    mmu_update1
    test    rax, rax
    jnz     2f                              /* refused: nothing changed */
    mov     rdi, rbx
    shl     rdi, PAGE_SHIFT
    mov     rax, MM_WINDOW_BASE
    add     rdi, rax
    call    invlpg                          /* forget the old translation */
2:  pop     rbx
    ret
1:  STR     rdi, "kmap: no such window"
    jmp     mm_fatal

    .globl  kunmap
kunmap:
    xor     esi, esi
    xor     edx, edx
    jmp     kmap

    .globl  read_entry
read_entry:
    push    rbx
    push    r12
    sub     rsp, 8
    mov     rbx, rdi
    mov     r12d, esi
    and     r12d, ENTRIES_PER_TABLE - 1
    call    bootstrap_va
    test    rax, rax
    jz      1f
    mov     rax, [rax + r12 * 8]            /* a bootstrap table: read it there */
    jmp     2f
1:  mov     edi, PEEK_WINDOW                /* else map it read-only for a moment */
    mov     rsi, rbx
    mov     edx, PTE_DATA_RO
    call    kmap
    test    rax, rax
    jnz     3f
    mov     rax, MM_WINDOW_BASE + PEEK_WINDOW * PAGE_SIZE
    mov     rbx, [rax + r12 * 8]
    mov     edi, PEEK_WINDOW
    call    kunmap
    test    rax, rax
    jnz     3f
    mov     rax, rbx
2:  add     rsp, 8
    pop     r12
    pop     rbx
    ret
3:  STR     rdi, "read_entry: the hypervisor refused a read-only mapping of a table"
    jmp     mm_fatal

/* ---- pages ------------------------------------------------------------------ */

    .globl  frame_zero
frame_zero:
    xor     eax, eax
    mov     ecx, ENTRIES_PER_TABLE
    rep stosq
    ret

    .globl  frame_fill
frame_fill:
    mov     rax, rsi
    mov     rdx, PATTERN_STEP
    mov     ecx, ENTRIES_PER_TABLE
1:  mov     [rdi], rax
    add     rax, rdx
    add     rdi, 8
    dec     ecx
    jnz     1b
    ret

    .globl  frame_mismatches
frame_mismatches:
    mov     r8, rsi
    mov     rdx, PATTERN_STEP
    mov     ecx, ENTRIES_PER_TABLE
    xor     eax, eax
1:  cmp     [rdi], r8
    je      2f
    inc     eax
2:  add     r8, rdx
    add     rdi, 8
    dec     ecx
    jnz     1b
    ret

/* ---- probes ---------------------------------------------------------------- */

    .globl  probe_read
probe_read:
    mov     qword ptr [rip + mm_probe_active], 1
probe_read_insn:
    mov     rdx, [rdi]                      /* may fault: the handler resumes */
    mov     qword ptr [rip + mm_probe_active], 0    /* at probe_faulted */
    mov     eax, 1
    ret

    .globl  probe_write
probe_write:
    mov     qword ptr [rip + mm_probe_active], 1
probe_write_insn:
    mov     [rdi], rsi
    mov     qword ptr [rip + mm_probe_active], 0
    mov     eax, 1
    ret

probe_faulted:
    mov     qword ptr [rip + mm_probe_active], 0
    xor     eax, eax
    xor     edx, edx
    ret

/* #PF: [rsp] = error code, [rsp + 8] = RIP (after BOUNCE_ENTRY).  A probe
 * resumes at probe_faulted; anything else is a bug of the guest: fatal. */
    .globl  mm_page_fault_handler
mm_page_fault_handler:
    BOUNCE_ENTRY
    push    rax
    push    rcx
    cmp     qword ptr [rip + mm_probe_active], 0
    je      1f
    mov     rax, [rsp + 24]                 /* RIP */
    lea     rcx, [rip + probe_read_insn]
    cmp     rax, rcx
    je      2f
    lea     rcx, [rip + probe_write_insn]
    cmp     rax, rcx
    jne     1f
2:  mov     rax, [rsp + 16]
    mov     [rip + mm_probe_error], rax
    mov     rax, cr2
    mov     [rip + mm_probe_cr2], rax
    lea     rax, [rip + probe_faulted]
    mov     [rsp + 24], rax
    pop     rcx
    pop     rax
    add     rsp, 8                          /* drop the error code */
    BOUNCE_IRET
1:  call    con_begin
    STR     rdi, "unexpected page fault at rip "
    call    con_str
    mov     rdi, [rsp + 24]
    call    con_hex
    STR     rdi, ", cr2 "
    call    con_str
    mov     rdi, cr2
    call    con_hex
    STR     rdi, ", error code "
    call    con_str
    mov     rdi, [rsp + 16]
    call    con_hex
    call    con_end
    mov     edi, MM_FATAL_CODE
    jmp     shutdown

/* mm_fatal(rdi = message): print it and shut down with MM_FATAL_CODE. */
    .globl  mm_fatal
mm_fatal:
    call    con_line
    mov     edi, MM_FATAL_CODE
    jmp     shutdown
