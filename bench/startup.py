"""Start-up: 100 distinct components from the compilation cache vs compiled cold; the default
demonstration to READY=1 from a warm cache; the componentize-py greeter from the cache to running."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import FIXTURES, ROOT, Row, daemon_logging
from wasmhost.core import ComponentConfig, ComponentId
from wasmhost.runtime.runtime import Runtime
from wasmhost.runtime.store import StoreManager

COUNT = 100
EXAMPLES = ROOT / "config" / "build"


def distinct_binaries(count: int) -> list[bytes]:
    """`count` different components: echo with a distinct custom section appended to each."""
    echo = (FIXTURES / "echo.wasm").read_bytes()
    binaries = []
    for i in range(count):
        name = b"wasmhost-bench"
        payload = bytes([len(name)]) + name + f"variant {i}".encode()
        binaries.append(echo + b"\x00" + bytes([len(payload)]) + payload)  # custom section (id 0)
    return binaries


def _start(runtime: Runtime, cid: ComponentId, wasm: bytes, source: str) -> StoreManager:
    """Load, instantiate and initialize one component."""
    manager = runtime.store(runtime.loader.load_bytes(wasm, source), cid)
    manager.instantiate()
    manager.initialize(ComponentConfig())
    return manager


def _load_all(cache: Path, binaries: list[bytes]) -> float:
    """Seconds to start every binary with a fresh Runtime over `cache` (all left running, as a
    daemon would, so tearing Stores down is not part of the figure)."""
    runtime = Runtime(cache_dir=cache)
    running = []
    try:
        began = time.perf_counter()
        for i, wasm in enumerate(binaries):
            running.append(_start(runtime, ComponentId("bench", "startup", str(i)), wasm, f"variant {i}"))
        return time.perf_counter() - began
    finally:
        for manager in running:
            manager.close()
        runtime.close()


def _greeter_from_cache(cache: Path) -> float:
    """Seconds from nothing to a running, initialized greeter whose compiled form is cached."""
    wasm = (EXAMPLES / "greeter.wasm").read_bytes()
    _load_all(cache, [wasm])  # compiles it into the cache
    return _load_all(cache, [wasm])


def _demo_ready(state: Path) -> float:
    """Seconds from spawning `wasmhost run` on the default config to READY=1."""
    text = (ROOT / "config" / "wasmhost.toml").read_text()
    text = text.replace('components_dir = "build"', f'components_dir = "{EXAMPLES}"')
    text = text.replace('state_dir = "state"', f'state_dir = "{state}"')
    config = state.parent / "demo.toml"
    config.write_text(text)
    notify_path = state.parent / "notify.sock"
    notify_path.unlink(missing_ok=True)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(120)
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path)}
    began = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "wasmhost.cli", "run", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        while b"READY=1" not in notify.recv(4096).split(b"\n"):
            pass
        return time.perf_counter() - began
    finally:
        proc.terminate()
        proc.wait()
        notify.close()


def run(seconds: float = 1.0) -> list[Row]:
    """Measure the three start-up figures."""
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        binaries = distinct_binaries(COUNT)
        # Best of several runs on both sides: each cold run compiles into an empty cache directory.
        with daemon_logging():  # each start logs its compile (or cache read) as the daemon does
            cold = min(_load_all(Path(tmp) / f"cold-{run}", binaries) for run in range(2))
            _load_all(cache, binaries)
            warm = min(_load_all(cache, binaries) for _ in range(3))
            greeter = _greeter_from_cache(cache)
        state = Path(tmp) / "state"
        _demo_ready(state)  # fills the daemon's cache
        ready = min(_demo_ready(state) for _ in range(3))
    return [
        Row("startup", f"{COUNT} comps cached", COUNT / cold, COUNT / warm, "comp/s", 20.0),
        Row("startup", "demo READY=1", 1.0, ready, "s", 1.0, at_most=True),
        Row("startup", "greeter cached", 0.1, greeter, "s", 0.1, at_most=True),
    ]
