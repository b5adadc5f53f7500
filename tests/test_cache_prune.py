"""The compilation cache on disk is bounded: what the running configuration uses stays, any other entry
(a removed component, an older version, another wasmtime or engine setting) goes once unused for a week
or beyond a size cap, oldest first; an entry being loaded stays, and nothing the cache did not write is
touched."""

from __future__ import annotations

import hashlib
import os
import time
import tracemalloc
from pathlib import Path

import pytest
import structlog

from tests.conftest import fixture_path
from tests.test_daemon import Daemon, component, config_text, launch
from wasmhost.core import ComponentId
from wasmhost.runtime import cache as cache_module
from wasmhost.runtime import contract
from wasmhost.runtime.runtime import Runtime

WEEK_AND_A_DAY = cache_module.PRUNE_UNUSED_AFTER_S + 86400


def age(directory: Path, seconds: float) -> None:
    """Make every file in `directory` look last written `seconds` ago (not following links)."""
    then = time.time() - seconds
    for path in directory.iterdir():
        os.utime(path, (then, then), follow_symlinks=False)


def files_of(directory: Path, key: str) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(key))


def loaded_into(cache_dir: Path, *names: str) -> dict[str, str]:
    """Load the fixtures `names` with `cache_dir` as the cache (entry, load note and marks written): their keys."""
    runtime = Runtime(cache_dir=cache_dir)
    try:
        for name in names:
            runtime.load(ComponentId.parse(f"t/{name}/0"), fixture_path(name))
        return {name: runtime.cache.key(fixture_path(name).read_bytes()) for name in names}
    finally:
        runtime.close()


def test_entries_nothing_uses_go_after_a_week_with_their_notes_and_marks(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    keys = loaded_into(cache, "echo", "counter")
    assert len(files_of(cache, keys["counter"])) >= 3, "an entry, its load note and its marks"
    outside = tmp_path / "outside.cwasm"
    outside.write_bytes(b"not the cache's")
    (cache / f"{'0' * 64}.cwasm").symlink_to(outside)  # named like an entry: a link, never followed nor removed
    (cache / "README").write_text("an operator's note")
    (cache / f"{'1' * 64}.cwasm").write_bytes(b"group-writable")
    os.chmod(cache / f"{'1' * 64}.cwasm", 0o664)  # not a file only we could have written: left alone
    (cache / "tmpabcd1234.tmp").write_bytes(b"left by a write a crash cut short")
    age(cache, WEEK_AND_A_DAY)
    others = {"README", f"{'0' * 64}.cwasm", f"{'1' * 64}.cwasm"}

    runtime = Runtime(cache_dir=cache)
    try:
        assert runtime.cache.prune({keys["echo"]}, now=time.time() - WEEK_AND_A_DAY + 1800) == (0, 0), \
            "nothing is a week old yet"
        with structlog.testing.capture_logs() as logs:
            removed, freed = runtime.cache.prune({keys["echo"]})
        assert files_of(cache, keys["counter"]) == []
        assert {p.name for p in cache.iterdir()} - set(files_of(cache, keys["echo"])) == others
        assert outside.read_bytes() == b"not the cache's"
        assert removed >= 4 and freed > 0
        assert [(e["event"], e["removed"], e["bytes"]) for e in logs] == [("cache_pruned", removed, freed)]
        assert time.time() - (cache / f"{keys['echo']}.cwasm").stat().st_mtime < 60, "the entry in use is marked used"

        with structlog.testing.capture_logs() as logs:
            runtime.load(ComponentId.parse("t/echo/0"), fixture_path("echo"))
            runtime.load(ComponentId.parse("t/counter/0"), fixture_path("counter"))
        assert [e["cache"] for e in logs if e["event"] == "compile_finished"] == ["hit", "miss"]
    finally:
        runtime.close()


def test_unused_entries_over_the_size_cap_go_oldest_first_but_not_those_just_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    keys = loaded_into(cache, "echo", "counter", "busy")
    sizes = {name: sum((cache / f).stat().st_size for f in files_of(cache, key)) for name, key in keys.items()}
    for name, hours in (("echo", 3), ("counter", 2), ("busy", 0)):  # busy: written just now
        then = time.time() - hours * 3600
        for f in files_of(cache, keys[name]):
            os.utime(cache / f, (then, then))
    monkeypatch.setattr(cache_module, "PRUNE_UNUSED_BYTES", sizes["busy"])  # room for one binary's files
    runtime = Runtime(cache_dir=cache)
    try:
        _, freed = runtime.cache.prune(set())
    finally:
        runtime.close()
    assert [name for name, key in keys.items() if files_of(cache, key)] == ["busy"]
    assert freed == sizes["echo"] + sizes["counter"]


def test_an_entry_being_loaded_is_not_pruned_under_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    keys = loaded_into(cache, "echo")
    age(cache, WEEK_AND_A_DAY)
    runtime = Runtime(cache_dir=cache)
    real = runtime.cache._from_disk
    pruned: list[tuple[int, int]] = []

    def prune_first(key: str) -> object:
        pruned.append(runtime.cache.prune(set()))  # as the daemon's prune thread may, while a start reads the entry
        return real(key)

    monkeypatch.setattr(runtime.cache, "_from_disk", prune_first)
    try:
        with structlog.testing.capture_logs() as logs:
            runtime.load(ComponentId.parse("t/echo/0"), fixture_path("echo"))
    finally:
        runtime.close()
    assert pruned == [(0, 0)]
    assert [e["cache"] for e in logs if e["event"] == "compile_finished"] == ["hit"]
    assert (cache / f"{keys['echo']}.cwasm").exists()


def test_the_daemon_prunes_at_start_and_keeps_what_a_reload_replaced(tmp_path: Path, started: list[Daemon]) -> None:
    echo, counter = component("t/echo/0", "echo"), component("t/counter/0", "counter")
    cache = tmp_path / "state" / "cache"
    assert launch(tmp_path, echo + counter, started).stop() == 0
    (tmp_path / "notify.sock").unlink()  # each daemon binds its own
    keys = loaded_into(tmp_path / "probe", "echo", "counter")
    (cache / "README").write_text("an operator's note")
    age(cache, WEEK_AND_A_DAY)

    d = launch(tmp_path, echo, started)  # counter was removed from the configuration
    assert d.call("t/echo/0", "hello") == "hello"
    d.config.write_text(config_text(tmp_path / "state", counter))  # echo replaced by counter
    assert d.cli("reload").returncode == 0
    d.expect("READY=1")
    assert d.stop() == 0
    pruned = [e for e in d.events() if e["event"] == "cache_pruned"]
    assert len(pruned) == 1 and pruned[0]["removed"] == len(files_of(tmp_path / "probe", keys["counter"])), pruned
    assert [e["cache"] for e in d.events() if e["event"] == "compile_finished"] == ["hit", "miss"]
    assert files_of(cache, keys["echo"]), "what the reload replaced stays, for a week from now"
    assert (cache / "README").exists()

    (tmp_path / "notify.sock").unlink()
    d = launch(tmp_path, echo, started)  # rolled back to echo: still read from the cache
    assert d.stop() == 0
    assert [e["cache"] for e in d.events() if e["event"] == "compile_finished"] == ["hit"]


def test_an_entry_removed_between_its_check_and_its_mapping_is_still_read(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process sharing the directory (a daemon's prune, `wasmhost check`) may remove an entry while
    this one loads it: the file checked is the file mapped, not whatever the name leads to afterwards."""
    cache = tmp_path / "cache"
    keys = loaded_into(cache, "echo")
    checked = cache_module._intact

    def checked_then_removed(fd: int) -> bool:
        intact = checked(fd)
        (cache / f"{keys['echo']}.cwasm").unlink()
        return intact

    monkeypatch.setattr(cache_module, "_intact", checked_then_removed)
    runtime = Runtime(cache_dir=cache)
    try:
        with structlog.testing.capture_logs() as logs:
            runtime.load(ComponentId.parse("t/echo/0"), fixture_path("echo"))
    finally:
        runtime.close()
    assert [e["event"] for e in logs if e["event"].startswith("cache_")] == []
    assert [e["cache"] for e in logs if e["event"] == "compile_finished"] == ["hit"]


def test_a_prune_keeps_little_of_each_version_on_disk_while_it_runs(tmp_path: Path) -> None:
    """The daemon prunes after every reload, and every version deployed within a week is still on disk (four
    files each: entry, load note, two marks). The prune kept an os.stat_result, a name and a dict per file while
    it ran: 3.3 KB per version at its peak, and the daemon's resident memory kept each new peak (Python's
    allocator hands an arena back only when all of it is free): +4 KB per version deployed, reload after
    reload (56 -> 63 MB over 800 versions)."""
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    versions = 1000
    for n in range(versions):
        key = hashlib.sha256(b"version %d" % n).hexdigest()
        for kind, size in (("cwasm", 30000), ("load-3", 90), ("8825c7994b90012b.ok", 0),
                           ("linked-61f3e878ae7a0c8f-plain.ok", 0)):
            fd = os.open(cache / f"{key}.{kind}", os.O_CREAT | os.O_WRONLY, 0o600)
            os.ftruncate(fd, size)
            os.close(fd)
    runtime = Runtime(cache_dir=cache)
    try:
        tracemalloc.start()
        try:
            assert runtime.cache.prune(set()) == (0, 0), "all of them were used just now"
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    finally:
        runtime.close()
    assert peak / versions < 1024, f"{peak / versions:.0f} bytes per version on disk"


def test_a_version_let_go_keeps_no_marks_or_notes_in_memory_and_loads_again(tmp_path: Path) -> None:
    """The cache kept in memory the marks and load note of every binary it ever loaded: 3 entries per new
    version of a component, reload after reload (400 versions deployed: 802 marks and 401 notes for the 2
    binaries running), and after the first fix still until a prune removed their files, a week later (~0.8 KB
    per version deployed that week). A reload letting a version go (keep_only) drops them now: they are on
    disk, where a later load reads them or checks it again, and still finds its compiled entry; once a prune
    has removed its files, a load compiles it anew."""
    cache = tmp_path / "cache"
    runtime = Runtime(cache_dir=cache)
    try:
        keys = {}
        for name in ("echo", "counter"):
            runtime.load(ComponentId.parse(f"t/{name}/0"), fixture_path(name))
            keys[name] = runtime.cache.key(fixture_path(name).read_bytes())
        assert runtime.cache.remembered_keys() == set(keys.values())
        runtime.cache.keep_only({keys["echo"]})  # as a reload that replaced counter does
        assert runtime.cache.remembered_keys() == {keys["echo"]}
        assert len(files_of(cache, keys["counter"])) >= 3, "its entry, note and marks stay on disk"
        with structlog.testing.capture_logs() as logs:  # rolled back to it by a later reload
            loaded = runtime.load(ComponentId.parse("t/counter/0"), fixture_path("counter"))
        assert [e["cache"] for e in logs if e["event"] == "compile_finished"] == ["hit"]
        assert loaded.digest == keys["counter"] and set(loaded.exports) == set(contract.LIFECYCLE_EXPORTS)
        assert runtime.cache.remembered_keys() == set(keys.values())
        runtime.cache.keep_only({keys["echo"]})  # replaced again, then unused for more than a week
        removed, _ = runtime.cache.prune({keys["echo"]}, now=time.time() + WEEK_AND_A_DAY)
        assert removed >= 3 and files_of(cache, keys["counter"]) == []
        assert runtime.cache.remembered_keys() == {keys["echo"]}
        with structlog.testing.capture_logs() as logs:  # loaded again: compiled, checked and noted anew
            runtime.load(ComponentId.parse("t/counter/1"), fixture_path("counter"))
        assert [e["cache"] for e in logs if e["event"] == "compile_finished"] == ["miss"]
        assert runtime.cache.remembered_keys() == set(keys.values())
    finally:
        runtime.close()
