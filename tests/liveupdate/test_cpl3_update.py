"""Live update of a domain on Xen's PV ABI at CPL 3 (what Linux runs on), shown on a tiny
hand-assembled kernel: every strategy, in process and with --exec, the proof passing
and the guest ending exactly as a run without an update."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from emulator.paging import ADDR_MASK, RW, P
from hypervisor.liveupdate.orchestrator import UpdatePlan, live_update, prepare
from hypervisor.liveupdate.strategies.lazy import lazy_update_of
from hypervisor.pv.xen import grant_table as gt
from hypervisor.pv.xen.state import VMASST_TYPE_WRITABLE_PAGETABLES
from tests.pv.xen.guest import (
    LOOPS,
    SHARED_INFO_VA,
    Asm,
    boot,
    console,
    kernel_elf,
    set_kernel_state,
)

STRATEGIES = ["full-walk", "transfer", "prevalidate", "lazy"]
PAUSE_AT_NS = 100_000  # inside the loop: "before" written, "after" not


def program() -> bytes:
    """Map shared_info (its L1 entry holds a general reference on the hypervisor page),
    set both GS bases, the kernel stack, writable page tables and CR4.FSGSBASE, write,
    loop, write again after the loop reading shared_info's first word, power off."""
    asm = (Asm()
           .emit("4889f3")  # mov rbx, rsi (start_info)
           .emit("488b4328").emit("4883c867").emit("4889c6")  # rsi = shared_info | P RW US A D
           .emit("48bf").imm64(SHARED_INFO_VA).emit("31d2")
           .emit("b8").imm32(14).emit("0f05")  # update_va_mapping
           .emit("48bf").imm64(SHARED_INFO_VA)
           .emit("48c787").imm32(3000).imm32(0x5A5A))  # mov qword [rdi + 3000], 0x5a5a
    set_kernel_state(asm)
    console(asm, "before", b"before\n")
    asm.emit("b9").imm32(LOOPS).label("loop").emit("ffc9").emit("75fc")  # dec ecx; jnz loop
    # after the update: the shared_info mapping still reaches what was written there
    asm.emit("48bf").imm64(SHARED_INFO_VA).emit("4881bf").imm32(3000).imm32(0x5A5A)
    asm.emit("7402").emit("0f0b")  # je +2; ud2 (a crash if the page was lost)
    console(asm, "after", b"after\n")
    return (asm.shutdown(0).label("before").data(b"before\n").label("after").data(b"after\n")
            .bytes())


def final_state(hv) -> tuple:
    dom = hv.domains[-1]
    v = dom.vcpus[0]
    x = v.xen
    regs = hv.read_vcpu_registers(v)
    return (dom.console_text(), dom.shutdown.reason, dom.shutdown.code, regs["gs_base"],
            x.gs_base_inactive, x.kernel_sp, x.kernel_ss, x.cr4, x.vm_assist, x.kernel_mode,
            dict(x.hypercalls), x.privops)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple:
    hv = boot(tmp_path_factory.mktemp("ref"), program())
    assert hv.run(10**9) == "shutdown"
    return final_state(hv)


def updated(hv, strategy: str, to: str = "4.12"):
    plan = UpdatePlan(to, strategy)
    new, report = live_update(hv, plan, prepare(hv, plan))
    assert new is not hv and report["outcome"] == "updated", report
    assert report["proof"]["ok"], report["proof"]
    assert report["proof"]["checks"]["xen_domains"] == 1
    return new, report


def cpl3_guest_mid_run(tmp_path, grant_table: bool = False):
    hv = boot(tmp_path, program())
    if grant_table:  # a hypervisor page the domain owns besides shared_info
        hv.domains[0].grant_table = gt.create_grant_table(hv, 0, "tiny")
    assert hv.run(PAUSE_AT_NS) == "time-limit"
    assert hv.domains[0].console_text() == "before\n"
    return hv


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_updates_a_cpl3_guest_that_ends_as_without_update(
        strategy, tmp_path, reference):
    hv = cpl3_guest_mid_run(tmp_path, grant_table=True)
    old_dom = hv.domains[0]
    shared_info, grants = old_dom.shared_info_mfn, list(old_dom.grant_table.frames)
    counts = hv.frame_table.general_counts(np.array([shared_info]))
    new, report = updated(hv, strategy)
    dom = new.domains[0]
    assert dom.vcpus[0].xen is not None
    assert dom.shared_info_mfn == shared_info and dom.grant_table.frames == grants
    if strategy == "lazy":
        assert lazy_update_of(new) is not None
        new.finish_background_work()
        assert report["proof_after_lazy"]["ok"], report["proof_after_lazy"]
    # the guest's mapping of shared_info holds its general reference in the new build too
    assert (new.frame_table.general_counts(np.array([shared_info])) == counts).all()
    assert new.check_typerefs(dom) == []
    assert new.run(10**9) == "shutdown"
    assert final_state(new) == reference
    assert new.check_typerefs(dom) == []


def test_twice_there_and_back(tmp_path, reference):
    hv = cpl3_guest_mid_run(tmp_path)
    new, _ = updated(hv, "transfer", "4.12")
    new.run(PAUSE_AT_NS + 50_000)
    newer, _ = updated(new, "full-walk", "4.19")
    assert newer.run(10**9) == "shutdown"
    assert final_state(newer) == reference


SCENARIO = """
[machine]
pcpus = 1
memory = "32M"

[[domain]]
name = "tiny"
kernel = "kernel.elf"
memory = "8M"
vcpus = 1

[limits]
virtual_time = "1s"
"""


@pytest.mark.parametrize("strategy", ["transfer", "lazy"])
def test_with_exec_the_new_process_finishes_a_cpl3_guest(strategy, tmp_path, reference):
    (tmp_path / "kernel.elf").write_bytes(kernel_elf(program()))
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(SCENARIO)
    args = ["update", str(scenario), "--at", f"{PAUSE_AT_NS}ns", "--to", "4.12",
            "--strategy", strategy, "--json"]
    results = []
    for extra in ([], ["--exec"]):
        done = subprocess.run([sys.executable, "-m", "hypervisor.cli", *args, *extra],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        results.append(json.loads(done.stdout))
    in_process, execed = results
    assert "exec" in execed["updates"][0]
    for result in results:
        assert result["outcome"] == "updated" and result["proof"]["ok"], result["updates"]
        (dom,) = result["domains"]
        assert dom["console"] == reference[0]
        assert dom["shutdown"]["code"] == 0 and dom["shutdown"]["reason"] == "poweroff"


# ------------------------------------------- page-table writes during lazy's shadow period
PLACEHOLDER_VA, PLACEHOLDER_PTE = 0x1111_2222_3333_4444, 0x5555_6666_7777_8888


def table_writer(how: str) -> bytes:
    """Loop (the update comes in the loop), then change one L1 entry: by a direct write
    the writable-page-tables assist emulates (`ptwr`: xchg into the table through the
    kernel's mapping of it) or by update_va_mapping; r14 gets the old entry or the rc."""
    asm = Asm().hypercall(21, rdi=0, rsi=VMASST_TYPE_WRITABLE_PAGETABLES)
    asm.emit("b9").imm32(LOOPS).label("loop").emit("ffc9").emit("75fc")
    asm.emit("48bf").imm64(PLACEHOLDER_VA)
    if how == "ptwr":
        asm.emit("48b8").imm64(PLACEHOLDER_PTE).emit("488707")  # xchg [rdi], rax
    else:  # update_va_mapping(va, val, flags 0)
        asm.emit("48be").imm64(PLACEHOLDER_PTE).emit("31d2").emit("b8").imm32(14).emit("0f05")
    return asm.emit("4989c6").shutdown(0).bytes()  # mov r14, rax


def _pending_l1(new, dom) -> tuple[int, int]:
    """(L1 mfn, first pfn it maps) of a table the lazy update has not validated yet,
    whose own mapping (the kernel's view of its page tables) is another L1."""
    mem = new.memory.u64
    root = dom.vcpus[0].roots.kernel_ma

    def l1_of(va: int) -> int:
        table = root
        for level in (4, 3, 2):
            table = int(mem[(table >> 3) + ((va >> (12 + 9 * (level - 1))) & 0x1FF)]) & ADDR_MASK
        return table >> 12

    for region in range(dom.nr_pages // 512):
        l1 = l1_of(dom.virt_base + region * (2 << 20))
        if l1 and not new.frame_table.validated(np.array([l1]))[0]:
            own = l1_of(dom.virt_base + int(new.m2p[l1]) * 4096)
            if own != l1:
                return l1, region * 512
    raise AssertionError("no L1 table left to the sweeper")


def table_write_during_lazy(tmp_path: Path, how: str, monkeypatch) -> dict:
    """Update a CPL-3 guest (lazy, the sweeper all but stopped) just before it changes an
    entry of an L1 table not validated yet; what the write found and did."""
    from hypervisor.pv.xen import hypercalls, ptwr

    hv = boot(tmp_path, table_writer(how))
    assert hv.run(PAUSE_AT_NS) == "time-limit"
    plan = UpdatePlan("4.12", "lazy", sweep_budget_ptes=1)
    new, report = live_update(hv, plan, prepare(hv, plan))
    dom = new.domains[0]
    l1, first_pfn = _pending_l1(new, dom)
    entry_ma, va = l1 << 12, dom.virt_base + first_pfn * 4096  # its first entry
    old = int(new.memory.u64[entry_ma >> 3])
    assert old & P
    value = (int(dom.p2m[0x300]) << 12) | (old & 0xFFF) | RW  # another data frame, writable
    target = dom.virt_base + int(new.m2p[l1]) * 4096 if how == "ptwr" else va
    text = int(dom.p2m[0x200])
    raw = new.memory.frame_u8(text).tobytes()
    raw = raw.replace(struct.pack("<Q", PLACEHOLDER_VA), struct.pack("<Q", target))
    raw = raw.replace(struct.pack("<Q", PLACEHOLDER_PTE), struct.pack("<Q", value))
    new.memory.write(text << 12, raw)
    seen: list[bool] = []  # was the table validated when the write asked for validation?
    module = ptwr if how == "ptwr" else hypercalls
    finish = module.finish_pending_typing

    def spy(domain) -> None:
        seen.append(bool(new.frame_table.validated(np.array([l1]))[0]))
        finish(domain)

    monkeypatch.setattr(module, "finish_pending_typing", spy)
    new.run(10**9)
    new.finish_background_work()
    regs = new.read_vcpu_registers(dom.vcpus[0])
    return {"dom": dom, "seen": seen, "entry": int(new.memory.u64[entry_ma >> 3]),
            "old": old, "value": value, "r14": regs["r14"], "report": report,
            "typerefs": new.check_typerefs(dom)}


@pytest.mark.parametrize("how", ["ptwr", "update_va_mapping"])
def test_a_table_write_during_lazy_validates_the_table_first(how, tmp_path, monkeypatch):
    out = table_write_during_lazy(tmp_path, how, monkeypatch)
    dom = out["dom"]
    assert dom.shutdown.reason == "poweroff", dom.crash_report
    assert out["seen"][:1] == [False]  # the table was pending when the write came
    assert out["entry"] == out["value"]
    assert out["r14"] == (out["old"] if how == "ptwr" else 0)
    assert dom.vcpus[0].xen.ptwr == (1 if how == "ptwr" else 0)
    assert out["report"]["proof_after_lazy"]["ok"]
    assert out["typerefs"] == []


def test_the_xenstore_state_crosses_json_exactly():
    """What the hand-over (and an image) carries of xenstore comes back equal, tuples as
    tuples: the proof compares the State field by field."""
    from hypervisor.pv.linux.xenstore import XenstoreState
    from hypervisor.pv.xen.image import xenstore_from_json, xenstore_to_json

    state = XenstoreState(3, {"/": b"", "/local": b"x\0y"}, [("device", "tok"), ("/a", "b")],
                          {7: (2, {"/": b""})}, 8, 5, b"part", b"\xff", 11, 1)
    assert xenstore_from_json(json.loads(json.dumps(xenstore_to_json(state)))) == state
