"""How the supervisor gets a component's code and its Store, without knowing the layers that wire them.

The system layer decides what a Store's host functions reach (messaging through the router, storage
through the capability gate); the supervisor only asks for a StoreManager once the code is compiled.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from wasmhost.actors.spec import ActorSpec
from wasmhost.core.protocols import DirectoryPort
from wasmhost.runtime.loader import LoadedComponent
from wasmhost.runtime.store import StoreManager

Compile = Callable[[], Awaitable[LoadedComponent]]
"""Compiles and validates a component's binary (LoadError says why not); awaited by its actor, so that
the actor and its mailbox exist while it compiles."""

ComponentSource = LoadedComponent | Compile
"""What an actor runs: code compiled already, or how to compile it."""


class StoreFactory(Protocol):
    """Builds the (not yet instantiated) StoreManager of one component."""

    def __call__(self, spec: ActorSpec, loaded: LoadedComponent, directory: DirectoryPort) -> StoreManager:
        """A StoreManager for `loaded` run as `spec`; `directory` answers the guest's component queries."""
