"""`hvlab sweep GRID.toml -o OUT.csv|OUT.parquet`: run a grid, a tidy row per run.

Runs go to a local process pool (`--workers`, default 1: wall-clock columns
are distorted when runs share a small machine) or to Dask (`--dask local`
starts a `distributed.LocalCluster`; `--dask ADDRESS` submits to a running
scheduler). Rows are written as runs finish, in whatever order they finish;
the deterministic columns do not depend on how the grid ran.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from hypervisor.lib.errors import HvlabError
from hypervisor.lib.progress import progress
from hypervisor.research.grid import Run, load_grid
from hypervisor.research.runs import COLUMNS, run_one
from hypervisor.research.table import TableWriter, table_format

DASK_HINT = ("--dask needs dask.distributed: pip install -e '.[cluster]' "
             "(or pip install 'dask[distributed]')")


def run_sweep(grid: str | Path, output: str | Path, workers: int = 1, dask: str | None = None,
              resume: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Run every run of `grid` not yet in `output`; return a summary."""
    if workers < 1:
        raise HvlabError("--workers must be at least 1")
    runs = load_grid(grid)  # refused here, before anything runs
    out = Path(output)
    table_format(out)
    if dask is not None:
        _import_dask()
    writer = TableWriter(out, COLUMNS, resume)
    todo = [r for r in runs if _key(r) not in writer.done]
    executor = f"dask:{dask}" if dask is not None else "process-pool"
    if not quiet:
        print(f"hvlab sweep: {len(todo)} of {len(runs)} runs to do, {executor}, "
              f"{workers} worker(s)" + (" (wall-clock columns are distorted by parallel runs)"
                                        if workers > 1 or dask else ""), file=sys.stderr)
    results = (_dask_rows(todo, dask, workers) if dask is not None
               else _pool_rows(todo, workers))
    with progress(len(todo), "runs", quiet) as advance:
        for row in results:
            row["workers"], row["executor"] = workers, executor
            writer.add(row)
            advance(f"{row['kind']} {row['strategy'] or row['from_build']} "
                    f"{row['size_bytes']}")
    return {"runs": len(runs), "done": len(todo), "skipped": len(runs) - len(todo),
            "output": str(out)}


def _key(run: Run) -> tuple[str, ...]:
    return run.key


def _pool_rows(todo: list[Run], workers: int) -> Iterator[dict[str, Any]]:
    if workers == 1:  # in this process: nothing to pickle, tracebacks stay plain
        for run in todo:
            yield run_one(run)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        pending: set[Future] = {pool.submit(run_one, run) for run in todo}
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                yield future.result()


def _import_dask():
    try:
        import distributed
    except ImportError:
        raise HvlabError(DASK_HINT) from None
    return distributed


def _dask_rows(todo: list[Run], address: str | None, workers: int) -> Iterator[dict[str, Any]]:
    distributed = _import_dask()
    from dask import config as dask_config

    cluster = scratch = config = None
    if address == "local":
        # Dask's workers keep lock files in a scratch folder (/tmp/dask-scratch-space by
        # default): give them one of ours, removed with the cluster.
        scratch = tempfile.TemporaryDirectory(prefix="hvlab-dask-")
        config = dask_config.set({"temporary-directory": scratch.name})  # scheduler, nannies
        cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1,
                                           processes=True, dashboard_address=None,
                                           local_directory=scratch.name)
        address = cluster.scheduler_address
    try:
        with distributed.Client(address, timeout="20s") as client:
            futures = [client.submit(run_one, run, key=f"hvlab-run-{i}", pure=False)
                       for i, run in enumerate(todo)]
            for _future, row in distributed.as_completed(futures, with_results=True):
                yield row
    except OSError as err:
        raise HvlabError(f"--dask {address}: cannot reach the scheduler ({err})") from None
    finally:
        if cluster is not None:
            cluster.close()
        if config is not None:
            config.__exit__(None, None, None)  # the caller's dask configuration again
        if scratch is not None:
            scratch.cleanup()
