"""Compilation cache: compiled components serialised to disk, keyed by wasm hash, wasmtime version
and engine settings; a corrupt or stale entry is recompiled, never fatal."""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from pathlib import Path

import structlog
import wasmtime
from wasmtime import component as wc

from wasmhost.runtime.engine import RuntimeEngine

log = structlog.get_logger("wasmhost.cache")


def wasmtime_version() -> str:
    """The installed wasmtime-py version."""
    from importlib.metadata import version

    return version("wasmtime")


class CompilationCache:
    """Compiles components once per process and once per cache directory."""

    def __init__(self, engine: RuntimeEngine, directory: Path | None) -> None:
        self.engine = engine
        self.directory = directory
        self._salt = f"wasmtime={wasmtime_version()};{engine.settings.fingerprint()}".encode()
        self._memory: dict[str, wc.Component] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def key(self, wasm: bytes) -> str:
        """Cache key of `wasm` under this engine's version and settings."""
        return hashlib.sha256(self._salt + b"\0" + wasm).hexdigest()

    def entry_path(self, wasm: bytes) -> Path | None:
        """Where the compiled form of `wasm` is stored, if there is a cache directory."""
        return self.directory / f"{self.key(wasm)}.cwasm" if self.directory else None

    def component(self, wasm: bytes) -> wc.Component:
        """The compiled component for `wasm`: from memory, from disk, or freshly compiled.

        Raises wasmtime.WasmtimeError when the bytes do not compile.
        """
        key = self.key(wasm)
        with self._lock:
            found = self._memory.get(key)
        if found is not None:
            self.hits += 1
            return found
        compiled = self._from_disk(key)
        if compiled is None:
            compiled = wc.Component(self.engine.engine, wasm)
            self.misses += 1
            self._to_disk(key, compiled)
        else:
            self.hits += 1
        with self._lock:
            self._memory[key] = compiled
        return compiled

    def forget(self, wasm: bytes) -> None:
        """Drop the in-memory copy for `wasm` (the disk entry stays)."""
        with self._lock:
            self._memory.pop(self.key(wasm), None)

    def _from_disk(self, key: str) -> wc.Component | None:
        if self.directory is None:
            return None
        path = self.directory / f"{key}.cwasm"
        if not path.exists():
            return None
        try:
            return wc.Component.deserialize_file(self.engine.engine, str(path))
        except (wasmtime.WasmtimeError, OSError) as exc:
            log.warning("cache_entry_unusable", path=str(path), error=str(exc))
            path.unlink(missing_ok=True)
            return None

    def _to_disk(self, key: str, compiled: wc.Component) -> None:
        if self.directory is None:
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            data = compiled.serialize()
            fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.replace(tmp, self.directory / f"{key}.cwasm")
        except (OSError, wasmtime.WasmtimeError) as exc:
            log.warning("cache_write_failed", directory=str(self.directory), error=str(exc))
