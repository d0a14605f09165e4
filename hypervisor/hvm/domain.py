"""What the hypervisor keeps for an HVM domain beyond the common `Domain` fields."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # kept light: scenario parsing imports SourceConfig
    from hypervisor.hvm.builder import HvmLayout
    from hypervisor.hvm.physmap import GuestPhysmap


@dataclass(frozen=True)
class SourceConfig:
    """An interrupt source to attach to one of the domain's vCPUs (times in virtual ns)."""

    name: str
    vcpu: int
    vector: int
    period_ns: int
    start_ns: int | None = None  # first post; default: one period after the domain starts
    count: int | None = None  # stop after this many posts; default: never


@dataclass
class HvmDomain:
    physmap: GuestPhysmap
    layout: HvmLayout
    posted_mfn: int  # host frame of the vCPUs' posted-interrupt descriptors, 64 bytes each
    violations: Counter[str] = field(default_factory=Counter)  # EPT violations by outcome
    last_violation: tuple[int, int, int, str] | None = None  # (vcpu, rip, gpa, access)
    repeats: int = 0  # the same violation again at once: it was not resolved
