"""The `airssys:core@1.0.0` interface as signatures in the codec's WIT notation, for load checks.

The .wit files under wasmhost/wit are the source of truth; a test compares these signatures with
the ones wasmtime reads from a component built from those files.
"""

from __future__ import annotations

PACKAGE = "airssys:core"
VERSION = "1.0.0"


def qualified(interface: str) -> str:
    """`airssys:core/<interface>@1.0.0`."""
    return f"{PACKAGE}/{interface}@{VERSION}"


def record(*fields: tuple[str, str]) -> str:
    """WIT record notation."""
    return "record {" + ", ".join(f"{name}: {ty}" for name, ty in fields) + "}"


def variant(*cases: tuple[str, str | None]) -> str:
    """WIT variant notation."""
    return "variant {" + ", ".join(name if ty is None else f"{name}({ty})" for name, ty in cases) + "}"


def enum(*names: str) -> str:
    """WIT enum notation."""
    return "enum {" + ", ".join(names) + "}"


def option(ty: str) -> str:
    """WIT option notation."""
    return f"option<{ty}>"


def list_of(ty: str) -> str:
    """WIT list notation."""
    return f"list<{ty}>"


def result(ok: str | None, err: str | None) -> str:
    """WIT result notation (`_` for an absent case type)."""
    return f"result<{ok or '_'}, {err or '_'}>"


def signature(params: list[tuple[str, str]], returns: str | None) -> str:
    """`(name: type, ...) -> type` notation of a function type."""
    text = "(" + ", ".join(f"{name}: {ty}" for name, ty in params) + ")"
    return text + (f" -> {returns}" if returns else "")


S = "string"
BYTES = "list<u8>"
COMPONENT_ID = record(("namespace", S), ("name", S), ("instance", S))
TIMESTAMP = record(("seconds", "u64"), ("nanoseconds", "u32"))
MESSAGE_METADATA = record(
    ("correlation-id", option(S)), ("reply-to", option(COMPONENT_ID)), ("timestamp", TIMESTAMP),
    ("content-type", option(S)),
)
COMPONENT_MESSAGE = record(("sender", COMPONENT_ID), ("payload", BYTES), ("metadata", MESSAGE_METADATA))
RESOURCE_LIMITS = record(("max-memory-bytes", "u64"), ("max-execution-time-ms", "u64"), ("max-fuel", option("u64")))
COMPONENT_CONFIG = record(
    ("env-vars", list_of(f"tuple<{S}, {S}>")), ("config-data", option(BYTES)), ("resource-limits", RESOURCE_LIMITS)
)
COMPONENT_METADATA = record(
    ("name", S), ("version", S), ("description", S), ("author", S), ("license", S),
    ("supported-operations", list_of(S)), ("stateful", "bool"),
)
COMPONENT_INFO = record(("id", COMPONENT_ID), ("name", S), ("version", S), ("health", S))
LOG_LEVEL = enum("trace", "debug", "info", "warn", "error")
HEALTH_STATUS = enum("healthy", "degraded", "unhealthy", "unknown")
WASM_ERROR = variant(
    ("component-not-found", S), ("instantiation-failed", S), ("export-not-found", S), ("timeout", None),
    ("resource-limit-exceeded", S), ("invalid-component", S), ("runtime-error", S),
)
COMPONENT_ERROR = variant(
    ("initialization-failed", S), ("already-initialized", None), ("not-initialized", None),
    ("shutdown-failed", S), ("invalid-state", S),
)
MESSAGING_ERROR = variant(
    ("delivery-failed", S), ("correlation-timeout", S), ("invalid-message", S), ("queue-full", None),
    ("target-not-found", COMPONENT_ID),
)
STORAGE_ERROR = variant(
    ("not-found", S), ("already-exists", S), ("quota-exceeded", None), ("invalid-key", S), ("io-error", S)
)
STORAGE_USAGE = record(("used-bytes", "u64"), ("quota-bytes", "u64"), ("key-count", "u64"))

LIFECYCLE = qualified("component-lifecycle")
LIFECYCLE_EXPORTS: dict[str, str] = {
    "initialize": signature([("config", COMPONENT_CONFIG)], result(None, COMPONENT_ERROR)),
    "handle-message": signature([("msg", COMPONENT_MESSAGE)], result(option(BYTES), WASM_ERROR)),
    "handle-callback": signature([("msg", COMPONENT_MESSAGE)], result(None, WASM_ERROR)),
    "metadata": signature([], COMPONENT_METADATA),
    "health": signature([], HEALTH_STATUS),
    "shutdown": signature([], result(None, COMPONENT_ERROR)),
}

HOST_IMPORTS: dict[str, dict[str, str]] = {
    qualified("host-messaging"): {
        "send": signature([("target", COMPONENT_ID), ("payload", BYTES)], result(None, MESSAGING_ERROR)),
        "request": signature(
            [("target", COMPONENT_ID), ("payload", BYTES), ("timeout-ms", "u64")], result(S, MESSAGING_ERROR)
        ),
        "cancel-request": signature([("request-id", S)], result(None, MESSAGING_ERROR)),
        "broadcast": signature([("targets", list_of(COMPONENT_ID)), ("payload", BYTES)], result(None, MESSAGING_ERROR)),
        "self-id": signature([], COMPONENT_ID),
    },
    qualified("host-services"): {
        "log": signature(
            [("level", LOG_LEVEL), ("message", S), ("context", option(list_of(f"tuple<{S}, {S}>")))], None
        ),
        "current-time": signature([], TIMESTAMP),
        "current-time-millis": signature([], "u64"),
        "sleep-millis": signature([("duration-ms", "u64")], None),
        "list-components": signature([], list_of(COMPONENT_ID)),
        "get-component-metadata": signature([("id", COMPONENT_ID)], result(COMPONENT_INFO, COMPONENT_ERROR)),
    },
    qualified("storage"): {
        "get": signature([("key", S)], result(option(BYTES), STORAGE_ERROR)),
        "set": signature([("key", S), ("value", BYTES)], result(None, STORAGE_ERROR)),
        "delete": signature([("key", S)], result(None, STORAGE_ERROR)),
        "exists": signature([("key", S)], result("bool", STORAGE_ERROR)),
        "list-keys": signature([("prefix", option(S))], result(list_of(S), STORAGE_ERROR)),
        "usage": signature([], result(STORAGE_USAGE, STORAGE_ERROR)),
    },
}

TYPE_ONLY_IMPORTS = frozenset({qualified("types"), qualified("errors")})
"""Interfaces a component may import for their types alone; the host defines no functions there."""
