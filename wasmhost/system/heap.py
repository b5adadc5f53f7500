"""Keeps Python's cyclic garbage collector from rescanning, again and again, what a deployment built.

Every component brings about 140 long-lived Python objects (its actor, mailbox, Store wrapper,
converters, events): 1.4 million at 10,000 components. CPython runs a full collection whenever the
objects that survived into the oldest generation have grown by a quarter, so a start-up that builds
them from nothing scans the whole heap again and again (about five times its final size in total):
6 of 15 s of a measured start of 10,000 components, with every thread stopped meanwhile, and 0.8 s per
full collection once up (a stall of calls and `status`). A deployment therefore moves what it built
into the collector's permanent generation (`gc.freeze`) every FREEZE_EVERY components and at its end.
While it builds, the collector runs only on its youngest generation (what a few hundred allocations
made), and each freeze collects that generation first, so that short-lived cycles are not kept. The
older generations are not collected during the pass: at 10,000 components their collections took
1.0 - 1.4 s (about a tenth of the start-up) and found nothing to free (0 - 6 objects in all,
measured); what the pass built is frozen instead of scanned again.

Frozen objects are still freed by reference counting; only cycles among them wait. A reload that
removed or replaced components thaws everything and collects it once (`collect_all`: one pause of the
size above), so that the cycles of what it removed do not stay, and then freezes again as it applies.

Between deployments, restarts build new Stores that nobody froze (about 36 long-lived objects each:
72,000 after 2,000 restarts, measured), and every later full collection scanned them again: 49 ms
each after 2,000 restarts. So while the daemon runs, a full collection that took longer than
SLOW_COLLECTION_S freezes what survived it (`frozen_after_slow_collections`): one pause, then none.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Iterator
from typing import Any

FREEZE_EVERY = 256
"""Components started between two freezes: the young objects scanned per freeze stay few."""


_NEVER = 2**31 - 1
"""A collection threshold that is never reached."""

_passes = 0  # deployment passes under way (a reload may start while the first one ends)
_thresholds = gc.get_threshold()  # the collector's thresholds outside deployment passes


class DeploymentHeap:
    """Freezes the objects of one deployment pass as it goes (see the module docstring). A context
    manager: inside, the collector collects only its youngest generation; on the way out, what is
    left is frozen and the thresholds of before are back."""

    def __init__(self) -> None:
        self._started = 0

    def __enter__(self) -> DeploymentHeap:
        global _passes, _thresholds
        if _passes == 0:
            _thresholds = gc.get_threshold()
            gc.set_threshold(_thresholds[0], _NEVER, _NEVER)
        _passes += 1
        return self

    def __exit__(self, *exc: object) -> None:
        global _passes
        self.freeze()
        _passes -= 1
        if _passes == 0:
            gc.set_threshold(*_thresholds)

    def started(self) -> None:
        """One more component has had its first attempt; freeze every FREEZE_EVERY of them."""
        self._started += 1
        if self._started >= FREEZE_EVERY:
            self.freeze()

    def freeze(self) -> None:
        """Collect the youngest generation, then freeze every object that is left."""
        self._started = 0
        gc.collect(0)
        gc.freeze()


def collect_all() -> None:
    """Make every frozen object collectable again and run one full collection (after a reload removed
    components)."""
    gc.unfreeze()
    gc.collect()


STEADY_THRESHOLD = 5_000
"""Net allocations of container objects between two collections of the youngest generation while the
daemon serves (CPython's default: 700). A message that writes storage keeps its objects (its envelope,
request and reply, held write, write unit: about 20) until its batch's commit is confirmed, about two
batches later, and the count of net allocations only grows as they come (it never goes below zero as
they go), so at 700 the collector ran every ~115 acknowledged sets, found nothing to free, and moved
them to the older generations, whose collections then scanned them again: 5 - 7 us of CPU per set
message in `python -m bench storage`'s set row, a tenth of its cost (260 collections per 30,000 sets;
4 at 3,000, 1 at 5,000). An echo's objects go as fast as they come: 9 collections either way. A
collection of the youngest generation then finds a few thousand objects (a few ms), rarely."""


@contextlib.contextmanager
def steady_collector() -> Iterator[None]:
    """While inside, the youngest generation is collected every STEADY_THRESHOLD net allocations (the
    older ones as before); the thresholds of before are back afterwards."""
    before = gc.get_threshold()
    gc.set_threshold(STEADY_THRESHOLD, *before[1:])
    try:
        yield
    finally:
        gc.set_threshold(*before)


SLOW_COLLECTION_S = 0.01
"""A full collection longer than this (one epoch tick) freezes what survived it."""


@contextlib.contextmanager
def frozen_after_slow_collections() -> Iterator[None]:
    """While inside: after each full collection slower than SLOW_COLLECTION_S, freeze what survived it,
    so that the next ones do not scan it again (see the module docstring)."""
    began = 0.0

    def after(phase: str, info: dict[str, Any]) -> None:
        nonlocal began
        if info["generation"] != 2:
            return
        if phase == "start":
            began = time.perf_counter()
        elif time.perf_counter() - began > SLOW_COLLECTION_S:
            gc.freeze()  # the collection is over: what is left is reachable, nothing garbage is frozen

    gc.callbacks.append(after)
    try:
        yield
    finally:
        gc.callbacks.remove(after)
