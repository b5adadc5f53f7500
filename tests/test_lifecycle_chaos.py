"""A stateful chaos test of the Supervisor: random interleavings of operator actions and guest behaviour.

Every other lifecycle test drives one scripted sequence. This one (a hypothesis RuleBasedStateMachine)
runs one real in-process Supervisor (real Runtime, real WAT fixtures, a worker pool of its own, uvloop)
and fires, in random order and mostly without waiting for them:

- operator actions on a few component slots (some of them members of one supervision group, its strategy
  drawn per run): add (start), stop, start again, restart, remove, hand over to another binary with the
  previous version as fallback and a check window, as a reload's rollout does, replace (remove, then start
  another binary under the same id, as a reload does with a component that does not run), and a health probe
  as the rollout's check window makes;
- host sends (wait=True) and host requests, including to guests that trap (trapper), spin past their time
  limit or their fuel (spinner, busy with a long count), fail to start (initfail, inittrap), never end their
  shutdown (slowstop), sleep in host calls (napper) or report unhealthy (sickly);
- guest-to-guest traffic: pinger request chains and send rings to slots that may be stopped, removed or
  replaced meanwhile.

The rules are sync; the supervisor's event loop runs in a thread behind an anyio blocking portal. One
owner task (started through the portal) enters the Supervisor and ONE task group, in which every action
and message not waited for runs as a task that records its single outcome.

Invariants (checked by `settle`, a rule, and at teardown):
- every operation ends with exactly one outcome within BOUND_S seconds of its start: a reply, or one of
  the documented errors (RequestFailed, MessagingError; ComponentError for a start or restart refused
  because a stop came after it, see STOP_REFUSALS); no other exception escapes, and the host logs none of
  its ALARMS;
- the supervisor's listing matches the model: the ids it holds are those added and not removed; a slot
  whose last action was a stop is stopped (or failed) and not listed; one whose last action was a start or
  restart answered ok is not stopped; a stopped or failed actor holds no unanswered message;
  `component_info` of a removed id is a ComponentError;
- a neighbour (an echo nobody touches) keeps answering;
- after teardown: no task of ours is left in the loop, no worker thread is running guest code, no request
  is left pending in the router, and every StoreManager built was closed.

A default run is short and derandomized (30 examples of up to 40 steps: about 12 s here); `make fuzz`
(HYPOTHESIS_PROFILE=fuzz) runs 300 examples of up to 80 steps, random, with hypothesis' example database,
and CHAOS_EXAMPLES / CHAOS_STEPS override both.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import anyio
import structlog
import structlog.testing
from anyio.abc import TaskGroup, TaskStatus
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)

from tests.conftest import fixture_path
from wasmhost.actors.actor import ComponentActor, Handover
from wasmhost.actors.restart import Backoff, Intensity, Strategy
from wasmhost.actors.spec import ActorSpec
from wasmhost.actors.state import TAKING_MESSAGES, ActorState
from wasmhost.actors.supervisor import Supervisor
from wasmhost.actors.workers import WorkerPool
from wasmhost.core import ComponentId
from wasmhost.core.errors import ComponentError, MessagingError
from wasmhost.core.limits import ResourceLimits
from wasmhost.messaging.outcome import RequestFailed
from wasmhost.messaging.router import MessageRouter
from wasmhost.runtime.loader import LoadedComponent
from wasmhost.runtime.runtime import Runtime
from wasmhost.runtime.store import StoreManager
from wasmhost.system.stores import HostStores

FUZZ = os.environ.get("HYPOTHESIS_PROFILE") == "fuzz"
EXAMPLES = int(os.environ.get("CHAOS_EXAMPLES", 300 if FUZZ else 30))
STEPS = int(os.environ.get("CHAOS_STEPS", 80 if FUZZ else 40))

DRAIN_S = 0.3
SHUTDOWN_S = 0.3
BOUND_S = 10.0
"""What any one operation may take, from its start to its outcome. The longest legitimate one is a stop
(drain 0.3 + shutdown 0.3 + 2 x STOP_GRACE 0.5 = 1.6 s, twice that for a guest in WASI) behind a
restart's initialize (at most 1 s here) on a loaded two-core machine: 10 s leaves a wide margin."""

MAX_QUEUED_RESTARTS = 3
"""Restarts of one component in flight at most: each waits for the one before it (about a second each here,
measured up to 0.9 s with a slowstop), so BOUND_S holds for three with room to spare."""

SLOTS = [ComponentId("t", f"s{i}", "0") for i in range(3)]
NEIGHBOUR = ComponentId("t", "neighbour", "0")
FIXTURES = ["echo", "trapper", "sickly", "spinner", "slowstop", "counter", "pinger", "initfail", "inittrap",
            "napper", "busy"]
PAYLOADS = [b"x", b"7", b"", b"1000", b"5000000000", b"z20", b"?callbacks",
            *(f"{s.namespace}|{s.name}|{s.instance}|3".encode() for s in SLOTS),
            b">4;" + b";".join(f"{s.namespace}|{s.name}|{s.instance}".encode() for s in SLOTS)]
"""Echoed by echo-like guests; a trap, a spin or a runtime error for the others; busy counts (5e9: past any
time limit or fuel here); pinger: a 3-hop request chain to a slot, a relay through every slot, a sleep."""


ALARMS = {"component_stop_overran", "component_task_failed", "component_finish_failed", "component_left_running",
          "host_function_failed", "host_result_unconvertible", "storage_commit_failed"}
"""Events the host logs when one of its bounds did not hold or an answer may be lost (none is expected here).
Not component_call_given_up (nor the held-thread events that follow it): no guest here waits in WASI, but on a
machine loaded far past its cores (load 14 on 2, measured) a guest thread that gets no CPU for 150 ms is taken
for one that does (workers.QUIET_LOOKS), and given up on at its deadline as documented."""


STOP_REFUSALS = ("is stopping", "was stopped while this restart waited", "was removed", "no component")
"""Why a start or restart may be refused: a stop asked for after it has the last word; the component is being
removed; or the id is between the removal and the start of a replacement (as the control socket answers
`no running component`)."""


@dataclass
class Op:
    """One operation fired at the supervisor; `outcomes` gets exactly one entry when it ends."""

    number: int
    what: str
    started: float
    outcomes: list[str] = field(default_factory=list)
    unexpected: BaseException | None = None
    took: float = 0.0  # seconds from its start to its outcome


@dataclass
class Slot:
    """What the model knows about one component id."""

    spec: ActorSpec
    loaded: LoadedComponent
    fixture: str
    last: str = "add"  # the last lifecycle action fired at it...
    last_op: Op | None = None  # ...and how it ended
    reloaded: bool = False  # a reload (hand-over or replacement) was fired since the last settle: one at a time
    replacing: bool = False  # a replacement: actions meanwhile may meet the old actor, none, or the new one...
    uncertain: bool = False  # ...so when the last action was fired during one, which state it ends in is not known
    restarts: list[Op] = field(default_factory=list)


class RecordingStores:
    """The supervisor's StoreFactory, keeping every StoreManager it built (all must end closed)."""

    def __init__(self, inner: HostStores) -> None:
        self.inner = inner
        self.built: list[StoreManager] = []

    def __call__(self, spec: ActorSpec, loaded: LoadedComponent, directory: Any) -> StoreManager:
        manager = self.inner(spec, loaded, directory)
        self.built.append(manager)
        return manager


def describe(actor: ComponentActor) -> str:
    """An actor's life as a stuck operation may need it explained (private fields: for diagnosis only)."""
    suspended = actor._suspended is not None and actor._suspended.is_set()
    restarting = actor._restarting is not None and actor._restarting.locked()
    return (f"{actor.name}: {actor.state.value}/{actor.phase} running={actor.running} stopping={actor._stopping} "
            f"attempted={actor._attempted is not None} suspend_wanted={actor._suspend_wanted} "
            f"suspended={suspended} resume={actor._resume is not None} gate={actor._gate is not None} "
            f"restarting={restarting} handover={actor._handover is not None} booting={actor._booting is not None} "
            f"group={actor.spec.group}")


_loaded: dict[tuple[ComponentId, str], LoadedComponent] = {}


def load(runtime: Runtime, cid: ComponentId, fixture: str) -> LoadedComponent:
    """`fixture` compiled for `cid` (cached across examples: the compile is the slow part)."""
    key = (cid, fixture)
    if key not in _loaded:
        _loaded[key] = runtime.load(cid, fixture_path(fixture))
    return _loaded[key]


limits_strategy = st.builds(ResourceLimits, max_execution_time_ms=st.sampled_from([100, 400]),
                            max_fuel=st.sampled_from([None, 20_000_000]))


class SupervisorChaos(RuleBasedStateMachine):
    runtime: ClassVar[Runtime]
    sup: Supervisor
    group: TaskGroup
    strategy: Strategy

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[Op] = []
        self.slots: dict[ComponentId, Slot] = {}
        self.removing: set[ComponentId] = set()
        self.problems: list[str] = []
        self._all_done = asyncio.Event()
        self._teardown = asyncio.Event()
        self._stores: RecordingStores | None = None
        # The host's own alarms: each means a bound or an answer was lost somewhere.
        self._logs_cm = structlog.testing.capture_logs()
        self.logs = self._logs_cm.__enter__()
        self._cm = start_blocking_portal("asyncio", {"use_uvloop": True})
        self.portal: BlockingPortal = self._cm.__enter__()
        try:
            self._owner, _ = self.portal.start_task(self._own, name="chaos owner")
        except BaseException:
            self._cm.__exit__(None, None, None)
            self._logs_cm.__exit__(None, None, None)
            raise

    # --- the owner task: the supervisor and the one task group everything runs in ---

    async def _own(self, *, task_status: TaskStatus[None]) -> None:
        # The events were made on the test's thread; asyncio binds them to the loop at their first wait.
        me = asyncio.current_task()
        baseline = {t for t in asyncio.all_tasks() if t is not me}  # the portal's own
        workers = WorkerPool(4)
        loop = asyncio.get_running_loop()
        # An exception in a callback (a future answered twice, say) would only be logged by the loop.
        loop.set_exception_handler(lambda _, context: self.problems.append(f"event loop: {context.get('message')} "
                                                                           f"{context.get('exception')!r}"))
        router = MessageRouter(loop)
        self._stores = RecordingStores(HostStores(self.runtime, router))
        try:
            async with Supervisor(self._stores, router, workers) as sup:  # type: ignore[arg-type]
                self.sup = sup
                async with anyio.create_task_group() as group:
                    self.group = group
                    await sup.start(ActorSpec(NEIGHBOUR), load(self.runtime, NEIGHBOUR, "echo"))
                    task_status.started()
                    await self._teardown.wait()
                    await self._wait_all("teardown")
                with anyio.move_on_after(BOUND_S) as late:
                    await sup.stop_all(DRAIN_S)
                if late.cancelled_caught:
                    self.problems.append(f"stop_all took more than {BOUND_S} s")
            self._check_after_stop(sup, workers, router)
        finally:
            workers.close()
        left = [t for t in asyncio.all_tasks() if t is not me and t not in baseline]
        if left:
            self.problems.append(f"tasks left after the supervisor ended: {[t.get_name() for t in left]}")

    def _check_after_stop(self, sup: Supervisor, workers: WorkerPool, router: MessageRouter) -> None:
        for cid, actor in sup.actors.items():
            if actor.state not in (ActorState.STOPPED, ActorState.FAILED) or actor.running:
                self.problems.append(f"{cid} is {actor.state.value} (running={actor.running}) after stop_all")
        if workers._stepping_since:
            self.problems.append(f"{len(workers._stepping_since)} worker thread(s) still run guest code")
        if router.pending_by_requester():
            self.problems.append(f"requests still pending after stop_all: {router.pending_by_requester()}")
        assert self._stores is not None
        open_stores = [m.name for m in self._stores.built if m.store is not None]
        if open_stores:
            self.problems.append(f"StoreManagers left open: {open_stores}")

    # --- firing operations ---

    def _fire(self, what: str, call: Callable[[], Awaitable[object]], refusals: tuple[type[Exception], ...] = ()
              ) -> Op:
        """Start `call` in the owner's task group, not waited for; its single outcome is recorded. Besides the
        messaging errors, `refusals` are the documented errors it may end with."""
        op = Op(len(self.ops), what, time.monotonic())
        self.ops.append(op)

        async def run() -> None:
            try:
                result = await call()
            except (RequestFailed, MessagingError, *refusals) as exc:
                op.outcomes.append(f"{type(exc).__name__}: {exc}")
            except Exception as exc:  # anything else escaping is a finding
                op.outcomes.append(f"unexpected {type(exc).__name__}: {exc}")
                op.unexpected = exc
            else:
                op.outcomes.append(f"ok {result!r:.60}")
            op.took = time.monotonic() - op.started
            if all(o.outcomes for o in self.ops):
                self._all_done.set()

        def spawn() -> None:
            self._all_done.clear()
            self.group.start_soon(run, name=f"chaos {what}")

        self.portal.call(spawn)
        return op

    async def _wait_all(self, when: str) -> None:
        if all(o.outcomes for o in self.ops):
            return
        oldest = min(o.started for o in self.ops if not o.outcomes)
        with anyio.move_on_after(max(0.0, oldest + BOUND_S - time.monotonic())):
            await self._all_done.wait()
        stuck = [o.what for o in self.ops if not o.outcomes]
        if stuck:
            self.problems.append(f"{when}: no outcome within {BOUND_S} s of their start: {stuck}; actors: "
                                 f"{[describe(a) for a in self.sup.actors.values()]}")
            self.group.cancel_scope.cancel()  # recorded: the teardown need not wait for them any longer

    # --- operator actions ---

    @initialize(fixtures=st.lists(st.sampled_from(FIXTURES), min_size=len(SLOTS), max_size=len(SLOTS)),
                limits=st.lists(limits_strategy, min_size=len(SLOTS), max_size=len(SLOTS)),
                grouped=st.lists(st.booleans(), min_size=len(SLOTS), max_size=len(SLOTS)),
                strategy=st.sampled_from(list(Strategy)))
    def add_every_slot(self, fixtures: list[str], limits: list[ResourceLimits], grouped: list[bool],
                       strategy: Strategy) -> None:
        """Every slot starts with a component, so that the steps find something to act on; those `grouped`
        are members of one supervision group whose `strategy` restarts its members together."""
        self.strategy = strategy
        for index, (fixture, its_limits, member) in enumerate(zip(fixtures, limits, grouped, strict=True)):
            self.add(index, fixture, its_limits, 64, member)

    def spec(self, cid: ComponentId, limits: ResourceLimits, capacity: int, grouped: bool) -> ActorSpec:
        """How a slot's component runs: short bounds everywhere, so that a stop or restart takes a second at most."""
        return ActorSpec(cid, limits=limits, mailbox_capacity=capacity, shutdown_timeout=SHUTDOWN_S,
                         backoff=Backoff(0.01, 0.05), intensity=Intensity(5, 1.0), health_interval=0.2,
                         group="g" if grouped else None, strategy=self.strategy)

    @precondition(lambda self: len(self.slots) < len(SLOTS))
    @rule(index=st.integers(0, len(SLOTS) - 1), fixture=st.sampled_from(FIXTURES), limits=limits_strategy,
          capacity=st.sampled_from([2, 64]), grouped=st.booleans())
    def add(self, index: int, fixture: str, limits: ResourceLimits, capacity: int, grouped: bool) -> None:
        """Start a component in a free slot (not waited for)."""
        cid = SLOTS[index]
        if cid in self.slots or cid in self.removing:
            return
        spec = self.spec(cid, limits, capacity, grouped)
        loaded = load(self.runtime, cid, fixture)
        slot = self.slots[cid] = Slot(spec, loaded, fixture)
        slot.last_op = self._fire(f"add {cid} {fixture}", lambda: self.sup.start(spec, loaded))

    def _slot(self, index: int) -> tuple[ComponentId, Slot] | None:
        cid = SLOTS[index]
        slot = self.slots.get(cid)
        if slot is None:
            return None
        return cid, slot

    def _operator(self, cid: ComponentId, slot: Slot, action: str, call: Callable[[], Awaitable[object]]) -> Op:
        """Fire an operator's stop, start or restart of `cid`, now the slot's last action. ComponentError is a
        documented refusal: a start or restart while a stop is under way (that stop would end it; a restart
        also when a stop came while it waited for the restart before it)."""
        slot.last, slot.uncertain = action, slot.replacing  # fired during a replacement: either actor
        slot.last_op = self._fire(f"{action} {cid}", call, (ComponentError,))
        return slot.last_op

    @rule(index=st.integers(0, len(SLOTS) - 1))
    def stop(self, index: int) -> None:
        found = self._slot(index)
        if found is None:
            return
        cid, slot = found
        self._operator(cid, slot, "stop", lambda: self.actor(cid).stop(DRAIN_S))

    @rule(index=st.integers(0, len(SLOTS) - 1))
    def start_again(self, index: int) -> None:
        found = self._slot(index)
        if found is None:
            return
        cid, slot = found
        self._operator(cid, slot, "start", lambda: self.actor(cid).start())

    @rule(index=st.integers(0, len(SLOTS) - 1))
    def restart(self, index: int) -> None:
        found = self._slot(index)
        if found is None:
            return
        cid, slot = found
        if sum(not op.outcomes for op in slot.restarts) >= MAX_QUEUED_RESTARTS:
            return
        slot.restarts.append(self._operator(cid, slot, "restart", lambda: self.actor(cid).restart()))

    @rule(index=st.integers(0, len(SLOTS) - 1))
    def remove(self, index: int) -> None:
        found = self._slot(index)
        if found is None or found[1].reloaded:
            return  # removed by a reload, which the daemon runs one at a time
        cid, _ = found
        # Out of the model at once (hypothesis' preconditions may only read what the steps change), and
        # not added again before the next settle: the daemon never re-adds an id it is still removing.
        del self.slots[cid]
        self.removing.add(cid)
        self._fire(f"remove {cid}", lambda: self.sup.remove(cid, DRAIN_S))

    def actor(self, cid: ComponentId) -> ComponentActor:
        """The actor under `cid` now, as the control socket looks it up (a ComponentError when there is none)."""
        actor = self.sup.actors.get(cid)
        if actor is None:
            raise ComponentError("invalid-state", f"no component {cid}")
        return actor

    @rule(index=st.integers(0, len(SLOTS) - 1), fixture=st.sampled_from(FIXTURES), limits=limits_strategy)
    def replace(self, index: int, fixture: str, limits: ResourceLimits) -> None:
        """As a reload does with a changed component that does not run (or a failed upgrade's put-back):
        remove it, then start the new version under the same id."""
        found = self._slot(index)
        if found is None or found[1].reloaded:
            return  # one reload at a time (reset by `settle`: a step's choice may not depend on timing)
        cid, slot = found
        spec = self.spec(cid, limits, slot.spec.mailbox_capacity, slot.spec.group is not None)
        loaded = load(self.runtime, cid, fixture)
        slot.reloaded = slot.replacing = True

        async def remove_and_start() -> None:
            try:
                await self.sup.remove(cid, DRAIN_S)
                await self.sup.start(spec, loaded)
            finally:
                slot.replacing = False

        slot.spec, slot.loaded, slot.fixture, slot.last, slot.uncertain = spec, loaded, fixture, "add", False
        slot.last_op = self._fire(f"replace {cid} with {fixture}", remove_and_start)

    @rule(index=st.integers(0, len(SLOTS) - 1))
    def probe(self, index: int) -> None:
        """As a rollout's check window does: ask the running instance for its health now."""
        cid = SLOTS[index]
        if cid in self.slots:  # not a lifecycle action: not through _slot
            self._fire(f"probe {cid}", lambda: self.actor(cid).probe_health(), (ComponentError,))

    @rule(index=st.integers(0, len(SLOTS) - 1), fixture=st.sampled_from(FIXTURES), limits=limits_strategy,
          window=st.sampled_from([0.0, 0.3]))
    def hand_over(self, index: int, fixture: str, limits: ResourceLimits, window: float) -> None:
        """As a reload's rollout: to a new binary, the running version as fallback, a check window."""
        found = self._slot(index)
        if found is None or found[1].reloaded:
            return  # one reload at a time
        cid, slot = found
        spec = self.spec(cid, limits, slot.spec.mailbox_capacity, slot.spec.group is not None)
        loaded = load(self.runtime, cid, fixture)
        previous = (slot.spec, slot.loaded)
        slot.reloaded = True
        slot.last, slot.uncertain = "hand over", slot.replacing
        slot.last_op = None

        async def roll_out() -> str:
            actor = self.sup.actors.get(cid)
            if actor is None or not actor.accepts_handover:  # as Daemon._can_hand_over: started anew instead
                return "not running: not handed over"
            handover: Handover = await self.sup.hand_over(spec, loaded, previous)
            try:
                if handover.boot_error is None:  # its check window: a failure falls back at once
                    with anyio.move_on_after(window):
                        await handover.failed.wait()
            finally:
                actor.end_probation()
            if handover.boot_error is not None or handover.failed.is_set():
                return "rolled back"
            slot.spec, slot.loaded, slot.fixture = spec, loaded, fixture
            return "upgraded"

        self._fire(f"hand over {cid} to {fixture}", roll_out)

    # --- messages ---

    @rule(to=st.sampled_from([*SLOTS, *SLOTS, NEIGHBOUR]), payload=st.sampled_from(PAYLOADS))
    def send(self, to: ComponentId, payload: bytes) -> None:
        self._fire(f"send {to} {payload!r}", lambda: self.sup.router.host_send(to, payload, wait=True, timeout=2.0))

    @rule(to=st.sampled_from([*SLOTS, *SLOTS, NEIGHBOUR]), payload=st.sampled_from(PAYLOADS),
          timeout=st.sampled_from([0.05, 2.0]), wait=st.booleans())
    def request(self, to: ComponentId, payload: bytes, timeout: float, wait: bool) -> None:
        self._fire(f"request {to} {payload!r} {timeout} s",
                   lambda: self.sup.router.host_request(to, payload, timeout, wait=wait))

    # --- checks ---

    @rule()
    def settle(self) -> None:
        """Wait for every operation in flight, then compare the supervisor with the model."""
        self.portal.call(self._wait_all, "settle")
        self.removing.clear()
        for slot in self.slots.values():
            slot.reloaded = False
        self._check_problems()
        self.portal.call(self._check_listing)
        self._check_problems()

    async def _check_listing(self) -> None:
        sup = self.sup
        if set(sup.actors) != set(self.slots) | {NEIGHBOUR}:
            self.problems.append(f"listed {sorted(map(str, sup.actors))}, expected "
                                 f"{sorted(map(str, [*self.slots, NEIGHBOUR]))}")
        listed = set(sup.list_components())
        for cid in SLOTS:
            slot = self.slots.get(cid)
            if slot is None:
                try:
                    sup.component_info(cid)
                    self.problems.append(f"component_info answers for removed {cid}")
                except ComponentError:
                    pass
                continue
            actor = sup.actors.get(cid)
            if actor is None:
                continue
            sup.component_info(cid)
            certain = not slot.uncertain
            if (certain and slot.last == "stop"
                    and (cid in listed or actor.state not in (ActorState.STOPPED, ActorState.FAILED))):
                self.problems.append(f"{cid} was stopped last, yet is {actor.state.value} (listed: {cid in listed}): "
                                     f"{describe(actor)}; {self._trail(cid)}")
            answered_ok = slot.last_op is not None and slot.last_op.outcomes[0].startswith("ok")
            if (certain and slot.last in ("add", "start", "restart") and answered_ok
                    and actor.state in (ActorState.STOPPED, ActorState.STOPPING)):
                self.problems.append(f"{cid} was {slot.last}ed last (answered ok), yet is {actor.state.value}: "
                                     f"{self._trail(cid)}")
            if actor.state is ActorState.FAILED and actor.running:
                # Failed, its task still closing the Store (bounded: STOP_GRACE); it answers what is queued last.
                with anyio.move_on_after(BOUND_S):
                    await actor._ended.wait()
            if actor.state in (ActorState.STOPPED, ActorState.FAILED) and (len(actor.mailbox) or actor.in_hand):
                self.problems.append(f"{cid} is {actor.state.value} with {len(actor.mailbox)} message(s) queued and "
                                     f"{actor.in_hand} in hand: never answered ({describe(actor)}; "
                                     f"mailbox closed={actor.mailbox.closed}); "
                                     f"{self._trail(cid)}")
            if (cid in listed) != (actor.state in TAKING_MESSAGES):
                self.problems.append(f"{cid} listed={cid in listed} in state {actor.state.value}")
        try:
            with anyio.fail_after(BOUND_S):
                reply = await sup.router.host_request(NEIGHBOUR, b"still there?", BOUND_S)
            if reply != b"still there?":
                self.problems.append(f"the neighbour answered {reply!r}")
        except Exception as exc:
            self.problems.append(f"the neighbour did not answer: {type(exc).__name__}: {exc}")

    def _trail(self, cid: ComponentId) -> list[tuple[str, list[str]]]:
        """The operations fired at `cid` so far, with their outcomes (for a problem's explanation)."""
        return [(o.what, o.outcomes) for o in self.ops if f"{cid} " in f"{o.what} "]

    def _check_problems(self) -> None:
        alarms = [e for e in self.logs if e["event"] in ALARMS]
        assert not alarms, f"the host logged alarms: {alarms}"
        twice = [(o.what, o.outcomes) for o in self.ops if len(o.outcomes) > 1]
        unexpected = [(o.what, o.outcomes[0]) for o in self.ops if o.unexpected is not None]
        refused = [(o.what, o.outcomes[0]) for o in self.ops
                   if o.outcomes and o.outcomes[0].startswith("ComponentError")
                   and not any(why in o.outcomes[0] for why in STOP_REFUSALS)]
        assert not refused, f"refused for another reason than a stop under way: {refused}"
        assert not twice, f"operations with more than one outcome: {twice}"
        assert not unexpected, f"undocumented exceptions escaped: {unexpected}"
        if self.problems:  # whole, one a line (an assertion's message would be shortened)
            raise AssertionError("\n".join(self.problems))

    def teardown(self) -> None:
        try:
            self.portal.call(self._teardown.set)
            try:
                self._owner.result(timeout=4 * BOUND_S)
            except BaseException as exc:  # the portal then cancels the owner rather than wait for it
                self._cm.__exit__(type(exc), exc, exc.__traceback__)
                raise AssertionError(f"the teardown did not end within {4 * BOUND_S} s: {self.problems}") from exc
            self._cm.__exit__(None, None, None)
        finally:
            self._logs_cm.__exit__(None, None, None)
        self._check_problems()


CHAOS_SETTINGS = settings(max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None, derandomize=not FUZZ,
                          database=None if not FUZZ else settings.default.database,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def test_random_interleavings_of_lifecycle_actions_and_messages(runtime: Runtime) -> None:
    SupervisorChaos.runtime = runtime
    run_state_machine_as_test(SupervisorChaos, settings=CHAOS_SETTINGS)

