"""The router's remote path with real guests and a real router; the lattice itself is a test double of our own
RemotePort protocol here (recording what would be published), so that cancel and late answers can be driven
exactly. The real link is tested end to end in test_lattice.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio
import pytest

from tests.conftest import fixture_path
from tests.support import plain_supervisor
from wasmhost.actors.actor import ComponentActor
from wasmhost.actors.spec import ActorSpec
from wasmhost.actors.supervisor import Supervisor
from wasmhost.core.errors import MessagingError
from wasmhost.core.ids import ComponentId
from wasmhost.runtime.runtime import Runtime
from wasmhost.security.capabilities import CapabilityChecker

pytestmark = pytest.mark.anyio

FAR = ComponentId("t", "far", "0")


@dataclass
class RecordingRemote:
    """RemotePort double: knows FAR; records requests; `down` makes every check fail fast."""

    down: str = ""
    requests: list[tuple[ComponentId, ComponentId, bytes, str]] = field(default_factory=list)
    sent: list[tuple[ComponentId, ComponentId, bytes]] = field(default_factory=list)

    def check(self, target: ComponentId, size: int) -> None:
        if self.down:
            raise MessagingError("delivery-failed", self.down)
        if target != FAR:
            raise MessagingError("target-not-found", target)

    def send(self, sender: ComponentId, target: ComponentId, payload: bytes, action: str = "send") -> None:
        self.sent.append((sender, target, payload))

    def request(self, sender: ComponentId, target: ComponentId, payload: bytes, correlation_id: str,
                timeout_ms: int) -> None:
        self.requests.append((sender, target, payload, correlation_id))

    async def host_request(self, target: ComponentId, payload: bytes, timeout: float) -> bytes | None:
        raise AssertionError("not used")

    async def host_send(self, target: ComponentId, payload: bytes, timeout: float) -> None:
        raise AssertionError("not used")

    def local_changed(self) -> None:
        pass

    def forget(self, correlation_id: str) -> None:
        pass


@pytest.fixture
async def supervisor(runtime: Runtime) -> AsyncIterator[Supervisor]:
    async with plain_supervisor(runtime) as sup:
        yield sup


async def caller(sup: Supervisor) -> ComponentActor:
    cid = ComponentId("t", "caller", "0")
    loaded = sup.stores.runtime.load(cid, fixture_path("callback"))
    return await sup.start(ActorSpec(cid, health_interval=3600.0), loaded)


async def ask(sup: Supervisor, actor: ComponentActor, what: bytes) -> bytes | None:
    return await sup.router.host_request(actor.component_id, what, 5.0)


async def test_a_cancelled_remote_request_gets_no_callback_and_its_late_answer_is_dropped(
        supervisor: Supervisor) -> None:
    remote = RecordingRemote()
    supervisor.router.remote = remote
    actor = await caller(supervisor)
    first = (await ask(supervisor, actor, b"t|far|0|one") or b"").decode()
    assert [r[3] for r in remote.requests] == [first] and remote.requests[0][2] == b"one"
    supervisor.router.cancel_request(actor.component_id, first)  # what the guest's cancel-request does
    assert not supervisor.router.complete_remote(first, b"too late")
    assert supervisor.router.late_responses == 1
    second = (await ask(supervisor, actor, b"t|far|0|two") or b"").decode()
    assert supervisor.router.complete_remote(second, b"answer")
    with anyio.fail_after(10):
        while await ask(supervisor, actor, b"?callbacks") != b"1":
            await anyio.sleep(0.005)
    assert await ask(supervisor, actor, b"?last-payload") == b"answer"
    assert await ask(supervisor, actor, b"?last-sender") == b"t/far/0"
    assert await ask(supervisor, actor, b"?last-correlation") == second.encode()


async def test_remote_targets_fail_fast_when_the_lattice_says_so(supervisor: Supervisor) -> None:
    remote = RecordingRemote(down="the lattice is unreachable: connection refused")
    supervisor.router.remote = remote
    actor = await caller(supervisor)
    with pytest.raises(Exception, match="request failed: delivery-failed"):
        await ask(supervisor, actor, b"t|far|0|one")
    remote.down = ""
    with pytest.raises(Exception, match="request failed: target-not-found"):
        await ask(supervisor, actor, b"t|nowhere|0|one")
    assert remote.requests == []
    assert supervisor.router.pending_target("anything") is None


async def test_only_denials_of_targets_that_exist_somewhere_are_audited(supervisor: Supervisor) -> None:
    supervisor.router.remote = RecordingRemote()
    checker = supervisor.router.permissions = CapabilityChecker()  # the caller is granted nothing
    actor = await caller(supervisor)
    with pytest.raises(Exception, match="request failed: target-not-found"):
        await ask(supervisor, actor, b"t|nowhere|0|one")
    assert checker.audit.denials() == 0  # an unknown id is not worth a line in the audit log
    with pytest.raises(Exception, match="request failed: delivery-failed"):
        await ask(supervisor, actor, b"t|far|0|one")
    assert checker.audit.denials(actor.component_id) == 1
