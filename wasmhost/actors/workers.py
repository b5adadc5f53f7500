"""Worker threads that run guest code, so the event loop never does.

Guest calls are time-sliced M:N over a fixed set of threads: a call is a generator of steps (one
poll of its wasmtime call future, about one slice of fuel, see StoreManager), and each thread runs
one step of the most deserving job, then puts it back. Jobs are kept in a multi-level feedback
queue: a job starts at level 0 and sinks one level each time the slices it has used double, so a
call that just arrived runs before calls that have already used many slices; within a level, jobs
take turns. A job whose waiter went away is stepped first, so its call is abandoned at once, and the
cancelled waiter waits for that (after calling its `interrupt`, which ends a host call's wait): once
it has returned, no thread touches the job's Store or generator any more. A job
whose call deadline passes while it waits for a slice is ended (as a timeout, without running guest
code again) by the pool's deadline thread at that moment, not when its turn comes; a call running a
slice at its deadline is interrupted by wasmtime's epoch deadline as before.

A guest sleeping in sleep-millis holds no thread: its call is suspended inside the host call, its step
yields Asleep (see core/blocking.py), and the job is set aside until the sleep ends (the deadline thread
puts it back in the queue then) or is interrupted (`interrupt` puts it back at once); its next step goes
on with the guest. So any number of sleepers leave every thread to the others.

A thread whose guest waits inside a host call (a storage commit: see core/blocking.py) is lent a
replacement while work is queued, so waiting guests do not take the threads busy guests need; at most
MAX_LENT_THREADS threads are lent at once, and surplus threads end once idle.

Chores (`run`: plain functions that run no guest code, such as closing a Store) go before every
call: they are short, and a thousand components stopped at once free their Stores as their
`shutdown` calls end instead of after all of them.

One thread runs guest code at a time, unless a guest computes: then up to `concurrency` (one per
core). Guest code runs without the GIL, but every step also runs Python (the call's conversion, the
host functions, handing the result to the loop). Steps of short calls are mostly Python, and two
threads running them only pass the GIL back and forth: measured on 2 cores, a ring of 3 guests
relaying with `send` made 7,000 hops/s with two threads and 13,500 with one, and request round trips
4,200/s and 7,000/s. A step whose guest call used up a whole slice of fuel (it said so through
`blocking.computing`, see StoreManager) ran guest code most of the time, and only then may other
threads join in, so guests that compute still get every core. Calls that compute for less than one
first slice (about 0.1 ms) each stay on one thread. A step still running after LONG_STEP_S counts as
computing as well (the deadline thread looks while calls wait): steps that cannot be sliced, a core
module's start function inside instantiate or a large WASI host call, would otherwise keep every other
guest waiting until they end. One whose thread then spends less than WAITING_CPU_SHARE of its time on
a CPU is waiting, not computing: a WASI write blocked on a full pipe, or a guest blocked on a WASI
pollable (`wasi:io/poll`, a clock's `subscribe-duration`), which wasmtime waits for on the thread
without returning to us, for as long as the guest asked (its deadline cannot end that wait). Its
thread counts as waiting in a host call: it is no longer one of the threads running guest code, and a
thread is lent for the work queued behind it.

An idle thread is woken latest-idle first: that keeps a run of short calls on one thread (4 echo
actors sharing 512 requests in flight: 9,000-11,000 msg/s woken first-idle first, 13,600-13,900
latest first).

Where the threads run (core/affinity.py): a worker running short calls stays on the home core with
the event loop, one running a computing job roams over every core; while any job computes, the event
loop and every worker spread over every core, and they go home again once none has for CALM_S.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import itertools
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Generator
from typing import Any, TypeVar

import anyio

from wasmhost.core import affinity, blocking
from wasmhost.core.blocking import Asleep, Sleeper
from wasmhost.messaging.mailbox import flush_wakes

T = TypeVar("T")

LEVELS = 8
STALE_ALARMS = 64
"""Entries of sleeps interrupted before their time that `_alarms` may keep beyond twice the sleeps in it."""
WAKES_PER_SLICE = 8
"""A call's wakes from sleeps that sink it in the feedback queue as one slice of guest code does. A wake is
cheap for its guest but a trip through the queue: when wakes did not count, a guest looping over
sleep-millis(1) stayed at the top level however long its call ran, and an echo beside 1,000 of them
queued behind their wakes (p50 38.6 ms, p99 99 ms, 4 threads on 2 cores; beside 1,000 spinners, which
sink: p50 0.09 ms, p99 5.5 ms). A call that sleeps a few times stays at the top."""
CALM_S = 0.1
"""Seconds without a computing guest after which the event loop and the workers go home again."""
LONG_STEP_S = 0.05
"""A step running this long has left Python for good (a core module's looping start function inside
instantiate, a WASI write blocked on a full pipe, a wait on a WASI pollable): it counts as computing
from then on, so that calls queued behind it get a thread (checked by the deadline thread while calls
wait), and its thread's CPU time is looked at (WAITING_CPU_SHARE)."""
WAITING_CPU_SHARE = 0.02
"""The share of a CPU under which the thread of a long step counts as waiting (see QUIET_LOOKS)."""
QUIET_LOOKS = 3
"""A long step whose thread used less than WAITING_CPU_SHARE of a CPU in each of QUIET_LOOKS spans of
LONG_STEP_S or more in a row is waiting (in a WASI call: a blocked write, a pollable), and its thread
counts as one waiting in a host call, so that a thread is lent beside it. (One span is not enough: a
thread that computes can wait that long for the GIL or a core, measured down to 0% over 50 ms with
six guests converting large lists on two cores.) One that computes (a looping start function, a WASI
call converting a large list) keeps its place among the `concurrency` threads running guest code:
lending threads to those would let every guest run one at once (a `poll` on a list of 8M pollables
peaks at 275 MiB of host memory, outside the guest's budget)."""
MAX_LENT_THREADS = 256
"""Threads lent at most to stand in for threads whose guests wait in host calls (beyond it, waiting
guests hold their threads). Each costs a thread stack: measured RSS in the README."""
"""Feedback-queue levels: level n holds jobs that have used 2^(n-1) to 2^n - 1 slices (the last, more)."""


def default_worker_count() -> int:
    """Busy guests are time-sliced and need no thread each, and at most one thread per core runs
    guest code at once (`WorkerPool.concurrency`): the others are there for guests blocked in host
    calls (storage writes) and for ending cancelled and expired calls."""
    return max(4, 2 * (os.cpu_count() or 1))


class _Job:
    """One guest call (or plain function) on its way through the pool."""

    __slots__ = (
        "afterwards",
        "asleep_until",
        "begun",
        "cancelled",
        "clock",
        "computing",
        "deadline",
        "ended",
        "finishing_sleep",
        "fn",
        "future",
        "give_up_at",
        "heap_deadline",
        "in_host_call",
        "lock",
        "locked",
        "loop",
        "queued",
        "released",
        "sampled",
        "sleeper",
        "slices",
        "steps",
        "ticket",
        "wakes",
    )

    def __init__(
        self,
        steps: Generator[float, None, Any] | None,
        fn: Callable[[], Any] | None,
        lock: threading.Lock | None,
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[Any],
        afterwards: Callable[[], None] | None = None,
        give_up_at: Callable[[], float] | None = None,
    ) -> None:
        self.steps = steps
        self.give_up_at = give_up_at  # see WorkerPool.run_steps
        self.afterwards = afterwards  # run on the thread once the result is handed to the waiter
        self.fn = fn
        self.lock = lock
        self.locked = False  # its step holds `lock` (it is not waiting for another thread to let go of it)
        self.loop = loop
        self.future = future
        self.slices = 0  # steps that ran guest code (not those that left it asleep)
        self.wakes = 0  # steps that left it asleep (see WAKES_PER_SLICE)
        self.begun = False  # a thread has stepped it
        self.asleep_until = math.inf  # set aside while its guest sleeps (see WorkerPool._set_aside) until then
        self.sleeper: Sleeper | None = None  # whose interrupt ends that sleep
        # Cancelled while set aside asleep: its next step still runs, to let the guest go on from its interrupted
        # sleep (as a guest woken on a thread did), and the one after closes it.
        self.finishing_sleep = False
        self.deadline = math.inf
        self.heap_deadline = math.inf  # the deadline this job has an entry for in the deadline heap
        self.ticket = 0  # queue entries carrying an older ticket are stale
        self.queued = False
        self.cancelled = False
        self.computing = False  # a step of it used up a whole slice of guest code (see the module docstring)
        self.clock = 0  # the CPU-time clock of the thread running its step
        self.in_host_call = False  # its thread waits in a host call (a blocking section: a storage write)
        # (monotonic, thread CPU seconds, quiet looks in a row) when its long step was last looked at
        self.sampled: tuple[float, float, int] | None = None
        self.ended = False  # set on the loop once no thread will touch the job again
        self.released: asyncio.Future[None] | None = None  # made by a cancelled waiter that waits for `ended`


class CallGivenUp(Exception):
    """A call's thread waited in a WASI call (a pollable, a blocked write) past the time its waiter gives
    it (`run_steps`' give_up_at): the waiter no longer waits. The thread keeps the job (its Store and
    generator) until the wait ends, then closes it without another step; `released` is set then (and
    never, if the guest waits forever)."""

    def __init__(self, released: asyncio.Future[None]) -> None:
        super().__init__("the call waited in WASI past its deadline and was given up on")
        self.released = released


def _given_up(job: _Job) -> None:
    """On the loop: the deadline thread gave up on `job` (see CallGivenUp), unless it ended meanwhile."""
    if job.ended or job.future.done():
        return
    job.released = job.loop.create_future()  # set by _resolve once the thread lets go
    job.future.set_exception(CallGivenUp(job.released))


def _resolve(job: _Job, value: Any, error: BaseException | None, abandoned: bool = False) -> None:
    """On the loop: the job has ended (no thread touches it again); hand its result to its waiter."""
    job.ended = True
    if job.released is not None and not job.released.done():
        job.released.set_result(None)
    future = job.future
    if future.done():
        return  # the waiter was cancelled
    if abandoned:
        future.cancel()  # a closed pool does not run what was left
    elif error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


def _drop_stale(heap: list[tuple[float, int, _Job]], due: Callable[[_Job], float]) -> None:
    """Remove, in place (whoever holds the list sees it), the entries of `heap` whose job is no longer due at
    their time (`due`: when it is due now), and keep it a heap."""
    heap[:] = [entry for entry in heap if due(entry[2]) == entry[0]]
    heapq.heapify(heap)


MAX_HELD_MEMORY_BYTES = 1 << 30
"""Store memory left to guests asleep in WASI past their deadline, host-wide, from which a component whose call
is given up on is failed rather than restarted: each held Store keeps up to its max_memory_bytes outside its
component's budget, so components sleeping after every restart (up to max_restarts + 1 Stores each) held
64 MiB x 128 threads = 8 GiB with the defaults, twice the systemd unit's MemoryMax. 1 GiB: 16 Stores of
the default 64 MiB."""


class WorkerPool:
    """A fixed set of threads that time-slice guest calls (see the module docstring)."""

    def __init__(self, size: int | None = None, max_lent: int = MAX_LENT_THREADS,
                 concurrency: int | None = None) -> None:
        self.size = size or default_worker_count()
        self.max_threads = self.size + max_lent
        self.max_held = max(1, max_lent // 2)
        """Threads held by calls given up on in WASI waits (`held_threads`) from which a component whose call
        is given up on is failed rather than restarted (see ComponentActor._gave_up). A held thread counts
        as blocked and is lent a replacement, so without a bound components sleeping in WASI after every
        restart took all `max_threads` and stalled every other guest until they woke (for good, for a
        sleep of 2^64-1 ns). Half of the lent threads: the other half stays for guests waiting in host
        calls (storage writes), which end within their deadline."""
        self.held_threads = 0
        """Threads held by calls given up on in WASI waits, summed over every component (counted on the
        loop by the actors, see ComponentActor._hold_thread): each is let go when its guest wakes."""
        self.max_held_memory = MAX_HELD_MEMORY_BYTES
        """The Store memory held so (`held_memory`) from which, likewise, a component is failed rather than
        restarted."""
        self.held_memory = 0
        """What the Stores left to those threads may hold, summed: each counted at its component's
        max_memory_bytes (the memory stays mapped while the guest sleeps, outside its component's budget)."""
        self.concurrency = concurrency or os.cpu_count() or 1
        """Threads that run guest code at once, at most, while guests compute (those waiting in host
        calls do not count); otherwise one (see the module docstring)."""
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # the pool's lock; idle workers wait on their own
        self._sleepers: list[threading.Condition] = []  # idle workers' conditions, the latest idle last
        self._reaper_cond = threading.Condition(self._lock)  # the deadline thread waits on this one
        self._levels: list[deque[tuple[int, _Job]]] = [deque() for _ in range(LEVELS)]
        self._urgent: deque[tuple[int, _Job]] = deque()  # cancelled jobs: released before anything else
        self._chores: deque[tuple[int, _Job]] = deque()  # plain functions (`run`): no guest code, next in line
        self._deadlines: list[tuple[float, int, _Job]] = []
        # Jobs set aside while their guests sleep, by when they wake (entries of jobs woken since are stale).
        self._alarms: list[tuple[float, int, _Job]] = []
        self.asleep = 0
        """Guest calls set aside while their guests sleep (sleep-millis): they hold no thread."""
        # Jobs being stepped (not waiting in a blocking section) -> when their step began: one per worker
        # thread stepping, so its size is the number of those.
        self._stepping_since: dict[_Job, float] = {}
        self._watching = False  # the deadline thread is looking out for long steps (see LONG_STEP_S)
        self._order = itertools.count()
        self._waiting = 0  # jobs queued (whatever stale entries the queues still hold)
        self._closed = False
        self._live = 0  # worker threads started and not yet ended
        self._blocked = 0  # of which waiting in a blocking section
        self._idle = 0  # of which waiting for work
        self._computing = 0  # of which running a job that computes (job.computing)
        self._spread = False  # the event loop and every worker may use every core (see core/affinity.py)
        self._calm_since = 0.0  # time.monotonic() when _computing last fell to 0
        self._current = threading.local()  # .job: the job the calling worker thread runs
        # Jobs whose step in progress ran LONG_STEP_S waiting (see `_waits`): their threads are counted in _blocked,
        # and they may be given up on (`_give_up_overdue`).
        self._waiting_steps: set[_Job] = set()
        self._given_up_locks: set[threading.Lock] = set()  # held by the steps of jobs given up on
        # Cancelled waiters' waits for the thread still running their job (see `stop_waiting`).
        self._release_waits: dict[asyncio.Future[None], _Job] = {}
        self.started = 0
        """Worker threads started so far, lent ones included."""
        with self._cond:
            for _ in range(self.size):
                self._spawn()
        self._reaper = threading.Thread(target=self._reap, name="wasmhost-deadlines", daemon=True)
        self._reaper.start()

    @property
    def threads(self) -> int:
        """Worker threads alive: `size`, plus those lent while guests wait in host calls (the
        deadline thread is not counted)."""
        return self._live

    def held_too_much(self) -> str | None:
        """Why no component whose call is given up on in a WASI wait may restart now (the threads or the
        Store memory held so host-wide reached their bound), or None."""
        if self.held_threads >= self.max_held:
            return (f"{self.held_threads} worker threads are held by guests asleep in WASI (host-wide bound "
                    f"{self.max_held})")
        if self.held_memory >= self.max_held_memory:
            return (f"{self.held_memory >> 20} MiB of Store memory is held by guests asleep in WASI (host-wide "
                    f"bound {self.max_held_memory >> 20} MiB)")
        return None

    @property
    def busy(self) -> int:
        """Worker threads running a guest or waiting in one of its host calls (read without the lock:
        a gauge, from any thread)."""
        return max(0, self._live - self._idle)

    def _admits(self) -> bool:
        """Whether one more thread may start running guest code (self._cond held)."""
        stepping = len(self._stepping_since)
        return stepping == 0 or (stepping < self.concurrency and self._computing > 0)

    def _wake_one(self) -> None:
        """Wake the worker that went idle last (self._cond held; see the module docstring)."""
        if self._sleepers:
            self._sleepers.pop().notify()

    def _spawn(self) -> None:
        """Start one more worker thread (called with self._cond held)."""
        name = f"wasmhost-guest-{self.started}"
        self._live += 1
        self.started += 1
        threading.Thread(target=self._work, name=name, daemon=True).start()

    def _lend_if_short(self) -> None:
        """Start a thread if queued work would otherwise wait for one that is blocked (self._cond held)."""
        if (self._waiting and not self._idle and self._live - self._blocked < self.size
                and self._live < self.max_threads and not self._closed):
            self._spawn()

    def enter_blocking(self) -> None:
        """The calling worker is about to wait in a host call: lend a thread if work is queued."""
        flush_wakes()  # what the guest sent before the wait is delivered now, not after it
        job: _Job | None = getattr(self._current, "job", None)
        with self._cond:
            if job is not None:  # waiting is not stepping: no long step meanwhile
                self._stepping_since.pop(job, None)
                self._end_long_step(job)  # counted as waiting below, once
                job.in_host_call = True
            self._blocked += 1
            self._count_computing(-self._current_computes())
            if self._waiting:
                self._wake_one()
            self._lend_if_short()

    def leave_blocking(self) -> None:
        """The calling worker runs again; a surplus thread ends when it next finds no work."""
        job: _Job | None = getattr(self._current, "job", None)
        with self._cond:
            if job is not None:
                self._stepping_since[job] = time.monotonic()
                job.in_host_call = False
                job.sampled = None
                self._end_long_step(job)  # back in Python: stepping again
            self._blocked -= 1
            self._count_computing(self._current_computes())
            if self._idle and self._live - self._blocked > self.size:
                self._wake_one()  # an idle thread is surplus now: let it end

    def computing(self) -> None:
        """The calling worker's step ran a whole slice of guest code: its job computes, and other
        threads may run guest code beside it from now on (see the module docstring)."""
        job: _Job | None = getattr(self._current, "job", None)
        if job is None or job.computing:
            return
        with self._cond:
            job.computing = True
            self._count_computing(1)
            if self._waiting and self._admits():
                self._wake_one()
        self._place(True)

    def _count_computing(self, change: int) -> None:
        """Add `change` to the threads running computing jobs (self._cond held): the first spreads the
        event loop over every core (see core/affinity.py)."""
        if not change:
            return
        self._computing += change
        if self._computing == 0:
            self._calm_since = time.monotonic()
        elif not self._spread:
            self._spread = True
            affinity.spread(True)

    def _gather_if_calm(self) -> None:
        """Bring the event loop home once no guest has computed for CALM_S (self._cond held)."""
        if self._spread and not self._computing and time.monotonic() - self._calm_since >= CALM_S:
            self._spread = False
            affinity.spread(False)

    def _place(self, computing: bool) -> None:
        """Keep the calling worker on the home core, or let it roam while its guest computes (see
        core/affinity.py)."""
        if self._current.roaming != computing:
            self._current.roaming = computing
            if computing:
                affinity.roam()
            else:
                affinity.stay_home()

    def _current_computes(self) -> int:
        """1 when the calling worker's job computes, else 0."""
        job: _Job | None = getattr(self._current, "job", None)
        return int(job is not None and job.computing)

    async def run(self, fn: Callable[[], T], lock: threading.Lock | None = None) -> T:
        """Run `fn`, a chore that runs no guest code (closing a Store), on a worker thread (in one go,
        holding `lock`) and wait for it. Chores go before every guest call and need no place among the
        threads running guest code."""
        return await self._submit(None, fn, lock)  # type: ignore[no-any-return]

    async def run_steps(self, steps: Generator[float, None, T], lock: threading.Lock | None = None,
                        interrupt: Callable[[], None] | None = None,
                        afterwards: Callable[[], None] | None = None,
                        give_up_at: Callable[[], float] | None = None) -> T:
        """Run `steps` one step at a time (each holding `lock`, the Store's) on worker threads and
        return its result; each step yields the monotonic deadline of the call in progress. If the
        waiter is cancelled, it calls `interrupt` (which must end any wait of a host call the guest
        may be in, from any thread), the generator is closed (its call abandoned) on the next free
        thread, and only then is the cancellation raised. `afterwards` runs on the worker thread once
        the result (or error) is on its way to the waiter, without `lock`: cleanup that need not delay
        the answer.

        `give_up_at` (read on the deadline thread) says when, in time.monotonic(), a step that waits in a
        WASI call (see LONG_STEP_S; not one of our host calls) is given up on: the waiter gets CallGivenUp
        then, while the thread keeps the job until the wait ends (no interrupt or deadline can end it)."""
        return await self._submit(steps, None, lock, interrupt, afterwards,  # type: ignore[no-any-return]
                                  give_up_at)

    async def _submit(
        self, steps: Generator[float, None, Any] | None, fn: Callable[[], Any] | None, lock: threading.Lock | None,
        interrupt: Callable[[], None] | None = None, afterwards: Callable[[], None] | None = None,
        give_up_at: Callable[[], float] | None = None,
    ) -> Any:
        loop = asyncio.get_running_loop()
        job = _Job(steps, fn, lock, loop, loop.create_future(), afterwards, give_up_at)
        with self._cond:
            if self._closed:
                raise RuntimeError("the worker pool is closed")
            self._enqueue(job)
        try:
            return await job.future
        except asyncio.CancelledError:
            with self._cond:
                job.cancelled = True
                # Never picked by a thread (a chore not run, a call not begun): no thread has touched it and
                # none will once it leaves the queue here, so there is nothing to wait for. Waiting for a
                # thread to discard it instead never ended once every thread was held by guests asleep in
                # WASI: a failed component never answered its queue, and the supervisor never exited.
                unstarted = job.queued and not job.begun
                if unstarted:
                    job.ticket += 1  # its queue entry is now stale
                    job.queued = False
                    self._waiting -= 1
                elif job.queued:
                    self._put(self._urgent, job)
                    self._wake_one()
            if unstarted:
                if job.steps is not None:
                    job.steps.close()  # never started: runs none of its code
                job.ended = True
            elif not job.ended:
                if interrupt is not None:
                    interrupt()  # a guest set aside asleep is put back by it (see _back_from_sleep)
                with self._cond:
                    self._back_from_sleep(job)  # still set aside (nothing interrupted its sleep): put back now
                await self._until_released(job)
            raise

    # --- queues (called with self._cond held) ---

    def _put(self, queue: deque[tuple[int, _Job]], job: _Job) -> None:
        if not job.queued:
            self._waiting += 1
        job.ticket += 1
        job.queued = True
        queue.append((job.ticket, job))

    def _enqueue(self, job: _Job) -> None:
        # A chore (closing a Store) runs no guest code and frees memory: it goes before every call and
        # wakes a thread whether or not one more may run guest code, so a thousand stops at once do not
        # leave each close waiting behind every `shutdown`. It has no deadline.
        chore = job.steps is None
        level = (job.slices + job.wakes // WAKES_PER_SLICE).bit_length()
        self._put(self._chores if chore else self._levels[min(LEVELS - 1, level)], job)
        if job.deadline != job.heap_deadline and job.deadline != math.inf:
            job.heap_deadline = job.deadline
            heap = self._deadlines
            if len(heap) > 1024 and len(heap) > 4 * self._waiting:
                # Entries of calls that have ended stay until their deadline: drop them now and then.
                _drop_stale(heap, lambda job: job.heap_deadline)
            heapq.heappush(heap, (job.deadline, next(self._order), job))
            if self._deadlines[0][2] is job:
                self._reaper_cond.notify()  # a new earliest deadline
        if chore or self._admits():
            self._wake_one()
        self._lend_if_short()

    def _pick(self) -> _Job | None:
        """The next job to step: cancelled ones, then any past its deadline (neither runs guest code
        again), then chores, then, if one more thread may run guest code (`_admits`), by level."""
        job = self._first(self._urgent) or self._expired() or self._first(self._chores)
        if job is not None or not self._admits():
            return job
        for level in self._levels:
            job = self._first(level)
            if job is not None:
                return job
        return None

    def _expired(self) -> _Job | None:
        """A queued job whose call deadline has passed, if any."""
        heap = self._deadlines
        while heap and heap[0][0] <= time.monotonic():
            deadline, _, job = heapq.heappop(heap)
            if job.heap_deadline == deadline:
                job.heap_deadline = math.inf
                if job.queued and job.deadline == deadline:
                    job.ticket += 1  # its level entry is now stale
                    job.queued = False
                    self._waiting -= 1
                    return job
        return None

    def _first(self, queue: deque[tuple[int, _Job]]) -> _Job | None:
        while queue:
            ticket, job = queue.popleft()
            if job.queued and job.ticket == ticket:
                job.queued = False
                self._waiting -= 1
                return job
        return None

    # --- worker threads ---

    def _work(self) -> None:
        blocking.install(self)
        mine = threading.Condition(self._lock)
        clock = time.pthread_getcpuclockid(threading.get_ident())  # this thread's CPU time (for long steps)
        self._current.roaming = True
        self._place(False)
        while True:
            with self._cond:
                job = self._pick()
                while job is None:
                    if self._closed or self._live - self._blocked > self.size:
                        self._live -= 1  # closed, or a lent thread no longer needed
                        return
                    self._idle += 1
                    self._sleepers.append(mine)
                    mine.wait()  # until _wake_one or close takes it off the list
                    self._idle -= 1
                    job = self._pick()
                self._count_computing(job.computing)
                self._gather_if_calm()
                spread = self._spread
                self._stepping_since[job] = time.monotonic()
                job.clock, job.sampled = clock, None
                if not self._watching:
                    self._reaper_cond.notify()  # to look out for this step running long
            self._current.job = job
            self._place(job.computing or spread)
            try:
                self._step(job)
            finally:
                self._current.job = None
                with self._cond:
                    self._stepping_since.pop(job, None)
                    self._end_long_step(job)
                    self._count_computing(-job.computing)

    def _reap(self) -> None:
        """The deadline thread: ends queued calls the moment their deadline passes (their next step
        only finds the deadline gone and abandons the call: no guest code runs here), puts calls whose
        guests slept back in the queue as they wake (`_sleeps_over`), and while steps run, looks every
        LONG_STEP_S for one that has run that long (`_admit_past_long_steps`)."""
        affinity.roam()  # deadlines must not wait for the home core's turn
        while True:
            with self._cond:
                job = self._expired()
                while job is None:
                    if self._closed:
                        return
                    self._admit_past_long_steps()
                    give_up = self._give_up_overdue()
                    self._sleeps_over()
                    next_due = min(self._deadlines[0][0] if self._deadlines else math.inf,
                                   self._alarms[0][0] if self._alarms else math.inf, give_up)
                    wait = next_due - time.monotonic() if next_due < math.inf else None
                    self._watching = bool(self._stepping_since)
                    if self._watching:
                        wait = LONG_STEP_S if wait is None else min(wait, LONG_STEP_S)
                    self._reaper_cond.wait(wait)
                    job = self._expired()
            self._step(job)

    def _set_aside(self, job: _Job, asleep: Asleep) -> None:
        """Its step left the guest of `job` asleep (see core/blocking.Asleep): no thread holds it until it
        wakes at `asleep.until`, or at once when the sleep is interrupted (self._cond held)."""
        if (self._closed or asleep.until <= time.monotonic()
                or not asleep.sleeper.wake_me(functools.partial(self._interrupted, job))):
            self._enqueue(job)  # over or interrupted already (or closing): its next step goes on (or closes it)
            return
        job.asleep_until, job.sleeper = asleep.until, asleep.sleeper
        self.asleep += 1
        heapq.heappush(self._alarms, (asleep.until, next(self._order), job))
        if self._alarms[0][2] is job:
            self._reaper_cond.notify()  # a new earliest wake

    def _back_from_sleep(self, job: _Job, early: bool = True) -> None:
        """Put `job`, set aside while its guest slept, back in the queue (urgently when its waiter went
        away: its call is abandoned); a no-op if it is not set aside (self._cond held). `early`: before its
        alarm (an interrupt), whose entry is left in `_alarms`, stale."""
        if job.asleep_until == math.inf:
            return
        job.asleep_until = math.inf
        self.asleep -= 1
        if early and len(self._alarms) > 2 * self.asleep + STALE_ALARMS:
            # A stale entry stays until its time (up to the call's deadline) and keeps the ended job, with what
            # it holds (its afterwards: the StoreManager of a component removed meanwhile). Measured: 500
            # sleepers (10-minute deadline) stopped and removed per cycle left 2,000 entries after 4 cycles.
            _drop_stale(self._alarms, lambda job: job.asleep_until)
        if job.sleeper is not None:
            job.sleeper.wake_me(None)
            job.sleeper = None
        if job.cancelled:
            job.finishing_sleep = True  # the interrupt that came with the cancel ended its sleep: it goes on first
            self._put(self._urgent, job)
            self._wake_one()
        else:
            self._enqueue(job)

    def _interrupted(self, job: _Job) -> None:
        """From the sleeper's interrupt (any thread): the sleep of `job` ends now."""
        with self._cond:
            self._back_from_sleep(job)

    def _sleeps_over(self) -> None:
        """Put the jobs whose guests' sleeps have ended back in the queue (self._cond held)."""
        alarms = self._alarms
        now = time.monotonic()
        while alarms and alarms[0][0] <= now:
            until, _, job = heapq.heappop(alarms)
            if job.asleep_until == until:
                self._back_from_sleep(job, early=False)

    def _admit_past_long_steps(self) -> None:
        """Count a step that has run LONG_STEP_S as computing, so that the calls waiting behind it get a
        thread (self._cond held). Such a step is outside Python (in guest code that does not yield, a
        WASI call), so a second thread running guest code costs it nothing. Once its thread is seen to
        wait rather than compute (`_waits`), it counts as a thread waiting in a host call: no longer one
        of the threads running guest code, and a thread is lent when none is idle. Before, two guests
        blocked on WASI pollables held both threads of a two-thread pool (or both `concurrency` places),
        and the echo beside them waited as long as they chose to sleep. Waits are looked for also while
        nothing is queued: a waiting step may be given up on (`_give_up_overdue`)."""
        now = time.monotonic()
        for job, since in list(self._stepping_since.items()):
            if now - since < LONG_STEP_S:
                continue
            if self._waits(job, now):
                del self._stepping_since[job]  # its worker takes the place back when the step ends
                self._blocked += 1
                self._waiting_steps.add(job)
            elif self._waiting and not job.computing and not self._admits():
                job.computing = True  # its worker takes the count back when the step ends
                self._count_computing(1)
        if self._waiting and self._admits():
            self._wake_one()
            self._lend_if_short()

    @staticmethod
    def _waits(job: _Job, now: float) -> bool:
        """Whether the thread running the long step of `job` has used less than WAITING_CPU_SHARE of a CPU
        over each of the last QUIET_LOOKS spans of at least LONG_STEP_S (the first look only takes a sample;
        a computing step is looked at again, as it may come to wait)."""
        try:
            used = time.clock_gettime(job.clock)
        except OSError:
            return False
        if job.sampled is None:
            job.sampled = (now, used, 0)
            return False
        at, before, quiet = job.sampled
        if now - at < LONG_STEP_S:
            return False
        quiet = quiet + 1 if used - before < WAITING_CPU_SHARE * (now - at) else 0
        job.sampled = (now, used, quiet)
        return quiet >= QUIET_LOOKS

    def _end_long_step(self, job: _Job) -> None:
        """The step of `job` is back in Python or over: its thread no longer counts as waiting (self._cond
        held)."""
        if job in self._waiting_steps:
            self._waiting_steps.discard(job)
            self._blocked -= 1

    def _give_up_overdue(self) -> float:
        """Give up on the jobs whose step waits in a WASI call (`_waiting_steps`) past their `give_up_at`: their
        waiters get CallGivenUp at once, and the thread closes the job at its next step, once the wait is
        over (self._cond held; ordered before that close, which is only scheduled once it sees
        `cancelled`). Returns the earliest give-up time still to come (math.inf: none)."""
        now = time.monotonic()
        earliest = math.inf
        for job in self._waiting_steps:
            if job.give_up_at is None or job.cancelled:
                continue
            if not job.locked and job.lock not in self._given_up_locks:
                # It waits for its Store's lock, held by a call not given up on (yet): not its own call's wait.
                earliest = min(earliest, now + LONG_STEP_S)  # looked at again, as that call may be given up on
                continue
            at = job.give_up_at()
            if at > now:
                earliest = min(earliest, at)
                continue
            job.cancelled = True  # its next step closes it (see _step): the call never goes on
            if job.locked and job.lock is not None:
                self._given_up_locks.add(job.lock)  # a step waiting for it will wait as long: given up on too
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting any more
                job.loop.call_soon_threadsafe(_given_up, job)
        return earliest

    def _step(self, job: _Job) -> None:
        """Run one step of `job` holding its lock; put it back or hand its result to its waiter."""
        value: Any = None
        error: BaseException | None = None
        with job.lock if job.lock is not None else contextlib.nullcontext():
            job.locked = True
            finishing_sleep, job.finishing_sleep = job.finishing_sleep, False
            try:
                if (job.cancelled and not finishing_sleep) or self._closed:
                    job.heap_deadline = math.inf
                    if job.steps is not None:
                        job.steps.close()  # abandons the call in progress: the Store is never left mid-call
                    with contextlib.suppress(RuntimeError):  # (a closed pool cancels what it will not run)
                        job.loop.call_soon_threadsafe(_resolve, job, None, None, True)
                    return
                if job.steps is None:
                    assert job.fn is not None
                    value = job.fn()
                else:
                    job.begun = True
                    while True:
                        job.deadline = step = next(job.steps)
                        if not isinstance(step, Asleep):  # a step that left its guest asleep used no slice
                            job.slices += 1
                        else:
                            job.wakes += 1
                        with self._cond:
                            if job in self._waiting_steps:  # its wait is over: it is one of the threads stepping again
                                self._end_long_step(job)
                                self._stepping_since[job] = time.monotonic()
                                job.sampled = None
                            if job.cancelled:
                                self._put(self._urgent, job)
                                self._wake_one()
                                return
                            if isinstance(step, Asleep):
                                self._set_aside(job, step)  # this thread goes on to other work
                                return
                            if self._waiting or self._closed:
                                self._enqueue(job)
                                return
                        # Nobody is waiting for a thread: keep this one (and the Store's lock) for
                        # the next slice rather than pay for a trip through the queue.
            except StopIteration as stop:
                value = stop.value
            except BaseException as exc:
                error = exc
            finally:
                job.locked = False
                if job.cancelled and job.lock is not None:
                    with self._cond:
                        self._given_up_locks.discard(job.lock)  # let go of: nobody holds it for a given-up job
        job.heap_deadline = math.inf  # ended: its deadline entry, if any, is stale
        # The pool's own threads, not anyio's: anyio has no thread-to-loop wakeup that does not block the thread
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting any more
            job.loop.call_soon_threadsafe(_resolve, job, value, error)
        if job.afterwards is not None:
            job.afterwards()

    async def _until_released(self, job: _Job) -> None:
        """Wait, whatever cancels the caller meanwhile, until no thread touches `job` any more: at most
        one slice, or the host call the guest is in (its waits end early once interrupted), unless
        `stop_waiting` gives up on it first."""
        job.released = released = job.loop.create_future()
        self._release_waits[released] = job
        try:
            while not released.done():
                try:
                    with anyio.CancelScope(shield=True):  # no re-delivered cancellation (a spin) meanwhile
                        await asyncio.shield(released)
                except asyncio.CancelledError:
                    continue  # cancelled again (natively): the thread still has the Store; keep waiting
        finally:
            self._release_waits.pop(released, None)

    def stop_waiting(self, lock: threading.Lock) -> list[asyncio.Future[None]]:
        """On the loop: end the waits of cancelled waiters for threads still running their calls on the
        Store guarded by `lock`. For a stop whose time is over: a guest blocked in a WASI call (a
        pollable, a blocked write) keeps its thread and Store for as long as it asked, which neither its
        deadline nor an interrupt can shorten, and the actor waiting for it could neither end, start again
        nor let the supervisor (and the daemon) exit. The thread keeps the Store (see
        `StoreManager.in_call`) and ends the call when the guest wakes. Not a thread in one of our host
        calls (a storage write ends within its own bound, and its message is answered then). Returns, for
        each, a future set once its thread lets go of the job (never, if the guest waits forever)."""
        jobs = [(released, job) for released, job in self._release_waits.items()
                if job.lock is lock and not job.in_host_call and not released.done()]
        left = []
        for released, job in jobs:
            released.set_result(None)
            job.released = left_go = job.loop.create_future()  # set by _resolve once the thread lets go
            left.append(left_go)
        return left

    def close(self) -> None:
        """Stop accepting work; queued calls are abandoned, then the threads end."""
        with self._cond:
            self._closed = True
            for _, _, job in list(self._alarms):
                self._back_from_sleep(job)  # calls set aside asleep are abandoned too
            self._alarms.clear()
            for sleeper in self._sleepers:
                sleeper.notify()
            self._sleepers.clear()
            self._reaper_cond.notify_all()

