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
import dataclasses
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from wasmhost.actors.actor import Handover
from wasmhost.actors.state import ActorState
from wasmhost.actors.supervisor import Supervisor
from wasmhost.actors.workers import WorkerPool
from wasmhost.core import affinity
from wasmhost.core.errors import HostError, LoadError
from wasmhost.core.ids import ComponentId, InvalidComponentId
from wasmhost.core.metadata import HealthStatus
from wasmhost.core.private_files import NotOwned, private_dir
from wasmhost.lattice.wire import InventoryEntry
from wasmhost.messaging.outcome import RequestFailed
from wasmhost.messaging.router import MessageRouter
from wasmhost.runtime.cache import CachePruner
from wasmhost.runtime.loader import LoadedComponent, read_component_file
from wasmhost.runtime.runtime import Runtime
from wasmhost.security.capabilities import CapabilityChecker
from wasmhost.storage.sqlite_store import SqliteStorage
from wasmhost.system import protocol
from wasmhost.system.config import ComponentPlan, Config, ConfigError, load_config
from wasmhost.system.control import ControlServer, SocketInUse
from wasmhost.system.detached import start_detached
from wasmhost.system.early_signals import take_early_signals
from wasmhost.system.heap import DeploymentHeap, collect_all, frozen_after_slow_collections, steady_collector
from wasmhost.system.logging import lines_dropped, reopen_log_files, shutdown_logging
from wasmhost.system.reload_report import ReloadReport, cut
from wasmhost.system.sd_notify import Notifier
from wasmhost.system.shared_loads import SharedLoads
from wasmhost.system.state_lock import StateDirInUse, StateLock
from wasmhost.system.status_table import Deployments, StatusTable, fit
from wasmhost.system.stores import HostStores

if TYPE_CHECKING:  # imported when [host] metrics listens: prometheus_client and wsgiref take ~25 ms to import
    from wasmhost.system.metrics import MetricsServer

log = structlog.get_logger("wasmhost.daemon")

CONFIG_READ_TIMEOUT_S = 30.0
"""Seconds a reload may take to read the configuration file before it is rejected."""
START_CONCURRENCY = 32
"""Components loaded and started at the same time."""
ROLLOUT_PROBE_S = 1.0
"""Seconds between two health probes of a new version during its rollout check window."""
CACHE_PRUNE_EVERY_S = 86400.0
"""The compilation cache is pruned after start-up, after each reload and once a day (see cache.prune)."""
CACHE_PRUNE_JOIN_S = 2.0
"""How long an exit waits for a prune under way (one takes milliseconds; the bound is for a stuck disk)."""
FORCED_EXIT_FLUSH_S = 0.2
"""How long a second stop signal waits for the buffered log lines to be written before the process exits: a
line is written within milliseconds; the bound is for a destination nobody reads."""


@dataclass
class DaemonCounters:
    """What the daemon counts for metrics alone (changed on the loop, read by scrapes)."""

    started: float = field(default_factory=time.time)
    started_monotonic: float = field(default_factory=time.monotonic)
    control_requests: Counter[str] = field(default_factory=Counter)
    """Control requests answered, by request type (status, call, ...)."""
    reloads: Counter[str] = field(default_factory=Counter)
    """Reloads by result (reloaded, rolled-back, rejected, refused, failed)."""


@dataclass
class Deployment:
    """One configured component: its plan, the digest of its binary, and why it is down if it is."""

    plan: ComponentPlan
    digest: str | None = None
    load_error: str | None = None
    loaded: LoadedComponent | None = None
    """The compiled component it runs, kept so that a failed reload can put it back."""
    rollout: str | None = None
    """What the last reload did to its version: `upgraded`, or `rolled back: REASON`."""


def prepare_state_dir(config: Config) -> None:
    """Make state_dir owner-only (0700) before anything is created in it, whatever the umask; 0710 with
    the socket's group when a group-accessible control socket lives inside it (the group may reach
    the socket, not list or read anything: every file in it is 0600). A failure shows up later as
    storage io-errors, as before, except a state_dir owned by another user: raises NotOwned (logged as
    `state_dir_refused`), as that user could read and replace the storage, the control socket and the
    compiled cache (native code the daemon runs), so nothing may run on it."""
    grouped = config.socket_gid is not None and config.control_socket.parent == config.state_dir
    try:
        private_dir(config.state_dir, 0o710 if grouped else 0o700, config.socket_gid if grouped else None)
    except NotOwned as exc:
        log.error("state_dir_refused", path=exc.path, found=exc.found, expected=exc.expected)
        raise
    except OSError as exc:
        log.error("state_dir_unusable", path=str(config.state_dir), error=str(exc))


def _describe(exc: BaseException) -> str:
    """`Type: message` of an exception, or of every exception inside a group."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"


def _one_line(text: str, component: ComponentId | None = None) -> str:
    """A multi-line error (a wasm backtrace) on one line, without a leading `component: `."""
    text = " ".join(line.strip() for line in text.splitlines() if line.strip())
    return text.removeprefix(f"{component}: ") if component is not None else text


async def _first_of(timeout: float, *events: asyncio.Event | anyio.Event) -> None:
    """Wait until one of `events` is set, for at most `timeout` seconds."""
    with anyio.move_on_after(timeout):
        async with anyio.create_task_group() as group:
            async def wait(event: asyncio.Event | anyio.Event) -> None:
                await event.wait()
                group.cancel_scope.cancel()

            for event in events:
                group.start_soon(wait, event)


def _host_changes(old: Config, new: Config) -> list[tuple[str, Any, Any]]:
    """The [host] settings that differ between two configs, as (key, old, new)."""
    before, after = msgspec.structs.asdict(old.host), msgspec.structs.asdict(new.host)
    return [(key, before[key], after[key]) for key in before if before[key] != after[key]]


_LATTICE_KEYS = {"tls_ca": "tls.ca", "tls_cert": "tls.cert", "tls_key": "tls.key",
                 "credentials_text": "the contents of the credentials file"}
"""The config key behind a field of LatticeSettings, where the names differ."""


def _lattice_changes(old: Config, new: Config) -> list[str]:
    """The [lattice] keys that differ between two configs, named without their values (credentials are
    secrets). Only 'lattice: changed' was said: after a credentials file was rotated in place (the daemon
    reads it at start), every reload was rejected for a [lattice] table nobody had edited."""
    if old.lattice is None or new.lattice is None:
        changed = [] if old.lattice is new.lattice else [f"[lattice] {'added' if old.lattice is None else 'removed'}"]
    else:
        before, after = old.lattice, new.lattice
        changed = [_LATTICE_KEYS.get(f.name, f.name) for f in dataclasses.fields(before)
                   if getattr(before, f.name) != getattr(after, f.name)]
    if old.remote_grants != new.remote_grants:
        changed.append("grants")
    return changed


_SETTING_NAMES = {
    "path": "path", "wasm_path": "path", "env_vars": "env", "config_data": "config data",
    "intensity": "max_restarts/restart_window_s", "backoff": "backoff_base_ms/backoff_max_ms",
    "health_interval": "health_interval_s", "shutdown_timeout": "shutdown_timeout_s",
    "storage": "capabilities", "log_limit": "log_rate/log_burst", "grants": "capabilities",
    "storage_quota_bytes": "capabilities",
}
"""The config key(s) behind a field of ComponentPlan or ActorSpec, where the names differ."""


def _what_changed(old: ComponentPlan, new: ComponentPlan, old_digest: str | None, new_digest: str | None
                  ) -> list[str]:
    """The settings of a component that differ between two plans, by their config keys, and `binary`
    when its file's bytes differ (or either could not be read)."""
    what = [] if old_digest is not None and old_digest == new_digest else ["binary"]
    for owner_old, owner_new in ((old.spec, new.spec), (old, new)):
        for item in dataclasses.fields(owner_old):
            if item.name in ("spec", "component_id"):
                continue
            if getattr(owner_old, item.name) != getattr(owner_new, item.name):
                name = _SETTING_NAMES.get(item.name, item.name)
                if name not in what:
                    what.append(name)
    return what


_REQUEST_NAMES = {cls: cls.__struct_config__.tag for cls in protocol.Request.__args__}  # type: ignore[attr-defined]
"""The `request` label of control requests: the tag each is sent with."""


class Daemon:
    """Runs one configuration until stopped."""

    def __init__(self, config: Config) -> None:
        self.config = config
        host = config.host
        prepare_state_dir(config)
        self.state_lock = StateLock(config.state_dir)
        self.state_lock.acquire()  # StateDirInUse: another daemon's storage and read cache
        self.runtime = Runtime(config.engine_settings, config.cache_dir, config.components_dir)
        self.cache_pruner = CachePruner(self.runtime.cache)
        self.storage = SqliteStorage(config.storage_path, default_quota_bytes=host.default_storage_quota_bytes,
                                     cache_bytes=host.storage_cache_bytes)
        self.permissions = CapabilityChecker()
        self.workers = WorkerPool(host.worker_threads)
        self.notifier = Notifier()
        self.deployments: Deployments[Deployment] = Deployments()
        self._stop = anyio.Event()
        self._stopping = False
        self._startup = anyio.CancelScope()  # cancelled by a stop signal
        self._reload_lock = anyio.Lock()
        self._ready = False  # start-up is over: from now on a reload never waits for another one
        self.counters = DaemonCounters()  # read by the metrics endpoint
        self.metrics: MetricsServer | None = None
        self.router: MessageRouter
        self.supervisor: Supervisor
        self.status_table: StatusTable
        self.control: ControlServer
        self.link: Any = None  # wasmhost.lattice.link.Link with [lattice]

    # --- running ---

    async def run(self) -> int:
        """Deploy, serve until a stop signal, stop gracefully; returns the exit code."""
        try:
            # what restarts build is frozen too; objects kept a few batches are not collected (see heap.py)
            with frozen_after_slow_collections(), steady_collector():
                return await self._run()
        finally:
            self._release()

    async def _run(self) -> int:
        self.router = MessageRouter(asyncio.get_running_loop(), self.permissions, self.config.host.max_message_bytes)
        stores = HostStores(self.runtime, self.router, self.storage, self.permissions)
        self.supervisor = Supervisor(stores, self.router, self.workers)
        self.status_table = StatusTable(self.deployments, self.supervisor.actors, self.supervisor.changes)
        link = self._lattice(stores)
        self.control = ControlServer(self.config.control_socket, self.config.socket_mode, self.handle,
                                     self.config.socket_gid, allowed_uids=self.config.control_uids)
        if self.config.metrics is not None:  # the endpoint's module (prometheus_client, wsgiref) only then
            from wasmhost.system.metrics import start_metrics

            try:
                self.metrics = start_metrics(self)  # closed by _release
            except OSError as exc:
                log.error("metrics_unavailable", address=str(self.config.metrics), error=str(exc))
                print(f"wasmhost: host.metrics: cannot listen on {self.config.metrics}: {exc}", file=sys.stderr)
                return 1
        try:
            await self.control.start()
        except (SocketInUse, OSError) as exc:
            log.error("control_socket_unavailable", socket=str(self.config.control_socket), error=str(exc))
            print(f"wasmhost: {exc}", file=sys.stderr)
            return 1
        # SIGHUP asks for a reload; one waiting request is enough, however many signals come meanwhile
        reloads_in, reloads_out = anyio.create_memory_object_stream[None](1)
        try:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
                                          signal.SIGUSR1) as signals, \
                    reloads_in, reloads_out:
                async with self.supervisor, anyio.create_task_group() as tasks:
                    await tasks.start(self.control.serve, name="control")
                    tasks.start_soon(self._signals, signals, reloads_in, name="signals")
                    tasks.start_soon(self._reloads, reloads_out, name="reloads")
                    tasks.start_soon(self._watchdog, name="watchdog")
                    if link is not None:  # connects in the background: READY does not wait for NATS
                        tasks.start_soon(link.run, name="lattice")
                    with self._startup:
                        await self._start_up()
                    self._prune_cache()  # before anything else runs on the loop: a stop right after READY waits for it
                    tasks.start_soon(self._prune_cache_daily, name="cache-prune")
                    await self._stop.wait()
                    await self._shutdown()
                    await self.control.close()  # after the stop: answers it decided (stopped, failed) go out
                    tasks.cancel_scope.cancel()  # the signal, reload and watchdog tasks
        finally:
            with anyio.CancelScope(shield=True):
                await self.control.close()  # bounded (control.ANSWER_TIMEOUT and a second); at once if closed
        log.info("stopped")
        return 0

    def _lattice(self, stores: HostStores) -> Any:
        """The lattice link when the config has [lattice] (nats-py is imported only then), wired into the
        router (remote targets), the guests' directory and the capability checks (remote senders)."""
        settings = self.config.lattice
        if settings is None:
            return None
        from wasmhost.lattice.directory import LatticeDirectory
        from wasmhost.lattice.link import Link

        link = Link(settings, self.router, self._inventory, self._accepts_external)
        self.router.remote = link
        stores.directory = LatticeDirectory(self.supervisor, link.directory)
        for cid, grants in self.config.remote_grants:
            if cid not in self.deployments:  # a component running here keeps its own grants
                self.permissions.grant(cid, grants)
        self.link = link
        return link

    def _inventory(self) -> list[InventoryEntry]:
        """What this host runs, for the lattice's directory."""
        entries = []
        for cid, actor in self.supervisor.actors.items():
            deployment = self.deployments.get(cid)
            meta = actor.metadata
            entries.append(InventoryEntry(actor.name, actor.state.value, actor.health.value,
                                          deployment is not None and deployment.plan.accept_external,
                                          meta.name if meta else "", meta.version if meta else "",
                                          actor.max_message_bytes))
        return entries

    def _accepts_external(self, cid: ComponentId) -> bool | None:
        """Whether `cid` takes messages from plain NATS clients; None when it is not configured here (a client
        whose message NATS delivered as a reload removed it was told it does not set accept_external)."""
        deployment = self.deployments.get(cid)
        return deployment.plan.accept_external if deployment is not None else None

    async def _start_up(self) -> None:
        """Deploy the configured components; READY=1 once every first attempt has ended."""
        for warning in self.config.warnings:
            log.warning("config_warning", detail=warning)
        began = time.monotonic()
        async with self._reload_lock:  # a SIGHUP during start-up waits for it
            await self._apply(self.config.components)
        self._ready = True
        summary = self._summary()
        self.notifier.notify("READY=1", f"STATUS={summary}")
        log.info("daemon_ready", seconds=round(time.monotonic() - began, 3), summary=summary,
                 socket=str(self.config.control_socket))
        self.status_table.rows()  # lays the table out now, not in the first `status` (50 ms at 10,000)

    async def _signals(self, signals: AsyncIterator[signal.Signals], reloads: MemoryObjectSendStream[None]) -> None:
        """Turn signals into a stop, a reload request or a log file reopen: first those that came before the
        daemon's signal receiver was open (system/early_signals.py), then the receiver's."""
        for sig in take_early_signals():
            self._on_signal(sig, reloads)
        async for sig in signals:
            self._on_signal(sig, reloads)

    def _on_signal(self, sig: signal.Signals, reloads: MemoryObjectSendStream[None]) -> None:
        if sig == signal.SIGHUP:
            with contextlib.suppress(anyio.WouldBlock):
                reloads.send_nowait(None)  # one is waiting already: it reads the newest config anyway
        elif sig == signal.SIGUSR1:
            reopen_log_files()  # logrotate's postrotate: a new log_file
        else:
            self._on_stop_signal(sig)

    async def _reloads(self, requests: MemoryObjectReceiveStream[None]) -> None:
        """Apply SIGHUP reload requests one after the other."""
        async for _ in requests:  # after a stop signal, reload() refuses; one under way ends with this task
            await self.reload()

    def _on_stop_signal(self, sig: int) -> None:
        if self._stopping:
            log.warning("forced_exit", signal=signal.Signals(sig).name)
            # os._exit skips the log writers' drain: without this the line above (the journal's only word
            # on why the stop was cut short) and whatever the stop had logged before it were lost.
            shutdown_logging(FORCED_EXIT_FLUSH_S)
            os._exit(0)  # committed writes are durable and SQLite's WAL keeps the file consistent
        self._stopping = True
        log.info("stopping", signal=signal.Signals(sig).name)
        self._startup.cancel()  # components still starting are stopped; compiles are not waited for
        self._stop.set()

    async def _shutdown(self) -> None:
        self.notifier.notify("STOPPING=1")
        if self.link is not None:  # replicas on other hosts take what arrives from now on
            with anyio.move_on_after(2.0):
                await self.link.leave()
        for actor in self.supervisor.actors.values():
            actor.mailbox.seal()  # stop accepting new messages everywhere before draining
        await self.supervisor.stop_all(self.config.host.drain_timeout_s)

    def _release(self) -> None:
        """Close what the daemon holds, each whatever happened to the others."""
        try:
            if self.metrics is not None:
                self.metrics.close()  # first: a scrape reads what the others close
            self.workers.close()
            self.cache_pruner.join(CACHE_PRUNE_JOIN_S)  # a prune under way ends (milliseconds), bounded
        finally:
            try:
                self.storage.close()
            finally:
                try:
                    self.runtime.close()
                finally:
                    self.notifier.close()
                    self.state_lock.release()  # last: the storage is closed, a next daemon may open it

    def _prune_cache(self, also_used: Iterable[Deployment] = ()) -> None:
        """Prune the compilation cache on a thread of its own, keeping the entries of what runs and of
        `also_used` (what ran until a reload). Not once stopping: a start-up cut short has not loaded every
        component, and the others' entries must stay."""
        if self._stopping:
            return
        self.cache_pruner.request(self._cache_keys(also_used))

    def _cache_keys(self, also_used: Iterable[Deployment] = ()) -> set[str]:
        """The compilation cache keys of what runs, and of `also_used`."""
        return {d.digest for d in (*self.deployments.values(), *also_used) if d.digest is not None}

    async def _prune_cache_daily(self) -> None:
        """Prune the cache once a day: entries in use are marked as used, so one replaced after a long run
        is kept as long as one replaced the day it was compiled."""
        while True:
            await anyio.sleep(CACHE_PRUNE_EVERY_S)
            self._prune_cache()

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
        actors = self.supervisor.actors
        for cid in self.deployments:  # only the states: no row built (10,000 of them at READY)
            actor = actors.get(cid)
            state = "failed" if actor is None else actor.state.value
            states[state] = states.get(state, 0) + 1
        return ", ".join(f"{n} {state}" for state, n in sorted(states.items())) or "no components"

    # --- deployment ---

    async def _start(self, plan: ComponentPlan, loads: SharedLoads, loaded: LoadedComponent | None = None) -> None:
        """Start one component, compiling it first (through `loads`, shared by the pass) unless the reload
        already has (`loaded`). It is listed (`starting`, phase `compiling`) and its mailbox takes messages
        from now on."""
        cid = plan.spec.component_id
        deployment = Deployment(plan)
        self.deployments[cid] = deployment

        def compiled(component: LoadedComponent) -> LoadedComponent:
            self.router.load_failed(cid, None)  # loads now (a `start` after fixing the file)
            deployment.digest = component.digest
            deployment.loaded = component
            return component

        first: SharedLoads | None = loads

        async def compile_it() -> LoadedComponent:
            # The pass's loads serve the first attempt only: a later one (`wasmhost start ID` after fixing
            # the file) reads the file again instead of their cached outcome, and they are not kept alive.
            nonlocal first
            shared, first = first or SharedLoads(self.runtime), None
            try:
                return compiled(await shared.load(plan))
            except LoadError as exc:
                deployment.load_error = str(exc)
                self.router.load_failed(cid, str(exc))  # messages to it say so, not target-not-found
                log.error("component_load_failed", component=str(cid), error=str(exc))
                raise

        self._grant(plan)
        await self.supervisor.start(plan.spec, compile_it if loaded is None else compiled(loaded))

    def _grant(self, plan: ComponentPlan) -> None:
        self.permissions.grant(plan.spec.component_id, plan.grants)  # parsed and checked with the config
        self.storage.set_quota(str(plan.spec.component_id), plan.storage_quota_bytes)

    def _revoke(self, cid: ComponentId) -> None:
        """Take the grants of a local component that goes. Its replicas on other hosts get its
        [[lattice.grants]] entry back, if any: remote senders are checked here, and without it they would be
        denied until a restart."""
        for granted, grants in self.config.remote_grants:
            if granted == cid:
                self.permissions.grant(cid, grants)
                return
        self.permissions.revoke(cid)

    async def _remove(self, cids: list[ComponentId]) -> None:
        """Stop and forget `cids`, draining together (see Supervisor.remove_all)."""
        await self.supervisor.remove_all(cids, self.config.host.drain_timeout_s)
        for cid in cids:
            self._revoke(cid)
            self.deployments.pop(cid, None)
            self.router.load_failed(cid, None)
            self.permissions.audit.forget(cid)  # a component configured again counts its denials afresh
        # What storage keeps in memory per component (its quota, its read cache bookkeeping) goes too; its rows
        # stay in the file. One entry per component ever removed stayed otherwise, reload after reload.
        self.storage.forget(str(cid) for cid in cids)
        # Take the queue of changes now: each removed actor noted itself there (every actor does as it starts
        # and stops), and without a `status` to take them they stayed, Store and all, reload after reload.
        self.status_table.rows()

    async def _apply(self, plans: list[ComponentPlan],
                     loaded: dict[ComponentId, LoadedComponent] | None = None) -> None:
        loads = SharedLoads(self.runtime)
        heap = DeploymentHeap()
        # Within a supervisor group, start order matters (rest-for-one): a group is one job, started in order.
        grouped: dict[str | None, list[ComponentPlan]] = {}
        for plan in plans:
            grouped.setdefault(plan.spec.group, []).append(plan)
        jobs = iter([[plan] for plan in grouped.pop(None, [])] + list(grouped.values()))

        async def lane() -> None:
            # START_CONCURRENCY lanes take the jobs in turn: no task (and no semaphore wait) per component.
            for job in jobs:
                for plan in job:
                    await self._start(plan, loads, (loaded or {}).get(plan.spec.component_id))
                    heap.started()

        # A task group: if one start raises, the others are cancelled and awaited before the error goes on,
        # so that a reload restoring the old version never races a start still under way.
        with heap:
            async with anyio.create_task_group() as group:
                for number in range(START_CONCURRENCY):
                    group.start_soon(lane, name=f"start lane {number}")

    # --- reload ---

    async def reload(self) -> ReloadReport:
        """Re-read the config file and apply it whole (`_reload_once`), counting its result for metrics."""
        report = await self._reload_once()
        self.counters.reloads[report.outcome] += 1
        return report

    async def _reload_once(self) -> ReloadReport:
        """Re-read the config file and apply it whole; returns what it did (see ReloadReport).

        Everything that can fail is done before a running component is touched: the config is parsed and
        validated, every added or changed component is compiled and checked against its memory budget.
        A changed component that runs is handed over to its new version on the same actor (nothing queued
        is lost) and rolled back to its previous version if that one fails to start or to stay up and
        healthy for its rollout check window. A reload asked for while another one runs is refused at
        once. RELOADING=1 is always followed by READY=1, and the lock is released, whatever happens."""
        if self._stopping:  # what it would start, the shutdown would not stop
            return self._refuse_reload()
        if self._ready and self._reload_lock.locked():  # another one may take a whole check window: never wait
            log.warning("reload_refused", reason="a reload is in progress")
            self._notify_reloading()  # systemd's reload waits for this pair whatever the daemon decides
            self.notifier.notify("READY=1", f"STATUS=reload refused: a reload is in progress; {self._summary()}")
            return ReloadReport("refused", problems=["reload refused, nothing changed: a reload is in progress; "
                                                     "try again once it has ended"])
        async with self._reload_lock:
            if self._stopping:  # a SIGTERM sent with the SIGHUP (the kernel delivers the lower-numbered SIGHUP first)
                return self._refuse_reload()
            self._notify_reloading()
            outcome = "reload failed"
            try:
                report = await self._reload()
                outcome = {"reloaded": "reloaded", "rolled-back": "reloaded with rollbacks",
                           "failed": "reload failed"}.get(report.outcome, "reload rejected")
                return report
            except Exception as exc:  # a bug must not leave systemd waiting nor the reload lock held
                log.exception("reload_failed")
                return ReloadReport("failed", problems=[
                    f"reload failed, previous configuration restored: {_describe(exc)}"])
            finally:
                self.notifier.notify("READY=1", f"STATUS={outcome}; {self._summary()}")

    def _refuse_reload(self) -> ReloadReport:
        log.warning("reload_refused", reason="the daemon is stopping")
        return ReloadReport("refused", problems=["reload refused: the daemon is stopping"])

    def _notify_reloading(self) -> None:
        monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notifier.notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec}")

    async def _reload(self) -> ReloadReport:
        source = self.config.source
        try:
            # A detached thread, bounded: a read that hangs (a stuck filesystem) must neither hold the reload
            # lock for good nor keep the process from exiting (asyncio joins its executor's threads).
            with anyio.fail_after(CONFIG_READ_TIMEOUT_S):
                new = await start_detached(lambda: load_config(source), name="wasmhost-config")
        except TimeoutError:
            log.error("reload_rejected", errors=[f"not read within {CONFIG_READ_TIMEOUT_S:g} s"])
            return ReloadReport("rejected", problems=[
                f"reload rejected, nothing changed: {source}: not read within {CONFIG_READ_TIMEOUT_S:g} s"])
        except ConfigError as exc:
            log.error("reload_rejected", errors=exc.errors)
            return ReloadReport("rejected", problems=[
                f"reload rejected, nothing changed: {exc.source}: {len(exc.errors)} error(s):",
                *(f"  {e}" for e in exc.errors)])
        problems = [f"host.{key}: changed from {old!r} to {value!r}; [host] settings are read only at start: "
                    "restart wasmhost to apply them" for key, old, value in _host_changes(self.config, new)]
        lattice = _lattice_changes(self.config, new)
        if lattice:
            problems.append(f"lattice: changed ({', '.join(lattice)}); [lattice] settings are read only at start: "
                            "restart wasmhost to apply them")
        added, removed, changed, unchanged = await self._diff(new)
        wanted = new.plans_by_id
        loaded: dict[ComponentId, LoadedComponent] = {}
        loads = SharedLoads(self.runtime)
        for cid in added + list(changed):  # compile and check every new version before touching the old ones
            try:
                loaded[cid] = await loads.load(wanted[cid])
            except Exception as exc:  # whatever stops the new version, the old one keeps running
                reason = str(exc) if isinstance(exc, LoadError) else _describe(exc)
                problems.append(f"{cid}: {cut(_one_line(reason), 'wasmhost check')}")
        if self._stopping:  # a stop signal came while the new versions compiled: start nothing now
            problems.append("the daemon is stopping")
        if problems:
            log.error("reload_rejected", errors=problems)
            return ReloadReport("rejected", problems=[f"reload rejected, nothing changed: {len(problems)} problem(s):",
                                                      *(f"  {p}" for p in problems)])
        handed = [c for c in changed if self._can_hand_over(c)]
        replaced = [c for c in changed if c not in handed]  # not running: nothing to hand over, started anew
        old_config, old_deployments = self.config, dict(self.deployments)
        refused: str | None = None  # a start the supervisor refused, once the shutdown had begun
        try:
            await self._remove(removed + replaced)
            if removed or replaced:
                collect_all()  # what they built was frozen at their start (see heap.py)
            self.config = new
            if not self._stopping:
                await self._apply([wanted[c] for c in added + replaced], loaded)
        except Exception as exc:
            if not self._stopping:
                await self._restore(old_config, old_deployments, added + replaced + removed)
                raise
            refused = _describe(exc)
        if self._stopping:
            # A stop signal came while the removals drained or the starts ran. The supervisor starts nothing
            # once the shutdown has begun (what it started, the shutdown would not stop), and the shutdown stops
            # everything: the rest of the reload is left undone, nothing restored. Before, the refused start was
            # taken for an unexpected failure, and the restore, refused as well, logged errors with tracebacks.
            log.warning("reload_cut_short", reason="the daemon is stopping", refused=refused)
            return ReloadReport("failed", problems=[
                "reload cut short by the stop signal: what it had not started yet is not started"])
        rolled_back = await self._roll_out([wanted[c] for c in handed], loaded, old_deployments)
        self.runtime.cache.keep_only(self._cache_keys())
        self._prune_cache(old_deployments.values())  # what ran until now is marked used now, and stays a while
        kept_changes = [c for c in changed if c not in rolled_back]
        report = ReloadReport("rolled-back" if rolled_back else "reloaded", added=[str(c) for c in added],
                              removed=[str(c) for c in removed], changed=[str(c) for c in kept_changes],
                              what_changed={str(c): changed[c] for c in changed},
                              kept=[str(c) for c in unchanged],
                              rolled_back={str(c): cut(reason, "wasmhost inspect ID")
                                           for c, reason in rolled_back.items()},
                              warnings=new.warnings)
        for warning in new.warnings:  # as at start-up: the log says what `wasmhost check` would warn about
            log.warning("config_warning", detail=warning)
        log.info("reloaded", added=report.added, removed=report.removed, changed=report.changed,
                 what_changed=report.what_changed, unchanged=len(unchanged), rolled_back=report.rolled_back)
        return report

    def _can_hand_over(self, cid: ComponentId) -> bool:
        """Whether a changed component runs a version it can hand its queue over to (and fall back to)."""
        actor = self.supervisor.actors.get(cid)
        previous = self.deployments.get(cid)
        return actor is not None and actor.accepts_handover and previous is not None and previous.loaded is not None

    async def _roll_out(self, plans: list[ComponentPlan], loaded: dict[ComponentId, LoadedComponent],
                        previous: dict[ComponentId, Deployment]) -> dict[ComponentId, str]:
        """Hand each running changed component over to its new version, all at once, and watch each for its
        check window; returns the components rolled back to their previous version, with the reason."""
        if not plans:
            return {}
        window = max(p.rollout_check_s for p in plans)
        ids = ", ".join(str(p.spec.component_id) for p in plans)
        self.notifier.notify(f"STATUS=reload: checking new versions of {ids} for up to {window:g} s")
        rolled_back: dict[ComponentId, str] = {}

        async def one(plan: ComponentPlan) -> None:
            cid = plan.spec.component_id
            reason = await self._upgrade(plan, loaded[cid], previous[cid])
            if reason is not None:
                rolled_back[cid] = reason

        async with anyio.create_task_group() as group:
            for plan in plans:
                group.start_soon(one, plan, name=f"roll out {plan.spec.component_id}")
        return rolled_back

    async def _upgrade(self, plan: ComponentPlan, loaded: LoadedComponent, previous: Deployment) -> str | None:
        """Hand one running component over to its new version (same actor, mailbox and counters) and check
        it for its window; on failure the previous version and settings run again on the same mailbox.
        Returns why it was rolled back, or None when the new version stays."""
        cid = plan.spec.component_id
        assert previous.loaded is not None  # _can_hand_over
        if not self._can_hand_over(cid):
            # It stopped or failed for good since the reload chose it (a `wasmhost stop` while the reload removed
            # other components, say). Handed over all the same, it raised `is not running`, which was reported
            # as a failed upgrade and left it stopped on its previous version. As a changed component that was
            # not running when the reload began, it is started anew on its new version (not during a shutdown:
            # nothing started now would be stopped).
            if self._stopping:
                return "the daemon is stopping"
            await self._remove([cid])
            await self._apply([plan], {cid: loaded})
            log.info("component_started_anew", component=str(cid))
            return None
        self._grant(plan)
        self.deployments[cid] = Deployment(plan, loaded.digest, loaded=loaded, rollout="upgraded")
        reason: str | None
        try:
            handover = await self.supervisor.hand_over(plan.spec, loaded, (previous.plan.spec, previous.loaded))
            if handover.boot_error is not None:  # the actor has already booted the previous version again
                reason = f"the new version failed to start: {_one_line(str(handover.boot_error), cid)}"
            else:
                try:
                    reason = await self._check(cid, handover, plan.rollout_check_s)
                finally:
                    actor = self.supervisor.actors.get(cid)
                    if actor is not None:
                        actor.end_probation()
                if handover.failed.is_set():  # it failed on probation: the actor fell back by itself
                    reason = f"it failed during its check window: {_one_line(str(handover.failure), cid)}"
                elif reason is not None:
                    await self._put_back(previous)
        except Exception as exc:  # a bug: the previous version's settings apply again all the same
            log.exception("reload_upgrade_failed", component=str(cid))
            reason = f"the upgrade failed: {_describe(exc)}"
        if reason is None:
            log.info("component_upgraded", component=str(cid))
            return None
        self._grant(previous.plan)
        previous.rollout = f"rolled back: {reason}"
        self.deployments[cid] = previous
        log.error("reload_rolled_back", component=str(cid), reason=reason)
        return reason

    async def _check(self, cid: ComponentId, handover: Handover, window: float) -> str | None:
        """Watch a new version on probation for `window` seconds: its health as it booted, then a probe
        every ROLLOUT_PROBE_S and at the end; a failure ends the watch at once (`handover.failed`, the
        actor has fallen back). Returns why it must go, or None (also when a stop cuts the window short:
        the shutdown does not wait for it). Each probe is bounded by the component's call deadline."""
        actor = self.supervisor.actors.get(cid)
        end = anyio.current_time() + window
        probe = False
        while not handover.failed.is_set():
            if actor is None or actor.state in (ActorState.STOPPING, ActorState.STOPPED):
                return None  # stopped on purpose (`wasmhost stop`, a shutdown): nothing left to check
            if probe:
                error = await actor.probe_health()
                if error is not None:
                    return f"its health check failed: {_one_line(str(error), cid)}"
            if actor.health is HealthStatus.UNHEALTHY:
                return "it reported unhealthy"
            left = end - anyio.current_time()
            if left <= 0 or self._stopping:
                return None
            await _first_of(min(ROLLOUT_PROBE_S, left), handover.failed, self._stop)
            probe = not self._stopping
        return None  # the caller reads the failure

    async def _put_back(self, previous: Deployment) -> None:
        """Run the previous version of a component again, on its mailbox when the actor still runs."""
        if self._stopping:
            return
        spec = previous.plan.spec
        assert previous.loaded is not None
        actor = self.supervisor.actors.get(spec.component_id)
        if actor is not None and actor.accepts_handover:
            await self.supervisor.hand_over(spec, previous.loaded)  # no fallback: its own restart policy applies
            return
        await self.supervisor.remove(spec.component_id, self.config.host.drain_timeout_s)
        await self.supervisor.start(spec, previous.loaded)

    async def _restore(self, config: Config, deployments: dict[ComponentId, Deployment],
                       touched: list[ComponentId]) -> None:
        """Put back what a failed reload changed: the old config, and the old version of every component it
        touched (restarted from the bytes it was loaded from; its instance state is lost, its storage kept)."""
        log.error("reload_restoring", components=[str(c) for c in touched])
        self.config = config
        for cid in touched:
            try:
                await self._remove([cid])
                previous = deployments.get(cid)
                if previous is None:
                    continue
                self.deployments[cid] = previous
                if previous.loaded is not None:
                    self._grant(previous.plan)
                    await self.supervisor.start(previous.plan.spec, previous.loaded)
            except Exception:  # restore the others even if one cannot be
                log.exception("reload_restore_failed", component=str(cid))

    async def _diff(self, new: Config) -> tuple[list[ComponentId], list[ComponentId],
                                                dict[ComponentId, list[str]], list[ComponentId]]:
        """(added, removed, changed with what changed in each, unchanged) between what runs and `new`."""
        wanted = new.plans_by_id
        added = [c for c in wanted if c not in self.deployments]
        removed = [c for c in self.deployments if c not in wanted]
        # Each distinct file read and hashed once, on one thread: 100 components of an 18 MB binary read
        # and hashed it 100 times (1.6 s; 10,000 of them, minutes under the reload lock). A detached thread, as
        # for compiles: on asyncio's default executor, which the daemon joins when it exits, a stop during these
        # reads exited only once they ended (5.5 s for 30 distinct 128 MiB files; never on a hung filesystem).
        paths = {wanted[cid].wasm_path for cid in wanted if cid in self.deployments}
        digests = await start_detached(lambda: {path: self._digest(path) for path in paths}, name="wasmhost-digests")
        changed: dict[ComponentId, list[str]] = {}
        unchanged = []
        for cid in wanted:
            current = self.deployments.get(cid)
            if current is None:
                continue
            digest = digests[wanted[cid].wasm_path]
            if current.plan != wanted[cid] or current.digest is None or digest != current.digest:
                changed[cid] = _what_changed(current.plan, wanted[cid], current.digest, digest)
            else:
                unchanged.append(cid)
        return added, removed, changed, unchanged

    def _digest(self, path: Path) -> str | None:
        """The cache key of the component file at `path`, read as the loader reads it (bounded, a regular file
        only); None when it cannot be loaded (it is then changed, and its load says why)."""
        try:
            return self.runtime.cache.key(read_component_file(path))
        except LoadError:
            return None

    # --- status ---

    def lattice_status(self) -> protocol.Response:
        """The answer to `status --lattice`: the lattice directory's view of every host and component."""
        if self.link is None:
            return protocol.Response(False, "this daemon is not part of a lattice: its configuration has no [lattice]")
        from wasmhost.system.lattice_view import lattice_view

        return protocol.Response(True, data=lattice_view(self.link.snapshot(), msgspec.to_builtins(self._inventory())))

    # --- control requests ---

    async def handle(self, request: protocol.Request) -> protocol.Response:
        """Answer one control request."""
        self.counters.control_requests[_REQUEST_NAMES.get(type(request), "other")] += 1
        try:
            return await self._handle(request)
        except (InvalidComponentId, HostError, RequestFailed, LoadError, KeyError) as exc:
            return protocol.Response(False, str(exc).strip("'"))

    async def _handle(self, request: protocol.Request) -> protocol.Response:
        if isinstance(request, protocol.Status):
            if request.id is not None:  # one row, its texts whole (each is bounded)
                row = self.status_table.row(ComponentId.parse(request.id))
                rows = [] if row is None else [row]
            else:
                rows = fit(self.status_table.rows(), protocol.MAX_RESPONSE_FRAME // 2)  # room for the rest, twice
            return protocol.Response(True, data={"components": rows,
                                                 "storage_io_errors": self.storage.io_errors,
                                                 "storage_last_error": self.storage.last_io_error,
                                                 "log_lines_dropped": lines_dropped()})
        if isinstance(request, protocol.Reload):
            report = await self.reload()
            nothing_changed = report.outcome in ("rejected", "refused", "failed")
            return protocol.Response(not nothing_changed, "\n".join(report.problems) if nothing_changed else None,
                                     data=msgspec.to_builtins(report))
        if isinstance(request, protocol.LatticeStatus):
            return self.lattice_status()
        cid = ComponentId.parse(request.id)
        if not self._ready and cid not in self.deployments and cid in self.config.plans_by_id:
            # Before: `target-not-found`, as if it were not configured, to a script that did not wait for READY
            return protocol.Response(False, f"delivery-failed: {cid} is not started yet: the daemon is starting "
                                            f"({len(self.deployments)} of {len(self.config.components)} "
                                            "components deployed so far); try again once it is ready")
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
        if isinstance(request, protocol.Forensics):
            return protocol.Response(True, data=actor.forensics.report(actor.name))
        if isinstance(request, (protocol.Start, protocol.Restart)) and self._stopping:
            # The supervisor starts nothing once the shutdown has begun (what it started would not be stopped):
            # its RuntimeError was answered as an internal error, with a traceback in the log.
            return protocol.Response(False, f"{cid} not started: the daemon is stopping")
        if isinstance(request, protocol.Stop):
            await actor.stop(self.config.host.drain_timeout_s)
        elif isinstance(request, protocol.Start):
            await actor.start()
        elif isinstance(request, protocol.Restart):
            await actor.restart()  # answered once the new instance runs or has failed
        return protocol.Response(True, data=actor.state.value)


async def run_daemon(config: Config | ConfigError) -> int:
    """Run the daemon on the configuration `run` read (see cli.cmd_run); config errors exit with 1."""
    affinity.anchor()  # the event loop's thread, and the threads it starts (see core/affinity.py)
    if isinstance(config, ConfigError):
        log.error("config_invalid", source=config.source, errors=config.errors)
        print(config, file=sys.stderr)
        return 1
    try:
        daemon = Daemon(config)
    except StateDirInUse as exc:
        log.error("state_dir_in_use", path=str(config.state_dir), error=str(exc))
        print(f"wasmhost: {exc}", file=sys.stderr)
        return 1
    except NotOwned as exc:  # logged by prepare_state_dir
        print(f"wasmhost: state_dir {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        log.error("daemon_start_failed", error=str(exc))
        return 1
    return await daemon.run()
