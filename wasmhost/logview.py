"""`wasmhost logs`: read the daemon's log lines, filter them and print them readably.

Both formats the daemon writes are read: JSON lines (exact) and the console format of a terminal
(`TIMESTAMP [level    ] event   key=value ...`, read best effort: values are as printed, a guest
message containing ` key=value` text may be split there, and continuation lines of a multi-line
traceback are skipped; the daemon writes each event on one line).
"""

from __future__ import annotations

import ast
import fnmatch
import json
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

from wasmhost.core.terminal import json_line, printable

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
    """The wasmhost events among `lines` (JSON or console format); other lines are counted and skipped."""
    for line in lines:
        counts.read += 1
        event = parse_line(line)
        if event is None:
            counts.skipped += 1
            continue
        yield event


def parse_line(line: str) -> dict[str, Any] | None:
    """One log line as an event (timestamp, level, event and its fields), or None when it is not one."""
    text = line.rstrip("\r\n")
    if text.lstrip().startswith("{"):
        try:
            event = json.loads(text)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than Python's stack allows
            return None
        if not isinstance(event, dict) or "event" not in event or "level" not in event:
            return None
        return event
    return parse_console(text)


_CONSOLE = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)?) \[(\w+) *\] (.*)")
_KEY = re.compile(r"([A-Za-z_][\w.-]*)=")
_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'" + r'|"(?:[^"\\]|\\.)*"')
_CLOSING = {"[": "]", "{": "}", "(": ")"}


def parse_console(text: str) -> dict[str, Any] | None:
    """A line of structlog's console format as an event, or None when it is not one."""
    match = _CONSOLE.fullmatch(text)
    if match is None or match.group(2).lower() not in LEVELS:
        return None
    stamp, level, rest = match.groups()
    # The event (a guest's message may contain spaces and `key=` text) ends at the first key from which
    # the rest of the line is wholly key=value pairs. The pairs are parsed once, whichever boundary
    # reaches them: tried boundary by boundary, a guest line of 4,000 `a=b` took seconds.
    pairs = _Pairs(rest.rstrip())
    for boundary in re.finditer(r"\s(?=[A-Za-z_][\w.-]*=)", rest):
        event = rest[: boundary.start()].strip()
        if event and pairs.whole(boundary.end()):
            return {"timestamp": stamp, "level": level.lower(), "event": event, **pairs.fields(boundary.end())}
    return {"timestamp": stamp, "level": level.lower(), "event": rest.strip()} if rest.strip() else None


class _Pairs:
    """The `key=value key=value ...` pairs of one line, each parsed at most once (memoized by position)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self._pair: dict[int, tuple[str, int, int] | None] = {}  # pair start -> (key, value start, end)
        self._whole: dict[int, bool] = {}  # pair start -> the line from there is nothing but pairs
        self._closed: dict[int, int | None] = {}  # opening bracket -> just past its closing one

    def whole(self, start: int) -> bool:
        """Whether the text from `start` to its end is wholly made of pairs."""
        chain: list[int] = []
        at: int | None = start
        while at is not None and at < len(self.text) and at not in self._whole:
            chain.append(at)
            pair = self._parse(at)
            at = None if pair is None else pair[2] + 1
        result = at is not None and (at >= len(self.text) or self._whole[at])
        for visited in chain:
            self._whole[visited] = result
        return result

    def fields(self, start: int) -> dict[str, Any]:
        """The pairs from `start` on (where `whole(start)`) as a dict."""
        fields: dict[str, Any] = {}
        at = start
        while at < len(self.text):
            key, value_start, end = self._parse(at) or ("", at, len(self.text))
            fields[key] = _value(self.text[value_start:end])
            at = end + 1
        return fields

    def _parse(self, at: int) -> tuple[str, int, int] | None:
        """The pair starting at `at`: its key, where its value starts and where it ends (None: not a
        pair, or not followed by a space or the end)."""
        if at not in self._pair:
            key = _KEY.match(self.text, at)
            end = None if key is None else self._value_end(key.end())
            if key is None or end is None or (end < len(self.text) and self.text[end] != " "):
                self._pair[at] = None
            else:
                self._pair[at] = (key.group(1), key.end(), end)
        return self._pair[at]

    def _value_end(self, start: int) -> int | None:
        """Where the value starting at `start` ends: a quoted string, a bracketed literal or a bare word."""
        text = self.text
        if start < len(text) and text[start] in "'\"":
            quoted = _QUOTED.match(text, start)
            return quoted.end() if quoted else None
        if start < len(text) and text[start] in _CLOSING:
            return self._bracket_end(start)
        space = text.find(" ", start)
        return len(text) if space < 0 else space

    def _bracket_end(self, start: int) -> int | None:
        """Just past the bracket closing the one at `start` (quoted strings inside skipped), or None.
        Every bracket the scan opens is remembered, so a later value starting inside is not scanned again."""
        if start in self._closed:
            return self._closed[start]
        text, stack = self.text, []
        at = start
        while at < len(text):
            char = text[at]
            if char in "'\"":
                quoted = _QUOTED.match(text, at)
                if quoted is None:
                    break
                at = quoted.end()
                continue
            if char in _CLOSING and at in self._closed:  # scanned before: jump past it, or fail with it
                closed = self._closed[at]
                if closed is None:
                    break
                at = closed
                continue
            if char in _CLOSING:
                stack.append((at, _CLOSING[char]))
            elif stack and char == stack[-1][1]:
                opened, _ = stack.pop()
                self._closed[opened] = at + 1
                if not stack:
                    return at + 1
            at += 1
        for opened, _ in stack:  # never closed, however the scan reaches them
            self._closed[opened] = None
        return None


def _value(raw: str) -> Any:
    """A printed value back as what it was where that is plain (strings, numbers, lists...), else as printed."""
    if raw[:1] in "'\"[{(" or raw in ("True", "False", "None") or re.fullmatch(r"-?\d+(\.\d+)?", raw):
        try:
            return ast.literal_eval(raw)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return raw
    return raw


def render(event: dict[str, Any]) -> str:
    """One event as a readable line, control characters escaped: guests choose messages, keys and values."""
    head = [str(event.get("timestamp", "-")), f"{str(event.get('level', '-')).upper():<7}",
            str(event.get("event", ""))]
    if "component" in event:
        head.append(f"[{event['component']}]")
    rest = [f"{k}={v}" for k, v in event.items() if k not in _SHOWN_FIRST]
    if "correlation_id" in event:
        rest.insert(0, f"correlation_id={event['correlation_id']}")
    return printable(" ".join(head + rest))


def open_log(path: str) -> TextIO:
    """A log file for reading: UTF-8 (anything else replaced), lines ending at `\n` only."""
    return open(path, encoding="utf-8", errors="replace", newline="\n")


def follow(stream: TextIO, path: str, interval: float = 0.2) -> Iterator[str]:
    """The lines of the growing log file `stream` (opened from `path`), waiting for more at its end
    until interrupted. A line is yielded whole: one caught half written is kept until its newline
    comes. When the file at `path` is another one (logrotate moved it away and the daemon reopened
    it on SIGUSR1) or shorter than what was read (copytruncate), reading goes on at its start."""
    partial = ""
    while True:
        chunk = stream.readline()
        if chunk:
            partial += chunk
            if partial.endswith("\n"):
                yield partial
                partial = ""
            continue
        replacement = _replacement(stream, path)
        if replacement is None:
            time.sleep(interval)
            continue
        if partial:  # the old file ended mid-line: that line will never be finished
            yield partial
            partial = ""
        if replacement is not stream:
            stream.close()
            stream = replacement


def _replacement(stream: TextIO, path: str) -> TextIO | None:
    """At the end of `stream`: what to read next, when not more of it. A new file at `path` (opened),
    or `stream` itself rewound when it was truncated; None when `path` is still this file (or none)."""
    try:
        current = os.stat(path)
    except OSError:  # moved away and not yet reopened by the daemon: keep the old file for now
        return None
    mine = os.fstat(stream.fileno())
    if (current.st_dev, current.st_ino) != (mine.st_dev, mine.st_ino):
        try:
            return open_log(path)
        except OSError:
            return None
    # At the end, everything up to the descriptor's offset has been read (tell() of a text stream is
    # a cookie, not a byte count, while a character is half read).
    if mine.st_size < os.lseek(stream.fileno(), 0, os.SEEK_CUR):
        stream.seek(0)
        return stream
    return None


def show(lines: Iterable[str], keep: LogFilter, as_json: bool, out: TextIO = sys.stdout) -> Counts:
    """Print the events that pass `keep`; return the counts."""
    counts = Counts()
    for event in events(lines, counts):
        if keep.keeps(event):
            counts.shown += 1
            out.write((json_line(event) if as_json else render(event)) + "\n")
            out.flush()
    return counts
