"""The Linux guest's initramfs: busybox, an /init that proves the boot and a page-table workload.

/init mounts proc, prints `hvlab-linux: init ok`, runs /etc/workload.sh and
prints `hvlab-linux: workload ok <md5>`, then powers off. The workload forks
WORKERS processes per round for ROUNDS rounds; each one's dd maps a buffer
larger than malloc's mmap threshold, fills it from /dev/zero (touching every
page) and unmaps it when it exits, so every round creates and destroys page
tables. Each worker's data depends on its round and index, so the printed
checksum (an md5 over the workers' md5 lines, `expected_workload_checksum`)
proves that every worker ran to completion.

The archive is byte-identical for the same busybox: fixed member order,
inode numbers, owners and mtime 0.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from hypervisor.pv.linux.cpio import CpioMember, write_cpio

ROUNDS = 3
WORKERS = 4
BLOCK = 256 << 10  # above glibc's 128 KiB mmap threshold: dd's buffer is its own mapping
INIT_OK = "hvlab-linux: init ok"
WORKLOAD_OK = "hvlab-linux: workload ok"
WORKLOAD_FAILED = "hvlab-linux: workload failed"

APPLETS = ("sh", "mount", "poweroff", "dd", "tr", "md5sum", "cat", "mkdir", "rm", "sync")

INIT = f"""#!/bin/sh
# hvlab's Linux guest: prove the boot reached user space, make page tables, power off.
export PATH=/bin
mount -t proc proc /proc
echo "{INIT_OK}"
if sum=$(sh /etc/workload.sh) && [ -n "$sum" ]; then
    echo "{WORKLOAD_OK} $sum"
else
    echo "{WORKLOAD_FAILED}"
fi
sync
poweroff -f
"""

WORKLOAD = f"""#!/bin/sh
# ROUNDS rounds of WORKERS forked workers; each maps, fills and unmaps a dd buffer.
# Prints the md5 of the workers' md5 lines (in round.worker order).
rounds={ROUNDS}
workers={WORKERS}
work=${{WORKDIR:-/tmp}}/hvlab-workload
rm -rf "$work"
mkdir -p "$work" || exit 1
r=0
while [ $r -lt $rounds ]; do
    w=0
    while [ $w -lt $workers ]; do
        byte=$(printf '%03o' $((65 + r * workers + w)))
        count=$(((r + w) % 3 + 1))
        (dd if=/dev/zero bs={BLOCK} count=$count 2>/dev/null | tr '\\000' "\\\\$byte" \\
            | md5sum > "$work/$r.$w") &
        w=$((w + 1))
    done
    wait
    r=$((r + 1))
done
set -- $(cat "$work"/* | md5sum)
rm -rf "$work"
echo "$1"
"""


def worker_bytes(round_: int, worker: int) -> bytes:
    """What worker `worker` of round `round_` writes through md5sum."""
    fill = 65 + round_ * WORKERS + worker
    return bytes([fill]) * (BLOCK * ((round_ + worker) % 3 + 1))


def expected_workload_checksum() -> str:
    """The md5 /init prints after `workload ok` when every worker completed."""
    lines = b"".join(
        hashlib.md5(worker_bytes(r, w)).hexdigest().encode() + b"  -\n"
        for r in range(ROUNDS) for w in range(WORKERS)
    )
    return hashlib.md5(lines).hexdigest()


def initramfs_members(busybox: bytes) -> list[CpioMember]:
    return [
        CpioMember.directory("bin"),
        CpioMember.file("bin/busybox", busybox, 0o755),
        *(CpioMember.symlink(f"bin/{applet}", "busybox") for applet in APPLETS),
        CpioMember.directory("dev"),
        CpioMember.char_device("dev/console", 5, 1),
        CpioMember.char_device("dev/null", 1, 3, 0o666),
        CpioMember.char_device("dev/zero", 1, 5, 0o666),
        CpioMember.directory("etc"),
        CpioMember.file("etc/workload.sh", WORKLOAD.encode(), 0o755),
        CpioMember.file("init", INIT.encode(), 0o755),
        CpioMember.directory("proc"),
        CpioMember.directory("tmp", 0o1777),
    ]


def build_initramfs(busybox: bytes) -> bytes:
    """The uncompressed newc initramfs for a static busybox binary."""
    return write_cpio(initramfs_members(busybox))


def build_initramfs_file(busybox_path: str | Path) -> bytes:
    return build_initramfs(Path(busybox_path).read_bytes())
