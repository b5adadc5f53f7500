"""The `wasmhost` command as people use it, end to end: the real CLI in subprocesses against a real daemon
(see tests/test_daemon.py for the Daemon helper), plus the control client in-process for the load test."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import FIXTURES
from tests.test_daemon import ROOT, Daemon, component, config_text, kill_leftovers, launch, wasmhost
from tests.waits import wait_for
from wasmhost import __version__
from wasmhost.cli import build_parser
from wasmhost.system import protocol
from wasmhost.system.client import DaemonUnavailable, request

Start = Callable[..., Daemon]


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Start]:
    """Start a daemon with the given [[components]] text (and [host] replacements); killed afterwards."""
    started: list[Daemon] = []

    def start(components: str, host: dict[str, str] | None = None) -> Daemon:
        return launch(tmp_path, components, started, edit=host)

    yield start
    kill_leftovers(started)


def cli_bytes(d: Daemon, *args: str, stdout: int | None = None) -> subprocess.CompletedProcess[bytes]:
    """The real CLI aimed at `d`, its output as bytes (stdout is a pipe, not a terminal)."""
    return subprocess.run([sys.executable, "-m", "wasmhost.cli", *args, "--socket", str(d.socket)],
                          stdout=subprocess.PIPE if stdout is None else stdout, stderr=subprocess.PIPE,
                          timeout=60, cwd=ROOT)


def background(d: Daemon, *args: str) -> subprocess.Popen[str]:
    """The real CLI aimed at `d`, running while the test goes on."""
    return subprocess.Popen([sys.executable, "-m", "wasmhost.cli", *args, "--socket", str(d.socket)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def rows(d: Daemon) -> dict[str, dict[str, object]]:
    """`wasmhost status --json`, by component id."""
    result = d.cli("status", "--json")
    assert result.returncode == 0, result.stderr
    return {r["id"]: r for r in json.loads(result.stdout)["components"]}


# --- call: the reply bytes, files, the literal @ ---


def test_call_writes_the_reply_bytes_exactly(daemon: Start, tmp_path: Path) -> None:
    d = daemon(component("t/echo/0", "echo"))
    assert cli_bytes(d, "call", "t/echo/0", "a").stdout == b"a"  # no newline added when not a terminal
    (tmp_path / "a-newline").write_bytes(b"a\n")
    assert cli_bytes(d, "call", "t/echo/0", f"@{tmp_path / 'a-newline'}").stdout == b"a\n"
    blob = bytes(range(256)) * 4096  # 1 MiB of every byte value
    (tmp_path / "blob.bin").write_bytes(blob)
    piped = cli_bytes(d, "call", "t/echo/0", f"@{tmp_path / 'blob.bin'}")
    assert piped.returncode == 0 and piped.stdout == blob
    written = cli_bytes(d, "call", "t/echo/0", f"@{tmp_path / 'blob.bin'}", "-o", str(tmp_path / "reply.bin"))
    assert written.returncode == 0 and written.stdout == b""
    assert (tmp_path / "reply.bin").read_bytes() == blob
    again = cli_bytes(d, "call", "t/echo/0", "short", "-o", str(tmp_path / "reply.bin"))
    assert again.returncode == 0 and (tmp_path / "reply.bin").read_bytes() == b"short"  # replaced, not appended
    failed = cli_bytes(d, "call", "t/ghost/0", "x", "-o", str(tmp_path / "reply.bin"))
    assert failed.returncode == 1 and (tmp_path / "reply.bin").read_bytes() == b"short"  # kept on failure
    assert cli_bytes(d, "call", "t/ghost/0", "x", "-o", str(tmp_path / "new.bin")).returncode == 1
    assert not (tmp_path / "new.bin").exists()
    assert cli_bytes(d, "call", "t/echo/0", "@@home").stdout == b"@home"  # @@ is a literal @
    assert d.stop() == 0


def test_every_file_the_cli_reads_or_writes_is_named_in_its_error(daemon: Start, tmp_path: Path) -> None:
    d = daemon(component("t/echo/0", "echo"))
    missing = d.cli("call", "t/echo/0", f"@{tmp_path / 'nope.bin'}")
    assert missing.returncode == 1
    assert missing.stderr == (f"wasmhost: cannot read payload file {tmp_path / 'nope.bin'}: no such file (expected "
                              "@FILE to name a readable file; for a literal payload starting with @ write @@)\n")
    directory = d.cli("send", "t/echo/0", f"@{tmp_path}")
    assert directory.returncode == 1 and f"cannot read payload file {tmp_path}: is a directory" in directory.stderr
    unwritable = d.cli("call", "t/echo/0", "x", "-o", str(tmp_path / "no-dir" / "out"))
    assert unwritable.returncode == 1
    assert f"cannot write the reply to {tmp_path / 'no-dir' / 'out'}: no such file" in unwritable.stderr
    logs = wasmhost("logs", str(tmp_path / "missing.log"))
    assert logs.returncode == 1 and f"cannot read log file {tmp_path / 'missing.log'}: no such file" in logs.stderr
    status = wasmhost("status", "--config", str(tmp_path / "absent.toml"))
    assert status.returncode == 1
    assert f"cannot read the configuration {tmp_path / 'absent.toml'} to find the control socket" in status.stderr
    for result in (missing, directory, unwritable, logs, status):
        assert "Errno" not in result.stderr and "Traceback" not in result.stderr
    assert d.stop() == 0


# --- timeouts, end to end ---


SLEEPER = component("t/sleeper/0", "services", "mailbox_capacity = 1")


def test_send_on_a_full_mailbox_times_out_and_sends_nothing(daemon: Start) -> None:
    d = daemon(SLEEPER)
    busy = background(d, "call", "t/sleeper/0", "sleep 6000")
    wait_for(lambda: rows(d)["t/sleeper/0"]["in_hand"] == 1, "the sleep to be taken")
    assert d.cli("send", "t/sleeper/0", "time").returncode == 0  # fills the one slot
    row = rows(d)["t/sleeper/0"]
    assert (row["mailbox"], row["queued"], row["in_hand"]) == (2, 1, 1)  # MAILBOX counts the one in hand
    assert d.cli("status").stdout.splitlines()[1].split()[:5] == ["t/sleeper/0", "running", "healthy", "0", "2"]
    full = d.cli("send", "--timeout", "0.5", "t/sleeper/0", "self")
    assert full.returncode == 1
    assert full.stderr == ("wasmhost: timeout: the mailbox of t/sleeper/0 stayed full (1 messages) for 0.5 s: "
                           "the message was not sent\n")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as gone:  # a sender that hangs up while it waits
        gone.connect(str(d.socket))
        gone.sendall(protocol.frame(protocol.Send("t/sleeper/0", b"clock")))
    wait_for(lambda: any(e["event"] == "control_client_gone" and e["request"] == "Send" for e in d.events()),
             "the daemon to drop the send whose client went away")
    assert busy.communicate(timeout=30) == ("slept", "")
    wait_for(lambda: rows(d)["t/sleeper/0"]["mailbox"] == 0, "the queue to drain")
    row = rows(d)["t/sleeper/0"]
    assert row["handled"] + row["failed"] == 2  # the sleep and `time`: neither `self` nor `clock` was queued
    assert "(default: 30)" in d.cli("send", "--help").stdout
    assert d.stop() == 0


def test_a_call_that_times_out_is_withdrawn_or_its_reply_dropped(daemon: Start) -> None:
    d = daemon(component("t/sleeper/0", "services"))
    busy = background(d, "call", "t/sleeper/0", "sleep 5000")
    wait_for(lambda: rows(d)["t/sleeper/0"]["in_hand"] == 1, "the sleep to be taken")
    queued = d.cli("call", "--timeout", "1", "t/sleeper/0", "self")
    assert queued.returncode == 1
    assert queued.stderr == ("wasmhost: timeout: no reply from t/sleeper/0 within 1 s; the request was withdrawn "
                             "unhandled\n")
    assert busy.poll() is None  # answered while the component was still busy, not after
    assert rows(d)["t/sleeper/0"]["mailbox"] == 1  # only the sleep: the call left no message behind
    assert busy.communicate(timeout=30) == ("slept", "")
    taken = d.cli("call", "--timeout", "1", "t/sleeper/0", "sleep 2000")
    assert taken.returncode == 1
    assert "within 1 s; t/sleeper/0 was already handling it: its reply will be dropped" in taken.stderr
    wait_for(lambda: rows(d)["t/sleeper/0"]["handled"] == 2, "the taken call to finish")
    assert rows(d)["t/sleeper/0"]["handled"] == 2  # the two sleeps, never `self`
    assert "(default: 30)" in d.cli("call", "--help").stdout
    assert d.stop() == 0


def test_a_call_whose_client_goes_away_is_withdrawn(daemon: Start) -> None:
    d = daemon(component("t/sleeper/0", "services"))
    busy = background(d, "call", "t/sleeper/0", "sleep 4000")
    wait_for(lambda: rows(d)["t/sleeper/0"]["in_hand"] == 1, "the sleep to be taken")
    impatient = background(d, "call", "t/sleeper/0", "self")
    wait_for(lambda: rows(d)["t/sleeper/0"]["queued"] == 1, "the second call to be queued")
    impatient.kill()  # its connection closes: the daemon withdraws the queued request
    impatient.communicate()
    wait_for(lambda: rows(d)["t/sleeper/0"]["queued"] == 0, "the abandoned call to be withdrawn")
    assert busy.communicate(timeout=30) == ("slept", "")
    assert rows(d)["t/sleeper/0"]["handled"] == 1
    assert any(e["event"] == "control_client_gone" for e in d.events())
    assert d.stop() == 0


def test_requests_pipelined_on_one_connection_are_all_answered_in_order(daemon: Start) -> None:
    """The daemon watches a connection for a hang-up while it answers a call; a client that sends its
    next request meanwhile is no hang-up, and that request is read whole."""
    d = daemon(component("t/sleeper/0", "services"))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(30)
        conn.connect(str(d.socket))
        conn.sendall(protocol.frame(protocol.Call("t/sleeper/0", b"sleep 2000", 10.0)))
        wait_for(lambda: rows(d)["t/sleeper/0"]["in_hand"] == 1, "the sleep to be taken")
        conn.sendall(protocol.frame(protocol.Call("t/sleeper/0", b"self", 10.0)) + protocol.frame(protocol.Status()))
        stream = conn.makefile("rb")
        answers = []
        for _ in range(3):
            length = protocol.frame_length(stream.read(protocol.LENGTH.size), protocol.MAX_RESPONSE_FRAME)
            answers.append(protocol.response_decoder.decode(stream.read(length)))
    assert [a.ok for a in answers] == [True, True, True]
    assert answers[0].data == b"slept" and answers[1].data == b"t/sleeper/0"
    assert answers[2].data["components"][0]["id"] == "t/sleeper/0"
    assert d.stop() == 0


# --- many clients at once ---


def test_a_thousand_concurrent_clients_are_all_answered(daemon: Start) -> None:
    d = daemon(component("t/echo/0", "echo"))
    go = threading.Barrier(1000 + 1)

    def client(n: int) -> bytes:
        go.wait(timeout=60)
        message = protocol.Call("t/echo/0", str(n).encode(), 30.0) if n % 2 else protocol.Status()
        answer = request(d.socket, message, timeout=60.0)
        assert answer.ok, answer.error
        return answer.data if n % 2 else b"status"

    with ThreadPoolExecutor(max_workers=1000) as pool:
        answers = [pool.submit(client, n) for n in range(1000)]
        go.wait(timeout=60)  # all thousand connect at once ...
        clis = [background(d, "call", "t/echo/0", f"cli {n}") for n in range(4)]  # ... with real CLI processes
        results = [a.result(timeout=120) for a in answers]
    assert results == [str(n).encode() if n % 2 else b"status" for n in range(1000)]
    assert [p.communicate(timeout=60) for p in clis] == [(f"cli {n}", "") for n in range(4)]
    assert d.stop() == 0


def test_the_client_retries_while_the_accept_queue_is_full(tmp_path: Path) -> None:
    path = tmp_path / "slow.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(0)
    fillers = []
    while True:  # fill the queue: a further connection is refused with EAGAIN
        filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        filler.setblocking(False)
        try:
            filler.connect(str(path))
        except BlockingIOError:
            filler.close()
            break
        fillers.append(filler)
    with pytest.raises(DaemonUnavailable, match="accepted no connection in time"):
        request(path, protocol.Status(), timeout=0.3)  # nobody accepts: a clear error once the time is up

    def serve() -> None:
        for _ in range(len(fillers) + 1):  # the fillers first, in queue order, then the retrying client
            conn, _ = server.accept()
            conn.settimeout(10)
            if conn.recv(4096):
                conn.sendall(protocol.frame(protocol.Response(True, data="served"), protocol.MAX_RESPONSE_FRAME))
            conn.close()

    answered: list[str] = []
    asking = threading.Thread(target=lambda: answered.append(request(path, protocol.Status(), timeout=30).data))
    asking.start()  # refused with EAGAIN until the server below makes room
    accepting = threading.Thread(target=serve)
    accepting.start()
    for filler in fillers:
        filler.close()
    asking.join(30)
    accepting.join(30)
    server.close()
    assert answered == ["served"]


# --- status ---


def test_status_shows_one_line_per_component_and_only_what_is_true(daemon: Start, tmp_path: Path) -> None:
    d = daemon(component("t/echo/0", "echo") + component("t/trapper/0", "trapper", 'restart = "temporary"')
               + component("t/broken/0", "missing-exports"))
    assert d.cli("call", "t/trapper/0", "boom").returncode == 1
    wait_for(lambda: rows(d)["t/trapper/0"]["state"] == "failed", "the trapper to be given up on")
    table = d.cli("status").stdout.splitlines()
    assert len(table) == 4, table  # header + one line per component, the backtrace does not break rows
    by_id = {line.split()[0]: line.split(maxsplit=7) for line in table[1:]}
    assert by_id["t/trapper/0"][1:3] == ["failed", "-"]  # no health claimed for a dead instance
    assert by_id["t/trapper/0"][7].startswith("t/trapper/0: handle-message trapped: wasm trap: wasm `unreachable`")
    assert by_id["t/broken/0"][1:3] == ["failed", "-"]
    assert by_id["t/echo/0"][1:3] == ["running", "healthy"]
    full = rows(d)["t/trapper/0"]
    assert full["health"] is None and "wasm backtrace" in str(full["last_error"])  # --json has the whole text
    assert d.stop() == 0


def test_status_shows_stopping_while_a_component_drains(daemon: Start) -> None:
    d = daemon(component("t/sleeper/0", "services"))
    busy = background(d, "call", "t/sleeper/0", "sleep 3000")
    wait_for(lambda: rows(d)["t/sleeper/0"]["in_hand"] == 1, "the sleep to be taken")
    stopping = background(d, "stop", "t/sleeper/0")
    wait_for(lambda: rows(d)["t/sleeper/0"]["state"] == "stopping", "the drain to show as stopping")
    assert busy.communicate(timeout=30) == ("slept", "")  # drained: the message in hand was finished
    assert stopping.communicate(timeout=30)[0] == "stop: ok (stopped)\n"
    assert rows(d)["t/sleeper/0"]["state"] == "stopped"
    assert d.stop() == 0


def test_a_reader_that_stops_early_ends_the_command_quietly(daemon: Start, tmp_path: Path) -> None:
    d = daemon("".join(component(f"t/echo/{n}", "echo") for n in range(3)))
    (tmp_path / "events.log").write_text(d.log.read_text())
    for args in (("status", "--socket", str(d.socket)), ("call", "t/echo/0", "x", "--socket", str(d.socket)),
                 ("logs", str(tmp_path / "events.log"))):
        read_end, write_end = os.pipe()
        os.close(read_end)  # nobody will read: the first write fails with EPIPE
        result = subprocess.run([sys.executable, "-m", "wasmhost.cli", *args], stdout=write_end,
                                stderr=subprocess.PIPE, timeout=60, cwd=ROOT)
        os.close(write_end)
        assert (result.returncode, result.stderr) == (0, b""), args
    assert d.stop() == 0


# --- a trapping component: one line, the backtrace in the log and on request ---


def test_a_trap_is_one_line_and_the_backtrace_is_in_the_log_and_verbose(daemon: Start) -> None:
    d = daemon(component("t/trapper/0", "trapper") + component(
        "t/asker/0", "callback", 'capabilities = { request = ["t/trapper/0"] }'))
    plain = d.cli("call", "t/trapper/0", "boom")
    assert plain.returncode == 1
    assert plain.stderr == ("wasmhost: failed: t/trapper/0: handle-message trapped: wasm trap: wasm `unreachable` "
                            "instruction executed\n")
    wait_for(lambda: rows(d)["t/trapper/0"]["state"] == "running", "the trapper to be restarted")
    verbose = d.cli("call", "--verbose", "t/trapper/0", "boom")
    assert verbose.returncode == 1
    first, *trace = verbose.stderr.splitlines()
    assert first == plain.stderr.rstrip("\n")
    assert any("wasm backtrace" in line for line in trace) and len(trace) > 2
    wait_for(lambda: rows(d)["t/trapper/0"]["state"] == "running", "the trapper to be restarted again")
    correlation = d.call("t/asker/0", "t|trapper|0|boom")
    wait_for(lambda: d.call("t/asker/0", "?last-correlation") == correlation, "the outcome callback")
    outcome = json.loads(d.call("t/asker/0", "?last-payload"))
    assert outcome == {"outcome": "failed", "detail": "t/trapper/0: handle-message trapped: wasm trap: wasm "
                       "`unreachable` instruction executed"}
    assert d.stop() == 0
    restarting = [e for e in d.events() if e["event"] == "component_restarting"]
    assert restarting and all("wasm backtrace" in str(e["error"]) for e in restarting)


# --- a component that failed to load ---


def test_a_component_that_failed_to_load_says_so(daemon: Start) -> None:
    d = daemon(component("t/echo/0", "echo") + component("t/broken/0", "missing-exports"))
    for command in ("call", "send"):
        result = d.cli(command, "t/broken/0", "x")
        assert result.returncode == 1
        assert result.stderr.startswith("wasmhost: delivery-failed: t/broken/0 failed to load: "), result.stderr
        assert "missing-exports.wasm" in result.stderr and len(result.stderr.splitlines()) == 1
    assert "target-not-found: t/ghost/0" in d.cli("call", "t/ghost/0", "x").stderr
    assert d.stop() == 0


def test_start_loads_a_binary_fixed_after_it_failed_to_load(tmp_path: Path) -> None:
    components = tmp_path / "components"
    components.mkdir()
    (components / "thing.wasm").write_bytes((FIXTURES / "missing-exports.wasm").read_bytes())
    started: list[Daemon] = []
    try:
        d = launch(tmp_path, component("t/thing/0", "thing"), started, components)
        assert "t/thing/0 failed to load" in d.cli("call", "t/thing/0", "x").stderr
        (components / "thing.wasm").write_bytes((FIXTURES / "echo.wasm").read_bytes())  # the operator fixes it
        assert d.cli("start", "t/thing/0").returncode == 0
        after = d.cli("call", "t/thing/0", "hello")
        assert (after.returncode, after.stdout.strip()) == (0, "hello"), after.stderr
        assert d.stop() == 0
    finally:
        kill_leftovers(started)


# --- help and README ---


def test_the_readme_documents_every_command_and_option() -> None:
    readme = (ROOT / "README.md").read_text()
    sections = readme.split("\n### ")
    section = "".join(text for text in sections if text.startswith(("Control CLI\n", "Logs\n")))
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices  # type: ignore[attr-defined]
    for name, sub in commands.items():
        assert f"wasmhost {name}" in section, name
        for action in sub._actions:
            for option in action.option_strings:
                if option.startswith("--") and option not in ("--help",):
                    assert option in section, f"{name} {option}"
    run_help = wasmhost("run", "--help").stdout
    assert "--log-level" in run_help and "--log-format" in run_help


def test_python_dash_m_wasmhost_is_the_wasmhost_command() -> None:
    """`python -m wasmhost` (a venv whose bin/ is not on PATH) ran nothing: "No module named
    wasmhost.__main__", exit 1."""
    result = subprocess.run([sys.executable, "-m", "wasmhost", "--version"], capture_output=True, text=True,
                            timeout=60, cwd=ROOT)
    assert (result.returncode, result.stdout.strip()) == (0, f"wasmhost {__version__}"), result.stderr


# --- logs: the console format, and the journal ---


def test_logs_reads_the_console_format(daemon: Start, tmp_path: Path) -> None:
    d = daemon(component("t/logger/0", "logger") + component("t/trapper/0", "trapper"),
               host={'log_format = "json"': 'log_format = "console"'})
    assert d.cli("call", "t/logger/0", "hello from the guest").returncode == 0
    assert d.cli("call", "t/trapper/0", "boom").returncode == 1
    assert d.stop() == 0
    assert not d.log.read_text().startswith("{")  # really the console format
    guest = wasmhost("logs", str(d.log), "--component", "t/log*", "--grep", "hello")
    assert guest.returncode == 0
    assert "hello from the guest" in guest.stdout and "[t/logger/0]" in guest.stdout
    assert "source=logger" in guest.stdout
    as_json = [json.loads(line) for line in wasmhost("logs", str(d.log), "--json").stdout.splitlines()]
    events = [e["event"] for e in as_json]
    assert "daemon_ready" in events and "component_restarting" in events and events[-1] == "stopped"
    ready = next(e for e in as_json if e["event"] == "daemon_ready")
    assert ready["summary"] == "2 running" and ready["level"] == "info"
    warnings = wasmhost("logs", str(d.log), "--level", "warning", "--json").stdout.splitlines()
    assert warnings and all(json.loads(line)["level"] in ("warning", "error") for line in warnings)


def follower(log: Path, *args: str) -> subprocess.Popen[str]:
    """`wasmhost logs LOG --follow ARGS...`, running while the test goes on."""
    return subprocess.Popen([sys.executable, "-m", "wasmhost.cli", "logs", str(log), "--follow", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def follower_output(reader: subprocess.Popen[str], until: str, seconds: float = 10.0) -> str:
    """What `wasmhost logs --follow` printed until a line containing `until` (or `seconds` passed)."""
    assert reader.stdout is not None
    out = ""
    deadline = time.monotonic() + seconds
    while until not in out and time.monotonic() < deadline:
        if select.select([reader.stdout], [], [], 0.1)[0]:
            out += os.read(reader.stdout.fileno(), 65536).decode()
    return out


def test_logs_follow_waits_for_the_rest_of_a_half_written_line(tmp_path: Path) -> None:
    log = tmp_path / "growing.log"
    log.write_text("")
    reader = follower(log)
    try:
        line = json.dumps({"event": "split_line", "level": "info", "timestamp": "2026-01-01T00:00:00Z"}) + "\n"
        with log.open("a") as out:
            out.write(line[:20])
            out.flush()
            time.sleep(0.6)  # the follower reaches the end of the file (it looks every 0.2 s) mid-line
            out.write(line[20:] + line.replace("split_line", "next_line"))
        shown = follower_output(reader, "next_line")
        assert "split_line" in shown and "next_line" in shown
    finally:
        reader.kill()
        reader.wait()


def test_logs_follow_goes_on_after_logrotate_and_sigusr1(daemon: Start, tmp_path: Path) -> None:
    """logrotate moves the log file away and the daemon reopens it by its path on SIGUSR1; or, with
    copytruncate, the file is cut to nothing: `logs --follow` goes on reading the new lines."""
    log = tmp_path / "wasmhost.log"
    d = daemon(component("t/logger/0", "logger"), host={"[host]\n": f'[host]\nlog_file = "{log}"\n'})
    reader = follower(log, "--component", "t/logger/0")
    try:
        assert d.cli("call", "t/logger/0", "before rotation").returncode == 0
        assert "before rotation" in follower_output(reader, "before rotation")
        log.rename(tmp_path / "wasmhost.log.1")
        d.proc.send_signal(signal.SIGUSR1)
        wait_for(log.exists, "the daemon to reopen its log file")
        assert d.cli("call", "t/logger/0", "after rotation").returncode == 0
        assert "after rotation" in follower_output(reader, "after rotation")
        time.sleep(0.5)  # the follower waits at the end of the new file
        os.truncate(log, 0)  # copytruncate
        assert d.cli("call", "t/logger/0", "after truncation").returncode == 0
        assert "after truncation" in follower_output(reader, "after truncation")
    finally:
        reader.kill()
        reader.wait()


def test_logs_reads_the_journal_lines_of_a_real_daemon(tmp_path: Path) -> None:
    """`journalctl -u wasmhost -o cat` prints what the daemon wrote to stdout and stderr, line by line
    and unchanged: the same lines, captured from a real daemon under the default log_format (auto)."""
    config = tmp_path / "wasmhost.toml"
    config.write_text(config_text(tmp_path / "state", component("t/logger/0", "logger")
                                  + component("t/trapper/0", "trapper")).replace('log_format = "json"\n', ""))
    d = Daemon(tmp_path, config)
    d.expect("READY=1")
    assert d.cli("call", "t/logger/0", "journal line").returncode == 0
    assert d.cli("call", "t/trapper/0", "boom").returncode == 1
    assert d.stop() == 0
    journal = d.log.read_bytes()  # stdout and stderr, as journald stores them
    shown = wasmhost("logs", "-", "--level", "warning", stdin=journal)
    assert shown.returncode == 0 and shown.stderr == ""  # every line was one of ours
    assert "component_restarting" in shown.stdout and "[t/trapper/0]" in shown.stdout
    guest = wasmhost("logs", "-", "--component", "t/logger/0", "--json", stdin=journal)
    assert [json.loads(line)["event"] for line in guest.stdout.splitlines()] == [
        "compile_started", "compile_finished", "component_started", "journal line", "component_stopped"]
