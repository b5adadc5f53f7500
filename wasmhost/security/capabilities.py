"""Capabilities: deny by default; messaging targets per action and storage, granted per component."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass

from wasmhost.core.errors import MessagingError, StorageError
from wasmhost.core.ids import HOST_ID, ComponentId, InvalidComponentId
from wasmhost.core.protocols import HeldWrites, StoragePort, StorageUsage
from wasmhost.security.audit import AuditLog

ACTIONS = ("send", "request", "broadcast")
_CACHE_LIMIT = 65536


@dataclass(frozen=True)
class TargetPattern:
    """`*`, `namespace/*`, `namespace/name/*` or an exact `namespace/name/instance`."""

    text: str
    parts: tuple[str, ...]  # the fixed leading parts; all three for an exact id

    @classmethod
    def parse(cls, text: str) -> TargetPattern:
        """Parse a pattern, raising ValueError that names it and the accepted forms."""
        accepted = "expected '*', 'namespace/*', 'namespace/name/*' or 'namespace/name/instance'"
        if text == "*":
            return cls(text, ())
        pieces = text.split("/")
        wildcard = pieces[-1] == "*"
        fixed = pieces[:-1] if wildcard else pieces
        if (wildcard and len(pieces) not in (2, 3)) or (not wildcard and len(pieces) != 3) or "*" in "".join(fixed):
            raise ValueError(f"target pattern {text!r}: {accepted}")
        try:
            ComponentId(*(fixed + ["x"] * (3 - len(fixed))))
        except InvalidComponentId as exc:
            raise ValueError(f"target pattern {text!r}: {exc}") from None
        return cls(text, tuple(fixed))

    def matches(self, component: ComponentId) -> bool:
        """Whether `component` is covered by this pattern."""
        return (component.namespace, component.name, component.instance)[: len(self.parts)] == self.parts

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class Capabilities:
    """What one component was granted."""

    send: tuple[TargetPattern, ...] = ()
    request: tuple[TargetPattern, ...] = ()
    broadcast: tuple[TargetPattern, ...] = ()
    storage: bool = False
    storage_quota_bytes: int | None = None

    @classmethod
    def from_config(cls, send: Iterable[str] = (), request: Iterable[str] = (), broadcast: Iterable[str] = (),
                    storage: bool = False, storage_quota_bytes: int | None = None) -> Capabilities:
        """Build from configuration strings; every bad pattern is reported in one ValueError."""
        capabilities, errors = cls.parse(send, request, broadcast, storage, storage_quota_bytes)
        if errors:
            raise ValueError("; ".join(f"capabilities.{error}" for error in errors))
        return capabilities

    @classmethod
    def parse(cls, send: Iterable[str] = (), request: Iterable[str] = (), broadcast: Iterable[str] = (),
              storage: bool = False, storage_quota_bytes: int | None = None) -> tuple[Capabilities, list[str]]:
        """Build from configuration strings, leaving bad patterns out; each is reported as
        `action[index]: why`, for the caller to place (the config prefixes where the table is)."""
        errors: list[str] = []
        parsed: dict[str, list[TargetPattern]] = {}
        for action, texts in (("send", send), ("request", request), ("broadcast", broadcast)):
            parsed[action] = []
            for index, text in enumerate(texts):
                try:
                    parsed[action].append(TargetPattern.parse(text))
                except ValueError as exc:
                    errors.append(f"{action}[{index}]: {exc}")
        capabilities = cls(tuple(parsed["send"]), tuple(parsed["request"]), tuple(parsed["broadcast"]), storage,
                           storage_quota_bytes)
        return capabilities, errors

    def patterns(self, action: str) -> tuple[TargetPattern, ...]:
        """The patterns granted for `action`."""
        return {"send": self.send, "request": self.request, "broadcast": self.broadcast}[action]


NONE = Capabilities()


class CapabilityChecker:
    """Checks every messaging and storage call against the caller's grants; denials are audited."""

    def __init__(self, audit: AuditLog | None = None) -> None:
        self.audit = audit or AuditLog()
        self._grants: dict[ComponentId, Capabilities] = {}
        self._decisions: dict[tuple[ComponentId, str, ComponentId], bool] = {}  # cleared on any change
        self._lock = threading.Lock()

    def grant(self, component: ComponentId, capabilities: Capabilities) -> None:
        """Replace what `component` may do."""
        with self._lock:
            self._grants[component] = capabilities
            self._decisions = {}

    def revoke(self, component: ComponentId) -> None:
        """Take every capability from `component`."""
        with self._lock:
            self._grants.pop(component, None)
            self._decisions = {}

    def allowed(self, sender: ComponentId, action: str, target: ComponentId) -> bool:
        """Whether `sender` may do `action` to `target` (cached per triple)."""
        key = (sender, action, target)
        # The cache as it is before the grants are read: a grant or revoke made meanwhile (a reload, on
        # the event loop, while a guest thread is here) replaces it, and a decision taken from the old
        # grants then goes into the old cache, thrown away, never into the new one to outlive the change.
        decisions = self._decisions
        decision = decisions.get(key)
        if decision is None:
            if sender == HOST_ID:
                decision = True
            else:
                caps = self._grants.get(sender, NONE)
                decision = any(p.matches(target) for p in caps.patterns(action))
            if len(decisions) >= _CACHE_LIMIT:
                decisions.clear()
            decisions[key] = decision
        return decision

    def check_message(self, sender: ComponentId, action: str, target: ComponentId) -> None:
        """Raise messaging-error.delivery-failed (and audit it) unless allowed."""
        if not self.allowed(sender, action, target):
            self.audit.record_denial(sender, action, str(target))
            raise MessagingError("delivery-failed", f"capability denied: {sender} may not {action} to {target}")

    def check_storage(self, component: ComponentId) -> None:
        """Raise storage-error.io-error (and audit it) unless `component` has storage."""
        if not self._grants.get(component, NONE).storage:
            self.audit.record_denial(component, "storage", "-")
            raise StorageError("io-error", f"capability denied: {component} has no storage capability")


class StorageGate:
    """A StoragePort that lets only components with the storage capability through."""

    def __init__(self, storage: StoragePort, checker: CapabilityChecker) -> None:
        self.storage = storage
        self.checker = checker

    def hold(self, owner: ComponentId) -> HeldWrites:
        """Held writes for a batch of `owner`'s messages, if allowed (checked when the batch first
        touches storage: the grant does not change while one batch is handled)."""
        self.checker.check_storage(owner)
        return self.storage.hold(owner)

    def get(self, owner: ComponentId, key: str) -> bytes | None:
        """storage.get, if allowed."""
        self.checker.check_storage(owner)
        return self.storage.get(owner, key)

    def set(self, owner: ComponentId, key: str, value: bytes) -> None:
        """storage.set, if allowed."""
        self.checker.check_storage(owner)
        self.storage.set(owner, key, value)

    def delete(self, owner: ComponentId, key: str) -> None:
        """storage.delete, if allowed."""
        self.checker.check_storage(owner)
        self.storage.delete(owner, key)

    def exists(self, owner: ComponentId, key: str) -> bool:
        """storage.exists, if allowed."""
        self.checker.check_storage(owner)
        return self.storage.exists(owner, key)

    def list_keys(self, owner: ComponentId, prefix: str | None) -> list[str]:
        """storage.list-keys, if allowed."""
        self.checker.check_storage(owner)
        return self.storage.list_keys(owner, prefix)

    def usage(self, owner: ComponentId) -> StorageUsage:
        """storage.usage, if allowed."""
        self.checker.check_storage(owner)
        return self.storage.usage(owner)
