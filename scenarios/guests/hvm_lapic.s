/*
 * hvm_lapic: two HVM vCPUs, their xAPICs, IPIs, device interrupts and a
 * memory workload.
 *
 * Both vCPUs start at _start (rdi = APIC id).  vCPU0 fills the IDT the
 * builder loaded; vCPU1 waits for it.  Then each vCPU:
 *   - points GS at its own per-CPU block (wrmsr GS_BASE), so the interrupt
 *     handlers, shared by both, count into the right block;
 *   - enables its LAPIC (SVR), unmasks the LVT error entry and starts a
 *     periodic LAPIC timer (TIMER_VECTOR every TIMER_PERIOD ns, divide by 1);
 *   - runs passes of a memory workload with a running checksum: write a
 *     32 KiB buffer, summing what it wrote, read it back, summing what it
 *     reads; the sums must agree, which they do only if no interrupt handler
 *     clobbered a register or the buffer;
 *   - plays IPI ping-pong: vCPU0 sends PING to APIC 1 (ICR, fixed, physical
 *     destination), vCPU1's handler counts it and vCPU1 answers with PONG to
 *     APIC 0; vCPU0 sends the next ping only after the pong came back, so
 *     no IPI can coalesce with another;
 *   - counts device interrupts (the scenario's sources: "disk" posts
 *     DISK_VECTOR to vCPU0 DISK_COUNT times, "nic" NIC_VECTOR to vCPU1
 *     NIC_COUNT times; their periods are far above the handler time).
 *     Two posts of one vector that find the vCPU not running (a live
 *     update's blackout longer than a period, say) merge in PIR into one
 *     interrupt, as on hardware.  So, as a driver of a periodic device
 *     does, the handler also reckons from rdtsc how many occurrences are
 *     due by now (the device's start and period are known, as its counts
 *     are); the share is done once all are accounted for, and the report
 *     says how many interrupts were taken and how many merged;
 *   - after MIN_PASSES passes, sleeps in `hlt` between interrupts until its
 *     share is done, then stops its timer and compares its tick count with
 *     the time the timer ran (rdtsc is virtual time, 1 ns per instruction).
 * Waiting for the other vCPU also sleeps in `hlt` (the timer wakes it every
 * period to look again), so a waiting vCPU costs no host time.
 * vCPU0 also writes a reserved LAPIC register (0x3F0), which must set
 * "illegal register address" in ESR and raise one LVT error interrupt, and
 * nothing else.  vCPU1 then goes down (cli; hlt); vCPU0 checks and prints
 * everything and shuts the domain down with the number of the first failed
 * check (0: all passed).
 *
 * Every handler EOIs (except the spurious one, which must not) and returns
 * with iretq; the handlers change no register, only their counters.
 *
 * Checks:
 *   1  hvm_start_info magic          2  vcpu0 LAPIC id = 0
 *   3  vcpu1 LAPIC id = 1            4  LAPIC version = 0x50014
 *   5  ESR after a reserved-register write = 0x80
 *   6  LVT error interrupts = 1      7  vcpu1 came up in time
 *   8  vcpu1 finished in time
 *   9  vcpu0 ticks within 1 of elapsed / period    10  same for vcpu1
 *  11  vcpu0 IPIs sent = K           12  vcpu0 IPIs received = K
 *  13  vcpu1 IPIs sent = K           14  vcpu1 IPIs received = K
 *  15  disk occurrences accounted = DISK_COUNT
 *  16  nic occurrences accounted = NIC_COUNT
 *  17  workload checksum mismatches = 0
 *  18  spurious interrupts = 0
 *  19  device interrupts taken beyond the occurrences due = 0
 */
    .intel_syntax noprefix
    .include "xen.inc"
    .include "hvm.inc"

    .equ    NR_VCPUS,       2
    .equ    TIMER_VECTOR,   0x40
    .equ    PING_VECTOR,    0x41        /* vCPU0 -> vCPU1 */
    .equ    PONG_VECTOR,    0x42        /* vCPU1 -> vCPU0 */
    .equ    DISK_VECTOR,    0x50        /* scenario source "disk", vCPU0 */
    .equ    NIC_VECTOR,     0x51        /* scenario source "nic", vCPU1 */
    .equ    ERROR_VECTOR,   0xFE
    .equ    SPURIOUS_VECTOR, 0xFF
    .equ    TIMER_PERIOD,   50000       /* timer ticks = ns at divide by 1 */
    .equ    K,              50          /* ping-pong rounds */
    .equ    DISK_COUNT,     100         /* as in scenarios/hvm-lapic.toml */
    .equ    NIC_COUNT,      150
    .equ    DISK_START,     200000      /* ns, as in scenarios/hvm-lapic.toml */
    .equ    NIC_START,      200000
.ifdef SLOW_DEVICES                     /* hvm_lapic_slow: scenarios/hvm-lapic-slow.toml */
    .equ    DISK_PERIOD,    4000000
    .equ    NIC_PERIOD,     3000000
.else
    .equ    DISK_PERIOD,    50000
    .equ    NIC_PERIOD,     33000
.endif
    .equ    BUF_QWORDS,     4096        /* 32 KiB per vCPU */
    .equ    MIN_PASSES,     20          /* workload passes before sleeping */
    .equ    WAIT_TIMEOUT,   100000000   /* ns: give up a busy wait after 100 ms */
    .equ    RESERVED_APIC_REG, 0x3F0

/* struct percpu (one per vCPU, GS base points at it) */
    .equ    PC_ID,          0           /* APIC id given in rdi */
    .equ    PC_LAPIC_ID,    8           /* APIC ID register >> 24 */
    .equ    PC_TICKS,       16          /* timer interrupts */
    .equ    PC_SENT,        24          /* IPIs sent */
    .equ    PC_RECEIVED,    32          /* IPIs received */
    .equ    PC_DEVICE,      40          /* device interrupts */
    .equ    PC_PASSES,      48          /* workload passes */
    .equ    PC_BAD,         56          /* passes whose checksums disagreed */
    .equ    PC_T0,          64          /* rdtsc when the timer was started */
    .equ    PC_T1,          72          /* rdtsc when it was stopped */
    .equ    PC_READY,       80
    .equ    PC_DONE,        88
    .equ    PC_SPURIOUS,    96
    .equ    PC_ERRORS,      104         /* LVT error interrupts */
    .equ    PC_DEVICE_WANT, 112         /* device interrupts this vCPU expects */
    .equ    PC_BUF,         120         /* its workload buffer */
    .equ    PC_PEER,        128         /* APIC id of the other vCPU */
    .equ    PC_IPI_VECTOR,  136         /* the vector it sends */
    .equ    PC_PINGER,      144         /* 1: sends first (vCPU0) */
    .equ    PC_DEVICE_START, 152        /* its device's first occurrence (ns) */
    .equ    PC_DEVICE_PERIOD, 160
    .equ    PC_DEVICE_DUE,  168         /* occurrences due by the last interrupt */
    .equ    PERCPU_SIZE,    256

    .section .rodata
    .globl  guest_name
guest_name: .asciz "hvm_lapic"

    .bss
    .balign 64
percpus:    .skip NR_VCPUS * PERCPU_SIZE
idt_ready:  .skip 8
version:    .skip 8                     /* LAPIC version register */
esr_seen:   .skip 8                     /* ESR after the reserved write */
vcpu1_late: .skip 8                     /* 1: vCPU1 did not finish in time */
    .balign PAGE_SIZE
buffers:    .skip NR_VCPUS * BUF_QWORDS * 8

/* ======================================================================== */

    .section .text.entry, "ax"
    .globl  _start
_start:
    cmp     rdi, NR_VCPUS
    jae     park                        /* more vCPUs than this guest uses */
    mov     r12, rdi                    /* r12 = APIC id */
    mov     r13, rsi                    /* r13 = hvm_start_info */
    mov     rbx, rdi
    shl     rbx, 8                      /* PERCPU_SIZE = 256 */
    lea     rax, [rip + percpus]
    add     rbx, rax                    /* rbx = this vCPU's block */
    mov     ecx, MSR_GS_BASE
    mov     rax, rbx
    mov     rdx, rbx
    shr     rdx, 32
    wrmsr
    call    init_percpu
    test    r12, r12
    jnz     ap_start

/* vCPU0: check the start info, fill the IDT. */
    mov     edi, [r13 + HSI_MAGIC]
    mov     esi, HVM_START_MAGIC
    CHECK_HEX 1, "hvm_start_info magic"
    call    setup_idt
    mov     qword ptr [rip + idt_ready], 1
    jmp     common_start

ap_start:
1:  pause
    cmp     qword ptr [rip + idt_ready], 0
    je      1b

common_start:
    call    lapic_start
    sti
    mov     qword ptr gs:[PC_READY], 1
    test    r12, r12
    jnz     work

/* vCPU0: the reserved-register write, then wait for vCPU1. */
    LAPIC_READ APIC_VERSION
    mov     [rip + version], rax
    mov     eax, LAPIC_BASE
    mov     dword ptr [rax + RESERVED_APIC_REG], 0x1234    /* not a register */
    LAPIC_WRITE APIC_ESR, 0             /* latch the errors into ESR */
    LAPIC_READ APIC_ESR
    mov     [rip + esr_seen], rax
    lea     rdi, [rip + percpus + PERCPU_SIZE + PC_READY]
    call    wait_until_set
    mov     rdi, rax
    xor     esi, esi
    CHECK_DEC 7, "vcpu1 came up (0 = in time)"
    test    eax, eax
    jz      finish
    PRINT   "both vcpus up: timers, ping-pong, device interrupts, workload"

/* Both: the work, until this vCPU's share is done. */
work:
    cmp     qword ptr gs:[PC_PASSES], MIN_PASSES
    jae     1f
    call    memory_pass
    call    ipi_step
    jmp     work
1:  call    ipi_step
    cli                                 /* check and sleep without a race: */
    call    share_done                  /* an interrupt that arrives now is */
    test    eax, eax                    /* taken right after the hlt */
    jnz     2f
    sti
    hlt
    jmp     1b
2:  sti
    test    r12, r12
    jnz     stop_timer

/* vCPU0: wait for vCPU1 while its own timer still ticks (and wakes it). */
    lea     rdi, [rip + percpus + PERCPU_SIZE + PC_DONE]
    call    wait_until_set
    mov     [rip + vcpu1_late], rax

/* Stop the timer; a tick already in IRR is taken right after the write. */
stop_timer:
    rdtsc
    shl     rdx, 32
    or      rax, rdx
    mov     gs:[PC_T1], rax
    LAPIC_WRITE APIC_TIMER_INITIAL, 0
    nop
    nop
    mov     qword ptr gs:[PC_DONE], 1
    test    r12, r12
    jz      report
park:
    cli                                 /* vCPU1 (or a spare vCPU) goes down */
    hlt
    jmp     park

/* vCPU0: check everything. */
report:
    mov     rdi, [rip + vcpu1_late]
    xor     esi, esi
    CHECK_DEC 8, "vcpu1 finished (0 = in time)"
    lea     rbx, [rip + percpus]
    lea     rbp, [rip + percpus + PERCPU_SIZE]

    mov     rdi, [rbx + PC_LAPIC_ID]
    xor     esi, esi
    CHECK_DEC 2, "vcpu0 LAPIC id"
    mov     rdi, [rbp + PC_LAPIC_ID]
    mov     esi, 1
    CHECK_DEC 3, "vcpu1 LAPIC id"
    mov     rdi, [rip + version]
    mov     esi, 0x50014
    CHECK_HEX 4, "LAPIC version"
    mov     rdi, [rip + esr_seen]
    mov     esi, APIC_ESR_ILLEGAL_REG
    CHECK_HEX 5, "ESR after writing reserved register 0x3f0"
    mov     rdi, [rbx + PC_ERRORS]
    mov     esi, 1
    CHECK_DEC 6, "LVT error interrupts"

    mov     rdi, rbx
    mov     esi, 9
    call    check_ticks
    mov     rdi, rbp
    mov     esi, 10
    call    check_ticks

    mov     rdi, [rbx + PC_SENT]
    mov     esi, K
    CHECK_DEC 11, "vcpu0 IPIs sent"
    mov     rdi, [rbx + PC_RECEIVED]
    mov     esi, K
    CHECK_DEC 12, "vcpu0 IPIs received"
    mov     rdi, [rbp + PC_SENT]
    mov     esi, K
    CHECK_DEC 13, "vcpu1 IPIs sent"
    mov     rdi, [rbp + PC_RECEIVED]
    mov     esi, K
    CHECK_DEC 14, "vcpu1 IPIs received"
    mov     rdi, [rbx + PC_DEVICE_DUE]
    mov     esi, DISK_COUNT
    CHECK_DEC 15, "vcpu0 disk occurrences"
    mov     rdi, [rbp + PC_DEVICE_DUE]
    mov     esi, NIC_COUNT
    CHECK_DEC 16, "vcpu1 nic occurrences"
    mov     rdi, rbx
    call    report_device
    mov     rdi, rbp
    call    report_device
    mov     rdi, [rbx + PC_DEVICE]
    sub     rdi, [rbx + PC_DEVICE_DUE]
    xor     eax, eax
    test    rdi, rdi
    cmovs   rdi, rax                    /* taken beyond due, or 0 */
    mov     rcx, [rbp + PC_DEVICE]
    sub     rcx, [rbp + PC_DEVICE_DUE]
    cmovs   rcx, rax
    add     rdi, rcx
    xor     esi, esi
    CHECK_DEC 19, "device interrupts taken beyond the occurrences due"

    call    con_begin
    STR     rdi, "workload passes: vcpu0 "
    call    con_str
    mov     rdi, [rbx + PC_PASSES]
    call    con_dec
    STR     rdi, ", vcpu1 "
    call    con_str
    mov     rdi, [rbp + PC_PASSES]
    call    con_dec
    call    con_end
    mov     rdi, [rbx + PC_BAD]
    add     rdi, [rbp + PC_BAD]
    xor     esi, esi
    CHECK_DEC 17, "workload checksum mismatches"
    mov     rdi, [rbx + PC_SPURIOUS]
    add     rdi, [rbp + PC_SPURIOUS]
    xor     esi, esi
    CHECK_DEC 18, "spurious interrupts"
    jmp     finish

    .text

/* init_percpu(): this vCPU's fixed fields (rbx = block, r12 = APIC id). */
init_percpu:
    mov     gs:[PC_ID], r12
    mov     rax, r12
    imul    rax, rax, BUF_QWORDS * 8
    lea     rcx, [rip + buffers]
    add     rax, rcx
    mov     gs:[PC_BUF], rax
    mov     eax, 1
    sub     rax, r12
    mov     gs:[PC_PEER], rax           /* the other vCPU */
    mov     gs:[PC_PINGER], rax         /* vCPU0: 1 */
    mov     eax, PING_VECTOR
    mov     ecx, PONG_VECTOR
    test    r12, r12
    cmovnz  eax, ecx
    mov     gs:[PC_IPI_VECTOR], rax
    mov     eax, DISK_COUNT
    mov     ecx, NIC_COUNT
    cmovnz  eax, ecx
    mov     gs:[PC_DEVICE_WANT], rax
    mov     eax, DISK_START
    mov     ecx, NIC_START
    cmovnz  eax, ecx
    mov     gs:[PC_DEVICE_START], rax
    mov     eax, DISK_PERIOD
    mov     ecx, NIC_PERIOD
    cmovnz  eax, ecx
    mov     gs:[PC_DEVICE_PERIOD], rax
    ret

/* setup_idt(): one gate per vector this guest takes. */
setup_idt:
    SET_GATE TIMER_VECTOR, timer_handler
    SET_GATE PING_VECTOR, ipi_handler
    SET_GATE PONG_VECTOR, ipi_handler
    SET_GATE DISK_VECTOR, device_handler
    SET_GATE NIC_VECTOR, device_handler
    SET_GATE ERROR_VECTOR, error_handler
    SET_GATE SPURIOUS_VECTOR, spurious_handler
    ret

/* lapic_start(): enable the LAPIC, unmask LVT error, start the periodic timer. */
lapic_start:
    LAPIC_READ APIC_ID
    shr     eax, 24
    mov     gs:[PC_LAPIC_ID], rax
    LAPIC_WRITE APIC_SVR, APIC_SVR_ENABLE | SPURIOUS_VECTOR
    LAPIC_WRITE APIC_LVT_ERROR, ERROR_VECTOR
    LAPIC_WRITE APIC_TIMER_DIVIDE, APIC_DIVIDE_BY_1
    LAPIC_WRITE APIC_LVT_TIMER, APIC_LVT_PERIODIC | TIMER_VECTOR
    rdtsc
    shl     rdx, 32
    or      rax, rdx
    mov     gs:[PC_T0], rax
    LAPIC_WRITE APIC_TIMER_INITIAL, TIMER_PERIOD
    ret

/* memory_pass(): write the buffer, read it back, compare the two sums. */
memory_pass:
    mov     rdi, gs:[PC_BUF]
    mov     rsi, gs:[PC_PASSES]         /* a different pattern each pass */
    movabs  r8, 0x9E3779B97F4A7C15
    mov     ecx, BUF_QWORDS
    xor     r9d, r9d                    /* sum written */
1:  mov     rax, rcx
    imul    rax, r8
    xor     rax, rsi
    mov     [rdi + rcx * 8 - 8], rax
    add     r9, rax
    dec     rcx
    jnz     1b
    mov     ecx, BUF_QWORDS
    xor     r10d, r10d                  /* sum read */
2:  add     r10, [rdi + rcx * 8 - 8]
    dec     rcx
    jnz     2b
    cmp     r9, r10
    je      3f
    inc     qword ptr gs:[PC_BAD]
3:  inc     qword ptr gs:[PC_PASSES]
    ret

/* ipi_step(): send the next ping (vCPU0: once the last pong came back) or
 * pong (vCPU1: for each ping received). */
ipi_step:
    mov     rax, gs:[PC_SENT]
    cmp     qword ptr gs:[PC_PINGER], 0
    je      1f
    cmp     rax, K
    jae     9f
    cmp     rax, gs:[PC_RECEIVED]
    jne     9f
    jmp     2f
1:  cmp     rax, gs:[PC_RECEIVED]
    jae     9f
2:  mov     eax, LAPIC_BASE
    mov     edx, gs:[PC_PEER]
    shl     edx, 24
    mov     dword ptr [rax + APIC_ICR_HIGH], edx
    mov     edx, gs:[PC_IPI_VECTOR]     /* fixed, physical, edge, no shorthand */
    mov     dword ptr [rax + APIC_ICR_LOW], edx
    inc     qword ptr gs:[PC_SENT]
9:  ret

/* share_done() -> eax = 1 once this vCPU sent, received and took all it should. */
share_done:
    xor     eax, eax
    cmp     qword ptr gs:[PC_SENT], K
    jne     1f
    cmp     qword ptr gs:[PC_RECEIVED], K
    jne     1f
    mov     rcx, gs:[PC_DEVICE_DUE]
    cmp     rcx, gs:[PC_DEVICE_WANT]
    jne     1f
    mov     eax, 1
1:  ret

/* report_device(rdi = percpu block): "vcpuN device: T taken, M merged in PIR". */
report_device:
    push    rbx
    mov     rbx, rdi
    call    con_begin
    STR     rdi, "vcpu"
    call    con_str
    mov     rdi, [rbx + PC_ID]
    call    con_dec
    STR     rdi, " device interrupts: "
    call    con_str
    mov     rdi, [rbx + PC_DEVICE]
    call    con_dec
    STR     rdi, " taken, "
    call    con_str
    mov     rdi, [rbx + PC_DEVICE_DUE]
    sub     rdi, [rbx + PC_DEVICE]
    call    con_dec
    STR     rdi, " merged in PIR"
    call    con_str
    call    con_end
    pop     rbx
    ret

/* wait_until_set(rdi = &flag) -> rax = 0 once the flag is set, 1 on timeout.
 * Sleeps in hlt between checks: the caller's LAPIC timer must be running. */
wait_until_set:
    push    rbx
    push    r12
    mov     rbx, rdi
    rdtsc
    shl     rdx, 32
    or      rax, rdx
    lea     r12, [rax + WAIT_TIMEOUT]
1:  cli                                 /* check, then sleep, without a race */
    xor     eax, eax
    cmp     qword ptr [rbx], 0
    jne     2f
    rdtsc
    shl     rdx, 32
    or      rax, rdx
    cmp     rax, r12
    mov     eax, 1
    jae     2f
    sti
    hlt
    jmp     1b
2:  sti
    pop     r12
    pop     rbx
    ret

/* check_ticks(rdi = percpu block, esi = check code): print the vCPU's ticks
 * against (T1 - T0) / TIMER_PERIOD and check they differ by at most 1. */
check_ticks:
    push    rbx
    push    r12
    push    r13
    mov     rbx, rdi
    mov     r12d, esi
    mov     rax, [rbx + PC_T1]
    sub     rax, [rbx + PC_T0]
    xor     edx, edx
    mov     ecx, TIMER_PERIOD
    div     rcx
    mov     r13, rax                    /* expected ticks */
    call    con_begin
    STR     rdi, "vcpu"
    call    con_str
    mov     rdi, [rbx + PC_ID]
    call    con_dec
    STR     rdi, ": "
    call    con_str
    mov     rdi, [rbx + PC_TICKS]
    call    con_dec
    STR     rdi, " timer ticks in "
    call    con_str
    mov     rdi, [rbx + PC_T1]
    sub     rdi, [rbx + PC_T0]
    call    con_dec
    STR     rdi, " ns at a period of 50000 ns"
    call    con_str
    call    con_end
    mov     rax, [rbx + PC_TICKS]
    sub     rax, r13
    inc     rax                         /* -1, 0, 1 -> 0, 1, 2 */
    xor     edi, edi
    cmp     rax, 2
    setbe   dil
    mov     esi, 1
    mov     edx, r12d
    STR     rcx, "timer ticks within 1 of elapsed / period"
    call    check_dec
    pop     r13
    pop     r12
    pop     rbx
    ret

/* ---- interrupt handlers (shared; GS selects the vCPU's block) ----------- */

timer_handler:
    inc     qword ptr gs:[PC_TICKS]
    EOI
    iretq

ipi_handler:
    inc     qword ptr gs:[PC_RECEIVED]
    EOI
    iretq

/* A device interrupt: one taken, and the occurrences due by now (rdtsc),
 * capped at the device's count, as the running account (posts merged in PIR
 * are in it, not in the taken count). */
device_handler:
    inc     qword ptr gs:[PC_DEVICE]
    push    rax
    push    rcx
    push    rdx
    rdtsc
    shl     rdx, 32
    or      rax, rdx
    sub     rax, gs:[PC_DEVICE_START]
    jb      1f
    xor     edx, edx
    div     qword ptr gs:[PC_DEVICE_PERIOD]
    inc     rax                         /* occurrences 0 .. (now - start) / period */
    mov     rcx, gs:[PC_DEVICE_WANT]
    cmp     rax, rcx
    cmova   rax, rcx
    cmp     rax, gs:[PC_DEVICE_DUE]
    jbe     1f
    mov     gs:[PC_DEVICE_DUE], rax
1:  pop     rdx
    pop     rcx
    pop     rax
    EOI
    iretq

error_handler:
    inc     qword ptr gs:[PC_ERRORS]
    EOI
    iretq

spurious_handler:                       /* a spurious interrupt takes no EOI */
    inc     qword ptr gs:[PC_SPURIOUS]
    iretq
