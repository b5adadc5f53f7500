"""The lattice end to end: real daemons (subprocesses) on a real nats-server, loopback only."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import nats
import nats.errors

from tests import lattice_support
from tests.lattice_support import NatsServer, lattice_daemon, wait_for_log
from tests.test_daemon import Daemon, component

nats_server = lattice_support.nats_server  # the fixtures this module uses
daemons = lattice_support.daemons

ECHO = component("t/echo/0", "echo")


def until(what: str, check: object, timeout: float = 30.0) -> object:
    """Call `check` until it returns something true (bounded); that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()  # type: ignore[operator]
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.05)  # the daemons are subprocesses: polling their answers is all there is


def test_a_host_calls_a_component_on_another_host(tmp_path: Path, nats_server: NatsServer,
                                                  daemons: list[Daemon]) -> None:
    a = lattice_daemon(tmp_path / "a", ECHO, [nats_server.url], "host-a", daemons)
    b = lattice_daemon(tmp_path / "b", component("t/other/0", "counter"), [nats_server.url], "host-b", daemons)
    wait_for_log(b, "lattice_connected")
    until("b sees the echo", lambda: b.cli("call", "t/echo/0", "across").stdout.rstrip("\n") == "across")
    assert a.stop() == 0 and b.stop() == 0


REMOTE_GRANT = '[[lattice.grants]]\nid = "t/caller/0"\nrequest = ["t/*"]\nsend = ["t/*"]\nbroadcast = ["t/*"]\n'
SERVED = (ECHO + component("t/quiet/0", "pinger") + component("t/trap/0", "trapper")
          + component("t/slow/0", "services"))
CALLER = component("t/caller/0", "callback", 'capabilities = { request = ["t/*"] }')


def ask(d: Daemon, target: str, data: str) -> dict[str, str]:
    """Have the callback guest on `d` request `data` from `target`; wait for the callback and read it."""
    before = int(d.call("t/caller/0", "?callbacks") or 0)
    d.call("t/caller/0", f"{target.replace('/', '|')}|{data}")
    until(f"a callback from {target}", lambda: int(d.call("t/caller/0", "?callbacks") or 0) > before, 20)
    return {what: d.call("t/caller/0", f"?last-{what}") for what in ("payload", "content-type", "sender")}


def test_guest_requests_across_hosts_end_with_every_outcome(tmp_path: Path, nats_server: NatsServer,
                                                             daemons: list[Daemon]) -> None:
    a = lattice_daemon(tmp_path / "a", SERVED, [nats_server.url], "host-a", daemons, extra=REMOTE_GRANT)
    b = lattice_daemon(tmp_path / "b", CALLER, [nats_server.url], "host-b", daemons)
    until("b sees a's components", lambda: b.cli("call", "t/echo/0", "x").returncode == 0)
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
    until("b sees a's components", lambda: b.cli("call", "t/echo/0", "x").returncode == 0)
    denied = ask(b, "t/echo/0", "let me in")
    report = json.loads(denied["payload"])
    assert report["outcome"] == "failed"
    assert "capability denied: t/caller/0 may not request to t/echo/0" in report["detail"]
    assert "rejected" in report["detail"]
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
    data, headers = until("the echo answers", lambda: _try_call(nats_server.url, "wasmhost.default.msg.t.echo.0",
                                                               b"hello"))
    assert data == b"hello" and headers["Wasmhost-Outcome"] == "reply" and headers["Wasmhost-Host"] == "host-a"
    data, headers = nats_call(nats_server.url, "wasmhost.default.msg.t.counter.0", b"x")
    assert headers["Wasmhost-Outcome"] == "rejected" and headers["Wasmhost-Error"] == "delivery-failed"
    assert "t/counter/0 does not accept messages from external clients" in headers["Wasmhost-Detail"]
    data, headers = nats_call(nats_server.url, "wasmhost.default.msg.t.echo.0", b"fire",
                              {"Wasmhost-Kind": "send", "Wasmhost-Sender": "t/counter/0"})
    assert headers["Wasmhost-Outcome"] == "queued"  # a send, acknowledged once in the mailbox
    assert a.call("t/counter/0", "") == "1"  # the refused message never reached it
    assert a.stop() == 0


def handled(d: Daemon, cid: str) -> int:
    """How many messages component `cid` of daemon `d` has handled (its status row)."""
    rows = json.loads(d.cli("status", "--json").stdout)["components"]
    return int(next(r["handled"] for r in rows if r["id"] == cid))


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
    until("b sees a's components", lambda: b.cli("call", "t/echo/0", "x").returncode == 0)
    assert b.call("t/blaster/0", "s5|t|counter|0") == "ok"
    assert b.call("t/blaster/0", "b5|t|counter|0") == "ok"
    until("both arrived", lambda: a.call("t/counter/0", "") == "3")
    # a remote send the target's host refuses (no grant to send to the echo) is logged on the sender's host
    assert b.call("t/blaster/0", "s5|t|echo|0") == "ok"
    rejected = wait_for_log(b, "lattice_send_rejected")
    assert rejected["target"] == "t/echo/0" and "capability denied" in str(rejected["detail"])
    # 1 MiB across hosts: the host's own call and a guest's request
    big = tmp_path / "big.bin"
    big.write_bytes(b"0123456789abcdef" * 65536)
    result = b.cli("call", "t/echo/0", f"@{big}")
    assert result.returncode == 0 and result.stdout.rstrip("\n").encode() == big.read_bytes(), result.stderr
    assert b.call("t/blaster/0", "r1048576|t|echo|0") == "ok"
    until("the echo handled the 1 MiB request", lambda: handled(a, "t/echo/0") >= 3)
    assert a.stop() == 0 and b.stop() == 0


def test_list_components_and_metadata_see_other_hosts(tmp_path: Path, nats_server: NatsServer,
                                                     daemons: list[Daemon]) -> None:
    a = lattice_daemon(tmp_path / "a", ECHO, [nats_server.url], "host-a", daemons)
    b = lattice_daemon(tmp_path / "b", component("t/services/0", "services"), [nats_server.url], "host-b", daemons)
    listed = until("b lists a's echo", lambda: "t/echo/0" in b.call("t/services/0", "list").split("\n")
                   and b.call("t/services/0", "list"))
    assert set(str(listed).split("\n")) == {"t/services/0", "t/echo/0"}
    assert b.call("t/services/0", "meta t|echo|0").endswith("healthy")
    assert a.stop() == 0
    until("a's echo leaves b's directory", lambda: b.call("t/services/0", "list") == "t/services/0", 15)
    assert b.stop() == 0
