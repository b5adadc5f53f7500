"""Supervisor: owns every actor, starts and stops them, and applies restart policies and strategies."""

from __future__ import annotations

import asyncio
import time

import anyio
import structlog

from wasmhost.actors.actor import ComponentActor, Handover
from wasmhost.actors.restart import RestartPolicy, Strategy
from wasmhost.actors.spec import ActorSpec
from wasmhost.actors.state import ActorState
from wasmhost.actors.workers import WorkerPool
from wasmhost.core.errors import ComponentError, GuestExit
from wasmhost.core.ids import ComponentId
from wasmhost.core.metadata import ComponentInfo
from wasmhost.core.protocols import StoragePort
from wasmhost.messaging.router import MessageRouter
from wasmhost.runtime.host_fn import HostContext
from wasmhost.runtime.loader import LoadedComponent
from wasmhost.runtime.runtime import Runtime
from wasmhost.runtime.store import StoreManager
from wasmhost.security.capabilities import CapabilityChecker, StorageGate

log = structlog.get_logger("wasmhost.supervisor")


class Supervisor:
    """One actor task per loaded component; restarts them by policy, strategy, backoff and intensity.

    Also the live directory behind `list-components` / `get-component-metadata`.
    """

    def __init__(
        self,
        runtime: Runtime,
        router: MessageRouter,
        workers: WorkerPool,
        storage: StoragePort | None = None,
        permissions: CapabilityChecker | None = None,
    ) -> None:
        self.runtime = runtime
        self.router = router
        self.workers = workers
        self.storage = storage
        self.permissions = permissions
        self.actors: dict[ComponentId, ComponentActor] = {}  # in start order

    # --- lifecycle ---

    def add(self, spec: ActorSpec, loaded: LoadedComponent) -> ComponentActor:
        """Create (not start) the actor for `spec`; it becomes reachable for messages at once."""
        if spec.component_id in self.actors:
            raise ValueError(f"component {spec.component_id} is already loaded")
        manager = self._manager(spec, loaded)
        actor = ComponentActor(spec, manager, self.router, self.workers, self, asyncio.get_running_loop())
        self.actors[spec.component_id] = actor
        self.router.attach(actor)
        return actor

    def _manager(self, spec: ActorSpec, loaded: LoadedComponent) -> StoreManager:
        """A fresh (not yet instantiated) Store manager running `loaded` with `spec`'s settings."""
        storage = self.storage
        if storage is not None and self.permissions is not None:
            storage = StorageGate(storage, self.permissions)  # denials are audited
        elif not spec.storage:
            storage = None
        host = HostContext(spec.component_id, messaging=self.router, storage=storage, directory=self,
                           log_limit=spec.log_limit)
        return self.runtime.store(loaded, spec.component_id, spec.limits, host, spec.wasi)

    async def hand_over(self, spec: ActorSpec, loaded: LoadedComponent,
                        fallback: tuple[ActorSpec, LoadedComponent] | None = None) -> Handover:
        """Run a new version of a running component on its actor, keeping its mailbox, queue and counters
        (see ComponentActor.hand_over: `fallback` runs again if it fails to start or while on probation)."""
        actor = self.actors[spec.component_id]
        restore = None if fallback is None else (lambda: (fallback[0], self._manager(*fallback)))
        return await actor.hand_over(spec, self._manager(spec, loaded), restore)

    async def start(self, spec: ActorSpec, loaded: LoadedComponent) -> ComponentActor:
        """Add and start one component; returns once it runs or has failed to start."""
        actor = self.add(spec, loaded)
        await actor.start()
        return actor

    async def stop(self, component: ComponentId, drain_timeout: float = 5.0) -> None:
        """Stop one component (it stays listed, stopped)."""
        await self.actors[component].stop(drain_timeout)

    async def remove(self, component: ComponentId, drain_timeout: float = 5.0) -> None:
        """Stop a component and forget it."""
        actor = self.actors.get(component)
        if actor is None:
            return
        await actor.stop(drain_timeout)
        self.router.detach(component)
        del self.actors[component]

    async def stop_all(self, drain_timeout: float = 5.0) -> None:
        """Stop every component, asked in reverse start order and draining concurrently: returns within
        drain_timeout + the largest shutdown_timeout + 2 x STOP_GRACE, whatever the guests do."""
        async with anyio.create_task_group() as group:
            for actor in reversed(list(self.actors.values())):
                group.start_soon(actor.stop, drain_timeout, name=f"stop {actor.name}")

    # --- failures (called by actors on the event loop) ---

    def on_failure(self, actor: ComponentActor, error: Exception) -> float | None:
        """Seconds until `actor` restarts, or None when its policy or intensity says it stays down."""
        spec = actor.spec
        if spec.restart is RestartPolicy.TEMPORARY:
            log.warning("component_not_restarted", component=actor.name, policy=spec.restart.value, error=str(error))
            return None
        if isinstance(error, GuestExit) and error.clean and spec.restart is not RestartPolicy.PERMANENT:
            log.info("component_exited", component=actor.name, policy=spec.restart.value)
            return None
        if not actor.history.allow(time.monotonic()):
            log.error("restart_intensity_exceeded", component=actor.name, max_restarts=spec.intensity.max_restarts,
                      window_s=spec.intensity.window)
            return None
        for sibling in self._siblings(actor):
            sibling.request_restart()
        return spec.backoff.delay(actor.history.consecutive - 1)

    def _siblings(self, actor: ComponentActor) -> list[ComponentActor]:
        """Group members that restart with `actor` under its group's strategy."""
        group = actor.spec.group
        if group is None or actor.spec.strategy is Strategy.ONE_FOR_ONE:
            return []
        members = [a for a in self.actors.values() if a.spec.group == group]
        if actor.spec.strategy is Strategy.REST_FOR_ONE:
            members = members[members.index(actor) + 1 :]
        return [m for m in members if m is not actor and m.state is ActorState.RUNNING]

    # --- the DirectoryPort protocol ---

    def list_components(self) -> list[ComponentId]:
        """Ids of every component that is not stopped or failed."""
        live = (ActorState.STARTING, ActorState.RUNNING, ActorState.RESTARTING)
        return [cid for cid, actor in self.actors.items() if actor.state in live]

    def component_info(self, component: ComponentId) -> ComponentInfo:
        """Name, version and health of one loaded component."""
        actor = self.actors.get(component)
        if actor is None:
            raise ComponentError("invalid-state", f"no component {component}")
        meta = actor.metadata
        return ComponentInfo(
            component, meta.name if meta else "", meta.version if meta else "", actor.health.value
        )
