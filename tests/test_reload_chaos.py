"""A stateful chaos test of reload: random config edits, reloads, operator actions and messages against one daemon.

Every other reload test (test_reload.py, test_rollout.py, test_handover.py) drives one scripted sequence. This
one (a hypothesis RuleBasedStateMachine, after test_lifecycle_chaos.py) runs, per example, ONE real daemon
(`Daemon.run`, the code `wasmhost run` runs: real config file, control socket, signal receiver, supervisor,
wasmtime and SQLite) in this process, and fires in random order, mostly without waiting:

- edits of its config file: a component added or removed, its binary changed (another fixture's bytes written
  over its file, or a copy under a new name), a binary that does not load (truncated, or an import the host
  does not provide), a limit, capability, env or check window changed, a memory limit nothing fits in, an
  invalid file (bad TOML, a bad field), a changed `[host]` setting, and the previous config put back;
- reloads through the control socket (the request `wasmhost reload` sends; now and then the CLI itself with
  `--json`) and SIGHUP, sometimes two at once, sometimes while another one's check window runs;
- `stop`, `start` and `restart` of components through the control socket, mid-reload;
- `send`s and `call`s to every configured component and to a neighbour whose entry never changes, and
  guest-to-guest sends and requests from a pinger (never changed either) to the components reloaded.
Each example ends with one more reload and the checks, so that its last edits are applied and checked too.

In process rather than a subprocess: a daemon is READY in 0.02 s from a warm cache (a subprocess: 0.6 s,
measured, and 0.2 s more for each request made with the CLI), its log events are read as they are made
(structlog's capture) and its actors can be told apart (a handover keeps the actor, a replacement makes a new
one); so 12 examples run in about 10 s. The daemon runs on this test's event loop, in the main thread, so
that its signal receiver works and a real SIGHUP (os.kill of this process) reaches it; hypothesis runs on a
worker thread and fires each operation as a task of one task group. Requests go through the control socket
with the CLI's own client (on threads), and now and then through the CLI itself.

Invariants (checked when every operation has answered, by `settle`, and at teardown):
- every operation ends with exactly one answer within BOUND_S: a reply or a documented error (never `internal
  error`, a connection closed unanswered, or no answer);
- every reload answers one of the documented outcomes, the one the model expects: `rejected` for an invalid
  config, a changed [host] setting or a binary that does not load, `refused` only beside another reload,
  else `reloaded` or `rolled-back`, with added / removed / changed / kept and `what_changed` exactly the
  difference between what ran and the config; a version that cannot start is rolled back, one that works is
  kept; `wasmhost reload --json` exits 0 exactly when the outcome is `reloaded`;
- afterwards the listing's ids are exactly those of the config applied; a component nothing touched kept its
  instance (a counter guest's count goes on), a rolled-back one runs its previous version (its answers say
  which fixture runs) and says so in its `rollout`, and the next reload tries the new version again;
- every message a component took is counted once (handled, failed or rejected) by the actor that took it:
  nothing queued is lost across a handover; a component no reload added or changed is the same actor;
- the neighbour answers; RELOADING=1 is always followed by READY=1; the daemon logs none of ALARMS;
- at teardown the daemon's own stop (its SIGTERM path) ends `run` with 0 within its documented bound, with no
  request left pending.

Default: 12 derandomized examples of up to 40 steps (about 10 s here); `make fuzz` (HYPOTHESIS_PROFILE=fuzz)
runs 150 random ones of up to 60 steps (about 3 minutes); RELOAD_CHAOS_EXAMPLES / RELOAD_CHAOS_STEPS override
both.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import anyio
import anyio.from_thread
import anyio.to_thread
import msgspec
import pytest
import structlog
import structlog.testing
from anyio.abc import TaskGroup, TaskStatus
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule, run_state_machine_as_test

from tests.conftest import FIXTURES
from tests.test_daemon import ROOT, warm_cache
from tests.test_lifecycle_chaos import Op as LifecycleOp
from wasmhost.actors.state import ActorState
from wasmhost.core import ComponentId
from wasmhost.runtime.runtime import Runtime
from wasmhost.system import protocol
from wasmhost.system.client import DaemonUnavailable, request
from wasmhost.system.config import load_config
from wasmhost.system.daemon import Daemon
from wasmhost.system.reload_report import ReloadReport

FUZZ = os.environ.get("HYPOTHESIS_PROFILE") == "fuzz"
EXAMPLES = int(os.environ.get("RELOAD_CHAOS_EXAMPLES", 150 if FUZZ else 12))
STEPS = int(os.environ.get("RELOAD_CHAOS_STEPS", 60 if FUZZ else 40))

DRAIN_S = 0.3
SHUTDOWN_S = 0.3
BOUND_S = 20.0
"""What any one operation may take from its start to its answer. The longest legitimate one is a reload:
compiling new versions (tens of ms each, from a warm cache), removing components (drain 0.3 + shutdown 0.3 +
the stop's grace), handing over (the old version's message in hand, at most its 1 s deadline, then its
shutdown) and a check window of 0.3 s, behind another reload's; plus a stop or restart queued behind it, on a
loaded two-core machine."""
STOP_BOUND_S = DRAIN_S + SHUTDOWN_S + 1.0 + 5.0
"""The daemon's documented stop bound (drain_timeout_s + the largest shutdown_timeout_s + 1 s), with 5 s of
margin for a loaded machine (the lifecycle test's STOP_GRACE waits are inside the 1 s)."""

SLOTS = [ComponentId("t", f"s{i}", "0") for i in range(3)]
NEIGHBOUR = ComponentId("t", "neighbour", "0")
PINGER = ComponentId("t", "pinger", "0")
"""Never changed either: it sends and requests to the slots (guest-to-guest traffic across their reloads)."""
FIXED = {NEIGHBOUR, PINGER}
FIXTURES_USED = ["echo", "counter", "hasher", "busy", "trapper", "sickly", "spinner", "napper", "slowstop",
                 "initfail", "inittrap"]
NOT_LOADING = {"bad-import", "broken"}
"""File contents a reload cannot load: a component importing what the host does not provide, a truncated file."""
STARTS_FAILING = {"initfail", "inittrap"}
"""Fixtures whose initialize fails: as a new version handed over they are always rolled back."""
STABLE = {"echo", "counter", "hasher", "slowstop", "sickly", "busy"}
"""Fixtures that never fail nor restart on the messages sent here (sickly only reports unhealthy to a probe,
which nothing but a rollout's check window makes here: health_interval_s is long). A component running one of
these is still running at the next reload unless an operator acted on it."""
LIMITS = {"short": "limits = { max_execution_time_ms = 400 }", "long": "limits = { max_execution_time_ms = 1000 }",
          "tiny": "limits = { max_memory_bytes = 1 }"}
"""The limits a component may have: `tiny` is a memory budget nothing fits in (the load step rejects it)."""
PAYLOADS = [b"hello", b"5", b"", b"100000", b"30000000"]
IDENTITY = b"hello"
"""What `settle` calls a running component with: each fixture answers it its own way (see `behaves_like`)."""

ALARMS = {"component_stop_overran", "component_task_failed", "component_finish_failed", "component_left_running",
          "host_function_failed", "host_result_unconvertible", "storage_commit_failed", "control_request_failed",
          "control_connection_failed", "reload_failed", "reload_restoring", "reload_restore_failed",
          "reload_upgrade_failed", "cache_prune_failed", "heap_trim_failed"}
"""Events the daemon logs when a bound did not hold, an answer may be lost or a bug was caught (none is expected
here; not component_call_given_up and the held-thread events: see test_lifecycle_chaos.ALARMS)."""

OUTCOMES = ("reloaded", "rolled-back", "rejected", "refused", "failed")


@dataclass(frozen=True)
class Entry:
    """One [[components]] entry of the config file, as the model writes it."""

    file: str
    limits: str = "short"
    capacity: int = 64
    env: bool = False
    send: bool = False
    window: float = 0.3

    def text(self, cid: ComponentId, bad: str | None = None) -> str:
        lines = [f'[[components]]\nid = "{cid}"\npath = "{self.file}"', LIMITS[self.limits],
                 f"mailbox_capacity = {self.capacity}", f"rollout_check_s = {self.window}",
                 f"shutdown_timeout_s = {SHUTDOWN_S}", "backoff_base_ms = 10", "backoff_max_ms = 50",
                 "max_restarts = 5", "restart_window_s = 1"]
        if self.env:
            lines.append('env = { MODE = "x" }')
        if self.send:
            lines.append('capabilities = { send = ["t/*"] }')
        if bad is not None:
            lines.append(bad)
        return "\n".join(lines) + "\n\n"

    def differences(self, other: Entry) -> set[str]:
        """The config keys whose values differ between two entries, as a reload's `what_changed` names them."""
        keys = set()
        if self.file != other.file:
            keys.add("path")
        if self.limits != other.limits:
            keys.add("limits")
        if self.capacity != other.capacity:
            keys.add("mailbox_capacity")
        if self.env != other.env:
            keys.add("env")
        if self.send != other.send:
            keys.add("capabilities")
        if self.window != other.window:
            keys.add("rollout_check_s")
        return keys


@dataclass(frozen=True)
class Running:
    """What the daemon runs for one id, as the model knows it: the entry applied and the fixture its file held."""

    entry: Entry
    fixture: str


@dataclass
class Op(LifecycleOp):
    """One operation fired at the daemon (as in the lifecycle chaos test), with what it answered."""

    data: Any = None
    finished: int = -1  # the order in which operations answered


@dataclass
class Reload:
    """A reload fired, with the model it was fired against."""

    op: Op
    via: str
    desired: dict[ComponentId, Entry]
    files: dict[str, str]
    config_bad: str | None


@dataclass
class SlotCheck:
    """What `settle` last saw of one component, to compare with what it sees next."""

    count: int | None = None  # a counter guest's count, when known
    actor: object = None  # the actor `settle` last saw under this id...
    counted: int = 0  # ...and the messages it had counted then (handled + failed + rejected)
    carried: list[Op] = field(default_factory=list)  # messages taken before, not all answered yet then
    renewed: bool = False  # a reload added, removed or changed it since: it may be a new actor
    touched: bool = False  # an operator's stop/start/restart since
    messages: list[Op] = field(default_factory=list)  # sends and calls to it since
    guest: bool = False  # the pinger was asked to message it since: it takes messages nobody here counts


def behaves_like(fixture: str, outcome: str) -> bool | None:
    """Whether `outcome` (of a call with IDENTITY) is what `fixture` answers; None when it cannot tell (a trapper
    whose earlier messages used up its restarts fails before handling it, say)."""
    if outcome.startswith(("error target-stopped: ", "error delivery-failed: ")):
        return None
    if fixture in ("echo", "sickly"):
        return outcome == "ok b'hello'"
    if fixture == "counter":
        return outcome.startswith("ok b'") and outcome[5:-1].isdigit()
    if fixture in ("busy", "hasher"):
        return outcome.startswith("error ") and "expected a decimal" in outcome
    if fixture == "trapper":
        return outcome.startswith("error ") and "trap" in outcome
    return None


def taken(outcome: str) -> bool | None:
    """Whether the message whose answer was `outcome` was taken into the component's mailbox (None: cannot tell)."""
    if outcome.startswith("ok") or outcome.startswith(("error failed: ", "error target-stopped: ")):
        return True  # handled, failed, or answered when its component stopped or failed
    if outcome.startswith(("error delivery-failed: ", "error target-not-found: ")):
        return False
    return None


def control_reply(response: protocol.Response) -> tuple[str, Any]:
    """An answer of the control socket as one outcome line, and its data."""
    if response.ok:
        return f"ok {response.data!r:.80}", response.data
    return f"error {response.error}", response.data


class ReloadChaos(RuleBasedStateMachine):
    runtime: ClassVar[Runtime]
    group: ClassVar[TaskGroup]
    """The test's task group, on the loop in the main thread: each example's owner task runs in it."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[Op] = []
        self.reloads: list[Reload] = []
        self.problems: list[str] = []
        self.finished = 0
        self.tmp = Path(tempfile.mkdtemp(prefix="reload-chaos-"))
        self.components = self.tmp / "components"
        self.components.mkdir()
        self.config = self.tmp / "wasmhost.toml"
        self.socket = self.tmp / "state" / "wasmhost.sock"
        shutil.copy(FIXTURES / "echo.wasm", self.components / "neighbour.wasm")
        shutil.copy(FIXTURES / "pinger.wasm", self.components / "pinger.wasm")
        self.files: dict[str, str] = {}  # file name -> the fixture it holds ("broken": a truncated file)
        self.desired: dict[ComponentId, Entry] = {}  # what the config file says
        self.previous: dict[ComponentId, Entry] = {}  # what it said before the last edit
        self.config_bad: str | None = None  # how the file is invalid, if it is
        self.running: dict[ComponentId, Running] = {}  # what the daemon runs (after the last reload applied)
        self.rollout: dict[ComponentId, str | None] = {}  # each one's expected `rollout`: None, upgraded, rolled back
        self.checks: dict[ComponentId, SlotCheck] = {}
        self.versions = 0
        self.fired_reload = False  # a reload was fired since the last settle: the config stays as it read it
        self.notifications: list[tuple[str, ...]] = []
        self.daemon: Daemon | None = None
        self.exit_code: int | None = None
        self.running_at_settle: dict[ComponentId, str] = {}
        # Events of the loop, made there (anyio binds them to the loop they are made on): `progress` is set and
        # replaced whenever an operation ends or a notification comes, for the waits on either.
        self._progress: anyio.Event
        self._teardown: anyio.Event
        self._ended: anyio.Event  # the daemon's `run` returned
        self._owner_done: anyio.Event
        self._logs_cm = structlog.testing.capture_logs()
        self.logs = self._logs_cm.__enter__()
        self.owned = False
        self.failed = False  # a check failed: the teardown only stops the daemon
        self.abrupt = False
        self.ended_at = 0.0

    # --- the config file ---

    def write_file(self, name: str, fixture: str) -> None:
        """Put `fixture`'s bytes (or a truncated copy of echo's, for `broken`) in the components directory."""
        target = self.components / name
        if fixture == "broken":
            good = (FIXTURES / "echo.wasm").read_bytes()
            target.write_bytes(good[: len(good) // 2])
        else:
            shutil.copyfile(FIXTURES / f"{fixture}.wasm", target)
        self.files[name] = fixture

    def new_file(self, fixture: str) -> str:
        self.versions += 1
        name = f"v{self.versions}.wasm"
        self.write_file(name, fixture)
        return name

    def render(self, host_edit: bool = False, bad: str | None = None) -> str:
        text = (f'[host]\ncomponents_dir = "{self.components}"\nstate_dir = "{self.tmp / "state"}"\n'
                f"drain_timeout_s = {0.4 if host_edit else DRAIN_S}\nlog_format = \"json\"\nworker_threads = 4\n\n")
        text += Entry("neighbour.wasm", window=0).text(NEIGHBOUR)
        text += Entry("pinger.wasm", window=0).text(PINGER, 'capabilities = { send = ["t/*"], request = ["t/*"] }')
        for index, (cid, entry) in enumerate(sorted(self.desired.items(), key=lambda kv: str(kv[0]))):
            text += entry.text(cid, bad if index == 0 else None)
        return text

    def write_config(self, host_edit: bool = False, bad: str | None = None) -> None:
        self.config.write_text(self.render(host_edit, bad))

    def edit(self, change: Callable[[dict[ComponentId, Entry]], None]) -> None:
        """Change the config file's components as `change` says (a valid file again)."""
        if self.fired_reload:
            return  # a reload fired since the last settle may not have read the file yet
        self.previous = dict(self.desired)
        change(self.desired)
        self.config_bad = None
        self.write_config()

    # --- the owner task: the daemon and the one task group every operation runs in ---

    def _loop_exception(self, _: object, context: dict[str, Any]) -> None:
        what = f"event loop: {context.get('message')} {context.get('exception')!r} in {context.get('handle')!r:.300}"
        self.problems.append(what)

    def _progressed(self) -> None:
        self._progress.set()
        self._progress = anyio.Event()

    async def _own(self, *, task_status: TaskStatus[None]) -> None:
        self._progress, self._teardown, self._ended, self._owner_done = (anyio.Event() for _ in range(4))
        # An exception in a callback (a future answered twice, say) is only handed to the loop's handler.
        asyncio.get_running_loop().set_exception_handler(self._loop_exception)
        try:
            await self._run_daemon(task_status)
        finally:
            self._owner_done.set()

    async def _run_daemon(self, task_status: TaskStatus[None]) -> None:
        daemon = self.daemon = Daemon(load_config(self.config))
        notify = daemon.notifier.notify

        def watch(*fields: str) -> None:  # every notification, in order, then sent on as the daemon would
            self.notifications.append(fields)
            self._progressed()
            notify(*fields)

        daemon.notifier.notify = watch  # type: ignore[method-assign]

        async def run() -> None:
            try:
                self.exit_code = await daemon.run()
            except BaseException as exc:
                self.problems.append(f"the daemon's run raised {type(exc).__name__}: {exc}")
                raise
            finally:
                self.ended_at = time.monotonic()
                self._ended.set()
                self._progressed()  # a SIGHUP's operation waits for the daemon's end too

        async with anyio.create_task_group() as outer:
            outer.start_soon(run, name="reload chaos daemon")
            with anyio.fail_after(60):
                while not any("READY=1" in n for n in self.notifications):
                    await self._progress.wait()
            async with anyio.create_task_group() as ops:
                self.ops_group = ops
                task_status.started()
                await self._teardown.wait()
                stopped = time.monotonic()
                if self.abrupt:  # the stop comes while the last operations are under way
                    daemon._on_stop_signal(signal.SIGTERM)
                await self._wait_all("teardown")
            if not self.abrupt:
                stopped = time.monotonic()
                daemon._on_stop_signal(signal.SIGTERM)  # as in_process stops it: the SIGTERM path, without a signal
            with anyio.move_on_after(max(0.0, stopped + STOP_BOUND_S - time.monotonic())):
                await self._ended.wait()
            if not self._ended.is_set() or self.ended_at - stopped > STOP_BOUND_S:
                self.problems.append(f"the daemon did not stop within {STOP_BOUND_S} s")
                outer.cancel_scope.cancel()
            elif daemon.router.pending_by_requester():
                self.problems.append(f"requests still pending after the stop: {daemon.router.pending_by_requester()}")

    def _fire(self, what: str, call: Callable[[], Awaitable[tuple[str, Any]]]) -> Op:
        """Start `call` in the owner's task group, not waited for; its single outcome is recorded."""
        op = Op(len(self.ops), what, time.monotonic())
        self.ops.append(op)

        async def run() -> None:
            try:
                with anyio.fail_after(BOUND_S):
                    outcome, op.data = await call()
            except TimeoutError:
                outcome = f"unexpected: no answer within {BOUND_S} s"
            except DaemonUnavailable as exc:
                outcome = f"unexpected {type(exc).__name__}: {exc}"
            except Exception as exc:
                outcome = f"unexpected {type(exc).__name__}: {exc}"
            op.outcomes.append(outcome)
            op.took = time.monotonic() - op.started
            op.finished = self.finished
            self.finished += 1
            self._progressed()

        def spawn() -> None:
            self.ops_group.start_soon(run, name=f"reload chaos {what}")

        anyio.from_thread.run_sync(spawn)
        return op

    async def _control(self, message: protocol.Request) -> tuple[str, Any]:
        """One request over the control socket, with the blocking client the CLI uses, on a thread."""
        response = await anyio.to_thread.run_sync(request, self.socket, message, BOUND_S)
        return control_reply(response)

    async def _wait_all(self, when: str) -> None:
        if all(o.outcomes for o in self.ops):
            return
        oldest = min(o.started for o in self.ops if not o.outcomes)
        with anyio.move_on_after(max(0.0, oldest + BOUND_S + 5 - time.monotonic())):
            while not all(o.outcomes for o in self.ops):
                await self._progress.wait()
        stuck = [o.what for o in self.ops if not o.outcomes]
        if stuck:
            self.problems.append(f"{when}: no outcome within {BOUND_S} s of their start: {stuck}")
            self.ops_group.cancel_scope.cancel()

    # --- the first config and the daemon ---

    @initialize(fixtures=st.lists(st.sampled_from(FIXTURES_USED), min_size=len(SLOTS), max_size=len(SLOTS)),
                windows=st.lists(st.sampled_from([0.0, 0.3]), min_size=len(SLOTS), max_size=len(SLOTS)),
                abrupt=st.booleans())
    def start_the_daemon(self, fixtures: list[str], windows: list[float], abrupt: bool) -> None:
        """A config of every slot and the neighbour, and a daemon running it (its READY=1 waited for). `abrupt`:
        the example ends with a stop while a reload and calls are under way, not once all have answered."""
        self.abrupt = abrupt
        for cid, fixture, window in zip(SLOTS, fixtures, windows, strict=True):
            self.desired[cid] = Entry(self.new_file(fixture), window=window)
        self.previous = dict(self.desired)
        self.write_config()
        warm_cache(self.runtime, self.tmp / "state", *(FIXTURES / f"{f}.wasm" for f in FIXTURES_USED))
        anyio.from_thread.run(self.group.start, self._own)
        self.owned = True
        self.running = {cid: Running(e, self.files[e.file]) for cid, e in self.desired.items()}
        self.rollout = dict.fromkeys(self.desired)
        self.settle()

    # --- config edits (each writes a whole valid file, except those making it invalid) ---

    @rule(index=st.integers(0, len(SLOTS) - 1), fixture=st.sampled_from([*FIXTURES_USED, "bad-import"]),
          limits=st.sampled_from(["short", "short", "long", "tiny"]), window=st.sampled_from([0.0, 0.3]))
    def add(self, index: int, fixture: str, limits: str, window: float) -> None:
        cid = SLOTS[index]
        if cid in self.desired or self.fired_reload:
            return
        name = self.new_file(fixture)
        self.edit(lambda d: d.__setitem__(cid, Entry(name, limits=limits, window=window)))

    @rule(index=st.integers(0, len(SLOTS) - 1))
    def remove(self, index: int) -> None:
        cid = SLOTS[index]
        if cid in self.desired:
            self.edit(lambda d: d.pop(cid))

    @rule(index=st.integers(0, len(SLOTS) - 1), fixture=st.sampled_from([*FIXTURES_USED, "bad-import", "broken"]),
          how=st.sampled_from(["in place", "new file", "same bytes, new file"]))
    def change_binary(self, index: int, fixture: str, how: str) -> None:
        """Another fixture's bytes over the component's file, or in a new file the entry then names."""
        cid = SLOTS[index]
        entry = self.desired.get(cid)
        if entry is None or self.fired_reload:
            return
        if how == "in place":  # the config stays as it is: only the bytes differ
            self.write_file(entry.file, fixture)
            return
        name = self.new_file(self.files[entry.file] if how.startswith("same") else fixture)
        self.edit(lambda d: d.__setitem__(cid, replace(entry, file=name)))

    @rule(index=st.integers(0, len(SLOTS) - 1),
          key=st.sampled_from(["limits", "capacity", "env", "send", "window"]), value=st.integers(0, 2))
    def change_setting(self, index: int, key: str, value: int) -> None:
        cid = SLOTS[index]
        entry = self.desired.get(cid)
        if entry is None:
            return
        changes: dict[str, Any] = {"limits": {"limits": ["short", "long", "tiny"][value]},
                                   "capacity": {"capacity": [64, 8, 2][value]}, "env": {"env": value == 1},
                                   "send": {"send": value == 1}, "window": {"window": [0.0, 0.3, 0.3][value]}}
        self.edit(lambda d: d.__setitem__(cid, replace(entry, **changes[key])))

    @rule(how=st.sampled_from(["toml", "field", "pattern", "host"]))
    def break_config(self, how: str) -> None:
        """Write an invalid config, or one changing a [host] setting: a reload must reject either."""
        if self.fired_reload:
            return
        bad = {"toml": "[[components]\n", "field": 'restart = "permanant"', "pattern": 'capabilities = { send = '
               '["demo/echo"] }', "host": None}[how]
        if how != "host" and not self.desired:
            bad = None
            how = "host"
        self.config_bad = how
        self.write_config(host_edit=how == "host", bad=bad)

    @rule()
    def put_back(self) -> None:
        """The config as it was before the last edit."""
        if self.fired_reload:
            return
        previous = dict(self.previous)
        self.edit(lambda d: (d.clear(), d.update(previous)))

    # --- reloads ---

    def _reload(self, via: str, before: Callable[[], Awaitable[None]] | None = None) -> None:
        if any(r.via == "sighup" and not r.op.outcomes for r in self.reloads):
            return  # a SIGHUP's reload is told from the others by being alone
        self.fired_reload = True
        fired = Reload(Op(-1, "", 0), via, dict(self.desired), dict(self.files), self.config_bad)

        async def through_socket() -> tuple[str, Any]:
            if before is not None:
                await before()
            outcome, data = await self._control(protocol.Reload())
            report = msgspec.convert(data, ReloadReport) if data is not None else None
            return outcome, report

        async def through_cli() -> tuple[str, Any]:
            result = await anyio.to_thread.run_sync(lambda: subprocess.run(
                [sys.executable, "-m", "wasmhost.cli", "reload", "--json", "--socket", str(self.socket)],
                capture_output=True, text=True, timeout=BOUND_S, cwd=ROOT))
            try:
                report = msgspec.convert(json.loads(result.stdout), ReloadReport)
            except (ValueError, msgspec.ValidationError):
                return f"unexpected output of reload --json: {result.returncode} {result.stdout!r} {result.stderr!r}", \
                    None
            expected = 0 if report.outcome == "reloaded" else 1
            if result.returncode != expected:
                return f"unexpected exit code {result.returncode} for {report.outcome}", report
            return f"exit {result.returncode}", report

        async def through_sighup() -> tuple[str, Any]:
            # No answer comes back: READY=1 says it ended (the reload is counted right after it, on the same
            # step of the loop), its log line what it did.
            assert self.daemon is not None
            before = sum(self.daemon.counters.reloads.values())
            seen = len(self.logs)
            os.kill(os.getpid(), signal.SIGHUP)
            while sum(self.daemon.counters.reloads.values()) == before:
                if self._ended.is_set():  # an abrupt teardown's stop came first: a reload refused or never begun
                    return "signalled; the daemon stopped", None
                await self._progress.wait()
            return "signalled", report_from_log(self.logs[seen:])

        call = {"socket": through_socket, "cli": through_cli, "sighup": through_sighup}[via]
        fired.op = self._fire(f"reload via {via}", call)
        self.reloads.append(fired)

    @rule(via=st.sampled_from(["socket", "socket", "socket", "cli"]), twice=st.booleans())
    def reload(self, via: str, twice: bool) -> None:
        self._reload(via)
        if twice:
            self._reload("socket")

    @rule()
    def reload_by_sighup(self) -> None:
        """What `systemctl reload` does; alone, as its reload has no answer of its own."""
        if self.fired_reload:
            return
        self._reload("sighup")

    @rule()
    def reload_during_a_check_window(self) -> None:
        """Another reload, sent once the check window of one under way has begun (its STATUS says so), or once
        that one has ended: refused in the window."""
        under_way = [r for r in self.reloads if r.via != "sighup" and not r.op.outcomes]
        if not under_way:
            return
        mark = len(self.notifications)
        other = under_way[-1].op

        async def when_checking() -> None:
            while not other.outcomes and not any(
                    f.startswith("STATUS=reload: checking") for n in self.notifications[mark:] for f in n):
                await self._progress.wait()

        self._reload("socket", before=when_checking)

    # --- operator actions ---

    @rule(index=st.integers(0, len(SLOTS) - 1), action=st.sampled_from(["stop", "start", "restart"]))
    def operate(self, index: int, action: str) -> None:
        cid = SLOTS[index]
        make = {"stop": protocol.Stop, "start": protocol.Start, "restart": protocol.Restart}[action]
        self.checks.setdefault(cid, SlotCheck()).touched = True
        self._fire(f"{action} {cid}", lambda: self._control(make(str(cid))))

    # --- messages ---

    @rule(to=st.sampled_from([*SLOTS, *SLOTS, NEIGHBOUR]), payload=st.sampled_from(PAYLOADS),
          call=st.booleans())
    def message(self, to: ComponentId, payload: bytes, call: bool) -> None:
        message: protocol.Request = protocol.Call(str(to), payload, timeout=BOUND_S / 2) if call else \
            protocol.Send(str(to), payload, timeout=BOUND_S / 2)
        op = self._fire(f"{'call' if call else 'send'} {to} {payload!r}", lambda: self._control(message))
        self.checks.setdefault(to, SlotCheck()).messages.append(op)

    @rule(index=st.integers(0, len(SLOTS) - 1), relay=st.booleans())
    def guest_message(self, index: int, relay: bool) -> None:
        """The pinger sends to a slot (a relay of one hop) or requests from it (a chain of one round trip)."""
        cid = SLOTS[index]
        ran = self.running.get(cid)
        if ran is not None and ran.fixture == "counter":
            return  # its growing count would keep a chain going for good (each answer >= 2 asks again)
        target = f"{cid.namespace}|{cid.name}|{cid.instance}"
        payload = f">1;{target}".encode() if relay else f"{target}|1".encode()
        self.checks.setdefault(cid, SlotCheck()).guest = True
        self._fire(f"call {PINGER} {payload!r}", lambda: self._control(protocol.Call(str(PINGER), payload,
                                                                                      timeout=BOUND_S / 2)))

    # --- checks ---

    @rule()
    def settle(self) -> None:
        """Wait for every operation in flight, check each answer, then compare the daemon with the model."""
        anyio.from_thread.run(self._wait_all, "settle")
        self._check_answers()
        self.fired_reload = False
        anyio.from_thread.run(self._check_daemon)
        self._check_problems()

    def _check_answers(self) -> None:
        for op in self.ops:
            if op.outcomes and op.outcomes[0].startswith(("unexpected", "error internal error")):
                self.problems.append(f"{op.what}: {op.outcomes[0]}")
        self._check_problems()
        done = sorted((r for r in self.reloads if r.op.outcomes), key=lambda r: r.op.finished)
        for fired in done:
            self._check_reload(fired)
        self.reloads = [r for r in self.reloads if not r.op.outcomes]
        self._check_problems()

    def _expected_rejection(self, fired: Reload) -> str | None:
        """Why the reload `fired` must be rejected, or None."""
        if fired.config_bad is not None:
            return f"the config file is invalid ({fired.config_bad})"
        for cid, entry in fired.desired.items():
            if fired.files[entry.file] in NOT_LOADING:
                return f"{cid}'s binary does not load"
            if entry.limits == "tiny":
                return f"{cid}'s memory budget fits nothing"
        return None

    def _check_reload(self, fired: Reload) -> None:
        op, report = fired.op, fired.op.data
        where = f"{op.what} (op {op.number}, {op.outcomes[0]!r:.200})"
        if not isinstance(report, ReloadReport):
            self.problems.append(f"{where}: no report")
            return
        if report.outcome not in OUTCOMES:
            self.problems.append(f"{where}: outcome {report.outcome!r}")
            return
        rejection = self._expected_rejection(fired)
        if report.outcome == "refused":
            if fired.via == "sighup" or not any(r is not fired and r.via != "sighup" for r in self.reloads):
                self.problems.append(f"{where}: refused with no other reload under way: {report.problems}")
            return
        if report.outcome == "failed":
            self.problems.append(f"{where}: failed: {report.problems}")
            return
        if report.outcome == "rejected":
            if rejection is None:
                self.problems.append(f"{where}: rejected, yet {fired.config_bad=} and every binary loads: "
                                     f"{report.problems}")
            return
        if rejection is not None:
            self.problems.append(f"{where}: {report.outcome}, yet it must be rejected: {rejection}")
            return
        # reloaded / rolled-back: the report is the difference between what ran and the config read
        wanted = {cid: Running(e, fired.files[e.file]) for cid, e in fired.desired.items()}
        added = {c for c in wanted if c not in self.running}
        removed = {c for c in self.running if c not in wanted}
        changed: dict[ComponentId, set[str]] = {}
        for cid in wanted.keys() & self.running.keys():
            now, then = wanted[cid], self.running[cid]
            keys = then.entry.differences(now.entry)
            if now.fixture != then.fixture:
                keys.add("binary")
            if keys:
                changed[cid] = keys
        kept = set(wanted) - added - set(changed)
        got_changed = set(map(ComponentId.parse, report.changed)) | set(map(ComponentId.parse, report.rolled_back))
        if fired.via == "sighup":  # its log line counts the components kept, FIXED among them
            got_kept = kept if len(report.kept) == len(kept) + len(FIXED) else \
                {ComponentId("?", "?", str(len(report.kept)))}
        else:
            got_kept = set(map(ComponentId.parse, report.kept)) - FIXED
        seen = (set(map(ComponentId.parse, report.added)), set(map(ComponentId.parse, report.removed)), got_changed,
                got_kept)
        if seen != (added, removed, set(changed), kept):
            self.problems.append(f"{where}: added/removed/changed/kept {[sorted(map(str, s)) for s in seen]}, "
                                 f"expected {[sorted(map(str, s)) for s in (added, removed, changed, kept)]}; "
                                 f"ran {self.running}, config {wanted}")
        what = {ComponentId.parse(c): set(keys) for c, keys in report.what_changed.items()}
        if what != changed:
            self.problems.append(f"{where}: what_changed {report.what_changed}, expected {changed}")
        rolled = set(map(ComponentId.parse, report.rolled_back))
        if (report.outcome == "rolled-back") != bool(rolled):
            self.problems.append(f"{where}: outcome {report.outcome} with rolled_back {report.rolled_back}")
        for cid in changed:
            sure = (self.running_at_settle.get(cid) == "running" and not self.checks.get(cid, SlotCheck()).touched
                    and self.running[cid].fixture in STABLE)
            new = wanted[cid]
            if not sure:
                continue
            must_roll = new.fixture in STARTS_FAILING or (new.fixture == "sickly" and new.entry.window > 0)
            may_roll = must_roll or new.fixture not in STABLE
            if must_roll and cid not in rolled:
                self.problems.append(f"{where}: {cid}'s new version ({new.fixture}) cannot pass, yet it was kept")
            if cid in rolled and not may_roll:
                self.problems.append(f"{where}: {cid}'s new version ({new.fixture}) was rolled back: "
                                     f"{report.rolled_back[cid]}")
        # the model follows the daemon: what was kept runs the new version, what rolled back the previous one
        for cid in removed:
            self.running.pop(cid, None)
            self.rollout.pop(cid, None)
        for cid in added:
            self.running[cid] = wanted[cid]
            self.rollout[cid] = None
        for cid in changed:
            if cid in rolled:
                self.rollout[cid] = "rolled back"
            else:
                self.running[cid] = wanted[cid]
                self.rollout[cid] = "upgraded?"  # upgraded when handed over; None when it was started anew
        for cid in [*added, *removed, *changed]:
            check = self.checks.setdefault(cid, SlotCheck())
            check.count = None  # a fresh instance either way
            check.renewed = True

    async def _check_daemon(self) -> None:
        daemon = self.daemon
        assert daemon is not None
        answer = await anyio.to_thread.run_sync(request, self.socket, protocol.Status(), BOUND_S)
        rows = {ComponentId.parse(r["id"]): r for r in answer.data["components"]}
        if set(rows) != set(self.running) | FIXED:
            self.problems.append(f"listed {sorted(map(str, rows))}, the config applied has "
                                 f"{sorted(map(str, [*self.running, *FIXED]))}")
        self.running_at_settle = {}
        for cid, ran in self.running.items():
            row = rows.get(cid)
            if row is None:
                continue
            expected = self.rollout.get(cid)
            if expected == "rolled back":
                if not str(row["rollout"]).startswith("rolled back: "):
                    self.problems.append(f"{cid} rolled back, yet its rollout is {row['rollout']!r}")
            elif expected == "upgraded?" and row["rollout"] not in ("upgraded", None):
                self.problems.append(f"{cid} upgraded, yet its rollout is {row['rollout']!r}")
            check = self.checks.setdefault(cid, SlotCheck())
            actor = daemon.supervisor.actors.get(cid)
            if actor is not None and actor.state in (ActorState.STOPPED, ActorState.FAILED) and actor.running:
                with anyio.move_on_after(BOUND_S):
                    await actor._ended.wait()  # failed, its task still closing the Store: it answers the queue last
            if actor is not None and actor.state in (ActorState.STOPPED, ActorState.FAILED) \
                    and (len(actor.mailbox) or actor.in_hand):
                self.problems.append(f"{cid} is {actor.state.value} with {len(actor.mailbox)} queued and "
                                     f"{actor.in_hand} in hand: never answered")
            identity: Op | None = None
            # A call behind every message queued: once it answers, they are done (not to a guest that spins or naps
            # until its deadline: up to a second a settle; what it has queued is counted at a later one).
            if row["state"] == "running" and ran.fixture not in ("spinner", "napper"):
                outcome, _ = await self._control(protocol.Call(str(cid), IDENTITY, timeout=BOUND_S / 2))
                identity = Op(-1, f"call {cid} {IDENTITY!r}", 0, [outcome])
                verdict = behaves_like(ran.fixture, outcome)
                if verdict is False:
                    self.problems.append(f"{cid} should run {ran.fixture} ({ran.entry}; rollout "
                                         f"{row['rollout']!r}), yet answered {outcome!r}")
                if ran.fixture == "counter" and verdict:
                    count = int(outcome[5:-1])
                    answers = [m.outcomes[0] for m in check.messages]
                    taken = sum(a.startswith("ok") for a in answers)
                    if (check.count is not None and not check.touched and not check.guest
                            and all(a.startswith("ok") for a in answers)
                            and count != check.count + taken + 1):
                        self.problems.append(f"{cid}'s counter answered {count} after {check.count} and {taken} "
                                             "messages: its instance was not kept")
                    check.count = count
            self.running_at_settle[cid] = row["state"]
            if actor is not None:
                self._check_counted(cid, actor, check, identity)
        for check in self.checks.values():
            check.touched = check.renewed = False
            check.messages.clear()
        try:
            outcome, _ = await self._control(protocol.Call(str(NEIGHBOUR), b"still there?", timeout=BOUND_S / 2))
        except Exception as exc:
            outcome = f"{type(exc).__name__}: {exc}"
        if outcome != "ok b'still there?'":
            self.problems.append(f"the neighbour answered {outcome!r}")
        reloading = sum("RELOADING=1" in n for n in self.notifications)
        ready = sum("READY=1" in n for n in self.notifications)
        if ready != reloading + 1:
            self.problems.append(f"{reloading} RELOADING=1 but {ready - 1} READY=1 after start-up: "
                                 f"{self.notifications}")

    def _check_counted(self, cid: ComponentId, actor: Any, check: SlotCheck, identity: Op | None) -> None:
        """Every message the actor took since the last settle was counted by it once, handled, failed or rejected
        (a handover keeps the actor: a message lost in it is missing here)."""
        counted = actor.stats.handled + actor.stats.failed + actor.stats.rejected
        if check.actor is not None and check.actor is not actor and not check.renewed:
            self.problems.append(f"{cid} is a new actor, yet no reload added or changed it since the last check")
        settled = actor.state in (ActorState.RUNNING, ActorState.STOPPED, ActorState.FAILED) and not actor.in_hand \
            and not len(actor.mailbox)
        if check.actor is not actor:
            # A new actor (added, or started anew by a reload): counting starts once what it took is answered
            # (the pinger's messages are queued when its call answers: none is in flight then).
            check.actor, check.counted, check.carried, check.guest = actor if settled else None, counted, [], False
            return
        messages = [*check.carried, *check.messages, *([identity] if identity is not None else [])]
        took = [taken(m.outcomes[0]) for m in messages]
        if not settled:  # restarting, say: what it took waits in its mailbox, counted once it is answered
            check.carried = messages
            return  # (and the pinger's messages to it, if any: `guest` stays)
        if None not in took and not check.guest and counted - check.counted != sum(map(bool, took)):
            self.problems.append(f"{cid} counted {counted - check.counted} messages since the last check, yet "
                                 f"took {sum(map(bool, took))}: {[(m.what, m.outcomes[0]) for m in messages]}; "
                                 f"{actor.stats!r:.300}")
        check.counted, check.carried, check.guest = counted, [], False

    def _check_problems(self) -> None:
        self.failed = True  # until it returns
        trail = "\n  ".join(f"{o.number} {o.what}: {o.outcomes} ({o.took:.2f} s)" for o in self.ops[-60:])
        alarms = [e for e in self.logs if e["event"] in ALARMS]
        if alarms:  # capture_logs keeps no traceback: the answers and what the reports said are the next best
            reasons = [(o.what, o.data.rolled_back) for o in self.ops if isinstance(o.data, ReloadReport)]
            raise AssertionError(f"the daemon logged alarms: {alarms}; rolled back: {reasons}\noperations (the "
                                 f"last 60):\n  {trail}")
        twice = [(o.what, o.outcomes) for o in self.ops if len(o.outcomes) > 1]
        assert not twice, f"operations with more than one outcome: {twice}"
        if self.problems:
            raise AssertionError("\n".join(self.problems) + f"\noperations (the last 60):\n  {trail}")
        self.failed = False

    def teardown(self) -> None:
        try:
            if self.owned and not self.failed:  # the last edits applied and checked too: one more reload
                self.fired_reload = False
                self._reload("socket")
                if self.abrupt:  # and calls, all cut short by the stop: each answered, or its connection closed
                    for cid in [*SLOTS, NEIGHBOUR]:
                        self.message(cid, b"5", True)
                else:
                    self.settle()
        finally:
            self._stop()
        if self.abrupt:
            self._check_cut_short()

    def _check_cut_short(self) -> None:
        """After a stop while operations were under way: each ended with an answer or its connection closed by
        the stop, never an internal error nor no end at all."""
        for op in self.ops:
            outcome = op.outcomes[0] if op.outcomes else "no outcome"
            cut = any(why in outcome for why in ("closed the connection without answering", "no wasmhost daemon is "
                                                 "listening")) or outcome.startswith(
                ("ok", "error", "exit", "signalled", "unexpected output of reload --json: 1 "))
            if not cut or outcome.startswith("error internal error"):
                self.problems.append(f"{op.what}: {outcome}")
        self._check_problems()

    def _stop(self) -> None:
        try:
            if self.owned:
                anyio.from_thread.run_sync(self._teardown.set)
                anyio.from_thread.run(self._until_owner_done)
            if self.exit_code not in (None, 0):
                self.problems.append(f"the daemon exited {self.exit_code}")
        finally:
            self._logs_cm.__exit__(None, None, None)
            shutil.rmtree(self.tmp, ignore_errors=True)
        if os.environ.get("RELOAD_CHAOS_TRACE"):  # what an example did, for whoever tunes the rules
            print(f"\n--- example: {len(self.ops)} operations, stop: exit {self.exit_code}")
            for op in self.ops:
                print(f"  {op.number} {op.what}: {op.outcomes[0] if op.outcomes else None!r:.150} ({op.took:.2f} s)")
        self._check_problems()

    async def _until_owner_done(self) -> None:
        with anyio.move_on_after(BOUND_S + STOP_BOUND_S + 10):
            await self._owner_done.wait()
        if not self._owner_done.is_set():
            self.problems.append("the owner task did not end")


def report_from_log(events: list[dict[str, Any]]) -> ReloadReport | None:
    """The report of a SIGHUP's reload, rebuilt from the one log event that ends it."""
    for event in events:
        name = event["event"]
        if name == "reloaded":
            rolled = event.get("rolled_back") or {}
            return ReloadReport("rolled-back" if rolled else "reloaded", added=event["added"],
                                removed=event["removed"], changed=event["changed"],
                                what_changed=event["what_changed"], rolled_back=rolled,
                                kept=["?"] * int(event["unchanged"]))
        if name == "reload_rejected":
            return ReloadReport("rejected", problems=[str(event.get("errors"))])
        if name == "reload_refused":
            return ReloadReport("refused", problems=[str(event.get("reason"))])
        if name == "reload_failed":
            return ReloadReport("failed", problems=["reload_failed"])
    return None


SETTINGS = settings(max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None, derandomize=not FUZZ,
                    database=None if not FUZZ else settings.default.database,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, bool]]:
    """On uvloop, as the daemon runs."""
    return ("asyncio", {"use_uvloop": True})


@pytest.mark.anyio
async def test_random_config_edits_reloads_operator_actions_and_messages(runtime: Runtime) -> None:
    ReloadChaos.runtime = runtime
    async with anyio.create_task_group() as group:
        ReloadChaos.group = group
        await anyio.to_thread.run_sync(lambda: run_state_machine_as_test(ReloadChaos, settings=SETTINGS))
