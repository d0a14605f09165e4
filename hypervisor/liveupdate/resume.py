"""`python -m hypervisor.liveupdate.resume DIR`: the new build's process after an exec.

It maps the same file-backed host memory, reads the hand-over in DIR,
completes the update (restore, typerefs, vCPU state, proof) and carries the
scenario on to its end, printing the result as the original command would.
Everything here happens after the point of no return: any failure is reported
in one line as hvlab's own, never as a traceback.
"""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

from emulator.memory import HostMemory
from hypervisor.lib.errors import HvlabError
from hypervisor.liveupdate.driver import RESUME_FILE, UpdateRun
from hypervisor.liveupdate.orchestrator import Blackout, complete_update
from hypervisor.liveupdate.proof import ProofFailed

# The status the CLI gives a failed proof: hvlab's own failure, not the user's.
INTERNAL_FAILURE = 1


def main(argv: list[str]) -> int:
    workdir = Path(argv[0])
    try:
        with (workdir / RESUME_FILE).open("rb") as f:
            run, blackout = pickle.load(f)
        assert isinstance(run, UpdateRun) and isinstance(blackout, Blackout)
        memory = HostMemory(run.scenario.memory, run.memory_file)
        new, report = complete_update(blackout, memory)
        run.record(new, report)
        result = run.carry_on(new)
    except HvlabError as err:
        print(f"hvlab: {err}", file=sys.stderr)
        return err.exit_status
    except ProofFailed as err:  # as the CLI reports it: hvlab's own fault, loud
        print(f"hvlab: PROOF FAILED: {err}", file=sys.stderr)
        return INTERNAL_FAILURE
    except Exception as err:  # noqa: BLE001 - past the point of no return: report, never a traceback
        print(f"hvlab: internal failure completing the update in the new build: "
              f"{type(err).__name__}: {err}", file=sys.stderr)
        return INTERNAL_FAILURE
    if run.output == "json":
        json.dump(result, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    elif run.output == "text":
        from hypervisor.liveupdate.report import print_update_report

        print_update_report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
