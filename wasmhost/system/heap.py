"""Keeps Python's cyclic garbage collector from rescanning, again and again, what a deployment built.

Every component brings about 140 long-lived Python objects (its actor, mailbox, Store wrapper,
converters, events): 1.4 million at 10,000 components. CPython runs a full collection whenever the
objects that survived into the oldest generation have grown by a quarter, so a start-up that builds
them from nothing scans the whole heap again and again (about five times its final size in total):
6 of 15 s of a measured start of 10,000 components, with every thread stopped meanwhile, and 0.8 s per
full collection once up (a stall of calls and `status`). A deployment therefore moves what it built
into the collector's permanent generation (`gc.freeze`) every FREEZE_EVERY components and at its end,
after collecting the young generations, so that short-lived cycles are not kept.

Frozen objects are still freed by reference counting; only cycles among them wait. A reload that
removed or replaced components thaws everything and collects it once (`collect_all`: one pause of the
size above), so that the cycles of what it removed do not stay, and then freezes again as it applies.
"""

from __future__ import annotations

import gc

FREEZE_EVERY = 256
"""Components started between two freezes: the young objects scanned per freeze stay few."""


class DeploymentHeap:
    """Freezes the objects of one deployment pass as it goes (see the module docstring)."""

    def __init__(self) -> None:
        self._started = 0

    def started(self) -> None:
        """One more component has had its first attempt; freeze every FREEZE_EVERY of them."""
        self._started += 1
        if self._started >= FREEZE_EVERY:
            self.freeze()

    def freeze(self) -> None:
        """Collect the young generations, then freeze every object that is left."""
        self._started = 0
        gc.collect(1)
        gc.freeze()


def collect_all() -> None:
    """Make every frozen object collectable again and run one full collection (after a reload removed
    components)."""
    gc.unfreeze()
    gc.collect()
