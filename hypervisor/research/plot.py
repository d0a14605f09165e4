"""`hvlab plot OUT.csv -o FIG.png|.svg|.pdf`: figures from a sweep's table (matplotlib, Agg).

Without --x/--y, the two figures this tool exists for, side by side:
blackout against guest size per strategy (modelled native, solid; wall,
dashed) and revalidation cost against PTE count. With --x and --y (and
--hue, default strategy): one plot of those columns, a line per hue value.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from hypervisor.lib.errors import HvlabError
from hypervisor.research.table import read_rows

FIGURE_FORMATS = (".png", ".svg", ".pdf")
MIB = 1 << 20
# units a column is shown in: (divisor, label)
UNITS = {"size_bytes": (MIB, "guest memory (MiB)"), "guest_bytes": (MIB, "guest memory (MiB)"),
         "ptes": (1, "page-table entries read by a full validation")}


def _label(column: str) -> tuple[float, str]:
    if column in UNITS:
        return UNITS[column]
    if column.endswith("_ns"):
        return 1e6, f"{column} (ms)"
    if column.endswith("_s"):
        return 1e-3, f"{column} (ms)"
    return 1, column


def _number(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _series(rows: list[dict], x: str, y: str, hue: str | None) -> dict[str, list]:
    """Per hue value: (x, mean y) points sorted by x (repeats averaged)."""
    groups: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        xv, yv = _number(r.get(x)), _number(r.get(y))
        if xv is not None and yv is not None:
            groups[str(r.get(hue, "")) if hue else y][xv].append(yv)
    return {name: sorted((xv, sum(ys) / len(ys)) for xv, ys in pts.items())
            for name, pts in sorted(groups.items())}


def _draw(ax, rows: list[dict], x: str, y: str, hue: str | None, style: str = "-",
          suffix: str = "") -> int:
    xdiv, xlabel = _label(x)
    ydiv, ylabel = _label(y)
    lines = 0
    # one colour per hue value, whichever column is drawn (modelled and wall match)
    names = sorted({str(r.get(hue, "")) for r in rows}) if hue else []
    for name, points in _series(rows, x, y, hue).items():
        color = f"C{names.index(name) % 10}" if name in names else None
        ax.plot([p[0] / xdiv for p in points], [p[1] / ydiv for p in points], style,
                marker="o", color=color, label=f"{name}{suffix}")
        lines += 1
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return lines


def make_figure(rows: list[dict], x: str | None = None, y: str | None = None,
                hue: str | None = "strategy"):
    """The matplotlib Figure for `rows` (no file written)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    if (x is None) != (y is None):
        raise HvlabError("plot: give both --x and --y, or neither for the default figures")
    if x is not None and y is not None:
        for column in (x, y) + ((hue,) if hue else ()):
            if rows and column not in rows[0]:
                raise HvlabError(f"plot: no column {column!r} in the table")
        fig = Figure(figsize=(7, 5), layout="constrained")
        ax = fig.add_subplot()
        if not _draw(ax, rows, x, y, hue):
            raise HvlabError(f"plot: no numeric values of {x} and {y} in the table")
        ax.set_title(f"{y} against {x}")
        ax.legend(title=hue)
        return fig

    updates = [r for r in rows if r.get("kind") == "update"]
    revalidates = [r for r in rows if r.get("kind") == "revalidate"]
    if not updates and not revalidates:
        raise HvlabError("plot: the table has no update or revalidate rows")
    fig = Figure(figsize=(13, 5), layout="constrained")
    left, right = fig.subplots(1, 2)
    if updates:
        _draw(left, updates, "size_bytes", "modelled_downtime_ns", "strategy", "-",
              " (modelled native)")
        _draw(left, updates, "size_bytes", "blackout_wall_s", "strategy", "--", " (wall)")
        left.set_ylabel("blackout (ms)")
        left.set_title("Blackout against guest size")
        left.set_xscale("log", base=2)
        left.set_yscale("log")
        left.legend(fontsize="small")
    else:
        left.set_axis_off()
    if revalidates:
        _draw(right, revalidates, "ptes", "bulk_wall_s", None, "--")
        _draw(right, revalidates, "ptes", "modelled_revalidate_ns", None, "-")
        right.set_ylabel("full revalidation (ms)")
        right.legend(["bulk (wall)", "modelled native"], fontsize="small")
    else:
        _draw(right, updates, "ptes", "typeref_downtime_ns", "strategy", "-",
              " (modelled, in the blackout)")
        right.set_ylabel("typeref work in the blackout (ms)")
        right.legend(fontsize="small")
    right.set_title("Revalidation cost against PTE count")
    right.set_xscale("log")
    right.set_yscale("symlog", linthresh=1e-3)  # prevalidate's typeref share can be 0
    right.set_ylim(bottom=0)
    return fig


def plot_table(table: str | Path, output: str | Path, x: str | None = None,
               y: str | None = None, hue: str | None = "strategy") -> dict[str, Any]:
    out = Path(output)
    if out.suffix not in FIGURE_FORMATS:
        raise HvlabError(f"{out}: the figure must end in {', '.join(FIGURE_FORMATS)}")
    if not Path(table).is_file():
        raise HvlabError(f"{table}: no such table")
    rows = read_rows(table)
    fig = make_figure(rows, x, y, hue)
    temp = out.with_name(f".partial-{out.name}")
    try:
        fig.savefig(temp, format=out.suffix[1:])
        temp.replace(out)
    finally:
        temp.unlink(missing_ok=True)
    return {"figure": str(out), "rows": len(rows), "bytes": out.stat().st_size}
