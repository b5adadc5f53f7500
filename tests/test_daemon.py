"""The daemon end to end: a real subprocess, a real NOTIFY_SOCKET, real signals and the real CLI."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import anyio
import pytest
import structlog

from tests.conftest import FIXTURES
from wasmhost.core import affinity
from wasmhost.runtime.runtime import Runtime
from wasmhost.system import protocol
from wasmhost.system.client import request
from wasmhost.system.config import load_config
from wasmhost.system.control import ControlServer
from wasmhost.system.daemon import Daemon as InProcessDaemon

ROOT = Path(__file__).resolve().parent.parent


def wasmhost(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real CLI."""
    return subprocess.run([sys.executable, "-m", "wasmhost.cli", *args], capture_output=True, text=True,
                          input=stdin.decode() if stdin else None, timeout=60, cwd=ROOT)


def component(cid: str, fixture: str, extra: str = "") -> str:
    return f'[[components]]\nid = "{cid}"\npath = "{fixture}.wasm"\n{extra}\n'


def config_text(state: Path, components: str, components_dir: Path = FIXTURES) -> str:
    return (f'[host]\ncomponents_dir = "{components_dir}"\nstate_dir = "{state}"\ndrain_timeout_s = 5.0\n'
            f'log_format = "json"\n\n{components}')


class Daemon:
    """A `wasmhost run` subprocess with a NOTIFY_SOCKET the test reads."""

    def __init__(self, tmp: Path, config: Path, env: dict[str, str] | None = None,
                 python_args: tuple[str, ...] = ("-m", "wasmhost.cli"), prefix: tuple[str, ...] = ()) -> None:
        self.config = config
        self.socket = tmp / "state" / "wasmhost.sock"
        self.log = tmp / "daemon.log"
        self.notify_path = tmp / "notify.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        self.notify.settimeout(60)
        env = {**os.environ, "NOTIFY_SOCKET": str(self.notify_path), **(env or {})}
        self.proc = subprocess.Popen([*prefix, sys.executable, *python_args, "run", "--config", str(config)],
                                     stdout=self.log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self.messages: list[str] = []

    def expect(self, field: str) -> list[str]:
        """Read notifications until one contains `field`; return everything read."""
        seen = []
        deadline = time.monotonic() + 60
        while True:
            # woken by the notification itself; the short timeout only notices a daemon that exited early
            self.notify.settimeout(0.5)
            try:
                message = self.notify.recv(4096).decode()
            except TimeoutError:
                if self.proc.poll() is None and time.monotonic() < deadline:
                    continue
                raise AssertionError(f"no {field} from the daemon (exit code {self.proc.poll()}); log:\n"
                                     f"{self.log.read_text()}") from None
            seen.append(message)
            self.messages.append(message)
            if field in message.split("\n"):
                return seen

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The CLI aimed at this daemon's socket."""
        return wasmhost(*args, "--socket", str(self.socket))

    def call(self, cid: str, payload: str) -> str:
        result = self.cli("call", cid, payload)
        assert result.returncode == 0, result.stderr
        return result.stdout.rstrip("\n")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        # The daemon has exited: a Unix datagram is queued at the receiver when sendto returns, so every
        # notification it sent is already here. Drain without waiting (a 0.2 s timeout cost every stop).
        self.notify.setblocking(False)
        try:
            while True:
                self.messages.append(self.notify.recv(4096).decode())
        except (TimeoutError, BlockingIOError):
            pass
        self.notify.close()
        return code

    def events(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{")]


@asynccontextmanager
async def in_process(config_path: Path) -> AsyncIterator[InProcessDaemon]:
    """The daemon of `config_path` run in this process (its internals within reach), from its READY=1 on;
    stopped through its own SIGTERM path when the block ends."""
    daemon = InProcessDaemon(load_config(config_path))
    ready = anyio.Event()
    notify = daemon.notifier.notify

    def watch(*fields: str) -> None:
        if "READY=1" in fields:
            ready.set()
        notify(*fields)

    daemon.notifier.notify = watch  # type: ignore[method-assign]
    async with anyio.create_task_group() as group:
        group.start_soon(daemon.run)
        with anyio.fail_after(60):
            await ready.wait()
        try:
            yield daemon
        finally:
            daemon._on_stop_signal(15)


def warm_cache(runtime: Runtime, state: Path, *binaries: Path) -> None:
    """Put the compiled code of `binaries` in the compilation cache of a daemon whose state_dir is `state`,
    as an earlier start would have left it: taken from the session Runtime's cache (compiled there first
    if missing, kept there across runs). An 18 MB componentize-py guest takes seconds to compile on two
    cores; a test about what such a guest does, not about compiling it, need not pay for it each time.
    Only the code is copied: the daemon still counts, validates and links each binary itself. The
    daemon's engine settings are the defaults, as the session Runtime's, so the keys are the same (a
    key that differed would only mean a compile, never a wrong answer)."""
    cache = runtime.cache
    assert cache.directory is not None
    target = state / "cache"
    target.mkdir(mode=0o700, parents=True, exist_ok=True)
    for path in binaries:
        wasm = path.read_bytes()
        key = cache.key(wasm)
        cache.component(wasm, key)  # on the session cache's disk from now on
        entry = cache.directory / f"{key}.cwasm"
        if entry.exists():
            try:
                os.link(entry, target / entry.name)  # entries are replaced by rename, never written in place
            except OSError:
                shutil.copyfile(entry, target / entry.name)
                os.chmod(target / entry.name, 0o600)


def launch(tmp_path: Path, components: str, started: list[Daemon], components_dir: Path = FIXTURES,
           python_args: tuple[str, ...] = ("-m", "wasmhost.cli"), edit: dict[str, str] | None = None,
           prefix: tuple[str, ...] = ()) -> Daemon:
    """Write tmp_path/wasmhost.toml for `components` (with `edit`'s replacements), start a daemon on it
    (its command line after `prefix`), keep it in `started` and wait for READY=1."""
    text = config_text(tmp_path / "state", components, components_dir)
    for old, new in (edit or {}).items():
        text = text.replace(old, new)
    config = tmp_path / "wasmhost.toml"
    config.write_text(text)
    d = Daemon(tmp_path, config, python_args=python_args, prefix=prefix)
    started.append(d)
    d.expect("READY=1")
    return d


def kill_leftovers(started: list[Daemon]) -> None:
    """Kill the daemons a failed test left running."""
    for d in started:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[object]:
    started: list[Daemon] = []

    def start(components: str, components_dir: Path = FIXTURES) -> Daemon:
        return launch(tmp_path, components, started, components_dir)

    yield start
    kill_leftovers(started)


BASIC = component("t/echo/0", "echo") + component("t/counter/0", "counter") + component(
    "t/notes/0", "storage", "capabilities = { storage = true }")


def test_ready_then_status_send_and_call(daemon: object) -> None:
    d = daemon(BASIC)  # type: ignore[operator]
    assert any("STATUS=3 running" in m for m in d.messages), d.messages
    status = d.cli("status")
    assert status.returncode == 0
    assert status.stdout.splitlines()[0].split()[:3] == ["ID", "STATE", "HEALTH"]
    assert "t/counter/0  running  healthy" in status.stdout
    assert d.call("t/echo/0", "hello daemon") == "hello daemon"
    assert d.cli("send", "t/counter/0", "x").returncode == 0
    assert d.call("t/counter/0", "x") == "2"
    (Path(d.config.parent) / "payload.bin").write_bytes(b"from a file")
    assert d.call("t/echo/0", f"@{d.config.parent / 'payload.bin'}") == "from a file"
    rows = {r["id"]: r for r in json.loads(d.cli("status", "--json").stdout)["components"]}
    assert rows["t/counter/0"]["handled"] == 2
    missing = d.cli("call", "t/ghost/0", "x")
    assert missing.returncode == 1 and "target-not-found: t/ghost/0" in missing.stderr
    assert d.stop() == 0


def loop_cores(d: Daemon) -> str:
    """The cores the daemon's event loop thread (its main thread) may run on, as Linux lists them."""
    status = Path(f"/proc/{d.proc.pid}/task/{d.proc.pid}/status").read_text()
    return next(line.split(":")[1].strip() for line in status.splitlines() if line.startswith("Cpus_allowed_list"))


def test_the_event_loop_stays_on_the_home_core(daemon: object) -> None:
    """Its thread shares one core with the workers running short guest calls (see core/affinity.py)."""
    d = daemon(component("t/echo/0", "echo"))  # type: ignore[operator]
    allowed = loop_cores(d)
    if len(affinity.ALL_CORES) > 1:  # with one core there is nothing to choose
        assert allowed.isdigit() and int(allowed) in affinity.ALL_CORES, allowed  # one of those it may use
    assert d.call("t/echo/0", "still answers") == "still answers"
    assert d.stop() == 0


@contextmanager
def network_namespace_of_their_own() -> Iterator[tuple[str, ...]]:
    """A command prefix that runs daemons in one network namespace of their own, where no other process
    on the machine holds a home core (`affinity._claim`'s names live in the network namespace), or no
    prefix where namespaces cannot be made (not root): then daemons or tests running beside this one
    may hold cores too, and the daemons here may settle on a core they share with one of those."""
    try:  # the holder says so once it is in its namespace, then keeps it alive
        holder = subprocess.Popen(["unshare", "--net", "sh", "-c", "echo in && exec sleep 600"],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    except FileNotFoundError:
        yield ()
        return
    try:
        netns = f"/proc/{holder.pid}/ns/net"
        entered = holder.stdout is not None and holder.stdout.readline() == "in\n"  # EOF if unshare failed
        usable = entered and subprocess.run(["nsenter", f"--net={netns}", "--", "true"],
                                            stderr=subprocess.DEVNULL, check=False).returncode == 0
        yield ("nsenter", f"--net={netns}", "--") if usable else ()
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.skipif(len(affinity.ALL_CORES) < 2, reason="one core: there is no other to take")
def test_daemons_side_by_side_take_different_home_cores(tmp_path: Path) -> None:
    """Each daemon holds its home core while it lives, so a second one started beside it takes another."""
    affinity.leave_home()  # this test process hosts no actors now: the two daemons choose among every core
    started: list[Daemon] = []
    for name in ("first", "second", "third"):
        (tmp_path / name).mkdir()
    with network_namespace_of_their_own() as prefix:
        try:
            first = launch(tmp_path / "first", component("t/echo/0", "echo"), started, prefix=prefix)
            second = launch(tmp_path / "second", component("t/echo/0", "echo"), started, prefix=prefix)
            first_core, second_core = loop_cores(first), loop_cores(second)
            assert first_core.isdigit() and second_core.isdigit(), (first_core, second_core)
            assert first_core != second_core
            assert first.call("t/echo/0", "first") == "first" and second.call("t/echo/0", "second") == "second"
            first.proc.send_signal(signal.SIGKILL)  # however it ends, its core is free again
            first.proc.wait()
            third = launch(tmp_path / "third", component("t/echo/0", "echo"), started, prefix=prefix)
            assert loop_cores(third) == first_core
            assert second.stop() == 0 and third.stop() == 0
        finally:
            kill_leftovers(started)


def test_reload_applies_only_the_difference(daemon: object, tmp_path: Path) -> None:
    quick = "rollout_check_s = 0\n"  # the changed one's new version is not watched for 3 s (not the point here)
    d = daemon(BASIC + component("t/gone/0", "echo") + component("t/changed/0", "counter", quick))  # type: ignore[operator]
    assert [d.call("t/counter/0", "") for _ in range(2)] == ["1", "2"]
    assert d.call("t/changed/0", "") == "1"
    d.config.write_text(config_text(tmp_path / "state", BASIC + component(
        "t/changed/0", "counter", quick + "mailbox_capacity = 7") + component("t/new/0", "echo")))
    d.proc.send_signal(signal.SIGHUP)
    seen = d.expect("READY=1")
    assert any("RELOADING=1" in m for m in seen)
    assert d.call("t/counter/0", "") == "3"  # unchanged: kept its instance state
    assert d.call("t/changed/0", "") == "1"  # changed settings: restarted
    assert d.call("t/new/0", "added") == "added"
    assert "target-not-found" in d.cli("call", "t/gone/0", "x").stderr
    reloaded = [e for e in d.events() if e["event"] == "reloaded"]
    assert reloaded[-1]["added"] == ["t/new/0"] and reloaded[-1]["removed"] == ["t/gone/0"]
    assert reloaded[-1]["changed"] == ["t/changed/0"] and reloaded[-1]["unchanged"] == 3
    assert d.stop() == 0


def test_an_invalid_config_on_reload_keeps_the_old_deployment(daemon: object) -> None:
    d = daemon(BASIC)  # type: ignore[operator]
    assert d.call("t/counter/0", "") == "1"
    d.config.write_text('[host]\nepoch_tick_ms = "fast"\n[[components]]\nid = "bad"\n')
    result = d.cli("reload")
    assert result.returncode == 1
    assert 'host.epoch_tick_ms: expected an integer > 0, got "fast"' in result.stderr
    assert "components[0].id: component id 'bad'" in result.stderr
    assert d.call("t/counter/0", "") == "2"
    assert d.stop() == 0


def test_sigterm_drains_and_exits_0_with_storage_intact(daemon: object, tmp_path: Path) -> None:
    d = daemon(BASIC)  # type: ignore[operator]
    assert d.call("t/notes/0", "set colour blue") == "ok"
    assert d.stop() == 0
    assert any("STOPPING=1" in m for m in d.messages)
    with sqlite3.connect(tmp_path / "state" / "storage.sqlite3") as db:
        assert db.execute("SELECT value FROM kv WHERE owner = 't/notes/0' AND key = 'colour'").fetchone() == (b"blue",)
    assert not d.socket.exists()


def test_a_second_stop_signal_exits_at_once_with_0_and_says_so_in_the_log(daemon: object, tmp_path: Path) -> None:
    """SIGINT stops like SIGTERM; a second one, while a `shutdown` that never returns holds the stop, exits
    at once with 0, committed storage intact. The `forced_exit` line saying why used to be lost: the
    process exited without letting the log writer thread write it."""
    d = daemon(component("t/slow/0", "slowstop", "shutdown_timeout_s = 600")  # type: ignore[operator]
               + component("t/notes/0", "storage", "capabilities = { storage = true }"))
    assert d.call("t/notes/0", "set colour blue") == "ok"
    d.proc.send_signal(signal.SIGINT)
    d.expect("STOPPING=1")  # the first signal has been taken: the stop waits on t/slow/0's shutdown
    d.proc.send_signal(signal.SIGINT)
    assert d.proc.wait(timeout=30) == 0
    events = d.events()
    assert [e["signal"] for e in events if e["event"] in ("stopping", "forced_exit")] == ["SIGINT", "SIGINT"]
    assert events[-1]["event"] == "forced_exit", events[-3:]
    with sqlite3.connect(tmp_path / "state" / "storage.sqlite3") as db:
        assert db.execute("SELECT value FROM kv WHERE owner = 't/notes/0' AND key = 'colour'").fetchone() == (b"blue",)


def test_a_start_or_restart_during_the_shutdown_is_refused_not_an_internal_error(daemon: object) -> None:
    """`wasmhost start ID` (or `restart ID`) of a stopped component while the daemon stops: the supervisor
    refuses to start anything then (RuntimeError), which the control socket answered as `internal error:
    RuntimeError: the supervisor is not running ...`, logging a traceback (control_request_failed)."""
    d = daemon(component("t/slow/0", "slowstop", "shutdown_timeout_s = 5")  # type: ignore[operator]
               + component("t/echo/0", "echo"))
    assert d.cli("stop", "t/echo/0").returncode == 0
    d.proc.send_signal(signal.SIGTERM)
    d.expect("STOPPING=1")  # the stop waits on t/slow/0's shutdown for up to 5 s
    for command in ("start", "restart"):
        refused = d.cli(command, "t/echo/0")
        assert refused.returncode == 1 and "internal error" not in refused.stderr, refused.stderr
        assert "t/echo/0 not started: the daemon is stopping" in refused.stderr, refused.stderr
    assert d.proc.wait(timeout=30) == 0
    assert not [e for e in d.events() if e["event"] == "control_request_failed"]


def test_the_host_defaults_apply_to_every_component_that_sets_nothing(tmp_path: Path) -> None:
    """[host] default_mailbox_capacity, default_storage_quota_bytes, default_log_rate / default_log_burst and
    [host.default_limits] reach components whose entries set nothing of their own (before, each was only
    parsed by the tests, never shown to change what a component gets)."""
    started: list[Daemon] = []
    d = launch(tmp_path, component("t/nap/0", "napper")
               + component("t/notes/0", "storage", "capabilities = { storage = true }")
               + component("t/flood/0", "logflood") + component("t/hog/0", "memhog") + component("t/busy/0", "busy")
               + component("t/busy/1", "busy", "limits = { max_fuel = 1000000000 }"), started,
               edit={"drain_timeout_s = 5.0": "drain_timeout_s = 0.2",  # the napper's queue is not waited for
                     'log_format = "json"\n': 'log_format = "json"\ndefault_mailbox_capacity = 2\n'
                     "default_storage_quota_bytes = 100\ndefault_log_rate = 1.0\ndefault_log_burst = 3\n"
                     "[host.default_limits]\nmax_memory_bytes = 2097152\nmax_fuel = 100000\n"})
    try:
        _check_host_defaults(d)
    finally:
        kill_leftovers(started)


def _check_host_defaults(d: Daemon) -> None:
    for _ in range(6):  # the napper never finishes its first batch (what was queued when it began: 2 at most)
        sent = d.cli("send", "t/nap/0", "x", "--timeout", "0.2")
        if sent.returncode:
            break
    assert "the mailbox of t/nap/0 stayed full (2 messages)" in sent.stderr, sent.stderr
    quota = d.cli("call", "t/notes/0", "set k " + "v" * 200)
    assert "storage error: quota-exceeded" in quota.stderr, quota.stderr
    assert d.call("t/notes/0", "usage") == "0 100 0"  # USED QUOTA COUNT
    assert d.call("t/hog/0", "") == "32"  # pages of 64 KiB it could grow to: 2 MiB
    assert "ran out of fuel" in d.cli("call", "t/busy/0", "10000000").stderr
    assert d.call("t/busy/1", "10000000") == "10000000"  # its own max_fuel; the default's 2 MiB and 30 s still
    assert d.call("t/flood/0", "20") == "20"
    assert d.stop() == 0
    events = d.events()
    assert sum(1 for e in events if e.get("guest") and e.get("component") == "t/flood/0") == 3
    suppressed = [e for e in events if e["event"] == "guest_log_suppressed"]
    assert [(e["suppressed"], e["log_rate"], e["log_burst"]) for e in suppressed] == [(17, 1.0, 3)], suppressed


def test_a_bad_config_at_start_exits_1_listing_every_error(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(config_text(tmp_path / "state", component("t/a/0", "echo", "limits = { max_fuel = \"lots\" }")
                                  + component("t/a/0", "echo") + component("t/core/0", "core")
                                  + component("t/x/0", "missing-file")))
    result = wasmhost("run", "--config", str(config), "--log-format", "console")
    assert result.returncode == 1
    for expected in ('components[0].limits.max_fuel: expected an integer > 0, got "lots"',
                     "components[1].id: duplicate id 't/a/0'",
                     "components[2].path: this is a core WebAssembly module",
                     "components[3].path: no component file at"):
        assert expected in result.stderr, result.stderr
    check = wasmhost("check", "--config", str(config))
    assert check.returncode == 1 and "4 error(s)" in check.stderr


def test_check_compiles_a_good_config(tmp_path: Path) -> None:
    config = tmp_path / "good.toml"
    config.write_text(config_text(tmp_path / "state", BASIC))
    result = wasmhost("check", str(config))
    assert result.returncode == 0 and "ok, 3 component(s)" in result.stdout


# Runs `wasmhost check` with Runtime.load saying on stderr which file it loads.
COUNTED_LOADS = """
import sys
from wasmhost.runtime.runtime import Runtime
load = Runtime.load
def counted(self, component, path=None, outbound_http=False):
    print(f"load {path.name}", file=sys.stderr, flush=True)
    return load(self, component, path, outbound_http)
Runtime.load = counted
from wasmhost.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_check_loads_each_binary_once_and_checks_each_components_budget(tmp_path: Path) -> None:
    config = tmp_path / "shared.toml"
    config.write_text(config_text(tmp_path / "state", "".join(component(f"t/echo/{i}", "echo") for i in range(50))
                                  + component("t/tight/0", "echo", "limits = { max_memory_bytes = 65536 }")
                                  + component("t/counter/0", "counter")))
    result = subprocess.run([sys.executable, "-c", COUNTED_LOADS, "check", str(config)], capture_output=True,
                            text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 1
    loads = [line for line in result.stderr.splitlines() if line.startswith("load ")]
    assert sorted(loads) == ["load counter.wasm", "load echo.wasm"]
    assert "1 component(s) cannot be loaded:\n  t/tight/0: " in result.stderr and "max_memory_bytes" in result.stderr


def test_the_cli_says_when_no_daemon_is_listening(tmp_path: Path) -> None:
    result = wasmhost("status", "--socket", str(tmp_path / "none.sock"))
    assert result.returncode == 3  # no answer from a daemon
    assert result.stderr.strip() == f"wasmhost: no wasmhost daemon is listening on {tmp_path / 'none.sock'}"


def test_a_config_path_that_is_a_fifo_makes_run_and_the_control_commands_exit_1_not_wait(tmp_path: Path) -> None:
    """`check` refused a FIFO named as the configuration; `run` then read it again for its logging settings,
    and `status` and the other control commands read it for the socket's path, both waiting for a writer."""
    fifo = tmp_path / "wasmhost.toml"
    os.mkfifo(fifo)
    ran = wasmhost("run", "--config", str(fifo))
    assert ran.returncode == 1 and f"{fifo}: 1 error(s):\n  cannot read: not a regular file" in ran.stderr
    status = wasmhost("status", "--config", str(fifo))
    assert status.returncode == 1
    assert status.stderr.startswith(f"wasmhost: cannot read the configuration {fifo} to find the control socket: "
                                    "not a regular file")


def test_control_socket_is_private_and_survives_bad_frames(daemon: object) -> None:
    d = daemon(BASIC)  # type: ignore[operator]
    assert (d.socket.stat().st_mode & 0o777) == 0o600
    for garbage in (b"\x00\x00\x00\x05hello", b"\xff\xff\xff\xff", b"\x00\x00\x00\x02\x81\xa1"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
            raw.settimeout(5)
            raw.connect(str(d.socket))
            raw.sendall(garbage)
            answer = raw.recv(4096)
            assert b"bad frame" in answer or b"malformed request" in answer
    assert d.call("t/echo/0", "still serving") == "still serving"
    assert d.stop() == 0


def _run_second(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "wasmhost.cli", "run", "--config", str(config)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_a_second_daemon_takes_neither_the_live_socket_nor_the_state_dir(daemon: object, tmp_path: Path) -> None:
    d = daemon(BASIC)  # type: ignore[operator]
    assert d.call("t/notes/0", "set k first") == "ok"
    state = tmp_path / "state"
    taken = f"{state}: another wasmhost daemon (pid {d.proc.pid}) uses this state_dir"
    same = _run_second(d.config)  # the same configuration
    assert same.returncode == 1 and taken in same.stderr
    other_socket = tmp_path / "other-socket.toml"  # its own socket, the same state_dir
    other_socket.write_text(d.config.read_text().replace(
        'log_format = "json"', f'log_format = "json"\ncontrol_socket = "{tmp_path / "other.sock"}"'))
    second = _run_second(other_socket)
    assert second.returncode == 1 and taken in second.stderr
    other_state = tmp_path / "other-state.toml"  # its own state_dir, the same socket
    other_state.write_text(d.config.read_text().replace(
        f'state_dir = "{state}"', f'state_dir = "{tmp_path / "state-2"}"\ncontrol_socket = "{d.socket}"'))
    second = _run_second(other_state)
    assert second.returncode == 1 and "another wasmhost is listening" in second.stderr
    assert d.call("t/echo/0", "mine") == "mine" and d.call("t/notes/0", "get k") == "first"
    assert d.stop() == 0


def test_a_daemon_killed_with_sigkill_leaves_its_state_dir_free_for_the_next(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    started: list[Daemon] = []

    def start(name: str) -> Daemon:
        (tmp_path / name).mkdir()
        d = launch(tmp_path / name, BASIC, started, edit={f'"{tmp_path / name / "state"}"': f'"{shared}"'})
        d.socket = shared / "wasmhost.sock"
        return d

    try:
        first = start("first")
        assert first.call("t/notes/0", "set k kept") == "ok"
        first.proc.kill()  # no cleanup: its lock file and socket file stay behind
        first.proc.wait()
        assert (shared / "daemon.lock").read_text().strip() == str(first.proc.pid)
        second = start("second")
        assert second.call("t/notes/0", "get k") == "kept"
        assert second.stop() == 0
    finally:
        kill_leftovers(started)


def test_logs_filters_the_log_the_daemon_wrote(daemon: object) -> None:
    d = daemon(BASIC + component("t/logger/0", "logger") + component("t/trapper/0", "trapper"))  # type: ignore[operator]
    assert d.cli("call", "t/logger/0", "hello from the guest").returncode == 0
    assert d.cli("call", "t/trapper/0", "boom").returncode == 1
    assert d.stop() == 0
    with d.log.open("a") as log:
        log.write("not a json line\n")
    guest = wasmhost("logs", str(d.log), "--component", "t/log*", "--grep", "hello")
    assert guest.returncode == 0
    assert "hello from the guest" in guest.stdout and "[t/logger/0]" in guest.stdout and "source=logger" in guest.stdout
    assert "1 of" in guest.stderr and "not wasmhost events" in guest.stderr
    warnings = wasmhost("logs", str(d.log), "--level", "warning", "--json").stdout.splitlines()
    assert warnings and all(json.loads(line)["level"] in ("warning", "error") for line in warnings)
    assert any(json.loads(line)["event"] == "component_restarting" for line in warnings)
    piped = wasmhost("logs", "-", "--component", "t/trapper/0", stdin=d.log.read_bytes())
    assert "component_restarting" in piped.stdout and "t/logger/0" not in piped.stdout


def test_the_default_configuration_runs_every_example(daemon: object, tmp_path: Path, runtime: Runtime) -> None:
    text = (ROOT / "config" / "wasmhost.toml").read_text()
    text = text.replace('components_dir = "build"', f'components_dir = "{ROOT / "config" / "build"}"')
    text = text.replace('state_dir = "state"', f'state_dir = "{tmp_path / "state"}"')
    warm_cache(runtime, tmp_path / "state", ROOT / "config" / "build" / "greeter.wasm")  # not about compiling
    config = tmp_path / "demo.toml"
    config.write_text(text)
    d = Daemon(tmp_path, config)
    try:
        d.expect("READY=1")
        assert d.call("demo/echo/0", "hi") == "hi"
        assert d.call("demo/counter/0", "") == "1"
        correlation = d.call("demo/client/0", "demo|server|0|ping")
        deadline = time.monotonic() + 10
        while d.call("demo/client/0", "?last-correlation") != correlation and time.monotonic() < deadline:
            time.sleep(0.05)
        assert d.call("demo/client/0", "?last-payload") == "ping"
        assert d.call("demo/notes/0", "set k v") == "ok" and d.call("demo/notes/0", "get k") == "v"
        assert d.call("demo/greeter/0", "Ada") == "Hello, Ada! (greeting #1, from Python)"
    finally:
        assert d.stop() == 0


def test_the_systemd_unit_verifies(tmp_path: Path) -> None:
    # The unit names the install prefix /opt/wasmhost/venv; point it at this venv to verify it here.
    unit = (ROOT / "deploy" / "wasmhost.service").read_text()
    unit = unit.replace("/opt/wasmhost/venv", sys.prefix)
    target = tmp_path / "wasmhost.service"
    target.write_text(unit)
    result = subprocess.run(["systemd-analyze", "verify", str(target)], capture_output=True, text=True, timeout=60)
    problems = [line for line in result.stderr.splitlines() if "wasmhost.service" in line]
    assert result.returncode == 0 and problems == [], result.stderr


def test_the_watchdog_is_fed_while_the_loop_is_healthy(tmp_path: Path) -> None:
    config = tmp_path / "wasmhost.toml"
    config.write_text(config_text(tmp_path / "state", BASIC))
    d = Daemon(tmp_path, config, env={"WATCHDOG_USEC": "200000"})
    try:
        d.expect("READY=1")
        began = time.monotonic()
        d.expect("WATCHDOG=1")
        d.expect("WATCHDOG=1")
        assert time.monotonic() - began < 2
    finally:
        assert d.stop() == 0


def test_logs_follow_prints_lines_as_they_are_written(tmp_path: Path) -> None:
    log = tmp_path / "growing.log"
    log.write_text("")
    follower = subprocess.Popen([sys.executable, "-m", "wasmhost.cli", "logs", str(log), "--follow"],
                                stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        with log.open("a") as out:
            out.write(json.dumps({"event": "late_line", "level": "info", "timestamp": "2026-01-01T00:00:00Z"}) + "\n")
        assert follower.stdout is not None
        assert "late_line" in follower.stdout.readline()
    finally:
        follower.kill()
        follower.wait()


@contextmanager
def daemon_only_root_may_control(tmp_path: Path, components: str) -> Iterator[Daemon]:
    """A daemon whose control socket sits where other users can reach it (mode 0660, group nogroup) but
    whose `control_users` is root alone; the socket's directory is removed after."""
    public = Path(f"/tmp/wasmhost-peercred-{os.getpid()}")  # traversable by other users, unlike tmp_path
    public.mkdir(mode=0o755, exist_ok=True)
    try:
        config = tmp_path / "wasmhost.toml"
        config.write_text(config_text(tmp_path / "state", components).replace(
            "[host]\n", f'[host]\ncontrol_socket = "{public / "ctl.sock"}"\nsocket_mode = "0660"\n'
                        'socket_group = "nogroup"\ncontrol_users = ["root"]\n'))
        d = Daemon(tmp_path, config)
        d.socket = public / "ctl.sock"
        d.expect("READY=1")
        yield d
    finally:
        for leftover in public.iterdir():
            leftover.unlink()
        public.rmdir()


def as_nobody(ask: Callable[[], str]) -> str:
    """What `ask` returns when run by another user (uid and gid 65534), in a child process."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.setgid(65534)
            os.setuid(65534)
            os.write(write_end, ask().encode())
        finally:
            os._exit(0)
    os.close(write_end)
    os.waitpid(child, 0)
    with os.fdopen(read_end) as result:
        return result.read()


def test_other_users_are_refused_when_control_users_is_set(tmp_path: Path) -> None:
    with daemon_only_root_may_control(tmp_path, BASIC) as d:
        assert d.call("t/echo/0", "root may") == "root may"

        def ask() -> str:  # with the CLI's own client code
            answer = request(d.socket, protocol.Status())
            return f"{answer.ok}|{answer.error}"

        assert as_nobody(ask) == "False|permission denied: uid 65534 is not allowed to control this daemon " \
                                 "(host.control_users)"
        assert d.stop() == 0


def test_the_systemd_unit_is_hardened(tmp_path: Path) -> None:
    unit = (ROOT / "deploy" / "wasmhost.service").read_text().replace("/opt/wasmhost/venv", sys.prefix)
    target = tmp_path / "wasmhost.service"
    target.write_text(unit)
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(target)],
                            capture_output=True, text=True, timeout=60)
    verdict = [line for line in result.stdout.splitlines() if "Overall exposure level" in line]
    assert verdict, result.stdout + result.stderr
    exposure = float(verdict[0].split(":")[1].split()[0])
    assert exposure <= 1.0, verdict[0]  # the README quotes 0.5 SAFE


def _syscalls(names: list[str]) -> set[str]:
    """System calls named, groups (@...) expanded by systemd-analyze."""
    calls: set[str] = set()
    for name in names:
        if not name.startswith("@"):
            calls.add(name)
            continue
        listed = subprocess.run(["systemd-analyze", "syscall-filter", name], capture_output=True, text=True,
                                timeout=60, check=True).stdout.splitlines()
        calls |= _syscalls([line.strip() for line in listed[1:] if line.strip() and not line.strip().startswith("#")])
    return calls


def test_the_units_system_call_filter_lets_the_daemon_place_its_threads() -> None:
    # The daemon calls sched_setaffinity at start on any machine with two cores or more (its event loop
    # and short guest calls on one home core). The unit denied @resources, which holds it, with no
    # SystemCallErrorNumber: systemd kills the process on a denied call, so it never started (SIGSYS).
    unit = (ROOT / "deploy" / "wasmhost.service").read_text()
    filters = re.findall(r"^SystemCallFilter=(.*)$", unit, re.MULTILINE)
    allowed = _syscalls(filters[0].split())
    for line in filters[1:]:
        if line.startswith("~"):
            allowed -= _syscalls(line[1:].split())
        else:
            allowed |= _syscalls(line.split())
    assert "sched_setaffinity" in allowed
    assert re.search(r"^SystemCallErrorNumber=EPERM$", unit, re.MULTILINE), "a denied call must fail, not kill"


def test_the_log_file_setting_writes_json_lines(tmp_path: Path) -> None:
    config = tmp_path / "wasmhost.toml"
    log_file = tmp_path / "wasmhost.log"
    config.write_text(config_text(tmp_path / "state", BASIC).replace("[host]\n", f'[host]\nlog_file = "{log_file}"\n'))
    d = Daemon(tmp_path, config)
    d.expect("READY=1")
    assert d.call("t/echo/0", "logged") == "logged"
    assert d.stop() == 0
    events = [json.loads(line)["event"] for line in log_file.read_text().splitlines()]
    assert "daemon_ready" in events and events[-1] == "stopped"


def test_a_relative_log_file_is_beside_the_config_also_when_the_config_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "wasmhost.toml"
    good = config_text(tmp_path / "state", BASIC).replace("[host]\n", '[host]\nlog_file = "logs/wasmhost.log"\n')
    (tmp_path / "logs").mkdir()
    config.write_text(good)
    d = Daemon(tmp_path, config)
    d.expect("READY=1")
    assert d.stop() == 0
    logged = tmp_path / "logs" / "wasmhost.log"
    assert [json.loads(line)["event"] for line in logged.read_text().splitlines()][-1] == "stopped"
    config.write_text(good + component("t/echo/0", "echo"))  # a duplicate id: the daemon refuses to start
    result = wasmhost("run", "--config", str(config))
    assert result.returncode == 1 and "duplicate id 't/echo/0'" in result.stderr
    last = json.loads(logged.read_text().splitlines()[-1])
    assert last["event"] == "config_invalid" and last["source"] == str(config), last


def test_a_log_file_that_is_a_fifo_nobody_reads_or_a_directory_stops_the_start_with_its_key(tmp_path: Path) -> None:
    """log_file naming a FIFO with no reader held `run` before its first line, for good; naming a directory,
    `check` said ok and `run` exited with '[Errno 21] Is a directory'."""
    config = tmp_path / "wasmhost.toml"
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "folder").mkdir()
    config.write_text(config_text(tmp_path / "state", BASIC).replace("[host]\n", '[host]\nlog_file = "pipe"\n'))
    result = wasmhost("run", "--config", str(config))
    assert result.returncode == 1
    assert result.stderr.strip() == f"wasmhost: host.log_file: cannot open {tmp_path / 'pipe'}: a FIFO no process reads"
    config.write_text(config_text(tmp_path / "state", BASIC).replace("[host]\n", '[host]\nlog_file = "folder"\n'))
    error = f"host.log_file: {tmp_path / 'folder'} is a directory, expected a file to append to"
    for command in ("check", "run"):
        result = wasmhost(command, "--config", str(config))
        assert result.returncode == 1 and f"1 error(s):\n  {error}\n" in result.stderr, result.stderr


def test_ready_comes_after_the_first_attempt_of_a_component_whose_initialize_never_ends(daemon: object) -> None:
    """READY=1 waits for every component's first attempt, not for all the restarts of one that keeps
    failing (five initialize deadlines plus backoff)."""
    endless = component("t/endless/0", "initloop", "limits = { max_execution_time_ms = 2000 }")
    d = daemon(component("t/echo/0", "echo") + endless)  # type: ignore[operator]
    rows = {r["id"]: r for r in json.loads(d.cli("status", "--json").stdout)["components"]}
    assert rows["t/endless/0"]["state"] == "restarting", rows["t/endless/0"]
    assert "timed out" in rows["t/endless/0"]["last_error"]
    assert d.call("t/echo/0", "still here") == "still here"


@pytest.mark.anyio
async def test_a_control_client_that_stops_reading_is_dropped_with_its_answer(tmp_path: Path) -> None:
    """The socket's own logic, with a stand-in handler answering 16 MiB (a large `call` reply). Before,
    a client that stopped reading (a suspended CLI) kept its connection and the answer in the daemon."""
    answer = protocol.Response(True, data="x" * (16 << 20))

    async def handler(request: protocol.Request) -> protocol.Response:
        return answer

    server = ControlServer(tmp_path / "c.sock", 0o600, handler, send_timeout=0.5)
    await server.start()
    async with anyio.create_task_group() as group:
        await group.start(server.serve)
        try:
            with structlog.testing.capture_logs() as logs:
                reader, writer = await asyncio.open_unix_connection(str(tmp_path / "c.sock"))
                writer.write(protocol.frame(protocol.Status()))
                await writer.drain()  # ... and reads nothing
                with anyio.fail_after(10):
                    while not any(e["event"] == "control_client_not_reading" for e in logs):
                        await anyio.sleep(0.01)
            received = len(await asyncio.wait_for(reader.read(), 10))  # to the end: the server hung up
            assert received < len(protocol.frame(answer, protocol.MAX_RESPONSE_FRAME))
            writer.close()
            served = await anyio.to_thread.run_sync(request, tmp_path / "c.sock", protocol.Status(), 10.0)
            assert served == answer  # the others are served
        finally:
            await server.close()
