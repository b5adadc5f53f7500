"""Upgrades on reload against the real daemon: a changed component is handed over to its new version with
its queue and counters, a new version that fails to start or to stay healthy for its check window is
rolled back on the same mailbox, a reload during another one is refused at once, and SIGTERM does not
wait for a check window."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FIXTURES
from tests.test_cli import background, rows
from tests.test_daemon import ROOT, Daemon, component, config_text, launch
from tests.waits import wait_for
from wasmhost.system import protocol
from wasmhost.system.client import request

# Runs the real CLI with Supervisor.hand_over failing: an unexpected exception in the middle of an upgrade.
FAULTY = """
import sys
from wasmhost.actors import supervisor
async def faulty(self, *args, **kwargs):
    raise RuntimeError("injected fault")
supervisor.Supervisor.hand_over = faulty
from wasmhost.cli import main
sys.exit(main(sys.argv[1:]))
"""

LONG = b"1000000000"  # about 4 s of busy's loop: the component is in the middle of it when the reload comes
QUEUED = 300


@pytest.fixture
def components(tmp_path: Path) -> Path:
    """A components directory whose svc.wasm the tests overwrite with other versions."""
    folder = tmp_path / "components"
    folder.mkdir()
    shutil.copy(FIXTURES / "busy.wasm", folder / "svc.wasm")
    return folder


def start(tmp_path: Path, components: Path, started: list[Daemon], extra: str,
          python_args: tuple[str, ...] = ("-m", "wasmhost.cli")) -> Daemon:
    return launch(tmp_path, component("t/svc/0", "svc", extra), started, components, python_args)


def new_version(d: Daemon, tmp_path: Path, components: Path, fixture: str, extra: str) -> None:
    """Put another fixture's bytes (and settings) where t/svc/0's binary is."""
    shutil.copy(FIXTURES / f"{fixture}.wasm", components / "svc.wasm")
    d.config.write_text(config_text(tmp_path / "state", component("t/svc/0", "svc", extra), components))


def queue(d: Daemon, count: int) -> None:
    """One long message, then `count` short sends behind it (over the control socket, as `wasmhost send`)."""
    for payload in [LONG] + [b"100000"] * count:
        response = request(d.socket, protocol.Send("t/svc/0", payload))
        assert response.ok, response.error


def row(d: Daemon) -> dict[str, object]:
    rows = json.loads(d.cli("status", "--json").stdout)["components"]
    return next(r for r in rows if r["id"] == "t/svc/0")


def test_an_upgrade_hands_the_queue_and_counters_to_the_new_version(tmp_path: Path, components: Path,
                                                                     started: list[Daemon]) -> None:
    d = start(tmp_path, components, started, "rollout_check_s = 0.2")
    assert d.call("t/svc/0", "7") == "7"
    queue(d, QUEUED)
    new_version(d, tmp_path, components, "hasher", "rollout_check_s = 0.2")  # same contract, other answers
    result = d.cli("reload", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["outcome"] == "reloaded" and report["changed"] == ["t/svc/0"], report["rolled_back"]
    assert report["rolled_back"] == {} and report["added"] == report["removed"] == [], report
    # FIFO: once the new version answers this call, everything queued before it has been handled.
    assert d.call("t/svc/0", "5") != "5"  # hasher's hash of 0..4, not busy's echo of the count
    status = row(d)
    assert status["handled"] == QUEUED + 3 and status["failed"] == 0, status  # counters continued
    assert status["state"] == "running" and status["restarts"] == 0 and status["rollout"] == "upgraded", status
    events = d.events()
    handover = [e for e in events if e["event"] == "component_handover"]
    assert len(handover) == 1 and 0 < int(handover[0]["queued"]) <= QUEUED, handover  # handed over mid-queue
    assert not [e for e in events if e["event"] == "component_stopped"], events  # the actor never stopped
    assert d.stop() == 0


BAD_VERSIONS = [  # fixture, its settings, the reason reported, messages it fails
    ("inittrap", "", "the new version failed to start: initialize trapped: ", 0),
    ("initloop", "limits = { max_execution_time_ms = 1000 }\n", "the new version failed to start: initialize timed "
     "out: ", 0),
    ("sickly", "", "it reported unhealthy", 0),
    # The first queued message traps it (and is answered failed); the old version handles the rest. The
    # window is long: the failure, not the window's end, brings the old version back.
    ("trapper", "rollout_check_s = 60\n", "it failed during its check window: handle-message trapped: ", 1),
]


@pytest.mark.parametrize(("fixture", "settings", "reason", "failed"), BAD_VERSIONS, ids=[b[0] for b in BAD_VERSIONS])
def test_a_bad_new_version_is_rolled_back_on_the_same_mailbox(tmp_path: Path, components: Path,
                                                              started: list[Daemon], fixture: str,
                                                              settings: str, reason: str, failed: int) -> None:
    d = start(tmp_path, components, started, "")
    queue(d, 50)
    window = "" if "rollout_check_s" in settings else "rollout_check_s = 0.5\n"
    new_version(d, tmp_path, components, fixture, window + settings)
    result = d.cli("reload")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "reload: 1 component(s) rolled back to their previous version" in output, output
    assert f"  rolled back: t/svc/0: {reason}" in output, output
    assert d.call("t/svc/0", "5") == "5"  # busy again, behind everything queued before it
    status = row(d)
    assert status["state"] == "running" and status["restarts"] == 0, status
    assert status["failed"] == failed and status["handled"] == 50 + 2 - failed, status  # every message answered
    assert str(status["rollout"]).startswith(f"rolled back: {reason}"), status
    table = d.cli("status").stdout
    assert f"t/svc/0: rolled back: {reason}" in table, table

    # The next reload finds the configuration still differs from what runs, and tries again.
    new_version(d, tmp_path, components, "hasher", "rollout_check_s = 0.5")
    result = d.cli("reload")
    assert result.returncode == 0, result
    assert "reload: ok\n  changed: t/svc/0 (binary, rollout_check_s)\n  kept: 0 unchanged" in result.stdout, result
    assert d.call("t/svc/0", "5") != "5" and row(d)["rollout"] == "upgraded"
    assert d.stop() == 0


def test_a_reload_during_a_check_window_is_refused_and_sigterm_does_not_wait_for_it(
        tmp_path: Path, components: Path, started: list[Daemon]) -> None:
    d = start(tmp_path, components, started, "rollout_check_s = 600")
    new_version(d, tmp_path, components, "hasher", "rollout_check_s = 600")
    first = subprocess.Popen([sys.executable, "-m", "wasmhost.cli", "reload", "--socket", str(d.socket)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        d.expect("STATUS=reload: checking new versions of t/svc/0 for up to 600 s")
        second = d.cli("reload")
        assert second.returncode == 1, second
        assert "reload refused, nothing changed: a reload is in progress" in second.stderr, second.stderr
        assert d.call("t/svc/0", "5") != "5"  # the new version serves during its window
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(timeout=60) == 0  # not 600 s
        first.communicate(timeout=60)  # its connection ended with the daemon, answered or not
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert d.stop() == 0


def test_a_notify_socket_nobody_reads_does_not_hang_the_daemon(tmp_path: Path, components: Path,
                                                                started: list[Daemon]) -> None:
    d = start(tmp_path, components, started, "")
    for _ in range(20):  # two notifications each, unread: the socket's queue holds about ten
        response = request(d.socket, protocol.Reload(), timeout=30)
        assert response.ok and response.data["outcome"] == "reloaded", response
    assert d.call("t/svc/0", "5") == "5"
    assert d.stop() == 0


def test_a_fault_in_an_upgrade_keeps_the_previous_version_and_says_so(tmp_path: Path, components: Path,
                                                                     started: list[Daemon]) -> None:
    d = start(tmp_path, components, started, "", ("-c", FAULTY))
    new_version(d, tmp_path, components, "hasher", "rollout_check_s = 0.5")
    result = d.cli("reload", "--json")
    assert result.returncode == 1, result
    report = json.loads(result.stdout)
    assert report["outcome"] == "rolled-back" and report["changed"] == [], report
    assert report["rolled_back"] == {"t/svc/0": "the upgrade failed: RuntimeError: injected fault"}, report
    assert d.call("t/svc/0", "5") == "5" and row(d)["rollout"] == "rolled back: the upgrade failed: " \
        "RuntimeError: injected fault"
    seen = d.expect("READY=1")
    assert any("STATUS=reloaded with rollbacks; 1 running" in m.split("\n") for m in seen), seen
    assert d.stop() == 0


def test_a_component_stopped_while_a_reload_removes_others_is_started_anew_on_its_new_version(
        tmp_path: Path, components: Path, started: list[Daemon]) -> None:
    """A reload decides which changed components it hands over (those running) before it removes the
    components the config dropped; a changed one stopped meanwhile (`wasmhost stop`, or failing for good) was
    then handed over all the same: the handover raised (`is not running`), the reload logged it as a bug
    (`reload_upgrade_failed`), reported the component rolled back with a RuntimeError, and left it stopped on
    its previous version. As one stopped before the reload, it is started anew on its new version now."""
    shutil.copy(FIXTURES / "slowstop.wasm", components / "slowstop.wasm")
    slow = component("t/slow/0", "slowstop", "shutdown_timeout_s = 2")  # its removal takes 2 s: the stop comes then
    d = launch(tmp_path, component("t/svc/0", "svc", "rollout_check_s = 0") + slow, started, components)
    assert d.call("t/svc/0", "5") == "5"  # busy
    new_version(d, tmp_path, components, "hasher", "rollout_check_s = 0")  # and t/slow/0 removed
    reload = background(d, "reload", "--json")
    wait_for(lambda: rows(d).get("t/slow/0", {}).get("state") == "stopping", "the reload removing t/slow/0")
    stop = d.cli("stop", "t/svc/0")
    assert stop.returncode == 0, stop.stderr
    out, _ = reload.communicate(timeout=60)
    report = json.loads(out)
    assert report["outcome"] == "reloaded" and report["changed"] == ["t/svc/0"], report["rolled_back"]
    assert report["removed"] == ["t/slow/0"] and report["rolled_back"] == {}, report
    assert d.call("t/svc/0", "5") != "5"  # hasher, the new version, runs
    assert not [e for e in d.events() if e["event"] == "reload_upgrade_failed"]
    assert d.stop() == 0


def test_a_stop_signal_while_a_reload_removes_components_cuts_it_short_without_restoring(
        tmp_path: Path, components: Path, started: list[Daemon]) -> None:
    """A SIGTERM while a reload waits for a removed component's `shutdown`: the supervisor starts nothing once
    the shutdown has begun, so the reload's start of an added component raised, and the reload took that for an
    unexpected failure: it tried to put the previous configuration back (which could not start either) and
    logged reload_restoring, reload_restore_failed and reload_failed with tracebacks. Found by the reload
    chaos test. The reload now ends there, answering that the stop cut it short, and the daemon stops as usual."""
    shutil.copy(FIXTURES / "slowstop.wasm", components / "slowstop.wasm")
    shutil.copy(FIXTURES / "echo.wasm", components / "echo.wasm")
    slow = component("t/slow/0", "slowstop", "shutdown_timeout_s = 2")  # its removal takes 2 s: the stop comes then
    d = launch(tmp_path, component("t/svc/0", "svc") + slow, started, components)
    d.config.write_text(config_text(tmp_path / "state", component("t/svc/0", "svc") + component("t/echo/0", "echo"),
                                    components))  # t/slow/0 removed, t/echo/0 added
    reload = background(d, "reload", "--json")
    wait_for(lambda: rows(d).get("t/slow/0", {}).get("state") == "stopping", "the reload removing t/slow/0")
    d.proc.send_signal(signal.SIGTERM)
    out, _ = reload.communicate(timeout=60)
    report = json.loads(out)
    assert report["outcome"] == "failed" and report["problems"] == [
        "reload cut short by the stop signal: what it had not started yet is not started"], report
    assert d.proc.wait(timeout=30) == 0
    alarms = {"reload_failed", "reload_restoring", "reload_restore_failed"}
    assert not [e for e in d.events() if e["event"] in alarms]
    assert [e["event"] for e in d.events() if e["event"] == "reload_cut_short"] == ["reload_cut_short"]
