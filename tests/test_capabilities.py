"""Capabilities: patterns, deny by default, per-action grants, audited and rate-limited denials."""

from __future__ import annotations

import threading

import pytest
import structlog

from wasmhost.core import ComponentId, MessagingError, StorageError
from wasmhost.core.ids import HOST_ID
from wasmhost.security.audit import LINES_PER_INTERVAL, REMEMBERED, AuditLog
from wasmhost.security.capabilities import Capabilities, CapabilityChecker, TargetPattern

ID = ComponentId.parse


@pytest.mark.parametrize(
    ("pattern", "yes", "no"),
    [
        ("*", ["a/b/c", "x/y/z"], []),
        ("a/*", ["a/b/c", "a/x/y"], ["b/a/c", "ab/b/c"]),
        ("a/b/*", ["a/b/c", "a/b/d"], ["a/c/c", "a/bb/c"]),
        ("a/b/c", ["a/b/c"], ["a/b/cc", "a/b/d"]),
    ],
)
def test_patterns_match_exactly_what_they_say(pattern: str, yes: list[str], no: list[str]) -> None:
    parsed = TargetPattern.parse(pattern)
    assert str(parsed) == pattern
    assert all(parsed.matches(ID(i)) for i in yes)
    assert not any(parsed.matches(ID(i)) for i in no)


@pytest.mark.parametrize("bad", ["", "a", "a/b", "a/*/c", "*/b/c", "a/b/c/d", "a/../*", "a/b*", "a\x00/*"])
def test_bad_patterns_are_rejected_by_name(bad: str) -> None:
    with pytest.raises(ValueError) as info:
        TargetPattern.parse(bad)
    assert repr(bad) in str(info.value)


def test_every_bad_pattern_is_reported_at_once() -> None:
    with pytest.raises(ValueError) as info:
        Capabilities.from_config(send=["a/*", "nope"], broadcast=["x/y"])
    assert "capabilities.send[1]" in str(info.value) and "capabilities.broadcast[0]" in str(info.value)


def test_deny_by_default_and_grants_per_action() -> None:
    checker = CapabilityChecker()
    sender, target = ID("app/client/0"), ID("app/server/0")
    with pytest.raises(MessagingError) as info:
        checker.check_message(sender, "send", target)
    denied = "capability denied: app/client/0 may not send to app/server/0"
    assert info.value == MessagingError("delivery-failed", denied)
    checker.grant(sender, Capabilities.from_config(send=["app/*"]))
    checker.check_message(sender, "send", target)
    with pytest.raises(MessagingError):
        checker.check_message(sender, "request", target)
    checker.check_message(HOST_ID, "request", target)
    checker.revoke(sender)
    with pytest.raises(MessagingError):
        checker.check_message(sender, "send", target)


def test_storage_capability() -> None:
    checker = CapabilityChecker()
    with pytest.raises(StorageError, match="capability denied: a/b/c has no storage capability"):
        checker.check_storage(ID("a/b/c"))
    checker.grant(ID("a/b/c"), Capabilities(storage=True))
    checker.check_storage(ID("a/b/c"))


def test_denials_are_audited_once_per_interval_and_all_counted() -> None:
    now = [100.0]
    audit = AuditLog(interval=10.0, clock=lambda: now[0])
    checker = CapabilityChecker(audit)
    sender, target = ID("app/client/0"), ID("app/server/0")
    with structlog.testing.capture_logs() as logs:
        for _ in range(5):
            with pytest.raises(MessagingError):
                checker.check_message(sender, "send", target)
        now[0] += 11
        with pytest.raises(MessagingError):
            checker.check_message(sender, "send", target)
    events = [e for e in logs if e["event"] == "capability_denied"]
    assert events == [
        {"event": "capability_denied", "component": "app/client/0", "action": "send", "target": "app/server/0",
         "denied": True, "log_level": "warning"},
        {"event": "capability_denied", "component": "app/client/0", "action": "send", "target": "app/server/0",
         "denied": True, "suppressed": 4, "log_level": "warning"},
    ]
    assert audit.denials(sender) == 6 and audit.snapshot() == {"app/client/0": 6}


def test_a_component_denied_endless_distinct_targets_writes_a_few_lines_per_interval() -> None:
    # Before, each distinct target was logged (in full) and remembered forever: a guest in a lattice,
    # where unknown targets reach the capability check, wrote the host's log at the rate it called.
    now = [100.0]
    audit = AuditLog(interval=10.0, clock=lambda: now[0])
    checker = CapabilityChecker(audit)
    hostile, other = ID("app/hostile/0"), ID("app/other/0")
    with structlog.testing.capture_logs() as logs:
        for i in range(10_000):
            with pytest.raises(MessagingError):
                checker.check_message(hostile, "send", ID(f"app/t{i}/0"))
        with pytest.raises(MessagingError):
            checker.check_message(other, "send", ID("app/t0/0"))  # its own budget
        now[0] += 11
        with pytest.raises(MessagingError):
            checker.check_message(hostile, "send", ID("app/t0/0"))
    lines = [e for e in logs if e["event"] == "capability_denied"]
    hostile_lines = [e for e in lines if e["component"] == "app/hostile/0"]
    assert len(hostile_lines) == LINES_PER_INTERVAL + 1
    assert hostile_lines[-1]["suppressed"] == 10_000 - LINES_PER_INTERVAL  # nothing goes uncounted
    assert [e["component"] for e in lines].count("app/other/0") == 1
    assert audit.denials(hostile) == 10_001
    assert len(audit._last) <= REMEMBERED  # old triples are let go (memory stays bounded)


def test_denial_counters_are_exact_across_threads() -> None:
    audit = AuditLog()
    checker = CapabilityChecker(audit)

    def deny(n: int) -> None:
        for _ in range(1000):
            with pytest.raises(MessagingError):
                checker.check_message(ID(f"app/c{n}/0"), "send", ID("app/s/0"))

    threads = [threading.Thread(target=deny, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert audit.denials() == 8000


def test_a_grant_taken_away_while_a_check_reads_it_is_not_cached_past_the_change() -> None:
    """A reload (on the event loop) revokes a grant at the moment a guest's thread is deciding on its
    old grants; the decision taken then went into the fresh cache, so the revoked grant kept working
    until the next grant change of any component. The race is placed by hand: the revoke runs from
    inside the pattern match."""
    checker = CapabilityChecker()
    sender, target = ID("app/client/0"), ID("app/server/0")

    class RevokedWhileMatching(TargetPattern):
        def matches(self, component: ComponentId) -> bool:
            checker.revoke(sender)  # the reload, had the GIL switched to it just now
            return super().matches(component)

    checker.grant(sender, Capabilities(send=(RevokedWhileMatching("app/*", ("app",)),)))
    assert checker.allowed(sender, "send", target)  # decided on the grant it still had
    assert not checker.allowed(sender, "send", target)  # the revoke holds from then on
    with pytest.raises(MessagingError, match="capability denied"):
        checker.check_message(sender, "send", target)
