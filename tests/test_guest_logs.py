"""Guest log lines: the per-component rate limit, its suppressed=N summaries, every context key kept, and the
bounded log writer that never makes a logging thread wait. Real guests, real pipes."""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from typing import Any

import pytest
import structlog

from tests.conftest import Starter
from wasmhost.core import ComponentConfig, ComponentId
from wasmhost.core.messages import ComponentMessage, MessageMetadata, Timestamp
from wasmhost.core.rate_limit import RateLimit, TokenBucket
from wasmhost.runtime.codec import TupleConverter
from wasmhost.runtime.guest_log import MAX_LINE_CHARS, flush_suppressed
from wasmhost.runtime.host_fn import HostContext
from wasmhost.system.log_writer import GATHER_S, LogSink

SENDER = ComponentId("test-org", "host", "0")
NO_REFILL = 1e-6  # lines per second: nothing refills during a test, so the counts are exact


def message(payload: bytes) -> ComponentMessage:
    return ComponentMessage(SENDER, payload, MessageMetadata(timestamp=Timestamp.now()))


def guest_lines(logs: list[dict[str, Any]], component: str) -> list[dict[str, Any]]:
    return [e for e in logs if e.get("guest") and e.get("component") == component]


def summaries(logs: list[dict[str, Any]], component: str) -> list[int]:
    return [e["suppressed"] for e in logs if e["event"] == "guest_log_suppressed" and e["component"] == component]


# --- the rate limit ---


def test_token_bucket_allows_the_burst_then_the_rate() -> None:
    now = [0.0]
    bucket = TokenBucket(RateLimit(rate=10, burst=3), clock=lambda: now[0])
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    now[0] += 0.1  # one token back
    assert [bucket.take(), bucket.take()] == [True, False]
    now[0] += 100.0  # never more than the burst
    assert sum(bucket.take() for _ in range(10)) == 3


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1.0, 1), (float("inf"), 1), (1, 0), (1, 2.5)])
def test_rate_limit_rejects_values_that_cannot_limit(rate: float, burst: int) -> None:
    with pytest.raises(ValueError, match="rate limit"):
        RateLimit(rate, burst)


def test_a_flooding_guest_is_held_to_its_burst_and_its_drops_are_summarised(start: Starter) -> None:
    flood = start("logflood", "test-org/logflood/0", host=HostContext(SENDER, log_limit=RateLimit(NO_REFILL, 50)))
    neighbour = start("logger", "test-org/logger/9")  # its own bucket, untouched by the flood
    with structlog.testing.capture_logs() as logs:
        assert flood.handle_message(message(b"20000")) == b"20000"
        assert neighbour.handle_message(message(b"still heard")) is None
        flush_suppressed()
    assert len(guest_lines(logs, "test-org/logflood/0")) == 50
    counts = summaries(logs, "test-org/logflood/0")
    assert sum(counts) == 20000 - 50
    assert 1 <= len(counts) <= 5  # one line per interval, never one per dropped line
    assert [e["event"] for e in guest_lines(logs, "test-org/logger/9")] == ["still heard"]


def test_the_bucket_survives_a_restart_of_the_instance(start: Starter) -> None:
    flood = start("logflood", "test-org/logflood/1", host=HostContext(SENDER, log_limit=RateLimit(NO_REFILL, 5)))
    with structlog.testing.capture_logs() as logs:
        flood.handle_message(message(b"5"))
        flood.instantiate()  # what a restart does
        flood.initialize(ComponentConfig())
        flood.handle_message(message(b"5"))
        flush_suppressed()
    assert len(guest_lines(logs, "test-org/logflood/1")) == 5
    assert sum(summaries(logs, "test-org/logflood/1")) == 5


# --- every key a guest sends ---


def test_every_context_key_a_guest_sends_is_logged(start: Starter) -> None:
    guest = start("logfields", "test-org/logfields/0")
    pairs = [("self", "1"), ("event", "2"), ("_record", "3"), ("", "4"), ("not an identifier!", "5"),
             ("guest_self", "6"), ("exc_info", "7"), ("source", "8"), ("source", "9"), ("level", "10")]
    payload = "\n".join(f"{k}\n{v}" for k, v in pairs).encode()
    with structlog.testing.capture_logs() as logs:
        assert guest.handle_message(message(payload)) is None
    assert not [e for e in logs if e["event"] == "host_function_failed"]
    [line] = guest_lines(logs, "test-org/logfields/0")
    assert line["event"] == "fields"
    fields = {k: v for k, v in line.items() if k not in ("event", "component", "guest", "guest_level", "log_level")}
    assert fields == {"guest_self": "1", "guest_event": "2", "guest__record": "3", "": "4",
                      "not an identifier!": "5", "guest_guest_self": "6", "guest_exc_info": "7", "source": "8",
                      "guest_source": "9", "guest_guest_level": "10"}


def test_a_guest_line_is_cut_to_its_size_cap_and_says_how_much_was_cut(start: Starter) -> None:
    guest = start("logfields", "test-org/logfields/1")
    payload = b"big\n" + b"x" * 40000 + b"\nafter\n1"
    with structlog.testing.capture_logs() as logs:
        guest.handle_message(message(payload))
    [line] = guest_lines(logs, "test-org/logfields/1")
    kept = MAX_LINE_CHARS - len("fields") - len("big")
    assert line["big"] == "x" * kept and "after" not in line
    assert line["truncated_chars"] == (40000 - kept) + len("after") + len("1")



def test_endless_empty_or_repeated_keys_are_charged_as_written_and_cut(start: Starter) -> None:
    # Each repeated key gets one more `guest_` than the last; before, keys were charged as sent (an
    # empty one nothing), so 2,500 empty keys made an 18.7M-character line, built in seconds of
    # Python that stalled every other guest.
    guest = start("logfields", "test-org/logfields/2")
    pairs = 2500
    with structlog.testing.capture_logs() as logs:
        assert guest.handle_message(message(b"\n" * (2 * pairs - 1))) is None
    [line] = guest_lines(logs, "test-org/logfields/2")
    kept = {k: v for k, v in line.items() if not k.replace("guest_", "")}  # "", guest_, guest_guest_, ...
    assert set(kept) == {"guest_" * i for i in range(len(kept))} and not any(kept.values())
    assert sum(max(1, len(k)) for k in kept) <= MAX_LINE_CHARS - len("fields")
    assert sum(max(1, len(k)) for k in kept) + 6 * len(kept) > MAX_LINE_CHARS - len("fields")  # the next did not fit
    assert line["truncated_chars"] == pairs - len(kept)  # one character for each empty key left out

def test_a_context_longer_than_a_line_can_hold_is_read_only_as_far_as_it_fits(
        start: Starter, monkeypatch: pytest.MonkeyPatch) -> None:
    # 16 bytes of linear memory per pair: 900,000 empty pairs took the host 2.3 s of Python and 150 MB to
    # convert, though each pair written takes a character of the line and no more than MAX_LINE_CHARS fit;
    # measuring the pairs past those took another 0.4 s of Python per line.
    lifted: list[int] = []
    real_lift = TupleConverter.lift
    monkeypatch.setattr(TupleConverter, "lift", lambda self, addr: lifted.append(addr) or real_lift(self, addr))
    guest = start("fanout", "test-org/fanout/1", host=HostContext(SENDER, log_limit=RateLimit(NO_REFILL, 1)))
    pairs = 3 * MAX_LINE_CHARS
    with structlog.testing.capture_logs() as logs:
        assert guest.handle_message(message(f"l{pairs}".encode())) is None
        assert guest.handle_message(message(f"l{pairs}".encode())) is None  # over the rate: nothing is read
    [line] = guest_lines(logs, "test-org/fanout/1")
    kept = [k for k in line if not k.replace("guest_", "")]  # "", guest_, guest_guest_, ...
    assert line["event"] == "t" and kept
    assert line["truncated_chars"] == MAX_LINE_CHARS - len(kept)  # one character for each empty key read, not kept
    assert line["truncated_pairs"] == pairs - MAX_LINE_CHARS  # the others, counted without being read at all
    assert len(lifted) == MAX_LINE_CHARS


# --- the log writer ---


def test_a_sink_on_a_pipe_nobody_reads_drops_and_counts_instead_of_waiting() -> None:
    read_end, write_end = os.pipe()
    reports: list[tuple[str, int]] = []
    reported = threading.Event()

    def on_caught_up(name: str, count: int) -> None:
        reports.append((name, count))
        reported.set()

    sink = LogSink("pipe", write_end, on_caught_up, max_lines=100)
    line = b"x" * 200 + b"\n"
    flood = threading.Thread(target=lambda: [sink.put(line) for _ in range(5000)])  # 1 MB, a 64 KiB pipe
    flood.start()
    flood.join(60)
    assert not flood.is_alive(), "put waited for the pipe"
    assert sink.dropped >= 5000 - 100 - (1 << 20) // len(line)
    dropped = sink.dropped
    received = bytearray()

    def drain() -> None:
        while chunk := os.read(read_end, 1 << 16):
            received.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    # Every drop is reported once the writer catches up; when it caught up for a moment during the flood
    # (the pipe still had room), the drops are reported in two parts: their sum is what counts.
    deadline = time.monotonic() + 30
    while sum(count for _, count in reports) < dropped:
        assert reported.wait(max(0.0, deadline - time.monotonic())), "the writer never reported all dropped lines"
        reported.clear()
    assert {name for name, _ in reports} == {"pipe"} and sum(count for _, count in reports) == dropped
    assert sink.close(time.monotonic() + 30)
    os.close(write_end)
    reader.join(30)
    os.close(read_end)
    assert received.count(b"\n") == 5000 - dropped


def test_a_burst_of_lines_is_written_at_once_and_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    # About our own logic: the writes are counted by wrapping LogSink._write, the lines are real.
    read_end, write_end = os.pipe()
    writes: list[int] = []
    written = threading.Event()
    real_write = LogSink._write

    def counting_write(self: LogSink, batch: deque[bytes]) -> None:
        writes.append(len(batch))
        real_write(self, batch)
        if sum(writes) % 5 == 0:
            written.set()

    monkeypatch.setattr(LogSink, "_write", counting_write)
    sink = LogSink("pipe", write_end)
    expected = b""
    for attempt in range(5):  # a burst the test thread was held up in for a whole gathering is tried again
        writes.clear()
        written.clear()
        first = time.monotonic()
        for i in range(5):  # a burst over about a millisecond, each line letting the writer run
            line = b"burst %d line %d\n" % (attempt, i)
            expected += line
            sink.put(line)
            time.sleep(0.0002)
        span = time.monotonic() - first
        assert written.wait(10), "the writer did not write the burst"
        if span < GATHER_S:
            break
    else:
        pytest.fail(f"no burst of 5 lines fitted in {GATHER_S * 1000:g} ms: the machine is too busy to tell")
    # one write, or two if the writer began a write in the middle of the burst
    assert len(writes) <= 2, f"a burst of 5 lines over {span * 1000:.1f} ms took {len(writes)} writes ({writes})"
    assert sink.close(time.monotonic() + 10)
    assert os.read(read_end, 1 << 16) == expected
    os.close(read_end)
    os.close(write_end)


def test_closing_a_sink_stuck_on_a_full_pipe_gives_up_at_its_deadline() -> None:
    read_end, write_end = os.pipe()
    sink = LogSink("pipe", write_end)
    for _ in range(2000):
        sink.put(b"y" * 100 + b"\n")
    assert sink.close(time.monotonic() + 0.5) is False  # returned: the stuck writer does not hold shutdown
    os.close(read_end)  # the writer's write fails with EPIPE and it ends
    assert sink.close(time.monotonic() + 30)
    assert sink.dropped >= 2000 - (1 << 16) // 101 - 1  # all but what the pipe took, counted as lost
    os.close(write_end)
