"""Crash forensics end to end: real daemons running guests that trap, loop past their deadline, burn their
fuel, exhaust their memory or fail to initialize; `wasmhost inspect ID` (text and --json) shows what
each failure was and the metadata of the messages around it, across restarts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_daemon import Daemon, component, launch
from tests.test_stop import wait_for_status
from wasmhost.core.ids import HOST_ID

QUICK = "max_restarts = 50\nbackoff_base_ms = 1\nbackoff_max_ms = 2\n"


def inspect_json(d: Daemon, cid: str) -> dict[str, object]:
    shown = d.cli("inspect", cid, "--json")
    assert shown.returncode in (0, 1), shown.stderr
    return json.loads(shown.stdout)  # type: ignore[no-any-return]


def failed_call(d: Daemon, cid: str, payload: str) -> str:
    result = d.cli("call", cid, payload)
    assert result.returncode == 1, result.stdout
    return result.stderr


def test_a_timeout_is_recorded_with_the_message_it_handled_and_the_ones_before(tmp_path: Path,
                                                                               started: list[Daemon]) -> None:
    d = launch(tmp_path, component("t/victim/0", "stoptrap", "limits = { max_execution_time_ms = 300 }\n" + QUICK)
               + component("t/client/0", "callback", 'capabilities = { request = ["t/*"] }'), started,
               edit={"drain_timeout_s = 5.0": "drain_timeout_s = 5.0\nforensics_payload_bytes = 8"})
    assert d.call("t/victim/0", "first") == "first"
    assert d.call("t/victim/0", "second\x01") == "second\x01"
    correlation = d.call("t/client/0", "t|victim|0|spin")  # a request from another component: it times out
    wait_for_status(d, "t/victim/0", lambda row: row["restarts"] == 1 and row["state"] == "running")

    shown = d.cli("inspect", "t/victim/0")
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert "failures    1 (the last 1 kept, newest first)\n" in out
    assert "failure #1  " in out and "  timeout in handle-message  (instance 0)\n" in out
    assert "  t/victim/0: handle-message timed out: wasm trap: interrupt" in out
    message = out.split("  message   ", 1)[1].splitlines()[0]
    assert message.startswith("handle-message from t/client/0, 4 bytes, ")
    assert f"correlation {correlation}, " in message
    assert message.endswith(', failed, payload starts "spin"')
    before = out.split("  before    ", 1)[1].splitlines()
    assert before[0].startswith(f"handle-message from {HOST_ID}, 7 bytes, correlation -, content-type -, ")
    assert before[0].endswith(', ok, payload starts "second\\x01"')  # escaped, never raw bytes
    assert before[1].strip().startswith(f"handle-message from {HOST_ID}, 5 bytes, ")
    assert before[1].endswith('ok, payload starts "first"')

    # the record survives the restart, and the next failure is numbered on, in the next instance
    assert d.call("t/victim/0", "third") == "third"
    failed_call(d, "t/victim/0", "spin")
    wait_for_status(d, "t/victim/0", lambda row: row["restarts"] == 2 and row["state"] == "running")
    report = inspect_json(d, "t/victim/0")
    forensics = report["forensics"]
    assert isinstance(forensics, dict)
    assert forensics["total"] == 2 and forensics["payload_bytes"] == 8
    newest, oldest = forensics["failures"]
    assert (newest["number"], newest["kind"], newest["call"], newest["instance"]) == (2, "timeout", "handle-message", 1)
    assert oldest["number"] == 1 and oldest["message"]["sender"] == "t/client/0"
    assert newest["message"]["sender"] == str(HOST_ID)
    assert bytes.fromhex(newest["message"]["payload_prefix_hex"]) == b"spin"
    assert [bytes.fromhex(m["payload_prefix_hex"]) for m in newest["before"]] == [b"first", b"second\x01", b"spin",
                                                                                 b"third"]
    assert newest["before"][-1]["outcome"] == "ok"
    assert report["status"]["restarts"] == 2  # type: ignore[index]
    assert d.stop() == 0


def test_traps_fuel_and_memory_exhaustion_show_their_kind_and_backtrace_without_payloads(
        tmp_path: Path, started: list[Daemon]) -> None:
    d = launch(tmp_path, component("t/trapper/0", "trapper", QUICK)
               + component("t/busy/0", "busy", "limits = { max_fuel = 100000 }\n" + QUICK)
               + component("t/oom/0", "oomtrap", "limits = { max_memory_bytes = 1048576 }\n" + QUICK), started)
    assert "wasm `unreachable` instruction executed" in failed_call(d, "t/trapper/0", "boom")
    assert "ran out of fuel" in failed_call(d, "t/busy/0", "100000000")
    failed_call(d, "t/oom/0", "more")
    for cid in ("t/trapper/0", "t/busy/0", "t/oom/0"):
        wait_for_status(d, cid, lambda row: row["restarts"] == 1 and row["state"] == "running")

    trap = d.cli("inspect", "t/trapper/0").stdout
    assert "  trap in handle-message  (instance 0)\n" in trap
    backtrace = trap.split("  backtrace:\n", 1)[1].split("  message   ", 1)[0]
    assert "    error while executing at wasm backtrace:\n" in backtrace and "<wasm function" in backtrace
    assert "        wasm trap: wasm `unreachable` instruction executed\n" in backtrace
    assert "payload" not in trap  # forensics_payload_bytes = 0: metadata only
    assert f"  message   handle-message from {HOST_ID}, 4 bytes, " in trap

    fuel = inspect_json(d, "t/busy/0")["forensics"]
    assert isinstance(fuel, dict)
    (record,) = fuel["failures"]
    assert (record["kind"], record["call"]) == ("fuel", "handle-message")
    assert record["summary"] == "t/busy/0: handle-message ran out of fuel: wasm trap: all fuel consumed by WebAssembly"
    assert record["message"]["size"] == 9 and record["message"]["payload_prefix_hex"] is None

    oom = inspect_json(d, "t/oom/0")["forensics"]
    assert isinstance(oom, dict)
    (record,) = oom["failures"]
    assert (record["kind"], record["call"]) == ("trap", "handle-message")
    assert record["summary"] == "t/oom/0: handle-message trapped: wasm trap: wasm `unreachable` instruction executed"
    assert d.stop() == 0


def test_a_component_that_never_initializes_keeps_every_attempt_and_inspect_exits_1(
        tmp_path: Path, started: list[Daemon]) -> None:
    d = launch(tmp_path, component("t/broken/0", "inittrap", "max_restarts = 2\nbackoff_base_ms = 1\n"
                                   "backoff_max_ms = 2") + component("t/echo/0", "echo"), started)
    wait_for_status(d, "t/broken/0", lambda row: row["state"] == "failed")
    shown = d.cli("inspect", "t/broken/0")
    assert shown.returncode == 1
    assert "failures    3 (the last 3 kept, newest first)\n" in shown.stdout
    for number, instance in ((3, 2), (2, 1), (1, 0)):
        assert f"failure #{number}  " in shown.stdout
        assert f"  trap in initialize  (instance {instance})\n" in shown.stdout
    assert "  message   " not in shown.stdout  # no message was being handled
    assert "has failed and stays down after 2 restart(s)" in shown.stderr

    healthy = d.cli("inspect", "t/echo/0")
    assert healthy.returncode == 0 and "failures    0\n" in healthy.stdout
    assert d.call("t/echo/0", "hi") == "hi"
    recent = inspect_json(d, "t/echo/0")["forensics"]
    assert isinstance(recent, dict)
    assert [(m["sender"], m["size"], m["outcome"]) for m in recent["recent"]] == [(str(HOST_ID), 2, "ok")]
    assert d.stop() == 0


def test_forensics_payload_bytes_is_checked(tmp_path: Path) -> None:
    from wasmhost.system.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as caught:
        parse_config("[host]\nforensics_payload_bytes = 100000\n", tmp_path / "wasmhost.toml")
    assert "forensics_payload_bytes" in str(caught.value) and "4096" in str(caught.value)


def test_a_guests_huge_initialize_error_is_kept_logged_and_inspected_bounded(tmp_path: Path,
                                                                             started: list[Daemon]) -> None:
    """initialize returns initialization-failed with 16 MiB of text of its own: what the host keeps of it
    is bounded, so `inspect` still answers (the whole failure list fits one control frame) and the log
    keeps its lines (a 16 MiB line is more than a log destination buffers, and was dropped)."""
    d = launch(tmp_path, component("t/loud/0", "initfail", "max_restarts = 2\nbackoff_base_ms = 1\n"
                                   "backoff_max_ms = 2"), started)
    wait_for_status(d, "t/loud/0", lambda row: row["state"] == "failed")
    shown = d.cli("inspect", "t/loud/0", "--json")
    assert shown.returncode == 1 and "has failed and stays down" in shown.stderr
    forensics = json.loads(shown.stdout)["forensics"]
    assert forensics["total"] == 3 and len(forensics["failures"]) == 3
    for failure in forensics["failures"]:
        assert failure["kind"] == "initialize"
        assert failure["summary"].startswith("initialization-failed: AAAA")
        assert len(failure["detail"]) < 20_000 and "lines cut)" in failure["detail"]
    assert len(shown.stdout) < 100_000
    failed = [e for e in d.events() if e.get("event") in ("component_restarting", "component_failed")]
    assert [e["event"] for e in failed] == ["component_restarting", "component_restarting", "component_failed"]
    assert all(len(str(e["error"])) < 20_000 for e in failed)
    assert d.stop() == 0
