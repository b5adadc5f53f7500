"""`[host] memory_accounting`: every linear memory is a mapping of ours (runtime/linear_memory.py), so each
component's memory size and high-water mark are known; a guest still cannot reach past its memory, and
the figures reach metrics, `status` and `top`."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import FIXTURES, fixture_path
from tests.test_daemon import ROOT, Daemon, component, launch
from tests.test_metrics import ACCOUNTING_ON, METRICS_ON, Scraper, call
from tests.test_runtime_calls import message
from wasmhost.core import ComponentConfig, ComponentId
from wasmhost.core.errors import GuestTrap
from wasmhost.core.limits import ResourceLimits
from wasmhost.runtime.engine import EngineSettings
from wasmhost.runtime.footprint import PAGE_BYTES
from wasmhost.runtime.limiter import StoreBudget
from wasmhost.runtime.runtime import Runtime
from wasmhost.runtime.store import StoreManager
from wasmhost.system import protocol
from wasmhost.system.client import request

CAP = 8 * 1024 * 1024


@pytest.fixture(scope="module")
def accounting() -> Iterator[Runtime]:
    """A Runtime whose engine accounts memory (its cache entries are apart from the default engine's)."""
    rt = Runtime(EngineSettings(memory_accounting=True), cache_dir=FIXTURES / "cache")
    yield rt
    rt.close()


@pytest.fixture(scope="module")
def plain() -> Iterator[Runtime]:
    """A Runtime on wasmtime's own memories, for comparison."""
    rt = Runtime(cache_dir=FIXTURES / "cache")
    yield rt
    rt.close()


def running(runtime: Runtime, fixture: str, limits: ResourceLimits | None = None) -> StoreManager:
    cid = ComponentId("t", fixture, "0")
    manager = runtime.store(runtime.load(cid, fixture_path(fixture)), cid, limits)
    manager.instantiate()
    manager.initialize(ComponentConfig())
    return manager


def test_each_component_is_charged_its_own_memory_up_to_its_budget(accounting: Runtime) -> None:
    echo = running(accounting, "echo")
    hog = running(accounting, "memhog", ResourceLimits(max_memory_bytes=CAP))
    assert echo.memory is not None and hog.memory is not None
    echo_before = echo.memory.figures()
    assert hog.memory.figures() == (PAGE_BYTES, PAGE_BYTES)  # memhog starts at one page
    pages = int(hog.handle_message(message(b"grow")) or b"0")
    budget = StoreBudget.plan(CAP, hog.loaded.footprint, "memhog").memory_bytes
    assert pages * PAGE_BYTES == budget  # grown until the limiter refused, and every page counted
    assert hog.memory.figures() == (budget, budget)
    assert echo.handle_message(message(b"still here")) == b"still here"
    assert echo.memory.figures() == echo_before  # the neighbour is charged nothing of it

    hog.instantiate()  # a restart: a fresh memory, the old one released; the high-water mark stays
    assert hog.memory.figures() == (PAGE_BYTES, budget)
    assert hog.memory.memories == 1
    hog.close()
    echo.close()
    assert (hog.memory.bytes, hog.memory.memories, echo.memory.bytes, echo.memory.memories) == (0, 0, 0, 0)


PEEKS = [  # (payload, expected answer or None for a trap); memory starts at one page
    ("100", b"10"),  # the metadata build.py laid out at 64
    ("last", b"0"),
    ("end", None),  # the first byte past the memory
    ("far", None),  # a 4 GiB static offset: past the reservation, into the guard
    ("w65535", b"171"),
    ("w65536", None),
    ("w4294967280", None),  # 16 bytes short of 4 GiB: inside the reservation, never made accessible
    ("4294967295", None),
    ("grow", b"2"),
    ("131071", b"0"),  # the grown page is there, zeroed
    ("w131071", b"171"),
    ("w131072", None),
]


@contextmanager
def check(payload: str) -> Iterator[None]:
    """Name the payload when the block fails."""
    try:
        yield
    except BaseException as exc:
        raise AssertionError(f"payload {payload!r}: {exc}") from exc


def test_a_trapped_store_gives_its_memory_back_before_the_restart(accounting: Runtime) -> None:
    peeker = running(accounting, "peeker")
    assert peeker.memory is not None
    assert peeker.handle_message(message(b"grow")) == b"2"
    with pytest.raises(GuestTrap, match="out of bounds memory access"):
        peeker.handle_message(message(b"end"))
    assert peeker.memory.figures() == (2 * PAGE_BYTES, 2 * PAGE_BYTES)  # set aside, not yet freed
    peeker.free_poisoned()  # what the worker does once the failure is on its way to the event loop
    assert (peeker.memory.bytes, peeker.memory.memories) == (0, 0)
    peeker.free_poisoned()  # nothing left: a no-op

    with pytest.raises(GuestTrap):  # trapped again, and restarted before anything freed it
        peeker.instantiate()
        peeker.initialize(ComponentConfig())
        peeker.handle_message(message(b"end"))
    peeker.instantiate()  # frees the poisoned Store first: never two of its memories at once
    assert (peeker.memory.bytes, peeker.memory.memories) == (PAGE_BYTES, 1)
    peeker.close()
    assert (peeker.memory.bytes, peeker.memory.memories) == (0, 0)


@pytest.mark.parametrize("engine", ["accounting", "plain"])
def test_a_guest_cannot_reach_past_its_memory(engine: str, request: pytest.FixtureRequest) -> None:
    runtime: Runtime = request.getfixturevalue(engine)
    echo = running(runtime, "echo")
    peeker = running(runtime, "peeker")
    pages = 1
    for payload, expected in PEEKS:
        if expected is None:
            with check(payload), pytest.raises(GuestTrap, match="out of bounds memory access"):
                peeker.handle_message(message(payload.encode()))
            assert echo.handle_message(message(payload.encode())) == payload.encode()  # the neighbour answers
            peeker.instantiate()  # the trap poisoned its Store
            peeker.initialize(ComponentConfig())
            for grown in range(2, pages + 1):  # back to the size the table expects
                assert peeker.handle_message(message(b"grow")) == str(grown).encode()
        else:
            assert peeker.handle_message(message(payload.encode())) == expected, payload
            pages += payload == "grow"
    if peeker.memory is not None:
        assert peeker.memory.figures() == (2 * PAGE_BYTES, 2 * PAGE_BYTES)
    peeker.close()
    echo.close()


def test_a_python_guest_is_charged_its_whole_heap(accounting: Runtime) -> None:
    prober = running(accounting, "prober")
    assert prober.memory is not None
    assert prober.handle_message(message(b"self")) == b"t/prober/0"
    size, high_water = prober.memory.figures()
    budget = StoreBudget.plan(ResourceLimits().max_memory_bytes, prober.loaded.footprint, "prober")
    assert 12 * 1024 * 1024 <= size <= high_water <= budget.memory_bytes  # CPython starts at 12.3 MiB
    prober.close()


def test_a_memory_that_cannot_be_reserved_fails_the_instantiation_not_the_process(tmp_path: Path) -> None:
    # Address space capped below one memory's reservation (4 GiB plus guard): our mmap is refused.
    script = (
        "import resource, sys\n"
        "from pathlib import Path\n"
        "from wasmhost.core import ComponentId\n"
        "from wasmhost.runtime.engine import EngineSettings\n"
        "from wasmhost.runtime.runtime import Runtime\n"
        f"rt = Runtime(EngineSettings(memory_accounting=True), cache_dir=Path({str(FIXTURES / 'cache')!r}))\n"
        "cid = ComponentId('t', 'echo', '0')\n"
        f"manager = rt.store(rt.load(cid, Path({str(fixture_path('echo'))!r})), cid)\n"
        "resource.setrlimit(resource.RLIMIT_AS, (3 << 30, resource.RLIM_INFINITY))\n"
        "try:\n"
        "    manager.instantiate()\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "InstantiationError" in result.stdout and "cannot reserve" in result.stdout, result.stdout
    assert "ENOMEM" in result.stdout, result.stdout


def test_the_daemon_reports_memory_in_metrics_status_and_top(tmp_path: Path, started: list[Daemon]) -> None:
    limits = f"limits = {{ max_memory_bytes = {CAP} }}"
    d = launch(tmp_path, component("t/echo/0", "echo") + component("t/hog/0", "memhog", limits), started,
               edit=ACCOUNTING_ON)
    m = Scraper(d)
    hog = {"component": "t/hog/0"}
    assert m.value("wasmhost_component_memory_bytes", **hog) == PAGE_BYTES
    echo_bytes = m.value("wasmhost_component_memory_bytes", component="t/echo/0")
    assert echo_bytes > 0
    pages = int(call(d, "t/hog/0", b"grow").data or b"0")
    assert m.value("wasmhost_component_memory_bytes", **hog) == pages * PAGE_BYTES
    assert m.value("wasmhost_component_memory_high_water_bytes", **hog) == pages * PAGE_BYTES
    assert m.value("wasmhost_component_memory_bytes", component="t/echo/0") == echo_bytes
    rows = {r["id"]: r for r in request(d.socket, protocol.Status()).data["components"]}
    assert rows["t/hog/0"]["memory_bytes"] == rows["t/hog/0"]["memory_high_water_bytes"] == pages * PAGE_BYTES
    table = d.cli("status").stdout.splitlines()
    assert table[0].split()[-3:] == ["MEMORY", "LAST", "ERROR"]
    assert [line.split()[-3:] for line in table[1:3]] == [  # MEMORY, then LAST ERROR: none
        [f"{echo_bytes / 2**10:.1f}", "KiB", "-"], [f"{pages * PAGE_BYTES / 2**20:.1f}", "MiB", "-"]]
    frame = d.cli("top", "--once", "--interval", "0.1", "--sort", "memory").stdout.splitlines()
    assert "MEMORY*" in frame[1]
    assert frame[2].startswith("t/hog/0") and f"{pages * PAGE_BYTES / 2**20:.1f} MiB" in frame[2]
    assert d.stop() == 0


def test_without_accounting_no_memory_figure_is_made_up(tmp_path: Path, started: list[Daemon]) -> None:
    d = launch(tmp_path, component("t/echo/0", "echo"), started,
               edit=METRICS_ON)
    assert call(d, "t/echo/0", b"x").ok
    names = {name for name, _ in Scraper(d).samples()}
    assert "wasmhost_component_memory_limit_bytes" in names
    assert not names & {"wasmhost_component_memory_bytes", "wasmhost_component_memory_high_water_bytes"}
    row = request(d.socket, protocol.Status()).data["components"][0]
    assert row["memory_bytes"] is None and row["memory_high_water_bytes"] is None
    assert "MEMORY" not in d.cli("top", "--once", "--interval", "0.1").stdout
    assert "MEMORY" not in d.cli("status").stdout
    assert d.stop() == 0
