"""The latency recorder (our own arithmetic: plain numbers in, no wasm needed) and its p50/p99 in `status`."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.test_daemon import Daemon, component, launch
from wasmhost.actors.latency import BOUNDS, BUCKETS, LatencyRecorder, bucket_of, quantile_of
from wasmhost.system import protocol
from wasmhost.system.client import request


def test_a_value_lands_in_the_bucket_whose_bounds_hold_it() -> None:
    assert bucket_of(0.0) == 0
    assert bucket_of(BOUNDS[0]) == 0
    assert bucket_of(BOUNDS[10]) == 10  # a bound itself belongs to the bucket it closes
    assert bucket_of(BOUNDS[10] * 1.01) == 11
    assert bucket_of(1e6) == BUCKETS - 1


@given(st.floats(min_value=1e-7, max_value=1e3, allow_nan=False))
def test_every_value_is_within_its_bucket(seconds: float) -> None:
    index = bucket_of(seconds)
    if index < len(BOUNDS):
        assert seconds <= BOUNDS[index] * (1 + 1e-9)
    if index > 0:
        assert seconds > BOUNDS[index - 1] * (1 - 1e-9)


def test_quantiles_are_within_a_bucket_of_the_truth() -> None:
    recorder = LatencyRecorder()
    assert recorder.quantile(0.5) is None
    assert recorder.p50_p99_ms() == (None, None)
    for i in range(1, 1001):  # 0.1 ms .. 100 ms, evenly
        recorder.observe(i / 10_000)
    assert recorder.count == 1000
    assert math.isclose(recorder.sum, sum(i / 10_000 for i in range(1, 1001)))
    ratio = BOUNDS[1] / BOUNDS[0]
    for q, truth in ((0.5, 0.05), (0.99, 0.099)):
        value = recorder.quantile(q)
        assert value is not None and truth / ratio <= value <= truth * ratio, (q, value)
    p50, p99 = recorder.p50_p99_ms()
    assert p50 is not None and p99 is not None and 50 / ratio <= p50 <= 50 * ratio and p50 < p99


def test_quantiles_of_a_window_from_two_snapshots() -> None:
    recorder = LatencyRecorder()
    for _ in range(100):
        recorder.observe(0.001)
    before = recorder.buckets()
    for _ in range(10):
        recorder.observe(1.0)
    window = [a - b for a, b in zip(recorder.buckets(), before, strict=True)]
    value = quantile_of(window, 0.5)
    assert value is not None and 0.79 < value <= 1.0
    with pytest.raises(ValueError, match="between 0 and 1"):
        quantile_of(window, 1.5)


def test_status_rows_carry_p50_and_p99_once_messages_were_handled(tmp_path: Path, started: list[Daemon]) -> None:
    d = launch(tmp_path, component("t/echo/0", "echo"), started)
    rows = request(d.socket, protocol.Status()).data["components"]
    assert rows[0]["latency_p50_ms"] is None and rows[0]["latency_p99_ms"] is None
    for _ in range(3):
        assert d.call("t/echo/0", "hi") == "hi"
    row = request(d.socket, protocol.Status()).data["components"][0]
    assert 0 < row["latency_p50_ms"] <= row["latency_p99_ms"]
    assert d.stop() == 0
