"""A three-node NATS cluster (routes on loopback) under two daemons connected to different nodes: traffic
flows between them, one NATS node is killed mid-traffic, the daemon on it reconnects to another node, every
request ends with an outcome (the host's requests an answer, a guest's requests exactly one callback), and
traffic resumes; then the other daemon's node too. Real nats-servers, real daemons, the real control socket."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.lattice_support import NatsServer, lattice_daemon, running_cluster, wait_for_log
from tests.test_daemon import Daemon, component
from tests.waits import wait_for
from wasmhost.system import protocol
from wasmhost.system.client import request

CALL_TIMEOUT = 5.0
"""Seconds each request may take before the daemon answers `timeout` (the outcome the test then sees)."""
SETTLE_TIMEOUT = 60.0
"""Seconds for the directory to settle, and for traffic to flow again after the node is killed."""


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[NatsServer]]:
    """Three nats-servers routed to each other on loopback, killed at teardown."""
    with running_cluster(tmp_path / "nats") as servers:
        yield servers


def sees(d: Daemon, cid: str, host: str) -> bool:
    """Whether `d`'s lattice directory lists `cid` on `host`."""
    response = request(d.socket, protocol.LatticeStatus(), timeout=10.0)
    return response.ok and any(c["id"] == cid and c["host"] == host for c in response.data["components"])


@dataclass
class Result:
    """One request's ending: when it was sent, and its reply or error."""

    sent_at: float
    payload: bytes
    ok: bool
    answer: bytes | str | None


class Traffic:
    """A thread calling `cid` through daemon `d`'s control socket, one request after another (payload
    `payload % n` for the n-th), each with CALL_TIMEOUT; every request's ending is recorded (a request with
    no answer at all fails the test)."""

    def __init__(self, d: Daemon, cid: str, payload: str = "ping %d") -> None:
        self.d, self.cid, self.payload = d, cid, payload
        self.results: list[Result] = []
        self.lost: list[str] = []  # requests the daemon never answered (must stay empty)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=CALL_TIMEOUT * 4)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            payload, sent = (self.payload % n).encode(), time.monotonic()
            try:
                response = request(self.d.socket, protocol.Call(self.cid, payload, CALL_TIMEOUT),
                                   timeout=CALL_TIMEOUT * 3)
            except Exception as exc:  # no answer from the daemon: a request without an outcome
                self.lost.append(f"{payload!r}: {type(exc).__name__}: {exc}")
                continue
            self.results.append(Result(sent, payload, response.ok,
                                       response.data if response.ok else response.error))

    def replies_since(self, moment: float) -> int:
        """Requests sent after `moment` that were answered ok."""
        return sum(1 for r in self.results if r.sent_at > moment and r.ok)


def callbacks(d: Daemon, client: str) -> int:
    """How many callbacks (replies and outcomes) the callback fixture `client` on `d` has had."""
    response = request(d.socket, protocol.Call(client, b"?callbacks", CALL_TIMEOUT), timeout=CALL_TIMEOUT * 3)
    assert response.ok, response.error
    return int(response.data)


def test_a_killed_nats_node_costs_outcomes_not_requests(tmp_path: Path, cluster: list[NatsServer],
                                                        started: list[Daemon]) -> None:
    n0, n1, n2 = cluster
    # Each daemon is given one node only: the others it learns from the cluster (NATS gossips their URLs).
    # Host A's guest t/client/0 requests host B's echo too (granted on host B), each request one callback.
    client = component("t/client/0", "callback", 'capabilities = { request = ["t/echo/*"] }')
    a = lattice_daemon(tmp_path / "a", client, [n0.url], "host-a", started)
    b = lattice_daemon(tmp_path / "b", component("t/echo/0", "echo"), [n1.url], "host-b", started,
                       extra='[[lattice.grants]]\nid = "t/client/0"\nrequest = ["t/echo/*"]\n')
    wait_for(lambda: sees(a, "t/echo/0", "host-b"), "host-a sees host-b's echo", SETTLE_TIMEOUT)

    with Traffic(a, "t/echo/0") as traffic, Traffic(a, "t/client/0", "t|echo|0|guest %d") as guests:
        wait_for(lambda: traffic.replies_since(0) >= 20, "20 replies across hosts before the kill", SETTLE_TIMEOUT)
        killed_at = time.monotonic()
        n0.kill()  # host-a's node, mid-traffic
        wait_for(lambda: traffic.replies_since(killed_at + 0.001) >= 20, "20 replies after host-a's node died",
                 SETTLE_TIMEOUT)
        killed_at = time.monotonic()
        n1.kill()  # then host-b's: both daemons end up on the last node
        wait_for(lambda: traffic.replies_since(killed_at + 0.001) >= 20, "20 replies after host-b's node died",
                 SETTLE_TIMEOUT)

    assert not traffic.lost, traffic.lost
    for r in traffic.results:  # every request ended with its echo or an error naming what happened
        if r.ok:
            assert r.answer == r.payload
        else:
            assert isinstance(r.answer, str) and r.answer, r
    assert traffic.results[-1].ok
    # The guest's requests: each one it made (the call returned its correlation id) ends with a callback,
    # its reply or an outcome (timeout after 5 s at most); one the link refused at once failed in the guest.
    assert not guests.lost, guests.lost
    made = sum(1 for r in guests.results if r.ok)
    assert made >= 20 and guests.results[-1].ok
    assert all(isinstance(r.answer, str) and "request failed: " in r.answer for r in guests.results if not r.ok)
    wait_for(lambda: callbacks(a, "t/client/0") == made, f"a callback for each of the {made} guest requests",
             timeout=15.0)
    assert a.proc.poll() is None and b.proc.poll() is None
    for d in (a, b):  # each logged losing its node and where it went; both are on the one node left now
        wait_for_log(d, "lattice_disconnected", timeout=5.0)
        wait_for_log(d, "lattice_reconnected", timeout=5.0)
        moves = [e["url"] for e in d.events() if e.get("event") == "lattice_reconnected"]
        assert moves[-1] == n2.url, moves  # learnt from the cluster: each daemon was given one node only
