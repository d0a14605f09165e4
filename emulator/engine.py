"""The unicorn adapter: one physical CPU, and every unicorn quirk hvlab knows.

Nothing outside this module touches a `Uc`. What unicorn 2.1.4 does and how we
cope (measured; docs/design.md §2):

- Host memory is mapped as ONE region at machine address 0 (per-page regions
  make unicorn's region insertion super-linear).
- `UC_TLB_VIRTUAL` + one TLB-fill hook: unicorn walks no page tables; the MMU
  object above translates every TLB miss. A refused fill ends the run with
  `UC_ERR_EXCEPTION` and no interrupt hook, so the MMU records why first.
  The binding wraps a hook in two Python frames and a struct view per call;
  the fill hook, the hottest one, is registered raw through ctypes with the
  binding's exception handling done here (an exception stops the run and
  `emu_start` raises it). A guest's own `mov cr3`/`invlpg` flush unicorn's TLB
  without telling us; `flush_tlb` also tells the MMU (`Mmu.flush`).
- Instruction budgets come from a native counting hook (native_counter.py):
  exact executed-instruction counts at the cost of unicorn's own `count=`.
- `vmcall` is an invalid instruction to unicorn: the invalid-instruction hook
  decodes it, steps over it and stops the run as a `Hypercall` exit.
- `hlt` makes `emu_start` return normally, just like an exhausted budget; the
  counter's "stopped" flag tells the two apart.
- Faults and `int n` reach the interrupt hook; unicorn delivers nothing
  through the guest IDT (the hypervisor does, via emulator/interrupts.py).
  Unicorn never clears its "previous exception" after a hooked fault, so the
  next fault would be promoted to #DF and then to a silent triple fault; after
  every fault we reload a pristine context and write the registers back.
- `cpuid`, `in`, `out`, `rdtsc`, `rdtscp` are answered synchronously inside
  their hooks by the exit handler given from above (rdtsc returns virtual time).
- Debugging (gdb): a code hook on an address range stops *before* the
  instruction with `emu_stop`, but the counting hook, added first, has already
  counted it, so the stop takes that count back. Dropping all translated code
  makes unicorn refill an MMIO page's TLB entry once, so breakpoints drop only
  their page's code, and single steps use the counter's limit, not a hook. Memory hooks under
  `UC_TLB_VIRTUAL` are told *machine* addresses, so write watches are set on
  the machine range; a write stops the run after the writing instruction by
  lowering the counter's limit (emu_stop inside a memory hook would cut the
  instruction short). Debug stops are served inside `run` and the run goes on
  with the same budget: the guest and virtual time never notice a debugger.
- Ring 3 (the Xen PV ABI, guest kernel and user both at CPL 3): writing CS/SS
  changes the selector only, never the CPL, so `enter_ring3` executes one
  `iretq` from a private CPL-0 page and keeps that CPL-3 context as the
  pristine one its fault scrubs reload. At CPL 3 wrmsr, rdmsr, cli, sti, hlt,
  mov CR, invlpg, swapgs fault with #GP at the instruction; in/out never fault
  (the port hooks answer them). A hooked `syscall` moves RIP past itself and
  writes neither rcx nor r11: it becomes a `Syscall` exit.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from unicorn import (
    UC_ARCH_X86,
    UC_CTL_IO_WRITE,
    UC_CTL_TLB_FLUSH,
    UC_ERR_EXCEPTION,
    UC_HOOK_CODE,
    UC_HOOK_INSN,
    UC_HOOK_INSN_INVALID,
    UC_HOOK_INTR,
    UC_HOOK_MEM_WRITE,
    UC_HOOK_TLB_FILL,
    UC_MEM_FETCH,
    UC_MEM_WRITE,
    UC_MODE_64,
    UC_PROT_ALL,
    UC_PROT_EXEC,
    UC_PROT_READ,
    UC_PROT_WRITE,
    UC_TLB_VIRTUAL,
    Uc,
    UcError,
)
from unicorn import x86_const as X
from unicorn.unicorn_py3.unicorn import uclib

from emulator.disasm import data_addresses
from emulator.exits import (
    BudgetExhausted,
    Cpuid,
    EngineError,
    Exit,
    GuestException,
    Halt,
    Hypercall,
    InvalidOpcode,
    MmuFault,
    PortIO,
    Syscall,
)
from emulator.memory import HostMemory
from emulator.native_counter import NativeCounter

# The raw TLB-fill callback: (uc handle, vaddr, access, uc_tlb_entry*, user data).
_TLB_FILL_CFUNC = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int,
                                   ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p)
_ACCESS_KIND = {UC_MEM_FETCH: "fetch", UC_MEM_WRITE: "write"}

VMCALL = b"\x0f\x01\xc1"

# Access kinds as the MMU sees them.
READ, WRITE, FETCH = "read", "write", "fetch"

PERM_R = UC_PROT_READ
PERM_W = UC_PROT_WRITE
PERM_X = UC_PROT_EXEC

# Vectors whose hardware frame carries an error code.
VECTORS_WITH_ERROR_CODE = frozenset({8, 10, 11, 12, 13, 14, 17, 21})
FIRST_SOFTWARE_VECTOR = 32  # `int n` above the exception range: a trap, RIP already past it

GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
_REG = {name: getattr(X, f"UC_X86_REG_{name.upper()}") for name in (
    *GPRS, "rip", "rflags", "cr0", "cr2", "cr3", "cr4",
    "cs", "ss", "ds", "es", "fs", "gs", "fs_base", "gs_base", "mxcsr",
)} | {f"xmm{i}": X.UC_X86_REG_XMM0 + i for i in range(16)}
# x87 state under the names gdb gives it
_REG |= {f"st{i}": X.UC_X86_REG_ST0 + i for i in range(8)} | {
    "fctrl": X.UC_X86_REG_FPCW, "fstat": X.UC_X86_REG_FPSW, "ftag": X.UC_X86_REG_FPTAG,
    "fiseg": X.UC_X86_REG_FCS, "fioff": X.UC_X86_REG_FIP, "foseg": X.UC_X86_REG_FDS,
    "fooff": X.UC_X86_REG_FDP, "fop": X.UC_X86_REG_FOP}
# Registers read and written as plain u64 straight through the C API: the
# binding's own reg_read/reg_write spend most of their ~4 us choosing a
# value class; a CPL-3 PV boot touches registers a few million times.
_U64_REGS = {name: _REG[name] for name in (*GPRS, "rip", "rflags", "fs_base", "gs_base",
                                           "cr0", "cr2", "cr3", "cr4")}
_EFER_MSR = 0xC000_0080
# A page of the engine's own, outside host memory, holding the `iretq` that
# loads CPL 3; mapped at a virtual address no guest translation can use
# (inside the hypervisor's reserved L4 slots) and only while it runs.
RING3_ENTRY_VA = 0xFFFF_87FF_FFFF_F000
_IRETQ = b"\x48\xcf"
_RING0_CS, _RING0_SS = 0x08, 0x10
_KERNEL_GS_BASE_MSR = 0xC000_0102

# Everything a fault scrub must carry over (order matters: control state
# first, then descriptor tables, then selectors that load from them).
_SCRUB_CONTROL = ("cr0", "cr3", "cr4")
_SCRUB_SELECTORS = ("cs", "ss", "ds", "es")
_SCRUB_PLAIN = (*GPRS, "rip", "rflags", "cr2", "fs_base", "gs_base")


class Mmu(Protocol):
    """Translation policy supplied from above (PV one-stage, HVM two-stage, ...)."""

    def translate(self, gva: int, access: str) -> tuple[int, int] | None:
        """Machine address of the page holding `gva` and unicorn perms, or None.

        On None the MMU keeps the reason in `last_fault` for the exit.
        """

    @property
    def last_fault(self) -> object: ...

    def flush(self) -> None:
        """Forget any cached paging-structure entries: the TLB was just flushed."""


SyncExitHandler = Callable[[Exit], bool]


@dataclass(frozen=True)
class DebugStop:
    """Why a debugger stopped the guest: `kind` is "code" (before the instruction at
    `address`), "write" (after a write to machine address `address`), "step" or
    "interrupt" (before the instruction at `address`)."""

    kind: str
    address: int


class PhysicalCpu:
    """One emulated physical CPU running whichever vCPU context is loaded."""

    def __init__(self, index: int, memory: HostMemory) -> None:
        self.index = index
        self.memory = memory  # keeps the buffer alive while this engine maps it
        uc = Uc(UC_ARCH_X86, UC_MODE_64)
        uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)  # type: ignore[attr-defined]  # untyped in 2.1.4
        uc.mem_map_ptr(0, memory.size, UC_PROT_ALL, memory.address)
        # With an `until` address unicorn probes that page through the TLB-fill
        # hook, and a refused probe poisons the whole run; an empty exit list
        # means "no until", so only budgets, exits and hlt end a run.
        uc.ctl_exits_enabled(True)
        uc.ctl_set_exits([])
        self.uc = uc
        self._u64 = ctypes.c_uint64()  # the buffer of the direct register path
        self._u64_ref = ctypes.byref(self._u64)
        self.mmu: Mmu | None = None
        self.sync_exit: SyncExitHandler = lambda exit_: False
        self._exit: Exit | None = None
        self._mmio: list[object] = []  # ctypes callbacks must outlive the engine's use
        self.tlb_fills = 0

        self.counter = NativeCounter()
        self.counter.install(uc)
        self._add_tlb_fill_hook()
        uc.hook_add(UC_HOOK_INSN_INVALID, self._on_invalid)
        uc.hook_add(UC_HOOK_INTR, self._on_interrupt)
        uc.hook_add(UC_HOOK_INSN, self._on_cpuid, None, 1, 0, X.UC_X86_INS_CPUID)
        uc.hook_add(UC_HOOK_INSN, self._on_in, None, 1, 0, X.UC_X86_INS_IN)
        uc.hook_add(UC_HOOK_INSN, self._on_out, None, 1, 0, X.UC_X86_INS_OUT)
        self._add_rdtsc_hooks()
        self._pristine = uc.context_save()
        self._pristine_ring3 = None  # the CPL-3 context, once `enter_ring3` made it
        self._entry_ma = -(-memory.size // 0x1000) * 0x1000
        self._entering_ring3 = False
        self.tsc: Callable[[], int] = lambda: 0
        # a debugger's stop handler: called outside emu_start, returns to resume
        self.on_debug_stop: Callable[[DebugStop], None] | None = None
        self._debug_stop: DebugStop | None = None
        self._interrupt_requested = False
        self.stepping: Callable[[], bool] | None = None
        self._step_ran = False
        self._probing = self._probe_missed = False

    def _add_tlb_fill_hook(self) -> None:
        uc = self.uc
        translate_for = self

        def on_fill(_handle, vaddr, access, entry, _ud):
            try:
                if translate_for._probing:  # `_retranslate` asking where code is
                    translate_for._probe_missed = True
                    return False
                if translate_for._entering_ring3 and vaddr >> 12 == RING3_ENTRY_VA >> 12:
                    entry[0], entry[1] = translate_for._entry_ma, PERM_R | PERM_X
                    return True
                kind = _ACCESS_KIND.get(access, READ)
                translate_for.tlb_fills += 1
                mmu = translate_for.mmu
                result = mmu.translate(vaddr, kind) if mmu is not None else None
                if result is None:
                    translate_for._pending_fill_fault = (vaddr, kind)
                    return False
                translate_for._pending_fill_fault = None
                entry[0], entry[1] = result  # uc_tlb_entry: u64 paddr, u32 perms (+ padding)
                return True
            except BaseException as err:  # what the binding's wrapper does
                if uc._hook_exception is None:  # type: ignore[attr-defined]
                    uc._hook_exception = err  # type: ignore[attr-defined]
                uc.emu_stop()
                return False

        self.uc._Uc__do_hook_add(  # type: ignore[attr-defined]
            UC_HOOK_TLB_FILL, _TLB_FILL_CFUNC(on_fill), 1, 0)

    def _add_rdtsc_hooks(self) -> None:
        # Unicorn's C core hooks rdtsc/rdtscp (callback shaped like cpuid's:
        # return 1 to skip the instruction) but the 2.1.4 Python binding refuses
        # them, so register through the binding's internal adder.
        from unicorn.unicorn_py3.arch.intel import HOOK_INSN_CPUID_CFUNC
        from unicorn.unicorn_py3.unicorn import uccallback

        @uccallback(self.uc, HOOK_INSN_CPUID_CFUNC)  # type: ignore[arg-type]
        def on_rdtsc(uc, _key):
            return self._on_rdtsc(uc, None)

        for insn in (X.UC_X86_INS_RDTSC, X.UC_X86_INS_RDTSCP):
            self.uc._Uc__do_hook_add(  # type: ignore[attr-defined]
                UC_HOOK_INSN, on_rdtsc, 1, 0, ctypes.c_int(insn))

    # ----------------------------------------------------------------- running
    @property
    def executed(self) -> int:
        """Instructions started on this pCPU since it was created."""
        return self.counter.executed

    def run(self, budget: int) -> Exit:
        """Run the loaded context for at most `budget` instructions."""
        self._exit = None
        self.counter.set_budget(budget)
        limit = self.counter.block.limit
        while True:
            if self._interrupt_requested:
                self.counter.block.limit = 0  # stop before the next instruction
            stepping = self.stepping is not None and self.stepping()
            if stepping:  # one instruction, then stop before the next one
                self.counter.block.limit = min(self.counter.block.limit, self.executed
                                               + (0 if self._step_ran else 1))
            started = self.executed
            rip = self.uc.reg_read(X.UC_X86_REG_RIP)
            try:
                self.uc.emu_start(rip, 0)
            except UcError as err:
                if self._exit is None:
                    self._exit = self._explain_error(err)
            if stepping and self.executed > started:
                self._step_ran = True
            stop = self._take_debug_stop(stepping and self.executed < limit)
            if stop is None:
                break
            # the budget is the run's own again; a debugger's stop never ends it
            self.counter.block.limit = limit
            self.counter.block.stopped = int(self.counter.executed >= limit)
            if self.on_debug_stop is not None:
                self.on_debug_stop(stop)
            if self._exit is not None or self.counter.budget_ran_out:
                break
        if self._exit is not None:
            if isinstance(self._exit, GuestException):
                self._scrub_exception_state()
            return self._exit
        rip = self.uc.reg_read(X.UC_X86_REG_RIP)
        if self.counter.budget_ran_out:
            return BudgetExhausted(rip)
        return Halt(rip)

    def _take_debug_stop(self, step_may_end: bool) -> DebugStop | None:
        stop, self._debug_stop = self._debug_stop, None
        if stop is None and self.counter.budget_ran_out:
            rip = self.uc.reg_read(X.UC_X86_REG_RIP)
            if self._interrupt_requested:
                stop = DebugStop("interrupt", rip)
            elif step_may_end and self._step_ran:
                stop = DebugStop("step", rip)
        if stop is not None:
            self._interrupt_requested = False
        return stop

    def _explain_error(self, err: UcError) -> Exit:
        rip = self.uc.reg_read(X.UC_X86_REG_RIP)
        if err.errno == UC_ERR_EXCEPTION and self._pending_fill_fault is not None:
            page, access = self._pending_fill_fault
            reason = self.mmu.last_fault if self.mmu is not None else None
            return MmuFault(rip, self._exact_fault_address(rip, page, access), access, reason)
        return EngineError(rip, f"unicorn: {err}")

    def _exact_fault_address(self, rip: int, page: int, access: str) -> int:
        """The byte address that faulted: unicorn's fill hook is only told the page.

        The instruction is decoded and its data addresses computed; one that
        lies in the refused page is the answer. An access that crosses into
        the page faults at the page's first byte, which is the page address.
        """
        if access == FETCH:
            return rip if rip >> 12 == page >> 12 else page
        try:
            code = self.read_virtual(rip, 15 if (rip & 0xFFF) <= 0xFF1 else 0x1000 - (rip & 0xFFF))
        except GuestMemoryFault:
            return page
        for address in data_addresses(code, rip, self.reg_by_capstone_name):
            if address >> 12 == page >> 12:
                return address
        return page

    def reg_by_capstone_name(self, name: str) -> int:
        if name in ("fs_base", "gs_base"):
            return self.reg(name)
        return self.uc.reg_read(getattr(X, f"UC_X86_REG_{name.upper()}"))

    # ------------------------------------------------------------------- hooks
    _pending_fill_fault: tuple[int, str] | None = None

    def _on_invalid(self, uc: Uc, _ud) -> bool:
        rip = uc.reg_read(X.UC_X86_REG_RIP)
        if self.read_virtual(rip, 3) == VMCALL:
            self._exit = Hypercall(rip, 3)
            uc.reg_write(X.UC_X86_REG_RIP, rip + 3)
        else:
            self._exit = InvalidOpcode(rip)
        uc.emu_stop()
        return True

    def _on_syscall(self, uc: Uc, _ud) -> None:
        # RIP is still the instruction here; unicorn moves past it when the run stops
        self._exit = Syscall(uc.reg_read(X.UC_X86_REG_RIP))
        uc.emu_stop()

    def _on_interrupt(self, uc: Uc, vector: int, _ud) -> None:
        rip = uc.reg_read(X.UC_X86_REG_RIP)
        if vector == 3 or vector >= FIRST_SOFTWARE_VECTOR:
            # unicorn leaves RIP after `int3` (1 byte) / `int n` (2 bytes);
            # report the instruction itself. (`int n` with n < 32 is
            # indistinguishable from the fault n and is reported as that fault.)
            length = 1 if vector == 3 else 2
            self._exit = GuestException(rip - length, vector, None, None, rip)
        else:
            err = 0 if vector in VECTORS_WITH_ERROR_CODE else None
            cr2 = uc.reg_read(X.UC_X86_REG_CR2) if vector == 14 else None
            self._exit = GuestException(rip, vector, err, cr2, rip)
        uc.emu_stop()

    def _sync(self, exit_: Exit) -> bool:
        if self.sync_exit(exit_):
            return True
        self._exit = exit_
        self.uc.emu_stop()
        return False

    def _on_cpuid(self, uc: Uc, _ud) -> int:
        rip = uc.reg_read(X.UC_X86_REG_RIP)
        leaf = uc.reg_read(X.UC_X86_REG_EAX)
        sub = uc.reg_read(X.UC_X86_REG_ECX)
        self._sync(Cpuid(rip, leaf, sub, 2))
        return 1  # the handler wrote the result registers: skip unicorn's cpuid

    def _on_in(self, uc: Uc, port: int, size: int, _ud) -> int:
        rip = uc.reg_read(X.UC_X86_REG_RIP)
        self._io_value = 0
        self._sync(PortIO(rip, port, size, False, 0))
        return self._io_value

    def _on_out(self, uc: Uc, port: int, size: int, value: int, _ud) -> None:
        rip = uc.reg_read(X.UC_X86_REG_RIP)
        self._sync(PortIO(rip, port, size, True, value))

    def end_run_after_this_instruction(self) -> None:
        """From a device callback: let the current instruction finish, then stop the run.

        It ends as a used-up budget (`BudgetExhausted`); emu_stop from inside an
        MMIO callback would not let the instruction complete first.
        """
        self.counter.set_budget(0)

    def complete_port_read(self, value: int) -> None:
        """The value an `in` instruction reads (called by the exit handler)."""
        self._io_value = value

    def _on_rdtsc(self, uc: Uc, _ud) -> int:
        tsc = self.tsc()
        uc.reg_write(X.UC_X86_REG_RAX, tsc & 0xFFFF_FFFF)
        uc.reg_write(X.UC_X86_REG_RDX, tsc >> 32)
        return 1  # skip unicorn's host-derived TSC

    # ------------------------------------------------------- quirk: CPL 3
    def enter_ring3(self, rip: int, rsp: int, rflags: int, cs: int, ss: int) -> None:
        """Load CPL 3 at `cs:rip`, `ss:rsp` (the GDT must already describe cs and ss).

        Unicorn keeps the CPL when CS is written, so one `iretq` runs from the
        engine's private page; the context it leaves is kept as the pristine
        CPL-3 state that later fault scrubs reload. `syscall` becomes an exit.
        """
        if self._pristine_ring3 is None:
            self.uc.mem_map(self._entry_ma, 0x1000, UC_PROT_READ | UC_PROT_EXEC)
            self.uc.hook_add(UC_HOOK_INSN, self._on_syscall, None, 1, 0, X.UC_X86_INS_SYSCALL)
        frame = struct.pack("<5Q", rip, cs, rflags, rsp, ss)
        self.uc.mem_write(self._entry_ma, _IRETQ.ljust(0x100, b"\xcc") + frame)
        self.uc.reg_write(X.UC_X86_REG_CS, _RING0_CS)
        self.uc.reg_write(X.UC_X86_REG_SS, _RING0_SS)
        self.uc.reg_write(X.UC_X86_REG_RSP, RING3_ENTRY_VA + 0x100)
        self.uc.reg_write(X.UC_X86_REG_RIP, RING3_ENTRY_VA)
        self._entering_ring3 = True
        self.flush_tlb()
        try:
            exit_ = self.run(1)
        finally:
            self._entering_ring3 = False
            self.flush_tlb()
        if not isinstance(exit_, BudgetExhausted) or self.reg("rip") != rip:
            raise RuntimeError(f"entering ring 3 at {rip:#x} failed: {exit_}")
        self._pristine_ring3 = self.uc.context_save()

    @property
    def in_ring3(self) -> bool:
        return self._pristine_ring3 is not None and self.uc.reg_read(X.UC_X86_REG_CS) & 3 == 3

    # ----------------------------------------------------- quirk: #DF promotion
    def _scrub_exception_state(self) -> None:
        """Forget unicorn's record of the last fault so the next one is not a #DF."""
        regs = {name: self.uc.reg_read(_REG[name]) for name in
                (*_SCRUB_CONTROL, *_SCRUB_SELECTORS, *_SCRUB_PLAIN)}
        efer = self.uc.reg_read(X.UC_X86_REG_MSR, _EFER_MSR)
        kgs = self.uc.reg_read(X.UC_X86_REG_MSR, _KERNEL_GS_BASE_MSR)
        gdtr = self.uc.reg_read(X.UC_X86_REG_GDTR)
        idtr = self.uc.reg_read(X.UC_X86_REG_IDTR)
        ring3 = self.in_ring3
        self.uc.context_restore(self._pristine_ring3 if ring3 else self._pristine)
        self.uc.reg_write(X.UC_X86_REG_MSR, (_EFER_MSR, efer))
        for name in _SCRUB_CONTROL:
            self.uc.reg_write(_REG[name], regs[name])
        self.uc.reg_write(X.UC_X86_REG_GDTR, gdtr)
        self.uc.reg_write(X.UC_X86_REG_IDTR, idtr)
        for name in _SCRUB_SELECTORS:
            self.uc.reg_write(_REG[name], regs[name])
        for name in _SCRUB_PLAIN:
            self.uc.reg_write(_REG[name], regs[name])
        self.uc.reg_write(X.UC_X86_REG_MSR, (_KERNEL_GS_BASE_MSR, kgs))

    # ------------------------------------------------------------ guest access
    def read_virtual(self, gva: int, size: int) -> bytes:
        """Read guest-virtual memory through the MMU (used for decoding/delivery)."""
        out = bytearray()
        while size:
            chunk = min(size, 0x1000 - (gva & 0xFFF))
            ma = self._translate_or_raise(gva, READ)
            out += self.memory.read(ma, chunk)
            gva += chunk
            size -= chunk
        return bytes(out)

    def write_virtual(self, gva: int, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            chunk = min(len(data) - pos, 0x1000 - (gva & 0xFFF))
            ma = self._translate_or_raise(gva, WRITE)
            self.memory.write(ma, data[pos : pos + chunk])
            gva += chunk
            pos += chunk

    def _translate_or_raise(self, gva: int, access: str) -> int:
        result = self.mmu.translate(gva & ~0xFFF, access) if self.mmu is not None else None
        if result is None:
            raise GuestMemoryFault(gva, access)
        return result[0] + (gva & 0xFFF)

    # --------------------------------------------------------------- registers
    def reg(self, name: str) -> int:
        reg_id = _U64_REGS.get(name)
        if reg_id is not None:
            rc = uclib.uc_reg_read(self.uc._uch, reg_id, self._u64_ref)
            if rc:
                raise UcError(rc)
            return self._u64.value
        if name == "efer":
            return self.uc.reg_read(X.UC_X86_REG_MSR, _EFER_MSR)
        return self.uc.reg_read(_REG[name])

    def set_reg(self, name: str, value: int) -> None:
        reg_id = _U64_REGS.get(name)
        if reg_id is not None:
            self._u64.value = value
            rc = uclib.uc_reg_write(self.uc._uch, reg_id, self._u64_ref)
            if rc:
                raise UcError(rc)
        elif name == "efer":
            self.uc.reg_write(X.UC_X86_REG_MSR, (_EFER_MSR, value))
        else:
            self.uc.reg_write(_REG[name], value)

    @staticmethod
    def context_reg(ctx, name: str) -> int:
        """A register of a saved context (a vCPU not loaded on any engine)."""
        if name == "efer":
            return ctx.reg_read(X.UC_X86_REG_MSR, _EFER_MSR)
        return ctx.reg_read(_REG[name])

    @staticmethod
    def set_context_reg(ctx, name: str, value: int) -> None:
        if name == "efer":
            ctx.reg_write(X.UC_X86_REG_MSR, (_EFER_MSR, value))
        else:
            ctx.reg_write(_REG[name], value)

    def set_descriptor_table(self, which: str, base: int, limit: int) -> None:
        reg = X.UC_X86_REG_GDTR if which == "gdtr" else X.UC_X86_REG_IDTR
        self.uc.reg_write(reg, (0, base, limit, 0))

    def descriptor_table(self, which: str) -> tuple[int, int]:
        reg = X.UC_X86_REG_GDTR if which == "gdtr" else X.UC_X86_REG_IDTR
        _sel, base, limit, _flags = self.uc.reg_read(reg)
        return base, limit

    # ----------------------------------------------------- contexts and the TLB
    def reset(self) -> None:
        """Load the power-on state (64-bit mode, flat, no fault pending)."""
        self.uc.context_restore(self._pristine)
        self.flush_tlb()

    def save_context(self):
        """Opaque snapshot of the architectural state (for vCPU switching)."""
        return self.uc.context_save()

    def load_context(self, ctx) -> None:
        self.uc.context_restore(ctx)
        self.flush_tlb()  # cached translations belong to the previous context

    def update_context(self, ctx) -> None:
        self.uc.context_update(ctx)

    def flush_translations(self) -> None:
        """Forget translated code (after the host rewrote guest code pages)."""
        self.uc.ctl_flush_tb()  # type: ignore[attr-defined]  # untyped in 2.1.4

    def flush_tlb(self) -> None:
        # the 2.1.4 binding has a TB-flush helper but none for the TLB
        self.uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
        flush = getattr(self.mmu, "flush", None)  # MMUs without caches need none
        if flush is not None:
            flush()

    # --------------------------------------------------------------- tracing
    def trace_instructions(self, callback: Callable[[int], None], begin: int = 1,
                           end: int = 0) -> None:
        """Call `callback(rip)` before every instruction this pCPU executes at a
        guest-virtual address in [begin, end] (the default range is every address).

        A Python code hook costs hundreds of nanoseconds per instruction
        (docs/design.md §2): only ever installed on request. The hook's size argument
        is not passed on: unicorn reports nonsense for instructions it cannot
        decode (vmcall), so callers decode with capstone from RIP.
        """
        self.uc.hook_add(UC_HOOK_CODE, lambda _uc, address, _size, _ud: callback(address),
                         None, begin, end)
        self.flush_translations()  # code translated before the hook would bypass it

    # --------------------------------------------------------------- debugging
    def stop_before(self, begin: int, end: int, should_stop: Callable[[int], bool]) -> int:
        """Stop before any instruction at a guest-virtual address in [begin, end] for
        which `should_stop(address)` says so; returns a handle for `remove_hook`."""
        def on_code(uc: Uc, address: int, _size: int, _ud) -> None:
            if self._debug_stop is None and should_stop(address):
                self._uncount_stopped_instruction()
                self._debug_stop = DebugStop("code", address)
                uc.emu_stop()

        handle = self.uc.hook_add(UC_HOOK_CODE, on_code, None, begin, end)
        self._retranslate(begin)  # code translated before the hook would bypass it
        return handle

    def _retranslate(self, address: int) -> None:
        """Forget translated code holding `address`, without touching the TLB's state.

        Dropping every translation (`flush_translations`) makes unicorn refill an
        MMIO page's TLB entry once more (an HVM guest's LAPIC page), which would
        show in `tlb_fills`; dropping the one page's code needs its translation, so
        it is looked up quietly: a page the TLB does not hold is not filled (that
        would count and change the fills to come), everything is dropped instead.
        """
        self._probe_missed = False
        self._probing = True
        try:
            self.uc.ctl_remove_cache(address, address + 1)
        finally:
            self._probing = False
        if self._probe_missed:
            self.flush_translations()

    def single_step(self, active: Callable[[], bool]) -> None:
        """Stop after one instruction, run while `active()` (the vCPU to step is loaded).

        The counter's limit does it, not a code hook: nothing is retranslated.
        An instruction that exits (a hypercall, hlt) counts as the step; the stop
        then comes before the next instruction, whenever that runs.
        """
        self.stepping = active
        self._step_ran = False

    def cancel_step(self) -> None:
        self.stepping = None
        self._step_ran = False

    def _uncount_stopped_instruction(self) -> None:
        # the counting hook ran first and counted an instruction that never ran
        self.counter.block.executed -= 1

    def stop_after_write(self, begin_ma: int, end_ma: int) -> int:
        """Stop after an instruction that writes machine addresses [begin_ma, end_ma]."""
        def on_write(_uc: Uc, _access: int, address: int, _size: int, _value: int,
                     _ud) -> None:
            if self._debug_stop is None:
                self._debug_stop = DebugStop("write", address)
                self.counter.block.limit = self.counter.block.executed

        return self.uc.hook_add(UC_HOOK_MEM_WRITE, on_write, None, begin_ma, end_ma)

    def remove_hook(self, handle: int) -> None:
        self.uc.hook_del(handle)

    def request_debug_stop(self) -> None:
        """From any thread: stop before the next instruction (gdb's Ctrl-C)."""
        self._interrupt_requested = True
        self.counter.block.limit = 0

    def cancel_debug_stop(self) -> None:
        self._interrupt_requested = False

    # -------------------------------------------------------------------- MMIO
    def map_mmio(self, base: int, size: int,
                 read: Callable[[int, int], int], write: Callable[[int, int, int], None]) -> None:
        """Machine-address window whose accesses go to a device model."""
        def on_read(_uc, offset, sz, _ud):
            return read(offset, sz)

        def on_write(_uc, offset, sz, value, _ud):
            write(offset, sz, value)

        self._mmio.append((on_read, on_write))
        self.uc.mmio_map(base, size, on_read, None, on_write, None)

    def close(self) -> None:
        """Release the engine (the host memory stays)."""
        self.uc = None  # type: ignore[assignment]


class GuestMemoryFault(Exception):
    """A hypervisor-side access to guest-virtual memory was refused by the MMU."""

    def __init__(self, gva: int, access: str) -> None:
        super().__init__(f"guest address {gva:#x} not mapped for {access}")
        self.gva = gva
        self.access = access

