"""`hvlab bench emulator`: what the hypervisor costs over bare unicorn, same run.

- `hvlab_mips`: `pv_spin` under the full hypervisor (scheduler, exits,
  hypercalls, native budget hook), guest instructions per wall second.
- `bare_unicorn_mips`: the same compute loop (between the kernel's symbols
  `spin_begin` and `spin_end`) on a bare unicorn engine (its own flat memory,
  no TLB hook, no hypervisor) with the same quantum scheme: the same native
  budget hook, the same budget per `emu_start`.
- `ratio` = hvlab / bare.
- `tlb_fills_per_s`: `pv_touch` reads one word of every page of its mapping,
  round after round; every TLB miss is a Python page walk.
- `hvm_tlb_fills_per_s`: the same for an HVM guest (`hvm_memtouch`, all memory
  backed up front so only fills are measured): every miss is a two-stage walk,
  the guest's four levels and the page each translated through EPT;
  `hvm_fill_ratio` = hvm / PV fills per second.
- `interrupts_per_s`: interrupts injected into `hvm_lapic` (LAPIC timers, IPIs,
  device interrupts through posted-interrupt descriptors) per wall second of
  that run, an interrupt-bound guest that mostly sleeps in `hlt` between them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import unicorn
from unicorn import UC_ARCH_X86, UC_MODE_64, UC_PROT_ALL, Uc
from unicorn import x86_const as X

from emulator.native_counter import NativeCounter
from hypervisor.core.elf import load_kernel
from hypervisor.lib.errors import HvlabError
from hypervisor.runner import boot_scenario
from hypervisor.scenario import load_scenario

BARE_BASE = 0x40_0000
SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios"


def _hvlab(scenario_name: str) -> tuple[int, float, int]:
    scenario = load_scenario(SCENARIOS / scenario_name)
    hv = boot_scenario(scenario)
    started = time.perf_counter()
    hv.run(scenario.virtual_time_ns)
    wall = time.perf_counter() - started
    for d in hv.domains:
        if d.shutdown is None or d.shutdown.code != 0:
            raise HvlabError(f"benchmark guest {d.name} did not finish cleanly: {d.shutdown}")
    instructions = sum(v.instructions for d in hv.domains for v in d.vcpus)
    return instructions, wall, sum(cpu.tlb_fills for cpu in hv.pcpus)


def _hvm_fills() -> tuple[int, float]:
    """TLB fills and wall seconds of hvm-memtouch, populate-on-demand off."""
    scenario = load_scenario(SCENARIOS / "hvm-memtouch.toml")
    scenario = dataclasses.replace(scenario, domains=tuple(
        dataclasses.replace(d, pod=False) for d in scenario.domains))
    hv = boot_scenario(scenario)
    started = time.perf_counter()
    hv.run(scenario.virtual_time_ns)
    wall = time.perf_counter() - started
    _check_clean(hv)
    return sum(cpu.tlb_fills for cpu in hv.pcpus), wall


def _hvm_interrupts() -> tuple[int, float]:
    """Interrupts injected into hvm-lapic and the wall seconds of the run."""
    scenario = load_scenario(SCENARIOS / "hvm-lapic.toml")
    hv = boot_scenario(scenario)
    started = time.perf_counter()
    hv.run(scenario.virtual_time_ns)
    wall = time.perf_counter() - started
    _check_clean(hv)
    return sum(v.hvm.interrupts_delivered for d in hv.domains for v in d.vcpus
               if v.hvm is not None), wall


def _check_clean(hv) -> None:
    for d in hv.domains:
        if d.shutdown is None or d.shutdown.code != 0:
            raise HvlabError(f"benchmark guest {d.name} did not finish cleanly: {d.shutdown}")


def _bare_unicorn(kernel_path: Path, quantum: int) -> tuple[int, float]:
    kernel = load_kernel(kernel_path)
    try:
        begin, end = kernel.symbols["spin_begin"], kernel.symbols["spin_end"]
    except KeyError:
        raise HvlabError(f"{kernel_path}: needs symbols spin_begin and spin_end") from None
    # Unpaged unicorn cannot fetch from the kernel's high link address; the
    # loop uses registers only, so it runs the same shifted down to BARE_BASE.
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    low = kernel.low & ~0xFFF
    size = ((kernel.high - low) + 0xFFFF) & ~0xFFF
    uc.mem_map(BARE_BASE, size, UC_PROT_ALL)
    for seg in kernel.segments:
        uc.mem_write(seg.vaddr - low + BARE_BASE, seg.data)
    begin, end = begin - low + BARE_BASE, end - low + BARE_BASE
    counter = NativeCounter()
    counter.install(uc)
    rip = begin
    started = time.perf_counter()
    while rip != end:
        counter.set_budget(quantum)
        uc.emu_start(rip, end)
        rip = uc.reg_read(X.UC_X86_REG_RIP)
    wall = time.perf_counter() - started
    return counter.executed, wall


def run_bench(args: argparse.Namespace) -> int:
    scenario = load_scenario(SCENARIOS / "pv-spin.toml")
    hv_instr, hv_wall, _ = _hvlab("pv-spin.toml")
    kernel = scenario.domains[0].kernel
    assert kernel is not None  # pv-spin boots a kernel, not an image
    bare_instr, bare_wall = _bare_unicorn(kernel, scenario.quantum_ns)
    touch_instr, touch_wall, fills = _hvlab("pv-touch.toml")
    hvm_fills, hvm_touch_wall = _hvm_fills()
    interrupts, lapic_wall = _hvm_interrupts()
    hvlab_mips = hv_instr / hv_wall / 1e6
    bare_mips = bare_instr / bare_wall / 1e6
    result = {
        "hvlab_mips": round(hvlab_mips, 2),
        "bare_unicorn_mips": round(bare_mips, 2),
        "ratio": round(hvlab_mips / bare_mips, 3),
        "tlb_fills_per_s": round(fills / touch_wall),
        "hvm_tlb_fills_per_s": round(hvm_fills / hvm_touch_wall),
        "hvm_fill_ratio": round(hvm_fills / hvm_touch_wall / (fills / touch_wall), 3),
        "interrupts_per_s": round(interrupts / lapic_wall),
        "hvlab_instructions": hv_instr,
        "bare_instructions": bare_instr,
        "hvlab_wall_s": round(hv_wall, 4),
        "bare_wall_s": round(bare_wall, 4),
        "tlb_fills": fills,
        "touch_wall_s": round(touch_wall, 4),
        "hvm_tlb_fills": hvm_fills,
        "hvm_touch_wall_s": round(hvm_touch_wall, 4),
        "interrupts": interrupts,
        "lapic_wall_s": round(lapic_wall, 4),
        "quantum_instructions": scenario.quantum_ns,
        "build": "4.19",
        "unicorn": unicorn.__version__,
    }
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(f"compute loop: hvlab {hvlab_mips:.1f} MIPS, bare unicorn {bare_mips:.1f} MIPS, "
              f"ratio {result['ratio']:.3f}")
        print(f"TLB fills: {result['tlb_fills_per_s']:,} per second ({fills:,} fills)")
        print(f"HVM two-stage TLB fills: {result['hvm_tlb_fills_per_s']:,} per second "
              f"({hvm_fills:,} fills, {result['hvm_fill_ratio']:.3f} of the PV rate)")
        print(f"HVM interrupts: {result['interrupts_per_s']:,} per second "
              f"({interrupts:,} injected)")
    return 0
