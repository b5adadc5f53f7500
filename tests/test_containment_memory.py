"""Memory containment: whatever a guest does with tables, memories and instances, its Store stays
within max_memory_bytes, and a well-behaved neighbour keeps answering."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import wasmtime
from wasmtime import component as wc

from tests.conftest import FIXTURES, Starter, fixture_path
from tests.test_daemon import Daemon, component, config_text, wasmhost
from tests.test_runtime_calls import message
from wasmhost.core import ComponentConfig, ComponentId
from wasmhost.core.errors import CompileError, FootprintError, MemoryBudgetError
from wasmhost.core.limits import (
    DEFAULT_MAX_MEMORY_BYTES,
    MAX_COMPONENT_INSTANCES,
    MAX_INSTANCES,
    MAX_MEMORIES,
    TABLE_ELEMENT_BYTES,
    ResourceLimits,
)
from wasmhost.runtime.engine import EngineSettings
from wasmhost.runtime.footprint import PAGE_BYTES, Footprint, footprint
from wasmhost.runtime.limiter import Limiter, StoreBudget
from wasmhost.runtime.loader import LOAD_NOTE, decode_load_note
from wasmhost.runtime.runtime import Runtime
from wasmhost.system import protocol
from wasmhost.system.client import request

ROOT = Path(__file__).resolve().parent.parent
CAP = 16 * 1024 * 1024
OVERHEAD = 4 * 1024 * 1024
"""RSS a hostile Store may add beyond its max_memory_bytes in these tests (README: wasmtime's own
structures take tens of KiB; the rest is slack for the allocator and the test process itself)."""


@pytest.fixture(scope="module", params=[False, True], ids=["wasmtime-memories", "accounted-memories"])
def runtime(request: pytest.FixtureRequest) -> Iterator[Runtime]:
    """Every test here runs on wasmtime's own memories and on ours (`[host] memory_accounting`)."""
    rt = Runtime(EngineSettings(memory_accounting=request.param), cache_dir=FIXTURES / "cache")
    yield rt
    rt.close()


def rss(pid: int | str = "self") -> int:
    """Resident set size of a process, in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    assert match, status
    return int(match.group(1)) * 1024


def test_a_table_grower_stops_at_its_share_of_the_budget(start: Starter) -> None:
    echo = start("echo", "test-org/echo/0")
    before = rss()
    hog = start("tablehog", "test-org/tablehog/0", limits=ResourceLimits(max_memory_bytes=CAP))
    budget = StoreBudget.plan(CAP, hog.loaded.footprint, "tablehog")
    asked = 4 * CAP // TABLE_ELEMENT_BYTES  # four times what the whole budget could hold
    elements = int(hog.handle_message(message(str(asked).encode())) or b"0")
    assert elements == budget.table_elements  # table.grow returned -1 at the limit, not before
    assert budget.total_bytes <= CAP
    assert rss() - before <= CAP + OVERHEAD
    assert echo.handle_message(message(b"still here")) == b"still here"


def test_many_memories_share_one_budget(start: Starter) -> None:
    echo = start("echo", "test-org/echo/0")
    before = rss()
    hog = start("memhogs", "test-org/memhogs/0", limits=ResourceLimits(max_memory_bytes=CAP))
    assert hog.loaded.footprint.memories == 5
    grown = int(hog.handle_message(message(b"grow")) or b"0")
    share = CAP // 5 // PAGE_BYTES  # pages per memory
    assert grown == 5 * share - 1  # every memory reached its share (the first one started at a page)
    assert (grown + 1) * PAGE_BYTES <= CAP
    assert rss() - before <= CAP + OVERHEAD  # every grown page was written to, so it is resident
    assert echo.handle_message(message(b"still here")) == b"still here"


def test_a_restarted_store_gets_the_same_budget_again(start: Starter) -> None:
    hog = start("memhogs", "test-org/memhogs/0", limits=ResourceLimits(max_memory_bytes=CAP))
    first = hog.handle_message(message(b"grow"))
    hog.instantiate()  # what a restart does: a fresh Store; the old one and its memories are dropped
    hog.initialize(ComponentConfig())
    assert hog.handle_message(message(b"grow")) == first


def test_more_memories_than_a_store_allows_are_refused_at_load(runtime: Runtime) -> None:
    with pytest.raises(FootprintError, match=rf"20 linear memories \(at most {MAX_MEMORIES}\)"):
        runtime.load(ComponentId.parse("t/many/0"), fixture_path("manymemories"))


def test_instances_of_nested_components_are_counted_and_refused_at_load(runtime: Runtime) -> None:
    with pytest.raises(FootprintError, match=rf"110 core module instances \(at most {MAX_INSTANCES}\)"):
        runtime.load(ComponentId.parse("t/many/0"), fixture_path("manyinstances"))


def test_nested_components_joined_by_wasmtime_adapters_still_instantiate(runtime: Runtime) -> None:
    wasm = fixture_path("fused").read_bytes()
    found = footprint(wasm)
    assert (found.instances, found.memories, found.tables) == (3, 2, 0)  # wasmtime adds a 4th: the adapter
    store = wasmtime.Store(runtime.engine.engine)
    Limiter(ResourceLimits(), runtime.engine.tick_ms, found).apply(store)
    store.set_fuel(1_000_000)
    store.set_epoch_deadline(1_000)
    instance = wc.Linker(runtime.engine.engine).instantiate(store, wc.Component(runtime.engine.engine, wasm))
    g = instance.get_func(store, "g")
    assert g is not None and g(store, 42) == 42


def test_a_nested_instantiation_bomb_is_refused_before_it_is_compiled(tmp_path: Path) -> None:
    fresh = Runtime(cache_dir=tmp_path)
    try:
        before = rss()
        with pytest.raises(FootprintError, match=rf"1111111 component instances \(at most {MAX_COMPONENT_INSTANCES}\)"):
            fresh.load(ComponentId.parse("t/bomb/0"), fixture_path("nestbomb"))
        assert fresh.cache.misses == 0  # never handed to the compiler (it would take ~100 MiB)
        assert rss() - before < OVERHEAD
    finally:
        fresh.close()


def test_a_bomb_handed_through_an_instance_export_is_refused_before_it_is_compiled(tmp_path: Path) -> None:
    """What cannot be counted is not compiled either: before, only a bomb the reader could count was
    refused up front; one instantiated through an alias of an instance's export was compiled, and
    refused after (102 MiB at six levels, a process abort at eight)."""
    fresh = Runtime(cache_dir=tmp_path)
    try:
        before = rss()
        with pytest.raises(FootprintError, match="taken from an instance") as info:
            fresh.load(ComponentId.parse("t/bomb/0"), fixture_path("aliasbomb"))
        assert fresh.cache.misses == 0 and not list(tmp_path.rglob("*.cwasm"))  # never handed to the compiler
        assert rss() - before < OVERHEAD
        assert "nothing of it was compiled" in str(info.value)
    finally:
        fresh.close()


def test_outer_aliases_and_exported_components_are_counted_as_wasmtime_counts(runtime: Runtime) -> None:
    engine = runtime.engine.engine
    wasm = fixture_path("aliases").read_bytes()
    found = footprint(wasm)
    assert (found.instances, found.memories, found.tables) == (4, 4, 4)
    assert (found.largest_memory_min, found.largest_table_min) == (2 * PAGE_BYTES, 3)
    compiled = wc.Component(engine, wasm)
    for memories, works in ((found.memories, True), (found.memories - 1, False)):
        store = wasmtime.Store(engine)
        store.set_limits(memories=memories, tables=found.tables)
        if works:
            wc.Linker(engine).instantiate(store, compiled)
        else:
            with pytest.raises(wasmtime.WasmtimeError, match="memory count too high"):
                wc.Linker(engine).instantiate(store, compiled)


def test_a_component_instantiating_an_imported_module_is_refused_at_load(runtime: Runtime) -> None:
    with pytest.raises(FootprintError, match=r"instantiates core module 0 .* imported or taken from an instance"):
        runtime.load(ComponentId.parse("t/imports/0"), fixture_path("importsmodule"))


def test_host_resources_a_guest_hoards_are_capped_by_wasmtime(runtime: Runtime) -> None:
    # Not part of max_memory_bytes: wasmtime's own cap of 100,000 handles per Store bounds them.
    engine = runtime.engine.engine
    wasm = fixture_path("handlehog").read_bytes()
    store = wasmtime.Store(engine)
    Limiter(ResourceLimits(max_memory_bytes=CAP), runtime.engine.tick_ms, footprint(wasm)).apply(store)
    store.set_wasi(wasmtime.WasiConfig())
    store.set_fuel(2**62)
    store.set_epoch_deadline(100_000)
    run = runtime.linker.instantiate(store, wc.Component(engine, wasm)).get_func(store, "run")
    assert run is not None
    before = rss()
    with pytest.raises(wasmtime.WasmtimeError, match="handle limit exceeded"):
        run(store, 10_000_000)
    assert rss() - before <= OVERHEAD + 12 * 1024 * 1024  # measured: 8.2 MiB at the cap


@pytest.mark.parametrize(("fixture", "reason"), [("gcheap", "gc"), ("exnheap", "exception")])
def test_the_gc_heap_is_off(runtime: Runtime, fixture: str, reason: str) -> None:
    # A GC heap (GC objects, exception objects) would be one more memory, outside the counts the
    # budget is shared by: measured, caught exceptions kept in a table filled 7 MiB of it.
    with pytest.raises(CompileError, match=reason):
        runtime.load(ComponentId.parse("t/gc/0"), fixture_path(fixture))


def test_a_budget_too_small_for_the_declared_memories_names_what_it_needs(start: Starter) -> None:
    with pytest.raises(MemoryBudgetError, match=r"5 linear memories .* needs at least 327680"):
        start("memhogs", "test-org/memhogs/0", limits=ResourceLimits(max_memory_bytes=300_000))


@pytest.mark.parametrize("memories", [0, 1, 2, 5, 16])
@pytest.mark.parametrize("tables", [0, 1, 3, 100])
@pytest.mark.parametrize("cap", [1 << 20, 20_000_000, DEFAULT_MAX_MEMORY_BYTES])
def test_every_budget_fits_max_memory_bytes(memories: int, tables: int, cap: int) -> None:
    found = Footprint(instances=1, memories=memories, tables=tables, largest_memory_min=PAGE_BYTES if memories else 0)
    try:
        budget = StoreBudget.plan(cap, found, "t")
    except MemoryBudgetError:
        assert memories * PAGE_BYTES + tables * 10_000 * TABLE_ELEMENT_BYTES > cap
        return
    assert budget.total_bytes <= cap
    assert (budget.memories, budget.tables, budget.instances) == (memories, tables, MAX_INSTANCES)


def test_the_size_a_budget_error_asks_for_is_exactly_enough() -> None:
    found = Footprint(instances=14, memories=3, tables=2, largest_memory_min=197 * PAGE_BYTES, largest_table_min=5688)
    with pytest.raises(MemoryBudgetError, match=r"needs at least (\d+)") as info:
        StoreBudget.plan(1 << 20, found, "t")
    needed = int(re.search(r"needs at least (\d+)", str(info.value)).group(1))  # type: ignore[union-attr]
    assert StoreBudget.plan(needed, found, "t").total_bytes <= needed
    with pytest.raises(MemoryBudgetError):
        StoreBudget.plan(needed - 1, found, "t")


def test_counts_and_imports_are_kept_in_the_compilation_cache_and_a_bad_note_is_recounted(tmp_path: Path) -> None:
    wasm = fixture_path("memhogs").read_bytes()
    first = Runtime(cache_dir=tmp_path)
    try:
        loaded = first.loader.load_bytes(wasm, "memhogs")
        key = first.cache.key(wasm)
    finally:
        first.close()
    noted = decode_load_note((tmp_path / f"{key}.{LOAD_NOTE}").read_bytes())
    assert noted is not None
    assert noted[0] == loaded.footprint == footprint(wasm)
    assert frozenset(noted[1]) == loaded.imports
    (tmp_path / f"{key}.{LOAD_NOTE}").write_bytes(b"garbage")
    second = Runtime(cache_dir=tmp_path)
    try:
        assert second.loader.load_bytes(wasm, "memhogs").footprint == footprint(wasm)
        invalid = b"\0asm\x0d\x00\x01\x00" + b"\x07\x01\xff"  # countable (a type section), but invalid
        with pytest.raises(CompileError):
            second.loader.load_bytes(invalid, "invalid")
        assert not (tmp_path / f"{second.cache.key(invalid)}.{LOAD_NOTE}").exists()
    finally:
        second.close()
    third = Runtime(cache_dir=tmp_path)  # a cached start takes counts and imports from the recounted note
    try:
        again = third.loader.load_bytes(wasm, "memhogs")
        assert (again.footprint, again.imports) == (loaded.footprint, loaded.imports)
        assert again.imports  # the contract's type interfaces: the note keeps them
    finally:
        third.close()


def test_python_guests_fit_the_default_budget_with_room_to_spare() -> None:
    for path in (fixture_path("prober"), ROOT / "config" / "build" / "greeter.wasm"):
        found = footprint(path.read_bytes())
        assert (found.instances, found.memories, found.tables) == (14, 1, 2)
        budget = StoreBudget.plan(DEFAULT_MAX_MEMORY_BYTES, found, path.name)
        # CPython starts at 12.3 MiB and the greeter runs 200 calls within 13 MiB: five times that.
        assert budget.memory_bytes >= 5 * found.largest_memory_min
        assert budget.table_elements >= 2 * found.largest_table_min


@pytest.mark.parametrize("accounting", ["false", "true"])
def test_hostile_growth_in_a_daemon_stays_within_the_budgets(tmp_path: Path, accounting: str) -> None:
    limits = f"limits = {{ max_memory_bytes = {CAP} }}"
    config = tmp_path / "wasmhost.toml"
    text = config_text(tmp_path / "state", component("t/echo/0", "echo")
                       + component("t/tables/0", "tablehog", limits)
                       + component("t/memories/0", "memhogs", limits))
    config.write_text(text.replace("[host]\n", f"[host]\nmemory_accounting = {accounting}\n", 1))
    d = Daemon(tmp_path, config)
    try:
        d.expect("READY=1")
        assert d.call("t/echo/0", "before") == "before"
        before = rss(d.proc.pid)
        assert int(d.call("t/tables/0", str(4 * CAP // TABLE_ELEMENT_BYTES))) * TABLE_ELEMENT_BYTES <= CAP
        assert d.call("t/echo/0", "between") == "between"
        assert (int(d.call("t/memories/0", "grow")) + 1) * PAGE_BYTES <= CAP
        assert d.call("t/echo/0", "after") == "after"
        assert rss(d.proc.pid) - before <= 2 * (CAP + OVERHEAD)
        rows = {r["id"]: r for r in request(d.socket, protocol.Status()).data["components"]}
        assert all(rows[cid]["restarts"] == 0 for cid in rows)
    finally:
        assert d.stop() == 0


def test_check_reports_a_budget_too_small_for_a_component(tmp_path: Path) -> None:
    config = tmp_path / "wasmhost.toml"
    config.write_text(config_text(tmp_path / "state", component("t/echo/0", "echo")
                                  + component("t/memories/0", "memhogs", "limits = { max_memory_bytes = 300000 }")))
    result = wasmhost("check", str(config))
    assert result.returncode == 1
    assert "t/memories/0" in result.stderr and "needs at least 327680" in result.stderr
    assert "t/echo/0" not in result.stderr
