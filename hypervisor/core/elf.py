"""Guest kernel ELF files: the loadable segments, the entry and named symbols."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from hypervisor.lib.errors import HvlabError


@dataclass(frozen=True)
class Segment:
    vaddr: int
    memsz: int
    data: bytes  # file contents; the rest up to memsz is zero


@dataclass(frozen=True)
class KernelImage:
    path: Path
    entry: int
    segments: tuple[Segment, ...]
    symbols: dict[str, int]

    @property
    def low(self) -> int:
        return min(s.vaddr for s in self.segments)

    @property
    def high(self) -> int:
        return max(s.vaddr + s.memsz for s in self.segments)


def load_kernel(path: str | Path) -> KernelImage:
    path = Path(path)
    if not path.is_file():
        raise HvlabError(f"kernel {path}: no such file")
    try:
        with path.open("rb") as f:
            elf = ELFFile(f)
            if elf.get_machine_arch() != "x64" or elf.elfclass != 64:
                raise HvlabError(f"kernel {path}: not an x86-64 ELF64 file")
            segments = tuple(
                Segment(seg["p_vaddr"], seg["p_memsz"], seg.data())
                for seg in elf.iter_segments()
                if seg["p_type"] == "PT_LOAD" and seg["p_memsz"] > 0
            )
            symbols: dict[str, int] = {}
            symtab = elf.get_section_by_name(".symtab")
            if isinstance(symtab, SymbolTableSection):
                for sym in symtab.iter_symbols():
                    if sym.name and sym["st_info"]["type"] in ("STT_NOTYPE", "STT_FUNC",
                                                               "STT_OBJECT"):
                        symbols[sym.name] = sym["st_value"]
            entry = elf.header["e_entry"]
    except (ELFError, OSError, ValueError) as err:
        raise HvlabError(f"kernel {path}: not a valid ELF file ({err})") from None
    if not segments:
        raise HvlabError(f"kernel {path}: no loadable segments")
    return KernelImage(path, entry, segments, symbols)
