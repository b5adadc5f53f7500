"""The daemon: deploys the configured components, reloads the config, answers the control socket,
speaks sd_notify, and stops gracefully on SIGTERM / SIGINT."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import msgspec
import structlog

from wasmhost.actors.state import ActorState
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
from wasmhost.system.logging import lines_dropped, reopen_log_files
from wasmhost.system.sd_notify import Notifier

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
    """Compile and validate a component's binary, link-check its imports (wasi:http only with outbound_http),
    and check that what it creates fits its max_memory_bytes: the load step of `run`, `reload` and `check`
    (LoadError says why not)."""
    loaded = runtime.load(plan.spec.component_id, plan.wasm_path, plan.outbound_http)
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
        self._stop = asyncio.Event()
        self._stopping = False
        self._reload_lock = asyncio.Lock()
        self.router: MessageRouter
        self.supervisor: Supervisor
        self.control: ControlServer

    # --- running ---

    async def run(self) -> int:
        """Deploy, serve until a stop signal, stop gracefully; returns the exit code."""
        loop = asyncio.get_running_loop()
        self.router = MessageRouter(loop, self.permissions, self.config.host.max_message_bytes)
        self.supervisor = Supervisor(self.runtime, self.router, self.workers, self.storage, self.permissions)
        self.control = ControlServer(self.config.control_socket, self.config.socket_mode, self.handle,
                                     self.config.socket_gid, allowed_uids=self.config.control_uids)
        try:
            await self.control.start()
        except (SocketInUse, OSError) as exc:
            log.error("control_socket_unavailable", socket=str(self.config.control_socket), error=str(exc))
            print(f"wasmhost: {exc}", file=sys.stderr)
            self._release()
            return 1
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload()))
        loop.add_signal_handler(signal.SIGUSR1, reopen_log_files)  # logrotate's postrotate: a new log_file
        for warning in self.config.warnings:
            log.warning("config_warning", detail=warning)
        began = time.monotonic()
        async with self._reload_lock:  # a SIGHUP during start-up waits for it
            await self._apply(self.config.components)
        self.notifier.notify("READY=1", f"STATUS={self._summary()}")
        log.info("daemon_ready", seconds=round(time.monotonic() - began, 3), summary=self._summary(),
                 socket=str(self.config.control_socket))
        watchdog = loop.create_task(self._watchdog())
        await self._stop.wait()
        watchdog.cancel()
        await self._shutdown()
        return 0

    def _on_stop_signal(self, sig: int) -> None:
        if self._stopping:
            log.warning("forced_exit", signal=signal.Signals(sig).name)
            os._exit(0)  # committed writes are durable and SQLite's WAL keeps the file consistent
        self._stopping = True
        log.info("stopping", signal=signal.Signals(sig).name)
        self._stop.set()

    async def _shutdown(self) -> None:
        self.notifier.notify("STOPPING=1")
        for actor in self.supervisor.actors.values():
            actor.mailbox.seal()  # stop accepting new messages everywhere before draining
        await self.supervisor.stop_all(self.config.host.drain_timeout_s)
        await self.control.close()
        self._release()
        log.info("stopped")

    def _release(self) -> None:
        self.workers.close()
        self.storage.close()
        self.runtime.close()
        self.notifier.close()

    async def _watchdog(self) -> None:
        interval = self.notifier.watchdog_interval()
        if interval is None:
            return
        loop = asyncio.get_running_loop()
        while True:
            expected = loop.time() + interval
            await asyncio.sleep(interval)
            if loop.time() - expected < interval:  # the loop answered in time: it is healthy
                self.notifier.notify("WATCHDOG=1")

    def _summary(self) -> str:
        states: dict[str, int] = {}
        for row in self.status_rows():
            states[row["state"]] = states.get(row["state"], 0) + 1
        return ", ".join(f"{n} {state}" for state, n in sorted(states.items())) or "no components"

    # --- deployment ---

    async def _load(self, plan: ComponentPlan) -> LoadedComponent:
        return await asyncio.to_thread(load_plan, self.runtime, plan)

    async def _start(self, plan: ComponentPlan, loaded: LoadedComponent | None = None) -> None:
        """Start one component, loading it first unless the reload already has (`loaded`)."""
        cid = plan.spec.component_id
        deployment = Deployment(plan)
        self.deployments[cid] = deployment
        if loaded is None:
            try:
                loaded = await self._load(plan)
            except LoadError as exc:
                deployment.load_error = str(exc)
                self.router.load_failed(cid, str(exc))  # messages to it say so, not target-not-found
                log.error("component_load_failed", component=str(cid), error=str(exc))
                return
        deployment.digest = loaded.digest
        deployment.loaded = loaded
        self._grant(plan)
        await self.supervisor.start(plan.spec, loaded)

    def _grant(self, plan: ComponentPlan) -> None:
        self.permissions.grant(plan.spec.component_id, plan.grants)  # parsed and checked with the config
        self.storage.set_quota(str(plan.spec.component_id), plan.storage_quota_bytes)

    async def _remove(self, cid: ComponentId) -> None:
        await self.supervisor.remove(cid, self.config.host.drain_timeout_s)
        self.permissions.revoke(cid)
        self.deployments.pop(cid, None)
        self.router.load_failed(cid, None)

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
            log.warning("reload_refused", reason="the daemon is stopping")
            return ["reload refused: the daemon is stopping"]
        async with self._reload_lock:
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
                rows.append({"id": str(cid), "state": "failed", "health": None, "restarts": 0,
                             "mailbox": 0, "queued": 0, "in_hand": 0, "handled": 0, "failed": 0,
                             "last_error": deployment.load_error})
                continue
            stats = actor.stats
            # health is the last answer of a live instance: none to show while it is not running
            health = actor.health.value if actor.state is ActorState.RUNNING else None
            rows.append({"id": str(cid), "state": actor.state.value, "health": health, "restarts": stats.restarts,
                         "mailbox": len(actor.mailbox) + actor.in_hand, "queued": len(actor.mailbox),
                         "in_hand": actor.in_hand, "handled": stats.handled,
                         "failed": stats.failed, "last_error": stats.last_error})
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
            await self.router.host_send(cid, request.payload, wait=request.wait, timeout=request.timeout)
            return protocol.Response(True)
        if isinstance(request, protocol.Call):
            try:
                reply = await self.router.host_request(cid, request.payload, request.timeout, wait=True)
            except RequestFailed as exc:  # the backtrace behind a one-line error only when asked for
                return protocol.Response(False, str(exc), data=(exc.trace or None) if request.verbose else None)
            return protocol.Response(True, data=reply)
        actor = self.supervisor.actors.get(cid)
        if actor is None:
            return protocol.Response(False, f"no running component {cid}")
        if isinstance(request, protocol.Stop):
            await actor.stop(self.config.host.drain_timeout_s)
        elif isinstance(request, protocol.Start):
            await actor.start()
        elif isinstance(request, protocol.Restart):
            if actor.state is ActorState.RUNNING:
                actor.request_restart()
            else:
                await actor.start()
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
