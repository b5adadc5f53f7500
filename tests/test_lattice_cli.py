"""`wasmhost status --lattice` and `wasmhost call --lattice` as a user runs them: the real CLI against real
daemons and a real nats-server on loopback."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import nats as nats_client
import pytest
from nats.aio.msg import Msg

from tests.lattice_support import NatsServer, free_port, lattice_daemon, lattice_section
from tests.test_daemon import ROOT, Daemon, component, config_text, launch, wasmhost
from tests.test_lattice import _try_call
from tests.waits import wait_for
from wasmhost.lattice import wire

ECHO = component("t/echo/0", "echo")


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server on a random loopback port."""
    server = NatsServer(tmp_path / "nats").start()
    yield server
    server.kill()


def write_config(tmp_path: Path, text: str) -> Path:
    config = tmp_path / "wasmhost.toml"
    config.write_text(text)
    return config


def test_status_lattice_on_a_daemon_without_lattice_says_so(tmp_path: Path, started: list[Daemon]) -> None:
    d = launch(tmp_path, ECHO, started)
    result = d.cli("status", "--lattice")
    assert result.returncode == 1
    assert "not part of a lattice" in result.stderr and "[lattice]" in result.stderr


def test_call_lattice_without_lattice_section_names_the_config(tmp_path: Path) -> None:
    config = write_config(tmp_path, config_text(tmp_path / "state", ECHO))
    result = wasmhost("call", "--lattice", "--config", str(config), "t/echo/0", "hi")
    assert result.returncode == 1
    assert f"{config} has no [lattice] section" in result.stderr


def test_call_lattice_with_nats_unreachable_fails_fast_naming_the_server(tmp_path: Path) -> None:
    url = f"nats://127.0.0.1:{free_port()}"  # nobody listens there
    config = write_config(tmp_path, config_text(tmp_path / "state", lattice_section([url], "cli") + ECHO))
    result = wasmhost("call", "--lattice", "--config", str(config), "t/echo/0", "hi")
    assert result.returncode == 1
    assert f"cannot reach NATS at {url}" in result.stderr


def test_call_lattice_to_a_component_no_host_runs(tmp_path: Path, nats: NatsServer) -> None:
    config = write_config(tmp_path, config_text(tmp_path / "state", lattice_section([nats.url], "cli") + ECHO))
    result = wasmhost("call", "--lattice", "--config", str(config), "t/nowhere/0", "hi")
    assert result.returncode == 1
    assert "no host of lattice 'default' runs t/nowhere/0" in result.stderr
    assert "wasmhost.default.in.t.nowhere.0" in result.stderr


def test_call_lattice_ends_when_the_host_dies_before_the_cli_heard_its_heartbeat(tmp_path: Path,
                                                                                 nats: NatsServer) -> None:
    """The `queued` acknowledgement says the host's heartbeat interval and start: a host that takes the request
    and dies before the CLI has heard any heartbeat of it ends the call `target-stopped` three intervals later,
    not at the call's timeout. The host is a plain NATS client acting as one (it acknowledges as a daemon does,
    then is silent): a real daemon cannot be killed reliably between its acknowledgement and its next beat."""
    config = write_config(tmp_path, config_text(tmp_path / "state", lattice_section([nats.url], "cli") + ECHO))

    async def run() -> tuple[int | None, bytes]:
        host = await nats_client.connect(nats.url)
        try:
            async def acknowledge(msg: Msg) -> None:  # ...and never heartbeat, as if killed right after
                await host.publish(msg.reply, b"", headers={
                    wire.OUTCOME: wire.QUEUED, wire.HOST: "host-gone",
                    wire.HEARTBEAT: wire.heartbeat_header(0.2, 1234.5)})

            subject = "wasmhost.default.in.t.held.0"
            await host.subscribe(subject, queue=subject, cb=acknowledge)
            await host.flush()
            cli = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "wasmhost.cli", "call", "--lattice", "--config", str(config), "t/held/0", "hi",
                "--timeout", "60", cwd=ROOT, stderr=asyncio.subprocess.PIPE)
            try:
                _, err = await asyncio.wait_for(cli.communicate(), 30)  # three intervals (0.6 s), not 60 s
            finally:
                if cli.returncode is None:
                    cli.kill()
                    await cli.wait()
            return cli.returncode, err
        finally:
            await host.close()

    returncode, err = asyncio.run(run())
    assert returncode == 1
    assert err.decode() == ("wasmhost: t/held/0: target-stopped: host host-gone left the lattice (no heartbeat) "
                            "with the request\n")


def lattice_status(d: Daemon) -> dict[str, object]:
    result = d.cli("status", "--lattice", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def rows(d: Daemon) -> set[tuple[str, str]]:
    """(component, host) pairs of `d`'s lattice directory."""
    return {(c["id"], c["host"]) for c in lattice_status(d)["components"]}  # type: ignore[attr-defined]


@pytest.fixture
def two_hosts(tmp_path: Path, nats: NatsServer, started: list[Daemon]) -> tuple[Daemon, Daemon]:
    """Host A runs an echo and a counter; host B an echo replica, a counter and an echo that accepts
    external senders; A's directory has settled on B's inventory."""
    a = lattice_daemon(tmp_path / "a", ECHO + component("t/counter/0", "counter"), [nats.url], "host-a", started)
    b = lattice_daemon(tmp_path / "b", ECHO + component("t/only-b/0", "counter")
                       + component("t/ext/0", "echo", "accept_external = true"), [nats.url], "host-b", started)
    wait_for(lambda: ("t/only-b/0", "host-b") in rows(a), "host-a sees host-b's components")
    return a, b


def test_status_lattice_shows_every_host_and_where_each_component_runs(two_hosts: tuple[Daemon, Daemon]) -> None:
    a, _b = two_hosts
    view = lattice_status(a)
    assert view["lattice"] == "default" and view["host"] == "host-a" and view["connected"] is True
    hosts = {h["host"]: h for h in view["hosts"]}  # type: ignore[attr-defined]
    assert hosts["host-a"]["local"] is True and hosts["host-a"]["components"] == 2
    assert hosts["host-b"]["local"] is False and hosts["host-b"]["components"] == 3
    assert hosts["host-b"]["last_seen_s"] < 10
    assert rows(a) == {("t/counter/0", "host-a"), ("t/echo/0", "host-a"), ("t/echo/0", "host-b"),
                       ("t/ext/0", "host-b"), ("t/only-b/0", "host-b")}  # the echo's replicas: a row per host

    table = a.cli("status", "--lattice")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0] == f"lattice default: 2 host(s), seen from host-a (connected to NATS at {view['url']})"
    assert str(view["url"]).startswith("nats://127.0.0.1:")
    assert lines[1].split() == ["HOST", "LAST", "SEEN", "COMPONENTS"]
    assert lines[2].split() == ["host-a", "local", "2"]
    assert re.fullmatch(r"host-b\s+[\d.]+ s ago\s+3", lines[3])
    assert lines[5].split() == ["ID", "HOST", "STATE", "HEALTH", "EXTERNAL"]
    assert [line.split()[:2] for line in lines[6:]] == [["t/counter/0", "host-a"], ["t/echo/0", "host-a"],
                                                        ["t/echo/0", "host-b"], ["t/ext/0", "host-b"],
                                                        ["t/only-b/0", "host-b"]]
    assert [line.split()[-1] for line in lines[6:]] == ["no", "no", "no", "yes", "no"]


def test_a_stopped_host_leaves_status_lattice(two_hosts: tuple[Daemon, Daemon]) -> None:
    a, b = two_hosts
    assert b.stop() == 0
    wait_for(lambda: all(h["host"] != "host-b" for h in lattice_status(a)["hosts"]),  # type: ignore[attr-defined]
             "host-b leaves host-a's directory (three heartbeats of 0.5 s)", timeout=15.0)
    assert rows(a) == {("t/counter/0", "host-a"), ("t/echo/0", "host-a")}


def test_call_lattice_reaches_a_component_on_another_host(two_hosts: tuple[Daemon, Daemon]) -> None:
    a, _b = two_hosts
    result = wasmhost("call", "--lattice", "--config", str(a.config), "t/ext/0", "over nats")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "over nats"


def test_call_lattice_to_a_component_that_refuses_external_senders(two_hosts: tuple[Daemon, Daemon]) -> None:
    a, _b = two_hosts
    result = wasmhost("call", "--lattice", "--config", str(a.config), "t/only-b/0", "x")
    assert result.returncode == 1
    assert result.stderr.startswith("wasmhost: t/only-b/0 on host-b: rejected ("), result.stderr
    assert "external" in result.stderr


def test_call_lattice_refuses_a_payload_above_the_servers_max_payload(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "nats", max_payload=65536).start()
    try:
        config = write_config(tmp_path, config_text(tmp_path / "state", lattice_section([server.url], "cli") + ECHO))
        big = tmp_path / "big.bin"
        big.write_bytes(b"x" * 100_000)
        result = wasmhost("call", "--lattice", "--config", str(config), "t/echo/0", f"@{big}")
    finally:
        server.kill()
    assert result.returncode == 1
    assert ("invalid-message: the payload of 100000 bytes does not fit the NATS server's max_payload of "
            "65536 bytes (with 1024 bytes for headers)") in result.stderr


def test_status_lattice_while_nats_is_unreachable(tmp_path: Path, started: list[Daemon]) -> None:
    url = f"nats://127.0.0.1:{free_port()}"  # nobody listens there: the daemon runs, the lattice waits
    d = lattice_daemon(tmp_path / "a", ECHO, [url], "host-a", started)
    result = d.cli("status", "--lattice")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("lattice default: 1 host(s), seen from host-a (NOT connected to NATS: ")
    assert lines[0].endswith("; other hosts as last seen)")
    assert lines[2].split() == ["host-a", "local", "1"]
    assert lines[-1].split()[:3] == ["t/echo/0", "host-a", "running"]
    assert d.call("t/echo/0", "still local") == "still local"


def subscribed(url: str, subject: str, probe: bytes) -> None:
    """Wait until a component's host has subscribed `subject` (READY=1 does not wait for NATS): it answers `probe`."""
    wait_for(lambda: _try_call(url, subject, probe) is not None, f"a host answers on {subject}")


ONLY_CLIENT_SUBJECTS = """users = [
  { user: host, password: host-pw }
  { user: client, password: client-pw, permissions: { publish: ["wasmhost.default.in.>"], subscribe: ["_INBOX.>"] } }
]"""
"""A client user that may not read heartbeats either."""


def test_call_lattice_without_leave_to_hear_heartbeats_waits_for_the_answer(tmp_path: Path,
                                                                            started: list[Daemon]) -> None:
    # Before, NATS refusing the CLI its heartbeat subscription ended every call that outlasted three of the
    # holding host's heartbeats with "target-stopped: host host-b left the lattice (no heartbeat)", the host alive.
    server = NatsServer(tmp_path / "nats", authorization=ONLY_CLIENT_SUBJECTS).start()
    try:
        lattice_daemon(tmp_path / "b", component("t/slow/0", "services", "accept_external = true"),
                       [server.user_url("host", "host-pw")], "host-b", started, heartbeat_s=0.2)
        subscribed(server.user_url("host", "host-pw"), "wasmhost.default.in.t.slow.0", b"self")
        config = write_config(tmp_path, config_text(tmp_path / "state", lattice_section(
            [server.user_url("client", "client-pw")], "cli") + ECHO))
        result = wasmhost("call", "--lattice", "--config", str(config), "t/slow/0", "sleep 1500", "--timeout", "30")
        assert (result.returncode, result.stdout, result.stderr) == (0, "slept", "")  # 1.5 s: 7 heartbeats unheard
    finally:
        server.kill()


OWN_INBOXES = """users = [
  { user: host, password: host-pw }
  { user: ops, password: ops-pw, permissions: { publish: ["wasmhost.default.in.>"],
                                                subscribe: ["_INBOX_ops.>", "wasmhost.default.hb.>"] } }
]"""
"""An operator's client user kept to inboxes of its own: other clients can neither read nor forge its answers."""


def test_call_lattice_takes_its_answers_under_the_configured_inbox_prefix(tmp_path: Path,
                                                                          started: list[Daemon]) -> None:
    server = NatsServer(tmp_path / "nats", authorization=OWN_INBOXES).start()
    try:
        lattice_daemon(tmp_path / "b", component("t/ext/0", "echo", "accept_external = true"),
                       [server.user_url("host", "host-pw")], "host-b", started)
        subscribed(server.user_url("host", "host-pw"), "wasmhost.default.in.t.ext.0", b"probe")
        section = lattice_section([server.user_url("ops", "ops-pw")], "cli", extra='cli_inbox_prefix = "_INBOX_ops"')
        config = write_config(tmp_path, config_text(tmp_path / "state", section + ECHO))
        result = wasmhost("call", "--lattice", "--config", str(config), "t/ext/0", "hi", "--timeout", "30")
        assert (result.returncode, result.stdout, result.stderr) == (0, "hi", "")
    finally:
        server.kill()
