"""The lattice under faults a client or the NATS server can cause: oversized answers, a connection the
server closes. Real nats-servers (1 MiB max_payload, nats-server's default) and real daemons."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nats
import pytest
from nats.aio.msg import Msg

from tests import lattice_support
from tests.lattice_support import NatsServer, lattice_daemon, running_cluster, wait_for_log
from tests.test_daemon import ROOT, Daemon, component
from tests.test_lattice import BLASTER, CALLER, ECHO, REMOTE_GRANT, _try_call, row
from tests.waits import wait_for

nats_server = lattice_support.nats_server  # the fixtures this module uses
daemons = lattice_support.daemons

MAX_PAYLOAD = 1024 * 1024
OPEN_ECHO = component("t/echo/0", "echo", "accept_external = true")
ECHO_SUBJECT = "wasmhost.default.in.t.echo.0"  # where plain clients send
HEARTBEAT_S = 0.5
"""lattice_daemon's heartbeat interval."""


@pytest.fixture
def small_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server with the default max_payload of 1 MiB, killed at teardown."""
    server = NatsServer(tmp_path / "nats", max_payload=MAX_PAYLOAD).start()
    yield server
    server.kill()


def request_max_payload(url: str) -> dict[str, str] | str:
    """A plain client's request of exactly max_payload bytes to the open echo: the answer's headers, or the
    name of the error the client got instead (the echo's reply and its headers cannot fit max_payload)."""
    async def go() -> dict[str, str] | str:
        nc = await nats.connect(url)
        try:
            answer = await nc.request(ECHO_SUBJECT, b"x" * MAX_PAYLOAD, timeout=3)
            return dict(answer.headers or {})
        except Exception as exc:
            return type(exc).__name__
        finally:
            await nc.close()

    return asyncio.run(go())


def test_a_closed_connection_does_not_end_the_daemon(tmp_path: Path, small_server: NatsServer,
                                                      daemons: list[Daemon]) -> None:
    a = lattice_daemon(tmp_path / "a", OPEN_ECHO + component("t/local/0", "echo"), [small_server.url], "host-a",
                       daemons)
    wait_for(lambda: _try_call(small_server.url, ECHO_SUBJECT, b"hi"), "the echo answers")
    request_max_payload(small_server.url)  # nats-server closed host-a's connection for the oversized answer
    for action in ("stop", "start"):  # the link subscribes anew (on whatever connection it has) at its next tick
        assert a.cli(action, "t/local/0").returncode == 0
        time.sleep(3 * HEARTBEAT_S)  # with the link closed, nothing outside the daemon shows the tick
    assert a.proc.poll() is None and a.call("t/local/0", "still here") == "still here"
    assert a.stop() == 0


def test_the_link_connects_again_after_the_server_closed_it(tmp_path: Path, small_server: NatsServer,
                                                             daemons: list[Daemon]) -> None:
    a = lattice_daemon(tmp_path / "a", OPEN_ECHO, [small_server.url], "host-a", daemons)
    wait_for(lambda: _try_call(small_server.url, ECHO_SUBJECT, b"hi"), "the echo answers")
    request_max_payload(small_server.url)  # may make nats-server close host-a's connection
    wait_for(lambda: _try_call(small_server.url, ECHO_SUBJECT, b"again"), "the echo answers again", 15)
    assert json.loads(a.cli("status", "--lattice", "--json").stdout)["connected"]
    assert a.stop() == 0


def test_a_reply_too_large_for_nats_ends_failed_naming_both_sizes(tmp_path: Path, small_server: NatsServer,
                                                                  daemons: list[Daemon]) -> None:
    a = lattice_daemon(tmp_path / "a", OPEN_ECHO + component("t/big/0", "blaster"), [small_server.url], "host-a",
                       daemons)
    b = lattice_daemon(tmp_path / "b", component("t/other/0", "echo"), [small_server.url], "host-b", daemons)
    wait_for(lambda: b.cli("call", "t/big/0", "R10").returncode == 0, "b sees a")
    too_large = "the reply is too large for NATS: 1048576 bytes (with "
    answer = request_max_payload(small_server.url)  # a plain client: its echo fits, the headers do not
    assert isinstance(answer, dict) and answer["Wasmhost-Outcome"] == "failed", answer
    assert too_large in answer["Wasmhost-Detail"] and "max_payload of 1048576 bytes" in answer["Wasmhost-Detail"]
    began = time.monotonic()
    called = b.cli("call", "t/big/0", f"R{MAX_PAYLOAD}", "--timeout", "20")  # another host's request
    assert called.returncode == 1 and "failed" in called.stderr and too_large in called.stderr, called.stderr
    assert time.monotonic() - began < 10  # not its timeout
    assert b.cli("call", "t/big/0", "R10").returncode == 0
    assert not [e for e in a.events() if e["event"] in ("lattice_disconnected", "lattice_closed")]
    assert a.stop() == 0 and b.stop() == 0


def heartbeat(host: str, heartbeat_s: float) -> bytes:
    """A heartbeat of `host` as any client could publish it."""
    return json.dumps({"host": host, "seq": 1, "started_at": 1.0, "heartbeat_s": heartbeat_s,
                       "inventory_version": 0}).encode()


def test_clients_cannot_make_a_host_speak_on_lattice_subjects(tmp_path: Path, small_server: NatsServer,
                                                              daemons: list[Daemon]) -> None:
    a = lattice_daemon(tmp_path / "a", OPEN_ECHO, [small_server.url], "host-a", daemons)
    wait_for(lambda: _try_call(small_server.url, ECHO_SUBJECT, b"hi"), "the echo answers")

    async def client() -> list[bytes]:
        nc = await nats.connect(small_server.url)
        try:
            heard: list[bytes] = []

            async def note(msg: Msg) -> None:
                heard.append(msg.data)

            watch = await nc.subscribe("wasmhost.default.hb.ghost", cb=note)
            # the echo would answer a forged heartbeat of a host that never leaves
            await nc.publish(ECHO_SUBJECT, heartbeat("ghost", 1e300), reply="wasmhost.default.hb.ghost")
            await nc.request(ECHO_SUBJECT, b"after", timeout=5)  # the echo answers in order: this one after
            await watch.unsubscribe()
            # forgeries a client publishes itself: a heartbeat of years, one on another host's subject
            await nc.publish("wasmhost.default.hb.ghost", heartbeat("ghost", 1e300))
            await nc.publish("wasmhost.default.hb.spoofed", heartbeat("ghost", 1.0))
            await nc.publish("wasmhost.default.hb.marker", heartbeat("marker", 1.0))
            await nc.flush()
            return heard
        finally:
            await nc.close()

    assert asyncio.run(client()) == []

    def hosts() -> list[str]:
        seen = json.loads(a.cli("status", "--lattice", "--json").stdout)
        return [h["host"] for h in seen["hosts"] if not h["local"]]

    wait_for(lambda: "marker" in hosts(), "host-a hears the marker heartbeat")  # heard after the forged ones
    assert hosts() == ["marker"]
    assert a.stop() == 0


def test_a_stopped_replica_takes_no_more_messages(tmp_path: Path, nats_server: NatsServer,
                                                  daemons: list[Daemon]) -> None:
    a, b = (lattice_daemon(tmp_path / h, OPEN_ECHO, [nats_server.url], f"host-{h}", daemons, heartbeat_s=20)
            for h in "ab")  # slow heartbeats: the stop alone must drop the subscription
    wait_for(lambda: len({_try_call(nats_server.url, ECHO_SUBJECT, b"x")[1]["Wasmhost-Host"]
                          for _ in range(20)}) == 2, "both replicas answer")
    assert a.cli("stop", "t/echo/0").returncode == 0

    async def requests() -> list[tuple[str, str]]:
        nc = await nats.connect(nats_server.url)
        try:
            answers = [await nc.request(ECHO_SUBJECT, b"x", timeout=5) for _ in range(20)]
            return [(m.headers or {}).get("Wasmhost-Host", "") + " " + (m.headers or {}).get("Wasmhost-Outcome", "")
                    for m in answers]
        finally:
            await nc.close()

    assert asyncio.run(requests()) == ["host-b reply"] * 20
    assert a.stop() == 0 and b.stop() == 0


def test_a_dead_host_leaves_at_its_own_heartbeat_not_at_ours(tmp_path: Path, nats_server: NatsServer,
                                                              daemons: list[Daemon]) -> None:
    b = lattice_daemon(tmp_path / "b", component("t/slow/0", "services"), [nats_server.url], "host-b", daemons,
                       heartbeat_s=0.5, extra=REMOTE_GRANT)
    a = lattice_daemon(tmp_path / "a", CALLER, [nats_server.url], "host-a", daemons, heartbeat_s=20)
    wait_for(lambda: a.cli("call", "t/slow/0", "self").returncode == 0, "a sees b")
    a.call("t/caller/0", "t|slow|0|sleep 4500")  # the callback guest's requests wait 5 s
    wait_for(lambda: row(b, "t/slow/0")["in_hand"] == 1, "b handles it", 10)
    b.proc.kill()
    wait_for(lambda: a.call("t/caller/0", "?callbacks") == "1", "a's request ends", 10)
    assert json.loads(a.call("t/caller/0", "?last-payload")) == {
        "outcome": "target-stopped", "detail": "host host-b left the lattice (no heartbeat) with the request"}
    assert a.stop() == 0


@pytest.mark.parametrize("replicas", [1, 2])  # 1: placed when sent; 2: the replica that takes it says so (queued)
def test_the_hosts_own_call_ends_when_the_host_holding_it_dies(tmp_path: Path, nats_server: NatsServer,
                                                                daemons: list[Daemon], replicas: int) -> None:
    servers = [lattice_daemon(tmp_path / f"s{n}", component("t/slow/0", "services"), [nats_server.url],
                              f"host-s{n}", daemons) for n in range(replicas)]
    b = lattice_daemon(tmp_path / "b", component("t/other/0", "echo"), [nats_server.url], "host-b", daemons)

    def replicas_seen() -> int:
        rows = json.loads(b.cli("status", "--lattice", "--json").stdout)["components"]
        return sum(row["id"] == "t/slow/0" for row in rows)

    wait_for(lambda: replicas_seen() == replicas, "b sees every replica")
    call = subprocess.Popen([sys.executable, "-m", "wasmhost.cli", "call", "t/slow/0", "sleep 20000", "--timeout",
                             "30", "--socket", str(b.socket)], stderr=subprocess.PIPE, text=True, cwd=ROOT)
    holder = wait_for(lambda: next((s for s in servers if row(s, "t/slow/0")["in_hand"]), None),
                      "a replica handles it", 10)
    assert isinstance(holder, Daemon)
    holder.proc.kill()
    try:
        _, err = call.communicate(timeout=10)  # three of its heartbeats (1.5 s), not the call's 30 s
    finally:
        call.kill()
    name = f"host-s{servers.index(holder)}"
    assert f"target-stopped: host {name} left the lattice (no heartbeat) with the request" in err
    assert all(s.stop() == 0 for s in servers if s is not holder) and b.stop() == 0


@pytest.mark.parametrize("replicas", [1, 2])
def test_call_lattice_ends_when_the_host_holding_it_dies(tmp_path: Path, nats_server: NatsServer,
                                                          daemons: list[Daemon], replicas: int) -> None:
    """`call --lattice` (the CLI as a plain NATS client) asks for the `queued` acknowledgement, then watches
    the heartbeats of the host it names: its death ends the call like a daemon's own (test above)."""
    servers = [lattice_daemon(tmp_path / f"s{n}", component("t/slow/0", "services", "accept_external = true"),
                              [nats_server.url], f"host-s{n}", daemons) for n in range(replicas)]
    config = servers[0].config
    cli = [sys.executable, "-m", "wasmhost.cli", "call", "--lattice", "--config", str(config)]
    wait_for(lambda: subprocess.run([*cli, "t/slow/0", "self"], capture_output=True,
                                    cwd=ROOT, timeout=30).returncode == 0, "the target is subscribed")
    call = subprocess.Popen([*cli, "t/slow/0", "sleep 20000", "--timeout", "30"], stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)
    try:
        holder = wait_for(lambda: next((s for s in servers if row(s, "t/slow/0")["in_hand"]), None),
                          "a replica handles it", 10)
        assert isinstance(holder, Daemon)
        time.sleep(4 * HEARTBEAT_S)  # the CLI has heard the holder's heartbeats (before any: test_lattice_cli.py)
        holder.proc.kill()
        killed = time.monotonic()
        _, err = call.communicate(timeout=10)  # three of its heartbeats (1.5 s), not the call's 30 s
        took = time.monotonic() - killed
    finally:
        call.kill()
    name = f"host-s{servers.index(holder)}"
    assert call.returncode == 1
    assert err == f"wasmhost: t/slow/0: target-stopped: host {name} left the lattice (no heartbeat) with the request\n"
    assert took < 5, took
    assert all(s.stop() == 0 for s in servers if s is not holder)


def test_cancelled_remote_requests_leave_nothing_behind(tmp_path: Path, nats_server: NatsServer,
                                                        daemons: list[Daemon]) -> None:
    # host-a's guest still has the cancelled requests' sleeps queued (20 s) when it is stopped: its stop drains
    # for drain_timeout_s (5 s by default), then interrupts them. What is left behind is on host-b.
    a = lattice_daemon(tmp_path / "a", component("t/slow/0", "services"), [nats_server.url], "host-a", daemons,
                       extra=REMOTE_GRANT, drain_timeout_s=0.5)
    b = lattice_daemon(tmp_path / "b", CALLER, [nats_server.url], "host-b", daemons, heartbeat_s=3600)
    wait_for(lambda: b.cli("call", "t/slow/0", "self").returncode == 0, "b sees a")
    for _ in range(10):  # each waits on host-a (slow to answer) until the guest cancels it
        correlation = b.call("t/caller/0", "t|slow|0|sleep 2000")
        assert b.call("t/caller/0", f"!{correlation}") == "cancelled"
    assert json.loads(b.cli("status", "--lattice", "--json").stdout)["remote_requests"] == 0
    assert a.stop() == 0 and b.stop() == 0


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[list[NatsServer]]:
    """Two nats-servers routed to each other, killed at teardown (stopped or not)."""
    with running_cluster(tmp_path / "nats", 2) as servers:
        yield servers


def test_a_host_whose_server_stalls_connects_to_another(tmp_path: Path, pair: list[NatsServer],
                                                        daemons: list[Daemon]) -> None:
    """A host whose NATS server stops reading (a stalled process: SIGSTOP here) with megabytes of the host's
    publishes still to send found the connection stale after a few pings, then waited for nats-py to close it,
    which it does only once those bytes have gone out: the host stayed off the lattice, nothing logged, for as
    long as the server stayed stopped (98 s and on), while the other server its urls name was up. Now it gives
    the stalled connection up and connects to the other server."""
    b = lattice_daemon(tmp_path / "b", OPEN_ECHO, [pair[1].url], "host-b", daemons, heartbeat_s=5.0)
    # heartbeat_s = 3: nats-py's pings find the stalled connection stale 12 to 18 s after the stall, time enough
    # to fill the sockets' buffers first (what is left of the sends then waits in nats-py's transport)
    a = lattice_daemon(tmp_path / "a", BLASTER, [s.url for s in pair], "host-a", daemons, heartbeat_s=3.0)
    wait_for(lambda: a.cli("call", "t/echo/0", "x").returncode == 0, "a sees b's echo")
    connected = json.loads(a.cli("status", "--lattice", "--json").stdout)["url"]
    stalled, other = pair if connected == pair[0].url else pair[::-1]
    assert connected == stalled.url
    assert stalled.proc is not None
    os.kill(stalled.proc.pid, signal.SIGSTOP)
    with ThreadPoolExecutor(4) as pool:  # 32 MiB towards the stalled server
        sent = list(pool.map(lambda _: a.call("t/blaster/0", "s1000000|t|echo|0"), range(32)))
    assert sent == ["ok"] * 32

    def reconnected() -> bool:
        lattice = json.loads(a.cli("status", "--lattice", "--json").stdout)
        return bool(lattice["connected"]) and lattice["url"] == other.url

    wait_for(reconnected, "a connects to the other server", 60)
    assert wait_for_log(a, "lattice_reconnected", url=other.url)
    os.kill(stalled.proc.pid, signal.SIGCONT)
    assert a.stop() == 0 and b.stop() == 0


def test_a_restarted_hosts_old_heartbeats_arriving_late_neither_end_its_requests_nor_pass_for_a_duplicate(
        tmp_path: Path, pair: list[NatsServer], daemons: list[Daemon]) -> None:
    """Heartbeats a host sent to a server that stalled are delivered when the server resumes, however late: by
    then the host may have been restarted (here: killed, and started again on the other server). Found by
    tests/test_lattice_chaos.py: the new run logged `lattice_duplicate_host_id` (an error, and only the first is
    logged: a real duplicate would then go unsaid), and the other host took each old heartbeat for a restart,
    ending the requests the new run held with `target-stopped` ("host host-a restarted with the request")."""
    stalled, other = pair
    b = lattice_daemon(tmp_path / "b", CALLER, [other.url], "host-b", daemons)
    # The first run's components are not the second's: the stalled server would keep the first run's subscriptions
    # (its queue group members), and NATS may route a message to them until it resumes
    a = lattice_daemon(tmp_path / "a", ECHO, [stalled.url], "host-a", daemons, extra=REMOTE_GRANT)
    wait_for(lambda: b.cli("call", "t/echo/0", "x", "--timeout", "2").returncode == 0, "b sees a")
    assert stalled.proc is not None
    os.kill(stalled.proc.pid, signal.SIGSTOP)
    try:
        # host-a's heartbeats of the next second wait in the stalled server's socket: killed before its pings find
        # the connection stale (2 to 3 s), the host closes the connection with them still unread there
        time.sleep(1.0)
        a.proc.kill()
        a.proc.wait()
        again = lattice_daemon(tmp_path / "a-again", component("t/slow/0", "services"), [other.url], "host-a",
                               daemons, extra=REMOTE_GRANT)
        wait_for(lambda: b.cli("call", "t/slow/0", "self", "--timeout", "2").returncode == 0, "b sees the new run")
        b.call("t/caller/0", "t|slow|0|sleep 3000")  # the callback guest's request waits 5 s at most
        wait_for(lambda: row(again, "t/slow/0")["in_hand"] == 1, "the new run holds it", 10)
    finally:
        os.kill(stalled.proc.pid, signal.SIGCONT)  # the old run's heartbeats are delivered now
    wait_for(lambda: b.call("t/caller/0", "?callbacks") == "1", "b's request ends", 10)
    assert b.call("t/caller/0", "?last-payload") == "slept"
    assert again.stop() == 0 and b.stop() == 0
    assert not [e for e in again.events() if e["event"] == "lattice_duplicate_host_id"]


def test_two_daemons_with_one_host_id_are_told_so(tmp_path: Path, nats_server: NatsServer,
                                                  daemons: list[Daemon]) -> None:
    """The other side of the test above: a daemon really running with the same host_id is said, by both."""
    first = lattice_daemon(tmp_path / "first", ECHO, [nats_server.url], "host-a", daemons)
    second = lattice_daemon(tmp_path / "second", ECHO, [nats_server.url], "host-a", daemons)
    for d in (first, second):  # the later run at once, the earlier one after a second of the other's heartbeats
        assert wait_for_log(d, "lattice_duplicate_host_id", timeout=15)["level"] == "error"
    assert first.stop() == 0 and second.stop() == 0


def who_answers(url: str, requests: int) -> list[tuple[str, str]]:
    """A plain client's `requests` to the open echo, one after another: each one's answering host and outcome, or
    the error it ended with instead."""
    async def go() -> list[tuple[str, str]]:
        nc = await nats.connect(url)
        try:
            answers = []
            for _ in range(requests):
                try:
                    headers = (await nc.request(ECHO_SUBJECT, b"x", timeout=2)).headers or {}
                    answers.append((headers.get("Wasmhost-Host", ""), headers.get("Wasmhost-Outcome", "")))
                except Exception as exc:
                    answers.append(("", type(exc).__name__))
            return answers
        finally:
            await nc.close()

    return asyncio.run(go())


def subscriptions(server: NatsServer, connection: str) -> list[str]:
    """The subjects the connection named `connection` subscribes on `server` (nats-server's /connz)."""
    assert server.monitor_port is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{server.monitor_port}/connz?subs=detail", timeout=10) as answer:
        return sorted(sub["subject"] for c in json.load(answer)["connections"] if c.get("name") == connection
                      for sub in c.get("subscriptions_list_detail", []))


def test_a_component_stopped_while_its_server_goes_leaves_no_subscription_on_the_next(tmp_path: Path,
                                                                                     daemons: list[Daemon]) -> None:
    """A stop drains the component's subscriptions (UNSUB, then a round trip). When the connection is lost
    meanwhile, nats-py connects to the next server and subscribes everything it still holds again, the draining
    subscriptions included, and forgets the round trip. The drain then gave up (after DRAIN_S) and dropped the
    subscriptions in nats-py only: the new server kept them for good. Found by tests/test_lattice_chaos.py: once
    the component ran again, NATS gave the leftover, a member of its queue group, its share of the messages from
    other hosts, which nats-py dropped: half of another host's requests timed out, for as long as the host stayed
    connected."""
    with running_cluster(tmp_path / "nats", 2, monitor=True) as servers:
        lost, other = servers
        b = lattice_daemon(tmp_path / "b", component("t/other/0", "echo"), [other.url], "host-b", daemons)
        # host-a is given the first server only: it learns the other from the cluster (and is not left to pick)
        a = lattice_daemon(tmp_path / "a", OPEN_ECHO, [lost.url], "host-a", daemons)
        wait_for(lambda: b.cli("call", "t/echo/0", "x", "--timeout", "2").returncode == 0, "b sees a's echo")
        assert lost.proc is not None
        os.kill(lost.proc.pid, signal.SIGSTOP)  # the drain's round trip is not answered...
        assert a.cli("stop", "t/echo/0").returncode == 0
        time.sleep(0.5)  # ... nor is anything outside the daemon told that the drain has begun (its next tick)
        lost.kill()  # a reconnects to the other server at once
        wait_for(lambda: json.loads(a.cli("status", "--lattice", "--json").stdout)["url"] == other.url,
                 "a is on the other server", 15)
        wait_for(lambda: not [s for s in subscriptions(other, "wasmhost host-a") if s.endswith(".t.echo.0")],
                 "a subscribes nothing of the stopped echo", 15)
        assert a.cli("start", "t/echo/0").returncode == 0
        wait_for(lambda: b.cli("call", "t/echo/0", "x", "--timeout", "2").returncode == 0, "b sees a's echo again")
        calls = [b.cli("call", "t/echo/0", str(n), "--timeout", "2") for n in range(20)]
        assert [c.stdout or c.stderr for c in calls] == [str(n) for n in range(20)]
        assert a.stop() == 0 and b.stop() == 0
