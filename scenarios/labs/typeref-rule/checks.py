"""Checks of lab typeref-rule: the writable-mapping rule alone, then pv-hostile with it."""

from __future__ import annotations

import re

import numpy as np

from hypervisor.core.seams import Seams
from hypervisor.lib.errors import HvlabError
from hypervisor.mm.builds import PageType, get_build
from hypervisor.mm.errors import EBUSY, errno_name
from hypervisor.mm.frametable import FrameTable
from hypervisor.mm.typerefs import PageTyping, TypingInvariantError
from hypervisor.runner import run_scenario
from hypervisor.scenario import load_scenario
from hypervisor.teaching.labs import SCENARIOS, Lab, StudentCodeError

UNIT_CHECKS = ["a data page may be mapped writable", "a data page may be mapped writable twice",
               "a page table in use is never mapped writable"]
RUN_CHECKS = ["pv-hostile: every attack refused with Xen's error code",
              "pv-hostile: page types consistent afterwards",
              "pv-hostile: the bystander guest still runs"]
DOMID = 0
DATA, TABLE = 5, 9  # frames of the small machine the unit checks use


def grade(lab: Lab) -> None:
    try:
        (rule,) = lab.load("rule.py", "writable_mapping")
    except StudentCodeError as err:
        lab.check("rule.py loads", False, str(err))
        lab.not_run(UNIT_CHECKS + RUN_CHECKS, "rule.py does not load")
        return
    lab.check("rule.py loads", True, "writable_mapping() found")
    _unit_checks(lab, rule)
    _hostile(lab, rule)


def _machine() -> PageTyping:
    frames = FrameTable(16, get_build("4.19"))
    frames.assign(np.arange(1, 16, dtype=np.uint64), DOMID)
    typing = PageTyping(frames, np.zeros(16 * 512, dtype=np.uint64))
    assert typing.get_page_type(TABLE, PageType.L1) == 0  # an (empty) L1 table, in use
    return typing


def _state(typing: PageTyping, mfn: int) -> str:
    ft = typing.frames
    return f"type {ft.page_type(mfn).name}, type count {ft.type_count(mfn)}"


def _call(lab: Lab, rule, typing: PageTyping, mfn: int) -> int | str:
    try:
        with lab.student_code("writable_mapping()"):
            rc = rule(typing, mfn)
    except StudentCodeError as err:
        return str(err)
    return rc if isinstance(rc, int) else f"writable_mapping() returned {rc!r}, not an int"


def _unit_checks(lab: Lab, rule) -> None:
    typing = _machine()
    rc = _call(lab, rule, typing, DATA)
    after = _state(typing, DATA)
    ok = rc == 0 and after == "type WRITABLE, type count 1"
    lab.check(UNIT_CHECKS[0], ok,
              f"allowed; the frame is now {after}" if ok else rc if isinstance(rc, str) else
              f"your rule returned {rc} ({errno_name(rc) if rc else 'allowed'}) and left the "
              f"frame at {after}: a writable mapping of an unused frame must be allowed "
              "(0) and hold one writable type reference (type WRITABLE, count 1)")
    rc = _call(lab, rule, typing, DATA) if ok else "the first mapping failed"
    after = _state(typing, DATA)
    ok = rc == 0 and after == "type WRITABLE, type count 2"
    lab.check(UNIT_CHECKS[1], ok,
              f"allowed; the frame is now {after}" if ok else
              f"not run: {rc}" if isinstance(rc, str) else
              f"your rule returned {rc} and left the frame at {after}: every writable "
              "mapping holds its own reference (type WRITABLE, count 2)")
    typing = _machine()
    before = _state(typing, TABLE)
    rc = _call(lab, rule, typing, TABLE)
    after = _state(typing, TABLE)
    ok = rc == -EBUSY and after == before
    lab.check(UNIT_CHECKS[2], ok,
              f"refused with -EBUSY; the frame is still {after}" if ok else
              rc if isinstance(rc, str) else
              f"frame {TABLE} is an L1 page table in use ({before}); your rule returned "
              f"{rc} ({errno_name(rc) if rc else 'allowed'}) and left it at {after}: "
              "Xen refuses with -EBUSY and changes nothing")


def _hostile(lab: Lab, rule) -> None:
    try:
        result = run_scenario(load_scenario(SCENARIOS / "pv-hostile.toml"),
                              seams=Seams(writable_mapping=rule))
    except TypingInvariantError as err:
        lab.not_run(RUN_CHECKS, f"hvlab's page-type bookkeeping broke ({err}): a mapping "
                    "your rule allowed holds no writable type reference, so unmapping it "
                    "dropped a reference that was never taken")
        return
    except HvlabError as err:
        lab.not_run(RUN_CHECKS, f"the guests could not even boot ({err}): your rule refused "
                    "the writable mappings of their own data pages")
        return
    except Exception as err:  # noqa: BLE001 - the student's rule raised inside hvlab
        lab.not_run(RUN_CHECKS, f"your rule raised {type(err).__name__}: {err}")
        return
    hostile, bystander = result["domains"]
    lines = [line.split(": ", 1)[-1] for line in hostile["console"].splitlines()]
    failed = [line for line in lines if re.match(r"attack \d+:", line) and
              not line.endswith(" ok")]
    refused = next((line for line in lines if line.startswith("attacks refused:")), None)
    ok = refused == "attacks refused: 30/30" and not failed
    lab.check(RUN_CHECKS[0], ok, refused if ok else
              f"{refused or 'the attacks did not finish'}; first failures: "
              + " | ".join(failed[:3]))
    diffs = [d for dom in result["domains"] for d in dom["typeref_differences"]]
    lab.check(RUN_CHECKS[1], not diffs,
              "every frame's type and counts match a recount from the page tables"
              if not diffs else f"{len(diffs)} frames differ from a recount, first: {diffs[0]}")
    sd = bystander["shutdown"]
    ok = sd is not None and sd["reason"] == "poweroff" and sd["code"] == 0
    lab.check(RUN_CHECKS[2], ok, "pv_hello next to it passed all its checks" if ok else
              f"pv_hello next to it ended {sd}: {bystander['crash_report']}")
