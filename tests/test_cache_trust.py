"""The compilation cache runs only what this user wrote, intact: deserializing an entry maps it as
native code and its key is predictable, so a cache or state directory, entry, load note or mark another
local user owns (or could have written) is refused, and the configured component's own code runs; an
entry whose code was damaged on disk is recompiled, not run."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from wasmtime import component as wc

from tests.conftest import fixture_path
from tests.test_daemon import Daemon, component, config_text, launch, wasmhost
from tests.test_runtime_calls import message
from wasmhost.core import ComponentConfig, ComponentId
from wasmhost.runtime.runtime import Runtime

OTHER_UID = 65534  # nobody
CID = ComponentId.parse("t/echo/0")

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="giving files to another user takes root")


def plant(cache: Path, victim: Path, payload: Path) -> Path:
    """What another local user does: put the compiled form of `payload` under the (predictable) cache
    key of `victim`, the binary the operator configured; returns the planted entry."""
    probe = Runtime()
    try:
        key = probe.cache.key(victim.read_bytes())
        evil = bytes(wc.Component(probe.engine.engine, payload.read_bytes()).serialize())
    finally:
        probe.close()
    cache.mkdir(parents=True, exist_ok=True)
    entry = cache / f"{key}.cwasm"
    entry.write_bytes(evil)
    return entry


def echo_answer(cache: Path) -> tuple[bytes | None, list[dict[str, object]]]:
    """Load the echo fixture with `cache` as the cache directory and send it `hello`: its answer, and the log."""
    with structlog.testing.capture_logs() as logs:
        runtime = Runtime(cache_dir=cache)
        try:
            manager = runtime.store(runtime.load(CID, fixture_path("echo")), CID)
            manager.instantiate()
            manager.initialize(ComponentConfig())
            answer = manager.handle_message(message(b"hello"))
            manager.close()
        finally:
            runtime.close()
    return answer, logs


@as_root
def test_a_cache_directory_owned_by_another_user_is_not_used(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    planted = plant(cache, fixture_path("echo"), fixture_path("counter"))  # counter would answer b"1"
    for path in (cache, planted):
        os.chown(path, OTHER_UID, OTHER_UID)
    answer, logs = echo_answer(cache)
    assert answer == b"hello", "the configured echo must run, not the other user's counter"
    refused = [e for e in logs if e["event"] == "cache_directory_refused"]
    assert refused and refused[0]["directory"] == str(cache) and refused[0]["expected"] == "uid 0"
    assert f"uid {OTHER_UID}" in str(refused[0]["found"])
    assert [e["cache"] for e in logs if e["event"] == "compile_finished"] == ["miss"]  # compiles still work
    assert os.stat(cache).st_uid == OTHER_UID and planted.exists()  # not touched: not ours to change


@as_root
@pytest.mark.parametrize("loose", ["owner", "mode"])
def test_cache_files_another_user_owns_or_can_write_are_refused_and_remade(tmp_path: Path, loose: str) -> None:
    cache = tmp_path / "cache"
    assert echo_answer(cache)[0] == b"hello"  # the entry, load note and marks, made by us
    own = {p.name for p in cache.iterdir()}
    plant(cache, fixture_path("echo"), fixture_path("counter"))  # the entry replaced, as another user would
    for path in cache.iterdir():
        if loose == "owner":
            os.chown(path, OTHER_UID, OTHER_UID)
        else:
            path.chmod(0o666)
    answer, logs = echo_answer(cache)
    assert answer == b"hello", "the configured echo must run, not the counter planted in its entry"
    refused = {Path(str(e["path"])).name for e in logs if e["event"] == "cache_entry_refused"}
    assert refused == own, "the entry, the load note and every mark are refused"
    assert [e["cache"] for e in logs if e["event"] == "compile_finished"] == ["miss"]
    for path in cache.iterdir():  # made again, ours and owner-only
        assert (os.stat(path).st_uid, os.stat(path).st_mode & 0o777) == (0, 0o600), path


@pytest.fixture
def foreign_state(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A state_dir another user made first (as in /tmp), and a config naming it."""
    state = tmp_path / "state"
    state.mkdir(mode=0o777)
    os.chown(state, OTHER_UID, OTHER_UID)
    config = tmp_path / "wasmhost.toml"
    config.write_text(config_text(state, component("t/echo/0", "echo")))
    yield state, config


@as_root
def test_run_refuses_a_state_dir_owned_by_another_user(tmp_path: Path, foreign_state: tuple[Path, Path],
                                                       started: list[Daemon]) -> None:
    state, config = foreign_state
    d = Daemon(tmp_path, config)
    started.append(d)  # killed at the end if it did start
    assert d.proc.wait(timeout=30) == 1
    output = d.log.read_text()
    assert f"wasmhost: state_dir {state}: is owned by uid {OTHER_UID}, expected one owned by uid 0" in output
    events = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert any(e["event"] == "state_dir_refused" and e["path"] == str(state) for e in events)
    assert list(state.iterdir()) == [], "no storage, socket, lock or cache made where that user can reach them"


@as_root
def test_check_refuses_a_state_dir_owned_by_another_user(foreign_state: tuple[Path, Path]) -> None:
    state, config = foreign_state
    result = wasmhost("check", str(config))
    assert result.returncode == 1
    assert f"state_dir {state}: is owned by uid {OTHER_UID}, expected one owned by uid 0" in result.stderr
    assert list(state.iterdir()) == []


def zero_the_code(entry: Path) -> None:
    """Overwrite the machine code (the ELF `.text` section) of a cache entry with zeros, as a power cut
    after an unsynced write can leave it: same length, headers and engine metadata intact."""
    data = bytearray(entry.read_bytes())
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names = sections[shstrndx][4]
    for name, _, _, _, offset, size in sections:
        if data[names + name: data.index(b"\0", names + name)] == b".text":
            data[offset: offset + size] = bytes(size)
            entry.write_bytes(bytes(data))
            return
    raise AssertionError(f"{entry}: no .text section")


def test_an_entry_with_damaged_code_is_recompiled_not_run(tmp_path: Path, started: list[Daemon]) -> None:
    echo = component("t/echo/0", "echo")
    assert launch(tmp_path, echo, started).stop() == 0  # compiles echo into state/cache
    (entry,) = (tmp_path / "state" / "cache").glob("*.cwasm")
    zero_the_code(entry)
    damaged = entry.read_bytes()
    (tmp_path / "notify.sock").unlink()  # the first daemon's; the second binds its own
    d = launch(tmp_path, echo, started)
    assert d.call("t/echo/0", "hello") == "hello", "the daemon must answer, not crash on the damaged code"
    assert d.stop() == 0
    unusable = [e for e in d.events() if e["event"] == "cache_entry_unusable"]
    assert unusable and unusable[0]["path"] == str(entry) and "sha256" in str(unusable[0]["error"])
    assert [e["cache"] for e in d.events() if e["event"] == "compile_finished"] == ["miss"]
    assert entry.read_bytes() != damaged, "the entry is written again, from the new compilation"
