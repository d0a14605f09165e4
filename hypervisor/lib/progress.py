"""Progress on stderr with rich: per run, with an ETA; only when stderr is a terminal.

Nothing is drawn when stderr is not a TTY or the command got `--quiet`, and
nothing ever goes to stdout, so `--json` output is the same byte for byte.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol


class Advance(Protocol):
    def __call__(self, description: str | None = None) -> None: ...


def wanted(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


@contextmanager
def progress(total: int, what: str, quiet: bool = False) -> Iterator[Advance]:
    """`with progress(n, "runs") as advance: ... advance()` once per finished unit."""
    if not wanted(quiet):
        yield lambda description=None: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=Console(file=sys.stderr), transient=False) as bar:
        task = bar.add_task(what, total=total)

        def advance(description: str | None = None) -> None:
            bar.update(task, advance=1, description=description or what)

        yield advance
