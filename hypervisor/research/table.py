"""Tidy rows on disk: CSV appended a row at a time, or parquet rewritten whole.

A CSV row is written and flushed the moment its run finishes, so a killed
sweep keeps what it did. Parquet cannot be appended to: the file is rewritten
(to a temporary name, then renamed) after every row. Both read back for
`--resume`, which skips the runs whose key columns are already there.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from hypervisor.lib.errors import HvlabError
from hypervisor.research.grid import KEY_COLUMNS

FORMATS = (".csv", ".parquet")
PARQUET_HINT = "parquet needs pyarrow: pip install -e '.[cluster]' (or pip install pyarrow)"


class TableError(HvlabError):
    pass


def table_format(path: Path) -> str:
    if path.suffix not in FORMATS:
        raise TableError(f"{path}: the output must end in .csv or .parquet")
    if path.suffix == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise TableError(PARQUET_HINT) from None
    return path.suffix


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Every row of a table written by `TableWriter` (CSV values come back as strings)."""
    path = Path(path)
    fmt = table_format(path)
    try:
        if fmt == ".csv":
            with path.open(newline="") as f:
                return list(csv.DictReader(f))
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    except (OSError, ValueError, csv.Error) as err:
        raise TableError(f"{path}: {err}") from None
    except Exception as err:  # pyarrow's own errors for a file that is not parquet
        raise TableError(f"{path}: not a readable parquet file ({err})") from None


def row_key(row: dict[str, Any]) -> tuple[str, ...]:
    return tuple("" if row.get(c) is None else str(row[c]) for c in KEY_COLUMNS)


class TableWriter:
    """Writes rows with `columns` to `path`; with `resume`, keeps the rows already there."""

    def __init__(self, path: Path, columns: tuple[str, ...], resume: bool) -> None:
        self.path, self.columns = path, columns
        self.format = table_format(path)
        self.rows: list[dict[str, Any]] = []
        if resume and path.exists():
            self.rows = read_rows(path)
            if self.rows and set(self.rows[0]) != set(columns):
                raise TableError(f"{path}: its columns are not a sweep's of this build; "
                                 "write to a new file")
        elif path.exists() and not resume:
            raise TableError(f"{path} exists: pass --resume to add to it, or remove it")
        self.done = {row_key(r) for r in self.rows}
        if self.format == ".csv" and not self.rows:
            with path.open("w", newline="") as f:
                csv.DictWriter(f, columns).writeheader()

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.done.add(row_key(row))
        if self.format == ".csv":
            with self.path.open("a", newline="") as f:
                csv.DictWriter(f, self.columns).writerow(
                    {c: ("" if row.get(c) is None else row[c]) for c in self.columns})
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        temp = self.path.with_name(f".partial-{self.path.name}")
        try:
            table = pa.Table.from_pylist([{c: r.get(c) for c in self.columns}
                                          for r in self.rows])
            pq.write_table(table, temp)
            os.replace(temp, self.path)
        finally:
            temp.unlink(missing_ok=True)
