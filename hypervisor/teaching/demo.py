"""`hvlab demo`: a guided tour in the terminal, about two minutes long.

Four steps, each explained in a sentence or two: a guest boots; the page walk
of the instruction it runs; a hostile guest's attacks on the page-type rules
are refused; a live update with the lazy strategy, proven, and what it cost.
Everything shown is computed by the run, nothing is canned. Pauses give a
reader time only when stdout is a terminal and --fast is not given.
"""

from __future__ import annotations

import io
import sys
import tempfile
import textwrap
import time
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from hypervisor.api import Machine
from hypervisor.liveupdate.orchestrator import UpdatePlan
from hypervisor.liveupdate.report import print_update_report
from hypervisor.runner import run_scenario, run_with_updates
from hypervisor.scenario import load_scenario
from hypervisor.teaching.labs import LABS_ROOT, SCENARIOS

READING_CHARS_PER_S = 18  # about 200 words a minute: the pause after each explanation


class Tour:
    def __init__(self, out: TextIO, paced: bool) -> None:
        self.out, self.paced = out, paced
        self.step_no = 0

    def step(self, title: str) -> None:
        self.step_no += 1
        self.out.write(f"\n== {self.step_no}. {title} ==\n")

    def say(self, text: str) -> None:
        self.out.write(textwrap.fill(text, 78, break_on_hyphens=False) + "\n")
        self.out.flush()
        if self.paced:
            time.sleep(len(text) / READING_CHARS_PER_S)

    def show(self, lines: list[str]) -> None:
        for line in lines:
            self.out.write(f"    {line}\n")
        self.out.flush()
        if self.paced:
            time.sleep(1.0 + 0.3 * len(lines))


def run_demo(fast: bool = False, out: TextIO | None = None) -> int:
    out = out if out is not None else sys.stdout
    tour = Tour(out, paced=not fast and out.isatty())
    tour.say("hvlab runs real x86-64 guest kernels on unicorn CPUs under a Xen-style "
             "hypervisor written in Python. This tour takes about two minutes "
             "(--fast skips the pauses).")
    _boot(tour)
    _page_walk(tour)
    _hostile(tour)
    _live_update(tour)
    tour.out.write("\n")
    tour.say("Next: docs/tutorial.md (your own guest, your first live-update "
             "measurement), `hvlab lab list` for graded labs, docs/api.md for notebooks.")
    return 0


def _boot(tour: Tour) -> None:
    tour.step("A guest boots")
    tour.say("pv_hello is a paravirtualised guest: it knows it runs on a hypervisor and "
             "asks it for everything through hypercalls. It prints, checks the memory "
             "layout the domain builder gave it, and powers off.")
    m = Machine.boot(SCENARIOS / "pv-hello.toml")
    m.run()
    dom = m.report()["domains"][0]
    lines = dom["console"].splitlines()
    tour.show([*lines[:3], "...", lines[-1],
               f"shut down ({dom['shutdown']['reason']}, code {dom['shutdown']['code']}) "
               f"after {m.now:,} instructions = ns of virtual time"])


def _page_walk(tour: Tour) -> None:
    tour.step("A page walk")
    tour.say("A PV guest's page tables hold real machine frame numbers. Here is the walk "
             "of the instruction pv_hello runs 2 us after boot, level by level, with what "
             "the hypervisor's frame table says about each frame: its page type and "
             "how many references that type has.")
    m = Machine.boot(SCENARIOS / "pv-hello.toml")
    m.step(2_000)
    rip = m.registers("hello")["rip"]
    rows = m.page_walk("hello", rip)
    lines = [f"rip {rip:#x}"]
    for r in rows[:-1]:
        lines.append(f"L{r['level']} in frame {r['table']:#x}: entry {r['entry']:#018x} "
                     f"[{r['flags']}] -> frame {r['mfn']:#x}: {r['type']}, count "
                     f"{r['type_count']}{', pinned' if r['pinned'] else ''}")
    tour.show(lines)
    tour.say("Every table is typed L4..L1 and the code page is writable data: a frame "
             "has one type at a time, and it may change only when its count is zero.")


def _hostile(tour: Tour) -> None:
    tour.step("A hostile guest")
    tour.say("pv_hostile tries 30 ways to break those rules through mmu_update and "
             "mmuext_op: mapping its own page tables writable, pinning data as a page "
             "table, reaching the hypervisor's frames. Each must be refused with Xen's "
             "error code and change nothing.")
    result = run_scenario(load_scenario(SCENARIOS / "pv-hostile.toml"))
    lines = [line.split(": ", 1)[-1] for line in result["domains"][0]["console"].splitlines()]
    attacks = [line for line in lines if line.startswith("attack ")]
    verdict = next(line for line in lines if line.startswith("attacks refused"))
    tour.show([*attacks[:3], "...", attacks[-1], verdict,
               f"page types recounted independently afterwards: "
               f"{len(result['domains'][0]['typeref_differences'])} differences"])


def _live_update(tour: Tour) -> None:
    tour.step("A live update")
    tour.say("Now the hypervisor itself is replaced, 4.19 by 4.12, while a page-table "
             "churning guest and a 256 MiB Linux-like guest keep running. The new build "
             "starts with an empty frame table; the lazy strategy resumes the guests at "
             "once in shadow mode and rebuilds their page types in the background.")
    scenario = load_scenario(LABS_ROOT / "live-update" / "lab.toml")
    updates = [replace(u, strategy="lazy") for u in scenario.updates]
    with tempfile.TemporaryDirectory(prefix="hvlab-demo-handover-") as handover:
        plan = UpdatePlan(updates[0].to, "lazy", workdir=Path(handover))
        result = run_with_updates(scenario, updates, plan)
    text = io.StringIO()
    print_update_report(result, text)
    u = result["updates"][0]
    hashed = u["proof"]["checks"]["frames_hashed"]
    tour.show([line.strip() for line in text.getvalue().splitlines()[:3]] + [
        f"proof: {'ok' if u['proof']['ok'] else 'FAILED'} ({hashed:,} frames hashed, every "
        "register and page type compared)",
        f"proof when lazy finished: {'ok' if u['proof_after_lazy']['ok'] else 'FAILED'}"])
    tour.say("The blackout is what the guests lost; the modelled downtime prices the "
             "work done in it at native speed. Try --strategy full-walk on "
             "scenarios/labs/live-update/lab.toml: it rebuilds every page type in the "
             "blackout, and grows with the guest.")
