"""The fetched Debian kernel and busybox (scenarios/linux/fetch.sh), for the tests that need them.

Without scenarios/linux/build/ these tests skip, saying how to fetch; with CI=true
they fail instead, because CI runs fetch.sh first.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

BUILD = Path(__file__).resolve().parents[3] / "scenarios" / "linux" / "build"


@dataclass(frozen=True)
class LinuxBuild:
    manifest: dict
    vmlinuz: Path
    busybox: Path


def _missing(what: str) -> None:
    message = f"{what} missing: run scenarios/linux/fetch.sh"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def linux_build() -> LinuxBuild:
    manifest_path = BUILD / "manifest.json"
    if not manifest_path.is_file():
        _missing(str(manifest_path))
    manifest = json.loads(manifest_path.read_text())
    build = LinuxBuild(manifest, BUILD / manifest["kernel"]["vmlinuz"],
                       BUILD / manifest["busybox"]["busybox"])
    for path in (build.vmlinuz, build.busybox):
        if not path.is_file():
            _missing(str(path))
    return build


@pytest.fixture(scope="session")
def vmlinux(linux_build: LinuxBuild) -> bytes:
    from hypervisor.pv.linux.kernel_image import read_kernel_elf

    return read_kernel_elf(linux_build.vmlinuz)
