"""The lattice's subjects and wire format: the one place that encodes them both ways.

Prefix P = `wasmhost.<lattice name>`. A component id `ns/name/inst` becomes three subject tokens, each part
percent-encoded so that it holds no '.', '*', '>', whitespace or '%' (`%2E`, `%2A`, `%3E`, `%20`, ... `%25`):

- `P.msg.<ns>.<name>.<inst>`  one message from another host to a component (queue group = the subject: one
                              replica takes it)
- `P.in.<ns>.<name>.<inst>`   one message from a plain NATS client to a component (likewise): kept apart from
                              `P.msg.`, so that NATS permissions can let clients publish here and only here
- `P.hb.<host>`               a host's heartbeat (Heartbeat, msgspec JSON)
- `P.inv.<host>`              request/reply: the host's inventory (Inventory, msgspec JSON)
- `P.re.<host>.<id>`          answers to the requests a host's components made (one wildcard subscription)
- `P.inbox.<host>.…`          the host's nats-py inboxes: answers to its inventory requests

Headers of a message: Wasmhost-Kind (send|request|broadcast), Wasmhost-Sender, Wasmhost-Sender-Host (required on
`P.msg.`, ignored on `P.in.`), Wasmhost-Correlation-Id, Wasmhost-Timeout-Ms, Wasmhost-Ack, Content-Type. Headers of
an answer: Wasmhost-Outcome (reply|no-reply|failed|timeout|target-stopped|queued|rejected), Wasmhost-Detail (one line),
Wasmhost-Error (the messaging-error case, for `rejected`), Wasmhost-Host (the host that answered),
Wasmhost-Target (the component it was for, on `rejected`), Wasmhost-Heartbeat (on `queued`).
"""

from __future__ import annotations

import re
from typing import Annotated
from urllib.parse import unquote

import msgspec

from wasmhost.core.ids import ComponentId, InvalidComponentId

KIND = "Wasmhost-Kind"
SENDER = "Wasmhost-Sender"
SENDER_HOST = "Wasmhost-Sender-Host"
CORRELATION = "Wasmhost-Correlation-Id"
TIMEOUT_MS = "Wasmhost-Timeout-Ms"
CONTENT_TYPE = "Content-Type"
OUTCOME = "Wasmhost-Outcome"
DETAIL = "Wasmhost-Detail"
ERROR = "Wasmhost-Error"
HOST = "Wasmhost-Host"
TARGET = "Wasmhost-Target"
ACK = "Wasmhost-Ack"
"""On a request (from a host, or `call --lattice`): `1` asks the host that takes it to answer `queued` first
(naming itself)."""
HEARTBEAT = "Wasmhost-Heartbeat"
"""On a `queued` answer: `<heartbeat_s> <started_at>` of the host that took the request, so that a requester
that has heard none of its heartbeats yet (`call --lattice`) can tell from then on when it stops answering."""

MAX_METADATA_CHARS = 256
"""Characters a message's Wasmhost-Correlation-Id and Content-Type may have: they reach the mailbox and the guest
beside the payload, which alone max_message_bytes bounds, and the correlation id every guest log line of the
message."""

KIND_SEND = "send"
KIND_REQUEST = "request"
KIND_BROADCAST = "broadcast"
"""A send that is one target of a broadcast: checked against the sender's broadcast capability."""
QUEUED = "queued"
REJECTED = "rejected"
REPLY = "reply"

EXTERNAL_NAMESPACE = "external"
"""Senders without a host (plain NATS clients) are `external/<name>/<id>` (default `external/nats/client`)."""
DEFAULT_EXTERNAL_SENDER = ComponentId(EXTERNAL_NAMESPACE, "nats", "client")

HeartbeatSeconds = Annotated[float, msgspec.Meta(ge=0.05, le=3600)]
"""A heartbeat interval: `[lattice] heartbeat_s`, and what a heartbeat claims (a claim of years would keep
a host in every directory long after it has gone)."""

_SPECIAL = re.compile(r"[.*>%\s]")


def encode_token(part: str) -> str:
    """`part` as one subject token: '.', '*', '>', '%' and whitespace percent-encoded (as UTF-8 bytes)."""
    return _SPECIAL.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode()), part)


def decode_token(token: str) -> str:
    """The inverse of encode_token."""
    if "%" not in token:
        return token
    return unquote(token, errors="strict")


LATTICE_ROOT = "wasmhost."
"""What every lattice's subjects start with."""


class Subjects:
    """Subject names of one lattice (`wasmhost.<name>`)."""

    def __init__(self, lattice_name: str) -> None:
        self.prefix = f"{LATTICE_ROOT}{encode_token(lattice_name)}"
        self.msg_prefix = f"{self.prefix}.msg."
        self.ingress_prefix = f"{self.prefix}.in."
        self.heartbeats = f"{self.prefix}.hb.*"

    def internal(self, subject: str) -> bool:
        """Whether `subject` is a lattice's own: under `wasmhost.`, this lattice's or another's. One NATS may
        carry several lattices (staging, prod) with one host user for them all: a client of one must not
        make its hosts publish on another's subjects (a heartbeat of its choosing there) either."""
        return subject.startswith(LATTICE_ROOT)

    def message(self, component: ComponentId) -> str:
        """Where other hosts send messages for `component` (and its replicas' queue group)."""
        return self.msg_prefix + _tokens(component)

    def ingress(self, component: ComponentId) -> str:
        """Where plain NATS clients send messages for `component` (and its replicas' queue group)."""
        return self.ingress_prefix + _tokens(component)

    def from_client(self, subject: str) -> bool:
        """Whether `subject` is a `P.in.` subject: what arrives there is from a plain client, whatever it says."""
        return subject.startswith(self.ingress_prefix)

    def component(self, subject: str) -> ComponentId:
        """The component a `P.msg.` or `P.in.` subject names; raises InvalidComponentId for anything else."""
        prefix = self.ingress_prefix if self.from_client(subject) else self.msg_prefix
        if not subject.startswith(prefix):
            raise InvalidComponentId(f"subject {subject!r} is not under {self.msg_prefix} or {self.ingress_prefix}")
        parts = subject[len(prefix):].split(".")
        if len(parts) != 3:
            raise InvalidComponentId(f"subject {subject!r}: expected {prefix}<ns>.<name>.<inst>")
        return ComponentId(*(decode_token(p) for p in parts))

    def heartbeat(self, host: str) -> str:
        """Where host `host` publishes its heartbeat."""
        return f"{self.prefix}.hb.{encode_token(host)}"

    def inventory(self, host: str) -> str:
        """Where host `host` answers inventory requests."""
        return f"{self.prefix}.inv.{encode_token(host)}"

    def replies(self, host: str) -> str:
        """The wildcard under which host `host` receives answers to its components' requests."""
        return f"{self.prefix}.re.{encode_token(host)}.*"

    def inbox(self, host: str) -> str:
        """The prefix of host `host`'s own request inboxes (nats-py's inbox_prefix: inventory fetches). Under the
        lattice's prefix, not nats-py's `_INBOX.`, which plain clients may subscribe (deploy/README)."""
        return f"{self.prefix}.inbox.{encode_token(host)}"

    def reply(self, host: str, token: str) -> str:
        """One answer subject of host `host`."""
        return f"{self.prefix}.re.{encode_token(host)}.{encode_token(token)}"


def _tokens(component: ComponentId) -> str:
    """`component` as the three subject tokens that end its message subjects."""
    return f"{encode_token(component.namespace)}.{encode_token(component.name)}.{encode_token(component.instance)}"


class Heartbeat(msgspec.Struct, frozen=True):
    """`P.hb.<host>`: a host is alive; its inventory changed when inventory_version did."""

    host: str
    seq: int
    started_at: float
    heartbeat_s: HeartbeatSeconds
    inventory_version: int


class InventoryEntry(msgspec.Struct, frozen=True):
    """One component a host runs, as the lattice sees it."""

    id: str
    state: str
    health: str
    accepts_external: bool
    name: str = ""
    version: str = ""
    max_message_bytes: int = 0


class Inventory(msgspec.Struct, frozen=True):
    """`P.inv.<host>`: what a host runs."""

    host: str
    version: int
    components: list[InventoryEntry]


heartbeat_codec = (msgspec.json.Encoder(), msgspec.json.Decoder(Heartbeat))


def heartbeat_header(heartbeat_s: float, started_at: float) -> str:
    """The Wasmhost-Heartbeat value of a host with this interval that started at this time."""
    return f"{heartbeat_s!r} {started_at!r}"


def acknowledged_heartbeat(host: str, value: str | None) -> Heartbeat | None:
    """The heartbeat a `queued` answer of `host` stands for (Wasmhost-Heartbeat), or None when it has none or
    it is not one (an interval outside HeartbeatSeconds included)."""
    try:
        interval, started_at = (value or "").split(" ")
        fields = {"host": host, "seq": 0, "started_at": float(started_at), "heartbeat_s": float(interval),
                  "inventory_version": 0}
        return msgspec.convert(fields, Heartbeat)
    except (ValueError, msgspec.ValidationError):
        return None
inventory_codec = (msgspec.json.Encoder(), msgspec.json.Decoder(Inventory))


def header_bytes(headers: dict[str, str]) -> int:
    """How many bytes `headers` take in a NATS message (the `NATS/1.0` line, one `key: value` line each, a
    blank line; none without headers): nats-server counts them with the payload against its max_payload."""
    if not headers:
        return 0
    return len(b"NATS/1.0\r\n\r\n") + sum(len(k.encode()) + len(v.encode()) + 4 for k, v in headers.items())


def one_line(text: str, limit: int = 1000) -> str:
    """`text` fit for a header value: one line, at most `limit` characters."""
    return " ".join(text.split())[:limit]
