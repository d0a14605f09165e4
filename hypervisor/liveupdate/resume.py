"""`python -m hypervisor.liveupdate.resume DIR temporary|kept`: the new build's process
after an exec.

It maps the same file-backed host memory, reads the hand-over in DIR,
completes the update (restore, typerefs, vCPU state, proof) and carries the
run on to its end, printing the result as the original command would.
Everything here happens after the point of no return: any failure is one line
with its exit status (hypervisor/lib/errors.py), never a traceback. The
hand-over (unless kept) is removed on every path; the memory file was unlinked
when created (this process reaches it through an inherited descriptor).
"""

from __future__ import annotations

import pickle
import shutil
import sys
from pathlib import Path

from emulator.memory import HostMemory
from hypervisor.lib.errors import report_failure, terminate_by_exception
from hypervisor.liveupdate.driver import RESUME_FILE, UpdateRun, hvlab_failure
from hypervisor.liveupdate.orchestrator import Blackout, complete_update


def main(argv: list[str]) -> int:
    workdir, temporary = Path(argv[0]), argv[1:] == ["temporary"]  # else never removed
    run: UpdateRun | None = None
    try:
        with terminate_by_exception():
            try:
                with (workdir / RESUME_FILE).open("rb") as f:
                    run, blackout = pickle.load(f)
                assert isinstance(run, UpdateRun) and isinstance(blackout, Blackout)
            finally:  # unreadable: nobody else will remove it
                if run is None and temporary:
                    shutil.rmtree(workdir, ignore_errors=True)
            memory = HostMemory(run.memory_bytes, run.memory_file)
            with hvlab_failure(f"update to {blackout.plan.to_build} "
                               f"({blackout.plan.strategy}), in the new process"):
                new, report = complete_update(blackout, memory)
            run.record(new, report)
            result = run.carry_on(new)  # (a further update with --exec execs again)
            if run.emit is not None:
                run.emit(result)
    except BrokenPipeError:
        return 0
    except BaseException as err:  # noqa: BLE001 - one line and the status of its kind
        if isinstance(err, SystemExit):
            raise
        return report_failure(err)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
