"""The daemon's StoreFactory: a Store's host functions reach messaging through the router and storage
through the capability gate (denials audited)."""

from __future__ import annotations

from dataclasses import dataclass

from wasmhost.actors.spec import ActorSpec
from wasmhost.core.protocols import DirectoryPort, MessagingPort, StoragePort
from wasmhost.runtime.host_fn import HostContext
from wasmhost.runtime.loader import LoadedComponent
from wasmhost.runtime.runtime import Runtime
from wasmhost.runtime.store import StoreManager
from wasmhost.security.capabilities import CapabilityChecker, StorageGate


@dataclass
class HostStores:
    """Builds each component's StoreManager with its host context. Without `permissions`, storage is
    reachable only by components whose spec asks for it, unchecked (tests and benchmarks)."""

    runtime: Runtime
    messaging: MessagingPort
    storage: StoragePort | None = None
    permissions: CapabilityChecker | None = None
    directory: DirectoryPort | None = None
    """What guests' component queries see instead of the supervisor's directory (the lattice's)."""

    def __call__(self, spec: ActorSpec, loaded: LoadedComponent, directory: DirectoryPort) -> StoreManager:
        """A StoreManager for `loaded` run as `spec` (see actors.stores.StoreFactory)."""
        storage = self.storage
        if storage is not None and self.permissions is not None:
            storage = StorageGate(storage, self.permissions)  # denials are audited
        elif not spec.storage:
            storage = None
        host = HostContext(spec.component_id, messaging=self.messaging, storage=storage,
                           directory=self.directory or directory,
                           log_limit=spec.log_limit)
        return self.runtime.store(loaded, spec.component_id, spec.limits, host, spec.wasi)
