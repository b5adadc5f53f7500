"""ComponentActor: one task per component, draining its mailbox into the guest on worker threads.

Stopping: `stop()` seals the mailbox and gives the actor task's working life (one cancel scope, the
drain scope) a deadline, `drain_timeout` from now. Queued messages are handled until then; at the
deadline the scope cancels whatever the task waits for: a guest call is interrupted (its host-call
waits end at once and the pool abandons it at its next slice boundary, waiting until its thread has
let go), the message it was handling is answered `failed` ("interrupted"), and the rest are answered
`target-stopped`. Then the task winds down under a shield, bounded by `shutdown_timeout` +
STOP_GRACE: `shutdown` if the instance is still alive, closing the Store, and answering anything
left, whatever happened before. So a stop takes at most drain + shutdown time plus STOP_GRACE, and
every message that was queued ends with an answer.

Starting: the actor exists (and its mailbox takes messages) from the moment it is added; its task
first compiles the component (phase `compiling`, unless the code is compiled already) and gets its
StoreManager, then instantiates and initializes it (`instantiating`, `initializing`). `start()` runs
the task in the supervisor's task group and returns once that first attempt has ended.

Restarting on request (`restart`, or `suspend` + `resume` when a group member failed) terminates the
instance (the guest's `shutdown`, bounded) and boots a fresh one; the mailbox and counters stay.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import anyio
import structlog
from anyio.abc import TaskGroup, TaskStatus

from wasmhost.actors.changes import StatusChanges
from wasmhost.actors.conversion_budget import CONVERSIONS, LARGE_PAYLOAD
from wasmhost.actors.forensics import Recorder
from wasmhost.actors.restart import RestartHistory
from wasmhost.actors.spec import ActorSpec
from wasmhost.actors.state import TAKING_MESSAGES, ActorState, ActorStats
from wasmhost.actors.workers import CallGivenUp, WorkerPool
from wasmhost.core.bounded_text import bounded
from wasmhost.core.errors import (
    CallInProgress,
    ComponentError,
    GuestExit,
    GuestFailure,
    GuestWaitTimeout,
    InstanceStateError,
    LoadError,
    StorageError,
    WasmError,
)
from wasmhost.core.message_size import WASMTIME_LIST_U8_CEILING
from wasmhost.core.metadata import ComponentConfig, ComponentMetadata, HealthStatus
from wasmhost.core.protocols import CommitInFlight
from wasmhost.messaging.envelope import Delivery, Envelope
from wasmhost.messaging.mailbox import Mailbox, deferring_wakes, wake_all
from wasmhost.messaging.outcome import Outcome
from wasmhost.messaging.router import MessageRouter
from wasmhost.runtime.malloc import trim_soon
from wasmhost.runtime.store import InstanceState, StoreManager, hit_size_guard, holding_the_store

log = structlog.get_logger("wasmhost.actor")

BATCH_SIZE = 64
"""Envelopes handled per hop to a worker thread: amortises the hop for small messages."""
TRIM_AFTER = 256 * 1024
"""Payloads or replies from this size on (about 40 MiB of transient conversion memory) are followed
by handing free heap memory back to the OS (`trim_soon`: at once, or within a second when one was just done)."""

SLICE_S = 0.002
"""Guest time after which a batch of short calls gives up its thread between two envelopes."""
STOP_GRACE = 0.5
"""Seconds a stop may take beyond drain_timeout + shutdown_timeout: for the thread of an interrupted
call to let go (one slice, or the host call the guest is in) and for closing the Store. Also how long
past its deadline a call may wait in WASI before it is given up on (see `_gave_up`): a guest that wakes
within it times out as usual (at its next epoch check) and its Store is reused; the wait itself is
only recognised (workers.QUIET_LOOKS) about 0.2 s after it began."""

T = TypeVar("T")


class FailureHandler(Protocol):
    """The supervisor, as an actor sees it."""

    @property
    def group(self) -> TaskGroup:
        """The task group the actor task runs in."""

    def on_failure(self, actor: ComponentActor, error: Exception) -> float | None:
        """Seconds to wait before restarting `actor`, or None to give up."""

    def listed_changed(self) -> None:
        """An actor started or stopped taking messages: the directory lists it, or no longer does."""


@dataclass(slots=True)
class Handled:
    """The result of one envelope, computed on a worker thread and routed on the loop."""

    envelope: Envelope
    reply: bytes | None
    outcome: Outcome | None
    detail: str  # one line
    trace: str = ""  # the full text behind `detail` (a guest's wasm backtrace), when there is more


@dataclass(slots=True)
class Progress:
    """How far a batch got, kept outside its generator so that an interrupted batch still delivers
    what it handled (read on the loop only once the pool says no thread touches it any more)."""

    done: list[Handled] = field(default_factory=list)
    started: int = 0  # envelopes whose call began: one more than `done` while a call is in progress
    first_storage: int | None = None  # index of the first envelope that touched storage
    committed: bool = False  # the batch's storage writes are handed over (`commit`), or there were none
    commit: CommitInFlight | None = None  # their commit, in flight: the batch is answered once it is confirmed
    delivered: bool = False  # the batch is answered


@dataclass(slots=True)
class Handover:
    """A new version (spec and a fresh StoreManager) to run on the same actor, mailbox and counters, and
    the version to fall back to when it cannot start (None: its failure is handled like any boot failure)."""

    spec: ActorSpec
    manager: StoreManager
    fallback: Callable[[], tuple[ActorSpec, StoreManager]] | None
    done: asyncio.Future[Exception | None]
    failed: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when the new version failed while on probation and its fallback took over."""
    failure: Exception | None = None

    def finish(self, error: Exception | None) -> None:
        """Tell the waiter how the new version's first boot ended (None: it runs)."""
        if not self.done.done():
            self.done.set_result(error)

    @property
    def boot_error(self) -> Exception | None:
        """Why the new version's first boot failed (None: it ran); only once `done`."""
        return self.done.result()


class ComponentActor:
    """Owns one component's Store (through its StoreManager) and mailbox; handles strictly one
    message at a time, in order, and never runs guest code on the event loop."""

    def __init__(
        self,
        spec: ActorSpec,
        prepare: Callable[[], Awaitable[StoreManager]],
        router: MessageRouter,
        workers: WorkerPool,
        supervisor: FailureHandler,
        loop: asyncio.AbstractEventLoop,
        changes: StatusChanges[ComponentActor] | None = None,
    ) -> None:
        # `status` rows are rebuilt only for actors noted in `changes` (see actors/changes.py): every
        # field a row shows notes the actor when it changes (properties below, explicit `_changed`).
        self._changes: StatusChanges[ComponentActor] = changes if changes is not None else StatusChanges()
        self._noted = False
        self.spec = spec
        self.component_id = spec.component_id
        self.name = str(spec.component_id)
        self.max_message_bytes = spec.max_message_bytes
        self.max_outstanding_requests = spec.max_outstanding_requests
        # Largest payload this guest recently produced (reply, send or storage.set value): its next calls are budgeted
        # like a large incoming payload, since wasmtime converts what it produces the same way.
        self.output_hint = 0
        self._call_output = 0
        self._prepare = prepare  # compiles (if need be) and builds the StoreManager
        self._manager: StoreManager | None = None
        self._phase: str | None = None
        self.router = router
        self.workers = workers
        self.supervisor = supervisor
        self.mailbox = Mailbox(spec.mailbox_capacity, loop)
        self.mailbox.on_filled = self._changed  # its length is read for every noted actor until it is empty
        self._state = ActorState.STOPPED
        self.stats = ActorStats()
        self.forensics = Recorder(spec.forensics_payload_bytes)  # kept across instances, like the stats
        self.metadata: ComponentMetadata | None = None
        self._health = HealthStatus.UNKNOWN
        self.history = RestartHistory(spec.intensity)
        self._running = False  # the actor task is alive (from `start` until it has answered everything)
        self._stopping = False
        self._drain_deadline = math.inf  # anyio.current_time() at which the drain scope is cancelled
        self._drain: anyio.CancelScope | None = None  # the actor task's working life (see the module docstring)
        self._idle: anyio.CancelScope | None = None  # a wait with no instance (compile, backoff, suspended):
        # a stop ends it at once, there is nothing to drain into
        self._task_status: TaskStatus[None] | None = None  # until the first attempt has ended
        # asyncio's own events and lock, not anyio's (0.2 us each against 1.5 us, measured), all set and
        # awaited on the event loop only; those only a restart, suspend or resume waits for are made when one
        # does (None until then): 10,000 actors at a start made four each that nobody waited for.
        self._ended = asyncio.Event()  # the task has let go of the Store and answered everything
        self._attempted: asyncio.Event | None = None  # set (and dropped) when a boot attempt ends, and the task
        self._suspend_wanted = False
        self._suspended: asyncio.Event | None = None  # made by `suspend`, set by the task (or when it ends)
        self._resume: asyncio.Event | None = None  # set by `resume`; None while not suspended
        self._gate: asyncio.Event | None = None  # after a failure, the restart waits for it (group restarts)
        self._restarting: asyncio.Lock | None = None  # one requested restart at a time, each counted
        self._stops = 0  # stops asked for so far: a restart waiting for the one before it checks none came meanwhile
        self._removed = False  # set by `removed`: the supervisor forgets this actor; it never runs again
        self._next_health = 0.0
        self._in_hand = 0
        self._held_threads = 0  # calls given up on whose threads still wait in WASI (see _gave_up)
        self._lost: Exception | None = None  # a probe gave up on the instance in place: the task restarts it
        self._handover: Handover | None = None  # asked for, not yet taken up by the actor task
        self._probes: dict[anyio.CancelScope, asyncio.Event] = {}  # health probes in progress -> set once over
        self._booting: Handover | None = None  # taken up: its first boot is under way
        self._probation: Handover | None = None  # booted: a failure falls back instead of restarting
        self._changed()  # a new actor: its row is built at the next `status`

    # --- what `status` shows: a change notes the actor (see actors/changes.py) ---

    def _changed(self) -> None:
        """A field `status` shows has changed: note this actor, once until the reader takes it (any thread;
        two threads noting it at once note it twice, which costs a second rebuild of its row, nothing else)."""
        if not self._noted:
            self._noted = True
            self._changes.note(self)

    def _count_restart(self) -> None:
        """One more restart, shown by `status`."""
        self.stats.restarts += 1
        self._changed()

    def status_taken(self) -> None:
        """The status reader took this actor's note and is about to read its fields."""
        self._noted = False

    @property
    def state(self) -> ActorState:
        """Where the actor is in its life."""
        return self._state

    @state.setter
    def state(self, value: ActorState) -> None:
        taking_changed = (self._state in TAKING_MESSAGES) != (value in TAKING_MESSAGES)
        self._state = value
        self._changed()
        if taking_changed:  # the lattice drops (or makes) its subscription now, not at its next heartbeat
            self.supervisor.listed_changed()  # and list-components answers without it (or with it)
            self.router.local_changed()

    @property
    def phase(self) -> str | None:
        """What a starting actor does: compiling, instantiating, initializing (set on a worker thread too)."""
        return self._phase

    @phase.setter
    def phase(self, value: str | None) -> None:
        self._phase = value
        self._changed()

    @property
    def health(self) -> HealthStatus:
        """The last health the instance reported."""
        return self._health

    @health.setter
    def health(self, value: HealthStatus) -> None:
        self._health = value
        self._changed()

    @property
    def in_hand(self) -> int:
        """Envelopes taken from the mailbox whose answers have not gone out yet."""
        return self._in_hand

    @in_hand.setter
    def in_hand(self, value: int) -> None:
        self._in_hand = value
        self._changed()

    # --- control (event loop) ---

    @property
    def manager(self) -> StoreManager:
        """The component's StoreManager (it exists once the component has compiled)."""
        if self._manager is None:
            raise RuntimeError(f"{self.name} has not compiled yet")
        return self._manager

    @property
    def manager_or_none(self) -> StoreManager | None:
        """The component's StoreManager, or None before it has compiled (for metrics, from any thread)."""
        return self._manager

    async def start(self) -> None:
        """Run the actor task in the supervisor's task group and wait until its component's first
        attempt has ended: running, restarting after a failure (a component whose `initialize` never
        ends does not hold up READY=1 or a reload for all its restarts), or failed. Raises RuntimeError,
        changing nothing, once the supervisor is stopping, and ComponentError (invalid-state) while this
        actor is stopping: that stop would end what this start asked for, or once it was removed."""
        if self._removed:
            raise ComponentError("invalid-state", f"{self.name} was removed: it is no longer deployed")
        if self._running:
            if self._stopping:  # before: answered as if started, and the stop then ended it all the same
                raise self._stopping_error()
            return
        group = self.supervisor.group  # raises once the supervisor is stopping: before anything changes here
        self._running = True
        self._stopping = False
        self._drain_deadline = math.inf
        if self._ended.is_set():  # started before: a new life
            self._ended = asyncio.Event()
        self.mailbox.reopen()
        self.state = ActorState.STARTING
        try:
            await group.start(self._main, name=f"actor {self.name}")
        except BaseException:
            self._running = False  # cancelled before it began
            raise

    async def stop(self, drain_timeout: float = 5.0) -> None:
        """Refuse new messages, handle queued ones for up to `drain_timeout` seconds, then interrupt
        the guest call in progress, call `shutdown` (at most shutdown_timeout) and answer whatever is
        left with an error. Returns within drain_timeout + shutdown_timeout + 2 x STOP_GRACE, whatever
        the guest does (twice that for a guest blocked in a WASI call, below); concurrent stops share the
        earliest drain deadline."""
        self._stops += 1
        if not self._running:
            self._reject_remaining("stopped")
            self.state = ActorState.STOPPED if self.state is not ActorState.FAILED else self.state
            return
        self._stopping = True
        if self.state is not ActorState.FAILED:
            self.state = ActorState.STOPPING  # draining: shown as stopping from now, not as running
        self._drain_deadline = min(self._drain_deadline, anyio.current_time() + max(0.0, drain_timeout))
        if self._drain is not None:
            self._drain.deadline = self._drain_deadline
        if self._idle is not None:
            self._idle.cancel()  # no instance to drain into while it compiles or waits to restart
        self.mailbox.seal()
        self.mailbox.wake()
        bound = max(0.0, self._drain_deadline - anyio.current_time()) + self.spec.shutdown_timeout + 2 * STOP_GRACE
        with anyio.move_on_after(bound) as late:
            await self._ended.wait()
        if late.cancelled_caught:  # not expected (the task's own bounds are tighter): still answer everyone
            log.error("component_stop_overran", component=self.name, seconds=round(bound, 3))
            self._reject_remaining("stopped")
            # The caller may now put a new actor under this id: its requests must not meet ours.
            self.router.forget_requester(self.component_id)
            manager = self._manager
            left = self.workers.stop_waiting(manager.lock) if manager is not None else []
            for released in left:
                self._hold_thread(released)
            if left:
                # The task was waiting for a thread a guest holds in a WASI call (asleep on a pollable
                # for as long as it asked, which no deadline or interrupt ends). It waits no longer: the
                # Store is left to that thread (see _finish), and the actor ends, so that it can start
                # again and the supervisor (and the daemon) can exit.
                with anyio.move_on_after(self.spec.shutdown_timeout + 2 * STOP_GRACE):
                    await self._ended.wait()

    async def restart(self) -> None:
        """Terminate the running instance and boot a fresh one (a stopped or failed actor is started);
        returns once the new attempt has ended. Every call restarts once and counts once, also when
        calls come back to back. Bounded by the batch in progress, shutdown_timeout and the
        initialize deadline. Raises ComponentError (invalid-state) while the actor is stopping, and when
        it was stopped while this restart waited for the one before it (the later stop has the last word)."""
        stops = self._stops
        if self._restarting is None:
            self._restarting = asyncio.Lock()
        async with self._restarting:
            if self._stops != stops:  # before: it found the component stopped and started it again
                raise ComponentError("invalid-state", f"{self.name} was stopped while this restart waited for "
                                     "the one before it")
            if self._running and self._stopping:  # before: waited for the stop, then answered as if restarted
                raise self._stopping_error()
            if not self._running:
                await self.start()
                self._count_restart()
                return
            if self.state is not ActorState.RUNNING:  # starting or restarting already: answer after that attempt
                await self.next_attempt().wait()
            elif await self.suspend():
                await self.resume()

    def removed(self) -> None:
        """The supervisor is removing this actor (a reload, `remove`): from now on a start or restart is
        refused. Before, one reaching it in the loop turn between its task's end and its removal (a control
        request) ran it again outside the supervisor's listing, where nobody could see, stop or reload it."""
        self._removed = True

    def _stopping_error(self) -> ComponentError:
        """Why a start or restart asked for while this actor stops is refused (rather than answered ok and
        then undone by the stop: the operator would believe it runs)."""
        return ComponentError("invalid-state", f"{self.name} is stopping: start it again once it has stopped")

    async def suspend(self) -> bool:
        """Terminate the running instance (after the batch in hand; the guest's `shutdown`, bounded) and
        keep the task and mailbox waiting for `resume`. Returns whether it did (it was running). Callers
        asking before the task has taken up the first request (a group restart and `wasmhost restart`) share it."""
        if not self._running or self.state is not ActorState.RUNNING or self._stopping:
            return False
        if not self._suspend_wanted or self._suspended is None:
            # Only a new request gets a new event: replacing the one a caller waits for left that caller (a group
            # restart, which then never started its failed member again) waiting for ever.
            self._suspended = asyncio.Event()
        suspended = self._suspended
        self._suspend_wanted = True
        self.mailbox.wake()
        await suspended.wait()  # set by the task, or when it ends
        return self._resume is not None

    async def resume(self) -> None:
        """Boot a suspended actor again; returns once that attempt has ended (no-op unless suspended)."""
        resume = self._resume
        if resume is None:
            return
        attempt = self.next_attempt()
        resume.set()
        await attempt.wait()

    def hold_restart(self) -> asyncio.Event:
        """Make the restart after the current failure wait (after its backoff) until the returned event is set."""
        gate = asyncio.Event()
        self._gate = gate
        return gate

    def next_attempt(self) -> asyncio.Event:
        """Set when the next boot attempt has ended (or the task has): already set when the task has ended
        (before, a group restart whose failed member was stopped meanwhile waited for it for ever, and the
        members it had terminated were never started again)."""
        if not self._running:
            ended = asyncio.Event()
            ended.set()
            return ended
        if self._attempted is None:
            self._attempted = asyncio.Event()
        return self._attempted

    async def hand_over(self, spec: ActorSpec, manager: StoreManager,
                        fallback: Callable[[], tuple[ActorSpec, StoreManager]] | None = None) -> Handover:
        """Run a new version of the component on this actor: same mailbox, queue and counters. The
        instance in place finishes the message in hand, runs `shutdown` (bounded) and its Store is
        closed; then `manager` boots with `spec` and takes up the queue. Returns once that first boot
        has ended (`boot_error` says how). With a `fallback`: if the boot failed, the version it returns
        boots in its place before this returns; if it ran, the new version is on probation until
        `end_probation`: a failure then boots the fallback at once instead of a restart (`failed` is
        set). Only when `accepts_handover`; a stop ends the wait with an error."""
        if not self.accepts_handover:
            raise RuntimeError(f"{self.name} is not running: start it rather than hand it over")
        previous = self._handover
        if previous is not None:  # not taken up yet: the newer one replaces it
            previous.finish(RuntimeError("replaced by a newer version"))
        handover = Handover(spec, manager, fallback, asyncio.get_running_loop().create_future())
        self._handover = handover
        if self._idle is not None:
            self._idle.cancel()  # waiting to restart (or suspended): boot the new version now
        self.mailbox.wake()
        await handover.done
        return handover

    async def probe_health(self) -> Exception | None:
        """Ask the running instance for its health now (between two steps of the batch in hand, under
        the Store's lock); returns the failure of the call, if any. `health` holds the answer."""
        if self.state is not ActorState.RUNNING:
            return None
        manager = self.manager
        host = manager.host
        # A stop ends the probe (see _end_probes): cancelled, the call is interrupted like a drained one and
        # the wait returns once no thread touches the Store; the probe then answers None.
        scope = anyio.CancelScope()
        self._probes[scope] = ended = asyncio.Event()
        try:
            with scope:
                try:
                    # Its guest's sleeps keep the Store's lock (not set aside): the actor's task may begin a message
                    # on the Store meanwhile, and must wait for this call to end rather than find it in progress.
                    self.health = await self.workers.run_steps(holding_the_store(manager.health_steps()),
                                                               manager.lock, host.interrupt,
                                                               give_up_at=lambda: host.deadline + STOP_GRACE)
                except CallInProgress:
                    return None  # busy with a message, between two of its slices: alive; its health stays as it was
                except CallGivenUp as exc:
                    # Asleep in WASI past its deadline (see _gave_up); the actor task restarts the component too,
                    # as after a failed health check of its own (a batch waiting for the Store's lock is given up on).
                    self._lost = self._gave_up(manager, exc)
                    self.mailbox.wake()
                    return self._lost
                except (GuestFailure, InstanceStateError) as exc:
                    return exc
        finally:
            del self._probes[scope]
            ended.set()
        return None

    async def _end_probes(self) -> None:
        """End the health probes in progress and wait until no thread runs them. Before, a stop during one
        took its call for a guest stuck in WASI: it skipped the guest's shutdown, logged component_left_running
        and left the Store, unclosed, to the probe's thread."""
        for scope in list(self._probes):
            scope.cancel()
        for ended in list(self._probes.values()):
            await ended.wait()

    @property
    def running(self) -> bool:
        """Whether the actor task is alive (starting, running, restarting or stopping)."""
        return self._running

    @property
    def accepts_handover(self) -> bool:
        """Whether `hand_over` may be called: the actor task is alive and not stopping."""
        return self.running and not self._stopping

    # --- the actor task ---

    async def _main(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        self._task_status = task_status
        try:
            with anyio.CancelScope(deadline=self._drain_deadline) as self._drain:
                if await self._compile():
                    await self._live()
            if self._drain.cancelled_caught:
                log.warning("component_drain_timeout", component=self.name, queued=len(self.mailbox))
        except Exception as exc:  # a bug here must not take the supervisor's task group (every actor) down
            log.exception("component_task_failed", component=self.name)
            self.state = ActorState.FAILED
            self._record_error(exc)
        finally:
            self._drain = None
            await self._finish()
            self._running = False

    def _attempt_ended(self) -> None:
        """A boot attempt has ended: whoever waits for it (the start, a restart) hears it now."""
        if self._task_status is not None:
            self._task_status.started()
            self._task_status = None
        if self._attempted is not None:  # somebody waits for it; the next attempt gets a fresh one
            self._attempted.set()
            self._attempted = None

    async def _compile(self) -> bool:
        """Get the StoreManager, compiling the component first if need be; False if that failed (the
        actor is failed then) or a stop came first. Messages wait in the mailbox meanwhile."""
        if self._manager is not None:
            return True
        self.phase = "compiling"
        error: Exception | None = None
        with anyio.CancelScope() as self._idle:
            if not self._stopping:
                try:
                    self._manager = await self._prepare()
                except Exception as exc:  # LoadError, or whatever else stops it: this component fails, not others
                    error = exc
        self._idle = None
        if error is not None:
            self.state = ActorState.FAILED
            self.mailbox.seal()
            self._record_error(error)
            log.error("component_failed", component=self.name, error=str(error))
        return self._manager is not None and not self._stopping

    async def _live(self) -> None:
        """Boot, serve, restart by the supervisor's word; returns when stopped, failed or exited."""
        while True:
            if self._handover is not None and not self._stopping:  # handed over: retire this version first
                await self._take_handover()
            error = await self._boot()
            if self._booting is not None:
                error = await self._handover_booted(error)
            self._attempt_ended()
            if error is None:
                error = await self._serve()
                if error is None and self._handover is not None and not self._stopping:
                    continue  # the new version is taken up at the top
                if error is None and self._suspend_wanted and not self._stopping:
                    if not await self._suspend():
                        return
                    continue
            if error is None or self._stopping:
                return
            self._record_error(error)
            if self._probation is not None:
                await self._fall_back(error)
                continue
            if isinstance(error, GuestWaitTimeout) and self._held_threads > self.spec.intensity.max_restarts:
                # Each call given up on keeps a thread (and a Store) until its guest wakes; outside the
                # restart window too. Not one more: at most max_restarts + 1 threads per component.
                log.error("component_threads_held", component=self.name, held_threads=self._held_threads)
                delay = None
            elif isinstance(error, GuestWaitTimeout) and (too_much := self.workers.held_too_much()) is not None:
                # The same across components: restarted, each would sleep again and hold one more thread and
                # Store, until every thread of the pool is held (no other guest served until they wake) or
                # their memory exhausts the host's.
                workers = self.workers
                log.error("host_waits_held", component=self.name, held_threads=workers.held_threads,
                          max_held=workers.max_held, held_memory=workers.held_memory,
                          max_held_memory=workers.max_held_memory)
                self.stats.last_error = bounded(
                    f"not restarted: {too_much}\n{error}\nOnce they wake (component_wait_ended), `wasmhost "
                    f"restart {self.name}` starts it again; components that keep sleeping in WASI past their "
                    "deadline are best removed.")
                delay = None
            else:
                delay = self.supervisor.on_failure(self, error)
            if delay is None:
                if isinstance(error, GuestExit) and error.clean:
                    return  # a normal exit: stopped, not failed
                self.state = ActorState.FAILED
                # Refuse new messages now, not after the Store is closed on a worker thread:
                # a failed actor must not accept a message only to reject it a moment later.
                self.mailbox.seal()
                log.error("component_failed", component=self.name, error=str(error),
                          restarts=self.stats.restarts)
                return
            self.state = ActorState.RESTARTING
            self._count_restart()
            log.warning("component_restarting", component=self.name, error=str(error), delay_s=round(delay, 3))
            with anyio.CancelScope() as self._idle:
                if not self._stopping:
                    await anyio.sleep(delay)
                gate, self._gate = self._gate, None
                if gate is not None and not self._stopping:
                    await gate.wait()  # its group's siblings are terminated first (Supervisor._restart_group)
            self._idle = None
            if self._stopping:
                return

    async def _take_handover(self) -> None:
        """Retire the instance in place (shutdown, bounded; Store closed) and put the handed-over
        version in its place; its boot comes next."""
        handover, self._handover = self._handover, None
        assert handover is not None
        self._booting = handover
        self._probation = None  # a newer version supersedes the one on probation
        await self._retire()
        self._install(handover.spec, handover.manager)
        log.info("component_handover", component=self.name, queued=len(self.mailbox))

    def _install(self, spec: ActorSpec, manager: StoreManager) -> None:
        """Make `spec` and `manager` the version this actor runs (its Store is not yet instantiated)."""
        self.spec, self._manager = spec, manager
        self.max_message_bytes = spec.max_message_bytes
        self.max_outstanding_requests = spec.max_outstanding_requests
        self.mailbox.capacity = spec.mailbox_capacity  # what is queued beyond it stays queued
        self.history = RestartHistory(spec.intensity)
        self.metadata = None
        self.health = HealthStatus.UNKNOWN

    async def _handover_booted(self, error: Exception | None) -> Exception | None:
        """The handed-over version's first boot ended with `error`: on failure, boot its fallback (same
        mailbox) before telling the waiter; on success it stays on probation (a failure falls back
        at once) until `end_probation`. Returns the error of the version now in place."""
        handover = self._booting
        assert handover is not None
        if error is None or handover.fallback is None:
            self._booting = None
            if error is None and handover.fallback is not None:
                self._probation = handover
            handover.finish(error)
            return error
        log.warning("component_handover_failed", component=self.name, error=str(error))
        self._record_error(error)
        try:
            await self._retire()
            self._install(*handover.fallback())
            self._booting = None  # until here, a stop leaves the fallback installed (see _finish)
            return await self._boot()
        finally:  # also when a stop cuts the fallback's boot short: the waiter (a reload) must hear it
            handover.finish(error)

    async def _fall_back(self, error: Exception) -> None:
        """The version on probation failed: retire it and install its fallback (booted next), on the same
        mailbox, instead of restarting it; whoever watches the probation hears why."""
        probation, self._probation = self._probation, None
        assert probation is not None and probation.fallback is not None
        log.warning("component_probation_failed", component=self.name, error=str(error))
        probation.failure = error  # said before any wait: whoever ends the probation next sees it
        probation.failed.set()
        await self._retire()
        self._install(*probation.fallback())

    def end_probation(self) -> None:
        """The new version passed (or no longer needs) its check: failures are handled by its restart
        policy again."""
        self._probation = None

    async def _retire(self) -> None:
        """`shutdown` the instance in place if it is alive (bounded like a stop's), then close its Store."""
        with anyio.move_on_after(self.spec.shutdown_timeout + STOP_GRACE) as late:
            await self._shutdown()
        if late.cancelled_caught:
            log.warning("component_shutdown_failed", component=self.name, error="interrupted: it outlasted "
                        f"shutdown_timeout_s ({self.spec.shutdown_timeout:g} s)")
        await self.workers.run(self.manager.close, self.manager.lock)

    async def _suspend(self) -> bool:
        """Terminate the instance and wait for `resume`; False if a stop came instead."""
        self._suspend_wanted = False
        self.state = ActorState.RESTARTING
        self.phase = "terminating"
        with anyio.move_on_after(self.spec.shutdown_timeout + STOP_GRACE):
            await self._shutdown()
        log.info("component_terminated", component=self.name, reason="restart")
        self._resume = asyncio.Event()
        if self._suspended is not None:
            self._suspended.set()
        with anyio.CancelScope() as self._idle:
            if not self._stopping:
                await self._resume.wait()
        self._idle = None
        self._resume = None
        if self._stopping:
            return False
        self._count_restart()
        return True

    async def _guest(self, steps: Generator[float, None, T]) -> T:
        """Run one guest call on the worker pool. Cancelled (the drain or shutdown time ran out), it
        interrupts the guest (host-call waits end at once) and returns only once no thread touches
        the Store any more; the cancellation then propagates."""
        manager = self.manager
        host = manager.host
        host.interrupted = False  # a new call: an earlier interruption (already over) does not apply
        try:
            return await self.workers.run_steps(steps, manager.lock, host.interrupt, manager.free_poisoned,
                                                lambda: host.deadline + STOP_GRACE)
        except CallGivenUp as exc:
            raise self._gave_up(manager, exc) from None

    @property
    def held_threads(self) -> int:
        """Worker threads still held by calls of this component given up on while they waited in WASI."""
        return self._held_threads

    def _hold_thread(self, released: asyncio.Future[None]) -> None:
        """One more thread of this component's left waiting in WASI, until `released` is set."""
        memory = self.spec.limits.max_memory_bytes  # the most its Store may hold, left mapped while it sleeps
        self._held_threads += 1
        self.workers.held_threads += 1  # host-wide: bounds the restarts of every component (see _live)
        self.workers.held_memory += memory
        self._changed()

        def let_go(_: object) -> None:
            self._held_threads -= 1
            self.workers.held_threads -= 1
            self.workers.held_memory -= memory
            self._changed()
            log.info("component_wait_ended", component=self.name, held_threads=self._held_threads,
                     host_held_threads=self.workers.held_threads)

        released.add_done_callback(let_go)

    def _leave_to_thread(self, manager: StoreManager) -> None:
        """`manager`'s Store stays with a thread whose guest waits in WASI, never to be touched again here:
        its host context is abandoned (nothing the guest does when it wakes has an effect), and the same
        version goes on with a fresh StoreManager (StoreManager.successor)."""
        manager.host.abandon()
        fresh = manager.successor()
        if self._manager is manager:
            self._manager = fresh
        for handover in (self._booting, self._probation):
            if handover is not None and handover.manager is manager:
                handover.manager = fresh  # the version is the same; its Store is the one that changed

    def _gave_up(self, manager: StoreManager, given_up: CallGivenUp) -> GuestWaitTimeout:
        """The call on `manager` waited in WASI STOP_GRACE past its deadline and the pool gave up on it: that
        wait is not guest code, and neither the epoch deadline nor an interrupt can end it (wasmtime links
        WASI synchronously). The Store stays with its thread until the guest wakes (forever, if it never
        does); its HostContext is abandoned, so nothing the guest does then has an effect, and the thread
        closes the call at its next step. The actor goes on with a fresh StoreManager: the failure is a
        timeout, answered, recorded and restarted as one."""
        self._leave_to_thread(manager)
        self._hold_thread(given_up.released)
        error = GuestWaitTimeout(self.name, manager.calling or "call",
                                 "blocked in a WASI wait past its deadline (max_execution_time_ms): given up on")
        log.error("component_call_given_up", component=self.name, call=manager.calling,
                  held_threads=self._held_threads,
                  reason="a WASI wait its deadline cannot end; its thread and Store are left to it until the "
                  "guest wakes")
        return error

    async def _boot(self) -> Exception | None:
        """Instantiate and initialize in a fresh Store; read the metadata once per version (a restart
        keeps what the first boot read: one guest call less on the way back into service)."""
        self.state = ActorState.STARTING if self.stats.restarts == 0 else ActorState.RESTARTING
        self._lost = None  # whatever a probe gave up on is gone with the instance this replaces
        config = ComponentConfig(self.spec.env_vars, self.spec.config_data, self.spec.limits)
        manager = self.manager
        known = self.metadata
        self.phase = "instantiating"

        def boot() -> Generator[float, None, tuple[ComponentMetadata, HealthStatus]]:
            yield from manager.instantiate_steps()  # a start function's sleep is set aside like a call's
            self.phase = "initializing"  # a plain attribute, read on the loop by `status`
            yield from manager.initialize_steps(config)
            metadata = known if known is not None else (yield from manager.metadata_steps())
            return metadata, (yield from manager.health_steps())

        try:
            metadata, self.health = await self._guest(boot())
        except (LoadError, ComponentError, GuestFailure, InstanceStateError) as exc:
            return exc
        self.metadata = metadata
        self.state = ActorState.RUNNING if not self._stopping else ActorState.STOPPING
        self.phase = None
        self._next_health = time.monotonic() + self.spec.health_interval
        log.info("component_started", component=self.name, name=metadata.name, version=metadata.version)
        return None

    async def _serve(self) -> Exception | None:
        """Handle batches until stopped (and drained), restarted or a guest failure (returned).
        Cancelled by the drain scope, a batch in hand is answered or put back first.

        A batch's storage commit overlaps the handling of the next batch: the batch is answered
        (`_settle`) once its commit is confirmed, while the next one runs; with nothing queued, it
        is answered before waiting for more. Every return answers it first."""
        pending: Progress | None = None  # the previous batch, its commit in flight
        try:
            while True:
                if (self._suspend_wanted or self._handover is not None) and not self._stopping:
                    return None  # to be terminated (a restart) or handed over: the batch in hand is done
                if self._lost is not None:
                    return self._lost  # a probe gave up on the instance (probe_health): restarted like a failure
                if self._stopping and not len(self.mailbox):
                    return None  # drained
                if pending is not None and not len(self.mailbox):
                    await self._settle(pending)  # nothing to overlap it with: answer it before waiting
                    pending = None
                    self.in_hand = 0
                    continue
                timeout = None if self._stopping else max(0.0, self._next_health - time.monotonic())
                batch = await self.mailbox.take(BATCH_SIZE, timeout)  # stopping: `stop` wakes it, the scope bounds it
                if self._lost is not None:  # given up on while this waited: the batch is for the next instance
                    self.mailbox.requeue_front(batch)
                    continue
                if not batch:
                    if not self._stopping and time.monotonic() >= self._next_health:
                        failure = await self._check_health()
                        if failure is not None:
                            return failure
                    continue
                hint = self.output_hint
                large = 0 if hint >= LARGE_PAYLOAD else _first_large(batch)
                if large is None:
                    progress, rest, failure = await self._handle_batch(batch, pending)
                else:
                    # a large payload goes alone, once the process-wide conversion budget has room for it
                    cut = max(large, 1)
                    self.mailbox.requeue_front(batch[cut:])
                    batch = batch[:cut]
                    if large:
                        progress, rest, failure = await self._handle_batch(batch, pending)
                    else:
                        try:
                            taken = await CONVERSIONS.acquire(max(len(batch[0].message.payload), hint))
                        except BaseException:  # out of drain time while waiting: answered as stopped
                            self.mailbox.requeue_front(batch)
                            raise
                        try:
                            progress, rest, failure = await self._handle_batch(batch, pending)
                        finally:
                            CONVERSIONS.release(taken)
                # The previous batch is answered (_handle_batch settled it); this one is answered now
                # unless its commit is still in flight (most batches write nothing: no task, no wait).
                if progress.commit is None or progress.commit.done():
                    await self._settle(progress)
                    pending = None
                else:
                    pending = progress
                self.in_hand = 0 if pending is None else len(progress.done)
                self.mailbox.requeue_front(rest)
                del batch, rest  # not kept while idle: they hold the last payloads
                if failure is not None:
                    return failure
                self.history.settled()
        finally:
            if pending is not None:
                await self._settle(pending)
                self.in_hand = 0

    async def _handle_batch(self, batch: list[Envelope], previous: Progress | None) -> tuple[
            Progress, list[Envelope], Exception | None]:
        """Handle `batch` (`_run_batch`) while the `previous` batch's commit completes and it is
        answered (`_settle`); returns once both are done."""
        if previous is None:
            return await self._run_batch(batch, None)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._settle, previous, name=f"settle {self.name}")
            result = await self._run_batch(batch, previous)
        return result

    async def _settle(self, progress: Progress) -> None:
        """Answer the batch in `progress` once its commit is confirmed; if it failed or was not
        confirmed in time, the messages from the first that touched storage on are answered failed.
        Shielded: a stop does not cut it short (bounded by the writer's timeout, or STOP_GRACE past
        the drain deadline)."""
        commit = progress.commit
        error: Exception | None = None
        if commit is not None and not progress.delivered:
            error = await self._confirmed(commit)
        if progress.delivered:  # answered meanwhile (a cut-short batch answers its predecessor first)
            return
        progress.delivered = True
        self._unacknowledged(progress.done, progress, error)
        self._deliver(progress.done)

    async def _confirmed(self, commit: CommitInFlight) -> Exception | None:
        """Wait on the loop (woken from the writer's thread) until `commit` is done; its error, or a
        TimeoutError when it was not confirmed in time."""
        if not commit.done():
            loop = self.mailbox.loop
            ready = asyncio.Event()

            def wake() -> None:
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                    loop.call_soon_threadsafe(ready.set)

            commit.add_done_callback(wake)
            end = anyio.current_time() + commit.timeout_s + STOP_GRACE
            with anyio.CancelScope(shield=True):
                while not commit.done():
                    left = min(end, self._drain_deadline + STOP_GRACE) - anyio.current_time()
                    if left <= 0:
                        return TimeoutError("storage commit not confirmed in time")
                    with anyio.move_on_after(min(left, STOP_GRACE)):  # a stop may move the deadline
                        await ready.wait()
        return commit.wait()  # done: does not block

    async def _run_batch(self, batch: list[Envelope], previous: Progress | None) -> tuple[
            Progress, list[Envelope], Exception | None]:
        """Run `_process` on the worker pool, time-sliced, holding the Store's lock for each step.

        Interrupted (cancelled), it answers `previous` and what it handled, fails the message whose
        call was cut short, puts the rest back (to be answered as stopped), and lets the cancellation go on."""
        progress = Progress()
        self.in_hand = len(batch) + (len(previous.done) if previous is not None and not previous.delivered else 0)
        wakes: list[Mailbox] = []  # mailboxes the guest's sends filled: woken together, not one by one
        try:
            rest, failure = await self._guest(deferring_wakes(self._process(batch, progress), self.mailbox.loop, wakes))
        except GuestWaitTimeout as exc:
            wake_all(wakes)
            return self._given_up_batch(batch, progress, exc)
        except BaseException:
            wake_all(wakes)
            self.in_hand = 0
            if previous is not None:
                await self._settle(previous)  # answered in order
            done = progress.done  # no thread touches it any more (see _guest)
            if not progress.committed:  # cut short: the messages that ended ok are answered once their writes
                await self._commit_cut_short(done, progress)  # are committed; the one cut short wrote nothing
            elif progress.commit is not None:
                await self._settle(progress)  # its commit was handed over: answered once confirmed
            if progress.started > len(done):
                envelope = batch[len(done)]
                log.warning("component_call_interrupted", component=self.name, delivery=envelope.delivery.value)
                done.append(Handled(envelope, None, Outcome.FAILED,
                                    f"{self.name}: interrupted: the component was stopped and its drain time "
                                    "ran out while it handled this message"))
            if not progress.delivered:
                progress.delivered = True
                self._deliver(done)
            self.mailbox.requeue_front(batch[len(done):])
            raise
        wake_all(wakes)
        return progress, rest, failure

    def _given_up_batch(self, batch: list[Envelope], progress: Progress, error: GuestWaitTimeout) -> tuple[
            Progress, list[Envelope], Exception]:
        """The batch's call was given up on (`_gave_up`): the message in progress is answered as timed out and
        the failure returned, like a call that ran out its deadline; the messages handled before it keep
        their answers, except those from the first that touched storage on, which fail: their writes were
        held for the batch's commit, which the abandoned thread will never make. The rest go back to the
        mailbox. `progress` stays the thread's (it may append to it once the guest wakes): this answers a
        copy of what it holds now."""
        kept = Progress(done=list(progress.done), started=progress.started, first_storage=progress.first_storage,
                        committed=True)
        done = kept.done
        self._unacknowledged(done, kept, RuntimeError("the batch's call was given up on in a WASI wait"))
        if kept.started > len(done):  # the message whose call waits (none if the guest woke just now)
            done.append(Handled(batch[len(done)], None, Outcome.FAILED, error.summary, str(error)))
        return kept, batch[len(done):], error

    async def _commit_cut_short(self, done: list[Handled], progress: Progress) -> None:
        """Commit the writes of the messages of an interrupted batch that ended ok, within STOP_GRACE;
        when that fails or takes longer, they are answered failed (from the first that touched
        storage on; their writes may land later, but are never acknowledged)."""
        host = self.manager.host
        error: Exception | None = TimeoutError(f"not confirmed within {STOP_GRACE:g} s of the stop")
        with anyio.CancelScope(shield=True), anyio.move_on_after(STOP_GRACE):
            error = await anyio.to_thread.run_sync(host.commit_writes, abandon_on_cancel=True)
        host.drop_writes()  # abandoned or not, the next call writes at once
        self._unacknowledged(done, progress, error)

    def _unacknowledged(self, done: list[Handled], progress: Progress, error: Exception | None) -> None:
        """After a failed commit (`error`), fail every message from the first that touched storage on:
        their writes are not durable, and the later ones may have read them."""
        if error is None or progress.first_storage is None:
            return
        log.error("component_writes_not_committed", component=self.name, error=str(error))
        for item in done[progress.first_storage:]:
            if item.outcome is not Outcome.FAILED:
                item.reply, item.outcome = None, Outcome.FAILED
                item.detail = f"{self.name}: its storage writes were not committed: {error}"

    def _process(self, batch: list[Envelope], progress: Progress) -> Generator[float, None, tuple[list[Envelope],
                                                                                              Exception | None]]:
        """Handle envelopes with their storage writes held (`_handle_each`), then hand the writes of
        those that ended ok (a unit each, all in one go) to storage without waiting: the batch is
        answered once they are durable (`_settle`). When the commit fails, every message from the
        first that touched storage on fails with its error."""
        host = self.manager.host
        host.hold_writes()
        rest, failure = yield from self._handle_each(batch, progress)  # abandoned or raising: see _run_batch
        commit = host.start_commit()  # without waiting for the fsync: see _serve
        if commit is None or isinstance(commit, StorageError):
            # nothing to write, or the previous batch's commit failed (these messages may have read it)
            self._unacknowledged(progress.done, progress, commit)
        else:
            progress.commit = commit
        progress.committed = True
        return rest, failure

    def _handle_each(self, batch: list[Envelope], progress: Progress) -> Generator[float, None, tuple[
            list[Envelope], Exception | None]]:
        """Handle envelopes in order, one time slice per step on worker threads, recording each in
        `progress`; stop at the first failure of the Store, or before the next envelope once the
        call is interrupted. Returns the envelopes not handled and the failure, if any."""
        manager = self.manager
        host = manager.host
        host.produced = self.produced  # a large storage.set value budgets the next calls like a large send
        done = progress.done
        latency = self.stats.latency
        slice_end = time.monotonic() + SLICE_S
        for index, envelope in enumerate(batch):
            if host.interrupted:
                return batch[index:], None  # out of drain time: the rest is answered as stopped
            if self._handover is not None and not self._stopping:  # stopping: this version drains the queue
                return batch[index:], None  # a new version takes over: the rest waits for it
            if time.monotonic() >= slice_end:
                yield math.inf  # many short calls add up to a slice too: let others run
                slice_end = time.monotonic() + SLICE_S
            progress.started = index + 1
            self._call_output = 0
            began = time.perf_counter()
            try:
                if envelope.delivery is Delivery.MESSAGE:
                    reply = yield from manager.handle_message_steps(envelope.message)
                    outcome = Outcome.NO_REPLY if reply is None else None
                    done.append(Handled(envelope, reply, outcome, ""))
                elif self.router.callback_wanted(envelope.message.metadata.correlation_id):
                    yield from manager.handle_callback_steps(envelope.message)
                    done.append(Handled(envelope, None, None, ""))
                else:  # the guest cancelled the request once its answer was on its way: not delivered
                    done.append(Handled(envelope, None, None, ""))
            except WasmError as exc:
                done.append(Handled(envelope, None, Outcome.FAILED, f"{self.name}: {exc}"))
            except (GuestFailure, InstanceStateError) as exc:
                # The message that trapped is answered with an error and never retried: one line (what
                # happened), the backtrace for the log, the status JSON and `wasmhost call --verbose`.
                # Its writes are dropped by the commit that follows (it never ended ok).
                summary = exc.summary if isinstance(exc, GuestFailure) else str(exc)
                done.append(Handled(envelope, None, Outcome.FAILED, summary, str(exc)))
                if isinstance(exc, GuestFailure) and hit_size_guard(exc):  # wasmtime's own size guard fired
                    self.output_hint = WASMTIME_LIST_U8_CEILING  # mid-conversion: as large as it gets
                    trim_soon()
                latency.observe(time.perf_counter() - began)
                return batch[index + 1 :], exc
            except Exception as exc:  # a bad value: this message fails, the Store is fine
                done.append(Handled(envelope, None, Outcome.FAILED, f"{self.name}: {type(exc).__name__}: {exc}"))
            latency.observe(time.perf_counter() - began)
            host.end_message(done[-1].outcome is not Outcome.FAILED)  # its writes: all kept or all dropped
            if progress.first_storage is None and host.touched:
                progress.first_storage = index
            produced = max(self._call_output, len(done[-1].reply or b""))
            self.output_hint = max(produced, self.output_hint // 2)  # halves with every quiet call
            if max(len(envelope.message.payload), produced) >= TRIM_AFTER:
                trim_soon()  # the conversion's transient copies are freed: give them back (coalesced)
        return [], None

    def produced(self, size: int) -> None:
        """The guest passed a payload of `size` bytes to an import (the router calls this from its thread, and
        storage.set from the guest's)."""
        self._call_output = max(self._call_output, size)

    def _deliver(self, handled: list[Handled]) -> None:
        self.forensics.seen(handled)  # before a failure is recorded: the failing message is the last one
        router = self.router
        stats = self.stats
        self._changed()  # handled, failed, last_error
        for item in handled:
            if item.outcome is Outcome.FAILED:
                stats.failed += 1
                stats.last_error = bounded(item.trace or item.detail)  # a guest's error carries its own words
            else:
                stats.handled += 1
            if item.envelope.delivery is Delivery.MESSAGE:
                router.complete(self.component_id, item.envelope, item.reply, item.outcome, item.detail, item.trace)

    async def _check_health(self) -> Exception | None:
        self._next_health = time.monotonic() + self.spec.health_interval
        try:
            self.health = await self._guest(self.manager.health_steps())
        except (GuestFailure, InstanceStateError) as exc:
            return exc
        return None

    async def _finish(self) -> None:
        """Call shutdown if the instance is alive, close the Store, then answer what is left. Shielded
        from the cancellation that may have ended the task, bounded by shutdown_timeout + STOP_GRACE
        (shutdown is interrupted like any call when that runs out), and the answers come last
        whatever happened before them."""
        if self.state is not ActorState.FAILED:
            self.state = ActorState.STOPPING
        try:
            with anyio.CancelScope(shield=True):
                with anyio.CancelScope(deadline=self._shutdown_deadline()) as late:
                    await self._end_probes()  # their calls are no WASI waits: the Store is closed here
                    await self._shutdown()
                if late.cancelled_caught:
                    log.warning("component_shutdown_failed", component=self.name,
                                error="interrupted or never started: the stop's time ran out (shutdown_timeout_s "
                                f"{self.spec.shutdown_timeout:g} s past the drain's end)")
                if self._manager is not None and self._manager.in_call:
                    # The stop gave up waiting for the thread still in this call (a guest blocked in a WASI
                    # call, see WorkerPool.stop_waiting): the Store is that thread's until the guest wakes,
                    # and nothing it does then has an effect (abandon). A later start (of this version,
                    # also after a handover) builds a Store of its own.
                    log.error("component_left_running", component=self.name,
                              reason="a worker thread is still inside its call (a WASI wait its deadline cannot "
                              "end); its Store is left to it until the guest wakes")
                    self._leave_to_thread(self._manager)
                elif self._manager is not None:
                    with anyio.move_on_after(STOP_GRACE) as late:
                        await self.workers.run(self._manager.close, self._manager.lock)
                    if late.cancelled_caught:  # not closed (a thread held the Store): freed at its next boot or removal
                        log.warning("component_close_late", component=self.name)
                booting = self._booting
                if booting is not None and booting.fallback is not None and self._manager is booting.manager:
                    # Stopped before the new version ran: its waiter hears a boot error and reports a rollback,
                    # so the next start must boot the previous version, not this one.
                    self._install(*booting.fallback())
        except Exception as exc:  # the worker pool is closed, say: nothing may keep the answers from going out
            log.error("component_finish_failed", component=self.name, error=f"{type(exc).__name__}: {exc}")
        finally:
            for handover in (self._booting, self._handover):  # a stop came first: the waiter hears it
                if handover is not None:
                    handover.finish(RuntimeError(f"{self.name} stopped during the handover"))
            self._booting = self._handover = self._probation = None
            self._reject_remaining("failed" if self.state is ActorState.FAILED else "stopped")
            if self.router.local_recipient(self.component_id) in (None, self):
                # Not when a stop overran and a new actor took the id meanwhile: the requests are its own.
                self.router.forget_requester(self.component_id)
            if self.state is not ActorState.FAILED:
                self.state = ActorState.STOPPED
            self.phase = None
            self._suspend_wanted = False
            if self._suspended is not None:
                self._suspended.set()
            self._attempt_ended()
            self._ended.set()
            log.info("component_stopped", component=self.name, state=self.state.value)

    def _shutdown_deadline(self) -> float:
        """When the final `shutdown` call (its wait for a thread included) is given up: shutdown_timeout +
        STOP_GRACE past the drain deadline, however early the drain ended, so components stopped together
        share the time the stop allows (SIGTERM to 3,000 components with a 0.2 s shutdown_timeout timed
        out 200 - 600 `shutdown` calls still waiting in line). The guest's own run is bounded by
        shutdown_timeout from its start, as always."""
        now = anyio.current_time()
        drained = self._drain_deadline if now < self._drain_deadline < math.inf else now
        return drained + self.spec.shutdown_timeout + STOP_GRACE

    async def _shutdown(self) -> None:
        """The guest's `shutdown`, if its instance is still alive (not after a trap or an interrupted call)."""
        if self._manager is None or self._manager.state is not InstanceState.INITIALIZED or self._manager.in_call:
            return  # in_call: a thread still runs the call the stop gave up on (WorkerPool.stop_waiting)
        timeout_ms = max(1, int(self.spec.shutdown_timeout * 1000))
        try:
            await self._guest(self.manager.shutdown_steps(timeout_ms))
        except (ComponentError, GuestFailure, InstanceStateError) as exc:
            self.forensics.failed(exc, "shutdown", self.stats.restarts)
            log.warning("component_shutdown_failed", component=self.name, error=str(exc))

    def _reject_remaining(self, why: str) -> None:
        for envelope in self.mailbox.close():
            self.stats.rejected += 1
            if envelope.delivery is Delivery.MESSAGE:
                self.router.complete(self.component_id, envelope, None, Outcome.TARGET_STOPPED,
                                     f"{self.name} {why} before handling the message")

    def _record_error(self, error: Exception) -> None:
        """A failure of the component: its last error, and a record for `wasmhost inspect ID`."""
        self.stats.last_error = bounded(str(error))
        self._changed()
        self.forensics.failed(error, self.phase, self.stats.restarts)


def _first_large(batch: list[Envelope]) -> int | None:
    """Index of the first envelope whose payload is budgeted (LARGE_PAYLOAD or more), or None."""
    for index, envelope in enumerate(batch):
        if len(envelope.message.payload) >= LARGE_PAYLOAD:
            return index
    return None
