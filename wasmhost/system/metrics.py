"""The Prometheus endpoint (`[host] metrics`): prometheus-client's HTTP server on its own thread, and one
collector that reads the counters the daemon keeps anyway, at scrape time.

Nothing is incremented per message for metrics: a scrape reads the actors' counters and latency
recorders, the host-call counts of each Store, the router's pending requests, the audit log, the
storage usage table and the daemon's own counters. The scrape runs on the HTTP server's thread while
the loop and the workers go on changing those figures: plain ints and attributes are read whole under
the GIL, and the dicts the loop changes are copied first (`_snapshot`), retried should one change
size during the copy. A scrape is never waited for by anything on the loop.

With `[host] metrics_by = "namespace"`, per-component figures are summed per namespace (label
`namespace` instead of `component`): the series count then follows the number of namespaces, not of
components.
"""

from __future__ import annotations

import platform
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from itertools import accumulate
from typing import TYPE_CHECKING, Literal, TypeVar

import structlog
from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

import wasmhost
from wasmhost.actors.latency import PER_DECADE, SMALLEST
from wasmhost.runtime import contract
from wasmhost.runtime.host_fn import HOST_FUNCTIONS
from wasmhost.system.listen import ListenAddress
from wasmhost.system.logging import lines_dropped

if TYPE_CHECKING:
    from wasmhost.actors.actor import ComponentActor
    from wasmhost.system.daemon import Daemon

log = structlog.get_logger("wasmhost.metrics")

T = TypeVar("T")

EXPORTED_BOUNDS: tuple[tuple[str, int], ...] = tuple(
    (repr(10.0 ** (i // PER_DECADE - 6)), i) for i in range(PER_DECADE, 7 * PER_DECADE + 1, PER_DECADE))
"""Histogram buckets exported for handling time: one per decade from 10 us to 10 s (`le` label, index
of the recorder bucket it closes). The recorder keeps ten per decade; seven keep the series count low."""
assert SMALLEST == 1e-6, "EXPORTED_BOUNDS counts decades from 1 us"

STORAGE_OPERATIONS = {index: fn.name for index, fn in enumerate(HOST_FUNCTIONS)
                      if fn.interface == contract.qualified("storage")}
"""Host-function slots that are storage operations, and the operation's name."""
LOG_CALL = next(index for index, fn in enumerate(HOST_FUNCTIONS) if fn.name == "log")

GroupBy = Literal["component", "namespace"]


@dataclass
class DaemonCounters:
    """What the daemon counts for metrics alone (changed on the loop, read by scrapes)."""

    started: float = field(default_factory=time.time)
    started_monotonic: float = field(default_factory=time.monotonic)
    control_requests: Counter[str] = field(default_factory=Counter)
    """Control requests answered, by request type (status, call, ...)."""
    reloads: Counter[str] = field(default_factory=Counter)
    """Reloads by result (reloaded, rolled-back, rejected, refused, failed)."""


def _snapshot(read: Callable[[], T], attempts: int = 5) -> T:
    """`read()` (which copies a dict the loop may change), tried again should the dict change size
    during the copy (a RuntimeError, only possible when the copy runs Python code)."""
    for _ in range(attempts - 1):
        try:
            return read()
        except RuntimeError:
            continue
    return read()


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


@dataclass
class _Group:
    """The figures of one component, or summed over one namespace."""

    handled: int = 0
    failed: int = 0
    rejected: int = 0
    restarts: int = 0
    mailbox: int = 0
    fuel: int = 0
    memory_limit: int = 0
    pending: int = 0
    denials: int = 0
    log_lines: int = 0
    log_suppressed: int = 0
    storage_bytes: int = 0
    storage_keys: int = 0
    latency_sum: float = 0.0
    latency: list[int] | None = None
    states: Counter[str] = field(default_factory=Counter)
    storage_ops: Counter[str] = field(default_factory=Counter)


class DaemonCollector(Collector):
    """Builds every wasmhost_* metric from the daemon's state at each scrape (see the module docstring)."""

    def __init__(self, daemon: Daemon, group_by: GroupBy = "component") -> None:
        self.daemon = daemon
        self.group_by = group_by
        self.build = {"version": wasmhost.__version__, "wasmtime": _version("wasmtime"),
                      "python": platform.python_version()}

    def collect(self) -> Iterable[Metric]:
        """Every metric, read now."""
        yield from self._components()
        yield from self._daemon()

    # --- per component ---

    def _groups(self) -> dict[str, _Group]:
        daemon = self.daemon
        deployments = _snapshot(lambda: list(daemon.deployments.items()))
        actors = _snapshot(lambda: dict(daemon.supervisor.actors))
        pending = daemon.router.pending_by_requester()
        denials = daemon.permissions.audit.snapshot()
        usage = {owner: (used, keys) for owner, used, keys in daemon.storage.all_usage()}
        by_namespace = self.group_by == "namespace"
        groups: dict[str, _Group] = {}
        for cid, deployment in deployments:
            name = str(cid)
            key = cid.namespace if by_namespace else name
            group = groups.get(key)
            if group is None:
                group = groups[key] = _Group()
            group.memory_limit += deployment.plan.spec.limits.max_memory_bytes
            group.denials += denials.get(name, 0)
            used, keys = usage.get(name, (0, 0))
            group.storage_bytes += used
            group.storage_keys += keys
            actor = actors.get(cid)
            if actor is None:  # never started: it failed to load
                group.states["failed"] += 1
                continue
            group.states[actor.state.value] += 1
            group.pending += pending.get(cid, 0)
            _add_actor(group, actor)
        return groups

    def _components(self) -> Iterator[Metric]:
        label = self.group_by
        what = "namespace" if label == "namespace" else "component"
        groups = self._groups()
        labels = [label]
        messages = CounterMetricFamily("wasmhost_component_messages", f"Messages per {what} by outcome: handled "
                                       "(answered ok), failed (the guest failed or trapped), rejected (answered "
                                       "unhandled because the component stopped or failed)", labels=[label, "outcome"])
        latency = HistogramMetricFamily("wasmhost_component_handling_seconds",
                                        f"Time the guest took to handle one message, per {what}", labels=labels)
        mailbox = GaugeMetricFamily("wasmhost_component_mailbox_messages",
                                    "Messages queued or being handled", labels=labels)
        state = GaugeMetricFamily("wasmhost_component_state",
                                  "Components in each state (1 per component, labelled with its state)",
                                  labels=[label, "state"])
        restarts = CounterMetricFamily("wasmhost_component_restarts", "Restarts of the instance", labels=labels)
        fuel = CounterMetricFamily("wasmhost_component_fuel_consumed", "Fuel the guest burnt (ends of calls; "
                                   "starts again from 0 when a reload runs a new version)", labels=labels)
        memory = GaugeMetricFamily("wasmhost_component_memory_limit_bytes", "max_memory_bytes: the most "
                                   "linear memory and tables its Store may hold", labels=labels)
        storage_bytes = GaugeMetricFamily("wasmhost_component_storage_bytes",
                                          "Storage bytes charged against its quota", labels=labels)
        storage_keys = GaugeMetricFamily("wasmhost_component_storage_keys", "Keys in its storage", labels=labels)
        storage_ops = CounterMetricFamily("wasmhost_component_storage_operations", "Storage calls by the guest",
                                          labels=[label, "operation"])
        pending = GaugeMetricFamily("wasmhost_component_pending_requests",
                                    "Requests it sent that wait for their reply", labels=labels)
        denials = CounterMetricFamily("wasmhost_component_capability_denials",
                                      "Calls refused by its capability grants", labels=labels)
        log_lines = CounterMetricFamily("wasmhost_component_guest_log_lines",
                                        "Log lines the guest emitted (suppressed ones included)", labels=labels)
        suppressed = CounterMetricFamily("wasmhost_component_guest_log_suppressed",
                                         "Guest log lines dropped by its log rate limit", labels=labels)
        for key, g in groups.items():
            one = [key]
            messages.add_metric([key, "handled"], g.handled)
            messages.add_metric([key, "failed"], g.failed)
            messages.add_metric([key, "rejected"], g.rejected)
            if g.latency is not None:
                cumulative = list(accumulate(g.latency))
                buckets = [(le, cumulative[index]) for le, index in EXPORTED_BOUNDS]
                buckets.append(("+Inf", cumulative[-1]))
                latency.add_metric(one, buckets, g.latency_sum)
            mailbox.add_metric(one, g.mailbox)
            for name, count in g.states.items():
                state.add_metric([key, name], count)
            restarts.add_metric(one, g.restarts)
            fuel.add_metric(one, g.fuel)
            memory.add_metric(one, g.memory_limit)
            storage_bytes.add_metric(one, g.storage_bytes)
            storage_keys.add_metric(one, g.storage_keys)
            for operation, count in g.storage_ops.items():
                storage_ops.add_metric([key, operation], count)
            pending.add_metric(one, g.pending)
            denials.add_metric(one, g.denials)
            log_lines.add_metric(one, g.log_lines)
            suppressed.add_metric(one, g.log_suppressed)
        yield from (messages, latency, mailbox, state, restarts, fuel, memory, storage_bytes, storage_keys,
                    storage_ops, pending, denials, log_lines, suppressed)

    # --- per daemon ---

    def _daemon(self) -> Iterator[Metric]:
        daemon = self.daemon
        counters = daemon.counters
        reloads = CounterMetricFamily("wasmhost_reloads", "Reloads by result", labels=["result"])
        for result, count in _snapshot(lambda: dict(counters.reloads)).items():
            reloads.add_metric([result], count)
        yield reloads
        requests = CounterMetricFamily("wasmhost_control_requests", "Control socket requests by type",
                                       labels=["request"])
        for request, count in _snapshot(lambda: dict(counters.control_requests)).items():
            requests.add_metric([request], count)
        yield requests
        workers = daemon.workers
        yield GaugeMetricFamily("wasmhost_worker_threads_busy", "Worker threads running a guest or waiting in "
                                "one of its host calls", value=workers.busy)
        yield GaugeMetricFamily("wasmhost_worker_threads", "Worker threads alive", value=workers.threads)
        yield CounterMetricFamily("wasmhost_log_lines_dropped", "Daemon log lines dropped because a destination "
                                  "could not keep up", value=lines_dropped())
        cache = daemon.runtime.cache
        lookups = CounterMetricFamily("wasmhost_compile_cache_lookups", "Compilation cache lookups by result",
                                      labels=["result"])
        lookups.add_metric(["hit"], cache.hits)
        lookups.add_metric(["miss"], cache.misses)
        yield lookups
        yield CounterMetricFamily("wasmhost_storage_io_errors", "Storage I/O errors", value=daemon.storage.io_errors)
        yield GaugeMetricFamily("wasmhost_uptime_seconds", "Seconds since the daemon started",
                                value=time.monotonic() - counters.started_monotonic)
        yield GaugeMetricFamily("wasmhost_start_time_seconds", "When the daemon started (Unix time)",
                                value=counters.started)
        info = GaugeMetricFamily("wasmhost_build_info", "Versions of wasmhost, wasmtime-py and Python (always 1)",
                                 labels=list(self.build))
        info.add_metric(list(self.build.values()), 1)
        yield info


def _add_actor(group: _Group, actor: ComponentActor) -> None:
    """Add one actor's figures to its group (read without locks: see the module docstring)."""
    stats = actor.stats
    group.handled += stats.handled
    group.failed += stats.failed
    group.rejected += stats.rejected
    group.restarts += stats.restarts
    group.mailbox += len(actor.mailbox) + actor.in_hand
    recorder = stats.latency
    if recorder.count:
        counts = recorder.buckets()
        group.latency = counts if group.latency is None else [a + b for a, b in zip(group.latency, counts, strict=True)]
        group.latency_sum += recorder.sum
    manager = actor.manager_or_none
    if manager is None:
        return
    group.fuel += manager.limiter.fuel_used
    host = manager.host
    calls = host.calls
    group.log_lines += calls[LOG_CALL]
    gate = host.log_gate
    if gate is not None:
        group.log_suppressed += gate.suppressed_total
    for index, operation in STORAGE_OPERATIONS.items():
        if calls[index]:
            group.storage_ops[operation] += calls[index]


class MetricsServer:
    """prometheus-client's HTTP server for one daemon, on its own daemon thread."""

    def __init__(self, daemon: Daemon, address: ListenAddress, group_by: GroupBy) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(DaemonCollector(daemon, group_by))
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes and friends
        # Binding fails here (OSError) when the address is taken or not ours.
        self._server, self._thread = start_http_server(address.port, address.host, registry=self.registry)
        self.port = int(self._server.server_port)
        log.info("metrics_listening", address=str(ListenAddress(address.host, self.port)), group_by=group_by)

    def close(self) -> None:
        """Stop serving; a scrape in progress finishes on its own thread."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start_metrics(daemon: Daemon) -> MetricsServer | None:
    """Serve the daemon's metrics where `[host] metrics` says (None when off); OSError when it cannot bind."""
    address = daemon.config.metrics
    if address is None:
        return None
    return MetricsServer(daemon, address, daemon.config.host.metrics_by)

