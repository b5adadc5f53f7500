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
from wasmhost.runtime.loader import LoadedComponent
from wasmhost.runtime.runtime import Runtime
from wasmhost.security.capabilities import Capabilities, CapabilityChecker
from wasmhost.storage.sqlite_store import SqliteStorage
from wasmhost.system import protocol
from wasmhost.system.config import ComponentPlan, Config, ConfigError, load_config
from wasmhost.system.control import ControlServer, SocketInUse
from wasmhost.system.logging import lines_dropped
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
        return await asyncio.to_thread(self.runtime.load, plan.spec.component_id, plan.wasm_path)

    async def _start(self, plan: ComponentPlan) -> None:
        cid = plan.spec.component_id
        deployment = Deployment(plan)
        self.deployments[cid] = deployment
        try:
            loaded = await self._load(plan)
        except LoadError as exc:
            deployment.load_error = str(exc)
            log.error("component_load_failed", component=str(cid), error=str(exc))
            return
        deployment.digest = loaded.digest
        self._grant(plan)
        await self.supervisor.start(plan.spec, loaded)

    def _grant(self, plan: ComponentPlan) -> None:
        caps = plan.capabilities
        self.permissions.grant(plan.spec.component_id, Capabilities.from_config(
            send=caps.send, request=caps.request, broadcast=caps.broadcast, storage=caps.storage,
            storage_quota_bytes=plan.storage_quota_bytes))
        self.storage.set_quota(str(plan.spec.component_id), plan.storage_quota_bytes)

    async def _remove(self, cid: ComponentId) -> None:
        await self.supervisor.remove(cid, self.config.host.drain_timeout_s)
        self.permissions.revoke(cid)
        self.deployments.pop(cid, None)

    async def _apply(self, plans: list[ComponentPlan]) -> None:
        gate = asyncio.Semaphore(START_CONCURRENCY)

        async def one(plan: ComponentPlan) -> None:
            async with gate:
                await self._start(plan)

        # Within a supervisor group, start order matters (rest-for-one): start groups in order.
        grouped: dict[str | None, list[ComponentPlan]] = {}
        for plan in plans:
            grouped.setdefault(plan.spec.group, []).append(plan)
        ungrouped = grouped.pop(None, [])

        async def in_order(members: list[ComponentPlan]) -> None:
            for plan in members:
                await one(plan)

        await asyncio.gather(*(one(p) for p in ungrouped), *(in_order(m) for m in grouped.values()))

    # --- reload ---

    async def reload(self) -> list[str]:
        """Re-read the config file and apply the difference; returns the errors (nothing changes then)."""
        async with self._reload_lock:
            monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            self.notifier.notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec}")
            try:
                new = await asyncio.to_thread(load_config, self.config.source)
            except ConfigError as exc:
                log.error("reload_rejected", errors=exc.errors)
                self.notifier.notify("READY=1", f"STATUS=reload rejected; {self._summary()}")
                return exc.errors
            if new.host != self.config.host:
                log.warning("host_settings_need_restart", detail="[host] changed; it applies at the next start")
            added, removed, changed, unchanged = await self._diff(new)
            for cid in removed:
                await self._remove(cid)
            for cid in changed:
                await self._remove(cid)
            self.config = new
            wanted = {p.spec.component_id: p for p in new.components}
            await self._apply([wanted[c] for c in added + changed])
            log.info("reloaded", added=[str(c) for c in added], removed=[str(c) for c in removed],
                     changed=[str(c) for c in changed], unchanged=len(unchanged))
            self.notifier.notify("READY=1", f"STATUS={self._summary()}")
            return []

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
                rows.append({"id": str(cid), "state": "failed", "health": "unknown", "restarts": 0,
                             "mailbox": 0, "handled": 0, "failed": 0, "last_error": deployment.load_error})
                continue
            stats = actor.stats
            rows.append({"id": str(cid), "state": actor.state.value, "health": actor.health.value,
                         "restarts": stats.restarts, "mailbox": len(actor.mailbox), "handled": stats.handled,
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
