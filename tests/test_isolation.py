"""Isolation: a guest written to misbehave (tests/guests/prober) cannot see host files or the
environment, cannot message targets it was not granted, and every extreme argument it passes to a
host import comes back as a WIT error without poisoning its Store."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import fixture_path
from tests.support import guarded_supervisor
from wasmhost.actors.actor import ComponentActor
from wasmhost.actors.spec import ActorSpec
from wasmhost.actors.state import ActorState
from wasmhost.actors.supervisor import Supervisor
from wasmhost.core import ComponentId
from wasmhost.messaging.outcome import RequestFailed
from wasmhost.runtime.runtime import Runtime
from wasmhost.runtime.store import InstanceState
from wasmhost.security.capabilities import Capabilities

pytestmark = pytest.mark.anyio
PROBER = ComponentId.parse("evil/prober/0")
VICTIM = ComponentId.parse("good/echo/0")


@pytest.fixture
async def host(runtime: Runtime, tmp_path: Path) -> AsyncIterator[Supervisor]:
    os.environ["WASMHOST_TEST_SECRET"] = "hunter2"
    try:
        async with guarded_supervisor(runtime, tmp_path / "storage.sqlite3", 16384) as sup:
            assert isinstance(sup, Supervisor) and sup.stores.permissions is not None
            grant = Capabilities.from_config(send=["evil/*"], request=["evil/*"], storage=True)
            sup.stores.permissions.grant(PROBER, grant)
            await sup.start(ActorSpec(VICTIM), runtime.load(VICTIM, fixture_path("echo")))
            await sup.start(ActorSpec(PROBER, mailbox_capacity=64), runtime.load(PROBER, fixture_path("prober")))
            yield sup
    finally:
        os.environ.pop("WASMHOST_TEST_SECRET", None)


async def probe(sup: Supervisor, command: str) -> str:
    reply = await sup.router.host_request(PROBER, command.encode(), 30.0)
    return (reply or b"").decode()


async def test_no_host_files_or_environment_through_wasi(host: Supervisor) -> None:
    assert "hunter2" not in await probe(host, "env")
    assert await probe(host, "read /etc/passwd") == "denied: FileNotFoundError"
    assert (await probe(host, f"read {Path(__file__)}")).startswith("denied:")
    listing = await probe(host, "list /")
    assert listing.startswith(("denied:", "entries: ")) and "etc" not in listing


async def test_messages_to_targets_not_granted_are_denied(host: Supervisor) -> None:
    for op in ("send", "request", "broadcast"):
        answer = await probe(host, f"{op} good echo 0 8")
        assert answer.startswith("error: DeliveryFailed: capability denied: evil/prober/0 may not"), answer
    assert host.actors[VICTIM].stats.handled == 0
    assert await probe(host, "self") == "evil/prober/0"


async def test_extreme_host_import_arguments_are_wit_errors(host: Supervisor) -> None:
    answers = {
        "send evil nobody 0 1": "error: TargetNotFound",
        "send evil prober 0 1048576": "ok",  # 1 MiB to itself: its max_message_bytes, delivered
        "send evil prober 0 2097152": "error: InvalidMessage: payload of 2097152 bytes exceeds the limit of 1048576",
        "timeout evil prober 0 0": "error: InvalidMessage: timeout-ms must be at least 1",
        "timeout evil prober 0 18446744073709551615": "ok: ",  # capped to a day, not an error
        "cancel no-such-request": "error: InvalidMessage: no pending request",
        "bigkey 1025": "error: InvalidKey: key is 1025 bytes, the limit is 1024",
        "bigkey 1024": "ok",
        "bigvalue 16384": "error: QuotaExceeded",
        "manykeys 200": "ok: 201 keys",
        "prefix key-00019": "ok: key-000190,key-000191,key-000192",
    }
    for command, expected in answers.items():
        assert (await probe(host, command)).startswith(expected), command
    bad_ids = (await probe(host, "badid")).splitlines()
    assert bad_ids[0] == "error: InvalidMessage: component id '/b/c': namespace is empty"
    assert all(line.startswith("error: InvalidMessage") for line in bad_ids)
    assert await probe(host, "self") == "evil/prober/0"  # the Store survived every one of them
    assert host.actors[PROBER].stats.restarts == 0


async def test_a_payload_beyond_wasmtimes_hostcall_limit_traps_and_is_restarted(host: Supervisor) -> None:
    # wasmtime 50 refuses to copy more than ~2-3 MiB through one host call: its own guard, which
    # traps the guest before any host code runs. Supervision restarts it; the host is unaffected.
    with pytest.raises(RequestFailed, match="too much data is being copied between the host and the guest"):
        await probe(host, "send evil prober 0 4194304")
    actor = host.actors[PROBER]
    await until_running(actor)
    assert actor.stats.restarts == 1
    assert await probe(host, "self") == "evil/prober/0"


async def until_running(actor: ComponentActor) -> None:
    for _ in range(500):
        if actor.state is ActorState.RUNNING and actor.manager.state is InstanceState.INITIALIZED:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{actor.name} did not come back")
