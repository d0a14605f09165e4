"""Block counting (emulator/block_counter.py) counts exactly what the per-instruction hook counts.

Every engine counts per block unless a debugger, a tracer or an MMIO window
needs the per-instruction hook (`count_every_instruction`); the same run both
ways must give the same instructions, exits and guest output.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

import emulator.block_counter as block_counter
from emulator.engine import PERM_R, PERM_W, PERM_X, PhysicalCpu
from emulator.memory import HostMemory
from hypervisor.runner import boot_scenario, describe
from hypervisor.scenario import load_scenario

SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios"
CODE = 0x1000


def _run(name: str, per_instruction: bool) -> dict:
    scenario = load_scenario(SCENARIOS / f"{name}.toml")
    hv = boot_scenario(scenario)
    if per_instruction:
        for cpu in hv.pcpus:
            cpu.count_every_instruction()
    stop = hv.run(scenario.virtual_time_ns)
    run = describe(hv, scenario, stop, 0.0)
    return {"instructions": run["instructions"], "exits": run["exits"],
            "virtual_ns": run["virtual_ns"],
            "domains": [(d["console"], d["shutdown"]) for d in run["domains"]]}


@pytest.mark.parametrize("name", ["pv-faults", "pv-ptchurn", "pv-hostile"])
def test_block_counting_equals_per_instruction_counting(name):
    assert _run(name, per_instruction=False) == _run(name, per_instruction=True)


def test_a_wrong_block_count_shows_in_the_comparison(monkeypatch):
    learn = block_counter.BlockCounter.learn

    def off_by_one(self, pc, size, count):  # a planted bug: one block's count is wrong
        learn(self, pc, size, count + (1 if count == 3 else 0))

    monkeypatch.setattr(block_counter.BlockCounter, "learn", off_by_one)
    planted = _run("pv-faults", per_instruction=False)
    monkeypatch.undo()
    assert planted != _run("pv-faults", per_instruction=True)


class _IdentityMmu:
    last_fault: object = None

    def translate(self, gva: int, _access: str):
        return gva & ~0xFFF, PERM_R | PERM_W | PERM_X


def _engine(code: bytes, per_instruction: bool) -> PhysicalCpu:
    mem = HostMemory(4 << 20)
    cpu = PhysicalCpu(0, mem)
    if per_instruction:
        cpu.count_every_instruction()
    cpu.mmu = _IdentityMmu()
    mem.write(0x2000, struct.pack("<QQQ", 0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF))
    cpu.set_descriptor_table("gdtr", 0x2000, 23)
    cpu.set_reg("cs", 0x08)
    cpu.set_reg("ss", 0x10)
    mem.write(CODE, code)
    cpu.set_reg("rip", CODE)
    cpu.set_reg("rsp", 0x8000)
    cpu.sync_exit = lambda exit_: True
    return cpu


# lea rax, [rip+3]; mov byte [rax], 0x90 (a write into the running block: QEMU
# restarts at the write); nop; nop; mov ebx, 1; hlt
SELF_WRITING = bytes.fromhex("488d0503000000" "c60090" "90" "90" "bb01000000" "f4")


@pytest.mark.parametrize("budget", [1000, 2, 3])
def test_a_block_that_writes_its_own_code_is_counted_like_per_instruction(budget):
    counts = []
    for per_instruction in (False, True):
        cpu = _engine(SELF_WRITING, per_instruction)
        exits = [cpu.run(budget)]
        while type(exits[-1]).__name__ != "Halt" and len(exits) < 10:
            exits.append(cpu.run(budget))
        counts.append((cpu.executed, [type(e).__name__ for e in exits], cpu.reg("rip"),
                       cpu.reg("rbx")))
    assert counts[0] == counts[1]
    assert counts[0][1][-1] == "Halt" and counts[0][3] == 1
