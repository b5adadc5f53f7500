"""How a requester learns that a request ended without a normal reply.

`handle-callback` has no error channel, so every outcome other than a reply arrives as a callback
whose metadata.content-type is OUTCOME_CONTENT_TYPE and whose payload is a small JSON object:
`{"outcome": "<kind>", "detail": "<text>"}`, with kind one of no-reply, failed, timeout,
target-stopped. A normal reply keeps the responder's bytes and has no content type.
"""

from __future__ import annotations

import enum

import msgspec

OUTCOME_CONTENT_TYPE = "application/vnd.wasmhost.outcome+json"


class Outcome(enum.Enum):
    """Ways a request can end without a reply payload."""

    NO_REPLY = "no-reply"  # the responder's handle-message returned none
    FAILED = "failed"  # the responder returned an error, trapped or timed out
    TIMEOUT = "timeout"  # no answer within timeout-ms
    TARGET_STOPPED = "target-stopped"  # the responder stopped before handling the request


class OutcomeReport(msgspec.Struct, frozen=True):
    """The JSON payload of an outcome callback."""

    outcome: str
    detail: str = ""


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(OutcomeReport)


def encode_outcome(outcome: Outcome, detail: str = "") -> bytes:
    """The callback payload for `outcome`."""
    return _encoder.encode(OutcomeReport(outcome.value, detail))


def decode_outcome(payload: bytes) -> OutcomeReport:
    """Parse an outcome callback payload (raises msgspec.ValidationError / DecodeError)."""
    return _decoder.decode(payload)


class RequestFailed(Exception):
    """A request from the host ended with an outcome instead of a reply. `detail` is one line;
    `trace` the full text behind it when there is more (a guest's wasm backtrace), else empty."""

    def __init__(self, outcome: Outcome, detail: str, trace: str = "") -> None:
        self.outcome = outcome
        self.detail = detail
        self.trace = trace
        super().__init__(f"{outcome.value}: {detail}" if detail else outcome.value)
