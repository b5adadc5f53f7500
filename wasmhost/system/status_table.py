"""The rows of `wasmhost status`, each encoded once and kept until its component changes.

Building 10,000 rows for every `status` meant reading every actor's fields, scattered over the heap
(30-50 ms on a busy machine, on the event loop). The table keeps each row encoded (msgpack, sent as
is inside the answer) and rebuilds only the rows of actors noted in the supervisor's queue of
changes (actors/changes.py) and of actors whose mailbox is not empty (its length changes without a
note while it has messages); the whole table is rebuilt when the set of deployments changed. So a
`status` costs a copy of the list plus the rows that changed, and is still exact: every field a row
shows notes its actor when it changes. The memory figures are the exception: they change inside guest
calls, on worker threads, and are read when the row is rebuilt, which every message batch and state
change causes; so they are as of the component's last message (a health check may have grown it since).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol, TypeVar

import msgspec

from wasmhost.actors.actor import ComponentActor
from wasmhost.actors.changes import StatusChanges
from wasmhost.actors.state import ActorState
from wasmhost.core.ids import ComponentId
from wasmhost.system.protocol import StatusRow


class Listed(Protocol):
    """A deployment, as its row sees it."""

    @property
    def load_error(self) -> str | None:
        """Why it could not be loaded, if it could not."""

    @property
    def rollout(self) -> str | None:
        """What the last reload did to its version."""


D = TypeVar("D", bound=Listed)


class Deployments(dict[ComponentId, D]):
    """The daemon's deployments by component, in start order; `version` changes with every change of the
    mapping (a deployment added, replaced or removed), so the status table knows to lay itself out again."""

    version = 0

    def __setitem__(self, key: ComponentId, value: D) -> None:
        self.version += 1
        super().__setitem__(key, value)

    def __delitem__(self, key: ComponentId) -> None:
        self.version += 1
        super().__delitem__(key)

    def pop(self, key: ComponentId, *default: D | None) -> D | None:  # type: ignore[override]
        """Remove and return the deployment of `key` (or `default`)."""
        self.version += 1
        return super().pop(key, *default)

    def clear(self) -> None:
        """Remove every deployment."""
        self.version += 1
        super().clear()

    def popitem(self) -> tuple[ComponentId, D]:
        """Remove and return the last deployment."""
        self.version += 1
        return super().popitem()

    def setdefault(self, key: ComponentId, default: D) -> D:  # type: ignore[override]
        """The deployment of `key`, adding `default` if there is none."""
        self.version += 1
        return super().setdefault(key, default)

    def update(self, *args: object, **kwargs: D) -> None:  # type: ignore[override]
        """Add or replace several deployments."""
        self.version += 1
        super().update(*args, **kwargs)  # type: ignore[call-overload]


def status_row(cid: ComponentId, deployment: Listed, actor: ComponentActor | None) -> StatusRow:
    """The row of one configured component (`actor` None: it never got an actor, it failed to load)."""
    if actor is None:
        return StatusRow(str(cid), "failed", None, None, 0, 0, 0, 0, 0, 0, deployment.load_error, deployment.rollout)
    stats = actor.stats
    state = actor.state
    queued = len(actor.mailbox)
    in_hand = actor.in_hand
    manager = actor.manager_or_none
    memory = None if manager is None else manager.memory
    # health is the last answer of a live instance: none to show while it is not running
    return StatusRow(actor.name, state.value, actor.phase,
                     actor.health.value if state is ActorState.RUNNING else None, stats.restarts, queued + in_hand,
                     queued, in_hand, stats.handled, stats.failed, stats.last_error, deployment.rollout,
                     *stats.latency.p50_p99_ms(), *(memory.figures() if memory is not None else (None, None)))


MAX_SHORT_ERROR_CHARS = 512
"""Characters kept of an error's first line in a status answer that had to be shortened (see `fit`)."""


def _first_line(text: str | None) -> str | None:
    if text is None:
        return None
    lines = text.strip().splitlines() or [""]
    first = lines[0][:MAX_SHORT_ERROR_CHARS]
    return first if first == text else f"{first} ... (cut to fit every component's row: `wasmhost inspect ID` " \
        "shows it whole)"


def fit(rows: list[msgspec.Raw], budget: int) -> list[msgspec.Raw]:
    """`rows`, or, when they take more than `budget` bytes, the same rows with each `last_error` and `rollout`
    cut to its first line. Each is bounded (bounded_text.py: some 11 KB for a long backtrace), but not their
    sum: 3,200 components failing with one binary's long backtrace made a 35.5 MB answer, over the control
    socket's frame limit, and `status`, `top` and `inspect` of any component failed for good."""
    if sum(len(row) for row in rows) <= budget:
        return rows
    decode, encode = msgspec.msgpack.Decoder(StatusRow).decode, msgspec.msgpack.Encoder().encode
    short = []
    for raw in rows:
        row = decode(raw)
        row.last_error, row.rollout = _first_line(row.last_error), _first_line(row.rollout)
        short.append(msgspec.Raw(encode(row)))
    return short


class StatusTable:
    """Encoded `status` rows of `deployments` (see the module docstring); event loop only."""

    def __init__(self, deployments: Deployments[D], actors: Mapping[ComponentId, ComponentActor],
                 changes: StatusChanges[ComponentActor]) -> None:
        self._deployments = deployments
        self._actors = actors
        self._changes = changes
        self._encode = msgspec.msgpack.Encoder().encode
        self._version = -1  # of the deployments the rows were laid out for
        self._rows: list[msgspec.Raw] = []
        self._index: dict[ComponentId, int] = {}
        self._busy: set[ComponentActor] = set()  # noted actors whose mailbox was not empty when last read

    def rows(self) -> list[msgspec.Raw]:
        """Every row, in start order, as of now."""
        changed = self._changes.take()  # first: whatever changes from here on is noted again
        if self._version != self._deployments.version:
            self._lay_out()
        else:
            self._refresh(changed)
        return list(self._rows)  # a copy: later changes do not reach an answer not yet sent

    def row(self, cid: ComponentId) -> msgspec.Raw | None:
        """The row of `cid` as of now, whole (`wasmhost inspect ID`), or None when it is not configured."""
        rows = self.rows()
        position = self._index.get(cid)
        return None if position is None else rows[position]

    def _lay_out(self) -> None:
        version = self._deployments.version
        actors = self._actors
        encode = self._encode
        rows: list[msgspec.Raw] = []
        index: dict[ComponentId, int] = {}
        busy: set[ComponentActor] = set()
        for cid, deployment in self._deployments.items():
            actor = actors.get(cid)
            index[cid] = len(rows)
            rows.append(msgspec.Raw(encode(status_row(cid, deployment, actor))))
            if actor is not None and len(actor.mailbox):
                busy.add(actor)
        self._version, self._rows, self._index, self._busy = version, rows, index, busy

    def _refresh(self, changed: Iterable[ComponentActor]) -> None:
        busy = self._busy
        busy.update(changed)
        deployments, actors, index, rows = self._deployments, self._actors, self._index, self._rows
        encode = self._encode
        for actor in list(busy):
            cid = actor.component_id
            current = actors.get(cid)
            position = index.get(cid)
            if current is not actor or position is None:  # removed or replaced (its successor is noted itself)
                busy.discard(actor)
                if position is not None and current is None:  # no actor any more: listed as failed to load
                    rows[position] = msgspec.Raw(encode(status_row(cid, deployments[cid], None)))
                continue
            rows[position] = msgspec.Raw(encode(status_row(cid, deployments[cid], actor)))
            if not len(actor.mailbox):  # its queue stays empty until `on_filled` notes it again
                busy.discard(actor)
