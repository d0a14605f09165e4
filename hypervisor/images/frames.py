"""`hvlab image frames`: one row per guest frame with its type state, as a hypervisor holds it.

The type count, the pinned and validated bits live in the hypervisor's frame
table, not in the stream, so the image is restored (on the build that saved
it) and its frame table read; or a scenario is run to `--at T` and one of its
domains read live. Columns: pfn, mfn, type (Xen's PGT_* name), type_count,
pinned, validated, general_count.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from hypervisor.lib.errors import HvlabError
from hypervisor.mm.builds import PageType

COLUMNS = ("pfn", "mfn", "type", "type_count", "pinned", "validated", "general_count")
_TYPE_NAMES = {int(t): t.name.lower() for t in PageType}


def domain_frames(hv, dom) -> dict[str, np.ndarray]:
    """The columns for every pfn of PV domain `dom` (arrays in pfn order)."""
    if dom.kind != "pv":
        raise HvlabError(f"domain {dom.name} is {dom.kind}: only PV frames have page types")
    mfns = dom.p2m.astype(np.int64)
    ft = hv.frame_table
    return {"pfn": np.arange(mfns.size), "mfn": mfns, "type": ft.types(mfns),
            "type_count": ft.type_counts(mfns), "pinned": ft.pinned(mfns),
            "validated": ft.validated(mfns), "general_count": ft.general_counts(mfns)}


def write_csv(columns: dict[str, np.ndarray], out: TextIO) -> int:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    types = [_TYPE_NAMES.get(int(t), str(int(t))) for t in columns["type"].tolist()]
    rows = zip(columns["pfn"].tolist(), columns["mfn"].tolist(), types,
               columns["type_count"].tolist(), columns["pinned"].astype(int).tolist(),
               columns["validated"].astype(int).tolist(),
               columns["general_count"].tolist(), strict=True)
    count = 0
    for row in rows:
        writer.writerow(row)
        count += 1
    return count


def summary(columns: dict[str, np.ndarray]) -> dict[str, Any]:
    types, counts = np.unique(columns["type"], return_counts=True)
    return {"frames": int(columns["pfn"].size),
            "types": {_TYPE_NAMES.get(int(t), str(int(t))): int(c)
                      for t, c in zip(types.tolist(), counts.tolist(), strict=True)},
            "pinned": int(columns["pinned"].sum()), "validated": int(columns["validated"].sum())}


def image_frames(path: str | Path) -> dict[str, np.ndarray]:
    """Restore the image at `path` on its own build and read its frames."""
    from hypervisor.core.hypervisor import Hypervisor, MachineConfig
    from hypervisor.images.domains import restore_domain
    from hypervisor.images.info import image_info

    info = image_info(path, out=io.StringIO())
    if info["domain_type"] != "pv":
        raise HvlabError(f"{path}: an HVM image: only PV frames have page types")
    guest = info["memory_bytes"]
    hv = Hypervisor(MachineConfig(1, guest + max(64 << 20, guest // 32)), info["build"])
    try:
        dom = restore_domain(hv, path)
        return domain_frames(hv, dom)
    finally:
        hv.teardown()
