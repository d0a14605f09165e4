"""Symbols of a kernel without an ELF symbol table come from its kallsyms table: in
`hvlab trace` and in crash reports (a tiny CPL-3 kernel carrying a synthetic table)."""

from __future__ import annotations

import json

from hypervisor.cli import main
from hypervisor.kernel_symbols import kernel_symbols
from hypervisor.runner import run_scenario
from hypervisor.scenario import load_scenario
from tests.pv.linux.test_kallsyms import synthetic_image
from tests.pv.xen.guest import ENTRY, kernel_elf

CODE = bytes.fromhex("9090f4")  # nop; nop; hlt: #GP at CPL 3 with no trap table, a crash


def _scenario(tmp_path):
    symbols = [("T", "tiny_entry", ENTRY), ("t", "tiny_after", ENTRY + 0x10)]
    symbols += [("T", f"filler_{i}", ENTRY + 0x100 + 16 * i) for i in range(300)]
    kernel = tmp_path / "tiny.elf"
    kernel.write_bytes(kernel_elf(CODE.ljust(16, b"\xcc") + synthetic_image(symbols, True,
                                                                             base=ENTRY)))
    toml = tmp_path / "tiny.toml"
    toml.write_text(f'[machine]\npcpus = 1\nmemory = "32M"\n\n[[domain]]\nname = "tiny"\n'
                    f'kernel = "{kernel.name}"\nmemory = "8M"\nvcpus = 1\n\n[limits]\n'
                    'virtual_time = "10ms"\n')
    return kernel, toml


def test_kallsyms_name_the_crash_rip(tmp_path):
    kernel, toml = _scenario(tmp_path)
    table = kernel_symbols(kernel)
    assert table.describe(ENTRY + 0x12) == "tiny_after+0x2"
    result = run_scenario(load_scenario(toml))
    report = result["domains"][0]["crash_report"]
    assert f"at RIP {ENTRY + 2:#x} <tiny_entry+0x2>" in report


def test_trace_shows_kallsyms_symbols(tmp_path, capsys):
    _kernel, toml = _scenario(tmp_path)
    assert main(["trace", str(toml), "--format", "jsonl", "--rip", "tiny_entry"]) == 0
    insns = [r for r in map(json.loads, capsys.readouterr().out.splitlines()) if "insn" in r]
    assert [r["symbol"] for r in insns] == ["tiny_entry", "tiny_entry+0x1", "tiny_entry+0x2"]
