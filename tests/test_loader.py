"""Loading: every way a file can be wrong is its own clear error, and compiled code is cached."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import structlog
import wasmtime

from tests.conftest import fixture_path
from tests.fixtures.build import tool
from tests.test_daemon import component, config_text, wasmhost
from wasmhost.core import ComponentId
from wasmhost.core.errors import (
    CompileError,
    CoreModuleError,
    FootprintError,
    InstantiationError,
    LoadError,
    MissingExportsError,
    NotWasmError,
    UnsatisfiedImportsError,
)
from wasmhost.core.limits import ResourceLimits
from wasmhost.runtime.footprint import MAX_ENTRIES, MAX_SECTIONS, TooManyParts, UnreadableBinary, footprint
from wasmhost.runtime.loader import LoadedComponent
from wasmhost.runtime.runtime import Runtime

CID = ComponentId.parse("test-org/thing/0")


def test_garbage_bytes_are_not_wasm(runtime: Runtime) -> None:
    with pytest.raises(NotWasmError, match="not a WebAssembly binary") as info:
        runtime.load(CID, fixture_path("garbage"))
    assert str(fixture_path("garbage")) in str(info.value)


def test_a_core_module_is_rejected_with_how_to_make_a_component(runtime: Runtime) -> None:
    with pytest.raises(CoreModuleError) as info:
        runtime.load(CID, fixture_path("core"))
    assert "core WebAssembly module, not a component" in str(info.value)
    assert "wasm-tools component new" in str(info.value)


def test_a_truncated_component_fails_to_compile(runtime: Runtime, tmp_path: Path) -> None:
    whole = fixture_path("echo").read_bytes()
    broken = tmp_path / "truncated.wasm"
    broken.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CompileError, match="invalid component") as info:
        runtime.load(CID, broken)
    assert str(broken) in str(info.value)


def test_missing_lifecycle_functions_are_listed(runtime: Runtime) -> None:
    with pytest.raises(MissingExportsError) as info:
        runtime.load(CID, fixture_path("missing-exports"))
    assert sorted(info.value.missing) == ["handle-callback", "health", "shutdown"]
    assert "missing handle-callback, health, shutdown" in str(info.value)


def test_a_wrong_signature_is_shown_next_to_the_expected_one(runtime: Runtime) -> None:
    with pytest.raises(MissingExportsError) as info:
        runtime.load(CID, fixture_path("bad-signature"))
    text = str(info.value)
    assert "wrong signature: handle-message: expected (msg: record {sender:" in text
    assert "got (msg: string) -> string" in text


def test_imports_the_host_cannot_satisfy_are_named(runtime: Runtime) -> None:
    with pytest.raises(UnsatisfiedImportsError) as info:
        runtime.load(CID, fixture_path("bad-import"))
    assert info.value.imports == ["example:missing/thing@1.0.0 (not provided by this host)"]


def test_a_missing_file_says_so(runtime: Runtime, tmp_path: Path) -> None:
    with pytest.raises(LoadError, match="no such file"):
        runtime.load(CID, tmp_path / "absent.wasm")


def test_a_component_file_too_large_or_not_a_file_is_refused_without_reading_it(runtime: Runtime,
                                                                                 tmp_path: Path) -> None:
    """Whoever may write a component's file: 1.5 GB of holes after a valid component (free on disk) held a
    reload for minutes at 3.2 GB, and a FIFO put in its place made the load wait for a writer forever."""
    huge = tmp_path / "huge.wasm"
    with huge.open("wb") as f:
        f.write(b"not wasm")  # never looked at: the size says no first
        f.truncate(128 * 1024 * 1024 + 1)
    with pytest.raises(LoadError) as info:
        runtime.load(CID, huge)
    assert str(info.value) == f"{huge}: larger than 134217728 bytes (128 MiB), the largest component file loaded"
    fifo = tmp_path / "fifo.wasm"
    os.mkfifo(fifo)
    with pytest.raises(LoadError) as info:
        runtime.load(CID, fifo)
    assert str(info.value) == f"{fifo}: is not a regular file, expected a .wasm file"
    with pytest.raises(LoadError) as info:
        runtime.load(CID, tmp_path)
    assert str(info.value) == f"{tmp_path}: is a directory, expected a .wasm file"


def test_thousands_of_unsatisfied_imports_make_a_bounded_error(runtime: Runtime, tmp_path: Path) -> None:
    """The echo component, also importing 3,000 WASI-like interfaces with 200-character names: the error named
    them all (740 KB, in every status answer, log line and reload report of it)."""
    printed = subprocess.run([tool("wasm-tools", "wasm-tools"), "print", str(fixture_path("echo"))],
                             capture_output=True, text=True, check=True).stdout.rstrip()
    imports = "".join(f'(import "wasi:{"x" * 200}{i}/y@0.1.0" (instance))' for i in range(3000))
    path = tmp_path / "many.wasm"
    path.write_bytes(wasmtime.wat2wasm(printed[:-1] + imports + ")"))  # appended: no index moves
    with pytest.raises(UnsatisfiedImportsError) as info:
        runtime.load(CID, path)
    assert len(info.value.imports) == 3000 and len(str(info.value)) < 8000
    assert "; and 2984 more. " in str(info.value) and f"wasi:{'x' * 200}0/y@0.1.0" in str(info.value)


def test_the_loader_resolves_the_namespace_name_instance_layout(tmp_path: Path) -> None:
    target = tmp_path / "test-org" / "echo" / "0.1.0.wasm"
    target.parent.mkdir(parents=True)
    target.write_bytes(fixture_path("echo").read_bytes())
    runtime = Runtime(components_dir=tmp_path)
    try:
        loaded = runtime.load(ComponentId.parse("test-org/echo/0.1.0"))
        assert loaded.source == str(target)
    finally:
        runtime.close()


def test_minimum_memory_above_the_cap_is_a_clear_instantiation_error(runtime: Runtime) -> None:
    loaded = runtime.load(CID, fixture_path("echo"))
    manager = runtime.store(loaded, CID, ResourceLimits(max_memory_bytes=1024))
    with pytest.raises(InstantiationError, match=r"max_memory_bytes = 1024 is too small.*needs at least 196608"):
        manager.instantiate()


def test_a_second_load_comes_from_the_compilation_cache(tmp_path: Path) -> None:
    first = Runtime(cache_dir=tmp_path)
    try:
        first.load(CID, fixture_path("echo"))
        assert (first.cache.misses, first.cache.hits) == (1, 0)
    finally:
        first.close()
    second = Runtime(cache_dir=tmp_path)  # a new process would look the same: nothing in memory
    try:
        second.load(CID, fixture_path("echo"))
        assert (second.cache.misses, second.cache.hits) == (0, 1)
    finally:
        second.close()


def test_a_corrupt_cache_entry_is_recompiled_not_fatal(tmp_path: Path) -> None:
    wasm = fixture_path("echo").read_bytes()
    first = Runtime(cache_dir=tmp_path)
    try:
        first.load(CID, fixture_path("echo"))
        entry = first.cache.entry_path(wasm)
    finally:
        first.close()
    assert entry is not None and entry.exists()
    entry.write_bytes(b"not a compiled component")
    second = Runtime(cache_dir=tmp_path)
    try:
        with structlog.testing.capture_logs() as logs:
            loaded = second.load(CID, fixture_path("echo"))
        assert loaded.exports["handle-message"].name == "handle-message"
        assert second.cache.misses == 1
        assert any(e["event"] == "cache_entry_unusable" for e in logs)
    finally:
        second.close()


def test_a_resource_in_a_lifecycle_signature_is_refused_naming_the_export(runtime: Runtime) -> None:
    # A signature may hold any type; one the codec cannot move is still described, so the component
    # is refused like any other wrong signature, not with a bare conversion error naming nothing.
    with pytest.raises(MissingExportsError) as info:
        runtime.load(CID, fixture_path("unhosted"))
    text = str(info.value)
    assert text.startswith(f"{fixture_path('unhosted')}: ")
    assert ("wrong signature: health: expected () -> enum {healthy, degraded, unhealthy, unknown}, "
            "got (of: borrow<resource>) -> enum {healthy, degraded, unhealthy, unknown}") in text


def test_check_names_a_component_using_resources_and_still_checks_the_others(tmp_path: Path) -> None:
    config = tmp_path / "wasmhost.toml"
    config.write_text(config_text(tmp_path / "state", component("t/unhosted/0", "unhosted")
                                  + component("t/bad/0", "bad-signature") + component("t/echo/0", "echo")))
    result = wasmhost("check", "--config", str(config))
    assert result.returncode == 1
    assert "2 component(s) cannot be loaded" in result.stderr
    unhosted = next(line for line in result.stderr.splitlines() if "t/unhosted/0:" in line)
    assert str(fixture_path("unhosted")) in unhosted and "health: expected ()" in unhosted
    assert any("t/bad/0:" in line and "handle-message" in line for line in result.stderr.splitlines())


def test_wrong_exports_and_imports_the_host_cannot_satisfy_are_named_together(runtime: Runtime) -> None:
    # One `check` names everything to fix: the imports are judged even when the exports are wrong.
    with pytest.raises(MissingExportsError) as info:
        runtime.load(CID, fixture_path("unhosted"))
    text = str(info.value)
    assert "wrong signature: health: expected ()" in text
    assert ("and it imports the host cannot satisfy: airssys:core/storage@1.0.0#delete (expected (key: string) -> "
            "result<_, variant {") in text
    assert "got (key: borrow<resource>) -> result<_, variant {" in text
    assert info.value.missing == [text.split("wrong signature: ", 1)[1].split("; and it", 1)[0]]


def test_an_async_export_is_refused_at_load_with_what_to_do(runtime: Runtime) -> None:
    # Component-model async is off in the engine: an `async func` export ran, but every call left
    # wasmtime state behind outside max_memory_bytes (measured 110 bytes a call; 1 KiB a call for a
    # task left yielding in the background, up to the Store's handle limit).
    with pytest.raises(CompileError, match="requires the component model async feature") as info:
        runtime.load(CID, fixture_path("asyncecho"))
    assert "build the component without component-model async" in str(info.value)


def test_a_long_wrong_signature_says_where_it_differs(runtime: Runtime) -> None:
    # Two fields swapped deep inside component-message: otherwise two 600-character lines to compare.
    with pytest.raises(MissingExportsError) as info:
        runtime.load(CID, fixture_path("swapped"))
    text = str(info.value)
    assert text.count("they differ at: expected `... string}>, timestamp: record {seconds: u64, nanoseconds: u32}, "
                      "content...`, got `... string}>, timestamp: record {nanoseconds: u32, seconds: u64}, "
                      "content...`") == 2  # handle-message and handle-callback
    assert "health" not in text


def leb(value: int) -> bytes:
    """`value` as unsigned LEB128."""
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def section(section_id: int, body: bytes) -> bytes:
    return bytes([section_id]) + leb(len(body)) + body


EMPTY_CUSTOM = section(0, leb(0))
"""The smallest valid custom section (3 bytes: id, size 1, an empty name)."""


def in_a_core_module(padding: bytes) -> bytes:
    """A core module section (never instantiated: it changes no count) whose module ends with `padding`."""
    return section(1, b"\0asm\x01\x00\x00\x00" + padding)


def load_fresh(wasm: bytes, tmp_path: Path, name: str) -> tuple[Runtime, LoadedComponent | LoadError]:
    """Load `wasm` from a file in a Runtime of its own: that Runtime (closed; its cache counts what was compiled)
    and what it loaded, or the error."""
    path = tmp_path / f"{name}.wasm"
    path.write_bytes(wasm)
    fresh = Runtime(cache_dir=tmp_path / "cache")
    try:
        return fresh, fresh.load(CID, path)
    except LoadError as exc:
        return fresh, exc
    finally:
        fresh.close()


@pytest.mark.parametrize("where", ["after the component", "inside a nested core module"])
def test_zeros_appended_to_a_component_are_refused_where_they_start(tmp_path: Path, where: str) -> None:
    """Whoever can write a component's file appended zeros up to the 128 MiB limit: the reader took each
    pair of zeros for an empty custom section, 0.35 s per MiB (45 s holding the reload) before wasmtime said
    "unexpected end-of-file". A custom section must hold its name: the first zero is refused, uncompiled."""
    echo = fixture_path("echo").read_bytes()
    zeros = bytes(1024 * 1024)
    wasm = echo + (zeros if where == "after the component" else in_a_core_module(zeros))
    fresh, loaded = load_fresh(wasm, tmp_path, "zeros")
    assert isinstance(loaded, CompileError)
    at = len(echo) + (0 if where == "after the component" else 4 + 8)  # after the section's id, size and header
    assert str(loaded).startswith(f"{tmp_path / 'zeros.wasm'}: invalid component: the custom section at offset {at} "
                                  "(0 bytes) cannot hold its name")
    assert "nothing of it was compiled" in str(loaded) and fresh.cache.misses == 0


@pytest.mark.parametrize("where", ["after the component", "inside a nested core module"])
def test_a_run_of_tiny_custom_sections_is_counted_up_to_a_limit_then_refused(tmp_path: Path, where: str) -> None:
    """128 MiB of valid 3-byte custom sections (44 million; wasmtime compiles them) took the reader 45 s.
    Up to MAX_SECTIONS they are counted, and count nothing; past it the component is refused uncompiled."""
    echo = fixture_path("echo").read_bytes()

    def padded(sections: int) -> bytes:
        padding = EMPTY_CUSTOM * sections
        return echo + (padding if where == "after the component" else in_a_core_module(padding))

    assert footprint(padded(1000)) == footprint(echo)
    fresh, loaded = load_fresh(padded(1000), tmp_path, "fine")
    assert isinstance(loaded, LoadedComponent) and loaded.footprint == footprint(echo)
    fresh, refused = load_fresh(padded(MAX_SECTIONS), tmp_path, "tiny")
    assert isinstance(refused, FootprintError)
    assert f"cannot count the instances, memories and tables it creates, so nothing of it was compiled: more " \
           f"than {MAX_SECTIONS} sections" in str(refused)
    assert fresh.cache.misses == 0


def test_one_huge_custom_section_is_skipped_by_its_size(tmp_path: Path) -> None:
    echo = fixture_path("echo").read_bytes()
    wasm = echo + section(0, leb(3) + b"pad" + bytes(8 * 1024 * 1024))
    _, loaded = load_fresh(wasm, tmp_path, "huge")
    assert isinstance(loaded, LoadedComponent) and loaded.footprint == footprint(echo)


def test_a_section_longer_than_the_file_is_refused_naming_its_offset() -> None:
    echo = fixture_path("echo").read_bytes()
    with pytest.raises(UnreadableBinary, match=f"^section 0 at offset {len(echo)} declares 1000 bytes, but only 4 "):
        footprint(echo + b"\x00" + leb(1000) + b"\x03pad")


def test_vectors_are_bounded_before_their_entries_are_read() -> None:
    """A section of 25 million aliases (119 MiB) was read entry by entry, about 20 s; a count no section could hold was
    believed until the bytes ran out."""
    echo = fixture_path("echo").read_bytes()
    alias = b"\x00\x00\x01\x00\x00"  # a core function: the export "" of core instance 0

    def aliases(count: int, entries: int) -> bytes:
        return echo + section(6, leb(count) + alias * entries)

    assert footprint(aliases(1000, 1000)) == footprint(echo)
    with pytest.raises(TooManyParts, match=f"^more than {MAX_ENTRIES} entries in its sections "):
        footprint(aliases(MAX_ENTRIES + 1, MAX_ENTRIES + 1))
    with pytest.raises(UnreadableBinary, match=f"^a vector of {2**32} entries at offset {len(echo) + 2} cannot fit "
                                               "in the 5 bytes left of its section$"):
        footprint(aliases(2**32, 1))
