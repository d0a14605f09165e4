"""The live-update part of a run's report as a person reads it (the rest: runner.py)."""

from __future__ import annotations

import sys
from typing import Any, TextIO


def print_update_report(result: dict[str, Any], out: TextIO | None = None) -> None:
    out = out if out is not None else sys.stdout
    for u in result["updates"]:
        out.write(f"live update {u['from_build']} -> {u['to_build']} at "
                  f"{u['at_ns'] / 1e6:.3f} ms, strategy {u['strategy']}: {u['outcome']}\n")
        if "blackout_wall_s" not in u:  # not started: nothing more to say
            continue
        for what in u.get("injected", []):  # --fail-at / --corrupt-stream, and what it did
            injected = what if what.startswith("corrupt") else f"a failure in phase '{what}'"
            if u.get("reason"):
                fate = f"the old build resumed ({u['reason']})"
            else:
                fate = "past the point of no return: the phase was done again, the update went on"
            out.write(f"  injected: {injected} -> {fate}\n")
        if u.get("translator"):
            out.write(f"  translator: {u['translator']}\n")
        out.write(f"  blackout {u['blackout_wall_s'] * 1e3:.1f} ms wall, modelled native "
                  f"downtime {u['modelled_downtime_ns'] / 1e6:.3f} ms\n")
        if u.get("downtime_breakdown"):
            terms = ", ".join(f"{k} {v / 1e6:.3f}" for k, v in u["downtime_breakdown"].items())
            out.write(f"  modelled downtime by phase (ms): {terms}\n")
            deferred = u.get("deferred_work_ns")
            out.write(f"  modelled work outside the blackout: before the pause "
                      f"{u['before_pause_work_ns'] / 1e6:.3f} ms, after the resume "
                      + ("not finished" if deferred is None else f"{deferred / 1e6:.3f} ms")
                      + " (`hvlab costs`: each cost's source)\n")
        phases = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in u["phases_wall_s"].items())
        out.write(f"  phases (ms wall): {phases}\n")
        if u.get("before_pause"):
            ahead = ", ".join(f"{k} {v}" for k, v in u["before_pause"].items())
            out.write(f"  before the pause, guests running: {ahead}\n")
        counters = ", ".join(f"{k} {v}" for k, v in sorted(u["counters"].items()))
        out.write(f"  counters: {counters}\n")
        proof = u["proof"]
        verdict = "ok" if proof["ok"] else "FAILED: " + "; ".join(proof["problems"])
        out.write(f"  proof of {proof.get('subject', 'the new build')}: {verdict} "
                  f"{proof.get('checks', {})}\n")
        if proof.get("blackout_interrupts", {}).get("due"):
            posts = proof["blackout_interrupts"]
            out.write(f"  device posts due in the blackout: {posts['due']}, made by the "
                      f"resume and waiting in PIR/IRR: {posts['posted']}\n")
        if "proof_after_lazy" in u:
            lazy_ok = u["proof_after_lazy"]["ok"]
            out.write(f"  proof when lazy finished: {'ok' if lazy_ok else 'FAILED'}\n")
        if u.get("throughput"):
            t = ", ".join(f"{k} {v}" for k, v in u["throughput"].items())
            out.write(f"  guest throughput (instructions per virtual ms): {t}\n")
    out.write("\n")
