"""The busybox initramfs (hypervisor.pv.linux.initramfs): byte-identical, and its workload works."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess

from hypervisor.pv.linux.cpio import read_cpio
from hypervisor.pv.linux.initramfs import (
    APPLETS,
    INIT_OK,
    WORKLOAD_OK,
    build_initramfs,
    build_initramfs_file,
    expected_workload_checksum,
)


def test_layout_without_busybox():
    members = {m.name: m for m in read_cpio(build_initramfs(b"not really busybox"))}
    assert members["bin/busybox"].data == b"not really busybox"
    for applet in APPLETS:
        assert members[f"bin/{applet}"].data == b"busybox"
    assert stat.S_ISCHR(members["dev/console"].mode) and members["dev/console"].rdev == (5, 1)
    init = members["init"].data.decode()
    assert init.startswith("#!/bin/sh\n") and members["init"].mode & 0o111
    assert INIT_OK in init and WORKLOAD_OK in init and "poweroff -f" in init
    assert "mount -t proc proc /proc" in init


def test_byte_identical_every_time(linux_build):
    first = hashlib.sha256(build_initramfs_file(linux_build.busybox)).hexdigest()
    second = hashlib.sha256(build_initramfs_file(linux_build.busybox)).hexdigest()
    assert first == second


def test_busybox_has_every_applet_init_uses(linux_build):
    listed = subprocess.run([str(linux_build.busybox), "--list"], capture_output=True,
                            check=True, text=True).stdout.split()
    assert set(APPLETS) <= set(listed)


def _unpack(archive: bytes, root) -> None:
    for m in read_cpio(archive):
        path = root / m.name
        if stat.S_ISDIR(m.mode):
            path.mkdir()
        elif stat.S_ISLNK(m.mode):
            path.symlink_to(m.data.decode())
        elif stat.S_ISREG(m.mode):
            path.write_bytes(m.data)
            path.chmod(stat.S_IMODE(m.mode))
        # device nodes: the host's /dev serves the workload


def _run_workload(root, script: bytes) -> subprocess.CompletedProcess:
    (root / "etc/workload.sh").write_bytes(script)
    env = {"PATH": str(root / "bin"), "WORKDIR": str(root / "tmp")}
    return subprocess.run([str(root / "bin/sh"), str(root / "etc/workload.sh")], env=env,
                          capture_output=True, text=True, timeout=120)


def test_workload_checksum_with_the_real_busybox(linux_build, tmp_path):
    """The archive's own busybox runs the workload on the host and prints the expected md5."""
    archive = build_initramfs_file(linux_build.busybox)
    _unpack(archive, tmp_path)
    script = (tmp_path / "etc/workload.sh").read_bytes()
    done = _run_workload(tmp_path, script)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == expected_workload_checksum()
    assert os.listdir(tmp_path / "tmp") == []  # the workers' files are cleaned up
    # a worker that does less work changes the checksum: the check can fail
    lazy = script.replace(b"count=$(((r + w) % 3 + 1))", b"count=1")
    assert lazy != script
    assert _run_workload(tmp_path, lazy).stdout.strip() != expected_workload_checksum()
