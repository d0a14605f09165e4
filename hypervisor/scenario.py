"""Scenario files (TOML): the machine, its domains and the run's limits.

```toml
[machine]
pcpus = 2              # physical CPUs
memory = "64M"         # host memory: bytes, or with K/M/G suffix
quantum = "1ms"        # optional: virtual time per scheduling slice
build = "4.19"         # optional: the hypervisor build that boots

[[domain]]
name = "hello"
kernel = "guests/pv_hello.elf"   # relative to this file
# image = "images/x.img.zst"     # instead of kernel: restore a saved guest
memory = "4M"                    # (with image: taken from the image)
vcpus = 1
type = "pv"            # optional; "pv" is the default, or "hvm"
# pod = true           # HVM only: populate-on-demand (memory backed on first touch)
# cmdline = "console=hvc0"       # PV kernels on Xen's ABI (Linux): the command line
# busybox = "linux/build/busybox/bin/busybox"  # ... and the initramfs built around it

# [[domain.source]]    # HVM only, several allowed: a device posting an interrupt
# name = "disk"
# vcpu = 0             # the vCPU whose posted-interrupt descriptor it posts into
# vector = 0x50        # 32..255
# period = "50us"
# start = "200us"      # optional: first post (default: one period in)
# count = 100          # optional: stop after this many posts

[limits]
virtual_time = "2s"    # stop after this much virtual time (ns/us/ms/s suffixes)

[[update]]             # optional, several allowed: a live update during the run
at = "5ms"
to = "4.12"
strategy = "lazy"      # full-walk | transfer | lazy | prevalidate
```

Every key is checked: a key that is unknown or of the wrong type is an
error naming the key, never silently ignored.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypervisor.hvm.domain import SourceConfig
from hypervisor.lib.errors import HvlabError
from hypervisor.mm.builds import BuildError, get_build

_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)
_TIME = re.compile(r"^\s*(\d+)\s*(ns|us|ms|s)\s*$")
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_TIME_UNITS = {"ns": 1, "us": 1_000, "ms": 1_000_000, "s": 1_000_000_000}


class ScenarioError(HvlabError):
    pass


@dataclass(frozen=True)
class DomainSpec:
    name: str
    kernel: Path | None  # exactly one of kernel and image
    memory: int
    vcpus: int
    type: str = "pv"  # "pv", "hvm", or "image" (an image's own header decides)
    image: Path | None = None
    pod: bool = False  # HVM: populate-on-demand
    sources: tuple[SourceConfig, ...] = ()  # HVM: interrupt sources
    cmdline: str = ""  # Linux PV: the kernel command line
    busybox: Path | None = None  # Linux PV: the initramfs's busybox


@dataclass(frozen=True)
class UpdateSpec:
    """A live update during the run (several allowed, in time order)."""

    at_ns: int
    to: str
    strategy: str


@dataclass(frozen=True)
class Scenario:
    path: Path
    pcpus: int
    memory: int
    quantum_ns: int
    domains: tuple[DomainSpec, ...]
    virtual_time_ns: int
    updates: tuple[UpdateSpec, ...] = ()
    build: str = "4.19"


def parse_size(value: Any, where: str) -> int:
    """A positive size: bytes, or a string with an optional K/M/G/T suffix."""
    size = None
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and (m := _SIZE.match(value)):
        size = int(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]
    if size is None or size <= 0:
        raise ScenarioError(f"{where}: expected a size like \"64M\" (more than zero), "
                            f"got {value!r}")
    return size


def parse_time(value: Any, where: str) -> int:
    """A positive time, always with its unit (a bare number would silently be ns)."""
    m = _TIME.match(value) if isinstance(value, str) else None
    ns = int(m.group(1)) * _TIME_UNITS[m.group(2)] if m else 0
    if ns <= 0:
        raise ScenarioError(f"{where}: expected a time like \"2s\" or \"500us\" (more than "
                            f"zero, with its unit: ns, us, ms, s), got {value!r}")
    return ns


def _table(data: dict[str, Any], key: str, where: str, required: bool = True) -> dict[str, Any]:
    value = data.get(key)
    if value is None:
        if required:
            raise ScenarioError(f"{where}: missing table [{key}]")
        return {}
    if not isinstance(value, dict):
        raise ScenarioError(f"{where}: [{key}] must be a table")
    return value


def _check_keys(table: dict[str, Any], allowed: set[str], where: str) -> None:
    for key in table:
        if key not in allowed:
            raise ScenarioError(f"{where}: unknown key '{key}' (allowed: "
                                f"{', '.join(sorted(allowed))})")


def _int(table: dict[str, Any], key: str, where: str, default: int | None = None) -> int:
    value = table.get(key, default)
    if value is None:
        raise ScenarioError(f"{where}: missing key '{key}'")
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ScenarioError(f"{where}: '{key}' must be a positive integer, got {value!r}")
    return value


def _str(table: dict[str, Any], key: str, where: str, default: str | None = None) -> str:
    value = table.get(key, default)
    if value is None:
        raise ScenarioError(f"{where}: missing key '{key}'")
    if not isinstance(value, str):
        raise ScenarioError(f"{where}: '{key}' must be a string, got {value!r}")
    return value


def load_scenario(path: str | Path) -> Scenario:
    path = Path(path)
    where = str(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ScenarioError(f"{where}: no such scenario file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ScenarioError(f"{where}: cannot read ({err})") from None
    except tomllib.TOMLDecodeError as err:
        raise ScenarioError(f"{where}: not valid TOML ({err})") from None
    _check_keys(data, {"machine", "domain", "limits", "update"}, where)

    machine = _table(data, "machine", where)
    _check_keys(machine, {"pcpus", "memory", "quantum", "build"}, f"{where} [machine]")
    build = _str(machine, "build", f"{where} [machine]", "4.19")
    try:
        get_build(build)
    except BuildError as err:
        raise ScenarioError(f"{where} [machine] build: {err}") from None
    pcpus = _int(machine, "pcpus", f"{where} [machine]", 1)
    if pcpus > 64:
        raise ScenarioError(f"{where} [machine]: pcpus must be at most 64")
    memory = parse_size(machine.get("memory", "64M"), f"{where} [machine] memory")
    if memory % 4096:
        raise ScenarioError(f"{where} [machine] memory: not a multiple of 4 KiB")
    quantum = parse_time(machine.get("quantum", "1ms"), f"{where} [machine] quantum")

    raw_domains = data.get("domain")
    if not isinstance(raw_domains, list) or not raw_domains:
        raise ScenarioError(f"{where}: needs at least one [[domain]]")
    domains = []
    for i, raw in enumerate(raw_domains):
        dwhere = f"{where} [[domain]] #{i + 1}"
        if not isinstance(raw, dict):
            raise ScenarioError(f"{dwhere}: must be a table")
        _check_keys(raw, {"name", "kernel", "image", "memory", "vcpus", "type", "pod",
                          "source", "cmdline", "busybox"}, dwhere)
        name = _str(raw, "name", dwhere)
        dwhere = f"{where} domain '{name}'"
        kind = _str(raw, "type", dwhere, "pv")
        if kind not in ("pv", "hvm"):
            raise ScenarioError(f"{dwhere}: type must be \"pv\" or \"hvm\" (got {kind!r})")
        if kind == "pv" and ("pod" in raw or "source" in raw):
            raise ScenarioError(f"{dwhere}: 'pod' and [[domain.source]] are for HVM domains")
        if "image" in raw and ("pod" in raw or "source" in raw):
            raise ScenarioError(f"{dwhere}: an image brings its own memory and devices "
                                "('pod' and [[domain.source]] are for kernels)")
        pod = raw.get("pod", False)
        if not isinstance(pod, bool):
            raise ScenarioError(f"{dwhere}: 'pod' must be true or false, got {pod!r}")
        if ("kernel" in raw) == ("image" in raw):
            raise ScenarioError(f"{dwhere}: give exactly one of 'kernel' and 'image'")
        kernel = image = None
        if "kernel" in raw:
            kernel = (path.parent / _str(raw, "kernel", dwhere)).resolve()
        else:
            image = (path.parent / _str(raw, "image", dwhere)).resolve()
        dmem = parse_size(raw.get("memory", "4M"), f"{dwhere} memory")
        vcpus = _int(raw, "vcpus", dwhere, 1)
        sources = _sources(raw.get("source", []), vcpus, dwhere)
        if ("cmdline" in raw or "busybox" in raw) and (kind != "pv" or kernel is None):
            raise ScenarioError(f"{dwhere}: 'cmdline' and 'busybox' are for PV kernels")
        cmdline = _str(raw, "cmdline", dwhere, "")
        busybox = (path.parent / _str(raw, "busybox", dwhere)).resolve() if "busybox" in raw \
            else None
        if image is not None and "type" not in raw:
            kind = "image"  # the image's domain header says whether it is PV or HVM
        domains.append(DomainSpec(name, kernel, dmem, vcpus, kind, image, pod, sources,
                                  cmdline, busybox))
    names = [d.name for d in domains]
    if len(set(names)) != len(names):
        raise ScenarioError(f"{where}: domain names must be unique")

    limits = _table(data, "limits", where, required=False)
    _check_keys(limits, {"virtual_time"}, f"{where} [limits]")
    vtime = parse_time(limits.get("virtual_time", "10s"), f"{where} [limits] virtual_time")
    raw_updates = data.get("update", [])
    if not isinstance(raw_updates, list):
        raise ScenarioError(f"{where}: updates are written [[update]]")
    updates = []
    for i, raw in enumerate(raw_updates):
        uwhere = f"{where} [[update]] #{i + 1}"
        if not isinstance(raw, dict):
            raise ScenarioError(f"{uwhere}: must be a table")
        _check_keys(raw, {"at", "to", "strategy"}, uwhere)
        updates.append(UpdateSpec(parse_time(raw.get("at"), f"{uwhere} at"),
                                  _str(raw, "to", uwhere), _str(raw, "strategy", uwhere)))
    updates.sort(key=lambda u: u.at_ns)
    return Scenario(path, pcpus, memory, quantum, tuple(domains), vtime, tuple(updates), build)


def _sources(raw_sources: Any, vcpus: int, where: str) -> tuple[SourceConfig, ...]:
    """[[domain.source]] tables: interrupt sources of an HVM domain."""
    if not isinstance(raw_sources, list):
        raise ScenarioError(f"{where}: interrupt sources are written [[domain.source]]")
    sources: list[SourceConfig] = []
    for i, raw in enumerate(raw_sources):
        swhere = f"{where} [[domain.source]] #{i + 1}"
        if not isinstance(raw, dict):
            raise ScenarioError(f"{swhere}: must be a table")
        _check_keys(raw, {"name", "vcpu", "vector", "period", "start", "count"}, swhere)
        name = _str(raw, "name", swhere)
        swhere = f"{where} source '{name}'"
        vcpu = raw.get("vcpu", 0)
        if not isinstance(vcpu, int) or isinstance(vcpu, bool) or not 0 <= vcpu < vcpus:
            raise ScenarioError(f"{swhere}: 'vcpu' must be 0..{vcpus - 1}, got {vcpu!r}")
        vector = raw.get("vector")
        if not isinstance(vector, int) or isinstance(vector, bool) or not 32 <= vector <= 255:
            raise ScenarioError(f"{swhere}: 'vector' must be 32..255, got {vector!r}")
        period = parse_time(raw.get("period"), f"{swhere} period")
        start = parse_time(raw["start"], f"{swhere} start") if "start" in raw else None
        count = _int(raw, "count", swhere) if "count" in raw else None
        sources.append(SourceConfig(name, vcpu, vector, period, start, count))
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ScenarioError(f"{where}: interrupt source names must be unique")
    if len({(s.vcpu, s.vector) for s in sources}) != len(sources):
        raise ScenarioError(f"{where}: two interrupt sources share a vCPU and a vector")
    return tuple(sources)
