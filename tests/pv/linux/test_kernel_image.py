"""bzImage unpacking (hypervisor.pv.linux.kernel_image): Debian's real vmlinuz and made-up files."""

from __future__ import annotations

import shutil
import struct
import subprocess

import pytest

from hypervisor.lib.errors import HvlabError
from hypervisor.pv.linux.kernel_image import (
    KernelImageError,
    kernel_elf_bytes,
    parse_setup_header,
    read_kernel_elf,
    vmlinux_from_bzimage,
)
from tests.pv.linux.synthetic import bzimage, small_kernel, xz_payload


def test_debian_vmlinuz_unpacks_to_the_elf_its_size_field_announces(linux_build, vmlinux):
    data = linux_build.vmlinuz.read_bytes()
    header = parse_setup_header(data)
    assert header.version >= 0x20F
    payload = data[header.payload_start:header.payload_start + header.payload_length]
    assert payload.startswith(b"\xfd7zXZ\x00")
    assert len(vmlinux) == struct.unpack("<I", payload[-4:])[0]
    assert vmlinux[:4] == b"\x7fELF" and vmlinux[4] == 2  # ELF64


@pytest.mark.skipif(shutil.which("xz") is None, reason="no xz command to cross-check with")
def test_debian_payload_matches_the_xz_tool(linux_build, vmlinux):
    data = linux_build.vmlinuz.read_bytes()
    header = parse_setup_header(data)
    payload = data[header.payload_start:header.payload_start + header.payload_length]
    out = subprocess.run(["xz", "-dc", "--single-stream"], input=payload, capture_output=True,
                         check=True).stdout
    assert out == vmlinux


def test_synthetic_bzimage_round_trips():
    elf = small_kernel()
    assert vmlinux_from_bzimage(bzimage(xz_payload(elf))) == elf
    assert kernel_elf_bytes(elf) == elf  # a plain ELF is taken as it is


def test_setup_sects_zero_means_four():
    elf = small_kernel()
    image = bytearray(bzimage(xz_payload(elf), setup_sects=4))
    image[0x1F1] = 0
    assert parse_setup_header(bytes(image)).protected_mode_start == 5 * 512
    assert vmlinux_from_bzimage(bytes(image)) == elf


@pytest.mark.parametrize("mangle, message", [
    (lambda img: img[:0x100], "truncated"),
    (lambda img: img[:-100], "truncated: payload"),
    (lambda img: b"MZ" + b"\0" * 0x300, "neither an ELF file nor a bzImage"),
    (lambda img: img[:0x206] + b"\x04\x02" + img[0x208:], "boot protocol 2.04"),
])
def test_bad_files_are_one_clear_line(mangle, message):
    image = bzimage(xz_payload(small_kernel()))
    with pytest.raises(KernelImageError, match=message) as err:
        kernel_elf_bytes(mangle(image), "kernel k")
    assert "\n" not in str(err.value) and isinstance(err.value, HvlabError)
    assert err.value.exit_status == 2


def test_payload_problems_are_named():
    elf = small_kernel()
    with pytest.raises(KernelImageError, match="gzip; hvlab unpacks xz payloads only"):
        vmlinux_from_bzimage(bzimage(b"\x1f\x8b\x08" + b"\0" * 20))
    with pytest.raises(KernelImageError, match="size field says 7"):
        vmlinux_from_bzimage(bzimage(xz_payload(elf, size_field=7)))
    corrupt = bytearray(xz_payload(elf))
    corrupt[40] ^= 0xFF
    with pytest.raises(KernelImageError, match="corrupt"):
        vmlinux_from_bzimage(bzimage(bytes(corrupt)))
    with pytest.raises(KernelImageError, match="not an ELF file"):
        vmlinux_from_bzimage(bzimage(xz_payload(b"just text, no ELF")))


def test_unreadable_kernel_path(tmp_path):
    with pytest.raises(KernelImageError, match="cannot read"):
        read_kernel_elf(tmp_path / "absent")
