"""Runtime: the engine, compilation cache, loader and linker of one process, wired together."""

from __future__ import annotations

from pathlib import Path

from wasmhost.core.ids import ComponentId
from wasmhost.core.limits import ResourceLimits
from wasmhost.runtime.cache import CompilationCache
from wasmhost.runtime.engine import EngineSettings, RuntimeEngine
from wasmhost.runtime.host_fn import HostContext
from wasmhost.runtime.linking import Linkers
from wasmhost.runtime.loader import FileComponentLoader, LoadedComponent
from wasmhost.runtime.store import StoreManager


class Runtime:
    """Everything needed to load components and give each its own Store."""

    def __init__(
        self,
        settings: EngineSettings | None = None,
        cache_dir: Path | None = None,
        components_dir: Path | None = None,
    ) -> None:
        self.engine = RuntimeEngine(settings)
        self.cache = CompilationCache(self.engine, cache_dir)
        self.linkers = Linkers(self.engine.engine)
        self.linker = self.linkers.plain
        """The linker of components that do not import wasi:http."""
        self.loader = FileComponentLoader(components_dir, self.cache, self.linkers)

    def load(self, component_id: ComponentId, path: Path | None = None, outbound_http: bool = False
             ) -> LoadedComponent:
        """Load, validate and link-check a component binary (see FileComponentLoader.load)."""
        return self.loader.load(component_id, path, outbound_http)

    def store(
        self,
        loaded: LoadedComponent,
        component_id: ComponentId,
        limits: ResourceLimits | None = None,
        host: HostContext | None = None,
        wasi_stdio: bool = False,
    ) -> StoreManager:
        """A StoreManager for one instance of `loaded` (not yet instantiated)."""
        linker = self.linkers.for_imports(loaded.imports)  # the loader refused wasi:http unless granted
        return StoreManager(
            loaded, component_id, limits or ResourceLimits(), linker, self.engine.engine, self.engine.tick_ms, host,
            wasi_stdio, self.engine.memories,
        )

    def close(self) -> None:
        """Stop the epoch ticker."""
        self.engine.close()
