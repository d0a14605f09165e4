"""Deterministic round-robin placement and picking of vCPUs on pCPUs.

Virtual time advances in slices of `quantum_ns`. In each slice every pCPU,
in index order, runs its runnable vCPUs round-robin; a vCPU runs until its
budget (the rest of the slice, cut at its next timer deadline) is used, it
blocks, or it yields. One instruction is one virtual nanosecond. pCPUs are
emulated one after another within a slice, so an event sent by a vCPU on
pCPU 0 reaches a vCPU on pCPU 1 in the same slice if pCPU 1 has not run yet,
else in the next one: causality is skewed by at most a quantum, and the
order is fixed, so every run of a scenario is identical.
"""

from __future__ import annotations

from collections import deque

from hypervisor.core.vcpu import Vcpu


class Scheduler:
    def __init__(self, nr_pcpus: int) -> None:
        self.runqueues: list[deque[Vcpu]] = [deque() for _ in range(nr_pcpus)]
        self._placed = 0

    def place(self, vcpu: Vcpu) -> None:
        """Pin a new vCPU to the next pCPU in turn."""
        vcpu.pcpu = self._placed % len(self.runqueues)
        self._placed += 1
        self.runqueues[vcpu.pcpu].append(vcpu)

    def remove(self, vcpu: Vcpu) -> None:
        queue = self.runqueues[vcpu.pcpu]
        if vcpu in queue:
            queue.remove(vcpu)

    def pick(self, pcpu: int) -> Vcpu | None:
        """The next runnable vCPU of `pcpu`, rotating the queue past it."""
        queue = self.runqueues[pcpu]
        for _ in range(len(queue)):
            vcpu = queue[0]
            queue.rotate(-1)
            if vcpu.runnable:
                return vcpu
        return None

    def vcpus_on(self, pcpu: int) -> list[Vcpu]:
        return list(self.runqueues[pcpu])

    def next_deadline(self, pcpu: int, after: int) -> int | None:
        deadlines = [d for v in self.runqueues[pcpu]
                     if v.domain.alive and (d := v.domain.policy.next_deadline(v)) is not None]
        due = [d for d in deadlines if d > after]
        return min(due) if due else None
