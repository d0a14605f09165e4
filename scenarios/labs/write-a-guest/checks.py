"""Checks of lab write-a-guest: build guest.s, boot it, read its console and shutdown."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import replace
from pathlib import Path

from hypervisor.runner import run_scenario
from hypervisor.scenario import load_scenario
from hypervisor.teaching.labs import SCENARIOS, Lab

BUILD = SCENARIOS / "guests" / "build-guest.sh"
WANTED_CODE = 42
RUN_CHECKS = ["boots and runs to its shutdown", "prints \"hello, hvlab\"",
              "prints \"sum 1..100 = 5050\"", f"shuts down with code {WANTED_CODE}"]


def grade(lab: Lab) -> None:
    missing = [tool for tool in ("as", "ld") if shutil.which(tool) is None]
    if not lab.check("toolchain: GNU as and ld", not missing,
                     "found" if not missing else
                     f"{' and '.join(missing)} not found on PATH: install GNU binutils "
                     "(Debian/Ubuntu: apt-get install binutils) to assemble and link "
                     "your guest"):
        lab.not_run(["guest.s builds", *RUN_CHECKS], "no assembler or linker")
        return
    with tempfile.TemporaryDirectory(prefix="hvlab-lab-") as tmp:
        kernel = Path(tmp) / "guest.elf"
        built = subprocess.run(["bash", str(BUILD), str(lab.work / "guest.s"), str(kernel)],
                               capture_output=True, text=True, env=dict(os.environ))
        errors = [line for line in built.stderr.splitlines() if line.strip()]
        if not lab.check("guest.s builds", built.returncode == 0,
                         "assembled and linked" if built.returncode == 0 else
                         "the assembler or linker said: " + " | ".join(errors[:4])):
            lab.not_run(RUN_CHECKS, "guest.s does not build")
            return
        scenario = load_scenario(lab.home / "guest.toml")
        scenario = replace(scenario, domains=(replace(scenario.domains[0], kernel=kernel),))
        result = run_scenario(scenario)
    dom = result["domains"][0]
    lines = [line.split(": ", 1)[-1] for line in dom["console"].splitlines()]
    shown = " | ".join(lines[-3:]) if lines else "nothing"
    sd = dom["shutdown"]
    if sd is None:
        ran, how = False, (f"still running after {result['virtual_ns'] / 1e6:.0f} ms of "
                           "virtual time: does it reach `jmp shutdown`?")
    elif sd["reason"] == "crash":
        ran, how = False, f"the hypervisor crashed it: {dom['crash_report']}"
    else:
        ran, how = True, f"shut down ({sd['reason']}) after {sd['virtual_ns']:,} ns"
    lab.check(RUN_CHECKS[0], ran, how)
    lab.check(RUN_CHECKS[1], "hello, hvlab" in lines,
              "printed" if "hello, hvlab" in lines else
              f"no console line \"hello, hvlab\" (your guest printed: {shown})")
    sums = [line for line in lines if line.startswith("sum 1..100 = ")]
    right = "sum 1..100 = 5050" in lines
    lab.check(RUN_CHECKS[2], right,
              "printed" if right else f"your guest printed \"{sums[0]}\"" if sums else
              f"no line starting \"sum 1..100 = \" (your guest printed: {shown})")
    code = None if sd is None else sd["code"]
    lab.check(RUN_CHECKS[3], ran and code == WANTED_CODE,
              f"code {code}" if ran and code == WANTED_CODE else
              f"it shut down with code {code} (edi when you jump to shutdown)" if ran else
              "it never shut down")
