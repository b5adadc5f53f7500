"""ComponentActor: one task per component, draining its mailbox into the guest on worker threads."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import Protocol

import structlog

from wasmhost.actors.conversion_budget import CONVERSIONS, LARGE_PAYLOAD
from wasmhost.actors.restart import RestartHistory
from wasmhost.actors.spec import ActorSpec
from wasmhost.actors.state import ActorState, ActorStats
from wasmhost.actors.workers import WorkerPool
from wasmhost.core.errors import ComponentError, GuestExit, GuestFailure, InstanceStateError, LoadError, WasmError
from wasmhost.core.message_size import WASMTIME_LIST_U8_CEILING
from wasmhost.core.metadata import ComponentConfig, ComponentMetadata, HealthStatus
from wasmhost.messaging.envelope import Delivery, Envelope
from wasmhost.messaging.mailbox import Mailbox
from wasmhost.messaging.outcome import Outcome
from wasmhost.messaging.router import MessageRouter
from wasmhost.runtime.malloc import release_free_memory
from wasmhost.runtime.store import InstanceState, StoreManager

log = structlog.get_logger("wasmhost.actor")

BATCH_SIZE = 64
"""Envelopes handled per hop to a worker thread: amortises the hop for small messages."""
TRIM_AFTER = 256 * 1024
"""Payloads or replies from this size on (about 40 MiB of transient conversion memory) are followed
by handing free heap memory back to the OS."""

SLICE_S = 0.002
"""Guest time after which a batch of short calls gives up its thread between two envelopes."""


class FailureHandler(Protocol):
    """The supervisor, as an actor sees it."""

    def on_failure(self, actor: ComponentActor, error: Exception) -> float | None:
        """Seconds to wait before restarting `actor`, or None to give up."""


@dataclass(slots=True)
class Handled:
    """The result of one envelope, computed on a worker thread and routed on the loop."""

    envelope: Envelope
    reply: bytes | None
    outcome: Outcome | None
    detail: str


class ComponentActor:
    """Owns one component's Store (through its StoreManager) and mailbox; handles strictly one
    message at a time, in order, and never runs guest code on the event loop."""

    def __init__(
        self,
        spec: ActorSpec,
        manager: StoreManager,
        router: MessageRouter,
        workers: WorkerPool,
        supervisor: FailureHandler,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.spec = spec
        self.component_id = spec.component_id
        self.name = str(spec.component_id)
        self.max_message_bytes = spec.max_message_bytes
        # Largest payload this guest recently produced (reply or send): its next calls are budgeted
        # like a large incoming payload, since wasmtime converts what it produces the same way.
        self.output_hint = 0
        self._call_output = 0
        self.manager = manager
        self.router = router
        self.workers = workers
        self.supervisor = supervisor
        self.mailbox = Mailbox(spec.mailbox_capacity, loop)
        self.state = ActorState.STOPPED
        self.stats = ActorStats()
        self.metadata: ComponentMetadata | None = None
        self.health = HealthStatus.UNKNOWN
        self.history = RestartHistory(spec.intensity)
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._drain_deadline = 0.0
        self._restart_requested = False
        self._started = asyncio.Event()
        self._stop_requested = asyncio.Event()
        self._next_health = 0.0

    # --- control (event loop) ---

    async def start(self) -> None:
        """Start the actor and wait until its component is running or has failed to start."""
        if self._task is not None and not self._task.done():
            return
        self._stopping = False
        self._stop_requested.clear()
        self._restart_requested = False
        self._started.clear()
        self.mailbox.reopen()
        self.state = ActorState.STARTING
        self._task = asyncio.get_running_loop().create_task(self._main(), name=f"actor {self.name}")
        await self._started.wait()

    async def stop(self, drain_timeout: float = 5.0) -> None:
        """Refuse new messages, handle queued ones for up to `drain_timeout` seconds, call
        `shutdown`, and answer whatever is left with an error."""
        task = self._task
        if task is None or task.done():
            self._reject_remaining("stopped")
            self.state = ActorState.STOPPED if self.state is not ActorState.FAILED else self.state
            return
        self._stopping = True
        self._drain_deadline = time.monotonic() + drain_timeout
        self._stop_requested.set()
        self.mailbox.seal()
        self.mailbox.wake()
        await task

    def request_restart(self) -> None:
        """Restart with a fresh Store at the next opportunity (a sibling failed)."""
        self._restart_requested = True
        self.mailbox.wake()

    @property
    def running(self) -> bool:
        """Whether the actor task is alive (running, restarting or stopping)."""
        return self._task is not None and not self._task.done()

    # --- the actor task ---

    async def _main(self) -> None:
        try:
            while True:
                error = await self._boot()
                if error is None:
                    self._started.set()
                    error = await self._serve()
                    if error is None and self._restart_requested:
                        self._restart_requested = False
                        self.stats.restarts += 1
                        continue
                if error is None or self._stopping:
                    break
                self._record_error(error)
                delay = self.supervisor.on_failure(self, error)
                if delay is None:
                    if isinstance(error, GuestExit) and error.clean:
                        break  # a normal exit: stopped, not failed
                    self.state = ActorState.FAILED
                    # Refuse new messages now, not after the Store is closed on a worker thread:
                    # a failed actor must not accept a message only to reject it a moment later.
                    self.mailbox.seal()
                    log.error("component_failed", component=self.name, error=str(error),
                              restarts=self.stats.restarts)
                    self._started.set()
                    break
                self.state = ActorState.RESTARTING
                self.stats.restarts += 1
                log.warning("component_restarting", component=self.name, error=str(error), delay_s=round(delay, 3))
                await self._sleep_unless_stopped(delay)
                if self._stopping:
                    break
        finally:
            await self._finish()

    async def _sleep_unless_stopped(self, delay: float) -> None:
        end = time.monotonic() + delay
        while not self._stopping and (left := end - time.monotonic()) > 0:
            await asyncio.sleep(min(left, 0.05))

    async def _boot(self) -> Exception | None:
        """Instantiate and initialize in a fresh Store; read the metadata once."""
        self.state = ActorState.STARTING if self.stats.restarts == 0 else ActorState.RESTARTING
        config = ComponentConfig(self.spec.env_vars, self.spec.config_data, self.spec.limits)

        def boot() -> Generator[float, None, tuple[ComponentMetadata, HealthStatus]]:
            self.manager.instantiate()
            yield from self.manager.initialize_steps(config)
            metadata = yield from self.manager.metadata_steps()
            return metadata, (yield from self.manager.health_steps())

        try:
            metadata, self.health = await self.workers.run_steps(boot(), self.manager.lock)
        except (LoadError, ComponentError, GuestFailure, InstanceStateError) as exc:
            return exc
        if self.metadata is None:
            self.metadata = metadata
        self.state = ActorState.RUNNING
        self._next_health = time.monotonic() + self.spec.health_interval
        log.info("component_started", component=self.name, name=metadata.name, version=metadata.version)
        return None

    async def _serve(self) -> Exception | None:
        """Handle batches until stopped, restarted or a guest failure (returned)."""
        while True:
            if self._restart_requested:
                return None
            if self._stopping and (not len(self.mailbox) or time.monotonic() >= self._drain_deadline):
                return None
            timeout = max(0.0, self._next_health - time.monotonic())
            if self._stopping:
                timeout = max(0.0, self._drain_deadline - time.monotonic())
            batch = await self.mailbox.take(BATCH_SIZE, timeout)
            if not batch:
                if not self._stopping and time.monotonic() >= self._next_health:
                    failure = await self._check_health()
                    if failure is not None:
                        return failure
                continue
            hint = self.output_hint
            large = 0 if hint >= LARGE_PAYLOAD else _first_large(batch)
            if large is None:
                handled, rest, failure = await self._handle_batch(batch)
            else:
                # a large payload goes alone, once the process-wide conversion budget has room for it
                cut = max(large, 1)
                self.mailbox.requeue_front(batch[cut:])
                batch = batch[:cut]
                if large:
                    handled, rest, failure = await self._handle_batch(batch)
                else:
                    taken = await self._take_budget(max(len(batch[0].message.payload), hint))
                    if taken is None:  # out of drain time while waiting: answered as stopped
                        self.mailbox.requeue_front(batch)
                        return None
                    try:
                        handled, rest, failure = await self._handle_batch(batch)
                    finally:
                        CONVERSIONS.release(taken)
            self._deliver(handled)
            self.mailbox.requeue_front(rest)
            del batch, handled, rest  # not kept while idle: they hold the last payloads and replies
            if failure is not None:
                return failure
            self.history.settled()

    async def _take_budget(self, size: int) -> int | None:
        """Take `size` bytes of the conversion budget, or None once stopping and out of drain time
        (a guest holding the budget must not hold up a stop beyond its drain timeout)."""
        acquire = asyncio.ensure_future(CONVERSIONS.acquire(size))
        while True:
            if self._stopping:
                await asyncio.wait({acquire}, timeout=max(0.0, self._drain_deadline - time.monotonic()))
            else:
                stop = asyncio.ensure_future(self._stop_requested.wait())
                await asyncio.wait({acquire, stop}, return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
            if acquire.done():
                return acquire.result()
            if self._stopping and time.monotonic() >= self._drain_deadline:
                acquire.cancel()  # the budget withdraws the waiter (or hands on a grant it just got)
                with contextlib.suppress(asyncio.CancelledError):
                    await acquire
                return None

    async def _handle_batch(self, batch: list[Envelope]) -> tuple[list[Handled], list[Envelope], Exception | None]:
        """Run `_process` on the worker pool, time-sliced, holding the Store's lock for each step."""
        return await self.workers.run_steps(self._process(batch), self.manager.lock)

    def _process(
        self, batch: list[Envelope]
    ) -> Generator[float, None, tuple[list[Handled], list[Envelope], Exception | None]]:
        """Handle envelopes in order, one time slice per step on worker threads; stop at the first
        failure of the Store."""
        manager = self.manager
        done: list[Handled] = []
        slice_end = time.monotonic() + SLICE_S
        for index, envelope in enumerate(batch):
            now = time.monotonic()
            if self._stopping and now >= self._drain_deadline:
                return done, batch[index:], None  # out of drain time: the rest is answered as stopped
            if now >= slice_end:
                yield math.inf  # many short calls add up to a slice too: let others run
                slice_end = time.monotonic() + SLICE_S
            self._call_output = 0
            try:
                if envelope.delivery is Delivery.MESSAGE:
                    reply = yield from manager.handle_message_steps(envelope.message)
                    outcome = Outcome.NO_REPLY if reply is None else None
                    done.append(Handled(envelope, reply, outcome, ""))
                else:
                    yield from manager.handle_callback_steps(envelope.message)
                    done.append(Handled(envelope, None, None, ""))
            except WasmError as exc:
                done.append(Handled(envelope, None, Outcome.FAILED, f"{self.name}: {exc}"))
            except (GuestFailure, InstanceStateError) as exc:
                # The message that trapped is answered with an error and never retried.
                done.append(Handled(envelope, None, Outcome.FAILED, str(exc)))
                if "too much data is being copied" in str(exc):  # wasmtime's own size guard fired
                    self.output_hint = WASMTIME_LIST_U8_CEILING  # mid-conversion: as large as it gets
                    release_free_memory()
                return done, batch[index + 1 :], exc
            except Exception as exc:  # a bad value: this message fails, the Store is fine
                done.append(Handled(envelope, None, Outcome.FAILED, f"{self.name}: {type(exc).__name__}: {exc}"))
            produced = max(self._call_output, len(done[-1].reply or b""))
            self.output_hint = max(produced, self.output_hint // 2)  # halves with every quiet call
            if max(len(envelope.message.payload), produced) >= TRIM_AFTER:
                release_free_memory()  # the conversion's transient copies are freed: give them back
        return done, [], None

    def produced(self, size: int) -> None:
        """The guest passed a payload of `size` bytes to an import (the router calls this from its thread)."""
        self._call_output = max(self._call_output, size)

    def _deliver(self, handled: list[Handled]) -> None:
        router = self.router
        stats = self.stats
        for item in handled:
            if item.outcome is Outcome.FAILED:
                stats.failed += 1
                stats.last_error = item.detail
            else:
                stats.handled += 1
            if item.envelope.delivery is Delivery.MESSAGE:
                router.complete(self.component_id, item.envelope, item.reply, item.outcome, item.detail)

    async def _check_health(self) -> Exception | None:
        self._next_health = time.monotonic() + self.spec.health_interval
        try:
            self.health = await self.workers.run_steps(self.manager.health_steps(), self.manager.lock)
        except (GuestFailure, InstanceStateError) as exc:
            return exc
        return None

    async def _finish(self) -> None:
        """Call shutdown if the instance is alive, then answer what is left."""
        if self.state is not ActorState.FAILED:
            self.state = ActorState.STOPPING
        if self.manager.state is InstanceState.INITIALIZED:
            timeout_ms = max(1, int(self.spec.shutdown_timeout * 1000))
            try:
                await self.workers.run_steps(self.manager.shutdown_steps(timeout_ms), self.manager.lock)
            except (ComponentError, GuestFailure, InstanceStateError) as exc:
                log.warning("component_shutdown_failed", component=self.name, error=str(exc))
        await self.workers.run(self.manager.close, self.manager.lock)
        self._reject_remaining("failed" if self.state is ActorState.FAILED else "stopped")
        self.router.forget_requester(self.component_id)
        if self.state is not ActorState.FAILED:
            self.state = ActorState.STOPPED
        self._started.set()
        log.info("component_stopped", component=self.name, state=self.state.value)

    def _reject_remaining(self, why: str) -> None:
        for envelope in self.mailbox.close():
            self.stats.rejected += 1
            if envelope.delivery is Delivery.MESSAGE:
                self.router.complete(self.component_id, envelope, None, Outcome.TARGET_STOPPED,
                                     f"{self.name} {why} before handling the message")

    def _record_error(self, error: Exception) -> None:
        self.stats.last_error = str(error)


def _first_large(batch: list[Envelope]) -> int | None:
    """Index of the first envelope whose payload is budgeted (LARGE_PAYLOAD or more), or None."""
    for index, envelope in enumerate(batch):
        if len(envelope.message.payload) >= LARGE_PAYLOAD:
            return index
    return None
