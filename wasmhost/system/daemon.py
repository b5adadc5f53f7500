"""The daemon: deploys the configured components, reloads the config, answers the control socket,
speaks sd_notify, and stops gracefully on SIGTERM / SIGINT.

`run` is one task group: the control server, signal handling, reload requests (SIGHUP), the watchdog
and start-up run in it, inside the supervisor (which owns every actor task); the workers, storage, runtime, notifier and
control socket are released in `finally` blocks whatever ends it. A stop signal cancels a start-up in
progress (compiles are abandoned, not waited for: see detached.py) and then stops every component
within drain_timeout_s + shutdown_timeout_s.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import msgspec
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from wasmhost.actors.supervisor import Supervisor
from wasmhost.actors.workers import WorkerPool
from wasmhost.core.errors import HostError, LoadError
from wasmhost.core.ids import ComponentId, InvalidComponentId
from wasmhost.core.private_files import private_dir
from wasmhost.messaging.outcome import RequestFailed
from wasmhost.messaging.router import MessageRouter
from wasmhost.runtime.engine import EngineSettings
from wasmhost.runtime.limiter import StoreBudget
from wasmhost.runtime.loader import LoadedComponent
from wasmhost.runtime.runtime import Runtime
from wasmhost.security.capabilities import CapabilityChecker
from wasmhost.storage.sqlite_store import SqliteStorage
from wasmhost.system import protocol
from wasmhost.system.config import ComponentPlan, Config, ConfigError, load_config
from wasmhost.system.control import ControlServer, SocketInUse
from wasmhost.system.detached import run_detached
from wasmhost.system.logging import lines_dropped
from wasmhost.system.sd_notify import Notifier
from wasmhost.system.stores import HostStores

log = structlog.get_logger("wasmhost.daemon")

START_CONCURRENCY = 32
"""Components loaded and started at the same time."""


@dataclass
class Deployment:
    """One configured component: its plan, the digest of its binary, and why it is down if it is."""

    plan: ComponentPlan
    digest: str | None = None
    load_error: str | None = None
    loaded: LoadedComponent | None = None
    """The compiled component it runs, kept so that a failed reload can put it back."""


def prepare_state_dir(config: Config) -> None:
    """Make state_dir owner-only (0700) before anything is created in it, whatever the umask; 0710 with
    the socket's group when a group-accessible control socket lives inside it (the group may reach
    the socket, not list or read anything: every file in it is 0600). A failure shows up later as
    storage io-errors, as before."""
    grouped = config.socket_gid is not None and config.control_socket.parent == config.state_dir
    try:
        private_dir(config.state_dir, 0o710 if grouped else 0o700, config.socket_gid if grouped else None)
    except OSError as exc:
        log.error("state_dir_unusable", path=str(config.state_dir), error=str(exc))


def load_plan(runtime: Runtime, plan: ComponentPlan) -> LoadedComponent:
    """Compile and validate a component's binary, and check that what it creates fits its max_memory_bytes:
    the load step of `run`, `reload` and `check` (LoadError says why not)."""
    loaded = runtime.load(plan.spec.component_id, plan.wasm_path)
    StoreBudget.plan(plan.spec.limits.max_memory_bytes, loaded.footprint, str(loaded.source))
    return loaded


def _describe(exc: BaseException) -> str:
    """`Type: message` of an exception, or of every exception inside a group."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"


def _host_changes(old: Config, new: Config) -> list[tuple[str, Any, Any]]:
    """The [host] settings that differ between two configs, as (key, old, new)."""
    before, after = msgspec.structs.asdict(old.host), msgspec.structs.asdict(new.host)
    return [(key, before[key], after[key]) for key in before if before[key] != after[key]]


class Daemon:
    """Runs one configuration until stopped."""

    def __init__(self, config: Config) -> None:
        self.config = config
        host = config.host
        prepare_state_dir(config)
        self.runtime = Runtime(EngineSettings(epoch_tick_ms=host.epoch_tick_ms), config.cache_dir,
                               config.components_dir)
        self.storage = SqliteStorage(config.storage_path, default_quota_bytes=host.default_storage_quota_bytes)
        self.permissions = CapabilityChecker()
        self.workers = WorkerPool(host.worker_threads)
        self.notifier = Notifier()
        self.deployments: dict[ComponentId, Deployment] = {}
        self._stop = anyio.Event()
        self._stopping = False
        self._startup = anyio.CancelScope()  # cancelled by a stop signal
        self._reload_lock = anyio.Lock()
        self.router: MessageRouter
        self.supervisor: Supervisor
        self.control: ControlServer

    # --- running ---

    async def run(self) -> int:
        """Deploy, serve until a stop signal, stop gracefully; returns the exit code."""
        try:
            return await self._run()
        finally:
            self._release()

    async def _run(self) -> int:
        self.router = MessageRouter(asyncio.get_running_loop(), self.permissions, self.config.host.max_message_bytes)
        stores = HostStores(self.runtime, self.router, self.storage, self.permissions)
        self.supervisor = Supervisor(stores, self.router, self.workers)
        self.control = ControlServer(self.config.control_socket, self.config.socket_mode, self.handle,
                                     self.config.socket_gid, allowed_uids=self.config.control_uids)
        try:
            await self.control.start()
        except (SocketInUse, OSError) as exc:
            log.error("control_socket_unavailable", socket=str(self.config.control_socket), error=str(exc))
            print(f"wasmhost: {exc}", file=sys.stderr)
            return 1
        # SIGHUP asks for a reload; one waiting request is enough, however many signals come meanwhile
        reloads_in, reloads_out = anyio.create_memory_object_stream[None](1)
        try:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals, \
                    reloads_in, reloads_out:
                async with self.supervisor, anyio.create_task_group() as tasks:
                    await tasks.start(self.control.serve, name="control")
                    tasks.start_soon(self._signals, signals, reloads_in, name="signals")
                    tasks.start_soon(self._reloads, reloads_out, name="reloads")
                    tasks.start_soon(self._watchdog, name="watchdog")
                    with self._startup:
                        await self._start_up()
                    await self._stop.wait()
                    await self._shutdown()
                    await self.control.close()  # after the stop: answers it decided (stopped, failed) go out
                    tasks.cancel_scope.cancel()  # the signal, reload and watchdog tasks
        finally:
            with anyio.CancelScope(shield=True):
                await self.control.close()  # bounded (control.ANSWER_TIMEOUT and a second); at once if closed
        log.info("stopped")
        return 0

    async def _start_up(self) -> None:
        """Deploy the configured components; READY=1 once every first attempt has ended."""
        for warning in self.config.warnings:
            log.warning("config_warning", detail=warning)
        began = time.monotonic()
        async with self._reload_lock:  # a SIGHUP during start-up waits for it
            await self._apply(self.config.components)
        self.notifier.notify("READY=1", f"STATUS={self._summary()}")
        log.info("daemon_ready", seconds=round(time.monotonic() - began, 3), summary=self._summary(),
                 socket=str(self.config.control_socket))

    async def _signals(self, signals: AsyncIterator[signal.Signals], reloads: MemoryObjectSendStream[None]) -> None:
        """Turn signals into a stop or a reload request."""
        async for sig in signals:
            if sig == signal.SIGHUP:
                with contextlib.suppress(anyio.WouldBlock):
                    reloads.send_nowait(None)  # one is waiting already: it reads the newest config anyway
            else:
                self._on_stop_signal(sig)

    async def _reloads(self, requests: MemoryObjectReceiveStream[None]) -> None:
        """Apply SIGHUP reload requests one after the other."""
        async for _ in requests:  # after a stop signal, reload() refuses; one under way ends with this task
            await self.reload()

    def _on_stop_signal(self, sig: int) -> None:
        if self._stopping:
            log.warning("forced_exit", signal=signal.Signals(sig).name)
            os._exit(0)  # committed writes are durable and SQLite's WAL keeps the file consistent
        self._stopping = True
        log.info("stopping", signal=signal.Signals(sig).name)
        self._startup.cancel()  # components still starting are stopped; compiles are not waited for
        self._stop.set()

    async def _shutdown(self) -> None:
        self.notifier.notify("STOPPING=1")
        for actor in self.supervisor.actors.values():
            actor.mailbox.seal()  # stop accepting new messages everywhere before draining
        await self.supervisor.stop_all(self.config.host.drain_timeout_s)

    def _release(self) -> None:
        """Close what the daemon holds, each whatever happened to the others."""
        try:
            self.workers.close()
        finally:
            try:
                self.storage.close()
            finally:
                try:
                    self.runtime.close()
                finally:
                    self.notifier.close()

    async def _watchdog(self) -> None:
        interval = self.notifier.watchdog_interval()
        if interval is None:
            return
        while True:
            expected = anyio.current_time() + interval
            await anyio.sleep(interval)
            if anyio.current_time() - expected < interval:  # the loop answered in time: it is healthy
                self.notifier.notify("WATCHDOG=1")

    def _summary(self) -> str:
        states: dict[str, int] = {}
        for row in self.status_rows():
            states[row["state"]] = states.get(row["state"], 0) + 1
        return ", ".join(f"{n} {state}" for state, n in sorted(states.items())) or "no components"

    # --- deployment ---

    async def _load(self, plan: ComponentPlan) -> LoadedComponent:
        return await run_detached(lambda: load_plan(self.runtime, plan), f"compile {plan.spec.component_id}")

    async def _start(self, plan: ComponentPlan, loaded: LoadedComponent | None = None) -> None:
        """Start one component, compiling it first unless the reload already has (`loaded`). It is listed
        (`starting`, phase `compiling`) and its mailbox takes messages from now on."""
        cid = plan.spec.component_id
        deployment = Deployment(plan)
        self.deployments[cid] = deployment

        def compiled(component: LoadedComponent) -> LoadedComponent:
            deployment.digest = component.digest
            deployment.loaded = component
            return component

        async def compile_it() -> LoadedComponent:
            try:
                return compiled(await self._load(plan))
            except LoadError as exc:
                deployment.load_error = str(exc)
                log.error("component_load_failed", component=str(cid), error=str(exc))
                raise

        self._grant(plan)
        await self.supervisor.start(plan.spec, compile_it if loaded is None else compiled(loaded))

    def _grant(self, plan: ComponentPlan) -> None:
        self.permissions.grant(plan.spec.component_id, plan.grants)  # parsed and checked with the config
        self.storage.set_quota(str(plan.spec.component_id), plan.storage_quota_bytes)

    async def _remove(self, cid: ComponentId) -> None:
        await self.supervisor.remove(cid, self.config.host.drain_timeout_s)
        self.permissions.revoke(cid)
        self.deployments.pop(cid, None)

    async def _apply(self, plans: list[ComponentPlan],
                     loaded: dict[ComponentId, LoadedComponent] | None = None) -> None:
        gate = asyncio.Semaphore(START_CONCURRENCY)

        async def one(plan: ComponentPlan) -> None:
            async with gate:
                await self._start(plan, (loaded or {}).get(plan.spec.component_id))

        # Within a supervisor group, start order matters (rest-for-one): start groups in order.
        grouped: dict[str | None, list[ComponentPlan]] = {}
        for plan in plans:
            grouped.setdefault(plan.spec.group, []).append(plan)
        ungrouped = grouped.pop(None, [])

        async def in_order(members: list[ComponentPlan]) -> None:
            for plan in members:
                await one(plan)

        # A task group: if one start raises, the others are cancelled and awaited before the error goes on,
        # so that a reload restoring the old version never races a start still under way.
        async with anyio.create_task_group() as group:
            for plan in ungrouped:
                group.start_soon(one, plan)
            for members in grouped.values():
                group.start_soon(in_order, members)

    # --- reload ---

    async def reload(self) -> list[str]:
        """Re-read the config file and apply it whole; returns what stopped it (nothing changed then).

        Everything that can fail is done before a running component is touched: the config is parsed and
        validated, every added or changed component is compiled and checked against its memory budget.
        RELOADING=1 is always followed by READY=1, and the lock is released, whatever happens."""
        if self._stopping:  # what it would start, the shutdown would not stop
            return self._refuse_reload()
        async with self._reload_lock:
            if self._stopping:  # a SIGTERM sent with the SIGHUP (the kernel delivers the lower-numbered SIGHUP first)
                return self._refuse_reload()
            monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            self.notifier.notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec}")
            outcome = "reload failed"
            try:
                errors = await self._reload()
                outcome = "reload rejected" if errors else "reloaded"
                return errors
            except Exception as exc:  # a bug must not leave systemd waiting nor the reload lock held
                log.exception("reload_failed")
                return [f"reload failed, previous configuration restored: {_describe(exc)}"]
            finally:
                self.notifier.notify("READY=1", f"STATUS={outcome}; {self._summary()}")

    def _refuse_reload(self) -> list[str]:
        log.warning("reload_refused", reason="the daemon is stopping")
        return ["reload refused: the daemon is stopping"]

    async def _reload(self) -> list[str]:
        try:
            new = await asyncio.to_thread(load_config, self.config.source)
        except ConfigError as exc:
            log.error("reload_rejected", errors=exc.errors)
            return [f"reload rejected, nothing changed: {exc.source}: {len(exc.errors)} error(s):",
                    *(f"  {e}" for e in exc.errors)]
        problems = [f"host.{key}: changed from {old!r} to {value!r}; [host] settings are read only at start: "
                    "restart wasmhost to apply them" for key, old, value in _host_changes(self.config, new)]
        added, removed, changed, unchanged = await self._diff(new)
        wanted = {p.spec.component_id: p for p in new.components}
        loaded: dict[ComponentId, LoadedComponent] = {}
        for cid in added + changed:  # compile and check every new version before touching the old ones
            try:
                loaded[cid] = await self._load(wanted[cid])
            except Exception as exc:  # whatever stops the new version, the old one keeps running
                reason = str(exc) if isinstance(exc, LoadError) else _describe(exc)
                problems.append(f"{cid}: " + " ".join(line.strip() for line in reason.splitlines() if line.strip()))
        if self._stopping:  # a stop signal came while the new versions compiled: start nothing now
            problems.append("the daemon is stopping")
        if problems:
            log.error("reload_rejected", errors=problems)
            return [f"reload rejected, nothing changed: {len(problems)} problem(s):", *(f"  {p}" for p in problems)]
        old_config, old_deployments = self.config, dict(self.deployments)
        try:
            for cid in removed + changed:
                await self._remove(cid)
            self.config = new
            await self._apply([wanted[c] for c in added + changed], loaded)
        except Exception:
            await self._restore(old_config, old_deployments, added + changed + removed)
            raise
        log.info("reloaded", added=[str(c) for c in added], removed=[str(c) for c in removed],
                 changed=[str(c) for c in changed], unchanged=len(unchanged))
        return []

    async def _restore(self, config: Config, deployments: dict[ComponentId, Deployment],
                       touched: list[ComponentId]) -> None:
        """Put back what a failed reload changed: the old config, and the old version of every component it
        touched (restarted from the bytes it was loaded from; its instance state is lost, its storage kept)."""
        log.error("reload_restoring", components=[str(c) for c in touched])
        self.config = config
        for cid in touched:
            try:
                await self._remove(cid)
                previous = deployments.get(cid)
                if previous is None:
                    continue
                self.deployments[cid] = previous
                if previous.loaded is not None:
                    self._grant(previous.plan)
                    await self.supervisor.start(previous.plan.spec, previous.loaded)
            except Exception:  # restore the others even if one cannot be
                log.exception("reload_restore_failed", component=str(cid))

    async def _diff(self, new: Config) -> tuple[list[ComponentId], list[ComponentId], list[ComponentId],
                                                list[ComponentId]]:
        wanted = {p.spec.component_id: p for p in new.components}
        added = [c for c in wanted if c not in self.deployments]
        removed = [c for c in self.deployments if c not in wanted]
        changed, unchanged = [], []
        for cid in wanted:
            current = self.deployments.get(cid)
            if current is None:
                continue
            digest = await asyncio.to_thread(self._digest, wanted[cid].wasm_path)
            if current.plan != wanted[cid] or current.digest is None or digest != current.digest:
                changed.append(cid)
            else:
                unchanged.append(cid)
        return added, removed, changed, unchanged

    def _digest(self, path: Path) -> str | None:
        try:
            return self.runtime.cache.key(path.read_bytes())
        except OSError:
            return None

    # --- status ---

    def status_rows(self) -> list[dict[str, Any]]:
        """One row per configured component, for `wasmhost status`."""
        rows = []
        for cid, deployment in self.deployments.items():
            actor = self.supervisor.actors.get(cid)
            if actor is None:
                rows.append({"id": str(cid), "state": "failed", "phase": None, "health": "unknown", "restarts": 0,
                             "mailbox": 0, "handled": 0, "failed": 0, "last_error": deployment.load_error})
                continue
            stats = actor.stats
            rows.append({"id": str(cid), "state": actor.state.value, "phase": actor.phase,
                         "health": actor.health.value, "restarts": stats.restarts, "mailbox": len(actor.mailbox),
                         "handled": stats.handled, "failed": stats.failed, "last_error": stats.last_error})
        return rows

    # --- control requests ---

    async def handle(self, request: protocol.Request) -> protocol.Response:
        """Answer one control request."""
        try:
            return await self._handle(request)
        except (InvalidComponentId, HostError, RequestFailed, LoadError, KeyError) as exc:
            return protocol.Response(False, str(exc).strip("'"))

    async def _handle(self, request: protocol.Request) -> protocol.Response:
        if isinstance(request, protocol.Status):
            return protocol.Response(True, data={"components": self.status_rows(),
                                                 "storage_io_errors": self.storage.io_errors,
                                                 "storage_last_error": self.storage.last_io_error,
                                                 "log_lines_dropped": lines_dropped()})
        if isinstance(request, protocol.Reload):
            errors = await self.reload()
            return protocol.Response(not errors, "\n".join(errors) or None)
        cid = ComponentId.parse(request.id)
        if isinstance(request, protocol.Send):
            await self.router.host_send(cid, request.payload, wait=request.wait)
            return protocol.Response(True)
        if isinstance(request, protocol.Call):
            reply = await self.router.host_request(cid, request.payload, request.timeout, wait=True)
            return protocol.Response(True, data=reply)
        actor = self.supervisor.actors.get(cid)
        if actor is None:
            return protocol.Response(False, f"no running component {cid}")
        if isinstance(request, protocol.Stop):
            await actor.stop(self.config.host.drain_timeout_s)
        elif isinstance(request, protocol.Start):
            await actor.start()
        elif isinstance(request, protocol.Restart):
            await actor.restart()  # answered once the new instance runs or has failed
        return protocol.Response(True, data=actor.state.value)


async def run_daemon(config_path: Path) -> int:
    """Load the config and run the daemon; config errors at start exit with 1."""
    try:
        config = await asyncio.to_thread(load_config, config_path)
    except ConfigError as exc:
        log.error("config_invalid", source=exc.source, errors=exc.errors)
        print(exc, file=sys.stderr)
        return 1
    try:
        daemon = Daemon(config)
    except OSError as exc:
        log.error("daemon_start_failed", error=str(exc))
        return 1
    return await daemon.run()
