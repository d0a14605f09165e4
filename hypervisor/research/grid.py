"""GRID.toml: the grid a sweep runs, validated before anything runs.

    [sweep]
    kind = "update"            # or "revalidate"
    sizes = ["64M", "128M"]    # guest memory (generated layouts)
    layouts = ["linux-like"]   # generated layouts; images = [...] for stored ones
    strategies = ["full-walk", "lazy"]
    builds = ["4.19->4.12"]    # update: FROM->TO; revalidate: one build each
    seeds = [1]
    repeat = 1

One `Run` per combination and repetition, in a fixed order; its `key` names it
in the output table (what `--resume` skips).
"""

from __future__ import annotations

import itertools
import tomllib
from dataclasses import dataclass
from pathlib import Path

from hypervisor.images.guest_layouts import LAYOUTS
from hypervisor.lib.errors import HvlabError
from hypervisor.liveupdate.strategies import names as strategy_names
from hypervisor.mm.builds import BUILDS
from hypervisor.scenario import parse_size

KINDS = ("update", "revalidate")
KEYS = {"kind", "sizes", "layouts", "images", "strategies", "builds", "seeds", "repeat"}
# the revalidate bench lays out Linux-like guests only, from 8 MiB
REVALIDATE_LAYOUTS = ("linux-like",)
MIN_SIZE = 8 << 20


class GridError(HvlabError):
    """A grid that cannot run: refused before anything runs."""


@dataclass(frozen=True)
class Run:
    kind: str
    size_bytes: int  # 0 for a stored image (its size is known once it is read)
    layout: str  # generated layout, or "" for a stored image
    image: str  # stored image path, or ""
    strategy: str  # "" for revalidate
    from_build: str
    to_build: str  # == from_build for revalidate
    seed: int
    run: int

    @property
    def key(self) -> tuple[str, ...]:
        """What identifies a row in the output (the deterministic inputs)."""
        return (self.kind, str(self.size_bytes), self.layout, self.image, self.strategy,
                self.from_build, self.to_build, str(self.seed), str(self.run))


KEY_COLUMNS = ("kind", "size_bytes", "layout", "image", "strategy", "from_build", "to_build",
               "seed", "run")


def _list(grid: dict, name: str, path: Path, default: list | None = None) -> list:
    value = grid.get(name, default)
    if value is None:
        raise GridError(f"{path}: [sweep] needs '{name}'")
    if not isinstance(value, list) or not value:
        raise GridError(f"{path}: '{name}' must be a non-empty list")
    return value


def load_grid(path: str | Path) -> list[Run]:
    """The runs of the grid at `path`; GridError (one line) for anything wrong."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise GridError(f"{path}: {err}") from None
    if set(doc) != {"sweep"}:
        raise GridError(f"{path}: expected exactly one [sweep] table, got {sorted(doc)}")
    grid = doc["sweep"]
    unknown = set(grid) - KEYS
    if unknown:
        raise GridError(f"{path}: unknown key(s) {', '.join(sorted(unknown))} "
                        f"(known: {', '.join(sorted(KEYS))})")
    kind = grid.get("kind")
    if kind not in KINDS:
        raise GridError(f"{path}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    repeat = grid.get("repeat", 1)
    if not isinstance(repeat, int) or isinstance(repeat, bool) or not 1 <= repeat <= 1000:
        raise GridError(f"{path}: repeat must be an integer in 1..1000, got {repeat!r}")
    seeds = _list(grid, "seeds", path, [1])
    for seed in seeds:
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
            raise GridError(f"{path}: seeds must be integers in 0..2**32-1, got {seed!r}")

    images = grid.get("images")
    if images is not None and ("sizes" in grid or "layouts" in grid):
        raise GridError(f"{path}: give either images or sizes and layouts, not both")
    guests: list[tuple[int, str, str]] = []  # (size, layout, image)
    if images is not None:
        if kind == "revalidate":
            raise GridError(f"{path}: kind revalidate lays out its own guests: give sizes "
                            "and layouts, not images")
        for image in _list(grid, "images", path):
            if not isinstance(image, str):
                raise GridError(f"{path}: images must be paths, got {image!r}")
            resolved = (path.parent / image) if not Path(image).is_absolute() else Path(image)
            if not resolved.is_file():
                raise GridError(f"{path}: image {image} does not exist")
            guests.append((0, "", str(resolved)))
    else:
        sizes = [_size(s, path) for s in _list(grid, "sizes", path)]
        layouts = _list(grid, "layouts", path, ["linux-like"])
        allowed = REVALIDATE_LAYOUTS if kind == "revalidate" else LAYOUTS
        for layout in layouts:
            if layout not in allowed:
                raise GridError(f"{path}: layout {layout!r} is not one of "
                                f"{', '.join(allowed)} for kind {kind}")
        guests = [(s, lay, "") for lay, s in itertools.product(layouts, sizes)]

    builds = _list(grid, "builds", path, ["4.19->4.12"] if kind == "update" else ["4.19"])
    pairs = [_builds(b, kind, path) for b in builds]
    if kind == "update":
        strategies = _list(grid, "strategies", path)
        for s in strategies:
            if s not in strategy_names():
                raise GridError(f"{path}: unknown strategy {s!r} "
                                f"(choose from {', '.join(strategy_names())})")
    else:
        if "strategies" in grid:
            raise GridError(f"{path}: kind revalidate has no strategies (it rebuilds all "
                            "typerefs in bulk)")
        strategies = [""]
    runs = [Run(kind, size, layout, image, strategy, fb, tb, seed, r)
            for (size, layout, image), (fb, tb), strategy, seed, r in itertools.product(
                guests, pairs, strategies, seeds, range(repeat))]
    if len({r.key for r in runs}) != len(runs):
        raise GridError(f"{path}: the grid lists the same run twice (a repeated value)")
    return runs


def _size(value: object, path: Path) -> int:
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise GridError(f"{path}: sizes must be like \"64M\", got {value!r}")
    try:
        size = parse_size(value, "sizes")
    except HvlabError as err:
        raise GridError(f"{path}: {err}") from None
    if size < MIN_SIZE or size % 4096:
        raise GridError(f"{path}: size {value!r} must be a multiple of 4 KiB, at least 8M")
    return size


def _builds(value: object, kind: str, path: Path) -> tuple[str, str]:
    if not isinstance(value, str):
        raise GridError(f"{path}: builds must be strings, got {value!r}")
    parts = [p.strip() for p in value.split("->")]
    if kind == "update" and len(parts) != 2:
        raise GridError(f"{path}: an update build is FROM->TO, e.g. \"4.19->4.12\", "
                        f"got {value!r}")
    if kind == "revalidate" and len(parts) != 1:
        raise GridError(f"{path}: a revalidate build is one build, e.g. \"4.19\", got {value!r}")
    for b in parts:
        if b not in BUILDS:
            raise GridError(f"{path}: unknown build {b!r} (builds: {', '.join(BUILDS)})")
    return parts[0], parts[-1]
