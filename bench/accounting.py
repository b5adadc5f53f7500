"""The price of `[host] memory_accounting` (every linear memory made by runtime/linear_memory.py): echo
messages, boots of a tiny and of a componentize-py component, the componentize-py instance's resident
memory, and an echo next to a guest that grows its memory page by page, each against the same on an
engine using wasmtime's own memories."""

from __future__ import annotations

import statistics
import tempfile
import threading
from pathlib import Path

from bench.harness import FIXTURES, Row, rate
from wasmhost.core import ComponentConfig, ComponentId
from wasmhost.core.limits import ResourceLimits
from wasmhost.core.messages import ComponentMessage, MessageMetadata, Timestamp
from wasmhost.runtime.engine import EngineSettings
from wasmhost.runtime.runtime import Runtime
from wasmhost.runtime.store import StoreManager

PYTHON_INSTANCES = 10
ROUNDS = 3
MESSAGE = ComponentMessage(ComponentId("bench", "client", "0"), b"x" * 64, MessageMetadata(Timestamp.now()))
SELF = ComponentMessage(ComponentId("bench", "client", "0"), b"self", MessageMetadata(Timestamp.now()))
"""What the componentize-py prober answers with its own id (self-id, through the host)."""


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


def _store(runtime: Runtime, path: Path, instance: str, limits: ResourceLimits | None = None) -> StoreManager:
    cid = ComponentId("bench", path.stem, instance)
    return runtime.store(runtime.load(cid, path), cid, limits)


def _boot(manager: StoreManager) -> None:
    manager.instantiate()
    manager.initialize(ComponentConfig())


def _figures(runtime: Runtime, seconds: float) -> dict[str, float]:
    echo = _store(runtime, FIXTURES / "echo.wasm", "0")
    _boot(echo)
    figures = {"echo msg/s": rate(lambda: echo.handle_message(MESSAGE), seconds)}
    figures["echo boots/s"] = rate(lambda: _boot(echo), seconds)
    python = _store(runtime, FIXTURES / "prober.wasm", "0")
    figures["python boots/s"] = rate(lambda: _boot(python), seconds)
    python.close()
    before = _rss()
    instances = [_store(runtime, FIXTURES / "prober.wasm", str(n)) for n in range(PYTHON_INSTANCES)]
    for manager in instances:
        _boot(manager)
        manager.handle_message(SELF)
    figures["python MiB/inst"] = (_rss() - before) / PYTHON_INSTANCES / 2**20
    for manager in instances:
        manager.close()
    hog = _store(runtime, FIXTURES / "memhog.wasm", "0", ResourceLimits(max_memory_bytes=64 * 2**20))
    stop = threading.Event()

    def grow() -> None:  # 1,023 page-by-page grows, then a fresh Store, over and over
        while not stop.is_set():
            _boot(hog)
            hog.handle_message(MESSAGE)

    grower = threading.Thread(target=grow, name="bench-memhog")
    grower.start()
    try:
        figures["echo by grower"] = rate(lambda: echo.handle_message(MESSAGE), seconds)
    finally:
        stop.set()
        grower.join()
    hog.close()
    echo.close()
    return figures


def run(seconds: float = 1.0) -> list[Row]:
    """Each figure with accounting on against the same on wasmtime's own memories: the median of
    ROUNDS turns taken alternately (one pass after the other drifted by up to 1.6x on its own)."""
    rounds: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as cache:  # the componentize-py guest compiles once per setting
        runtimes = {on: Runtime(EngineSettings(memory_accounting=on), cache_dir=Path(cache)) for on in (False, True)}
        try:
            for _ in range(ROUNDS):
                for on, runtime in runtimes.items():
                    rounds[on].append(_figures(runtime, seconds))
        finally:
            for runtime in runtimes.values():
                runtime.close()
    results = {on: {name: statistics.median(r[name] for r in taken) for name in taken[0]}
               for on, taken in rounds.items()}
    off, on = results[False], results[True]
    return [
        Row("accounting", "echo msg/s", off["echo msg/s"], on["echo msg/s"], "msg/s", 0.9),
        # The prices README "Observability" states, not targets: a Python call per memory made, freed
        # or grown (the grower restarts back to back, more often than a supervisor lets a guest).
        Row("accounting", "echo boots/s", off["echo boots/s"], on["echo boots/s"], "boots/s", None),
        Row("accounting", "echo by grower", off["echo by grower"], on["echo by grower"], "msg/s", None),
        Row("accounting", "python boots/s", off["python boots/s"], on["python boots/s"], "boots/s", None),
        Row("accounting", "python MiB/inst", off["python MiB/inst"], on["python MiB/inst"], "MiB", None),
    ]
