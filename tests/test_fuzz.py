"""Fuzzing (hypothesis): component bytes, configuration files and control frames.

A short bounded run is part of `make test`; `make fuzz` runs the same properties with many more
examples (HYPOTHESIS_PROFILE=fuzz). Each property counts what it tried in FUZZ_COUNTS, printed at
the end of the session.
"""

from __future__ import annotations

import asyncio
import os
import struct
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import FIXTURES, fixture_path
from wasmhost.core.errors import LoadError
from wasmhost.runtime.runtime import Runtime
from wasmhost.system import protocol
from wasmhost.system.config import ConfigError, parse_config
from wasmhost.system.control import ControlServer

settings.register_profile("test", max_examples=120, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("fuzz", max_examples=5000, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "test"))

FUZZ_COUNTS: Counter[str] = Counter()
WAT_FIXTURES = ["echo", "counter", "callback", "storage", "logger", "services", "trapper", "missing-exports",
                "bad-signature", "bad-import", "core"]


@pytest.fixture(scope="module")
def fuzz_runtime() -> Iterator[Runtime]:
    """A Runtime without a disk cache, so mutated binaries leave nothing behind."""
    runtime = Runtime()
    yield runtime
    runtime.close()


@st.composite
def mutated_fixture(draw: st.DrawFn) -> bytes:
    """A fixture truncated, bit-flipped, or with bytes spliced in."""
    wasm = bytearray(fixture_path(draw(st.sampled_from(WAT_FIXTURES))).read_bytes())
    how = draw(st.sampled_from(["truncate", "flip", "splice"]))
    if how == "truncate":
        return bytes(wasm[: draw(st.integers(0, len(wasm) - 1))])
    if how == "flip":
        for _ in range(draw(st.integers(1, 8))):
            position = draw(st.integers(0, len(wasm) - 1))
            wasm[position] ^= 1 << draw(st.integers(0, 7))
        return bytes(wasm)
    position = draw(st.integers(8, len(wasm)))
    return bytes(wasm[:position]) + draw(st.binary(min_size=1, max_size=64)) + bytes(wasm[position:])


def load_or_clear_error(runtime: Runtime, wasm: bytes, kind: str) -> None:
    """Loading ends in success or in one of our LoadError types, nothing else."""
    FUZZ_COUNTS[kind] += 1
    try:
        runtime.loader.load_bytes(wasm, f"fuzz {kind}")
    except LoadError as exc:
        assert str(exc).startswith(f"fuzz {kind}: ")
        FUZZ_COUNTS[f"{kind}: {type(exc).__name__}"] += 1


@given(st.binary(max_size=256) | st.binary(max_size=32).map(lambda tail: b"\0asm\x0d\x00\x01\x00" + tail))
def test_random_bytes_are_refused_clearly(fuzz_runtime: Runtime, wasm: bytes) -> None:
    load_or_clear_error(fuzz_runtime, wasm, "random bytes")


@given(mutated_fixture())
def test_mutated_fixtures_load_or_fail_clearly(fuzz_runtime: Runtime, wasm: bytes) -> None:
    load_or_clear_error(fuzz_runtime, wasm, "mutated fixture")


@pytest.mark.parametrize("depth", [50, 400])
def test_deeply_nested_types_fail_clearly(fuzz_runtime: Runtime, tmp_path: Path, depth: int) -> None:
    nested = "string"
    for _ in range(depth):
        nested = f"(list {nested})"
    wat = tmp_path / "nested.wat"
    wat.write_text(f"(component (type $t {nested}) (export \"t\" (type $t)))")
    wasm = tmp_path / "nested.wasm"
    built = subprocess.run([str(Path(sys.executable).parent / "wasm-tools"), "parse", str(wat), "-o", str(wasm)],
                           capture_output=True, text=True)
    data = wasm.read_bytes() if built.returncode == 0 else b"\0asm\x0d\x00\x01\x00" + b"\x07" * depth
    load_or_clear_error(fuzz_runtime, data, "nested types")


# --- configuration files ---

KEYS = ["id", "path", "limits", "env", "config_data", "config_file", "mailbox_capacity", "restart", "group",
        "strategy", "capabilities", "wasi", "max_restarts", "backoff_base_ms", "colour"]
PATHS = ["echo.wasm", "../echo.wasm", "/etc/passwd", "a\0b.wasm", "../../../../../../tmp/x.wasm", "", "./echo.wasm",
         "counter.wasm", "link.wasm"]
scalars = st.one_of(st.integers(-(2**70), 2**70), st.text(max_size=12), st.booleans(), st.sampled_from(PATHS),
                    st.floats(allow_nan=False, allow_infinity=False))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.sampled_from(["max_fuel", "max_memory_bytes", "send", "storage", "A"]), inner, max_size=3), max_leaves=6)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + "".join(c if c.isprintable() and c not in '"\\' else f"\\u{ord(c):04x}" for c in value) + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"


@given(st.lists(st.dictionaries(st.sampled_from(KEYS), values, max_size=6), max_size=4),
       st.text(max_size=40))
def test_mutated_configs_are_located_errors_or_stay_inside(tmp_path_factory: pytest.TempPathFactory,
                                                         tables: list[dict[str, Any]], junk: str) -> None:
    base = tmp_path_factory.mktemp("cfg")
    components = base / "components"
    components.mkdir()
    (components / "echo.wasm").write_bytes(fixture_path("echo").read_bytes())
    if not (components / "link.wasm").exists():
        os.symlink(FIXTURES / "counter.wasm", components / "link.wasm")  # points out of the directory
    text = f'[host]\ncomponents_dir = "{components}"\nstate_dir = "{base / "state"}"\n'
    for table in tables:
        text += "[[components]]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in table.items())
    for candidate in (text, text + junk):
        FUZZ_COUNTS["config"] += 1
        try:
            config = parse_config(candidate, base / "wasmhost.toml")
        except ConfigError as exc:
            assert exc.errors
            for error in exc.errors:
                assert error.startswith(("not valid TOML", "host.", "components", "components[")), error
            continue
        FUZZ_COUNTS["config accepted"] += 1
        for plan in config.components:
            assert plan.wasm_path.resolve().is_relative_to(components.resolve())


# --- control frames ---


async def _serve_and_attack(path: Path, frames: list[bytes]) -> list[bytes]:
    async def handler(request: protocol.Request) -> protocol.Response:
        return protocol.Response(True, data=type(request).__name__)

    server = ControlServer(path, 0o600, handler, frame_timeout=0.05, idle_timeout=1.0)
    await server.start()
    answers = []
    async with anyio.create_task_group() as group:
        await group.start(server.serve)
        try:
            for raw in frames:
                reader, writer = await asyncio.open_unix_connection(str(path))
                writer.write(raw)
                await writer.drain()
                answers.append(await asyncio.wait_for(reader.read(1 << 16), 5))
                writer.close()
            slow_reader, slow_writer = await asyncio.open_unix_connection(str(path))  # slow loris: half a frame
            slow_writer.write(struct.pack(">I", 100) + b"\x81")
            await slow_writer.drain()

            async def good() -> bytes:
                reader, writer = await asyncio.open_unix_connection(str(path))
                writer.write(protocol.frame(protocol.Status()))
                await writer.drain()
                data = await asyncio.wait_for(reader.read(1 << 16), 5)
                writer.close()
                return data

            answers += await asyncio.gather(*(good() for _ in range(100)))
            answers.append(await asyncio.wait_for(slow_reader.read(1 << 16), 5))
            slow_writer.close()
        finally:
            await server.close()
    return answers


@given(st.lists(st.one_of(st.binary(max_size=64),
                          st.binary(max_size=40).map(lambda body: struct.pack(">I", len(body)) + body),
                          st.just(struct.pack(">I", 2**31)),
                          st.binary(min_size=1, max_size=16).map(lambda b: struct.pack(">I", 1000) + b)),
                min_size=1, max_size=6))
@settings(max_examples=int(os.environ.get("FUZZ_CONTROL_EXAMPLES", "10")))
def test_bad_frames_get_errors_and_good_clients_are_served(tmp_path_factory: pytest.TempPathFactory,
                                                            frames: list[bytes]) -> None:
    path = tmp_path_factory.mktemp("ctl") / "c.sock"
    answers = asyncio.run(_serve_and_attack(path, frames))
    FUZZ_COUNTS["control frames"] += len(frames) + 101
    for raw, answer in zip(frames, answers, strict=False):
        if answer:
            decoded = protocol.response_decoder.decode(answer[4:])
            assert decoded.ok or decoded.error, raw
    good = answers[len(frames):len(frames) + 100]
    assert all(protocol.response_decoder.decode(a[4:]).data == "Status" for a in good)
    assert b"incomplete frame" in answers[-1]


def test_report_what_was_tried(capsys: pytest.CaptureFixture[str]) -> None:
    """Runs last in this module: the counts go to the terminal and to bench/results/fuzz-counts.json."""
    with capsys.disabled():
        print("\nfuzz counts: " + ", ".join(f"{k}={v}" for k, v in sorted(FUZZ_COUNTS.items())))
    Path(FIXTURES / "fuzz-counts.json").write_bytes(msgspec.json.encode(dict(FUZZ_COUNTS)))
    assert FUZZ_COUNTS["mutated fixture"] > 0 and FUZZ_COUNTS["config"] > 0


