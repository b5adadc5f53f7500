"""`wasmhost logs` filtering, on lines shaped like the daemon's."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

from tests.test_daemon import wasmhost
from wasmhost.logview import LogFilter, parse_line, parse_time, show

LINES = [
    json.dumps({"event": "component_started", "level": "info", "timestamp": "2026-01-01T10:00:00Z",
                "component": "demo/echo/0"}),
    json.dumps({"event": "greeting", "level": "info", "timestamp": "2026-01-01T10:05:00Z",
                "component": "demo/greeter/0", "guest": True, "correlation_id": "c-1"}),
    json.dumps({"event": "component_restarting", "level": "warning", "timestamp": "2026-01-01T10:10:00Z",
                "component": "other/trapper/0"}),
    "plain text from something else",
    json.dumps({"unrelated": "json"}),
]


def run(keep: LogFilter, as_json: bool = False) -> tuple[list[str], int]:
    out = io.StringIO()
    counts = show(LINES, keep, as_json, out)
    return out.getvalue().splitlines(), counts.skipped


def test_filters_combine() -> None:
    assert len(run(LogFilter())[0]) == 3
    assert run(LogFilter(component="demo/*"))[0][0].split()[2] == "component_started"
    assert len(run(LogFilter(component="demo/*"))[0]) == 2
    warnings = run(LogFilter(level="warning"), as_json=True)[0]
    assert [json.loads(x)["event"] for x in warnings] == ["component_restarting"]
    window = LogFilter(since=parse_time("2026-01-01T10:01:00Z"), until=parse_time("2026-01-01T10:06:00"))
    assert len(run(window)[0]) == 1
    assert "correlation_id=c-1" in run(LogFilter(correlation="c-1"))[0][0]
    assert run(LogFilter(grep="trapper"))[0][0].endswith("[other/trapper/0]")


def test_lines_that_are_not_ours_are_counted_not_fatal() -> None:
    assert run(LogFilter())[1] == 2


def test_a_long_guest_message_of_pairs_parses_in_linear_time() -> None:
    """A console line whose guest message is 16,001 characters of `a=b ` text: every space is a boundary
    the event may end at; tried one by one, re-parsing the rest each time, it took about 10 s."""
    message = "a=b " * 4000 + "!"
    line = f"2026-01-01T00:00:00.000000Z [info     ] {message} component=t/x/0 guest=True guest_level=info"
    began = time.perf_counter()
    event = parse_line(line)
    assert time.perf_counter() - began < 1.0
    assert event == {"timestamp": "2026-01-01T00:00:00.000000Z", "level": "info", "event": message,
                     "component": "t/x/0", "guest": True, "guest_level": "info"}


def test_console_values_come_back_as_printed_literals() -> None:
    line = "2026-01-01T00:00:00Z [info     ] said a=b inside  a=b c='x y' d=[1, (2, ']')] e={'k': 1} f=[never"
    assert parse_line(line) == {"timestamp": "2026-01-01T00:00:00Z", "level": "info",
                                "event": "said a=b inside  a=b c='x y' d=[1, (2, ']')] e={'k': 1} f=[never"}
    assert parse_line(line.removesuffix(" f=[never"))["event"] == "said a=b inside"  # type: ignore[index]


def test_a_json_line_nested_too_deep_for_python_is_skipped_not_fatal(tmp_path: Path) -> None:
    """json.loads raises RecursionError, not ValueError, on 100,000 nested arrays: the real CLI skips the
    line and counts it, as for any line that is not an event."""
    ok = json.dumps({"event": "ok", "level": "info", "timestamp": "2026-01-01T00:00:00Z"})
    nested = '{"event": "x", "level": "info", "a": ' + "[" * 100_000 + "]" * 100_000 + "}"
    log = tmp_path / "nested.log"
    log.write_text(f"{ok}\n{nested}\n{ok}\n")
    shown = wasmhost("logs", str(log))
    assert shown.returncode == 0 and shown.stdout.count(" ok\n") == 2
    assert "(1 of 3 lines were not wasmhost events and were skipped)" in shown.stderr
