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

import io
import platform
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from importlib.metadata import PackageNotFoundError, version
from itertools import accumulate
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, make_server

import structlog
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

import wasmhost
from wasmhost.actors.latency import PER_DECADE, SMALLEST
from wasmhost.runtime import contract
from wasmhost.runtime.host_fn import HOST_FUNCTIONS
from wasmhost.runtime.malloc import trim_soon
from wasmhost.system.listen import ListenAddress
from wasmhost.system.logging import lines_dropped

if TYPE_CHECKING:
    from wasmhost.actors.actor import ComponentActor
    from wasmhost.system.daemon import Daemon

log = structlog.get_logger("wasmhost.metrics")

T = TypeVar("T")

EXPORTED_BOUNDS: tuple[tuple[str, int], ...] = tuple(
    (repr(10.0 ** (i // PER_DECADE - 6)), i) for i in range(2 * PER_DECADE, 7 * PER_DECADE + 1, PER_DECADE))
"""Histogram buckets exported for handling time: one per decade from 100 us to 10 s (`le` label, index
of the recorder bucket it closes). The recorder keeps ten per decade; six keep the series count low."""
assert SMALLEST == 1e-6, "EXPORTED_BOUNDS counts decades from 1 us"

STORAGE_OPERATIONS = {index: fn.name for index, fn in enumerate(HOST_FUNCTIONS)
                      if fn.interface == contract.qualified("storage")}
"""Host-function slots that are storage operations, and the operation's name."""
LOG_CALL = next(index for index, fn in enumerate(HOST_FUNCTIONS) if fn.name == "log")

GroupBy = Literal["component", "namespace"]


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


class _Group:
    """The figures of one component, or summed over one namespace (a plain class: 10,000 are made per
    scrape, and dataclass defaults or Counters cost more than the rest of the reading)."""

    __slots__ = (
        "denials",
        "failed",
        "fuel",
        "handled",
        "has_memory",
        "has_storage",
        "latency",
        "latency_sum",
        "log_lines",
        "log_suppressed",
        "mailbox",
        "memory",
        "memory_high_water",
        "memory_limit",
        "pending",
        "rejected",
        "restarts",
        "states",
        "storage_bytes",
        "storage_keys",
        "storage_ops",
    )

    def __init__(self) -> None:
        self.handled = self.failed = self.rejected = self.restarts = self.mailbox = self.fuel = 0
        self.memory_limit = self.pending = self.denials = self.log_lines = self.log_suppressed = 0
        self.storage_bytes = self.storage_keys = self.memory = self.memory_high_water = 0
        self.latency_sum = 0.0
        self.latency: list[int] | None = None  # bucket counts, as LatencyRecorder.buckets()
        self.states: dict[str, int] = {}
        self.storage_ops: dict[str, int] | None = None
        self.has_storage = False  # storage figures are written only for components granted storage
        self.has_memory = False  # memory figures only with [host] memory_accounting, for running instances


def _label_value(text: str) -> str:
    """A label value escaped for the text format (backslash, double quote, newline)."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


SIMPLE: tuple[tuple[str, str, str, str], ...] = (
    ("wasmhost_component_mailbox_messages", "gauge", "Messages queued or being handled", "mailbox"),
    ("wasmhost_component_restarts_total", "counter", "Restarts of the instance", "restarts"),
    ("wasmhost_component_fuel_consumed_total", "counter", "Fuel the guest burnt, counted as calls end (from 0 "
     "again when a reload runs a new version)", "fuel"),
    ("wasmhost_component_memory_limit_bytes", "gauge", "max_memory_bytes: the most linear memory and tables "
     "its Store may hold", "memory_limit"),
    ("wasmhost_component_memory_bytes", "gauge", "Bytes its linear memories hold now ([host] "
     "memory_accounting)", "memory"),
    ("wasmhost_component_memory_high_water_bytes", "gauge", "The most its linear memories held at once since "
     "this version started ([host] memory_accounting; summed over a namespace's components)", "memory_high_water"),
    ("wasmhost_component_storage_bytes", "gauge", "Storage bytes charged against its quota (components "
     "granted storage)", "storage_bytes"),
    ("wasmhost_component_storage_keys", "gauge", "Keys in its storage (components granted storage)",
     "storage_keys"),
    ("wasmhost_component_pending_requests", "gauge", "Requests it sent that wait for their reply", "pending"),
    ("wasmhost_component_capability_denials_total", "counter", "Calls refused by its capability grants", "denials"),
    ("wasmhost_component_guest_log_lines_total", "counter", "Log lines the guest emitted (suppressed ones "
     "included)", "log_lines"),
    ("wasmhost_component_guest_log_suppressed_total", "counter", "Guest log lines dropped by its log rate limit",
     "log_suppressed"),
)
"""Per-component families with one sample per component: name, type, help, _Group attribute."""


class ComponentFamilies:
    """Writes the per-component families in the text format (0.0.4) straight from the daemon's state.

    Not through prometheus-client's generic writer: at 10,000 components that is about 270,000 samples,
    and building a Sample object per sample and formatting it took 3 - 13 s per scrape on 2 loaded cores.
    Here each family is one list comprehension of f-strings over the components (`bench/metrics.py`)."""

    def __init__(self, daemon: Daemon, group_by: GroupBy = "component") -> None:
        self.daemon = daemon
        self.group_by = group_by

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
            actor = actors.get(cid)
            name = str(cid) if actor is None else actor.name
            key = cid.namespace if by_namespace else name
            group = groups.get(key)
            if group is None:
                group = groups[key] = _Group()
            spec = deployment.plan.spec
            group.memory_limit += spec.limits.max_memory_bytes
            group.has_storage = group.has_storage or spec.storage
            group.denials += denials.get(name, 0)
            used, keys = usage.get(name, (0, 0))
            group.storage_bytes += used
            group.storage_keys += keys
            state = "failed" if actor is None else actor.state.value  # no actor: it never loaded
            group.states[state] = group.states.get(state, 0) + 1
            if actor is None:
                continue
            group.pending += pending.get(cid, 0)
            _add_actor(group, actor)
        return groups

    def chunks(self) -> Iterator[str]:
        """Every per-component family, read now (the figures all at once, first), one string per family:
        written out one after the other, so that the whole text (18 MB at 10,000 components) is never
        held in memory at once."""
        label = self.group_by
        items = [(f'{label}="{_label_value(key)}"', group) for key, group in self._groups().items()]
        name = "wasmhost_component_messages_total"
        yield "".join([f"# HELP {name} Messages by outcome: handled (answered ok), failed (the guest failed or "
                       "trapped), rejected (answered unhandled: the component stopped or failed)\n"
                       f"# TYPE {name} counter\n",
                       *[f'{name}{{{lab},outcome="handled"}} {g.handled}\n{name}{{{lab},outcome="failed"}} '
                         f'{g.failed}\n{name}{{{lab},outcome="rejected"}} {g.rejected}\n' for lab, g in items]])
        name = "wasmhost_component_handling_seconds"
        yield "".join([f"# HELP {name} Time the guest took to handle one message\n# TYPE {name} histogram\n",
                       *[_histogram(name, lab, g.latency, g.latency_sum) for lab, g in items
                         if g.latency is not None]])
        name = "wasmhost_component_state"
        yield "".join([f"# HELP {name} Components in each state (1 per component, labelled with its state)\n"
                       f"# TYPE {name} gauge\n",
                       *[f'{name}{{{lab},state="{state}"}} {count}\n'
                         for lab, g in items for state, count in g.states.items()]])
        name = "wasmhost_component_storage_operations_total"
        yield "".join([f"# HELP {name} Storage calls by the guest\n# TYPE {name} counter\n",
                       *[f'{name}{{{lab},operation="{op}"}} {count}\n'
                         for lab, g in items if g.storage_ops for op, count in g.storage_ops.items()]])
        partial = {"storage_bytes": [(lab, g) for lab, g in items if g.has_storage],
                   "memory": [(lab, g) for lab, g in items if g.has_memory]}
        partial["storage_keys"], partial["memory_high_water"] = partial["storage_bytes"], partial["memory"]
        for name, kind, help_text, attribute in SIMPLE:
            rows = partial.get(attribute, items)
            yield "".join([f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n",
                           *[f"{name}{{{lab}}} {getattr(g, attribute)}\n" for lab, g in rows]])

    def text(self) -> str:
        """Every per-component family, read now, as one string."""
        return "".join(self.chunks())


def _histogram(name: str, lab: str, counts: list[int], total: float) -> str:
    """One component's histogram lines: the exported buckets (cumulative), +Inf, sum and count."""
    cumulative = list(accumulate(counts))
    lines = [f'{name}_bucket{{{lab},le="{le}"}} {cumulative[index]}\n' for le, index in EXPORTED_BOUNDS]
    lines.append(f'{name}_bucket{{{lab},le="+Inf"}} {cumulative[-1]}\n{name}_sum{{{lab}}} {total!r}\n'
                 f'{name}_count{{{lab}}} {cumulative[-1]}\n')
    return "".join(lines)


class DaemonCollector(Collector):
    """The daemon-wide wasmhost_* metrics, read at each scrape (prometheus-client writes these)."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.build = {"version": wasmhost.__version__, "wasmtime": _version("wasmtime"),
                      "python": platform.python_version()}

    def collect(self) -> Iterable[Metric]:
        """Every daemon-wide metric, read now."""
        yield from self._daemon()

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
        yield GaugeMetricFamily("wasmhost_guest_calls_asleep", "Guest calls suspended in sleep-millis (they hold "
                                "no worker thread)", value=workers.asleep)
        yield CounterMetricFamily("wasmhost_log_lines_dropped", "Daemon log lines dropped because a destination "
                                  "could not keep up", value=lines_dropped())
        yield _lookups("wasmhost_compile_cache_lookups", "Compilation cache lookups by result", daemon.runtime.cache)
        yield CounterMetricFamily("wasmhost_storage_io_errors", "Storage I/O errors", value=daemon.storage.io_errors)
        reads = daemon.storage.cache
        yield _lookups("wasmhost_storage_read_cache_lookups", "Storage read cache lookups by result", reads)
        yield GaugeMetricFamily("wasmhost_storage_read_cache_bytes", "Bytes the storage read cache holds (as counted "
                                "against storage_cache_bytes)", value=reads.nbytes)
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
        counts = recorder.counts  # only read (accumulate copies it); a count or two may still be in flight
        group.latency = counts if group.latency is None else [a + b for a, b in zip(group.latency, counts, strict=True)]
        group.latency_sum += recorder.sum
    manager = actor.manager_or_none
    if manager is None:
        return
    group.fuel += manager.limiter.fuel_used
    if manager.memory is not None:
        memory, high_water = manager.memory.figures()
        group.memory += memory
        group.memory_high_water += high_water
        group.has_memory = True
    host = manager.host
    calls = host.calls
    group.log_lines += calls[LOG_CALL]
    gate = host.log_gate
    if gate is not None:
        group.log_suppressed += gate.suppressed_total
    for index, operation in STORAGE_OPERATIONS.items():
        if calls[index]:
            ops = group.storage_ops
            if ops is None:
                ops = group.storage_ops = {}
            ops[operation] = ops.get(operation, 0) + calls[index]


SCRAPE_CONNECTIONS = 16
"""Connections served at once; more are closed at once (each holds a thread of the daemon)."""
SCRAPE_IO_TIMEOUT_S = 10.0
"""Seconds one read or write of a scrape's connection may take (Prometheus' own scrape timeout): a
client that connects and sends nothing, or stops reading, lets its thread go."""


class _HeadReader(io.RawIOBase):
    """A connection's reads, those of the request's head (its line and headers) all within one deadline.
    Each read timing out alone let a client sending a byte every few seconds hold its thread as long as it
    kept sending: 16 such clients (one byte each every 5 s) held every slot, and every scrape was closed
    unanswered (80 s and on)."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        self._sock = sock
        self.deadline: float | None = deadline
        """time.monotonic() by which the head must have come; None once it has (reads then time out alone)."""

    def readable(self) -> bool:
        """It is read from."""
        return True

    def readinto(self, buffer: Any) -> int:
        """Read into `buffer`; TimeoutError once the head's deadline has passed."""
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the request did not come within {SCRAPE_IO_TIMEOUT_S:g} s")
            self._sock.settimeout(left)
        return self._sock.recv_into(buffer)


class _QuietHandler(WSGIRequestHandler):
    """No access log line per scrape; the request's head must come within SCRAPE_IO_TIMEOUT_S, and each write
    of the answer times out."""

    timeout = SCRAPE_IO_TIMEOUT_S

    def setup(self) -> None:
        """The connection's streams, the request read through a _HeadReader."""
        super().setup()
        self._head = _HeadReader(self.connection, time.monotonic() + SCRAPE_IO_TIMEOUT_S)
        self.rfile = io.BufferedReader(self._head)

    def parse_request(self) -> bool:
        """Read the headers (within the head's deadline); from then on reads and writes time out alone."""
        parsed = bool(super().parse_request())
        self._head.deadline = None
        self.connection.settimeout(self.timeout)
        return parsed

    def log_message(self, format: str, *args: object) -> None:
        """Log nothing."""


class _BoundedServer(ThreadingWSGIServer):
    """prometheus-client's threading server, with at most SCRAPE_CONNECTIONS threads: any local user may
    connect, and threads are the daemon's (systemd's TasksMax counts them)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._slots = threading.BoundedSemaphore(SCRAPE_CONNECTIONS)
        self._refusals = 0
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve `request` on a thread of its own if one of the slots is free, else close it at once."""
        if not self._slots.acquire(blocking=False):
            self._refusals += 1
            if self._refusals == 1 or self._refusals % 1000 == 0:  # once, then now and then: not per connection
                log.warning("metrics_connections_refused", refused=self._refusals, limit=SCRAPE_CONNECTIONS)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # the thread did not start: its slot is free again
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Serve on the request's thread, then free its slot."""
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that failed: logged, not printed. socketserver printed a traceback to stderr for each
        (a client that sent nothing in time, or went away: any local user's doing), outside the log's format
        and its bounded buffers, on the connection's thread: with stderr a pipe nobody read (a stalled
        journal), those threads waited on the pipe for good, each holding its slot, and once the pipe was full
        every scrape was refused."""
        error = sys.exc_info()[1]
        if isinstance(error, OSError):  # timed out, reset, broken pipe: the client's doing, said nothing of
            return
        log.error("metrics_request_failed", error=f"{type(error).__name__}: {error}")


class MetricsServer:
    """The endpoint: prometheus-client's threading WSGI server on its own daemon thread, answering GET
    /metrics with the per-component families (ComponentFamilies) and prometheus-client's output for the
    daemon-wide and process_* ones."""

    def __init__(self, daemon: Daemon, address: ListenAddress, group_by: GroupBy) -> None:
        self.components = ComponentFamilies(daemon, group_by)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(DaemonCollector(daemon))
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes and friends

        class Server(_BoundedServer):
            address_family = socket.AF_INET6 if ":" in address.host else socket.AF_INET

        # Binding fails here (OSError) when the address is taken or not ours.
        self._server = make_server(address.host, address.port, self._app, Server, handler_class=_QuietHandler)
        self.port = int(self._server.server_port)
        self._thread = threading.Thread(target=self._server.serve_forever, name="wasmhost-metrics", daemon=True)
        self._thread.start()
        log.info("metrics_listening", address=str(ListenAddress(address.host, self.port)), group_by=group_by)

    def body(self) -> Iterator[bytes]:
        """The whole exposition, read now, in pieces: per-component families (the figures are read before
        the first piece), then prometheus-client's daemon-wide and process ones."""
        chunks = self.components.chunks()
        first = next(chunks).encode()  # reads every component: an error here still fails the request

        def rest() -> Iterator[bytes]:
            try:
                yield first
                for chunk in chunks:
                    yield chunk.encode()
                yield generate_latest(self.registry)
            finally:
                trim_soon()  # what the scrape built (some 40 MB at 10,000 components): back to the OS

        return rest()

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "/") not in ("/", "/metrics"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"only /metrics is served here\n"]
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Content-Type", "text/plain"), ("Allow", "GET, HEAD")])
            return [b"GET /metrics\n"]
        try:
            body = self.body()
        except Exception as exc:  # a bug: the scrape fails, the daemon goes on
            log.exception("metrics_scrape_failed")
            start_response("500 Internal Server Error", [("Content-Type", "text/plain")])
            return [f"{type(exc).__name__}: {exc}\n".encode()]
        start_response("200 OK", [("Content-Type", CONTENT_TYPE_PLAIN_0_0_4)])
        return body if environ.get("REQUEST_METHOD") == "GET" else []

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


class _Counted(Protocol):
    """A cache that counts its lookups."""

    hits: int
    misses: int


def _lookups(name: str, documentation: str, cache: _Counted) -> CounterMetricFamily:
    """A cache's lookups by result (`hit`, `miss`)."""
    family = CounterMetricFamily(name, documentation, labels=["result"])
    family.add_metric(["hit"], cache.hits)
    family.add_metric(["miss"], cache.misses)
    return family
