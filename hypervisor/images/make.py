"""`hvlab image make`: a large PV guest image, mostly XALLOC, around a small workload kernel.

How an image is made (all in a scratch hypervisor, nothing persists but the file):

1. boot the workload kernel with the real PV builder (Xen's start of day) in a
   one-pCPU machine whose host memory is the guest's size, the M2P and a
   margin (anonymous MAP_NORESERVE memory: only the pages written cost RAM);
2. lay the chosen page-table layout (`guest_layouts`) into the domain's free
   frames and make it live through the typing rules (bulk validation, and
   `mod_l4_entry` for the hook into the running L4);
3. run the workload for `RUN_NS` of virtual time, so the image is saved
   mid-run, and check the typeref invariant;
4. save with `hypervisor.images.domains.save_domain` (pages never written go out as
   XALLOC, so a 64 GiB guest costs its page tables and P2M list on disk).

Same arguments, same seed: the same bytes (the hypervisor's virtual time is
deterministic and the layout's only source of choice is the seeded rng).
"""

from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from emulator.addr import PAGE_SIZE
from hypervisor.core.hypervisor import Hypervisor, MachineConfig
from hypervisor.images.domains import save_domain
from hypervisor.lib.progress import progress
from hypervisor.pv.linux.domain import create_linux_domain, load_plan
from hypervisor.pv.linux.layout import plan_start_of_day

from .common import ImageError
from .guest_layouts import BUILDERS, LAYOUTS, Builder, LayoutError

GUESTS_DIR = Path(__file__).resolve().parents[2] / "scenarios" / "guests"
# The dedicated workload kernel if it has been written, else the spinning one.
WORKLOAD_KERNELS = ("pv_imagework.elf", "pv_spin.elf")
KINDS = ("pv",)  # HVM images come from `hvlab save` of a running HVM domain
PROGRESS_FROM = 1 << 30  # guests from 1 GiB get a progress bar
RUN_NS = 1_000_000  # 1 ms of virtual time (a million instructions) before the save
MIN_MEMORY = 16 << 20
MAX_MEMORY = 256 << 30
HOST_MARGIN = 1 << 20  # mfn 0, the hypervisor's and Xen's GDT pages, shared_info, room to spare
M2P_BYTES_PER_PAGE = 8  # the read-only M2P Xen's ABI shows the guest: 8 bytes per host frame


def host_memory(mem_bytes: int) -> int:
    """The scratch machine's memory: the guest's, the M2P covering all of it, the margin."""
    frames = -(-(mem_bytes + HOST_MARGIN) // (PAGE_SIZE - M2P_BYTES_PER_PAGE))
    return frames * PAGE_SIZE


def workload_kernel(kernel: str | os.PathLike[str] | None = None) -> Path:
    if kernel is not None:
        return Path(kernel)
    for name in WORKLOAD_KERNELS:
        if (GUESTS_DIR / name).is_file():
            return GUESTS_DIR / name
    raise ImageError(f"no workload kernel in {GUESTS_DIR} (looked for "
                     f"{', '.join(WORKLOAD_KERNELS)})")


def _check_arguments(kind: str, mem_bytes: int, layout: str, seed: int) -> None:
    if kind not in KINDS:
        raise ImageError(f"image make: kind {kind!r} is not one of {', '.join(KINDS)}")
    if layout not in LAYOUTS:
        raise ImageError(f"image make: layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    if not isinstance(mem_bytes, int) or mem_bytes % PAGE_SIZE:
        raise ImageError(f"image make: memory {mem_bytes!r} is not a whole number of 4 KiB pages")
    if not MIN_MEMORY <= mem_bytes <= MAX_MEMORY:
        raise ImageError(f"image make: memory {_size(mem_bytes)} is outside "
                         f"{_size(MIN_MEMORY)}..{_size(MAX_MEMORY)}")
    if not isinstance(seed, int) or seed < 0:
        raise ImageError(f"image make: seed {seed!r} must be a non-negative integer")


def _size(n: int) -> str:
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def image_make(kind: str, mem_bytes: int, layout: str, seed: int,
               out_path: str | os.PathLike[str], *, out: TextIO | None = None,
               kernel: str | os.PathLike[str] | None = None,
               quiet: bool = True) -> dict[str, Any]:
    """Generate a guest image at `out_path` (zstd if it ends in .zst); return statistics.

    `kind` "pv" (the only kind), `layout` one of LAYOUTS, `mem_bytes` the
    guest's memory. Bad arguments raise ImageError; the file is written under
    a temporary name and renamed at the end, so a failure leaves no image.
    """
    out = sys.stdout if out is None else out
    _check_arguments(kind, mem_bytes, layout, seed)
    path = Path(out_path)
    kernel_path = workload_kernel(kernel)
    temp = path.with_name(f".partial-{path.name}")
    times: dict[str, float] = {}
    started = last = time.perf_counter()
    # progress on stderr only for large guests (small ones take well under a second)
    with progress(5, f"image make {_size(mem_bytes)}",
                  quiet or mem_bytes < PROGRESS_FROM) as advance:

        def lap(name: str) -> None:
            nonlocal last
            now = time.perf_counter()
            times[name] = round(now - last, 3)
            last = now
            advance(f"image make {_size(mem_bytes)}: {name.removesuffix('_s')} done")

        nr_pages = mem_bytes // PAGE_SIZE
        name = f"{kind}-{layout}-{_size(mem_bytes)}"
        hv = Hypervisor(MachineConfig(pcpus=1, memory=host_memory(mem_bytes)))
        try:
            dom = create_linux_domain(hv, name, kernel_path, mem_bytes, 1, "", None)
            start_of_day = plan_start_of_day(load_plan(kernel_path), nr_pages)
            lap("boot_s")
            builder = Builder(hv, dom, start_of_day.mapped_pages, seed)
            BUILDERS[layout](builder)
            lap("layout_s")
            stop = hv.run(RUN_NS)
            if not dom.alive:
                raise LayoutError(f"the workload kernel {kernel_path.name} stopped before the "
                                  f"save ({stop}): {dom.crash_report or dom.shutdown}")
            lap("run_s")
            diffs = hv.check_typerefs(dom)
            if diffs:
                raise LayoutError(f"layout {layout}: typeref invariant broken: {diffs[0]} "
                                  f"({len(diffs)} differences)")
            lap("check_s")
            try:
                saved = save_domain(hv, dom, temp)
                os.replace(temp, path)
            finally:
                temp.unlink(missing_ok=True)
            lap("save_s")
        finally:
            hv.teardown()
    times["total_s"] = round(time.perf_counter() - started, 3)
    added = builder.added
    stats: dict[str, Any] = {
        "path": os.fspath(path),
        "kind": kind,
        "layout": layout,
        "seed": seed,
        "memory_bytes": mem_bytes,
        "nr_pages": nr_pages,
        "kernel": kernel_path.name,
        "build": hv.build,
        "run_virtual_ns": RUN_NS,
        "tables_added": {f"L{lvl}": n for lvl, n in added.tables.items()},
        "pins_added": added.pins,
        "l1_entries_added": added.l1_entries,
        "save": saved,
        "file_bytes": path.stat().st_size,
        "wall": times,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    _print(stats, out)
    return stats


def _print(s: dict[str, Any], out: TextIO) -> None:
    tables = ", ".join(f"{k} {v:,}" for k, v in s["tables_added"].items())
    wall = ", ".join(f"{k[:-2]} {v:.2f}" for k, v in s["wall"].items() if k != "total_s")
    out.write(
        f"{s['path']}: {s['kind']} {s['layout']} guest of {_size(s['memory_bytes'])} "
        f"({s['nr_pages']:,} pages), kernel {s['kernel']}, seed {s['seed']}\n"
        f"  tables added {tables}; {s['l1_entries_added']:,} L1 entries, "
        f"{s['pins_added']} pins\n"
        f"  {s['file_bytes']:,} bytes on disk ({s['save']['data_pages']:,} pages with data, "
        f"{s['save']['xalloc_pages']:,} XALLOC)\n"
        f"  wall {s['wall']['total_s']:.2f} s ({wall}), peak RSS "
        f"{s['peak_rss_bytes'] / (1 << 20):,.0f} MiB\n")
