"""`hvlab trace` filters, symbols, register and memory columns, and jsonl."""

from __future__ import annotations

import json

import pytest

from hypervisor.cli import main
from hypervisor.core.elf import load_kernel
from tests import ROOT, SCENARIOS

HELLO = load_kernel(ROOT / "scenarios" / "guests" / "pv_hello.elf")


def trace(capsys, scenario: str, *args: str) -> list[dict]:
    assert main(["trace", str(SCENARIOS / scenario), "--format", "jsonl", *args]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_symbols_registers_and_memory_columns(capsys):
    records = trace(capsys, "pv-hello.toml", "--limit", "45", "--regs", "rsi,rsp", "--mem")
    insns = [r for r in records if "insn" in r]
    assert [r["t"] for r in insns] == list(range(len(insns)))  # one instruction, one ns
    assert insns[0]["symbol"] == "xen_entry"  # Xen's ENTRY note: the library's entry first
    start = next(i for i, r in enumerate(insns) if r["symbol"] == "_start")
    assert insns[start + 1]["symbol"] == "_start+0x7"
    # mov [rip + start_info], rsi: the store goes to the symbol start_info
    assert insns[start]["mem"] == [HELLO.symbols["start_info"]]
    xor = next(i for i, r in enumerate(insns) if r["insn"] == "xor esi, esi")
    assert insns[xor + 1]["regs"]["rsi"] == 0  # registers are shown before each instruction
    call = next(r for r in insns if r["insn"].startswith("call"))
    assert call["mem"] == [call["regs"]["rsp"] - 8]  # the return address is pushed
    assert records[-1] == {"note": "... trace limit of 45 lines reached"}


def test_a_symbol_as_rip_range(capsys):
    records = trace(capsys, "pv-hello.toml", "--rip", "check_value", "--limit", "50")
    insns = [r for r in records if "insn" in r]
    start = HELLO.symbols["check_value"]
    assert insns and all(r["symbol"].startswith("check_value") for r in insns)
    assert insns[0]["rip"] == start and insns[0]["insn"] == "push rbx"
    # the same instant as in the unfiltered trace: filtering changes nothing but the output
    full = trace(capsys, "pv-hello.toml", "--limit", "7000")
    first = next(r for r in full if r.get("rip") == start and "insn" in r)
    assert first["t"] == insns[0]["t"]
    hi = start + 0x10
    ranged = trace(capsys, "pv-hello.toml", "--rip", f"{start:#x}-{hi:#x}", "--limit", "20")
    assert all(start <= r["rip"] <= hi for r in ranged if "rip" in r)


def test_domain_vcpu_and_time_window(capsys):
    records = trace(capsys, "pv-smp.toml", "--vcpu", "1", "--from", "1ms", "--to", "1100us",
                    "--limit", "200000")
    assert records and "note" not in records[-1]  # the window ended the trace, not the limit
    assert {r["vcpu"] for r in records} == {"smp/v1"}
    assert all(1_000_000 <= r["t"] < 1_100_000 for r in records)
    assert any("exit" in r for r in records) and any("insn" in r for r in records)
    none = trace(capsys, "pv-smp.toml", "--domain", "smp", "--vcpu", "7", "--limit", "10",
                 "--to", "100us")
    assert none == []


def test_text_format_shows_time_and_symbols(capsys):
    assert main(["trace", str(SCENARIOS / "pv-hello.toml"), "--rip", "check_value",
                 "--limit", "3", "--regs", "rdi"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "push rbx" in lines[0] and "<check_value>" in lines[0] and "rdi=0x" in lines[0]
    assert lines[0].split()[0].isdigit()


@pytest.mark.parametrize("args", [("--regs", "rax,bogus"), ("--rip", "no_such_symbol"),
                                  ("--domain", "nobody"), ("--from", "2ms", "--to", "1ms"),
                                  ("--rip", "0x2000-0x1000")])
def test_bad_filters_are_usage_errors(capsys, args):
    assert main(["trace", str(SCENARIOS / "pv-hello.toml"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hvlab: ") and err.count("\n") == 1
