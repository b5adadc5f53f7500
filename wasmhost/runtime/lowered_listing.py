"""The `list-components` answer, lowered once per version of the directory and copied in C into each call.

Lowering a list of component ids in Python costs about 12 us an id (a record and three strings, a dozen
ctypes calls): 122 - 126 ms per call at 10,000 components (bench/listing.py), under the GIL, in one host call
no time slice cuts; a guest calling it in a loop took an echo neighbour's request p99 to 51 - 75 ms. The
answer changes only when a component comes, goes, or starts or stops taking messages, and the directory says
when (DirectoryPort.listing_version): the lowered list is kept, and each call gets wasmtime's deep copy of it
(`wasmtime_component_val_clone`: 0.1 - 0.2 us an id, without the GIL): 6 - 9 ms per call at 10,000 in all,
most of it wasmtime handing the copy to the guest, and the neighbour's p99 8 - 11 ms.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Hashable
from typing import Any

from wasmhost.core.protocols import DirectoryPort
from wasmhost.runtime import capi
from wasmhost.runtime.capi import VAL_SIZE
from wasmhost.runtime.codec import Converter
from wasmhost.runtime.id_converter import with_component_ids


class Listing:
    """What host-services.list-components returns when a directory answers: the directory, listed only
    if the kept answer is of another version."""

    __slots__ = ("directory",)

    def __init__(self, directory: DirectoryPort) -> None:
        self.directory = directory


class ListingConverter(Converter):
    """`list<component-id>` lowered from a Listing by copying the kept answer of the directory's version
    (lowering and keeping it first when the version changed); a list of ComponentIds (or records) is
    lowered as it is. One per process (HOST_FUNCTIONS is), so every guest shares the one kept answer."""

    def __init__(self, ids: Converter) -> None:
        self.ids = with_component_ids(ids)  # lowers ComponentIds as they are
        self.wit = ids.wit
        self._lock = threading.Lock()  # the kept value is freed when replaced: never while another thread copies it
        self._kept = (ctypes.c_uint8 * VAL_SIZE)()  # the cache: the answer of _version, lowered (a bool while None)
        self._version: Hashable | None = None

    def lift(self, addr: int) -> Any:
        return self.ids.lift(addr)

    def lower(self, value: Any, addr: int) -> None:
        if not isinstance(value, Listing):
            self.ids.lower(value, addr)
            return
        # Read before the list: a change made while listing renews the version, so the list kept here is
        # never older than the version it is kept under, and the next call after a change lists again.
        version = value.directory.listing_version
        with self._lock:
            if version != self._version:
                fresh = (ctypes.c_uint8 * VAL_SIZE)()
                self.ids.lower(value.directory.list_components(), ctypes.addressof(fresh))  # raises: nothing changed
                if self._version is not None:
                    capi.val_delete(ctypes.addressof(self._kept))
                self._kept, self._version = fresh, version
            capi.val_clone(ctypes.addressof(self._kept), addr)
