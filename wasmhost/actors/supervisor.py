"""Supervisor: owns every actor, starts and stops them, and applies restart policies and strategies.

Every actor task runs in the supervisor's task group (`async with Supervisor(...)`): leaving it stops
whatever still runs, so no actor outlives its supervisor.
"""

from __future__ import annotations

import asyncio
import time
from types import TracebackType

import anyio
import structlog
from anyio.abc import TaskGroup

from wasmhost.actors.actor import ComponentActor, Handover
from wasmhost.actors.changes import StatusChanges
from wasmhost.actors.restart import RestartPolicy, Strategy
from wasmhost.actors.spec import ActorSpec
from wasmhost.actors.state import TAKING_MESSAGES, ActorState
from wasmhost.actors.stores import ComponentSource, StoreFactory
from wasmhost.actors.workers import WorkerPool
from wasmhost.core.errors import ComponentError, GuestExit
from wasmhost.core.ids import ComponentId
from wasmhost.core.metadata import ComponentInfo
from wasmhost.core.protocols import new_listing_version
from wasmhost.messaging.router import MessageRouter
from wasmhost.runtime.loader import LoadedComponent
from wasmhost.runtime.store import StoreManager

log = structlog.get_logger("wasmhost.supervisor")

STOP_ALL_DRAIN = 5.0
"""Drain time of the stop when the supervisor is left without `stop_all` having been called."""


class Supervisor:
    """One actor task per component; restarts them by policy, strategy, backoff and intensity.

    Also the live directory behind `list-components` / `get-component-metadata`.
    """

    def __init__(self, stores: StoreFactory, router: MessageRouter, workers: WorkerPool) -> None:
        self.stores = stores
        self.router = router
        self.workers = workers
        self.actors: dict[ComponentId, ComponentActor] = {}  # in start order
        self.changes: StatusChanges[ComponentActor] = StatusChanges()
        """Actors whose `status` row may have changed (see actors/changes.py); the daemon takes them."""
        self._group: TaskGroup | None = None
        self._closing = False
        self.listing_version = new_listing_version()
        """Renewed after every change of what list_components answers (DirectoryPort.listing_version)."""

    async def __aenter__(self) -> Supervisor:
        group = anyio.create_task_group()
        await group.__aenter__()
        self._group = group
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool | None:
        group = self._group
        assert group is not None, "the supervisor was not entered"
        try:
            with anyio.CancelScope(shield=True):
                await self.stop_all(STOP_ALL_DRAIN)  # bounded; quick when the owner has stopped them already
        finally:
            group.cancel_scope.cancel()  # what is left (a restart of siblings) ends now
            self._group = None
        return await group.__aexit__(exc_type, exc, tb)

    @property
    def group(self) -> TaskGroup:
        """The task group every actor task runs in."""
        if self._group is None or self._closing:
            raise RuntimeError("the supervisor is not running: use `async with Supervisor(...)`")
        return self._group

    # --- lifecycle ---

    def add(self, spec: ActorSpec, source: ComponentSource) -> ComponentActor:
        """Create (not start) the actor for `spec`; it becomes reachable for messages at once, and its
        messages wait in its mailbox while `source` compiles. Refused (RuntimeError) once `stop_all` has
        begun: nothing would ever start or stop it."""
        if self._closing:
            raise RuntimeError(f"cannot add {spec.component_id}: the supervisor is stopping")
        if spec.component_id in self.actors:
            raise ValueError(f"component {spec.component_id} is already loaded")

        async def prepare() -> StoreManager:
            loaded = source if isinstance(source, LoadedComponent) else await source()
            return self.stores(spec, loaded, self)

        actor = ComponentActor(spec, prepare, self.router, self.workers, self, asyncio.get_running_loop(),
                               self.changes)
        self.actors[spec.component_id] = actor
        self.listed_changed()
        self.router.attach(actor)
        return actor

    async def hand_over(self, spec: ActorSpec, loaded: LoadedComponent,
                        fallback: tuple[ActorSpec, LoadedComponent] | None = None) -> Handover:
        """Run a new version of a running component on its actor, keeping its mailbox, queue and counters
        (see ComponentActor.hand_over: `fallback` runs again if it fails to start or while on probation)."""
        actor = self.actors[spec.component_id]
        restore = None if fallback is None else (lambda: (fallback[0], self.stores(fallback[0], fallback[1], self)))
        return await actor.hand_over(spec, self.stores(spec, loaded, self), restore)

    async def start(self, spec: ActorSpec, source: ComponentSource) -> ComponentActor:
        """Add and start one component; returns once its first attempt has ended (see ComponentActor.start)."""
        actor = self.add(spec, source)
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
        actor.removed()
        await actor.stop(drain_timeout)
        self.router.detach(component)
        del self.actors[component]
        self.listed_changed()

    async def remove_all(self, components: list[ComponentId], drain_timeout: float = 5.0) -> None:
        """Stop `components` and forget them, asked in reverse start order and draining concurrently (as
        `stop_all`): removing many busy components takes one drain and one shutdown time, not their sum."""
        wanted = set(components)
        async with anyio.create_task_group() as group:
            for actor in reversed(list(self.actors.values())):
                if actor.component_id in wanted:
                    group.start_soon(self.remove, actor.component_id, drain_timeout, name=f"remove {actor.name}")

    async def stop_all(self, drain_timeout: float = 5.0) -> None:
        """Stop every component, asked in reverse start order and draining concurrently: returns within
        drain_timeout + the largest shutdown_timeout + 2 x STOP_GRACE, whatever the guests do (twice that
        when a guest is blocked in a WASI call: see ComponentActor.stop). Nothing starts after it (a start
        raises RuntimeError): what started then, this stop would miss."""
        self._closing = True
        async with anyio.create_task_group() as group:
            for actor in reversed(list(self.actors.values())):
                group.start_soon(actor.stop, drain_timeout, name=f"stop {actor.name}")

    # --- failures (called by actors on the event loop) ---

    def on_failure(self, actor: ComponentActor, error: Exception) -> float | None:
        """Seconds until `actor` restarts, or None when its policy or intensity says it stays down. Under
        one-for-all / rest-for-one, the running siblings it takes along are terminated in reverse start
        order, then all of them (`actor` included, after its backoff) are started again in start order."""
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
        members = self._members(actor)
        if len(members) > 1 and self._group is not None and not self._closing:
            log.info("group_restarting", component=actor.name, group=spec.group, strategy=spec.strategy.value,
                     members=[m.name for m in members])
            self._group.start_soon(self._restart_group, actor, members, actor.hold_restart(),
                                   name=f"restart group {spec.group}")
        return spec.backoff.delay(actor.history.consecutive - 1)

    def _members(self, actor: ComponentActor) -> list[ComponentActor]:
        """`actor` and the running group members that restart with it, in start order."""
        group = actor.spec.group
        if group is None or actor.spec.strategy is Strategy.ONE_FOR_ONE:
            return [actor]
        members = [a for a in self.actors.values() if a.spec.group == group]
        if actor.spec.strategy is Strategy.REST_FOR_ONE:
            members = members[members.index(actor):]
        return [m for m in members if m is actor or m.state is ActorState.RUNNING]

    async def _restart_group(self, failed: ComponentActor, members: list[ComponentActor],
                             release: asyncio.Event) -> None:
        """Terminate the siblings of `failed` in reverse start order, then start every member again in
        start order, each once the one before it has had its attempt. Each step is bounded by the
        member's own bounds (a batch in progress, shutdown_timeout, its initialize deadline)."""
        try:
            for member in reversed(members):
                if member is not failed:
                    await member.suspend()
            for member in members:
                if member is failed:
                    attempt = failed.next_attempt()
                    release.set()
                    await attempt.wait()
                else:
                    await member.resume()
        finally:
            release.set()  # whatever happened, the failed one is never left waiting for this task

    # --- the DirectoryPort protocol ---

    def listed_changed(self) -> None:
        """An actor was added or removed, or started or stopped taking messages: list_components answers
        otherwise from now on. Called after the change (a guest reading the version first, then the list,
        never keeps an older list under the new version)."""
        self.listing_version = new_listing_version()

    def list_components(self) -> list[ComponentId]:
        """Ids of every component taking messages: not stopped or failed (from any thread: guests ask on theirs)."""
        # A copy taken in one step (list() of a dict holds the GIL throughout): the event loop may add or
        # remove an actor while this walks them, which would raise in the guest's host call.
        return [cid for cid, actor in list(self.actors.items()) if actor.state in TAKING_MESSAGES]

    def component_info(self, component: ComponentId) -> ComponentInfo:
        """Name, version and health of one loaded component."""
        actor = self.actors.get(component)
        if actor is None:
            raise ComponentError("invalid-state", f"no component {component}")
        meta = actor.metadata
        return ComponentInfo(
            component, meta.name if meta else "", meta.version if meta else "", actor.health.value
        )
