"""The pure core types: ids, limits and error values as a user sees them."""

from __future__ import annotations

import pytest

from wasmhost.core import ComponentId, InvalidComponentId, MessagingError, ResourceLimits, StorageError, WasmError
from wasmhost.core.ids import MAX_PART_CHARS
from wasmhost.core.limits import MAX_EXECUTION_TIME_MS


def test_component_id_round_trips_through_its_string_form() -> None:
    cid = ComponentId.parse("test-org/echo/0.1.0")
    assert (cid.namespace, cid.name, cid.instance) == ("test-org", "echo", "0.1.0")
    assert str(cid) == "test-org/echo/0.1.0"
    assert ComponentId.parse(str(cid)) == cid


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("a/b", "expected namespace/name/instance"),
        ("a/b/c/d", "got 4 part(s)"),
        ("a//c", "name is empty"),
        ("/b/c", "namespace is empty"),
        ("a/../c", "contains '..'"),
        ("a/b/x\x00y", "NUL"),
    ],
)
def test_bad_component_ids_say_what_is_wrong(text: str, reason: str) -> None:
    with pytest.raises(InvalidComponentId) as info:
        ComponentId.parse(text)
    assert reason in str(info.value)
    assert repr(text) in str(info.value)


def test_component_id_parts_are_bounded_and_the_error_stays_short() -> None:
    assert ComponentId("a", "b" * MAX_PART_CHARS, "c").name == "b" * MAX_PART_CHARS
    with pytest.raises(InvalidComponentId, match=f"name is {MAX_PART_CHARS + 1} characters, at most {MAX_PART_CHARS}"):
        ComponentId("a", "b" * (MAX_PART_CHARS + 1), "c")
    with pytest.raises(InvalidComponentId) as info:
        ComponentId.parse("x" * 1_000_000 + "/b/c")
    assert "namespace is 1000000 characters" in str(info.value) and len(str(info.value)) < 300


def test_component_id_parts_cannot_smuggle_a_slash() -> None:
    with pytest.raises(InvalidComponentId, match="contains '/'"):
        ComponentId("a", "b/c", "d")


def test_resource_limits_defaults_and_zero_rejected() -> None:
    limits = ResourceLimits()
    assert limits.max_memory_bytes == 64 * 1024 * 1024
    assert limits.max_execution_time_ms == 30_000
    assert limits.max_fuel is None
    for field in ("max_memory_bytes", "max_execution_time_ms", "max_fuel"):
        with pytest.raises(ValueError, match=field):
            ResourceLimits(**{field: 0})


def test_a_call_deadline_past_a_day_is_refused_for_embedders_too() -> None:
    # The config refuses it; an embedder building ResourceLimits itself must not get past that either: the
    # worker pool's deadline thread died waiting for 2^63 - 1 ms (OverflowError), and no deadline held after.
    assert ResourceLimits(max_execution_time_ms=MAX_EXECUTION_TIME_MS).max_execution_time_ms == 86_400_000
    expected = r"max_execution_time_ms must be at most 86400000 \(a day\), got 9223372036854775807"
    with pytest.raises(ValueError, match=expected):
        ResourceLimits(max_execution_time_ms=2**63 - 1)


def test_error_values_read_like_the_wit_cases() -> None:
    assert str(WasmError("runtime-error", "boom")) == "runtime-error: boom"
    assert str(MessagingError("queue-full")) == "queue-full"
    target = ComponentId.parse("a/b/c")
    assert str(MessagingError("target-not-found", target)) == "target-not-found: a/b/c"
    assert StorageError("quota-exceeded") == StorageError("quota-exceeded")
    with pytest.raises(ValueError, match="unknown case"):
        WasmError("no-such-case", "x")
    with pytest.raises(ValueError, match="does not fit"):
        StorageError("quota-exceeded", "unexpected payload")
