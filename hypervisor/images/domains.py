"""Saving and restoring a domain of either kind as a migration-stream v2 image.

The stream's domain header says the kind; each kind reads and writes its own records
(`hypervisor/pv/save.py`, `hypervisor/pv/restore.py`, `hypervisor/hvm/image.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hypervisor.hvm.image import restore_hvm_domain, save_hvm_domain
from hypervisor.lib.errors import RestoreError, SaveError
from hypervisor.pv.restore import restore_pv_domain
from hypervisor.pv.save import save_pv_domain
from hypervisor.stream import DomainType, StreamError, StreamReader, open_image_for_read
from hypervisor.stream.hvlab_records import HVLAB_DOMAIN_RECORD, HVLAB_MACHINE_FRAMES_RECORD

if TYPE_CHECKING:
    from hypervisor.core.domain import Domain
    from hypervisor.core.hypervisor import Hypervisor

Saver = Callable[["Hypervisor", "Domain", "str | Path"], dict[str, Any]]
Restorer = Callable[["Hypervisor", StreamReader, Path, "str | None"], "Domain"]

SAVERS: dict[str, Saver] = {"pv": save_pv_domain, "hvm": save_hvm_domain}
RESTORERS: dict[int, Restorer] = {DomainType.X86_PV: restore_pv_domain,
                                  DomainType.X86_HVM: restore_hvm_domain}


def save_domain(hv: Hypervisor, dom: Domain, path: str | Path) -> dict[str, Any]:
    """Write `dom` to `path` (zstd-compressed if it ends in .zst); returns statistics."""
    save = SAVERS.get(dom.kind)
    if save is None:
        raise SaveError(f"domain {dom.name}: saving {dom.kind} domains is not supported yet")
    return save(hv, dom, path)


def restore_domain(hv: Hypervisor, path: str | Path, name: str | None = None) -> Domain:
    """Restore the image at `path` as a new domain of `hv` (named `name` if given).

    All or nothing: any problem is one RestoreError naming the record and its offset,
    with `hv` left as it was.
    """
    path = Path(path)
    try:
        with open_image_for_read(path) as f:
            reader = StreamReader(f, keep=frozenset({HVLAB_DOMAIN_RECORD,
                                                     HVLAB_MACHINE_FRAMES_RECORD}))
            restore = RESTORERS.get(reader.domain_header.type)
            if restore is None:
                raise RestoreError(f"{path}: domain header: only x86 PV and HVM images can be "
                                   f"restored here (type {reader.domain_header.type})")
            return restore(hv, reader, path, name)
    except (StreamError, OSError) as err:
        raise RestoreError(f"{path}: {err}") from None
