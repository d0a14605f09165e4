"""The researcher's subcommands: `hvlab sweep`, `hvlab plot`, `hvlab costs`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    sweep = sub.add_parser("sweep", help="run a grid of updates or revalidations to a table")
    sweep.add_argument("grid", help="GRID.toml with a [sweep] table")
    sweep.add_argument("-o", "--output", required=True, help="OUT.csv or OUT.parquet")
    sweep.add_argument("--workers", type=int, default=1,
                       help="runs at once (default 1: parallel runs distort wall-clock columns)")
    sweep.add_argument("--dask", metavar="local|ADDRESS",
                       help="run on Dask: 'local' starts a LocalCluster, else a scheduler "
                            "address (needs pip install -e '.[cluster]')")
    sweep.add_argument("--resume", action="store_true", help="skip runs already in OUT")
    sweep.add_argument("--quiet", action="store_true", help="no progress or notes on stderr")
    sweep.add_argument("--json", action="store_true", help="print the summary as JSON")
    sweep.set_defaults(func=_cmd_sweep)

    plot = sub.add_parser("plot", help="figures from a sweep's table")
    plot.add_argument("table", help="OUT.csv or OUT.parquet from hvlab sweep")
    plot.add_argument("-o", "--output", required=True, help="FIG.png, .svg or .pdf")
    plot.add_argument("--x", help="column on the x axis (with --y; default: the standard "
                                  "figures)")
    plot.add_argument("--y", help="column on the y axis")
    plot.add_argument("--hue", default="strategy", help="a line per value of this column")
    plot.set_defaults(func=_cmd_plot)

    costs = sub.add_parser("costs", help="the downtime model's cost table and its sources")
    costs.add_argument("--json", action="store_true")
    costs.add_argument("--measure", action="store_true",
                       help="also measure the measured costs on this machine now")
    costs.set_defaults(func=_cmd_costs)


def _cmd_sweep(args: argparse.Namespace) -> int:
    from hypervisor.research.sweep import run_sweep

    summary = run_sweep(args.grid, args.output, args.workers, args.dask, args.resume,
                        args.quiet)
    if args.json:
        json.dump(summary, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(f"{summary['done']} runs done, {summary['skipped']} already there: "
              f"{summary['output']}")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from hypervisor.research.plot import plot_table

    result = plot_table(args.table, args.output, args.x, args.y, args.hue)
    print(f"{result['figure']}: {result['rows']} rows, {result['bytes']:,} bytes")
    return 0


def measure_memory(size: int = 256 << 20, passes: int = 5) -> dict[str, float]:
    """ns per 32-byte frame-table row: filling (initialising) and copying, best of `passes`."""
    import numpy as np

    src = np.ones(size, np.uint8)
    dst = np.zeros(size, np.uint8)
    rows = size / 32
    fill = copy = float("inf")
    for _ in range(passes):
        started = time.perf_counter()
        dst.fill(0)
        fill = min(fill, time.perf_counter() - started)
        started = time.perf_counter()
        np.copyto(dst, src)
        copy = min(copy, time.perf_counter() - started)
    return {"frame_table_row_init": round(fill / rows * 1e9, 3),
            "frame_copied": round(copy / rows * 1e9, 3)}


def _cmd_costs(args: argparse.Namespace) -> int:
    from hypervisor.liveupdate import costs as model

    table: dict[str, Any] = {
        "costs": {k: {"ns": c.ns, "origin": c.origin, "source": c.source}
                  for k, c in model.COST_TABLE.items()},
        "terms": list(model.TERMS),
        "anchors": list(model.ANCHORS),
    }
    if args.measure:
        table["measured_here_wall"] = measure_memory()
    if args.json:
        json.dump(table, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    width = max(map(len, table["costs"]))
    print("cost (ns per unit)   origin: source")
    for key, row in table["costs"].items():
        print(f"{key:<{width}} {row['ns']:>12,.2f}  {row['origin']}: {row['source']}")
    print("\nblackout terms (modelled_downtime_ns is their sum): " + ", ".join(model.TERMS))
    print("published anchors (whole updates):")
    for anchor in model.ANCHORS:
        print(f"  - {anchor}")
    if args.measure:
        for key, ns in table["measured_here_wall"].items():
            print(f"measured on this machine now: {key} {ns} ns")
    return 0
