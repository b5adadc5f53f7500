"""Shared fixtures: built guest components and one Runtime per test session."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from wasmhost.core import ComponentConfig, ComponentId, ResourceLimits
from wasmhost.runtime.host_fn import HostContext
from wasmhost.runtime.runtime import Runtime
from wasmhost.runtime.store import StoreManager

if TYPE_CHECKING:
    from tests.test_daemon import Daemon

Starter = Callable[..., StoreManager]
FIXTURES = Path(os.environ.get("WASMHOST_FIXTURES", Path(__file__).parent / "fixtures" / "build"))


def fixture_path(name: str) -> Path:
    """The built fixture `name` (`make fixtures` builds them; a missing one is an error, not a skip)."""
    path = FIXTURES / f"{name}.wasm"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `make fixtures`")
    return path


@pytest.fixture
def anyio_backend() -> str:
    """Async tests (marked anyio) run on asyncio, as the daemon does."""
    return "asyncio"


@pytest.fixture(scope="session")
def runtime() -> Iterator[Runtime]:
    """A Runtime whose compilation cache lives beside the fixtures (the Python guests take seconds
    to compile; tests of the cache itself use their own directories)."""
    rt = Runtime(cache_dir=FIXTURES / "cache")
    yield rt
    rt.close()


@pytest.fixture
def start(runtime: Runtime) -> Iterator[Starter]:
    """Factory: load a fixture under an id, instantiate and initialize it."""
    stores: list[StoreManager] = []

    def _start(
        fixture: str,
        component_id: str = "test-org/echo/0.1.0",
        limits: ResourceLimits | None = None,
        host: HostContext | None = None,
        initialize: bool = True,
    ) -> StoreManager:
        cid = ComponentId.parse(component_id)
        loaded = runtime.load(cid, fixture_path(fixture))
        if host is not None:
            host.component_id = cid
        manager = runtime.store(loaded, cid, limits, host)
        manager.instantiate()
        if initialize:
            manager.initialize(ComponentConfig())
        stores.append(manager)
        return manager

    yield _start
    for manager in stores:
        manager.close()


@pytest.fixture
def started() -> Iterator[list[Daemon]]:
    """Daemon subprocesses a test starts (tests/test_daemon.py); those still running at its end are killed."""
    from tests.test_daemon import kill_leftovers  # not at the top: test_daemon imports this module's helpers

    daemons: list[Daemon] = []
    yield daemons
    kill_leftovers(daemons)
