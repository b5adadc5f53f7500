"""Faults against the real daemon: kill -9 mid-storm, trap storms, floods, reload under load, and an
unusable state directory. Nothing acknowledged is lost and every message is accounted for."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from tests.test_daemon import BASIC, ROOT, Daemon, component, config_text
from wasmhost.system import protocol
from wasmhost.system.client import DaemonUnavailable, request


def start(tmp_path: Path, components: str) -> Daemon:
    config = tmp_path / "wasmhost.toml"
    config.write_text(config_text(tmp_path / "state", components))
    daemon = Daemon(tmp_path, config)
    daemon.expect("READY=1")
    return daemon


def call(d: Daemon, cid: str, payload: bytes, timeout: float = 10.0) -> protocol.Response:
    return request(d.socket, protocol.Call(cid, payload, timeout))


def storm_then_kill_9(d: Daemon, tmp_path: Path, cid: str, payload: Callable[[int], bytes],
                      acknowledges: Callable[[int, protocol.Response], bool]) -> tuple[list[int], dict[str, bytes]]:
    """Four clients call `cid` with payload(i) for i = 0, 1, 2 ...; once 200 calls were acknowledged
    (`acknowledges`), kill -9 the daemon. Returns the acknowledged i and what the database then holds
    for `cid` (after checking its integrity)."""
    acknowledged: list[int] = []
    stop = threading.Event()

    def storm(worker: int) -> None:
        i = worker
        while not stop.is_set():
            try:
                response = call(d, cid, payload(i))
            except (OSError, DaemonUnavailable):  # killed: a reset, or the connection closed without an answer
                return
            if acknowledges(i, response):
                acknowledged.append(i)
            i += 4

    threads = [threading.Thread(target=storm, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    while len(acknowledged) < 200:
        threading.Event().wait(0.01)
    os.kill(d.proc.pid, signal.SIGKILL)
    stop.set()
    for t in threads:
        t.join()
    d.proc.wait()
    with sqlite3.connect(tmp_path / "state" / "storage.sqlite3") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        stored = dict(db.execute("SELECT key, value FROM kv WHERE owner = ?", (cid,)).fetchall())
    return acknowledged, stored


def test_kill_9_during_a_write_storm_loses_no_acknowledged_write(tmp_path: Path) -> None:
    d = start(tmp_path, component("t/notes/0", "storage", "capabilities = { storage = true }"))
    acknowledged, stored = storm_then_kill_9(
        d, tmp_path, "t/notes/0", lambda i: f"set k{i} v{i}".encode(),
        lambda i, response: response.ok and response.data == b"ok")
    lost = [i for i in acknowledged if stored.get(f"k{i}") != f"v{i}".encode()]
    assert lost == [], f"{len(lost)} of {len(acknowledged)} acknowledged writes lost"


def test_kill_9_during_a_storm_of_multi_write_messages_loses_no_acknowledged_message(tmp_path: Path) -> None:
    """Each message writes two keys (txguest: KEY = "v1", then "last" = KEY) and then succeeds or
    fails; acknowledged = its reply came. After kill -9 every acknowledged message's writes are there,
    no failed message's are, and no message is half written."""
    d = start(tmp_path, component("t/tx/0", "txguest", "capabilities = { storage = true }"))

    def fails(i: int) -> bool:
        return i % 3 == 0  # every third message writes, then returns an error

    acknowledged, stored = storm_then_kill_9(
        d, tmp_path, "t/tx/0", lambda i: f"{'e' if fails(i) else 'o'} k{i}".encode(),
        lambda i, response: not fails(i) and response.ok and response.data == b"v1")
    lost = [i for i in acknowledged if stored.get(f"k{i}") != b"v1"]
    assert lost == [], f"{len(lost)} of {len(acknowledged)} acknowledged messages lost"
    assert not [key for key in stored if key != "last" and int(key[1:]) % 3 == 0], "a failed message wrote"
    assert stored["last"].decode() in stored, "the last message that committed is missing its other write"


def test_a_trap_storm_hits_the_intensity_limit_while_others_serve(tmp_path: Path) -> None:
    trappers = [f"t/trap/{i}" for i in range(5)]
    config = "".join(component(t, "trapper", "max_restarts = 3\nbackoff_base_ms = 1\nbackoff_max_ms = 2")
                     for t in trappers) + component("t/echo/0", "echo")
    d = start(tmp_path, config)
    errors = 0
    for round_ in range(8):
        for t in trappers:
            assert not call(d, t, b"boom").ok
        for i in range(20):
            response = call(d, "t/echo/0", b"%d" % (round_ * 20 + i))
            errors += response.data != b"%d" % (round_ * 20 + i)
    assert errors == 0
    rows = {r["id"]: r for r in request(d.socket, protocol.Status()).data["components"]}
    for t in trappers:
        assert (rows[t]["state"], rows[t]["restarts"]) == ("failed", 3)
    assert rows["t/echo/0"]["handled"] == 160 and rows["t/echo/0"]["failed"] == 0
    assert d.stop() == 0


def test_a_flood_is_refused_with_queue_full_and_every_message_is_accounted_for(tmp_path: Path) -> None:
    d = start(tmp_path, component("t/slow/0", "busy", "mailbox_capacity = 8"))
    sent, accepted, refused = 300, 0, 0
    for _ in range(sent):
        response = request(d.socket, protocol.Send("t/slow/0", b"300000", wait=False))
        if response.ok:
            accepted += 1
        else:
            assert response.error == "queue-full"
            refused += 1
    assert refused > 0 and accepted + refused == sent
    for _ in range(600):
        row = request(d.socket, protocol.Status()).data["components"][0]
        assert row["queued"] <= 8
        if row["handled"] == accepted:
            break
        threading.Event().wait(0.05)
    assert row["handled"] + row["failed"] == accepted and row["failed"] == 0
    assert d.stop() == 0


def test_reload_in_a_loop_loses_nothing_sent_to_an_unchanged_component(tmp_path: Path) -> None:
    d = start(tmp_path, BASIC)
    replies: list[bytes | None] = []
    failures: list[str] = []
    done = threading.Event()

    def traffic() -> None:
        while not done.is_set():
            response = call(d, "t/counter/0", b"")
            if response.ok:
                replies.append(response.data)
            else:
                failures.append(str(response.error))

    client = threading.Thread(target=traffic)
    client.start()
    for i in range(10):
        extra = component("t/extra/0", "echo") if i % 2 == 0 else ""
        d.config.write_text(config_text(tmp_path / "state", BASIC + extra))
        d.proc.send_signal(signal.SIGHUP)
        d.expect("READY=1")
    done.set()
    client.join()
    assert failures == []
    assert replies == [str(n).encode() for n in range(1, len(replies) + 1)]  # no gap, no reset
    ids = [r["id"] for r in request(d.socket, protocol.Status()).data["components"]]
    assert sorted(ids) == sorted(set(ids)) == ["t/counter/0", "t/echo/0", "t/notes/0"]
    assert d.stop() == 0


def test_an_unusable_state_directory_gives_io_errors_and_the_daemon_keeps_running(tmp_path: Path) -> None:
    (tmp_path / "state" / "storage.sqlite3").mkdir(parents=True)  # fails even for root
    d = start(tmp_path, BASIC)
    answer = call(d, "t/notes/0", b"set k v")
    assert not answer.ok and "storage error: io-error" in str(answer.error)
    assert call(d, "t/echo/0", b"fine").data == b"fine"
    status = subprocess.run([sys.executable, "-m", "wasmhost.cli", "status", "--socket", str(d.socket)],
                            capture_output=True, text=True, cwd=ROOT)
    assert "storage:" in status.stdout and "I/O error(s)" in status.stdout
    assert d.stop() == 0
    assert any(json.loads(line).get("event") == "storage_io_error"
               for line in d.log.read_text().splitlines() if line.startswith("{"))


