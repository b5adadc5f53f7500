"""The lattice end to end: real daemons (subprocesses) on a real nats-server, loopback only."""

from __future__ import annotations

import json
import time
from pathlib import Path

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
