"""A guest kernel's symbols for traces and crash reports, wherever the kernel keeps them.

hvlab's own guests have an ELF symbol table. Debian's vmlinuz has none (and its
System.map is a placeholder), so a Linux kernel's come from its kallsyms table.
Decoding that costs about a second, so crash reports ask for it only on a crash.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from hypervisor.core.elf import load_kernel
from hypervisor.lib.errors import HvlabError
from hypervisor.pv.linux.kallsyms import KallsymsError, decode_kallsyms
from hypervisor.pv.linux.kernel_image import KernelImageError, read_kernel_elf
from hypervisor.tracing import Symbols


def kernel_symbols(path: str | Path) -> Symbols:
    """The ELF symbol table if the kernel has one, else its kallsyms table, else none."""
    try:
        symbols = load_kernel(path).symbols
    except HvlabError:  # a bzImage is no ELF file
        symbols = {}
    if not symbols:
        try:
            symbols = decode_kallsyms(read_kernel_elf(path))
        except (KallsymsError, KernelImageError, OSError):
            symbols = {}
    return Symbols(symbols)


def lazy_describer(path: str | Path) -> Callable[[int], str | None]:
    """address -> "symbol+offset", reading the kernel's symbols on the first call."""
    table: list[Symbols] = []

    def describe(address: int) -> str | None:
        if not table:
            table.append(kernel_symbols(path))
        return table[0].describe(address)

    return describe
