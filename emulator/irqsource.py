"""A periodic interrupt source: a device that posts one vector into a posted-interrupt descriptor.

It is hardware: it posts on virtual time whether or not the target vCPU runs and whether or
not any hypervisor exists, so interrupts raised during a live update's blackout wait in the
descriptor's PIR.

Occurrence ``i`` (i = 0, 1, ...) is due at ``start_ns + i * period_ns``. :meth:`advance`
posts every occurrence due at or before ``now_ns`` that was not posted yet, in closed form
(a late call costs the same as a punctual one). Every occurrence counts in ``posted``; an
occurrence that found its PIR bit already set is lost as a separate event, exactly as in
hardware, and also counts in ``coalesced``. When a post turns ON from 0 to 1 with SN clear,
the source sends the notification through ``notify(ndst, nv)`` (if given) and counts it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias

from emulator.posted import PostedInterruptDescriptor

Notify = Callable[[int, int], None]
"""``notify(ndst, nv)``: deliver notification vector ``nv`` to destination ``ndst``."""


class InterruptSourceError(ValueError):
    """Bad parameters or calls for an interrupt source; nothing was changed."""


@dataclass(frozen=True)
class InterruptSourceState:
    """Everything an InterruptSource holds, as pure data (the descriptor is a live handle)."""

    name: str
    vector: int
    period_ns: int
    start_ns: int
    next_occurrence: int  # index of the next occurrence not yet posted
    now_ns: int  # last instant the source was advanced to
    posted: int
    coalesced: int
    notifications: int


class InterruptSource:
    """Posts ``vector`` into ``descriptor`` every ``period_ns`` from ``start_ns`` (virtual ns)."""

    State: TypeAlias = InterruptSourceState  # every stateful component has a State

    def __init__(
        self,
        name: str,
        descriptor: PostedInterruptDescriptor,
        vector: int,
        period_ns: int,
        start_ns: int = 0,
        *,
        notify: Notify | None = None,
    ) -> None:
        _check_parameters(name, vector, period_ns, start_ns)
        if not isinstance(descriptor, PostedInterruptDescriptor):
            raise InterruptSourceError(
                f"descriptor must be a PostedInterruptDescriptor, got {type(descriptor).__name__}"
            )
        self.descriptor = descriptor
        self._notify = notify
        self.name = name
        self.vector = vector
        self.period_ns = period_ns
        self.start_ns = start_ns
        self._next_occurrence = 0
        self._now_ns = 0
        self.posted = 0
        self.coalesced = 0
        self.notifications = 0

    def next_deadline_ns(self) -> int:
        """The virtual instant of the next occurrence not yet posted."""
        return self.start_ns + self._next_occurrence * self.period_ns

    def advance(self, now_ns: int) -> int:
        """Post every occurrence due at or before ``now_ns``; return how many there were."""
        if not isinstance(now_ns, int) or now_ns < 0:
            raise InterruptSourceError(f"{self.name}: now_ns must be a non-negative int")
        if now_ns < self._now_ns:
            raise InterruptSourceError(
                f"{self.name}: time went backwards: now_ns {now_ns} < {self._now_ns}"
            )
        self._now_ns = now_ns
        if now_ns < self.next_deadline_ns():
            return 0
        due = (now_ns - self.start_ns) // self.period_ns + 1 - self._next_occurrence
        self._next_occurrence += due
        # Nothing takes the PIR between these occurrences, so all after the first coalesce.
        already_set = self.descriptor.is_posted(self.vector)
        notify = self.descriptor.post(self.vector)
        self.posted += due
        self.coalesced += due if already_set else due - 1
        if notify:
            self.notifications += 1
            if self._notify is not None:
                self._notify(self.descriptor.ndst, self.descriptor.nv)
        return due

    def counters(self) -> dict[str, int]:
        return {
            "posted": self.posted,
            "coalesced": self.coalesced,
            "notifications": self.notifications,
        }

    def save(self) -> InterruptSourceState:
        return InterruptSourceState(
            name=self.name,
            vector=self.vector,
            period_ns=self.period_ns,
            start_ns=self.start_ns,
            next_occurrence=self._next_occurrence,
            now_ns=self._now_ns,
            posted=self.posted,
            coalesced=self.coalesced,
            notifications=self.notifications,
        )

    def restore(self, state: InterruptSourceState) -> None:
        """Continue exactly where ``state`` left off (descriptor and notify stay as given)."""
        if not isinstance(state, InterruptSourceState):
            raise InterruptSourceError(
                f"expected an InterruptSource.State, got {type(state).__name__}"
            )
        _check_parameters(state.name, state.vector, state.period_ns, state.start_ns)
        numbers = (
            state.next_occurrence,
            state.now_ns,
            state.posted,
            state.coalesced,
            state.notifications,
        )
        if any(not isinstance(n, int) or n < 0 for n in numbers):
            raise InterruptSourceError(f"{state.name}: State counters must be non-negative ints")
        self.name = state.name
        self.vector = state.vector
        self.period_ns = state.period_ns
        self.start_ns = state.start_ns
        self._next_occurrence = state.next_occurrence
        self._now_ns = state.now_ns
        self.posted = state.posted
        self.coalesced = state.coalesced
        self.notifications = state.notifications


def _check_parameters(name: str, vector: int, period_ns: int, start_ns: int) -> None:
    if not isinstance(name, str) or not name:
        raise InterruptSourceError(f"interrupt source name must be a non-empty str, got {name!r}")
    if not isinstance(vector, int) or not 0 <= vector <= 0xFF:
        raise InterruptSourceError(f"{name}: vector must be 0..255, got {vector!r}")
    if not isinstance(period_ns, int) or period_ns <= 0:
        raise InterruptSourceError(f"{name}: period_ns must be a positive int, got {period_ns!r}")
    if not isinstance(start_ns, int) or start_ns < 0:
        raise InterruptSourceError(f"{name}: start_ns must be a non-negative int, got {start_ns!r}")
