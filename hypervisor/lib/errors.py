"""What can go wrong, and the exit status each one means.

  0  done (an injected fault that was handled as designed included)
  1  the run completed and reports a failure (a failed proof or check)
  2  bad input: the user's scenario, kernel, image or options (nothing was changed)
  3  hvlab failed: a legal request it could not carry out, or a bug
  130 / 143  interrupted by SIGINT / SIGTERM (temporary files removed)
"""

from __future__ import annotations

import os
import signal
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

DONE, RUN_FAILED, BAD_INPUT, INTERNAL_FAILURE = 0, 1, 2, 3
DEBUG_ENV = "HVLAB_DEBUG"  # set to 1 to see the traceback of an internal failure


class HvlabError(Exception):
    """A problem with the user's input (scenario, kernel, image, options)."""

    exit_status = BAD_INPUT


class SaveError(HvlabError):
    """A domain cannot be saved (it has shut down, or its kind cannot be)."""


class RestoreError(HvlabError):
    """An image cannot be restored; the message names the record and its offset."""


class HvlabFailure(Exception):
    """hvlab could not carry out something legal it was asked to do: its own fault."""

    exit_status = INTERNAL_FAILURE


class Terminated(BaseException):
    """SIGTERM, raised where the process is so that cleanups run (like KeyboardInterrupt)."""

    exit_status = 128 + signal.SIGTERM


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


@contextmanager
def terminate_by_exception() -> Iterator[None]:
    """Within: SIGTERM unwinds the stack (finally blocks remove temporary files)
    instead of killing the process on the spot."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: signals cannot be handled here
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def failure_line(err: BaseException) -> tuple[str, int]:
    """The one line printed for `err`, and the exit status it means."""
    if isinstance(err, HvlabError):  # (a subclass may report a failed check: status 1)
        return f"hvlab: {err}", err.exit_status
    if isinstance(err, KeyboardInterrupt):
        return "hvlab: interrupted", 128 + signal.SIGINT
    if isinstance(err, Terminated):
        return "hvlab: terminated", Terminated.exit_status
    status = getattr(err, "exit_status", INTERNAL_FAILURE)
    if status == RUN_FAILED:  # a completed check said no (e.g. ProofFailed)
        return f"hvlab: {getattr(err, 'headline', 'FAILED')}: {err}", RUN_FAILED
    kind = "" if isinstance(err, HvlabFailure) else f" ({type(err).__name__})"
    hint = "" if os.environ.get(DEBUG_ENV) else f" [{DEBUG_ENV}=1 shows the traceback]"
    return f"hvlab: internal failure{kind}: {err}{hint}", INTERNAL_FAILURE


def report_failure(err: BaseException) -> int:
    """Print `err` as one line on stderr (with the traceback under HVLAB_DEBUG=1 for
    hvlab's own failures); return the exit status."""
    import sys

    line, status = failure_line(err)
    if status == INTERNAL_FAILURE and os.environ.get(DEBUG_ENV):
        traceback.print_exception(err, file=sys.stderr)
    print(line, file=sys.stderr)
    return status
