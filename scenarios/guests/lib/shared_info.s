/*
 * shared_info.s: map the hypervisor's shared_info page.
 *
 * On Xen's PV ABI shared_info is not part of the start-of-day mapping:
 * start_info.shared_info holds its machine address and the kernel maps it
 * itself (Linux: set_fixmap(FIX_PARAVIRT_BOOTMAP)).  Here it goes at the
 * page `shared_info_page`, a page of our .bss whose own frame then stays
 * unmapped: update_va_mapping replaces its L1 entry.
 *
 *   map_shared_info(rdi = start_info) -> rax = the hypercall's result (0 ok)
 */
    .intel_syntax noprefix
    .include "xen.inc"

    .bss
    .balign PAGE_SIZE
    .globl  shared_info_page
shared_info_page:
    .skip   PAGE_SIZE

    .text
    .globl  map_shared_info
map_shared_info:
    mov     rsi, [rdi + SI_SHARED_INFO]
    or      rsi, PTE_DATA_RW
    lea     rdi, [rip + shared_info_page]
    mov     edx, UVMF_INVLPG
    HYPERCALL update_va_mapping
    ret
