/*
 * pv_smp: two vCPUs, event channels, IPIs and timers.
 *
 * vCPU0 registers its event callback (set_callbacks), binds an IPI port and
 * a VIRQ_TIMER port to itself, and starts vCPU1 with VCPUOP_initialise +
 * VCPUOP_up.  vCPU1 binds its own two ports.  Then both vCPUs run
 * vcpu_main:
 *   - K rounds of: BATCHES x (BATCH "lock inc" of a shared counter, then
 *     SCHEDOP_yield), then one IPI to the other vCPU;
 *   - a one-shot timer (set_timer_op) re-armed from the event handler
 *     until it has ticked T times;
 *   - finally SCHEDOP_block until this vCPU has had T ticks and K IPIs.
 * vCPU1 then sets its "done" flag and goes down; vCPU0 waits for it, checks
 * every count, prints them and shuts the domain down.
 *
 * Event channels in short (docs/pv-abi.md, "Events"): sending on port p
 * sets bit p of shared_info.evtchn_pending; if the port is not masked, the
 * hypervisor sets bit p/64 of evtchn_pending_sel and evtchn_upcall_pending
 * in the vcpu_info of the vCPU the port is bound to, and enters that vCPU's
 * event callback (the upcall) through a bounce frame, with
 * evtchn_upcall_mask set; HYPERVISOR_iret clears it again.
 * An IPI port bound by vCPU X notifies vCPU X, so "send an IPI to X" means
 * "send on X's port".  A pending bit is one bit: two sends before the
 * handler runs make one event.  So a sender waits until the receiver's
 * handler has counted each IPI (the receiver's `ipis` counter is the
 * acknowledgement) before it sends the next; then every IPI is counted
 * exactly once.
 *
 * Both vCPUs' ports live in the same evtchn_pending word, so each handler
 * only takes the bits of its own ports (port_bits) and leaves the others'.
 *
 * Checks (the shutdown code is the number of the first one that failed):
 *   1  set_callbacks returned 0
 *   2  vCPU0 bound and unmasked its two ports
 *   3  VCPUOP_initialise(1) returned 0      4  VCPUOP_up(1) returned 0
 *   5  vCPU1 bound its ports in time        6  ... and without error
 *   7  vCPU1 finished in time
 *   8  counter = 2 x N
 *   9  vCPU0 ticks = T    10  vCPU0 IPIs = K
 *  11  vCPU1 ticks = T    12  vCPU1 IPIs = K
 *  13  no EVTCHNOP_send failed              14  no IPI went unacknowledged
 * A lost event can also leave a vCPU blocked for ever: then the domain never
 * shuts down and the scenario's virtual_time limit ends the run.
 */
    .intel_syntax noprefix
    .include "xen.inc"

    .equ    N,              100000      /* counter increments per vCPU */
    .equ    K,              50          /* IPIs each vCPU sends (and receives) */
    .equ    T,              20          /* timer ticks per vCPU */
    .equ    BATCH,          500         /* increments between two yields */
    .equ    BATCHES,        N / K / BATCH   /* batches per round (one IPI per round) */
    .equ    TIMER_PERIOD,   100000      /* ns: 100 us of virtual time */
    .equ    WAIT_TIMEOUT,   1000000000  /* ns: give up a busy wait after 1 s */
    .equ    SPINS,          10000       /* pause loops between two yields */
    .equ    VCPU1_STACK_PAGES, 4

    .if     BATCHES * BATCH * K - N
    .error  "N must be a multiple of K * BATCH"
    .endif

/* struct percpu: what each vCPU keeps about itself (one 128-byte block each). */
    .equ    PC_VCPU_ID,     0
    .equ    PC_VCPU_INFO,   8           /* &shared_info.vcpu_info[id] */
    .equ    PC_IPI_PORT,    16
    .equ    PC_TIMER_PORT,  24
    .equ    PC_PORT_BITS,   32          /* 1 << ipi_port | 1 << timer_port */
    .equ    PC_BIND_RESULT, 40          /* 0, or what went wrong binding */
    .equ    PC_READY,       48          /* ports bound: others may send */
    .equ    PC_DONE,        56          /* vcpu_main finished */
    .equ    PC_TICKS,       64          /* VIRQ_TIMER events handled */
    .equ    PC_IPIS,        72          /* IPIs handled = acknowledgements */
    .equ    PC_SENT,        80          /* IPIs sent to the other vCPU */
    .equ    PC_SEND_ERRORS, 88          /* EVTCHNOP_send that failed */
    .equ    PC_ACK_TIMEOUTS, 96         /* IPIs never acknowledged */
    .equ    PERCPU_SIZE,    128

    .section .rodata
    .globl  guest_name
guest_name: .asciz "pv_smp"

    .bss
    .balign 64
percpu0:    .skip PERCPU_SIZE
percpu1:    .skip PERCPU_SIZE
counter:    .skip 8                     /* incremented by both vCPUs */
start_info: .skip 8
shared_info: .skip 8                    /* where xen_entry mapped it */
    .balign 8
vcpu1_context: .skip VCPU_GUEST_CONTEXT_SIZE    /* for VCPUOP_initialise */
    .balign PAGE_SIZE
vcpu1_stack:   .skip VCPU1_STACK_PAGES * PAGE_SIZE
vcpu1_stack_top:

/* ======================================================================== */
/* vCPU0: boot, bring up vCPU1, work, check.                                */
/* ======================================================================== */

    .section .text.entry, "ax"
    .globl  _start
_start:
    mov     [rip + start_info], rsi
    lea     rax, [rip + shared_info_page]   /* mapped there by xen_entry */
    mov     [rip + shared_info], rax
    PRINT   "vcpu0: binding event channels, then starting vcpu1"

/* 1: our event callback.  (vCPU1 gets its own through VCPUOP_initialise.) */
    lea     rdi, [rip + upcall_vcpu0]   /* event */
    xor     esi, esi                    /* failsafe: none */
    xor     edx, edx                    /* syscall: none */
    HYPERCALL set_callbacks
    mov     rdi, rax
    xor     esi, esi
    CHECK_DEC 1, "set_callbacks returned"

/* 2: our IPI and timer ports. */
    lea     rbx, [rip + percpu0]
    mov     rdi, rbx
    xor     esi, esi
    call    bind_my_ports
    mov     rdi, [rbx + PC_BIND_RESULT]
    xor     esi, esi
    CHECK_DEC 2, "vcpu0 port binding result"
    test    eax, eax
    jz      finish
    mov     rdi, rbx
    call    print_ports

/* 3, 4: start vCPU1. */
    call    start_vcpu1
    test    eax, eax
    jz      finish

/* 5, 6: wait for vCPU1 to bind its ports (events still masked here). */
    lea     rdi, [rip + percpu1 + PC_READY]
    mov     esi, 1
    call    wait_until
    mov     rdi, rax
    xor     esi, esi
    CHECK_DEC 5, "vcpu1 ready (0 = in time)"
    test    eax, eax
    jz      finish
    lea     rbx, [rip + percpu1]
    mov     rdi, [rbx + PC_BIND_RESULT]
    xor     esi, esi
    CHECK_DEC 6, "vcpu1 port binding result"
    test    eax, eax
    jz      finish
    mov     rdi, rbx
    call    print_ports

/* The work itself, then wait for vCPU1 to finish its share. */
    PRINT   "vcpu0: counting, sending IPIs, taking timer ticks"
    lea     rdi, [rip + percpu0]
    lea     rsi, [rip + percpu1]
    call    vcpu_main
    lea     rdi, [rip + percpu1 + PC_DONE]
    mov     esi, 1
    call    wait_until
    mov     rdi, rax
    xor     esi, esi
    CHECK_DEC 7, "vcpu1 finished (0 = in time)"

    call    print_summary

/* 8-14: the counts. */
    mov     rdi, [rip + counter]
    mov     esi, 2 * N
    CHECK_DEC 8, "counter"
    lea     rbx, [rip + percpu0]
    lea     rbp, [rip + percpu1]
    mov     rdi, [rbx + PC_TICKS]
    mov     esi, T
    CHECK_DEC 9, "vcpu0 timer ticks"
    mov     rdi, [rbx + PC_IPIS]
    mov     esi, K
    CHECK_DEC 10, "vcpu0 IPIs received"
    mov     rdi, [rbp + PC_TICKS]
    mov     esi, T
    CHECK_DEC 11, "vcpu1 timer ticks"
    mov     rdi, [rbp + PC_IPIS]
    mov     esi, K
    CHECK_DEC 12, "vcpu1 IPIs received"
    mov     rdi, [rbx + PC_SEND_ERRORS]
    add     rdi, [rbp + PC_SEND_ERRORS]
    xor     esi, esi
    CHECK_DEC 13, "failed EVTCHNOP_send"
    mov     rdi, [rbx + PC_ACK_TIMEOUTS]
    add     rdi, [rbp + PC_ACK_TIMEOUTS]
    xor     esi, esi
    CHECK_DEC 14, "IPIs never acknowledged"
    jmp     finish

    .text

/* start_vcpu1() -> eax = 1 if vCPU1 was started (checks 3 and 4). */
start_vcpu1:
    lea     rdi, [rip + vcpu1_context]  /* zero-filled: only set what matters */
    mov     qword ptr [rdi + VGC_FLAGS], VGCF_IN_KERNEL
    lea     rax, [rip + vcpu1_entry]
    mov     [rdi + VGC_RIP], rax
    lea     rax, [rip + vcpu1_stack_top]
    mov     [rdi + VGC_RSP], rax
    mov     [rdi + VGC_KERNEL_SP], rax
    mov     qword ptr [rdi + VGC_KERNEL_SS], FLAT_KERNEL_SS
    mov     qword ptr [rdi + VGC_RFLAGS], 0x2   /* reserved bit 1 (Xen sets IF) */
    mov     word ptr [rdi + VGC_CS], FLAT_KERNEL_CS    /* Xen's flat ring-3 selectors; */
    mov     word ptr [rdi + VGC_SS], FLAT_KERNEL_SS    /* DS and ES stay null */
    lea     rax, [rip + upcall_vcpu1]
    mov     [rdi + VGC_EVENT_CALLBACK], rax
    /* ctrlreg[3]: the machine address of our L4, which vCPU1 shares.
     * Page tables are in machine frames: cr3 = mfn_list[pfn(pt_base)] << 12. */
    mov     rsi, [rip + start_info]
    mov     rax, [rsi + SI_PT_BASE]
    mov     rcx, VIRT_BASE
    sub     rax, rcx
    shr     rax, PAGE_SHIFT
    mov     rcx, [rsi + SI_MFN_LIST]
    mov     rax, [rcx + rax * 8]
    shl     rax, PAGE_SHIFT
    mov     [rdi + VGC_CR3], rax

    mov     rdx, rdi
    mov     edi, VCPUOP_initialise
    mov     esi, 1
    HYPERCALL vcpu_op
    mov     rdi, rax
    xor     esi, esi
    CHECK_DEC 3, "VCPUOP_initialise(1) returned"
    test    eax, eax
    jz      1f
    mov     edi, VCPUOP_up
    mov     esi, 1
    xor     edx, edx
    HYPERCALL vcpu_op
    mov     rdi, rax
    xor     esi, esi
    CHECK_DEC 4, "VCPUOP_up(1) returned"
1:  ret

/* ======================================================================== */
/* vCPU1: starts here with the context vCPU0 gave it.                       */
/* ======================================================================== */

vcpu1_entry:
    lea     rbx, [rip + percpu1]
    mov     rdi, rbx
    mov     esi, 1
    call    bind_my_ports
    mov     qword ptr [rbx + PC_READY], 1   /* x86 keeps stores in order: the */
                                            /* ports are visible before this */
    cmp     qword ptr [rbx + PC_BIND_RESULT], 0
    jne     vcpu1_stop                      /* vCPU0 reports it */
    mov     rdi, rbx
    lea     rsi, [rip + percpu0]
    call    vcpu_main
    mov     qword ptr [rbx + PC_DONE], 1
vcpu1_stop:
    mov     edi, VCPUOP_down            /* take ourselves offline */
    mov     esi, 1
    xor     edx, edx
    HYPERCALL vcpu_op
1:  mov     edi, SCHEDOP_block          /* in case down returned: sleep */
    xor     esi, esi
    HYPERCALL sched_op
    jmp     1b

/* ======================================================================== */
/* What both vCPUs do.                                                      */
/* ======================================================================== */

/* bind_my_ports(rdi = percpu, esi = vcpu id): fill in the percpu block, bind
 * an IPI port and VIRQ_TIMER to this vCPU and unmask both.  The result goes
 * to PC_BIND_RESULT: 0, a hypercall's negative errno, or 1 if a port is
 * above 63 (the event handler only scans evtchn_pending[0]). */
bind_my_ports:
    push    rbx
    mov     rbx, rdi
    mov     [rbx + PC_VCPU_ID], rsi
    shl     rsi, 6                      /* vcpu_info[id]: 64 bytes each */
    add     rsi, [rip + shared_info]
    mov     [rbx + PC_VCPU_INFO], rsi
    mov     byte ptr [rsi + VI_UPCALL_MASK], 1  /* no upcall until vcpu_main */
    sub     rsp, 16                     /* room for the argument structs */

    mov     eax, [rbx + PC_VCPU_ID]     /* bind_ipi { vcpu, port (out) } */
    mov     dword ptr [rsp + EVTCHN_BIND_IPI_VCPU], eax
    mov     dword ptr [rsp + EVTCHN_BIND_IPI_PORT], 0
    mov     edi, EVTCHNOP_bind_ipi
    mov     rsi, rsp
    HYPERCALL event_channel_op
    test    rax, rax
    jnz     9f
    mov     eax, [rsp + EVTCHN_BIND_IPI_PORT]
    mov     [rbx + PC_IPI_PORT], rax

    mov     dword ptr [rsp + EVTCHN_BIND_VIRQ_VIRQ], VIRQ_TIMER
    mov     eax, [rbx + PC_VCPU_ID]     /* bind_virq { virq, vcpu, port (out) } */
    mov     dword ptr [rsp + EVTCHN_BIND_VIRQ_VCPU], eax
    mov     dword ptr [rsp + EVTCHN_BIND_VIRQ_PORT], 0
    mov     edi, EVTCHNOP_bind_virq
    mov     rsi, rsp
    HYPERCALL event_channel_op
    test    rax, rax
    jnz     9f
    mov     eax, [rsp + EVTCHN_BIND_VIRQ_PORT]
    mov     [rbx + PC_TIMER_PORT], rax

    mov     eax, 1                      /* both ports in evtchn_pending[0]? */
    cmp     qword ptr [rbx + PC_IPI_PORT], 63
    ja      9f
    cmp     qword ptr [rbx + PC_TIMER_PORT], 63
    ja      9f
    xor     eax, eax
    mov     rcx, [rbx + PC_IPI_PORT]
    bts     rax, rcx
    mov     rcx, [rbx + PC_TIMER_PORT]
    bts     rax, rcx
    mov     [rbx + PC_PORT_BITS], rax

    mov     eax, [rbx + PC_IPI_PORT]    /* unmask { port } */
    mov     [rsp], eax
    mov     edi, EVTCHNOP_unmask
    mov     rsi, rsp
    HYPERCALL event_channel_op
    test    rax, rax
    jnz     9f
    mov     eax, [rbx + PC_TIMER_PORT]
    mov     [rsp], eax
    mov     edi, EVTCHNOP_unmask
    mov     rsi, rsp
    HYPERCALL event_channel_op

9:  mov     [rbx + PC_BIND_RESULT], rax
    add     rsp, 16
    pop     rbx
    ret

/* vcpu_main(rdi = my percpu, rsi = the other vCPU's percpu). */
vcpu_main:
    push    rbx
    push    rbp
    push    r12
    push    r13
    push    r14
    push    r15
    mov     rbx, rdi
    mov     rbp, rsi
    mov     r12, [rbx + PC_VCPU_INFO]

    mov     byte ptr [r12 + VI_UPCALL_MASK], 0  /* events on */
    call    arm_timer                   /* the first tick */

    mov     r14d, K                     /* rounds: one IPI each */
1:  mov     r15d, BATCHES
2:  mov     ecx, BATCH
3:  lock inc qword ptr [rip + counter]
    dec     ecx
    jnz     3b
    mov     edi, SCHEDOP_yield          /* let others run, take events */
    xor     esi, esi
    HYPERCALL sched_op
    dec     r15d
    jnz     2b

    /* One IPI: EVTCHNOP_send on the other vCPU's IPI port ... */
    inc     qword ptr [rbx + PC_SENT]
    sub     rsp, 16
    mov     eax, [rbp + PC_IPI_PORT]
    mov     [rsp], eax                  /* struct evtchn_send { port } */
    mov     edi, EVTCHNOP_send
    mov     rsi, rsp
    HYPERCALL event_channel_op
    add     rsp, 16
    test    rax, rax
    jz      4f
    inc     qword ptr [rbx + PC_SEND_ERRORS]
    /* ... and wait until its handler has counted it. */
4:  lea     rdi, [rbp + PC_IPIS]
    mov     rsi, [rbx + PC_SENT]
    call    wait_until
    test    eax, eax
    jz      5f
    inc     qword ptr [rbx + PC_ACK_TIMEOUTS]
5:  dec     r14d
    jnz     1b

    /* Sleep until our own T ticks and K IPIs have come in.  Mask events
     * before testing, so that none slips in between the test and the
     * block; SCHEDOP_block unmasks them and returns once one is pending. */
6:  mov     byte ptr [r12 + VI_UPCALL_MASK], 1
    cmp     qword ptr [rbx + PC_TICKS], T
    jb      7f
    cmp     qword ptr [rbx + PC_IPIS], K
    jae     8f
7:  mov     edi, SCHEDOP_block
    xor     esi, esi
    HYPERCALL sched_op
    jmp     6b
8:  mov     byte ptr [r12 + VI_UPCALL_MASK], 0

    pop     r15
    pop     r14
    pop     r13
    pop     r12
    pop     rbp
    pop     rbx
    ret

/* wait_until(rdi = &u64, rsi = value) -> eax = 0 once [rdi] >= value, or 1
 * after WAIT_TIMEOUT ns.  For things no event announces (the other vCPU's
 * flags and counters): spin a little, yield, look at the clock, again. */
wait_until:
    push    rbx
    push    r12
    push    r13
    mov     rbx, rdi
    mov     r12, rsi
    rdtsc                               /* edx:eax = now, in ns */
    shl     rdx, 32
    or      rax, rdx
    lea     r13, [rax + WAIT_TIMEOUT]   /* r13 = deadline */
1:  mov     ecx, SPINS
2:  cmp     [rbx], r12
    jae     3f
    pause
    dec     ecx
    jnz     2b
    mov     edi, SCHEDOP_yield
    xor     esi, esi
    HYPERCALL sched_op
    rdtsc
    shl     rdx, 32
    or      rax, rdx
    cmp     rax, r13
    jb      1b
    mov     eax, 1
    jmp     4f
3:  xor     eax, eax
4:  pop     r13
    pop     r12
    pop     rbx
    ret

/* arm_timer(): one VIRQ_TIMER on this vCPU TIMER_PERIOD ns from now. */
arm_timer:
    rdtsc
    shl     rdx, 32
    or      rax, rdx
    lea     rdi, [rax + TIMER_PERIOD]   /* set_timer_op(deadline) */
    HYPERCALL set_timer_op
    ret

/* ======================================================================== */
/* The event upcall.                                                        */
/* ======================================================================== */

/* Entered through Xen's bounce frame (RCX, R11, RIP, CS, RFLAGS, RSP, SS on
 * the current stack) with evtchn_upcall_mask = 1.  Event callbacks are per
 * vCPU, so each vCPU has its own entry, which only says whose percpu block
 * to use. */
upcall_vcpu0:
    BOUNCE_ENTRY
    push    rbx
    lea     rbx, [rip + percpu0]
    jmp     event_upcall
upcall_vcpu1:
    BOUNCE_ENTRY
    push    rbx
    lea     rbx, [rip + percpu1]
    jmp     event_upcall

/* event_upcall(rbx = percpu; the interrupted rbx is on the stack). */
event_upcall:
    push    rax                         /* we interrupted arbitrary code: */
    push    rcx                         /* save everything we touch */
    push    rdx
    push    rsi
    push    rdi
    push    r8
    push    r9
    push    r10
    push    r11
    push    r12
    mov     r12, [rbx + PC_VCPU_INFO]

    mov     byte ptr [r12 + VI_UPCALL_PENDING], 0   /* 1. seen */
    xor     eax, eax
    xchg    [r12 + VI_PENDING_SEL], rax /* 2. take the selector (xchg is atomic) */
    test    al, 1                       /* our ports are all in word 0 */
    jz      3f

1:  mov     rsi, [rip + shared_info]    /* 3. our pending, unmasked ports */
    mov     rax, [rsi + SH_EVTCHN_PENDING]
    mov     rcx, [rsi + SH_EVTCHN_MASK]
    not     rcx
    and     rax, rcx
    and     rax, [rbx + PC_PORT_BITS]
    jz      3f
    bsf     rcx, rax                    /* rcx = the lowest such port */
    lock btr qword ptr [rsi + SH_EVTCHN_PENDING], rcx  /* 4. clear it, atomically */
    cmp     rcx, [rbx + PC_TIMER_PORT]  /* 5. and count it */
    jne     2f
    call    on_timer
    jmp     1b
2:  cmp     rcx, [rbx + PC_IPI_PORT]
    jne     1b
    lock inc qword ptr [rbx + PC_IPIS]  /* the sender is watching this */
    jmp     1b

3:  pop     r12                         /* 6. events on again: HYPERVISOR_iret */
    pop     r11
    pop     r10
    pop     r9
    pop     r8
    pop     rdi
    pop     rsi
    pop     rdx
    pop     rcx
    pop     rax
    pop     rbx
    BOUNCE_IRET                         /* the frame's IF is set: unmasks */

/* on_timer(rbx = percpu): count the tick; re-arm until T ticks. */
on_timer:
    inc     qword ptr [rbx + PC_TICKS]
    cmp     qword ptr [rbx + PC_TICKS], T
    jb      arm_timer                   /* tail call */
    ret

/* ======================================================================== */
/* Printing (vCPU0 only: the line buffer is shared).                        */
/* ======================================================================== */

/* print_ports(rdi = percpu): "vcpuN: ipi port P, timer port Q" */
print_ports:
    push    rbx
    mov     rbx, rdi
    call    con_begin
    STR     rdi, "vcpu"
    call    con_str
    mov     rdi, [rbx + PC_VCPU_ID]
    call    con_dec
    STR     rdi, ": ipi port "
    call    con_str
    mov     rdi, [rbx + PC_IPI_PORT]
    call    con_dec
    STR     rdi, ", timer port "
    call    con_str
    mov     rdi, [rbx + PC_TIMER_PORT]
    call    con_dec
    call    con_end
    pop     rbx
    ret

/* print_summary(): "vcpu0 ticks=20 ipis=50; vcpu1 ticks=20 ipis=50; counter=200000" */
print_summary:
    push    rbx
    call    con_begin
    lea     rbx, [rip + percpu0]
    call    print_vcpu_counts
    lea     rbx, [rip + percpu1]
    call    print_vcpu_counts
    STR     rdi, "counter="
    call    con_str
    mov     rdi, [rip + counter]
    call    con_dec
    call    con_end
    pop     rbx
    ret

print_vcpu_counts:                      /* rbx = percpu */
    STR     rdi, "vcpu"
    call    con_str
    mov     rdi, [rbx + PC_VCPU_ID]
    call    con_dec
    STR     rdi, " ticks="
    call    con_str
    mov     rdi, [rbx + PC_TICKS]
    call    con_dec
    STR     rdi, " ipis="
    call    con_str
    mov     rdi, [rbx + PC_IPIS]
    call    con_dec
    STR     rdi, "; "
    jmp     con_str
