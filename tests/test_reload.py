"""Reload against the real daemon: a config is applied whole or not at all, a new version that cannot load
leaves the old one running, every error is located, and RELOADING=1 is always followed by READY=1."""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import FIXTURES
from tests.test_cli import background, rows
from tests.test_daemon import Daemon, component, config_text, in_process, kill_leftovers, launch, wasmhost
from tests.waits import wait_for
from wasmhost.core.ids import ComponentId

PATTERN_ERROR = ("components[1].capabilities.send[0]: target pattern 'demo/echo': expected '*', 'namespace/*', "
                 "'namespace/name/*' or 'namespace/name/instance'")

# Runs the real CLI with Daemon._grant failing for t/boom/0: an unexpected exception in the middle of a reload.
FAULTY = """
import sys
from wasmhost.system import daemon
grant = daemon.Daemon._grant
def faulty(self, plan):
    if str(plan.spec.component_id) == "t/boom/0":
        raise RuntimeError("injected fault")
    grant(self, plan)
daemon.Daemon._grant = faulty
from wasmhost.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture
def components(tmp_path: Path) -> Path:
    """A components directory of copies the tests may overwrite."""
    folder = tmp_path / "components"
    folder.mkdir()
    for name in ("echo", "counter"):
        shutil.copy(FIXTURES / f"{name}.wasm", folder / f"{name}.wasm")
    return folder


@pytest.fixture
def started(tmp_path: Path, components: Path) -> Iterator[list[Daemon]]:
    daemons: list[Daemon] = []
    yield daemons
    kill_leftovers(daemons)


def start(tmp_path: Path, components: Path, started: list[Daemon], text: str,
          python_args: tuple[str, ...] = ("-m", "wasmhost.cli")) -> Daemon:
    return launch(tmp_path, text, started, components, python_args)


def rewrite(d: Daemon, tmp_path: Path, components: Path, text: str) -> None:
    d.config.write_text(config_text(tmp_path / "state", text, components))


def reload_reported(d: Daemon) -> list[str]:
    """Reload through the CLI; the notifications it caused must be RELOADING=1 then READY=1."""
    result = d.cli("reload")
    seen = d.expect("READY=1")
    assert any("RELOADING=1" in m.split("\n") for m in seen), seen
    return [str(result.returncode), result.stdout + result.stderr]


BASE = component("t/echo/0", "echo") + component("t/counter/0", "counter")


def test_a_new_version_that_cannot_load_leaves_the_old_one_running(tmp_path: Path, components: Path,
                                                                   started: list[Daemon]) -> None:
    d = start(tmp_path, components, started, BASE)
    assert [d.call("t/counter/0", "") for _ in range(2)] == ["1", "2"]
    good = (components / "counter.wasm").read_bytes()
    (components / "counter.wasm").write_bytes(good[: len(good) // 2])  # a truncated upload
    rewrite(d, tmp_path, components, BASE + component("t/new/0", "echo"))  # and a valid addition
    code, output = reload_reported(d)
    assert code == "1", output
    assert "reload rejected, nothing changed: 1 problem(s):\n  t/counter/0: " in output, output
    assert f"t/counter/0: {components / 'counter.wasm'}: invalid component: " in output, output
    assert d.call("t/counter/0", "") == "3"  # the old instance, its state intact
    assert "t/new/0" not in rows(d)  # all or nothing: the valid addition waits too
    assert rows(d)["t/counter/0"]["state"] == "running" and rows(d)["t/counter/0"]["handled"] == 3

    (components / "counter.wasm").write_bytes(good)
    rewrite(d, tmp_path, components, component("t/echo/0", "echo")
            + component("t/counter/0", "counter", "limits = { max_memory_bytes = 1 }"))
    code, output = reload_reported(d)
    assert code == "1" and "t/counter/0: " in output and "max_memory_bytes = 1 is too small" in output, output
    assert d.call("t/counter/0", "") == "4"

    rewrite(d, tmp_path, components, BASE + component("t/new/0", "echo"))
    code, output = reload_reported(d)
    assert code == "0" and "reload: ok" in output, output
    assert d.call("t/new/0", "hi") == "hi" and d.call("t/counter/0", "") == "5"
    assert d.stop() == 0


def test_a_bad_capability_pattern_is_found_by_check_run_and_reload(tmp_path: Path, components: Path,
                                                                   started: list[Daemon]) -> None:
    bad = BASE.replace('path = "counter.wasm"\n', 'path = "counter.wasm"\ncapabilities = { send = ["demo/echo"] }\n')
    config = tmp_path / "bad.toml"
    config.write_text(config_text(tmp_path / "state", bad, components))
    check = wasmhost("check", str(config))
    assert check.returncode == 1 and PATTERN_ERROR in check.stderr, check.stderr
    run = wasmhost("run", "--config", str(config), "--log-format", "console")
    assert run.returncode == 1 and PATTERN_ERROR in run.stderr, run.stderr

    d = start(tmp_path, components, started, BASE)
    assert d.call("t/counter/0", "") == "1"
    rewrite(d, tmp_path, components, bad + component("t/new/0", "echo"))
    d.proc.send_signal(signal.SIGHUP)  # what `systemctl reload` does: it waits for READY=1
    seen = d.expect("READY=1")
    assert any("RELOADING=1" in m.split("\n") for m in seen) and "STATUS=reload rejected" in seen[-1], seen
    code, output = reload_reported(d)
    assert code == "1" and PATTERN_ERROR in output and "internal error" not in output, output
    assert d.call("t/counter/0", "") == "2" and "t/new/0" not in rows(d)
    assert d.stop() == 0


def test_host_settings_changed_on_reload_are_refused_by_name(tmp_path: Path, components: Path,
                                                             started: list[Daemon]) -> None:
    d = start(tmp_path, components, started, BASE)
    d.config.write_text(config_text(tmp_path / "state", BASE + component("t/new/0", "echo"), components)
                        .replace("drain_timeout_s = 5.0", "drain_timeout_s = 1.0"))
    code, output = reload_reported(d)
    assert code == "1" and "host.drain_timeout_s: changed from 5.0 to 1.0" in output, output
    assert "t/new/0" not in rows(d)
    assert d.stop() == 0


def test_a_config_path_that_would_block_is_refused_and_reloads_go_on(tmp_path: Path, components: Path,
                                                                      started: list[Daemon]) -> None:
    # Before, reading a FIFO put in the config's place blocked the reload for good: every later reload
    # was refused as "in progress" and SIGTERM never ended the process.
    d = start(tmp_path, components, started, BASE)
    text = d.config.read_text()
    d.config.unlink()
    os.mkfifo(d.config)
    code, output = reload_reported(d)
    assert code == "1" and f"{d.config}: 1 error(s):\n  cannot read: not a regular file" in output, output
    d.config.unlink()
    d.config.write_text(text.replace(BASE, BASE + component("t/new/0", "echo")))
    code, output = reload_reported(d)
    assert code == "0" and "reload: ok" in output, output
    assert d.call("t/new/0", "hi") == "hi"
    assert d.stop() == 0


def test_a_fault_while_applying_restores_the_old_deployment(tmp_path: Path, components: Path,
                                                            started: list[Daemon]) -> None:
    d = start(tmp_path, components, started, BASE + component("t/gone/0", "echo"), ("-c", FAULTY))
    assert d.call("t/counter/0", "") == "1"
    rewrite(d, tmp_path, components, component("t/echo/0", "echo")
            + component("t/counter/0", "counter", "mailbox_capacity = 7") + component("t/boom/0", "echo"))
    code, output = reload_reported(d)
    assert code == "1" and "RuntimeError: injected fault" in output and "internal error" not in output, output
    status = rows(d)
    assert sorted(status) == ["t/counter/0", "t/echo/0", "t/gone/0"], status
    assert all(r["state"] == "running" for r in status.values()), status
    assert d.call("t/gone/0", "back") == "back" and d.call("t/echo/0", "still") == "still"
    # Handed over only once everything else is applied: the fault came first, so it was never touched.
    assert d.call("t/counter/0", "") == "2"

    rewrite(d, tmp_path, components, BASE)  # the lock was released: the next reload applies
    code, output = reload_reported(d)
    assert code == "0", output
    assert sorted(rows(d)) == ["t/counter/0", "t/echo/0"]
    assert d.stop() == 0


def test_a_reload_signalled_after_sigterm_starts_nothing(tmp_path: Path, components: Path,
                                                         started: list[Daemon]) -> None:
    shutil.copy(FIXTURES / "slowstop.wasm", components / "slowstop.wasm")
    # keeps the daemon stopping for 1 s: the SIGHUP sent right after the SIGTERM is handled well within it
    slow = component("t/slow/0", "slowstop", "shutdown_timeout_s = 1")
    d = start(tmp_path, components, started, BASE + slow)
    rewrite(d, tmp_path, components, BASE + slow + component("t/new/0", "echo"))
    d.proc.send_signal(signal.SIGTERM)
    d.proc.send_signal(signal.SIGHUP)  # handled after SIGTERM: signals reach the loop in order
    assert d.proc.wait(timeout=60) == 0 and d.stop() == 0  # (a second SIGTERM would force the exit)
    events = d.events()
    assert [e for e in events if e["event"] == "reload_refused"], events
    assert not [e for e in events if e.get("component") == "t/new/0"], events


def test_a_reload_removing_busy_components_drains_them_together(tmp_path: Path, components: Path,
                                                                 started: list[Daemon]) -> None:
    shutil.copy(FIXTURES / "services.wasm", components / "services.wasm")
    sleepers = [f"t/sleeper/{i}" for i in range(4)]
    echo = component("t/echo/0", "echo")
    drain = {"drain_timeout_s = 5.0": "drain_timeout_s = 3.0"}
    d = launch(tmp_path, "".join(component(c, "services") for c in sleepers) + echo, started, components, edit=drain)
    calls = [background(d, "call", c, "sleep 600000") for c in sleepers]
    wait_for(lambda: all(row["in_hand"] == 1 for cid, row in rows(d).items() if cid in sleepers), "every sleep")
    d.config.write_text(config_text(tmp_path / "state", echo, components).replace(*drain.popitem()))
    reload = background(d, "reload", "--json")

    def all_draining() -> bool:
        shown = rows(d)
        return all(shown.get(cid, {}).get("state") == "stopping" for cid in sleepers)

    wait_for(all_draining, "the four removed components to drain at once, not one after another")
    out, err = reload.communicate(timeout=60)
    assert reload.returncode == 0, err
    assert sorted(json.loads(out)["removed"]) == sleepers
    for call in calls:  # each sleep is interrupted at the drain's end, and answered
        out, err = call.communicate(timeout=30)
        assert out.strip() == "slept" or "interrupted" in err
    assert d.call("t/echo/0", "still here") == "still here"
    assert d.stop() == 0


# Runs the real CLI with Daemon._digest saying on stderr (the daemon's log) which file it reads and hashes.
COUNTED = """
import sys
from wasmhost.system import daemon
digest = daemon.Daemon._digest
def counted(self, path):
    print(f"digest {path.name}", file=sys.stderr, flush=True)
    return digest(self, path)
daemon.Daemon._digest = counted
from wasmhost.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_reload_reads_each_binary_once_however_many_components_share_it(tmp_path: Path, components: Path,
                                                                          started: list[Daemon]) -> None:
    shared = "".join(component(f"t/echo/{i}", "echo") for i in range(20)) + component("t/counter/0", "counter")
    d = start(tmp_path, components, started, shared, ("-c", COUNTED))
    code, output = reload_reported(d)
    assert code == "0" and "kept: 21 unchanged" in output, output
    read = [line for line in d.log.read_text().splitlines() if line.startswith("digest ")]
    assert sorted(read) == ["digest counter.wasm", "digest echo.wasm"]
    assert d.stop() == 0


# Runs the real CLI with Daemon._digest never returning once it has said which file it reads: a read on a
# filesystem that hangs (a stalled NFS or FUSE mount), which nothing here can make a real read do.
STUCK = """
import sys, threading
from wasmhost.system import daemon
def stuck(self, path):
    print(f"digest {path.name}", file=sys.stderr, flush=True)
    threading.Event().wait()
daemon.Daemon._digest = stuck
from wasmhost.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_stop_does_not_wait_for_a_reload_reading_the_component_files(tmp_path: Path, components: Path,
                                                                     started: list[Daemon]) -> None:
    """A reload reads and hashes each component file to see what changed. It did so on asyncio's default
    executor, which the daemon joins when it exits: a SIGTERM during those reads exited only once they had
    ended (measured: 5.5 s for 30 distinct 128 MiB files; for ever on a filesystem that hangs), whatever the
    stop's bound. The stop abandons them now, as it abandons compiles."""
    d = start(tmp_path, components, started, BASE, ("-c", STUCK))
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "digest " in d.log.read_text(), "the reload reading a component file")
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(timeout=30) == 0


def test_a_reload_reports_the_warnings_check_reports(tmp_path: Path, components: Path,
                                                     started: list[Daemon]) -> None:
    d = start(tmp_path, components, started, BASE)
    rewrite(d, tmp_path, components, BASE + component("t/sender/0", "echo", 'capabilities = { send = ["t/nobody/0"] }'))
    warning = "components[2].capabilities.send[0]: 't/nobody/0' matches no component in this configuration"
    checked = wasmhost("check", str(d.config))
    assert checked.returncode == 0 and f"warning: {warning}" in checked.stderr
    code, output = reload_reported(d)
    assert code == "0" and output.splitlines()[:3] == ["reload: ok", "  added: t/sender/0", "  kept: 2 unchanged"]
    assert f"  warning: {warning}" in output.splitlines()
    assert [e["detail"] for e in d.events() if e["event"] == "config_warning"] == [warning]
    assert d.stop() == 0


def test_the_report_says_what_changed_in_each_changed_component(tmp_path: Path, components: Path,
                                                                started: list[Daemon]) -> None:
    # The report is the point, not the rollout check window (3 s by default, per reload): none here, in every
    # version alike, so that it is no change itself.
    quick = "rollout_check_s = 0\n"
    d = start(tmp_path, components, started, component("t/echo/0", "echo", quick)
              + component("t/counter/0", "counter", quick) + component("t/other/0", "echo", quick))
    shutil.copy(FIXTURES / "counter.wasm", components / "echo.wasm")  # t/echo/0 and t/other/0: new bytes
    rewrite(d, tmp_path, components, component("t/echo/0", "echo", quick)
            + component("t/counter/0", "counter", quick + "limits = { max_fuel = 100000000 }\nmailbox_capacity = 7\n"
                        'env = { MODE = "x" }')
            + component("t/other/0", "echo", quick + "restart_window_s = 30"))
    result = d.cli("reload", "--json")
    report = json.loads(result.stdout)
    assert result.returncode == 0 and report["what_changed"] == {
        "t/echo/0": ["binary"], "t/counter/0": ["limits", "env", "mailbox_capacity"],
        "t/other/0": ["binary", "max_restarts/restart_window_s"]}, report
    rewrite(d, tmp_path, components, component("t/echo/0", "echo", quick) + component("t/counter/0", "counter", quick))
    result = d.cli("reload")
    assert result.returncode == 0 and result.stdout.splitlines() == [
        "reload: ok", "  removed: t/other/0", "  changed: t/counter/0 (limits, env, mailbox_capacity)",
        "  kept: 1 unchanged"], result.stdout
    assert d.stop() == 0


def test_thousands_of_rollbacks_fit_the_report_and_the_log(tmp_path: Path, components: Path,
                                                           started: list[Daemon]) -> None:
    """3,200 components of one binary, handed over to a version whose initialize traps deep in a function with
    a long name: their reasons, whole, made a 35 MB answer (over the socket's frame limit: `wasmhost reload`
    said only 'frame of 34836300 bytes exceeds the limit') and a `reloaded` log line the log dropped."""
    shutil.copy(FIXTURES / "echo.wasm", components / "svc.wasm")
    d = start(tmp_path, components, started,
              "".join(component(f"t/svc{i}/0", "svc", "rollout_check_s = 0") for i in range(3200)))
    shutil.copy(FIXTURES / "deeptrap.wasm", components / "svc.wasm")
    code, output = reload_reported(d)
    lines = output.splitlines()
    assert code == "1" and lines[0] == "reload: 3200 component(s) rolled back to their previous version", lines[:3]
    rolled = [line for line in lines if line.startswith("  rolled back: ")]
    assert len(rolled) == 3200 and all(line.endswith("... (cut; whole in wasmhost inspect ID)") for line in rolled)
    assert [len(e["rolled_back"]) for e in d.events() if e["event"] == "reloaded"] == [3200]
    inspected = json.loads(d.cli("inspect", "t/svc7/0", "--json").stdout)
    assert f"!{'f' * 480}" in inspected["status"]["rollout"]  # whole there
    assert d.call("t/svc7/0", "still") == "still"
    assert d.stop() == 0


@pytest.mark.anyio
async def test_a_reload_lets_go_of_the_compiled_versions_nothing_runs(tmp_path: Path, components: Path) -> None:
    """Each new version's compiled code stayed in the process's cache for good: 55 MB per new version of the
    18 MB greeter, reload after reload. What runs holds its own; the disk entries stay for a later load."""
    echo = (FIXTURES / "echo.wasm").read_bytes()

    def version(n: int) -> None:  # the same code with a custom section naming the version: new bytes
        body = b"\x01v" + str(n).encode()
        (components / "svc.wasm").write_bytes(echo + bytes([0, len(body)]) + body)

    version(0)
    config = tmp_path / "wasmhost.toml"
    config.write_text(config_text(tmp_path / "state", component("t/svc/0", "svc", "rollout_check_s = 0")
                                  + component("t/echo/0", "echo"), components))
    async with in_process(config) as daemon:
        for n in range(1, 4):
            version(n)
            report = await daemon.reload()
            assert report.ok and report.changed == ["t/svc/0"], report
        running = {d.digest for d in daemon.deployments.values()}
        assert set(daemon.runtime.cache._memory) == running and len(running) == 2
        assert daemon.runtime.cache.remembered_keys() == running, "marks and notes: on disk, not in memory"
        assert len(list((tmp_path / "state" / "cache").glob("*.cwasm"))) == 5  # on disk: every version


def _churned(components: Path, state: Path, generation: int | None) -> str:
    """An echo, plus (for a generation) a storage component with a quota of its own under a fresh id."""
    text = component("t/echo/0", "echo")
    if generation is not None:
        text += component(f"t/notes/{generation}", "storage",
                          "capabilities = { storage = true, storage_quota_bytes = 100000 }")
    return config_text(state, text, components)


@pytest.mark.anyio
async def test_reloads_removing_storage_components_leave_nothing_of_them_in_memory(tmp_path: Path,
                                                                                   components: Path) -> None:
    """Storage kept, for every component a reload removed, its quota and its read cache's bookkeeping (commit
    count, whole-namespace tries and state): 500 reloads adding 50 components under fresh ids and removing
    them left 12,501 quotas for 51 configured. Their rows stay in the file, for the same id configured again."""
    shutil.copy(FIXTURES / "storage.wasm", components / "storage.wasm")
    config = tmp_path / "wasmhost.toml"
    state = tmp_path / "state"
    config.write_text(_churned(components, state, None))
    async with in_process(config) as daemon:
        for generation in range(8):
            config.write_text(_churned(components, state, generation))
            assert (await daemon.reload()).added == [f"t/notes/{generation}"]
            notes = f"t/notes/{generation}"
            assert await daemon.router.host_request(ComponentId.parse(notes), b"set k v%d" % generation, 10) == b"ok"
            assert await daemon.router.host_request(ComponentId.parse(notes), b"get k", 10) == b"v%d" % generation
            config.write_text(_churned(components, state, None))
            assert (await daemon.reload()).removed == [notes]
        assert daemon.storage.tracked_owners() <= {"t/echo/0"}
        config.write_text(_churned(components, state, 3))  # the same id again: its data is still there
        assert (await daemon.reload()).added == ["t/notes/3"]
        assert await daemon.router.host_request(ComponentId.parse("t/notes/3"), b"get k", 10) == b"v3"
        assert daemon.storage.quota("t/notes/3") == 100000


@pytest.mark.anyio
async def test_reloads_removing_denied_components_leave_no_audit_entries_of_them(tmp_path: Path,
                                                                                 components: Path) -> None:
    """The audit log kept, for every sender a reload removed, its denial count, its log interval and its
    unlogged denials: one entry each per component ever denied and removed, reload after reload."""
    shutil.copy(FIXTURES / "intruder.wasm", components / "intruder.wasm")
    config = tmp_path / "wasmhost.toml"
    state = tmp_path / "state"

    def configure(generation: int | None) -> None:
        extra = "" if generation is None else component(f"t/intruder/{generation}", "intruder")
        config.write_text(config_text(state, component("t/echo/0", "echo") + extra, components))

    configure(None)
    async with in_process(config) as daemon:
        for generation in range(8):
            configure(generation)
            assert (await daemon.reload()).added == [f"t/intruder/{generation}"]
            intruder = ComponentId.parse(f"t/intruder/{generation}")
            assert (await daemon.router.host_request(intruder, b"s1|t|echo|0", 10)).startswith(b"err 0 ")
            assert daemon.permissions.audit.denials(intruder) == 1
            configure(None)
            assert (await daemon.reload()).removed == [str(intruder)]
        assert daemon.permissions.audit.components() == set()
