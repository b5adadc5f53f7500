"""Start-up at scale: many components of one binary share one load per deployment pass, each still held to
its own memory limit; a reload reads the binaries again; the heap a deployment built is frozen for the
cyclic collector and thawed by a reload that removes components. Real daemons, real binaries, real gc."""

from __future__ import annotations

import gc
import shutil
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import FIXTURES
from tests.test_daemon import Daemon, component
from tests.test_reload import reload_reported, rewrite, rows, start
from wasmhost.system import heap
from wasmhost.system.heap import FREEZE_EVERY, DeploymentHeap, collect_all, frozen_after_slow_collections

MANY = 24


@pytest.fixture
def components(tmp_path: Path) -> Path:
    """A components directory holding one binary the tests may overwrite."""
    folder = tmp_path / "components"
    folder.mkdir()
    shutil.copy(FIXTURES / "echo.wasm", folder / "shared.wasm")
    return folder


def many(count: int, extra: str = "") -> str:
    return "".join(component(f"t/many/{i}", "shared", extra) for i in range(count))


def test_components_of_one_binary_share_its_load_and_keep_their_own_memory_limit(
        tmp_path: Path, components: Path, started: list[Daemon]) -> None:
    tight = component("t/tight/0", "shared", "limits = { max_memory_bytes = 4096 }")
    d = start(tmp_path, components, started, many(MANY) + tight)
    status = rows(d)
    assert [r["state"] for i, r in sorted(status.items()) if i.startswith("t/many/")] == ["running"] * MANY
    assert status["t/tight/0"]["state"] == "failed"
    assert "max_memory_bytes" in str(status["t/tight/0"]["last_error"]), status["t/tight/0"]
    assert d.call(f"t/many/{MANY - 1}", "hello") == "hello"
    compiles = [e for e in d.events() if e["event"] == "compile_started"]
    assert len(compiles) == 1, compiles  # one binary: one load, not one per component
    assert d.stop() == 0


def test_a_reload_loads_again_a_binary_changed_under_the_same_path(
        tmp_path: Path, components: Path, started: list[Daemon]) -> None:
    quick = "rollout_check_s = 0"  # the new versions are not watched for 3 s: what is loaded is the point here
    d = start(tmp_path, components, started, many(MANY, quick))
    assert d.call("t/many/3", "x") == "x"  # echo
    shutil.copy(FIXTURES / "counter.wasm", components / "shared.wasm")
    rewrite(d, tmp_path, components, many(MANY, quick))
    code, output = reload_reported(d)
    assert code == "0", output
    assert [d.call(f"t/many/{i}", "") for i in (0, MANY - 1)] == ["1", "1"]  # counters now, every one
    assert d.stop() == 0


class _Cycle:
    """An object that only the cyclic collector can free (it refers to itself)."""

    def __init__(self) -> None:
        self.me = self


@pytest.fixture
def thawed() -> Iterator[None]:
    yield
    gc.unfreeze()  # this test process must not keep what the tests froze


def test_a_deployment_freezes_what_it_built_and_collect_all_frees_frozen_cycles(thawed: None) -> None:
    heap = DeploymentHeap()
    kept = _Cycle()
    before = gc.get_freeze_count()
    for _ in range(FREEZE_EVERY - 1):
        heap.started()
    assert gc.get_freeze_count() == before  # not yet: freezing is batched
    heap.started()
    assert gc.get_freeze_count() > before
    dropped = weakref.ref(kept)
    del kept
    gc.collect()
    assert dropped() is not None  # frozen: a full collection leaves it alone (and does not scan it)
    collect_all()
    assert dropped() is None
    assert gc.get_freeze_count() == 0


def test_a_deployment_collects_young_cycles_before_freezing(thawed: None) -> None:
    young = weakref.ref(_Cycle())  # garbage already, unreachable but for its own cycle
    DeploymentHeap().freeze()
    assert young() is None  # collected, not frozen for good


def test_during_a_deployment_only_the_youngest_generation_is_collected(thawed: None) -> None:
    """Our own rule (the collector's thresholds), watched through the collector's callbacks."""
    before = gc.get_threshold()
    generations: list[int] = []

    def seen(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            generations.append(info["generation"])

    gc.callbacks.append(seen)
    try:
        with DeploymentHeap():
            with DeploymentHeap():  # a reload's pass beginning before the first one has ended
                built = [_Cycle() for _ in range(before[0] * before[1] * 3)]  # would reach generation 1 (and 2)
            assert gc.get_threshold()[1:] != before[1:]  # the outer pass is still under way
        assert gc.get_threshold() == before
        assert generations and set(generations) == {0}
        assert gc.get_freeze_count() >= len(built)  # what the passes built is frozen, not scanned again
    finally:
        gc.callbacks.remove(seen)


def test_while_the_daemon_runs_a_slow_full_collection_freezes_what_survived_it(
        thawed: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Our own rule, not the clock: every full collection counts as slow here."""
    monkeypatch.setattr(heap, "SLOW_COLLECTION_S", -1.0)
    with frozen_after_slow_collections():
        kept = _Cycle()
        garbage = weakref.ref(_Cycle())
        before = gc.get_freeze_count()
        gc.collect()
        assert garbage() is None  # collected first: garbage is never frozen
        assert gc.get_freeze_count() > before
        survivor = weakref.ref(kept)
        del kept
        gc.collect()
        assert survivor() is not None  # frozen: later full collections no longer scan it
    gc.unfreeze()
    after = _Cycle()
    gc.collect()
    assert gc.get_freeze_count() == 0  # outside the block, a full collection freezes nothing
    left = weakref.ref(after)
    del after
    gc.collect()
    assert left() is None and survivor() is None


def test_a_fast_full_collection_freezes_nothing(thawed: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Our own rule, not the clock: no full collection counts as slow here."""
    monkeypatch.setattr(heap, "SLOW_COLLECTION_S", float("inf"))
    with frozen_after_slow_collections():
        gc.collect()
    assert gc.get_freeze_count() == 0
