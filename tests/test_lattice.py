"""The lattice end to end: real daemons (subprocesses) on a real nats-server, loopback only."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import nats
import nats.errors
import trustme
from nats.aio.msg import Msg

from tests import lattice_support
from tests.conftest import FIXTURES
from tests.lattice_support import NatsServer, lattice_daemon, lattice_section, wait_for_log
from tests.test_daemon import Daemon, component, config_text, wasmhost
from tests.waits import wait_for
from wasmhost.lattice import wire
from wasmhost.system import protocol
from wasmhost.system.client import request

nats_server = lattice_support.nats_server  # the fixtures this module uses
daemons = lattice_support.daemons

ECHO = component("t/echo/0", "echo")


def test_a_host_calls_a_component_on_another_host(tmp_path: Path, nats_server: NatsServer,
                                                  daemons: list[Daemon]) -> None:
    a = lattice_daemon(tmp_path / "a", ECHO, [nats_server.url], "host-a", daemons)
    b = lattice_daemon(tmp_path / "b", component("t/other/0", "counter"), [nats_server.url], "host-b", daemons)
    wait_for_log(b, "lattice_connected")
    wait_for(lambda: b.cli("call", "t/echo/0", "across").stdout.rstrip("\n") == "across", "b sees the echo")
    assert a.stop() == 0 and b.stop() == 0


REMOTE_GRANT = '[[lattice.grants]]\nid = "t/caller/0"\nrequest = ["t/*"]\nsend = ["t/*"]\nbroadcast = ["t/*"]\n'
SERVED = (ECHO + component("t/quiet/0", "pinger") + component("t/trap/0", "trapper")
          + component("t/slow/0", "services"))
CALLER = component("t/caller/0", "callback", 'capabilities = { request = ["t/*"] }')


def served_and_caller(tmp_path: Path, nats_server: NatsServer, daemons: list[Daemon]) -> tuple[Daemon, Daemon]:
    """Host A serving SERVED to remote senders granted, host B running the callback guest; once B sees A."""
    a = lattice_daemon(tmp_path / "a", SERVED, [nats_server.url], "host-a", daemons, extra=REMOTE_GRANT)
    b = lattice_daemon(tmp_path / "b", CALLER, [nats_server.url], "host-b", daemons)
    wait_for(lambda: b.cli("call", "t/echo/0", "x").returncode == 0, "b sees a's components")
    return a, b


def ask(d: Daemon, target: str, data: str) -> dict[str, str]:
    """Have the callback guest on `d` request `data` from `target`; wait for the callback and read it."""
    before = int(d.call("t/caller/0", "?callbacks") or 0)
    d.call("t/caller/0", f"{target.replace('/', '|')}|{data}")
    wait_for(lambda: int(d.call("t/caller/0", "?callbacks") or 0) > before, f"a callback from {target}", 20)
    return {what: d.call("t/caller/0", f"?last-{what}") for what in ("payload", "content-type", "sender")}


def test_guest_requests_across_hosts_end_with_every_outcome(tmp_path: Path, nats_server: NatsServer,
                                                             daemons: list[Daemon]) -> None:
    a, b = served_and_caller(tmp_path, nats_server, daemons)
    reply = ask(b, "t/echo/0", "over the lattice")
    assert reply == {"payload": "over the lattice", "content-type": "", "sender": "t/echo/0"}
    outcome = "application/vnd.wasmhost.outcome+json"
    quiet = ask(b, "t/quiet/0", "z1")
    assert (quiet["content-type"], json.loads(quiet["payload"])["outcome"]) == (outcome, "no-reply")
    trapped = ask(b, "t/trap/0", "boom")
    assert json.loads(trapped["payload"])["outcome"] == "failed" and "unreachable" in trapped["payload"]
    slow = ask(b, "t/slow/0", "sleep 5600")  # the callback guest's requests wait 5 s
    assert json.loads(slow["payload"]) == {"outcome": "timeout", "detail": "no reply from t/slow/0 in time"}
    missing = b.cli("call", "t/caller/0", "t|ghost|0|x")
    assert "request failed: target-not-found" in missing.stderr
    assert a.stop() == 0 and b.stop() == 0


def test_remote_senders_need_a_grant_on_the_receiving_host(tmp_path: Path, nats_server: NatsServer,
                                                          daemons: list[Daemon]) -> None:
    a = lattice_daemon(tmp_path / "a", ECHO, [nats_server.url], "host-a", daemons)  # no [[lattice.grants]]
    b = lattice_daemon(tmp_path / "b", CALLER, [nats_server.url], "host-b", daemons)
    wait_for(lambda: b.cli("call", "t/echo/0", "x").returncode == 0, "b sees a's components")
    denied = ask(b, "t/echo/0", "let me in")
    report = json.loads(denied["payload"])
    assert report["outcome"] == "failed"
    assert "capability denied: t/caller/0 may not request to t/echo/0" in report["detail"]
    assert "rejected" in report["detail"]
    assert a.stop() == 0 and b.stop() == 0


def test_lattice_grants_apply_again_when_a_reload_removes_the_local_replica(tmp_path: Path, nats_server: NatsServer,
                                                                          daemons: list[Daemon]) -> None:
    a = lattice_daemon(tmp_path / "a", ECHO + CALLER, [nats_server.url], "host-a", daemons, extra=REMOTE_GRANT)
    b = lattice_daemon(tmp_path / "b", CALLER, [nats_server.url], "host-b", daemons)
    wait_for(lambda: b.cli("call", "t/echo/0", "x").returncode == 0, "b sees a's components")
    assert ask(b, "t/echo/0", "with a's own caller")["payload"] == "with a's own caller"
    a.config.write_text(a.config.read_text().replace(CALLER, ""))  # a runs no caller: its lattice grant applies
    assert a.cli("reload").returncode == 0
    assert ask(b, "t/echo/0", "after the reload")["payload"] == "after the reload"
    assert a.stop() == 0 and b.stop() == 0


def nats_call(url: str, subject: str, payload: bytes, headers: dict[str, str] | None = None,
              timeout: float = 10.0) -> tuple[bytes, dict[str, str]]:
    """A plain nats-py client's request (no wasmhost code on its side): the answer's payload and headers."""
    async def go() -> tuple[bytes, dict[str, str]]:
        nc = await nats.connect(url)
        try:
            answer = await nc.request(subject, payload, timeout=timeout, headers=headers)
            return answer.data, dict(answer.headers or {})
        finally:
            await nc.close()

    return asyncio.run(go())


def test_plain_nats_clients_reach_only_components_that_accept_external(tmp_path: Path, nats_server: NatsServer,
                                                                       daemons: list[Daemon]) -> None:
    a = lattice_daemon(tmp_path / "a", component("t/echo/0", "echo", "accept_external = true")
                       + component("t/counter/0", "counter"), [nats_server.url], "host-a", daemons)
    wait_for_log(a, "lattice_connected")
    data, headers = wait_for(lambda: _try_call(nats_server.url, "wasmhost.default.in.t.echo.0", b"hello"),
                             "the echo answers")
    assert data == b"hello" and headers["Wasmhost-Outcome"] == "reply" and headers["Wasmhost-Host"] == "host-a"
    data, headers = nats_call(nats_server.url, "wasmhost.default.in.t.counter.0", b"x")
    assert headers["Wasmhost-Outcome"] == "rejected" and headers["Wasmhost-Error"] == "delivery-failed"
    assert "t/counter/0 does not accept messages from external clients" in headers["Wasmhost-Detail"]
    data, headers = nats_call(nats_server.url, "wasmhost.default.in.t.echo.0", b"fire",
                              {"Wasmhost-Kind": "send", "Wasmhost-Sender": "t/counter/0"})
    assert headers["Wasmhost-Outcome"] == "queued"  # a send, acknowledged once in the mailbox
    said = wire.acknowledged_heartbeat("host-a", headers.get("Wasmhost-Heartbeat"))  # so it can be watched
    assert said is not None and said.heartbeat_s == 0.5
    assert a.call("t/counter/0", "") == "1"  # the refused message never reached it
    assert a.stop() == 0


HOSTS_AND_CLIENTS = """users = [
  { user: host, password: host-pw, permissions: { publish: ["wasmhost.default.>", "_INBOX.>"],
                                                  subscribe: ["wasmhost.default.>"] } }
  { user: client, password: client-pw, permissions: { publish: ["wasmhost.default.in.>"],
                                                      subscribe: ["_INBOX.>", "wasmhost.default.hb.>"] } }
]"""
"""deploy/README.md's permissions: hosts may use the whole lattice, plain clients only its clients' subjects."""


@contextlib.contextmanager
def permissioned_host(tmp_path: Path, daemons: list[Daemon], heartbeat_s: float = 0.5
                      ) -> Iterator[tuple[NatsServer, Daemon, str]]:
    """A nats-server with HOSTS_AND_CLIENTS, host-a on it (t/echo/0 accepting external messages, t/counter/0
    not) answering plain clients, and the client user's URL; the server is killed afterwards."""
    server = NatsServer(tmp_path / "nats", authorization=HOSTS_AND_CLIENTS).start()
    try:
        a = lattice_daemon(tmp_path / "a", component("t/echo/0", "echo", "accept_external = true")
                           + component("t/counter/0", "counter"), [server.user_url("host", "host-pw")], "host-a",
                           daemons, heartbeat_s=heartbeat_s)
        client = server.user_url("client", "client-pw")
        wait_for(lambda: _try_call(client, "wasmhost.default.in.t.echo.0", b"hello"), "the echo answers")
        yield server, a, client
    finally:
        server.kill()


def test_a_plain_client_cannot_pose_as_a_host(tmp_path: Path, daemons: list[Daemon]) -> None:
    # Before, a client that set Wasmhost-Sender-Host on a component's one subject was taken for a host: sending
    # as the host itself (wasmhost/host/0), it reached a component that does not accept external messages,
    # and no NATS permission could stop it (permissions name subjects, not headers).
    with permissioned_host(tmp_path, daemons) as (_, a, client):
        as_host = {"Wasmhost-Sender-Host": "host-z", "Wasmhost-Sender": "wasmhost/host/0"}
        _, headers = nats_call(client, "wasmhost.default.in.t.counter.0", b"x", as_host)  # still a client here
        assert headers["Wasmhost-Outcome"] == "rejected" and headers["Wasmhost-Error"] == "delivery-failed"
        assert "t/counter/0 does not accept messages from external clients" in headers["Wasmhost-Detail"]
        assert _refused_publish(client, "wasmhost.default.msg.t.counter.0", as_host)  # the hosts' subject: NATS says no
        assert a.call("t/counter/0", "") == "1"  # neither message reached it
        assert a.stop() == 0


def test_a_password_in_a_nats_url_is_shown_neither_by_status_nor_in_the_log(tmp_path: Path,
                                                                           daemons: list[Daemon]) -> None:
    server = NatsServer(tmp_path / "nats", authorization=HOSTS_AND_CLIENTS).start()
    try:
        a = lattice_daemon(tmp_path / "a", component("t/echo/0", "echo"), [server.user_url("host", "host-pw")],
                           "host-a", daemons)
        assert wait_for_log(a, "lattice_connected")["url"] == f"nats://host:***@127.0.0.1:{server.port}"
        shown = a.cli("status", "--lattice").stdout
        assert f"connected to NATS at nats://host:***@127.0.0.1:{server.port}" in shown
        server.kill()
        wait_for_log(a, "lattice_disconnected")
        assert "host-pw" not in shown + a.cli("status", "--lattice", "--json").stdout + a.log.read_text()
        assert a.stop() == 0
    finally:
        server.kill()


def test_a_message_without_a_host_on_the_hosts_subject_is_refused_naming_the_clients_subject(
        tmp_path: Path, nats_server: NatsServer, daemons: list[Daemon]) -> None:
    a = lattice_daemon(tmp_path / "a", component("t/echo/0", "echo", "accept_external = true"), [nats_server.url],
                       "host-a", daemons)
    wait_for(lambda: _try_call(nats_server.url, "wasmhost.default.in.t.echo.0", b"hello"), "the echo answers")
    _, headers = nats_call(nats_server.url, "wasmhost.default.msg.t.echo.0", b"hello")
    assert headers["Wasmhost-Outcome"] == "rejected" and headers["Wasmhost-Error"] == "invalid-message"
    assert headers["Wasmhost-Detail"] == ("wasmhost.default.msg.t.echo.0 takes messages from hosts only (with "
                                          "Wasmhost-Sender-Host); NATS clients send to wasmhost.default.in.t.echo.0")
    assert a.stop() == 0


def test_answers_nats_refuses_to_the_clients_reply_subjects_are_logged_within_a_budget(
        tmp_path: Path, daemons: list[Daemon]) -> None:
    # A client picks the reply subject: one the host may not publish on makes nats-server refuse the host's
    # answer (-ERR, the connection stays up). Each refusal was a lattice_error line (200 messages, 200 lines),
    # and the last one the `cause` status showed while connected (and a later disconnection was reported with).
    with permissioned_host(tmp_path, daemons) as (_, a, client):
        async def flood() -> None:
            nc = await nats.connect(client)
            try:
                for i in range(200):  # refused (t/counter/0 does not accept external messages), answered
                    await nc.publish("wasmhost.default.in.t.counter.0", b"x", reply=f"elsewhere.{i}")
                await nc.flush()
            finally:
                await nc.close()

        asyncio.run(flood())
        # The host answered all 200 (in order) before this answer; their refusals reached it before the next call
        nats_call(client, "wasmhost.default.in.t.counter.0", b"after")
        assert nats_call(client, "wasmhost.default.in.t.counter.0", b"and after")[1]["Wasmhost-Outcome"] == "rejected"

        async def marker() -> None:  # a line logged after theirs (the log is written by a thread of its own)
            nc = await nats.connect(client)
            await nc.publish("wasmhost.default.in.t.echo.0", b"x", reply="wasmhost.default.marker")
            await nc.close()

        asyncio.run(marker())
        wait_for_log(a, "lattice_message_rejected", target="t/echo/0")
        refused = [e for e in a.events() if e.get("event") == "lattice_error"]
        assert 1 <= len(refused) <= 20 and "permissions violation" in str(refused[0]["cause"]).lower()
        status = json.loads(a.cli("status", "--lattice", "--json").stdout)
        assert status["connected"] and status["cause"] == ""  # no refusal stands for the link's state
        assert a.stop() == 0


def test_a_message_nats_py_cannot_read_is_dropped_and_the_host_reads_on(tmp_path: Path,
                                                                        daemons: list[Daemon]) -> None:
    # nats-py stopped reading the connection at such a message, with no reconnection: a plain client's 8 bytes
    # left a host deaf (no message, no answer, heartbeats going on) until nats-py's pings found the connection
    # stale, 12 s with heartbeat_s = 2 (here 60 s would make it minutes), and again at the next one.
    with permissioned_host(tmp_path, daemons, heartbeat_s=60) as (server, a, client):
        for header_block, reply in [(b"NATS/1.0", b""), (b"NATS/1.0 \xff\xfe\xfd\r\n\r\n", b""),
                                    (b"NATS/1.0\r\nWasmhost-Kind: send\r\n\r\n", b"_INBOX.\xff")]:
            _raw_publish(server.port, b"wasmhost.default.in.t.counter.0", header_block, reply)
        data, headers = nats_call(client, "wasmhost.default.in.t.echo.0", b"still heard")
        assert data == b"still heard" and headers["Wasmhost-Outcome"] == "reply"
        def dropped() -> list[str]:
            return [str(e["cause"]) for e in a.events() if e.get("event") == "lattice_error"]

        wait_for(lambda: len(dropped()) == 3, "each is logged")  # the log is written by a thread of its own
        assert all("a message on wasmhost.default.in.t.counter.0 could not be read" in c for c in dropped())
        assert a.call("t/counter/0", "") == "1"  # none reached it
        assert a.stop() == 0


ONE_HOST_USER_FOR_TWO_LATTICES = """users = [
  { user: host, password: host-pw, permissions: { publish: ["wasmhost.>", "_INBOX.>"],
                                                  subscribe: ["wasmhost.>", "_INBOX.>"] } }
  { user: client, password: client-pw, permissions: { publish: ["wasmhost.staging.in.>"], subscribe: ["_INBOX.>"] } }
]"""


def test_a_client_of_one_lattice_cannot_make_its_host_speak_on_another_lattices_subjects(
        tmp_path: Path, daemons: list[Daemon]) -> None:
    # Only the host's own lattice prefix was refused as a client's reply subject: with one host user for staging
    # and prod, a staging client had a staging echo publish a heartbeat of its choosing on prod's subjects, and
    # prod's hosts listed a host "ghost" for three hours (a real host's name would end its requests instead).
    server = NatsServer(tmp_path / "nats", authorization=ONE_HOST_USER_FOR_TWO_LATTICES).start()
    try:
        a = lattice_daemon(tmp_path / "a", component("t/echo/0", "echo", "accept_external = true"),
                           [server.user_url("host", "host-pw")], "host-a", daemons, extra='name = "staging"')
        client = server.user_url("client", "client-pw")
        wait_for(lambda: _try_call(client, "wasmhost.staging.in.t.echo.0", b"hello"), "the echo answers")
        forged = json.dumps({"host": "ghost", "seq": 1, "started_at": 1.0, "heartbeat_s": 3600,
                             "inventory_version": 1}).encode()

        async def attempt() -> list[bytes]:
            heard: asyncio.Queue[bytes] = asyncio.Queue()

            async def note(msg: Msg) -> None:
                heard.put_nowait(msg.data)

            watcher = await nats.connect(server.user_url("host", "host-pw"))  # sees what the host publishes, in order
            attacker = await nats.connect(client)
            try:
                await watcher.subscribe("wasmhost.prod.hb.ghost", cb=note)
                await watcher.subscribe("_INBOX.watched", cb=note)
                await watcher.flush()
                await attacker.publish("wasmhost.staging.in.t.echo.0", forged, reply="wasmhost.prod.hb.ghost")
                await attacker.publish("wasmhost.staging.in.t.echo.0", b"after", reply="_INBOX.watched")
                await attacker.flush()
                return [await asyncio.wait_for(heard.get(), 10)]  # the echo answers in order
            finally:
                await attacker.close()
                await watcher.close()

        assert asyncio.run(attempt()) == [b"after"]
        refused = wait_for_log(a, "lattice_message_rejected", error="invalid-message")
        assert "'wasmhost.prod.hb.ghost' is under wasmhost." in str(refused["detail"])
        assert a.stop() == 0
    finally:
        server.kill()


def test_a_clients_long_header_values_are_shortened_in_the_log(tmp_path: Path, nats_server: NatsServer,
                                                                daemons: list[Daemon]) -> None:
    # Rejections are logged within a budget of lines, but a line showed a client's headers whole: a 1 MB
    # Wasmhost-Sender and Wasmhost-Kind made a 2 MB line, 20 such lines per component every 10 s.
    a = lattice_daemon(tmp_path / "a", component("t/echo/0", "echo", "accept_external = true"), [nats_server.url],
                       "host-a", daemons)
    wait_for(lambda: _try_call(nats_server.url, "wasmhost.default.in.t.echo.0", b"hello"), "the echo answers")
    long = {"Wasmhost-Sender": "external/x/" + "s" * 1_000_000, "Wasmhost-Kind": "k" * 1_000_000}
    _, headers = nats_call(nats_server.url, "wasmhost.default.in.t.echo.0", b"x", long)
    assert headers["Wasmhost-Error"] == "invalid-message" and len(headers["Wasmhost-Detail"]) <= 1000
    line = wait_for_log(a, "lattice_message_rejected")
    assert len(json.dumps(line)) < 5000 and str(line["sender"]).endswith("(1000011 characters)")
    assert a.stop() == 0


def test_a_clients_correlation_id_and_content_type_are_bounded(tmp_path: Path, nats_server: NatsServer,
                                                                daemons: list[Daemon]) -> None:
    # Only the payload was held to max_message_bytes: a client's Wasmhost-Correlation-Id and Content-Type, as
    # long as NATS lets a message be, went into the mailbox and the guest, and the correlation id into each of
    # the guest's log lines for that message (past their 16 KiB bound: a 4 MB id made a 4 MB line per line).
    a = lattice_daemon(tmp_path / "a", component("t/logger/0", "logger", "accept_external = true"),
                       [nats_server.url], "host-a", daemons)
    wait_for(lambda: _try_call(nats_server.url, "wasmhost.default.in.t.logger.0", b"hello"), "the logger answers")
    for header in ("Wasmhost-Correlation-Id", "Content-Type"):
        _, headers = nats_call(nats_server.url, "wasmhost.default.in.t.logger.0", b"x", {header: "c" * 4_000_000})
        assert headers["Wasmhost-Outcome"] == "rejected" and headers["Wasmhost-Error"] == "invalid-message"
        assert headers["Wasmhost-Detail"] == f"{header} is 4000000 characters, at most 256 are allowed"
    _, headers = nats_call(nats_server.url, "wasmhost.default.in.t.logger.0", b"x",
                           {"Wasmhost-Correlation-Id": "c" * 256, "Content-Type": "t" * 256})
    assert headers["Wasmhost-Outcome"] == "no-reply"  # taken
    assert max(len(line) for line in a.log.read_text().splitlines()) < 20_000
    assert a.stop() == 0


def test_plain_clients_do_not_read_the_hosts_inventories(tmp_path: Path, daemons: list[Daemon]) -> None:
    # A host fetched another's inventory with a request on nats-py's _INBOX.: deploy/README's clients, who may
    # subscribe _INBOX.>, read every inventory (each component of each host, external or not, its health and
    # version) each time one changed. The hosts now take answers under their lattice's prefix.
    server = NatsServer(tmp_path / "nats", authorization=HOSTS_AND_CLIENTS).start()

    async def watch() -> list[bytes]:
        nc = await nats.connect(server.user_url("client", "client-pw"))
        try:
            sub = await nc.subscribe("_INBOX.>")
            await nc.flush()

            def start_both() -> None:
                lattice_daemon(tmp_path / "a", component("t/counter/0", "counter"),
                               [server.user_url("host", "host-pw")], "host-a", daemons)
                b = lattice_daemon(tmp_path / "b", ECHO, [server.user_url("host", "host-pw")], "host-b", daemons)
                wait_for(lambda: "t/counter/0" in b.cli("status", "--lattice").stdout, "b knows a's components")

            await asyncio.to_thread(start_both)
            await nc.flush()  # what was published to _INBOX.> before this reached nc before the PONG
            return [(await sub.next_msg(timeout=1)).data for _ in range(sub.pending_msgs)]
        finally:
            await nc.close()

    try:
        read = asyncio.run(watch())
        assert not [data for data in read if b"t/counter/0" in data]
        assert all(d.stop() == 0 for d in daemons)
    finally:
        server.kill()


def _raw_publish(port: int, subject: bytes, header_block: bytes, reply: bytes) -> None:
    """Publish as deploy/README's client user through a raw socket (nats-py sends only well-formed headers),
    then wait for the server's PONG: it has taken the message."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.recv(4096)  # INFO
        s.sendall(b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"protocol":1,"user":"client",'
                  b'"pass":"client-pw"}\r\n')
        size = len(header_block)
        s.sendall(b" ".join([b"HPUB", subject] + ([reply] if reply else []) + [b"%d %d\r\n" % (size, size)])
                  + header_block + b"\r\nPING\r\n")
        seen = b""
        while b"PONG" not in seen:
            chunk = s.recv(4096)
            assert chunk and b"-ERR" not in chunk, seen + chunk
            seen += chunk


def _refused_publish(url: str, subject: str, headers: dict[str, str]) -> str:
    """Publish as a plain client; the error nats-server reports for it (a permissions violation), waited for."""
    async def go() -> str:
        refused: asyncio.Queue[str] = asyncio.Queue()

        async def on_error(exc: Exception) -> None:
            refused.put_nowait(str(exc))

        nc = await nats.connect(url, error_cb=on_error)
        try:
            await nc.publish(subject, b"x", headers=headers)
            await nc.flush()
            error = await asyncio.wait_for(refused.get(), 10)
            assert "permissions violation" in error.lower() and subject in error, error
            return error
        finally:
            await nc.close()

    return asyncio.run(go())


def row(d: Daemon, cid: str) -> dict[str, object]:
    """The status row of component `cid` of daemon `d`."""
    rows = json.loads(d.cli("status", "--json").stdout)["components"]
    return dict(next(r for r in rows if r["id"] == cid))


def handled(d: Daemon, cid: str) -> int:
    """How many messages component `cid` of daemon `d` has handled."""
    return int(row(d, cid)["handled"])  # type: ignore[call-overload]


def _try_call(url: str, subject: str, payload: bytes) -> tuple[bytes, dict[str, str]] | None:
    try:
        return nats_call(url, subject, payload, timeout=2)
    except nats.errors.NoRespondersError:
        return None  # not subscribed yet


BLASTER = component("t/blaster/0", "blaster", 'capabilities = { send = ["t/*"], request = ["t/*"], '
                    'broadcast = ["t/*"] }')
BLASTER_GRANT = '[[lattice.grants]]\nid = "t/blaster/0"\nsend = ["t/counter/*"]\nbroadcast = ["t/counter/*"]\n' \
    'request = ["t/*"]\n'


def test_sends_broadcasts_and_large_payloads_cross_hosts(tmp_path: Path, nats_server: NatsServer,
                                                         daemons: list[Daemon]) -> None:
    a = lattice_daemon(tmp_path / "a", ECHO + component("t/counter/0", "counter"), [nats_server.url], "host-a",
                       daemons, extra=BLASTER_GRANT)
    b = lattice_daemon(tmp_path / "b", BLASTER + component("t/counter/1", "counter"), [nats_server.url], "host-b",
                       daemons)
    wait_for(lambda: b.cli("call", "t/echo/0", "x").returncode == 0, "b sees a's components")
    assert b.call("t/blaster/0", "s5|t|counter|0") == "ok"
    assert b.call("t/blaster/0", "b5|t|counter|0") == "ok"
    wait_for(lambda: a.call("t/counter/0", "") == "3", "both arrived")
    # a remote send the target's host refuses (no grant to send to the echo) is logged on the sender's host
    assert b.call("t/blaster/0", "s5|t|echo|0") == "ok"
    rejected = wait_for_log(b, "lattice_send_rejected")
    assert rejected["target"] == "t/echo/0" and "capability denied" in str(rejected["detail"])
    assert b.call("t/blaster/0", "b5|t|echo|0") == "ok"  # the receiving host checks broadcast as broadcast
    wait_for(lambda: any("may not broadcast to t/echo/0" in str(e.get("detail"))
                         for e in b.events() if e["event"] == "lattice_send_rejected"), "the broadcast is refused")
    # 1 MiB across hosts: the host's own call and a guest's request
    big = tmp_path / "big.bin"
    big.write_bytes(b"0123456789abcdef" * 65536)
    result = b.cli("call", "t/echo/0", f"@{big}")
    assert result.returncode == 0 and result.stdout.rstrip("\n").encode() == big.read_bytes(), result.stderr
    assert b.call("t/blaster/0", "r1048576|t|echo|0") == "ok"
    wait_for(lambda: handled(a, "t/echo/0") >= 3, "the echo handled the 1 MiB request")
    assert a.stop() == 0 and b.stop() == 0


def test_list_components_and_metadata_see_other_hosts(tmp_path: Path, nats_server: NatsServer,
                                                     daemons: list[Daemon]) -> None:
    a = lattice_daemon(tmp_path / "a", ECHO, [nats_server.url], "host-a", daemons)
    b = lattice_daemon(tmp_path / "b", component("t/services/0", "services"), [nats_server.url], "host-b", daemons)
    listed = wait_for(lambda: "t/echo/0" in b.call("t/services/0", "list").split("\n")
                      and b.call("t/services/0", "list"), "b lists a's echo")
    assert set(str(listed).split("\n")) == {"t/services/0", "t/echo/0"}
    assert b.call("t/services/0", "meta t|echo|0").endswith("healthy")
    seen = json.loads(b.cli("status", "--lattice", "--json").stdout)
    assert seen["host"] == "host-b" and seen["connected"] and seen["url"] == nats_server.url
    assert [h["host"] for h in seen["hosts"] if not h["local"]] == ["host-a"]
    assert [(c["id"], c["state"]) for c in seen["components"] if c["host"] == "host-a"] == [("t/echo/0", "running")]
    assert a.stop() == 0
    wait_for(lambda: b.call("t/services/0", "list") == "t/services/0", "a's echo leaves b's directory", 15)
    assert b.stop() == 0


def test_nats_down_at_start_then_up(tmp_path: Path, daemons: list[Daemon]) -> None:
    server = NatsServer(tmp_path / "nats")  # not started yet
    try:
        b = lattice_daemon(tmp_path / "b", CALLER + ECHO.replace("t/echo/0", "t/local/0"), [server.url], "host-b",
                           daemons)  # READY without NATS
        assert wait_for_log(b, "lattice_unreachable")["urls"] == [server.url]
        assert b.call("t/local/0", "still local") == "still local"
        failed = b.cli("call", "t/caller/0", "t|echo|0|x")
        assert "request failed: delivery-failed" in failed.stderr
        remote = b.cli("call", "t/echo/0", "x")
        assert remote.returncode == 1 and "the lattice is unreachable" in remote.stderr
        assert "Connect call failed" in remote.stderr or "cannot connect" in remote.stderr
        server.start()
        assert wait_for_log(b, "lattice_connected")["url"] == server.url
        a = lattice_daemon(tmp_path / "a", ECHO, [server.url], "host-a", daemons, extra=REMOTE_GRANT)
        wait_for(lambda: b.cli("call", "t/echo/0", "now").stdout.rstrip("\n") == "now", "b reaches a's echo")
        assert ask(b, "t/echo/0", "via the guest")["payload"] == "via the guest"
        server.kill()  # NATS goes away while both run: logged, remote fails fast, local is untouched
        wait_for_log(b, "lattice_disconnected")
        assert "delivery-failed" in b.cli("call", "t/caller/0", "t|echo|0|x").stderr
        assert b.call("t/local/0", "fine") == "fine"
        server.start()
        wait_for_log(b, "lattice_reconnected")
        wait_for(lambda: b.cli("call", "t/echo/0", "back").stdout.rstrip("\n") == "back", "b reaches a's echo again")
        assert a.stop() == 0 and b.stop() == 0
    finally:
        server.kill()


def test_a_host_killed_mid_request_ends_it_and_replicas_take_new_ones(tmp_path: Path, nats_server: NatsServer,
                                                                       daemons: list[Daemon]) -> None:
    a = lattice_daemon(tmp_path / "a", SERVED, [nats_server.url], "host-a", daemons, extra=REMOTE_GRANT)
    c = lattice_daemon(tmp_path / "c", ECHO, [nats_server.url], "host-c", daemons, extra=REMOTE_GRANT)
    b = lattice_daemon(tmp_path / "b", CALLER, [nats_server.url], "host-b", daemons)
    wait_for(lambda: b.cli("call", "t/slow/0", "self").stdout.rstrip("\n") == "t/slow/0", "b sees a")
    before = int(b.call("t/caller/0", "?callbacks") or 0)
    b.call("t/caller/0", "t|slow|0|sleep 4000")
    wait_for(lambda: row(a, "t/slow/0")["in_hand"] == 1, "a's guest handles the request", 10)
    a.proc.kill()
    a.proc.wait()
    wait_for(lambda: int(b.call("t/caller/0", "?callbacks") or 0) > before, "the pending request ends", 10)
    report = json.loads(b.call("t/caller/0", "?last-payload"))
    assert report == {"outcome": "target-stopped",
                      "detail": "host host-a left the lattice (no heartbeat) with the request"}
    gone = b.cli("call", "t/slow/0", "self")  # only a ran it: NATS has no responders, or the directory forgot it
    assert gone.returncode == 1 and "target-not-found: t/slow/0" in gone.stderr
    for n in range(5):  # the echo's other replica answers every new request
        assert ask(b, "t/echo/0", f"after {n}")["payload"] == f"after {n}"
    assert c.stop() == 0 and b.stop() == 0


def test_replicas_on_two_hosts_share_the_load(tmp_path: Path, nats_server: NatsServer,
                                              daemons: list[Daemon]) -> None:
    hasher = component("t/hash/0", "hasher", "accept_external = true")
    a = lattice_daemon(tmp_path / "a", hasher, [nats_server.url], "host-a", daemons)
    b = lattice_daemon(tmp_path / "b", hasher, [nats_server.url], "host-b", daemons)
    wait_for_log(a, "lattice_connected")
    wait_for_log(b, "lattice_connected")

    async def many() -> list[str]:
        nc = await nats.connect(nats_server.url)
        try:
            answers = await asyncio.gather(*(nc.request("wasmhost.default.in.t.hash.0", b"20000", timeout=20)
                                             for _ in range(60)))
            return [m.headers["Wasmhost-Host"] for m in answers if m.headers]
        finally:
            await nc.close()

    wait_for(lambda: _try_call(nats_server.url, "wasmhost.default.in.t.hash.0", b"1"), "both replicas subscribed")
    hosts = asyncio.run(many())
    assert len(hosts) == 60
    assert hosts.count("host-a") > 0 and hosts.count("host-b") > 0
    assert handled(a, "t/hash/0") + handled(b, "t/hash/0") >= 60
    assert a.stop() == 0 and b.stop() == 0


def test_payloads_too_large_for_the_target_or_for_nats_fail_fast_naming_both_sizes(tmp_path: Path,
                                                                                    daemons: list[Daemon]) -> None:
    server = NatsServer(tmp_path / "nats", max_payload=1024 * 1024).start()  # nats-server's default
    try:
        a = lattice_daemon(tmp_path / "a", ECHO + component("t/small/0", "echo", "max_message_bytes = 1000"),
                           [server.url], "host-a", daemons, extra=BLASTER_GRANT)
        b = lattice_daemon(tmp_path / "b", BLASTER, [server.url], "host-b", daemons)
        wait_for(lambda: b.cli("call", "t/small/0", "x").returncode == 0, "b sees a's components")
        assert b.call("t/blaster/0", "r2000|t|small|0") == ("err 2 payload of 2000 bytes exceeds the limit of 1000 "
                                                             "bytes (max_message_bytes of t/small/0)")
        assert b.call("t/blaster/0", "r1048576|t|echo|0") == (
            "err 2 payload of 1048576 bytes does not fit the NATS server's max_payload of 1048576 bytes (with 1024 "
            "bytes for headers)")
        assert b.call("t/blaster/0", "r4096|t|echo|0") == "ok"
        assert a.stop() == 0 and b.stop() == 0
    finally:
        server.kill()


def test_a_guest_cancels_its_request_to_another_host(tmp_path: Path, nats_server: NatsServer,
                                                     daemons: list[Daemon]) -> None:
    a, b = served_and_caller(tmp_path, nats_server, daemons)
    # answered by host a after 3 s (within the guest's 5 s), time for the cancel on a loaded machine too
    correlation = b.call("t/caller/0", "t|slow|0|sleep 3000")
    assert b.call("t/caller/0", f"!{correlation}") == "cancelled"
    assert b.call("t/caller/0", f"!{correlation}") == "cancel failed: invalid-message"  # nothing pending now
    dropped = wait_for_log(b, "late_response_dropped", correlation_id=correlation)  # a's answer came, unheard
    assert dropped["remote"] is True
    assert b.call("t/caller/0", "?callbacks") == "0"
    assert ask(b, "t/echo/0", "after the cancel")["payload"] == "after the cancel"  # the next one is heard
    assert b.call("t/caller/0", "?callbacks") == "1"
    assert a.stop() == 0 and b.stop() == 0


def test_hosts_and_the_cli_reach_nats_over_mutual_tls_and_a_wrong_ca_is_named(tmp_path: Path,
                                                                              daemons: list[Daemon]) -> None:
    ca = trustme.CA()
    files = tmp_path / "tls"
    files.mkdir()
    ca.cert_pem.write_to_path(str(files / "ca.pem"))
    server_cert = ca.issue_cert("127.0.0.1")
    server_cert.private_key_and_cert_chain_pem.write_to_path(str(files / "server.pem"))
    client_cert = ca.issue_cert("host-a")
    client_cert.cert_chain_pems[0].write_to_path(str(files / "client.pem"))
    client_cert.private_key_pem.write_to_path(str(files / "client-key.pem"))
    trustme.CA().cert_pem.write_to_path(str(files / "other-ca.pem"))
    server = NatsServer(tmp_path / "nats", tls=f'cert_file: "{files / "server.pem"}"\n key_file: '
                        f'"{files / "server.pem"}"\n ca_file: "{files / "ca.pem"}"\n verify: true').start()
    try:
        url = f"tls://127.0.0.1:{server.port}"
        tls = (f'tls = {{ ca = "{files / "ca.pem"}", cert = "{files / "client.pem"}", '
               f'key = "{files / "client-key.pem"}" }}')
        a = lattice_daemon(tmp_path / "a", component("t/echo/0", "echo", "accept_external = true"), [url], "host-a",
                           daemons, extra=tls)
        assert wait_for_log(a, "lattice_connected")["url"] == url
        stranger = lattice_daemon(tmp_path / "b", component("t/other/0", "echo"), [url], "host-b", daemons,
                                  extra=tls.replace("ca.pem", "other-ca.pem"))
        refused = wait_for_log(stranger, "lattice_unreachable")
        assert "certificate verify failed" in str(refused["cause"]), refused  # the server's certificate: not its CA
        config = tmp_path / "cli.toml"
        config.write_text(config_text(tmp_path / "cli-state", lattice_section([url], "cli", extra=tls), FIXTURES))
        wait_for(lambda: wasmhost("call", "--lattice", "--config", str(config), "t/echo/0",
                                  "over tls").stdout == "over tls", "the CLI reaches the echo")
        assert a.stop() == 0 and stranger.stop() == 0
    finally:
        server.kill()


def _churned_under_load(url: str, target: str, off: Callable[[], None], on: Callable[[], None]
                        ) -> collections.Counter[str]:
    """Take `target` off (`off`) and on again 10 times while 100 plain clients request it on P.in., each time
    once NATS says nobody subscribes it and once it answers again; how their requests ended."""
    outcomes: collections.Counter[str] = collections.Counter()
    done = threading.Event()
    subject = "wasmhost.default.in." + target.replace("/", ".")

    def clients() -> None:
        async def loop(nc: nats.NATS) -> None:
            while not done.is_set():
                try:  # the host answers within Wasmhost-Timeout-Ms; the client's timeout only catches silence
                    answer = await nc.request(subject, b"x", timeout=10, headers={wire.TIMEOUT_MS: "2000"})
                    headers = answer.headers or {}
                    outcomes[headers.get(wire.OUTCOME, "?")] += 1
                    if "does not accept messages from external clients" in headers.get(wire.DETAIL, ""):
                        outcomes["said it does not accept external clients"] += 1
                except nats.errors.NoRespondersError:
                    outcomes["no-responders"] += 1
                except nats.errors.TimeoutError:
                    outcomes["no answer"] += 1

        async def main() -> None:
            nc = await nats.connect(url)
            await asyncio.gather(*(loop(nc) for _ in range(100)))
            await nc.close()

        asyncio.run(main())

    load = threading.Thread(target=clients)
    load.start()
    try:
        wait_for(lambda: outcomes["reply"] > 100, "requests answered")
        for _ in range(10):
            off()
            unsubscribed = outcomes["no-responders"]
            wait_for(lambda: outcomes["no-responders"] > unsubscribed, f"NATS knows {target} is gone")  # noqa: B023
            on()
            replies = outcomes["reply"]
            wait_for(lambda: outcomes["reply"] > replies, f"{target} answers again")  # noqa: B023
    finally:
        done.set()
        load.join()
    return outcomes


def test_requests_nats_delivered_as_a_component_stops_are_answered(tmp_path: Path, nats_server: NatsServer,
                                                                  daemons: list[Daemon]) -> None:
    """A component that stops leaves its subjects by draining them: what NATS had already sent it is answered.
    Unsubscribed plainly, nats-py dropped those messages: about 2 requests per stop heard nothing at all."""
    a = lattice_daemon(tmp_path / "a", component("t/echo/0", "echo", "accept_external = true"), [nats_server.url],
                       "host-a", daemons)
    wait_for(lambda: _try_call(nats_server.url, "wasmhost.default.in.t.echo.0", b"x"), "the echo answers")
    outcomes = _churned_under_load(nats_server.url, "t/echo/0",
                                   lambda: _control(a, protocol.Stop(id="t/echo/0")),
                                   lambda: _control(a, protocol.Start(id="t/echo/0")))
    assert outcomes["no answer"] == 0, outcomes
    assert a.stop() == 0


def test_a_client_message_nats_delivers_as_a_reload_removes_the_component_is_target_not_found(
        tmp_path: Path, nats_server: NatsServer, daemons: list[Daemon]) -> None:
    """What NATS delivers for a component a reload has just removed is answered target-not-found: it was
    answered that the component does not set accept_external (which it does)."""
    echo = component("t/echo/0", "echo", "accept_external = true")
    a = lattice_daemon(tmp_path / "a", echo + component("t/other/0", "counter"), [nats_server.url], "host-a",
                       daemons)
    wait_for(lambda: _try_call(nats_server.url, "wasmhost.default.in.t.echo.0", b"x"), "the echo answers")
    with_echo = a.config.read_text()

    def reload(text: str) -> None:
        a.config.write_text(text)
        _control(a, protocol.Reload())

    outcomes = _churned_under_load(nats_server.url, "t/echo/0", lambda: reload(with_echo.replace(echo, "")),
                                   lambda: reload(with_echo))
    assert outcomes["said it does not accept external clients"] == 0, outcomes
    assert outcomes["no answer"] == 0, outcomes
    assert a.stop() == 0


def _control(d: Daemon, message: protocol.Request) -> None:
    assert request(d.socket, message).ok
