"""The process-wide wasmtime Engine and the epoch ticker thread that drives wall-clock deadlines."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import wasmtime
from wasmtime import _bindings

from wasmhost.core import affinity
from wasmhost.runtime.linear_memory import LinearMemories
from wasmhost.runtime.malloc import keep_large_allocations_in_heap

DEFAULT_EPOCH_TICK_MS = 10
MAX_CATCH_UP = 100


@dataclass(frozen=True)
class EngineSettings:
    """Engine-wide settings; part of the compilation cache key."""

    epoch_tick_ms: int = DEFAULT_EPOCH_TICK_MS
    optimize: bool = True
    memory_accounting: bool = False
    """Make every linear memory ourselves to know each component's memory size (LinearMemories)."""

    def fingerprint(self) -> str:
        """The settings that change compiled code, as text for cache keys."""
        # Memory accounting turns copy-on-write memory images off, which compiled code records.
        cow = ";cow=0" if self.memory_accounting else ""
        return f"fuel=1;epoch=1;component-model=1;cm-async=0;gc=0;exceptions=0;opt={int(self.optimize)}{cow}"


class EpochTicker:
    """Increments the engine's epoch every tick on a real thread, so a guest that holds a worker
    thread (or the event loop) cannot stop deadlines from firing."""

    def __init__(self, engine: wasmtime.Engine, tick_ms: int) -> None:
        self.engine = engine
        self.tick_s = tick_ms / 1000
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wasmhost-epoch", daemon=True)

    def start(self) -> None:
        """Start ticking."""
        self._thread.start()

    def _run(self) -> None:
        affinity.roam()  # it ticks without the GIL's help; it need not wait for the home core
        # Ticks are scheduled at absolute times and missed ones are caught up, so the epoch keeps
        # pace with the wall clock even when this thread wakes late (busy cores, GIL hand-offs).
        next_at = time.monotonic() + self.tick_s
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            now = time.monotonic()
            for _ in range(MAX_CATCH_UP):
                if next_at > now:
                    break
                self.engine.increment_epoch()
                next_at += self.tick_s
            else:
                next_at = now + self.tick_s  # suspended for long: resume from now

    def stop(self) -> None:
        """Stop ticking and wait for the thread."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


class RuntimeEngine:
    """The one wasmtime Engine of the process (component model, fuel and epochs on) and its ticker."""

    def __init__(self, settings: EngineSettings | None = None) -> None:
        self.settings = settings or EngineSettings()
        if self.settings.epoch_tick_ms <= 0:
            raise ValueError(f"epoch tick must be > 0 ms, got {self.settings.epoch_tick_ms}")
        keep_large_allocations_in_heap()
        config = wasmtime.Config()
        config.consume_fuel = True
        config.epoch_interruption = True
        config.wasm_component_model = True
        # The GC proposal's heap (which also holds exception objects) is a memory that wasmtime's
        # memory-count limit does not count, so a guest could hold another max_memory_bytes in it;
        # no supported guest language needs GC or exceptions.
        config.wasm_gc = False
        config.wasm_exceptions = False
        # Component-model async (async-lifted exports, tasks, streams, futures) is on by default in
        # wasmtime 50. The contract's functions are synchronous and the host calls them as such; an
        # `async func` export still ran, but each call left wasmtime state behind outside the linear
        # memory max_memory_bytes caps (measured: a well-behaved async echo grew the host by 110 bytes
        # a call, 32 MiB in 300,000 calls; one leaving its task yielding in the background, 1 KiB a call,
        # 80 MiB until the Store's handle limit trapped it). No supported guest toolchain emits it.
        _bindings.wasmtime_config_wasm_component_model_async_set(config.ptr(), False)
        config.cranelift_opt_level = "speed" if self.settings.optimize else "none"
        self.memories = LinearMemories() if self.settings.memory_accounting else None
        """Every linear memory of the engine, charged to the component that made it (if accounting)."""
        if self.memories is not None:
            self.memories.install(config)
        self.engine = wasmtime.Engine(config)
        self.ticker = EpochTicker(self.engine, self.settings.epoch_tick_ms)
        self.ticker.start()

    @property
    def tick_ms(self) -> int:
        """Length of one epoch tick in milliseconds."""
        return self.settings.epoch_tick_ms

    def close(self) -> None:
        """Stop the epoch ticker."""
        self.ticker.stop()
