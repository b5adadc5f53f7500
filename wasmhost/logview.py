"""`wasmhost logs`: read the daemon's JSON log lines, filter them and print them readably."""

from __future__ import annotations

import fnmatch
import json
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

LEVELS = {"debug": 10, "info": 20, "warning": 30, "warn": 30, "error": 40, "critical": 50}
_SHOWN_FIRST = ("timestamp", "level", "event", "component", "correlation_id")


@dataclass
class LogFilter:
    """Which log events to keep."""

    component: str | None = None  # glob over the component id
    level: str | None = None  # minimum level
    since: datetime | None = None
    until: datetime | None = None
    correlation: str | None = None
    grep: str | None = None

    def keeps(self, event: dict[str, Any]) -> bool:
        """Whether `event` passes every filter given."""
        if self.component is not None and not fnmatch.fnmatchcase(str(event.get("component", "")), self.component):
            return False
        if self.level is not None and LEVELS.get(str(event.get("level", "")), 0) < LEVELS[self.level]:
            return False
        if self.since is not None or self.until is not None:
            stamp = parse_time(str(event.get("timestamp", "")))
            if stamp is None or (self.since and stamp < self.since) or (self.until and stamp > self.until):
                return False
        if self.correlation is not None and event.get("correlation_id") != self.correlation:
            return False
        return self.grep is None or self.grep in json.dumps(event, ensure_ascii=False)


def parse_time(text: str) -> datetime | None:
    """An ISO-8601 timestamp (naive ones are taken as UTC), or None."""
    try:
        stamp = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)


@dataclass
class Counts:
    """How many lines were read, shown and skipped as not ours."""

    read: int = 0
    shown: int = 0
    skipped: int = 0


def events(lines: Iterable[str], counts: Counts) -> Iterator[dict[str, Any]]:
    """The wasmhost events among `lines`; other lines are counted and skipped."""
    for line in lines:
        counts.read += 1
        try:
            event = json.loads(line)
        except ValueError:
            counts.skipped += 1
            continue
        if not isinstance(event, dict) or "event" not in event or "level" not in event:
            counts.skipped += 1
            continue
        yield event


def render(event: dict[str, Any]) -> str:
    """One event as a readable line."""
    head = [str(event.get("timestamp", "-")), f"{str(event.get('level', '-')).upper():<7}",
            str(event.get("event", ""))]
    if "component" in event:
        head.append(f"[{event['component']}]")
    rest = [f"{k}={v}" for k, v in event.items() if k not in _SHOWN_FIRST]
    if "correlation_id" in event:
        rest.insert(0, f"correlation_id={event['correlation_id']}")
    return " ".join(head + rest)


def follow(stream: TextIO, interval: float = 0.2) -> Iterator[str]:
    """The lines of a growing file, waiting for more at its end (until interrupted)."""
    while True:
        line = stream.readline()
        if line:
            yield line
        else:
            time.sleep(interval)


def show(lines: Iterable[str], keep: LogFilter, as_json: bool, out: TextIO = sys.stdout) -> Counts:
    """Print the events that pass `keep`; return the counts."""
    counts = Counts()
    for event in events(lines, counts):
        if keep.keeps(event):
            counts.shown += 1
            out.write((json.dumps(event, ensure_ascii=False) if as_json else render(event)) + "\n")
            out.flush()
    return counts
