"""Compilation: one per distinct binary however many loads want it at once, and logged as it happens."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import structlog
from wasmtime import component as wc

from tests.conftest import fixture_path
from wasmhost.core import ComponentId
from wasmhost.core.errors import CompileError
from wasmhost.runtime.loader import LoadedComponent
from wasmhost.runtime.runtime import Runtime

LOADS = 4


def _hold_the_compilation(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the one load that compiles wait until every other load has joined it, so that the loads
    are concurrent for certain. A stand-in for our own cache's disk lookup (wasmtime is left alone)."""
    cache = runtime.cache
    real = cache._from_disk

    def from_disk_once_all_have_joined(key: str) -> wc.Component | None:
        deadline = time.monotonic() + 30
        while cache.joined < LOADS - 1:
            assert time.monotonic() < deadline, f"only {cache.joined} of {LOADS - 1} loads joined the compilation"
            time.sleep(0.001)
        return real(key)

    monkeypatch.setattr(cache, "_from_disk", from_disk_once_all_have_joined)


def _load_concurrently(runtime: Runtime, path: Path) -> list[LoadedComponent | BaseException]:
    results: list[LoadedComponent | BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(LOADS)

    def load(index: int) -> None:
        start.wait(timeout=30)
        try:
            outcome: LoadedComponent | BaseException = runtime.load(ComponentId.parse(f"t/same/{index}"), path)
        except Exception as exc:
            outcome = exc
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(LOADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
        assert not thread.is_alive()
    return results


def test_concurrent_loads_of_one_uncached_binary_compile_it_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                 ) -> None:
    runtime = Runtime(cache_dir=tmp_path)
    try:
        _hold_the_compilation(runtime, monkeypatch)
        with structlog.testing.capture_logs() as logs:
            results = _load_concurrently(runtime, fixture_path("echo"))
        assert all(isinstance(r, LoadedComponent) for r in results), results
        assert len({id(r.component) for r in results if isinstance(r, LoadedComponent)}) == 1
        assert (runtime.cache.misses, runtime.cache.joined) == (1, LOADS - 1)
        assert [e["event"] for e in logs if e["event"].startswith("compile_")].count("compile_started") == 1
    finally:
        runtime.close()


def test_loads_that_joined_a_failed_compilation_get_its_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    whole = fixture_path("echo").read_bytes()
    broken = tmp_path / "broken.wasm"
    broken.write_bytes(whole[: len(whole) // 2])
    runtime = Runtime(cache_dir=tmp_path / "cache")
    try:
        _hold_the_compilation(runtime, monkeypatch)
        results = _load_concurrently(runtime, broken)
        assert len(results) == LOADS
        assert all(isinstance(r, CompileError) and "invalid component" in str(r) for r in results), results
        assert runtime.cache.misses == 0  # nothing was compiled
    finally:
        runtime.close()


def test_a_compilation_is_logged_with_its_size_time_and_cache_outcome(tmp_path: Path) -> None:
    path = fixture_path("echo")
    cid = ComponentId.parse("t/echo/0")
    for expected in ("miss", "hit"):  # a fresh cache directory, then the same one in a new Runtime
        runtime = Runtime(cache_dir=tmp_path)
        try:
            with structlog.testing.capture_logs() as logs:
                runtime.load(cid, path)
                runtime.load(cid, path)  # in memory now: nothing to log
        finally:
            runtime.close()
        started = [e for e in logs if e["event"] == "compile_started"]
        finished = [e for e in logs if e["event"] == "compile_finished"]
        assert len(started) == (expected == "miss") and len(finished) == 1  # a read from disk is not announced
        for event in started + finished:
            assert event["source"] == str(path) and event["component"] == "t/echo/0"
            assert event["size"] == path.stat().st_size and event["log_level"] == "info"
        assert finished[0]["cache"] == expected and finished[0]["ok"] is True
        assert isinstance(finished[0]["seconds"], float) and finished[0]["seconds"] >= 0
