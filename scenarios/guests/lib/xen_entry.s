/*
 * xen_entry.s: where Xen starts an hvlab PV kernel (its ENTRY note), before _start.
 *
 * Two things every kernel on Xen's PV ABI does first, as Linux does in
 * xen_start_kernel:
 *
 * - map shared_info.  It is not in the start-of-day mapping: start_info
 *   holds its machine address and the kernel maps it itself (Linux:
 *   set_fixmap).  Here it goes at the page `shared_info_page`, a page of our
 *   .bss whose own frame then stays unmapped (update_va_mapping replaces
 *   its L1 entry);
 * - publish its P2M list in shared_info's arch part (max_pfn, p2m_cr3,
 *   p2m_vaddr: Linux's xen_setup_mfn_list_list), which is how a saver
 *   finds it.  Our list stays where the builder put it (start_info.mfn_list,
 *   mapped through the bootstrap L4).
 *
 * Then _start runs with rsi = start_info and rsp as Xen left them.  If the
 * hypervisor refuses the mapping, the kernel says so and shuts down with
 * code XEN_ENTRY_FAILED.
 */
    .intel_syntax noprefix
    .include "xen.inc"

    .equ    XEN_ENTRY_FAILED,   254

    .bss
    .balign PAGE_SIZE
    .globl  shared_info_page
shared_info_page:
    .skip   PAGE_SIZE

    .section .text.entry, "ax"
    .globl  xen_entry
xen_entry:
    mov     r12, rsi
    mov     rsi, [r12 + SI_SHARED_INFO]
    or      rsi, PTE_DATA_RW
    lea     rdi, [rip + shared_info_page]
    mov     edx, UVMF_INVLPG
    HYPERCALL update_va_mapping
    test    rax, rax
    jnz     1f

    lea     rdx, [rip + shared_info_page]
    mov     rax, [r12 + SI_NR_PAGES]
    mov     [rdx + SH_ARCH_MAX_PFN], rax
    mov     rax, [r12 + SI_PT_BASE]         /* p2m_cr3: our L4's machine address */
    mov     rcx, VIRT_BASE
    sub     rax, rcx
    shr     rax, PAGE_SHIFT
    mov     rcx, [r12 + SI_MFN_LIST]
    mov     rax, [rcx + rax * 8]
    shl     rax, PAGE_SHIFT
    mov     [rdx + SH_ARCH_P2M_CR3], rax
    mov     [rdx + SH_ARCH_P2M_VADDR], rcx

    mov     rsi, r12                        /* _start sees what Xen gave us */
    xor     eax, eax
    xor     ecx, ecx
    xor     edx, edx
    xor     edi, edi
    xor     r11d, r11d
    xor     r12d, r12d
    jmp     _start

1:  PRINT   "xen_entry: the hypervisor refused to map shared_info"
    mov     edi, XEN_ENTRY_FAILED
    jmp     shutdown
