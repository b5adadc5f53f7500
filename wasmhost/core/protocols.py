"""Protocols through which the runtime reaches messaging, storage and the component directory.

The runtime calls these synchronously from the thread running the guest. A method signals a
WIT error by raising the matching HostError subclass; anything else is a host bug that the
runtime turns into a generic error value for the guest.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable
from typing import Protocol

import msgspec

from wasmhost.core.errors import StorageError
from wasmhost.core.ids import ComponentId
from wasmhost.core.metadata import ComponentInfo


class StorageUsage(msgspec.Struct, frozen=True):
    """Bytes used, quota and key count of one component's storage."""

    used_bytes: int
    quota_bytes: int
    key_count: int


class MessagingPort(Protocol):
    """`host-messaging` as the runtime needs it; raises MessagingError."""

    def send(self, sender: ComponentId, target: ComponentId, payload: bytes) -> None:
        """Enqueue a message for `target`."""

    def request(self, sender: ComponentId, target: ComponentId, payload: bytes, timeout_ms: int) -> str:
        """Enqueue a request; return its fresh correlation id."""

    def cancel_request(self, sender: ComponentId, request_id: str) -> None:
        """Stop a pending request from producing a callback."""

    def broadcast(self, sender: ComponentId, targets: list[ComponentId], payload: bytes) -> None:
        """Deliver `payload` to every target."""


class CommitInFlight(Protocol):
    """A batch's writes handed to storage, their commit not yet confirmed (see HeldWrites.start_commit)."""

    timeout_s: float
    """How long storage may take to confirm it; `wait` ends it in io-error beyond that."""

    def done(self) -> bool:
        """Whether the commit is confirmed or has failed."""

    def add_done_callback(self, callback: Callable[[], None]) -> None:
        """Call `callback` (from any thread, or now) once `done`; it must not block."""

    def wait(self) -> StorageError | None:
        """Wait (bounded by timeout_s) until `done`; the error if the writes were not committed."""


class HeldWrites(Protocol):
    """One component's storage while it handles a batch of messages: writes are held by the host,
    reads see them (read-your-writes), and each message's writes are kept or dropped as a whole
    when it ends; `commit` makes the kept ones durable together. Raises StorageError."""

    def get(self, key: str) -> bytes | None:
        """The value under `key` as the held writes leave it, or None."""

    def set(self, key: str, value: bytes) -> None:
        """Hold a write of `value` under `key`; quota-exceeded counts the held writes too."""

    def delete(self, key: str) -> None:
        """Hold the removal of `key`."""

    def exists(self, key: str) -> bool:
        """Whether `key` is present, held writes included."""

    def list_keys(self, prefix: str | None) -> list[str]:
        """Keys in order, held writes included."""

    def usage(self) -> StorageUsage:
        """Usage as if the held writes were committed."""

    def end_message(self, ok: bool) -> None:
        """The current message ended: keep its writes (`ok`) or drop them all."""

    def start_commit(self) -> CommitInFlight | None:
        """Hand every kept write to storage without waiting (None: nothing to write); the writes stay
        visible to the next batch until committed. Waits for the previous batch's commit first and
        raises its error (dropping these writes too) if it failed."""

    def commit(self) -> None:
        """Write every kept write durably in one unit; returns once committed (raises io-error otherwise)."""

    def abandon(self) -> None:
        """Give the held writes up for good (any thread): nothing not yet handed over is written."""


class StoragePort(Protocol):
    """`storage` as the runtime needs it, scoped by owner; raises StorageError."""

    def hold(self, owner: ComponentId) -> HeldWrites:
        """Held writes for `owner`, for the messages of one batch (see HeldWrites)."""

    def get(self, owner: ComponentId, key: str) -> bytes | None:
        """The value under `key`, or None."""

    def set(self, owner: ComponentId, key: str, value: bytes) -> None:
        """Store `value` durably under `key`."""

    def delete(self, owner: ComponentId, key: str) -> None:
        """Remove `key`."""

    def exists(self, owner: ComponentId, key: str) -> bool:
        """Whether `key` is present."""

    def list_keys(self, owner: ComponentId, prefix: str | None) -> list[str]:
        """Keys of `owner`, optionally filtered by prefix."""

    def usage(self, owner: ComponentId) -> StorageUsage:
        """Usage figures for `owner`."""


_LISTING_VERSIONS = itertools.count(1)


def new_listing_version() -> int:
    """A number no directory of this process was given before (any thread: `next` of a count is atomic
    under the GIL). A directory takes a new one after each change of what it lists, so that an answer
    kept under one version is never taken for another directory's, or for a later state of its own."""
    return next(_LISTING_VERSIONS)


class DirectoryPort(Protocol):
    """The live directory of components behind `list-components` / `get-component-metadata`."""

    def list_components(self) -> list[ComponentId]:
        """Ids of every loaded component."""

    @property
    def listing_version(self) -> Hashable:
        """Changes (to a value never used before, see new_listing_version) after every change of what
        list_components answers: a caller reading it before list_components may keep that answer and
        reuse it as long as the version stays the same."""

    def component_info(self, component: ComponentId) -> ComponentInfo:
        """Information about one component; raises ComponentError when unknown."""


class RemotePort(Protocol):
    """The other hosts of a lattice, as the router reaches them for targets it has no local recipient for.

    `check` and the sends are called from guest threads and must never block on the network: they answer
    at once (not connected, unknown lattice-wide, too large: MessagingError) and hand the publish to the loop.
    """

    def check(self, target: ComponentId, size: int) -> None:
        """Raise MessagingError unless a message of `size` bytes can go to `target` on another host now."""

    def send(self, sender: ComponentId, target: ComponentId, payload: bytes, action: str = "send") -> None:
        """Publish a send to `target` (checked already; `action` "broadcast" for one target of a broadcast, which
        the target's host checks against the sender's broadcast capability); a rejection there is logged."""

    def request(self, sender: ComponentId, target: ComponentId, payload: bytes, correlation_id: str,
                timeout_ms: int) -> None:
        """Publish a request whose answer comes back to the router's pending request `correlation_id`."""

    async def host_request(self, target: ComponentId, payload: bytes, timeout: float) -> bytes | None:
        """A request from the host itself to a remote `target`; raises RequestFailed / MessagingError."""

    async def host_send(self, target: ComponentId, payload: bytes, timeout: float) -> None:
        """A send from the host itself, returning once the target's host queued it (or raising why not)."""

    def local_changed(self) -> None:
        """The set of local components changed (their subscriptions and the inventory follow)."""

    def forget(self, correlation_id: str) -> None:
        """The request `correlation_id` ended here without its answer (cancelled, timed out, its requester
        stopped): drop what is kept for it (any thread)."""
