"""Simple in-process implementations of the runtime's ports, for tests of the runtime layer alone.

These are test doubles for our own protocols (the real ones come with the actor layer); the
runtime, wasmtime and the guest components around them are real.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from wasmhost.core.errors import MessagingError, StorageError
from wasmhost.core.ids import ComponentId
from wasmhost.core.protocols import StorageUsage
from wasmhost.runtime.runtime import Runtime

if TYPE_CHECKING:
    from wasmhost.actors.supervisor import Supervisor


@dataclass
class MemoryStorage:
    """A dict per owner with the key rules and a byte quota."""

    quota_bytes: int = 1 << 20
    data: dict[ComponentId, dict[str, bytes]] = field(default_factory=dict)
    fail_with: StorageError | None = None

    def _space(self, owner: ComponentId, key: str | None = None) -> dict[str, bytes]:
        if self.fail_with is not None:
            raise self.fail_with
        if key is not None and (not key or "\x00" in key or len(key.encode()) > 1024):
            raise StorageError("invalid-key", f"bad key {key!r}")
        return self.data.setdefault(owner, {})

    def hold(self, owner: ComponentId) -> MemoryHeld:
        return MemoryHeld(self, owner)

    def get(self, owner: ComponentId, key: str) -> bytes | None:
        return self._space(owner, key).get(key)

    def set(self, owner: ComponentId, key: str, value: bytes) -> None:
        space = self._space(owner, key)
        used = sum(len(k) + len(v) for k, v in space.items() if k != key)
        if used + len(key) + len(value) > self.quota_bytes:
            raise StorageError("quota-exceeded")
        space[key] = value

    def delete(self, owner: ComponentId, key: str) -> None:
        self._space(owner, key).pop(key, None)

    def exists(self, owner: ComponentId, key: str) -> bool:
        return key in self._space(owner, key)

    def list_keys(self, owner: ComponentId, prefix: str | None) -> list[str]:
        return sorted(k for k in self._space(owner) if prefix is None or k.startswith(prefix))

    def usage(self, owner: ComponentId) -> StorageUsage:
        space = self._space(owner)
        used = sum(len(k) + len(v) for k, v in space.items())
        return StorageUsage(used, self.quota_bytes, len(space))


@dataclass
class MemoryHeld:
    """Held writes over MemoryStorage: an overlay per message, written op by op at commit (quota
    checked then, not while held: the real accounting is SqliteStorage's)."""

    storage: MemoryStorage
    owner: ComponentId
    kept: dict[str, bytes | None] = field(default_factory=dict)
    current: dict[str, bytes | None] = field(default_factory=dict)

    def _held(self, key: str) -> tuple[bool, bytes | None]:
        for layer in (self.current, self.kept):
            if key in layer:
                return True, layer[key]
        return False, None

    def get(self, key: str) -> bytes | None:
        found, value = self._held(key)
        return value if found else self.storage.get(self.owner, key)

    def set(self, key: str, value: bytes) -> None:
        self.storage._space(self.owner, key)
        self.current[key] = value

    def delete(self, key: str) -> None:
        self.storage._space(self.owner, key)
        self.current[key] = None

    def exists(self, key: str) -> bool:
        return self.get(key) is not None

    def list_keys(self, prefix: str | None) -> list[str]:
        keys = set(self.storage.list_keys(self.owner, prefix))
        for key, value in {**self.kept, **self.current}.items():
            if prefix is None or key.startswith(prefix):
                (keys.add if value is not None else keys.discard)(key)
        return sorted(keys)

    def usage(self) -> StorageUsage:
        return self.storage.usage(self.owner)

    def end_message(self, ok: bool) -> None:
        if ok:
            self.kept.update(self.current)
        self.current = {}

    def start_commit(self) -> None:
        self.commit()  # at once: nothing is in flight afterwards

    def commit(self) -> None:
        self.current = {}
        kept, self.kept = self.kept, {}
        for key, value in kept.items():
            if value is None:
                self.storage.delete(self.owner, key)
            else:
                self.storage.set(self.owner, key, value)

    def abandon(self) -> None:
        self.kept, self.current = {}, {}


@dataclass
class RecordingMessaging:
    """Records what guests send and hands out sequential correlation ids."""

    sent: list[tuple[ComponentId, ComponentId, bytes]] = field(default_factory=list)
    requests: list[tuple[ComponentId, ComponentId, bytes, int]] = field(default_factory=list)
    known: set[ComponentId] = field(default_factory=set)

    def _check(self, target: ComponentId) -> None:
        if target not in self.known:
            raise MessagingError("target-not-found", target)

    def send(self, sender: ComponentId, target: ComponentId, payload: bytes) -> None:
        self._check(target)
        self.sent.append((sender, target, payload))

    def request(self, sender: ComponentId, target: ComponentId, payload: bytes, timeout_ms: int) -> str:
        self._check(target)
        self.requests.append((sender, target, payload, timeout_ms))
        return f"corr-{len(self.requests)}"

    def cancel_request(self, sender: ComponentId, request_id: str) -> None:
        raise MessagingError("invalid-message", f"unknown request {request_id}")

    def broadcast(self, sender: ComponentId, targets: list[ComponentId], payload: bytes) -> None:
        for target in targets:
            self.send(sender, target, payload)


@asynccontextmanager
async def plain_supervisor(runtime: Runtime, threads: int = 8, host_max_message_bytes: int | None = None,
                           max_lent: int | None = None) -> AsyncIterator[Supervisor]:
    """A Supervisor on a worker pool of its own (lending at most `max_lent` threads, if given) and a router
    without capability checks or storage; stops every actor and the pool afterwards."""
    from wasmhost.actors.supervisor import Supervisor
    from wasmhost.actors.workers import WorkerPool
    from wasmhost.messaging.router import MessageRouter
    from wasmhost.system.stores import HostStores

    workers = WorkerPool(threads) if max_lent is None else WorkerPool(threads, max_lent=max_lent)
    loop = asyncio.get_running_loop()
    router = (MessageRouter(loop) if host_max_message_bytes is None
              else MessageRouter(loop, host_max_message_bytes=host_max_message_bytes))
    try:
        async with Supervisor(HostStores(runtime, router), router, workers) as sup:
            try:
                yield sup
            finally:
                await sup.stop_all(drain_timeout=1.0)
    finally:
        workers.close()


@asynccontextmanager
async def guarded_supervisor(runtime: Runtime, storage_path: Path, quota_bytes: int,
                             cache_bytes: int | None = None) -> AsyncIterator[object]:
    """A Supervisor with real SQLite storage (its read cache `cache_bytes`, else the default) and
    capability checks, as the daemon wires it."""
    from wasmhost.actors.supervisor import Supervisor
    from wasmhost.actors.workers import WorkerPool
    from wasmhost.messaging.router import MessageRouter
    from wasmhost.security.capabilities import CapabilityChecker
    from wasmhost.storage.sqlite_store import SqliteStorage
    from wasmhost.system.stores import HostStores

    workers = WorkerPool(4)
    permissions = CapabilityChecker()
    storage = (SqliteStorage(storage_path, default_quota_bytes=quota_bytes) if cache_bytes is None
               else SqliteStorage(storage_path, default_quota_bytes=quota_bytes, cache_bytes=cache_bytes))
    router = MessageRouter(asyncio.get_running_loop(), permissions)
    try:
        async with Supervisor(HostStores(runtime, router, storage, permissions), router, workers) as sup:
            try:
                yield sup
            finally:
                await sup.stop_all(drain_timeout=1.0)
    finally:
        workers.close()
        storage.close()


async def answers_beside(sup: Supervisor, neighbour: ComponentId, hog: ComponentId, payload: bytes,
                         pings: int = 3) -> tuple[list[bytes | None], int]:
    """`neighbour`'s replies to `pings` requests sent one after another while `hog` is asked `payload` again
    and again (from before the first ping until the last reply came; a failed answer counts as a call too),
    and how many calls `hog` made. A neighbour stalled past 10 s fails its request."""
    from wasmhost.messaging.outcome import RequestFailed

    done = False
    calls = 0

    async def hammer() -> None:
        nonlocal calls
        while not done:
            with contextlib.suppress(RequestFailed):  # the runtime-error a hostile guest was asked for, say
                await sup.router.host_request(hog, payload, 60.0)
            calls += 1

    hammering = asyncio.ensure_future(hammer())
    try:
        replies = [await sup.router.host_request(neighbour, b"ping", 10.0) for _ in range(pings)]
    finally:
        done = True
        await hammering
    return replies, calls
