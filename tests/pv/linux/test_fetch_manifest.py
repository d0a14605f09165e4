"""What scenarios/linux/fetch.sh left behind: the manifest names real packages and its
hashes match the extracted files (a changed or truncated file shows here)."""

from __future__ import annotations

import hashlib
import re
import subprocess
from pathlib import Path

from tests.pv.linux.conftest import BUILD

ROOT = Path(__file__).resolve().parents[3]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_manifest_matches_the_files(linux_build):
    kernel, busybox = linux_build.manifest["kernel"], linux_build.manifest["busybox"]
    assert re.fullmatch(r"linux-image-6\.1\.0-\d+-amd64", kernel["package"])
    assert kernel["version"].startswith("6.1.")
    assert busybox["package"] == "busybox-static"
    assert sha256(linux_build.vmlinuz) == kernel["vmlinuz_sha256"]
    assert sha256(linux_build.busybox) == busybox["busybox_sha256"]
    if kernel["system_map"] is not None:
        assert sha256(BUILD / kernel["system_map"]) == kernel["system_map_sha256"]


def test_downloads_are_ignored_by_git(linux_build):
    ignored = subprocess.run(["git", "check-ignore", "-q", str(linux_build.vmlinuz)], cwd=ROOT)
    assert ignored.returncode == 0
