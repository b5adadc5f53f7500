"""`status` answers from rows kept between requests (system/status_table.py): they must be exactly what
reading every actor afresh gives, right after any change. A real daemon in-process (real wasmtime, real
components, real worker threads, the real control handler), and a real daemon subprocess through the
socket for what a user sees. No mocks."""

from __future__ import annotations

import json
import random
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from tests.test_daemon import Daemon, component, config_text, in_process, launch
from wasmhost.core.ids import ComponentId
from wasmhost.system import protocol
from wasmhost.system.client import request
from wasmhost.system.daemon import Daemon as InProcessDaemon
from wasmhost.system.heap import collect_all
from wasmhost.system.status_table import status_row

pytestmark = pytest.mark.anyio

ECHOES = 4
COMPONENTS = (
    "".join(component(f"t/echo/{i}", "echo", "mailbox_capacity = 512") for i in range(ECHOES))
    + component("t/counter/0", "counter")
    + component("t/trapper/0", "trapper", "backoff_base_ms = 1\nbackoff_max_ms = 2\nmax_restarts = 1000")
    + component("t/busy/0", "busy")
    + component("t/blaster/0", "blaster", 'capabilities = { send = ["t/echo/*"] }')
)


def table(daemon: InProcessDaemon) -> list[dict[str, Any]]:
    """The rows `status` answers with, as a client decodes them."""
    return [msgspec.msgpack.decode(row) for row in daemon.status_table.rows()]


def fresh(daemon: InProcessDaemon) -> list[dict[str, Any]]:
    """Every row read afresh from the actors."""
    actors = daemon.supervisor.actors
    return [msgspec.to_builtins(status_row(cid, deployment, actors.get(cid)))
            for cid, deployment in daemon.deployments.items()]


async def assert_exact(daemon: InProcessDaemon) -> None:
    """The kept rows equal a fresh reading. Worker threads may change a field between the two readings
    (a guest's send filling a mailbox), so a difference must persist over a few tries to count: a
    change the table missed never heals by itself."""
    for _ in range(5):
        kept, now = table(daemon), fresh(daemon)
        if kept == now:
            return
        await anyio.sleep(0)
    assert kept == now


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[InProcessDaemon]:
    config_path = tmp_path / "wasmhost.toml"
    config_path.write_text(config_text(tmp_path / "state", COMPONENTS))
    async with in_process(config_path) as daemon:
        yield daemon


async def ask(daemon: InProcessDaemon, message: protocol.Request) -> protocol.Response:
    return await daemon.handle(message)


async def quiet(daemon: InProcessDaemon) -> None:
    """Every echo has handled what was sent to it: a call to each queues behind its earlier messages."""
    for i in range(ECHOES):
        assert (await ask(daemon, protocol.Call(f"t/echo/{i}", b"end", 10.0))).ok


async def test_kept_rows_equal_a_fresh_reading_after_every_kind_of_change(running: InProcessDaemon) -> None:
    d = running
    await assert_exact(d)
    assert (await ask(d, protocol.Call("t/echo/0", b"x", 10.0))).data == b"x"
    assert table(d)[0]["handled"] == 1  # right after the answer
    await assert_exact(d)
    assert not (await ask(d, protocol.Call("t/trapper/0", b"x", 10.0))).ok
    row = next(r for r in table(d) if r["id"] == "t/trapper/0")
    assert row["failed"] == 1 and "unreachable" in row["last_error"], row
    await assert_exact(d)
    for request_ in (protocol.Stop("t/counter/0"), protocol.Start("t/counter/0"), protocol.Restart("t/counter/0")):
        assert (await ask(d, request_)).ok
        await assert_exact(d)
    row = next(r for r in table(d) if r["id"] == "t/counter/0")
    assert (row["state"], row["restarts"], row["health"]) == ("running", 1, "healthy"), row


async def test_kept_rows_stay_exact_under_concurrent_traffic(running: InProcessDaemon) -> None:
    """Host sends, calls, guest sends from worker threads, traps, stops and restarts at once, with `status`
    asked for all along: afterwards (and between rounds) no row is stale."""
    d = running
    rng = random.Random(12)
    for _ in range(3):
        async with anyio.create_task_group() as group:

            async def traffic(seed: int) -> None:
                rng = random.Random(seed)
                for _ in range(60):
                    pick = rng.randrange(6)
                    echo = f"t/echo/{rng.randrange(ECHOES)}"
                    if pick == 0:
                        await ask(d, protocol.Send(echo, b"s", wait=True, timeout=10.0))
                    elif pick == 1:
                        await ask(d, protocol.Call(echo, b"c", 10.0))
                    elif pick == 2:
                        await ask(d, protocol.Call("t/blaster/0", f"s8|t|echo|{rng.randrange(ECHOES)}".encode(), 10.0))
                    elif pick == 3:
                        await ask(d, protocol.Call("t/trapper/0", b"x", 10.0))
                    elif pick == 4:
                        await ask(d, protocol.Call("t/busy/0", b"20000", 10.0))
                    else:
                        await ask(d, protocol.Call("t/counter/0", b"", 10.0))

            async def statuses() -> None:
                for _ in range(200):
                    assert (await ask(d, protocol.Status())).ok
                    await anyio.sleep(0)

            for _ in range(4):
                group.start_soon(traffic, rng.randrange(1 << 30))
            group.start_soon(statuses)
            group.start_soon(ask, d, protocol.Restart("t/counter/0"))
        await quiet(d)
        await assert_exact(d)
    rows = {r["id"]: r for r in table(d)}
    assert sum(rows[f"t/echo/{i}"]["handled"] for i in range(ECHOES)) > 0
    assert all(r["queued"] == 0 and r["in_hand"] == 0 for r in rows.values()), rows


async def test_a_queue_shows_in_the_kept_rows_as_it_fills_and_drains(running: InProcessDaemon) -> None:
    d = running
    table(d)  # laid out: from now on only noted rows are rebuilt
    async with anyio.create_task_group() as group:
        group.start_soon(ask, d, protocol.Call("t/busy/0", b"300000000", 30.0))  # keeps its actor busy a while
        with anyio.fail_after(10):
            while next(r for r in table(d) if r["id"] == "t/busy/0")["in_hand"] != 1:
                await anyio.sleep(0.001)
        for _ in range(3):
            await ask(d, protocol.Send("t/busy/0", b"1", wait=False))
        row = next(r for r in table(d) if r["id"] == "t/busy/0")
        assert (row["queued"], row["in_hand"], row["mailbox"]) == (3, 1, 4), row
        await assert_exact(d)
    assert (await ask(d, protocol.Call("t/busy/0", b"1", 10.0))).ok  # behind the three sends
    row = next(r for r in table(d) if r["id"] == "t/busy/0")
    assert (row["queued"], row["in_hand"], row["handled"]) == (0, 0, 5), row
    await assert_exact(d)


def test_status_through_the_socket_shows_each_change_at_once(tmp_path: Path, started: list[Daemon]) -> None:
    d = launch(tmp_path, COMPONENTS, started)

    def rows() -> dict[str, dict[str, Any]]:
        return {r["id"]: r for r in request(d.socket, protocol.Status()).data["components"]}

    assert rows()["t/echo/1"]["handled"] == 0
    for n in range(1, 4):
        assert d.call("t/echo/1", "hi") == "hi"
        assert rows()["t/echo/1"]["handled"] == n
    assert d.cli("call", "t/trapper/0", "x").returncode != 0
    assert rows()["t/trapper/0"]["failed"] == 1
    assert d.cli("stop", "t/echo/2").returncode == 0
    assert rows()["t/echo/2"]["state"] == "stopped"
    assert d.cli("start", "t/echo/2").returncode == 0
    assert d.cli("restart", "t/echo/2").returncode == 0
    row = rows()["t/echo/2"]
    assert (row["state"], row["restarts"]) == ("running", 1), row
    assert d.stop() == 0


def test_thousands_of_long_errors_still_fit_one_status_answer(tmp_path: Path, started: list[Daemon]) -> None:
    """3,200 components of one binary whose initialize traps 100 calls deep in a function with a 500-character
    name: each row's error is bounded (some 11 KB), their sum was not (35.5 MB, over the socket's frame limit),
    and `status`, `top` and `inspect` of any component failed with 'frame of 35518064 bytes exceeds the limit'."""
    failing = "".join(component(f"t/deep{i}/0", "deeptrap", "max_restarts = 0") for i in range(3200))
    d = launch(tmp_path, component("t/echo/0", "echo") + failing, started)
    shown = d.cli("status", "--json")
    assert shown.returncode == 0, shown.stderr
    rows = {r["id"]: r for r in json.loads(shown.stdout)["components"]}
    assert len(rows) == 3201 and rows["t/echo/0"]["state"] == "running"
    cut = rows["t/deep7/0"]
    assert cut["state"] == "failed" and cut["last_error"].endswith(
        " ... (cut to fit every component's row: `wasmhost inspect ID` shows it whole)")
    assert d.cli("status").returncode == 0 and d.cli("inspect", "t/echo/0").returncode == 0
    whole = d.cli("inspect", "t/deep7/0", "--json")
    assert whole.returncode == 1  # failed: it stays down
    last_error = json.loads(whole.stdout)["status"]["last_error"]
    assert len(last_error) > 5000 and last_error.count("\n") > 10 and f"!{'f' * 480}" in last_error
    assert d.stop() == 0


async def test_components_removed_by_a_reload_are_freed_without_a_status(running: InProcessDaemon) -> None:
    """Every actor notes itself in the queue of changes as it starts and stops; only a `status` took them. A
    daemon nobody asked for its status kept every actor each reload removed (6 reloads replacing 500
    components: 3,500 actors and their StoreManagers alive for 500 deployed, some 16 KB each)."""
    config = running.config.source
    gone = weakref.ref(running.supervisor.actors[ComponentId.parse("t/counter/0")])
    config.write_text(config.read_text().replace('id = "t/counter/0"', 'id = "t/counter/1"'))
    report = await running.reload()
    assert report.ok and report.added == ["t/counter/1"] and report.removed == ["t/counter/0"], report
    collect_all()  # as the reload did after removing: the actor's own cycles go too
    assert gone() is None
    await assert_exact(running)
