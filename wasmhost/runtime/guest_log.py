"""What happens to a guest's log line before structlog sees it: the per-component rate limit (a token
bucket; what it drops is counted and reported as `guest_log_suppressed` lines with `suppressed=N`, at most
one per component per SUMMARY_INTERVAL_S), the size cap of one line, and the mapping of the guest's context
pairs to fields, under which every key a guest sends is kept.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

import structlog

from wasmhost.core.rate_limit import RateLimit, TokenBucket

log = structlog.get_logger("wasmhost.guest_log")

SUMMARY_INTERVAL_S = 1.0
"""At most one `guest_log_suppressed` line per component in this many seconds."""

MAX_LINE_CHARS = 16 * 1024
"""Characters of message, keys and values one guest line may carry; the rest is cut and counted, so that
the rate limit also bounds the bytes a guest can make the host write."""

PREFIX = "guest_"
RESERVED_KEYS = frozenset({
    # the host's own fields on a guest line
    "event", "level", "timestamp", "component", "guest", "logger", "guest_level", "correlation_id",
    "truncated_chars",
    # the first parameter of structlog's logging methods: passing it as a keyword raises TypeError
    "self",
    # keys structlog's processors and renderers (or its stdlib bridge) interpret rather than print
    "exc_info", "exception", "stack", "stack_info", "logger_name", "log_level", "_record", "_from_structlog",
    "positional_args",
})


def guest_line(message: str, context: Iterable[tuple[str, str]], correlation_id: str | None,
               unread_pairs: int = 0) -> tuple[str, dict[str, str | int]]:
    """The guest's message and context pairs as an event and its fields.

    A key that is one of ours (RESERVED_KEYS) or already used by an earlier pair gets `guest_` in front, as
    often as needed, so that every pair is kept. Message, keys (as written, at least one character each)
    and values share MAX_LINE_CHARS in that order; what does not fit is cut (from the first pair whose key
    does not fit on, pairs are left out) and the number of characters cut (a key at least one) is the
    field `truncated_chars`. `unread_pairs`: pairs after `context` the caller did not read (no line could
    hold them), the field `truncated_pairs`.
    """
    room = MAX_LINE_CHARS
    cut = max(0, len(message) - room)
    message = message[:room]
    room -= len(message)
    fields: dict[str, str | int] = {}
    for key, value in context:
        if room > 0:
            written = _free_key(key[:room], fields)
            # Charged as written (prefixes included) and never nothing: else a guest could send endless
            # pairs with empty or repeated keys, each making the next one's prefixing longer.
            if max(1, len(written)) <= room:
                cut += max(0, len(key) - room)
                room -= max(1, len(written))
                cut += max(0, len(value) - room)
                value = value[:room]
                room -= len(value)
                fields[written] = value
                continue
            room = 0  # the pairs after it are left out too: each costs a constant from here on
        cut += max(1, len(key)) + len(value)
    if cut:
        fields["truncated_chars"] = cut
    if unread_pairs:
        fields["truncated_pairs"] = unread_pairs
    if correlation_id is not None:
        fields["correlation_id"] = correlation_id
    return message, fields


def _free_key(key: str, fields: dict[str, str | int]) -> str:
    """`key`, with `guest_` in front as often as it takes to be neither ours nor already used."""
    while key in RESERVED_KEYS or key in fields:
        key = PREFIX + key
    return key


class LogGate:
    """One component's log rate limit: admits lines while its bucket has tokens, counts the others.

    Called from whichever worker thread runs the component and from the reporter thread, hence the lock.
    """

    def __init__(self, component: str, limit: RateLimit, clock: Callable[[], float] = time.monotonic) -> None:
        self.component = component
        self.limit = limit
        self.clock = clock
        self.bucket = TokenBucket(limit, clock)
        self.pending = 0  # lines dropped since the last summary
        self.suppressed_total = 0
        self.last_summary = float("-inf")
        self._lock = threading.Lock()

    def admit(self) -> bool:
        """True when this line may be written; a due summary of earlier drops is logged first."""
        with self._lock:
            if not self.bucket.take():
                self.pending += 1
                self.suppressed_total += 1
                if self.pending == 1:
                    _reporter.watch(self)
                return False
            self._summarise(self._take_due(self.clock()))
        return True

    def report(self, force: bool = False) -> bool:
        """Log the summary of the lines dropped so far if one is due (or `force`); True when nothing is
        left pending afterwards."""
        with self._lock:  # held while logging, so that a concurrent report has finished when this returns
            self._summarise(self._take_due(float("inf") if force else self.clock()))
            return self.pending == 0

    def _take_due(self, now: float) -> int:
        if not self.pending or now - self.last_summary < SUMMARY_INTERVAL_S:
            return 0
        due, self.pending = self.pending, 0
        self.last_summary = self.clock()
        return due

    def _summarise(self, count: int) -> None:
        if not count:
            return
        log.warning("guest_log_suppressed", component=self.component, suppressed=count,
                    log_rate=self.limit.rate, log_burst=self.limit.burst)


class _Reporter:
    """One background thread that reports what gates with pending drops suppressed, so that a count is
    logged even when the guest stops logging; it sleeps while no gate has anything pending."""

    def __init__(self) -> None:
        self._gates: set[LogGate] = set()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def watch(self, gate: LogGate) -> None:
        with self._wake:
            self._gates.add(gate)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="guest-log-reporter", daemon=True)
                self._thread.start()
            self._wake.notify()

    def flush(self) -> None:
        """Report every pending count now (at shutdown)."""
        with self._wake:
            gates, self._gates = list(self._gates), set()
        for gate in gates:
            gate.report(force=True)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._gates:
                    self._wake.wait()
                gates = list(self._gates)
            time.sleep(SUMMARY_INTERVAL_S / 2)
            for gate in gates:
                if gate.report():
                    with self._wake:
                        if not gate.pending:
                            self._gates.discard(gate)


_reporter = _Reporter()


def flush_suppressed() -> None:
    """Log every component's pending `guest_log_suppressed` count now, whatever the interval."""
    _reporter.flush()
