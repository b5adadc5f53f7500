"""max_message_bytes at every boundary: config, host sends, guest send/request/broadcast, callbacks,
and the control socket and CLI of a real daemon. The target of an oversized payload never sees it."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import Starter
from tests.support import answers_beside, plain_supervisor
from tests.test_actors import ask, last_outcome, launch, wait_callbacks
from tests.test_daemon import component, daemon, wasmhost
from wasmhost.actors.actor import ComponentActor
from wasmhost.actors.supervisor import Supervisor
from wasmhost.core import ComponentId, ComponentMessage, MessageMetadata, Timestamp
from wasmhost.core.errors import GuestTrap, MessagingError
from wasmhost.core.limits import ResourceLimits
from wasmhost.core.message_size import (
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_MESSAGE_BYTES_CEILING,
    WASMTIME_LIST_U8_CEILING,
)
from wasmhost.messaging.outcome import Outcome, RequestFailed
from wasmhost.runtime.runtime import Runtime
from wasmhost.system import protocol
from wasmhost.system.config import ConfigError, parse_config

pytestmark = pytest.mark.anyio
__all__ = ["daemon"]  # the real-daemon fixture of test_daemon.py

ECHO = "test-org/echo/0"
BLASTER = "test-org/blaster/0"
LIMIT = 64 * 1024
MiB = 1024 * 1024
SENDER = ComponentId.parse("test-org/sender/0")


@pytest.fixture
async def supervisor(runtime: Runtime) -> AsyncIterator[Supervisor]:
    async with plain_supervisor(runtime, 4, host_max_message_bytes=LIMIT) as sup:
        yield sup


async def untouched(sup: Supervisor, echo: ComponentActor, handled: int) -> None:
    """The echo never saw the oversized payload: nothing handled, no restart, and it still answers."""
    assert echo.stats.handled == handled
    assert echo.stats.restarts == 0 and echo.stats.failed == 0
    assert await ask(sup, ECHO, b"still here") == b"still here"


def test_the_limit_stays_below_what_wasmtime_can_pass() -> None:
    assert DEFAULT_MAX_MESSAGE_BYTES <= MAX_MESSAGE_BYTES_CEILING < WASMTIME_LIST_U8_CEILING


def test_the_measured_wasmtime_ceiling_still_holds(start: Starter) -> None:
    # The ceiling the limits are derived from: an upgrade of wasmtime that moves it fails here.
    echo = start("echo", ECHO, ResourceLimits(max_memory_bytes=64 * MiB))
    at_ceiling = bytes(WASMTIME_LIST_U8_CEILING)
    assert echo.handle_message(ComponentMessage(SENDER, at_ceiling, MessageMetadata(Timestamp.now()))) == at_ceiling
    with pytest.raises(GuestTrap, match="too much data is being copied between the host and the guest"):
        echo.handle_message(ComponentMessage(SENDER, at_ceiling + b"!", MessageMetadata(Timestamp.now())))


def test_config_takes_a_host_default_and_per_component_limits(tmp_path: Path) -> None:
    (tmp_path / "a.wasm").write_bytes(b"\x00asm\x0d\x00\x01\x00")
    text = ('[host]\ncomponents_dir = "."\nmax_message_bytes = 200000\n'
            + component("t/a/0", "a") + component("t/a/1", "a", "max_message_bytes = 2000000"))
    config = parse_config(text, tmp_path / "wasmhost.toml")
    assert config.host.max_message_bytes == 200000
    assert [p.spec.max_message_bytes for p in config.components] == [200000, 2000000]
    default = parse_config('[host]\ncomponents_dir = "."\n' + component("t/a/0", "a"), tmp_path / "w.toml")
    assert default.components[0].spec.max_message_bytes == DEFAULT_MAX_MESSAGE_BYTES


def test_config_refuses_limits_above_the_ceiling_with_their_place(tmp_path: Path) -> None:
    (tmp_path / "a.wasm").write_bytes(b"\x00asm\x0d\x00\x01\x00")
    text = ('[host]\ncomponents_dir = "."\nmax_message_bytes = 20971520\n'
            + component("t/a/0", "a", "max_message_bytes = 0") + component("t/a/1", "a", "max_message_bytes = 3000000"))
    with pytest.raises(ConfigError) as caught:
        parse_config(text, tmp_path / "wasmhost.toml")
    errors = caught.value.errors
    assert any(e.startswith(f"host.max_message_bytes: expected an integer <= {MAX_MESSAGE_BYTES_CEILING}")
               and e.endswith("got 20971520") for e in errors)
    assert any(e.startswith("components[0].max_message_bytes: expected an integer > 0") for e in errors)
    assert any(e.startswith("components[1].max_message_bytes: expected an integer <=") and "got 3000000" in e
               for e in errors)


async def test_host_send_and_request_above_the_targets_limit_never_reach_it(supervisor: Supervisor) -> None:
    echo = await launch(supervisor, "echo", ECHO, max_message_bytes=LIMIT)
    target = ComponentId.parse(ECHO)
    assert await ask(supervisor, ECHO, bytes(LIMIT)) == bytes(LIMIT)  # exactly the limit passes
    for attempt in (supervisor.router.host_request(target, bytes(LIMIT + 1), 5.0),
                    supervisor.router.host_send(target, bytes(LIMIT + 1), wait=True)):
        with pytest.raises(MessagingError) as caught:
            await attempt
        assert caught.value.case == "invalid-message"
        assert caught.value.payload == (f"payload of {LIMIT + 1} bytes exceeds the limit of {LIMIT} bytes "
                                        f"(max_message_bytes of {ECHO})")
    await untouched(supervisor, echo, 1)


@pytest.mark.parametrize("op", ["s", "r", "b"])
async def test_guest_send_request_broadcast_above_the_targets_limit_are_invalid_message(
        supervisor: Supervisor, op: str) -> None:
    echo = await launch(supervisor, "echo", ECHO, max_message_bytes=LIMIT)
    # the sender's own limit is larger: the target's is the one that counts
    await launch(supervisor, "blaster", BLASTER, max_message_bytes=MAX_MESSAGE_BYTES_CEILING)
    size = 2_000_000
    reply = await ask(supervisor, BLASTER, f"{op}{size}|test-org|echo|0".encode())
    assert reply == (f"err 2 payload of {size} bytes exceeds the limit of {LIMIT} bytes "
                     f"(max_message_bytes of {ECHO})").encode()
    await untouched(supervisor, echo, 0)
    assert await ask(supervisor, BLASTER, f"{op}{LIMIT}|test-org|echo|0".encode()) == b"ok"


async def test_a_reply_above_the_requesters_limit_becomes_a_failed_outcome(supervisor: Supervisor) -> None:
    await launch(supervisor, "blaster", BLASTER, max_message_bytes=MAX_MESSAGE_BYTES_CEILING)
    requester = await launch(supervisor, "callback", "test-org/callback/0", max_message_bytes=LIMIT)
    await ask(supervisor, "test-org/callback/0", f"test-org|blaster|0|R{LIMIT + 1}".encode())
    await wait_callbacks(supervisor, "test-org/callback/0", 1)
    outcome, detail = await last_outcome(supervisor, "test-org/callback/0")
    assert outcome == Outcome.FAILED.value
    assert detail == (f"reply from {BLASTER}: payload of {LIMIT + 1} bytes exceeds the limit of {LIMIT} bytes "
                      "(max_message_bytes of test-org/callback/0)")
    assert requester.stats.restarts == 0
    # a reply within the limit still arrives as it is
    await ask(supervisor, "test-org/callback/0", f"test-org|blaster|0|R{LIMIT}".encode())
    await wait_callbacks(supervisor, "test-org/callback/0", 2)
    assert await ask(supervisor, "test-org/callback/0", b"?last-content-type") == b""


async def test_a_reply_above_the_hosts_limit_fails_the_host_request(supervisor: Supervisor) -> None:
    blaster = await launch(supervisor, "blaster", BLASTER, max_message_bytes=MAX_MESSAGE_BYTES_CEILING)
    with pytest.raises(RequestFailed) as caught:
        await ask(supervisor, BLASTER, f"R{LIMIT + 1}".encode())
    assert caught.value.outcome is Outcome.FAILED
    assert f"payload of {LIMIT + 1} bytes exceeds the limit of {LIMIT} bytes (max_message_bytes of the host)" \
        in caught.value.detail
    assert blaster.stats.restarts == 0
    assert await ask(supervisor, BLASTER, f"R{LIMIT}".encode()) == bytes(LIMIT)


async def test_a_guests_error_far_above_any_limit_reaches_the_requester_bounded(supervisor: Supervisor) -> None:
    # A 20 MB runtime-error used to become the outcome whole: a requester's callback 20 times its
    # max_message_bytes (the daemon at 2.7 GB converting it), and a frame `wasmhost call` refused.
    await launch(supervisor, "fanout", "test-org/fanout/0")
    with pytest.raises(RequestFailed) as caught:
        await ask(supervisor, "test-org/fanout/0", b"e20000000")
    assert caught.value.outcome is Outcome.FAILED
    cut = f"... ({20_000_000 - 512} characters cut)"
    assert caught.value.detail == "test-org/fanout/0: runtime-error: " + "e" * 512 + cut
    await launch(supervisor, "echo", ECHO)
    replies, calls = await answers_beside(supervisor, ComponentId.parse(ECHO), ComponentId.parse("test-org/fanout/0"),
                                          b"e20000000")
    assert replies == [b"ping"] * 3 and calls >= 1  # a neighbour answers while the guest fails so in a loop


# --- the control socket and CLI of a real daemon ---


def test_a_20_mib_call_is_refused_and_the_echo_keeps_answering(daemon: object, tmp_path: Path) -> None:
    d = daemon(component("t/echo/0", "echo") + component("t/small/0", "echo", "max_message_bytes = 1000"))  # type: ignore[operator]
    huge = tmp_path / "huge.bin"
    huge.write_bytes(bytes(20 * 1024 * 1024))
    for _ in range(6):  # five traps used to mark the echo failed
        result = d.cli("call", "t/echo/0", f"@{huge}")
        assert result.returncode == 1
        assert result.stderr == (f"wasmhost: {huge}: 20971520 bytes is too large to send: no component takes more "
                                 f"than {MAX_MESSAGE_BYTES_CEILING} bytes (the largest max_message_bytes)\n")
    # between the target's limit and the ceiling: the daemon refuses it before the target sees it
    over = tmp_path / "over.bin"
    over.write_bytes(bytes(DEFAULT_MAX_MESSAGE_BYTES + 1))
    result = d.cli("call", "t/echo/0", f"@{over}")
    assert result.returncode == 1
    assert (f"invalid-message: payload of {DEFAULT_MAX_MESSAGE_BYTES + 1} bytes exceeds the limit of "
            f"{DEFAULT_MAX_MESSAGE_BYTES} bytes (max_message_bytes of t/echo/0)") in result.stderr
    small = d.cli("send", "t/small/0", "x" * 1001)
    assert small.returncode == 1 and "limit of 1000 bytes (max_message_bytes of t/small/0)" in small.stderr
    # a raw frame above the protocol's limit is refused unread
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
        raw.settimeout(10)
        raw.connect(str(d.socket))
        raw.sendall(protocol.LENGTH.pack(protocol.MAX_FRAME + 1))
        assert b"bad frame" in raw.recv(4096)
    exact = tmp_path / "exact.bin"
    exact.write_bytes(b"e" * DEFAULT_MAX_MESSAGE_BYTES)
    assert d.call("t/echo/0", f"@{exact}") == "e" * DEFAULT_MAX_MESSAGE_BYTES
    assert d.call("t/echo/0", "still answering") == "still answering"
    rows = {r["id"]: r for r in json.loads(d.cli("status", "--json").stdout)["components"]}
    assert rows["t/echo/0"]["restarts"] == 0 and rows["t/echo/0"]["failed"] == 0
    assert rows["t/echo/0"]["state"] == "running"
    assert d.stop() == 0



def test_the_cli_refuses_an_oversized_payload_before_connecting(tmp_path: Path) -> None:
    nowhere = str(tmp_path / "no.sock")  # nothing listens: a refusal here cannot come from a daemon
    piped = wasmhost("send", "t/echo/0", "@-", "--socket", nowhere, stdin=b"x" * (MAX_MESSAGE_BYTES_CEILING + 1))
    assert piped.returncode == 1
    assert piped.stderr == (f"wasmhost: stdin: more than {MAX_MESSAGE_BYTES_CEILING} bytes is too large to send: "
                            f"no component takes more than {MAX_MESSAGE_BYTES_CEILING} bytes "
                            "(the largest max_message_bytes)\n")
    fits = wasmhost("send", "t/echo/0", "@-", "--socket", nowhere, stdin=b"x" * MAX_MESSAGE_BYTES_CEILING)
    assert fits.returncode == 3 and "no wasmhost daemon is listening" in fits.stderr  # 3: no daemon answered
