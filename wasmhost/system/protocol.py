"""Control socket frames: a 4-byte big-endian length, then a msgpack request or response (msgspec)."""

from __future__ import annotations

import struct
from typing import Annotated, Any, get_args

import msgspec

from wasmhost.core.message_size import MAX_MESSAGE_BYTES_CEILING

FRAME_OVERHEAD = 64 * 1024
"""Room in a request frame for everything but the payload (id, tags, msgpack headers)."""
MAX_FRAME = MAX_MESSAGE_BYTES_CEILING + FRAME_OVERHEAD
"""Largest request frame the daemon reads: follows from the largest `max_message_bytes` a config may
set, so a client cannot make the daemon buffer more than one maximal message per connection."""
MAX_RESPONSE_FRAME = 32 * 1024 * 1024
"""Largest response frame (the status table of many thousands of components is the big one)."""

LENGTH = struct.Struct(">I")

MAX_TIMEOUT = 86400.0
"""Longest `timeout` a `send` or `call` may ask for (a day)."""
Timeout = Annotated[float, msgspec.Meta(gt=0, le=MAX_TIMEOUT)]
"""Seconds above 0, at most MAX_TIMEOUT: checked as the request is decoded, so a NaN, negative or
infinite timeout is a `malformed request` naming `$.timeout`. Before, a NaN `call` was queued and
then failed as `internal error: ValueError: cannot convert float NaN to integer` (a traceback logged
for each), and a negative one was answered as if the component had timed out handling it."""


class Status(msgspec.Struct, tag="status", forbid_unknown_fields=True):
    """Ask for the table of components, or for the row of one (`id`) with its texts whole."""

    id: str | None = None


class Send(msgspec.Struct, tag="send", forbid_unknown_fields=True):
    """Send a payload to a component (no reply)."""

    id: str
    payload: bytes
    wait: bool = True
    timeout: Timeout = 30.0
    """Seconds to wait for mailbox room; then it fails with `timeout` and nothing was queued."""


class Call(msgspec.Struct, tag="call", forbid_unknown_fields=True):
    """Request-response with a component."""

    id: str
    payload: bytes
    timeout: Timeout = 30.0
    """Seconds for the whole call: mailbox room, then the reply."""
    verbose: bool = False
    """Whether a failure's full text (a guest's wasm backtrace) comes back as `data`."""


class Reload(msgspec.Struct, tag="reload", forbid_unknown_fields=True):
    """Re-read the configuration and apply the difference."""


class Stop(msgspec.Struct, tag="stop", forbid_unknown_fields=True):
    """Stop one component."""

    id: str


class Start(msgspec.Struct, tag="start", forbid_unknown_fields=True):
    """Start one stopped or failed component."""

    id: str


class Restart(msgspec.Struct, tag="restart", forbid_unknown_fields=True):
    """Restart one component with a fresh instance."""

    id: str


class Forensics(msgspec.Struct, tag="forensics", forbid_unknown_fields=True):
    """Ask for one component's last failures and recently handled messages (actors/forensics.py)."""

    id: str


class LatticeStatus(msgspec.Struct, tag="lattice-status", forbid_unknown_fields=True):
    """Ask for the lattice as this daemon's directory sees it: every host and where each component runs
    (answered with a LatticeView; an error when the daemon has no [lattice])."""


Request = Status | Send | Call | Reload | Stop | Start | Restart | Forensics | LatticeStatus
REQUEST_TYPES = tuple(str(kind.__struct_config__.tag) for kind in get_args(Request))
"""The `type` tag of each request, as a client must spell it (named in the answer to an unknown one)."""


class StatusRow(msgspec.Struct, gc=False):
    """One component in a `status` answer; sent as a map with these keys (the client reads it as a dict).
    A struct, not a dict, because 10,000 of them are built on the event loop per `status` (2-3x faster
    to build and encode); `gc=False`: it holds only strings and numbers, never a cycle."""

    id: str
    state: str
    phase: str | None
    health: str | None
    restarts: int
    mailbox: int
    queued: int
    in_hand: int
    handled: int
    failed: int
    last_error: str | None
    rollout: str | None
    latency_p50_ms: float | None = None
    """Median handling time of a message since the component was deployed (None before the first)."""
    latency_p99_ms: float | None = None
    """99th percentile of the same."""
    memory_bytes: int | None = None
    """Its linear memories' size now, as of its last guest call (None unless `[host] memory_accounting`)."""
    memory_high_water_bytes: int | None = None
    """The most they have held at once since this version started (None likewise)."""


class LatticeHostRow(msgspec.Struct):
    """One host in a `lattice-status` answer."""

    host: str
    local: bool
    """Whether this is the answering daemon itself."""
    last_seen_s: float | None
    """Seconds since its last heartbeat arrived (None for the local host)."""
    components: int
    """Components it runs (its inventory's size)."""


class LatticeComponentRow(msgspec.Struct):
    """One component on one host in a `lattice-status` answer (a component with replicas has a row per host)."""

    id: str
    host: str
    state: str
    health: str | None
    accepts_external: bool


class LatticeView(msgspec.Struct):
    """The answer's data to `lattice-status` (sent as maps; the client reads dicts)."""

    lattice: str
    """The lattice name (subject prefix wasmhost.NAME)."""
    host: str
    """The answering daemon's host id."""
    connected: bool
    """Whether the daemon is connected to NATS right now."""
    url: str
    """The NATS server it is connected to ("" when not connected)."""
    cause: str
    """Why it is not connected ("" when it is)."""
    hosts: list[LatticeHostRow]
    components: list[LatticeComponentRow]
    remote_requests: int = 0
    """This host's requests waiting on a known other host (ended at once when that host leaves)."""


class Response(msgspec.Struct, forbid_unknown_fields=True):
    """The answer to one request: `ok` with `data`, or an `error` text."""

    ok: bool
    error: str | None = None
    data: Any = None


_encoder = msgspec.msgpack.Encoder()
request_decoder = msgspec.msgpack.Decoder(Request)
response_decoder = msgspec.msgpack.Decoder(Response)


class FrameError(Exception):
    """A frame that is too large or cannot be decoded."""


def frame(message: msgspec.Struct, limit: int = MAX_FRAME) -> bytes:
    """Encode `message` with its length prefix (requests: MAX_FRAME; responses: MAX_RESPONSE_FRAME)."""
    body = _encoder.encode(message)
    if len(body) > limit:
        raise FrameError(f"frame of {len(body)} bytes exceeds the limit of {limit}")
    return LENGTH.pack(len(body)) + body


def frame_length(header: bytes, limit: int = MAX_FRAME) -> int:
    """The body length announced by a 4-byte header (raises FrameError when above `limit`)."""
    (length,) = LENGTH.unpack(header)
    if length > limit:
        raise FrameError(f"frame of {length} bytes exceeds the limit of {limit}")
    return int(length)
