"""Which actors' `status` rows may have changed since the daemon last built them.

At 10,000 components, reading every actor's fields for each `status` touches memory scattered over
the whole heap (30-50 ms on a busy machine). Instead an actor notes itself here whenever a field that
`status` shows changes (its state, phase, health, counters, or its mailbox going from empty to not
empty), at most once until the reader takes it, and the reader rebuilds only those rows. Noted from
any thread (a worker sets the phase `initializing`, a guest's send fills a mailbox), taken on the
event loop.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, Protocol, TypeVar


class Noted(Protocol):
    """An actor, as the queue of changes sees it."""

    def status_taken(self) -> None:
        """The reader took the note: a later change notes the actor again."""


N = TypeVar("N", bound=Noted)


class StatusChanges(Generic[N]):
    """A queue of noted actors: `note` from any thread (deque appends are atomic), `take` on the loop."""

    def __init__(self) -> None:
        self._noted: deque[N] = deque()

    def note(self, actor: N) -> None:
        """`actor` changed (it notes itself once until taken: see ComponentActor._changed)."""
        self._noted.append(actor)

    def take(self) -> list[N]:
        """Every actor noted since the last take, each told so before its fields are read: a change made
        from now on notes it again, so none is missed."""
        taken: list[N] = []
        popleft = self._noted.popleft
        while True:
            try:
                actor = popleft()
            except IndexError:
                return taken
            actor.status_taken()
            taken.append(actor)
