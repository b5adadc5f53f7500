"""Start-up, restart and stop as an operator sees them: a component is listed `starting` (with what it
does) from the moment it is planned and its messages wait for it; slow starts block neither control
calls nor signals; `wasmhost restart` answers once the restart has happened; group strategies restart
like OTP; no task is left without an owner."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import anyio
import pytest
import structlog

from tests.conftest import FIXTURES, fixture_path
from tests.support import plain_supervisor
from tests.test_daemon import ROOT
from tests.test_daemon import Daemon as DaemonProcess
from tests.waits import until, wait_for
from wasmhost.actors.actor import ComponentActor
from wasmhost.actors.restart import Backoff, Strategy
from wasmhost.actors.spec import ActorSpec
from wasmhost.actors.state import ActorState
from wasmhost.actors.supervisor import Supervisor
from wasmhost.core import ComponentId
from wasmhost.core.errors import LoadError, MessagingError
from wasmhost.messaging.outcome import Outcome, RequestFailed
from wasmhost.runtime.loader import LoadedComponent
from wasmhost.runtime.runtime import Runtime
from wasmhost.system.config import load_config
from wasmhost.system.daemon import Daemon

GREETER = ROOT / "config" / "build" / "greeter.wasm"
"""The componentize-py example (18 MB): compiling it without a cache takes seconds."""
DRAIN_S = 1.0
SHUTDOWN_S = 1.0
MARGIN_S = 1.0
STOP_BOUND = 2 * (DRAIN_S + SHUTDOWN_S + MARGIN_S)
"""What a stop may take here: drain + shutdown + a margin, doubled for a loaded machine."""


def components_dir(tmp: Path, *fixtures: str) -> Path:
    """A components directory holding the greeter and the named fixtures."""
    where = tmp / "components"
    where.mkdir()
    shutil.copy(GREETER, where / "greeter.wasm")
    for name in fixtures:
        shutil.copy(fixture_path(name), where / f"{name}.wasm")
    return where


def start_daemon(tmp: Path, components: str, where: Path) -> DaemonProcess:
    """A real daemon with a fresh (empty) compilation cache; not waited for."""
    config = tmp / "wasmhost.toml"
    config.write_text(f'[host]\ncomponents_dir = "{where}"\nstate_dir = "{tmp / "state"}"\n'
                      f'drain_timeout_s = {DRAIN_S}\nlog_format = "json"\n\n{components}')
    return DaemonProcess(tmp, config)


def status(d: DaemonProcess) -> dict[str, dict[str, object]]:
    """`wasmhost status --json`, by component id ({} while the socket is not up yet)."""
    result = d.cli("status", "--json")
    if result.returncode != 0:
        return {}
    return {row["id"]: row for row in json.loads(result.stdout)["components"]}


def phase(d: DaemonProcess, cid: str) -> tuple[object, object]:
    row = status(d).get(cid, {})
    return row.get("state"), row.get("phase")


GREETER_TOML = '[[components]]\nid = "t/greeter/0"\npath = "greeter.wasm"\ncapabilities = { storage = true }\n'


def test_a_compiling_component_is_listed_starting_and_its_calls_wait_for_it(tmp_path: Path) -> None:
    d = start_daemon(tmp_path, GREETER_TOML, components_dir(tmp_path))
    try:
        wait_for(lambda: phase(d, "t/greeter/0") == ("starting", "compiling"), "starting/compiling", 60)
        command = [sys.executable, "-m", "wasmhost.cli", "call", "t/greeter/0", "Ada", "--timeout", "300",
                   "--socket", str(d.socket)]
        call = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            # the call is queued in the mailbox of the component that is still compiling
            wait_for(lambda: status(d)["t/greeter/0"]["mailbox"] == 1, "the call queued", 60)
            assert phase(d, "t/greeter/0") == ("starting", "compiling")
            table = d.cli("status").stdout
            assert re.search(r"t/greeter/0\s+starting/compiling\s", table), table
            out, err = call.communicate(timeout=300)  # a cold compile on a loaded machine: up to a minute
        finally:
            if call.poll() is None:
                call.kill()
                call.wait()
        assert call.returncode == 0, err
        assert out.strip() == "Hello, Ada! (greeting #1, from Python)"
        d.expect("READY=1")
        assert status(d)["t/greeter/0"]["state"] == "running"
    finally:
        assert d.stop() == 0


def test_slow_starts_block_neither_control_calls_nor_sigterm(tmp_path: Path) -> None:
    # the greeter compiles for seconds; initloop's initialize would loop for ten minutes
    components = GREETER_TOML + (
        '[[components]]\nid = "t/initloop/0"\npath = "initloop.wasm"\nshutdown_timeout_s = 1.0\n'
        "limits = { max_execution_time_ms = 600000 }\n"
        '[[components]]\nid = "t/echo/0"\npath = "echo.wasm"\n')
    d = start_daemon(tmp_path, components, components_dir(tmp_path, "initloop", "echo"))
    try:
        wait_for(lambda: status(d).get("t/echo/0", {}).get("state") == "running", "echo running", 60)
        # initloop compiles beside the others (its compile may end after echo's start on a loaded machine)
        wait_for(lambda: phase(d, "t/initloop/0") == ("starting", "initializing"), "initloop initializing", 60)
        assert phase(d, "t/greeter/0") == ("starting", "compiling")
        assert d.call("t/echo/0", "still answered") == "still answered"
        began = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        code = d.proc.wait(timeout=60)
        took = time.monotonic() - began
    finally:
        d.stop()
    assert code == 0
    assert took < STOP_BOUND, f"SIGTERM during start-up took {took:.1f} s (bound {STOP_BOUND} s)"
    events = d.events()
    started = {e.get("component") for e in events if e["event"] == "component_started"}
    assert "t/greeter/0" not in started and "t/initloop/0" not in started  # neither was waited for
    assert not any(e["event"] == "daemon_ready" for e in events)
    assert any(e["event"] == "stopped" for e in events)


def test_every_restart_is_answered_once_done_and_counted(tmp_path: Path) -> None:
    d = start_daemon(tmp_path, '[[components]]\nid = "t/counter/0"\npath = "counter.wasm"\n',
                     components_dir(tmp_path, "counter"))
    try:
        d.expect("READY=1")
        assert d.call("t/counter/0", "") == "1"
        for _ in range(30):
            result = d.cli("restart", "t/counter/0")
            assert result.returncode == 0, result.stderr
            assert result.stdout.strip() == "restart: ok (running)"
        row = status(d)["t/counter/0"]
        assert (row["state"], row["restarts"]) == ("running", 30)
        assert d.call("t/counter/0", "") == "1"  # a fresh instance
    finally:
        assert d.stop() == 0


# --- an actor exists while its component compiles (in-process supervisor, real components) ---
# The compile step is our own Compile callable gated on an event (standing in for seconds of
# compiling); what it returns is a real compiled component.


@pytest.mark.anyio
async def test_messages_wait_while_compiling_and_are_handled_once_it_runs(runtime: Runtime) -> None:
    cid = ComponentId.parse("t/echo/0")
    compiled = anyio.Event()

    async def compile_slowly() -> LoadedComponent:
        await compiled.wait()
        return runtime.load(cid, fixture_path("echo"))

    async with plain_supervisor(runtime) as sup, anyio.create_task_group() as group:
        actor = sup.add(ActorSpec(cid), compile_slowly)
        group.start_soon(actor.start)
        with anyio.fail_after(10):
            while actor.phase != "compiling":
                await anyio.sleep(0.005)
        replies: list[bytes | None] = []

        async def call() -> None:
            replies.append(await sup.router.host_request(cid, b"queued", 30.0))

        group.start_soon(call)
        with anyio.fail_after(10):
            while len(actor.mailbox) != 1:
                await anyio.sleep(0.005)
        assert (actor.state, actor.phase) == (ActorState.STARTING, "compiling")
        compiled.set()
        with anyio.fail_after(10):
            while not replies:
                await anyio.sleep(0.005)
        assert replies == [b"queued"]
        assert (actor.state, actor.phase) == (ActorState.RUNNING, None)


@pytest.mark.anyio
async def test_a_component_that_fails_to_compile_answers_what_waited_for_it(runtime: Runtime) -> None:
    cid = ComponentId.parse("t/broken/0")
    compiled = anyio.Event()

    async def compile_broken() -> LoadedComponent:
        await compiled.wait()
        raise LoadError("broken.wasm", "not a component")

    async with plain_supervisor(runtime) as sup, anyio.create_task_group() as group:
        actor = sup.add(ActorSpec(cid), compile_broken)
        group.start_soon(actor.start)
        outcomes: list[object] = []

        async def call() -> None:
            with pytest.raises(RequestFailed) as failed:
                await sup.router.host_request(cid, b"waits", 30.0)
            outcomes.append(failed.value.outcome)

        group.start_soon(call)
        with anyio.fail_after(10):
            while len(actor.mailbox) != 1:
                await anyio.sleep(0.005)
        compiled.set()
    assert outcomes == [Outcome.TARGET_STOPPED]
    assert actor.state is ActorState.FAILED
    assert actor.stats.last_error == "broken.wasm: not a component"


@pytest.mark.anyio
async def test_a_stop_during_a_compile_does_not_wait_for_it(runtime: Runtime) -> None:
    cid = ComponentId.parse("t/echo/0")
    never = anyio.Event()

    async def compile_forever() -> LoadedComponent:
        await never.wait()
        raise AssertionError("unreachable")

    async with plain_supervisor(runtime) as sup, anyio.create_task_group() as group:
        actor = sup.add(ActorSpec(cid), compile_forever)
        group.start_soon(actor.start)
        with anyio.fail_after(10):
            while actor.phase != "compiling":
                await anyio.sleep(0.005)
        with anyio.fail_after(5):  # drain time is 60 s: the stop must not spend it waiting for the compile
            await actor.stop(drain_timeout=60.0)
    assert actor.state is ActorState.STOPPED


@pytest.mark.anyio
async def test_a_start_refused_after_stop_all_leaves_nothing_waiting_for_messages(runtime: Runtime) -> None:
    stopped, late = ComponentId.parse("t/stopped/0"), ComponentId.parse("t/late/0")
    async with plain_supervisor(runtime) as sup:
        actor = await sup.start(ActorSpec(stopped), runtime.load(stopped, fixture_path("echo")))
        await sup.stop_all(1.0)  # SIGTERM, while a reload adds a component and `wasmhost start ID` runs
        with pytest.raises(RuntimeError):
            await sup.start(ActorSpec(late), runtime.load(late, fixture_path("echo")))
        with pytest.raises(RuntimeError):
            await actor.start()
        for cid, refusal in ((late, "target-not-found"), (stopped, "delivery-failed")):
            with pytest.raises(MessagingError, match=refusal):  # at once, not queued for an actor that never runs
                await asyncio.wait_for(sup.router.host_request(cid, b"x", 600.0), 5)
        assert list(sup.actors) == [stopped] and actor.state is ActorState.STOPPED


# --- OTP group strategies (in-process supervisor, real components) ---

FAST = Backoff(base=0.01, maximum=0.05)


async def launch(sup: Supervisor, fixture: str, cid: str, strategy: Strategy) -> ComponentActor:
    component = ComponentId.parse(cid)
    spec = replace(ActorSpec(component, backoff=FAST), group="g", strategy=strategy)
    return await sup.start(spec, sup.stores.runtime.load(component, fixture_path(fixture)))  # type: ignore[attr-defined]


async def group_restart(runtime: Runtime, strategy: Strategy) -> list[tuple[str, str]]:
    """Start counter a, trapper b, counter c in one group, make b trap; the terminations and starts
    that follow, in order."""
    async with plain_supervisor(runtime) as sup:
        a = await launch(sup, "counter", "t/a/0", strategy)
        b = await launch(sup, "trapper", "t/b/0", strategy)
        c = await launch(sup, "counter", "t/c/0", strategy)
        for actor in (a, c):
            assert await sup.router.host_request(actor.component_id, b"", 5.0) == b"1"
        with structlog.testing.capture_logs() as logs:
            with pytest.raises(RequestFailed):
                await sup.router.host_request(b.component_id, b"boom", 5.0)
            with anyio.fail_after(10):
                while not (b.stats.restarts == 1 and c.stats.restarts == 1 and c.state is ActorState.RUNNING):
                    await anyio.sleep(0.005)
        assert await sup.router.host_request(c.component_id, b"", 5.0) == b"1"  # a fresh instance
        return [(e["event"], e["component"]) for e in logs
                if e["event"] in ("component_terminated", "component_started")]


@pytest.mark.anyio
async def test_one_for_all_terminates_in_reverse_start_order_then_starts_in_order(runtime: Runtime) -> None:
    assert await group_restart(runtime, Strategy.ONE_FOR_ALL) == [
        ("component_terminated", "t/c/0"), ("component_terminated", "t/a/0"),
        ("component_started", "t/a/0"), ("component_started", "t/b/0"), ("component_started", "t/c/0")]


@pytest.mark.anyio
async def test_rest_for_one_terminates_and_restarts_only_later_members_in_order(runtime: Runtime) -> None:
    assert await group_restart(runtime, Strategy.REST_FOR_ONE) == [
        ("component_terminated", "t/c/0"), ("component_started", "t/b/0"), ("component_started", "t/c/0")]


# --- every task has an owner ---


def test_no_task_is_created_without_an_owner() -> None:
    """Tasks are started in task groups only: nothing in wasmhost/ spawns a free-standing task."""
    pattern = re.compile(r"\b(create_task|ensure_future)\(")
    offenders = [f"{path.relative_to(ROOT)}:{n}" for path in sorted((ROOT / "wasmhost").rglob("*.py"))
                 for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []


@pytest.mark.anyio
async def test_a_daemon_run_through_start_reload_and_stop_leaves_no_task_behind(tmp_path: Path) -> None:
    config_path = tmp_path / "wasmhost.toml"
    head = f'[host]\ncomponents_dir = "{FIXTURES}"\nstate_dir = "{tmp_path / "state"}"\ndrain_timeout_s = 1.0\n\n'
    echo = '[[components]]\nid = "t/echo/0"\npath = "echo.wasm"\n'
    config_path.write_text(head + echo)
    before = asyncio.all_tasks()
    daemon = Daemon(load_config(config_path))
    code: list[int] = []

    def state(cid: str) -> str | None:
        actor = getattr(daemon, "supervisor", None) and daemon.supervisor.actors.get(ComponentId.parse(cid))
        return actor.state.value if actor else None

    async with anyio.create_task_group() as group:
        group.start_soon(lambda: _run(daemon, code))
        await until(lambda: state("t/echo/0") == "running", 30)
        config_path.write_text(head + echo + '[[components]]\nid = "t/counter/0"\npath = "counter.wasm"\n')
        os.kill(os.getpid(), signal.SIGHUP)  # a reload, requested the way systemd does
        await until(lambda: state("t/counter/0") == "running", 30)
        os.kill(os.getpid(), signal.SIGTERM)
    assert code == [0]
    assert asyncio.all_tasks() - before == set()


@pytest.mark.anyio
async def test_a_sighup_before_the_daemon_handles_signals_is_a_reload_once_it_has_started(tmp_path: Path) -> None:
    """README: a SIGHUP during start-up waits for the start to end and is carried out then. One that came
    before the daemon's signal receiver was open (the config being read, storage opened) ended the process
    instead: `wasmhost run` killed by SIGHUP 0.2 s after it began. `run` now records it from its first moment."""
    from wasmhost.system.early_signals import hold_early_signals  # what `wasmhost run` does first

    config_path = tmp_path / "wasmhost.toml"
    head = f'[host]\ncomponents_dir = "{FIXTURES}"\nstate_dir = "{tmp_path / "state"}"\ndrain_timeout_s = 1.0\n\n'
    echo = '[[components]]\nid = "t/echo/0"\npath = "echo.wasm"\n'
    config_path.write_text(head + echo)
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGHUP, signal.SIGUSR1)}
    try:
        hold_early_signals()
        daemon = Daemon(load_config(config_path))
        config_path.write_text(head + echo + '[[components]]\nid = "t/counter/0"\npath = "counter.wasm"\n')
        os.kill(os.getpid(), signal.SIGHUP)  # before run() opens its signal receiver
        code: list[int] = []
        async with anyio.create_task_group() as group:
            group.start_soon(lambda: _run(daemon, code))
            with anyio.fail_after(30):  # the reload reads the config as it is now: the counter comes
                while "t/counter/0" not in {str(cid) for cid in getattr(daemon, "deployments", {})}:
                    await anyio.sleep(0.01)
            os.kill(os.getpid(), signal.SIGTERM)
        assert code == [0]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_a_signal_storm_before_the_daemon_handles_signals_is_remembered_once_each() -> None:
    # Every SIGHUP and SIGUSR1 during start-up was kept in a list, until the start was over: a storm of
    # 100,000 kept 100,000 (and made as many reload requests and log reopens after it). One of each does.
    from wasmhost.system.early_signals import hold_early_signals, take_early_signals

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGHUP, signal.SIGUSR1)}
    try:
        hold_early_signals()
        for _ in range(1000):
            signal.raise_signal(signal.SIGHUP)
            signal.raise_signal(signal.SIGUSR1)
        assert take_early_signals() == [signal.SIGHUP, signal.SIGUSR1]
        assert take_early_signals() == []
        signal.raise_signal(signal.SIGUSR1)  # after a take, a new one counts again
        assert take_early_signals() == [signal.SIGUSR1]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


async def _run(daemon: Daemon, code: list[int]) -> None:
    code.append(await daemon.run())
