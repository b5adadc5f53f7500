"""Guest-to-guest traffic with real components (the pinger fixture): request chains, send rings,
per-sender order when a batch's sends wake their targets together, and request deadlines on one timer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import anyio
import pytest

from tests.conftest import fixture_path
from tests.support import plain_supervisor
from wasmhost.actors.actor import ComponentActor
from wasmhost.actors.spec import ActorSpec
from wasmhost.actors.supervisor import Supervisor
from wasmhost.core import ComponentId, ComponentMessage, MessageMetadata, Timestamp
from wasmhost.core.ids import HOST_ID
from wasmhost.messaging.deadlines import COMPACT_AFTER, RequestDeadlines
from wasmhost.messaging.envelope import Envelope
from wasmhost.messaging.outcome import RequestFailed
from wasmhost.runtime.host_fn import HOST_FUNCTIONS
from wasmhost.runtime.id_converter import CACHED_IDS, ComponentIdConverter
from wasmhost.runtime.runtime import Runtime

pytestmark = pytest.mark.anyio


@pytest.fixture
async def supervisor(runtime: Runtime) -> AsyncIterator[Supervisor]:
    async with plain_supervisor(runtime) as sup:
        yield sup


async def launch(sup: Supervisor, fixture: str, name: str) -> ComponentActor:
    cid = ComponentId("test-org", name, "0")
    # no health checks meanwhile: they would wake an actor that a lost wake-up left waiting
    spec = ActorSpec(cid, health_interval=3600.0)
    return await sup.start(spec, sup.stores.runtime.load(cid, fixture_path(fixture)))


def address(actor: ComponentActor) -> str:
    return "|".join((actor.component_id.namespace, actor.component_id.name, actor.component_id.instance))


async def query(sup: Supervisor, actor: ComponentActor, what: bytes) -> bytes | None:
    return await sup.router.host_request(actor.component_id, what, 5.0)


async def settle(sup: Supervisor, actor: ComponentActor, what: bytes, expected: bytes) -> None:
    """Wait (bounded) until `actor` answers `what` with `expected`."""
    with anyio.fail_after(10):
        while await query(sup, actor, what) != expected:
            await asyncio.sleep(0.005)


async def test_request_chains_between_guests_make_every_round_trip(supervisor: Supervisor) -> None:
    echo = await launch(supervisor, "echo", "echo")
    pinger = await launch(supervisor, "pinger", "pinger")
    for _ in range(4):  # four chains of 25 round trips each, running at once
        assert await query(supervisor, pinger, f"{address(echo)}|25".encode())
    await settle(supervisor, pinger, b"?callbacks", b"100")
    assert echo.stats.handled == 100
    assert await query(supervisor, pinger, b"?failures") == b"0"


async def test_a_token_goes_around_a_ring_of_guest_sends(supervisor: Supervisor) -> None:
    a = await launch(supervisor, "pinger", "a")
    b = await launch(supervisor, "pinger", "b")
    await supervisor.router.host_send(a.component_id, f">9;{address(b)};{address(a)}".encode())
    await settle(supervisor, b, b"?relayed", b"5")
    assert await query(supervisor, a, b"?log") == b"97531"
    assert await query(supervisor, b, b"?log") == b"86420"
    assert await query(supervisor, a, b"?failures") == await query(supervisor, b, b"?failures") == b"0"


async def test_a_batch_of_guest_sends_arrives_in_the_order_sent(supervisor: Supervisor) -> None:
    # A handles the host's nine messages (mostly in one batch) and sends one to B for each: those
    # sends wake B together, after or during A's batch; B must still see them in A's order.
    a = await launch(supervisor, "pinger", "a")
    b = await launch(supervisor, "pinger", "b")
    echo = await launch(supervisor, "echo", "echo")
    for hops in range(1, 10):
        await supervisor.router.host_send(a.component_id, f">{hops};{address(b)};{address(echo)}".encode())
    await settle(supervisor, b, b"?relayed", b"9")
    assert await query(supervisor, a, b"?log") == b"123456789"
    assert await query(supervisor, b, b"?log") == b"012345678"


async def test_request_deadlines_expire_in_deadline_order_from_one_timer() -> None:
    expired: list[str] = []
    all_due = anyio.Event()

    def expire(correlation_id: str) -> None:
        expired.append(correlation_id)
        if len(expired) == 3:
            all_due.set()

    deadlines = RequestDeadlines(asyncio.get_running_loop(), expire)
    # From a worker thread, as guests add them; the later ones are due earlier and re-arm the timer.
    await asyncio.to_thread(deadlines.add, "late", 0.3)
    await asyncio.to_thread(deadlines.add, "answered", 0.01)
    await asyncio.to_thread(deadlines.add, "early", 0.02)
    await asyncio.to_thread(deadlines.add, "middle", 0.1)
    deadlines.discard("answered")
    with anyio.fail_after(10):
        await all_due.wait()
    assert expired == ["early", "middle", "late"]
    assert len(deadlines) == 0
    deadlines.close()


async def test_answered_requests_do_not_pile_up_in_the_deadline_heap() -> None:
    expired: list[str] = []
    due = anyio.Event()

    def expire(correlation_id: str) -> None:
        expired.append(correlation_id)
        due.set()

    deadlines = RequestDeadlines(asyncio.get_running_loop(), expire)
    deadlines.add("kept", 0.05)
    for n in range(4 * COMPACT_AFTER):
        deadlines.add(f"answered-{n}", 3600)
        deadlines.discard(f"answered-{n}")
    assert len(deadlines._heap) <= COMPACT_AFTER + 1  # rebuilt without the answered ones (white box)
    with anyio.fail_after(10):
        await due.wait()
    assert expired == ["kept"]
    deadlines.close()


async def test_a_send_is_delivered_while_its_sender_waits_in_a_host_call(supervisor: Supervisor) -> None:
    # A's batch: relay to B, then sleep 5 s in a host call. B gets the message during the sleep, not
    # only once A's batch ends (its wake-up is not held back until then).
    a = await launch(supervisor, "pinger", "a")
    b = await launch(supervisor, "pinger", "b")
    echo = await launch(supervisor, "echo", "echo")
    reply: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
    # both queued before A's task runs again, so that it takes them as one batch
    for payload, future in ((f">1;{address(b)};{address(echo)}".encode(), None), (b"z5000", reply)):
        assert a.mailbox.offer(Envelope(message(payload), reply_future=future))
    with anyio.fail_after(30):  # watched without messaging B: a message would wake it
        while not b.stats.handled:
            await asyncio.sleep(0.005)
    assert not reply.done()
    assert await query(supervisor, b, b"?relayed") == b"1"
    with anyio.fail_after(30):
        assert await reply is None


def message(payload: bytes) -> ComponentMessage:
    return ComponentMessage(HOST_ID, payload, MessageMetadata(timestamp=Timestamp.now()))


async def test_a_send_to_an_invalid_id_fails_every_time_and_valid_ids_still_arrive(supervisor: Supervisor) -> None:
    """Target ids go through a cache (runtime/id_converter.py): an invalid one is never cached."""
    a = await launch(supervisor, "pinger", "a")
    b = await launch(supervisor, "pinger", "b")
    for _ in range(3):
        with pytest.raises(RequestFailed, match="send failed: case 2"):  # invalid-message
            await query(supervisor, a, b">1;bad/ns|x|0")
    for _ in range(3):
        await supervisor.router.host_send(a.component_id, f">1;{address(b)}".encode())
    await settle(supervisor, b, b"?relayed", b"3")
    assert await query(supervisor, a, b"?failures") == b"3"


async def test_a_guest_naming_ever_new_targets_keeps_the_id_cache_bounded(supervisor: Supervisor) -> None:
    """A hostile guest sends to more distinct ids than the cache holds; every send is answered
    (target-not-found), the cache stays within CACHED_IDS, and an echo beside it keeps answering."""
    hostile = await launch(supervisor, "pinger", "hostile")
    echo = await launch(supervisor, "echo", "echo")
    sends = CACHED_IDS + 10
    for i in range(sends):
        await supervisor.router.host_send(hostile.component_id, b">1;ghost|t%d|0" % i, wait=True, timeout=10.0)
        if i % 1000 == 0:
            assert await query(supervisor, echo, b"still here %d" % i) == b"still here %d" % i
    await settle(supervisor, hostile, b"?failures", str(sends).encode())  # each one failed, none lost
    send = next(fn for fn in HOST_FUNCTIONS if fn.name == "send")
    converter = (send.params or [None])[0]
    assert isinstance(converter, ComponentIdConverter)
    assert 0 < converter.cached <= CACHED_IDS
    assert await query(supervisor, echo, b"after") == b"after"


async def test_a_stopping_requester_still_gets_the_callbacks_of_its_requests(supervisor: Supervisor) -> None:
    """A stop drains the queue: a reply that arrives meanwhile is handled as a callback, not dropped."""
    busy = await launch(supervisor, "busy", "busy")
    pinger = await launch(supervisor, "pinger", "pinger")
    await supervisor.router.host_send(busy.component_id, b"50000000")  # busy for a while: the request waits
    await supervisor.router.host_send(pinger.component_id, f"{address(busy)}|1".encode())  # one request, no chain
    await supervisor.router.host_send(pinger.component_id, b"z1500")  # then it sleeps: the reply waits in its queue
    with anyio.fail_after(10):
        while supervisor.router.pending_by_requester().get(pinger.component_id) != 1:
            await asyncio.sleep(0.002)
    await supervisor.stop(pinger.component_id, 10.0)  # the mailbox is sealed at once, then drained
    assert busy.stats.handled == 2  # the long job, then the request: answered while the pinger was stopping
    assert pinger.stats.handled == 3 and supervisor.router.pending_by_requester() == {}  # the callback too


async def test_a_request_whose_deadline_passes_while_it_is_queued_ends_with_one_outcome(
        supervisor: Supervisor, monkeypatch: pytest.MonkeyPatch) -> None:
    """Our router's logic, with the race placed by hand: the request's deadline fires while it is being
    queued and the target's mailbox turns out full. The guest gets its id and one `timeout` callback,
    not an error as well."""
    echo = await launch(supervisor, "echo", "echo")
    pinger = await launch(supervisor, "pinger", "pinger")
    router = supervisor.router

    def deadline_then_full(envelope: Envelope) -> bool:
        assert envelope.correlation_id is not None
        router._expire(envelope.correlation_id)  # the loop's timer, had it run just now
        return False

    monkeypatch.setattr(echo.mailbox, "offer", deadline_then_full)
    correlation_id = router.request(pinger.component_id, echo.component_id, b"7", 5)
    await settle(supervisor, pinger, b"?callbacks", b"1")
    assert correlation_id and await query(supervisor, pinger, b"?failures") == b"0"
    assert router.pending_by_requester() == {}


async def test_a_request_cancelled_once_its_answer_is_on_the_way_gets_no_callback(supervisor: Supervisor) -> None:
    """The guest's cancel comes after the echo answered but before the guest handled that callback (it
    was busy with a large message): the cancel succeeds and the callback is never delivered."""
    echo = await launch(supervisor, "echo", "echo")
    guest = await launch(supervisor, "callback", "callback")
    prefix, number = supervisor.router.new_correlation_id().rsplit("-", 1)
    first = f"{prefix}-{int(number) + 1}"  # the id of the guest's next request
    send = supervisor.router.host_send
    await send(guest.component_id, f"{address(echo)}|ping".encode())  # requests from echo, which answers at once
    await send(guest.component_id, b"test-org|nobody|0|" + b"x" * 900_000)  # a while to convert: the answer queues
    assert await query(supervisor, guest, f"!{first}".encode()) == b"cancelled"
    assert await query(supervisor, guest, b"?callbacks") == b"0"
    assert echo.stats.handled == 1 and supervisor.router.pending_by_requester() == {}
