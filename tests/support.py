"""Simple in-process implementations of the runtime's ports, for tests of the runtime layer alone.

These are test doubles for our own protocols (the real ones come with the actor layer); the
runtime, wasmtime and the guest components around them are real.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from wasmhost.core.errors import MessagingError, StorageError
from wasmhost.core.ids import ComponentId
from wasmhost.core.protocols import StorageUsage


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
