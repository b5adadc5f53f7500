"""The two-host lattice demo (`make lattice`): a local nats-server and two wasmhost daemons, host A and
host B (host-a.toml, host-b.toml). Host A's demo/client/0 requests demo/server/0, which runs only on
host B, so the request and its reply cross NATS; then `wasmhost status --lattice` shows both hosts and
where each component runs, and `wasmhost call --lattice` calls the server as a plain NATS client.
Ctrl-C (or SIGTERM) stops both daemons, then nats-server.

The three processes run in sessions of their own, so a Ctrl-C in the terminal reaches only this script,
which stops them in order: the daemons first (they answer what they hold), NATS last.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
HOSTS = ("host-a", "host-b")
DEFAULT_PORT = 4322
"""The demo's NATS port (nats.conf; not 4222, so that a NATS server already running is left alone)."""
READY_TIMEOUT = 60.0
"""Seconds each process gets to become ready (a daemon compiles its components on first start)."""
LATTICE_TIMEOUT = 30.0
"""Seconds for host A to see host B's component in its directory, and for the reply to come back."""
STOP_TIMEOUT = 30.0
"""Seconds each process gets to exit after SIGTERM before it is killed."""
REQUEST = "hello from host-a"


class Stopped(Exception):
    """SIGINT or SIGTERM arrived: stop everything."""


def _stop_signal(signum: int, _frame: object) -> None:
    raise Stopped(signal.Signals(signum).name)


@dataclass
class Demo:
    """The processes started so far, stopped in reverse order by `stop`."""

    run_dir: Path
    procs: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start `argv` in a session of its own (the terminal's Ctrl-C is ours to forward), its output to
        RUN_DIR/NAME.log."""
        log = (self.run_dir / f"{name}.log").open("wb")
        with log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                    start_new_session=True)
        self.procs.append((name, proc))
        say(f"{name}: pid {proc.pid}, log {self.run_dir / f'{name}.log'}")
        return proc

    def stop(self) -> bool:
        """SIGTERM each process, newest first, waiting up to STOP_TIMEOUT for each (then SIGKILL); True
        when every one exited by itself."""
        clean = True
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
            try:
                code = proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
                clean = False
            say(f"{name}: exited ({code})")
        return clean


def say(text: str) -> None:
    """One line of the demo's story, flushed at once (a test reads it through a pipe)."""
    print(text, flush=True)


def host_config(template: Path, out: Path, state_dir: Path, components_dir: Path, url: str) -> Path:
    """Write a copy of `template` with absolute paths and the demo's NATS URL (the copy lives in the run
    directory, so relative paths would no longer point where the template meant)."""
    text = template.read_text()
    for key, value in (("state_dir", str(state_dir)), ("components_dir", str(components_dir)),
                       ("urls", [url])):
        text, count = re.subn(rf"(?m)^{key} = .*$", f"{key} = {_toml(value)}", text)
        if count != 1:
            raise SystemExit(f"{template}: expected exactly one `{key} = ...` line, found {count}")
    out.write_text(text)
    return out


def _toml(value: str | list[str]) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Until something accepts on 127.0.0.1:`port` (nats-server is ready), at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"nats-server exited ({proc.returncode}) before accepting connections on port {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"nats-server did not accept connections on port {port} within {timeout:g} s")
        time.sleep(0.05)


@contextlib.contextmanager
def notify_socket(path: Path) -> Iterator[socket.socket]:
    """A NOTIFY_SOCKET (the daemon says READY=1 there once its components run)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    try:
        yield sock
    finally:
        sock.close()
        path.unlink(missing_ok=True)


def wait_ready(notify: socket.socket, name: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Until the daemon sends READY=1 (at most `timeout` seconds; its exit ends the wait)."""
    deadline = time.monotonic() + timeout
    while True:
        notify.settimeout(min(1.0, max(0.01, deadline - time.monotonic())))
        with contextlib.suppress(TimeoutError):
            if b"READY=1" in notify.recv(4096).split(b"\n"):
                return
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited ({proc.returncode}) before it was ready: see its log")
        if time.monotonic() > deadline:
            raise SystemExit(f"{name} was not ready within {timeout:g} s: see its log")


def wasmhost(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the real CLI against `config`'s daemon, showing the command and what it printed."""
    shown = " ".join(a if re.fullmatch(r"[\w./:-]+", a) else f"'{a}'" for a in args[1:])
    say(f"$ wasmhost {args[0]} --config {config.name} {shown}")  # as run: --config is the command's option
    result = subprocess.run([sys.executable, "-m", "wasmhost.cli", args[0], "--config", str(config), *args[1:]],
                            capture_output=True, text=True, timeout=LATTICE_TIMEOUT + 10, cwd=ROOT)
    for line in (result.stdout + result.stderr).splitlines():
        say(f"  {line}".rstrip())
    return result


def wait_for_server(config: Path) -> None:
    """Until host A's lattice directory lists demo/server/0 running on host B (heartbeats and inventories
    take a moment), at most LATTICE_TIMEOUT seconds."""
    from wasmhost.system import protocol
    from wasmhost.system.client import request

    socket_path = _socket_of(config)
    deadline = time.monotonic() + LATTICE_TIMEOUT
    while True:
        response = request(socket_path, protocol.LatticeStatus(), timeout=10.0)
        if response.ok and any(row["id"] == "demo/server/0" and row["host"] == "host-b" and row["state"] == "running"
                               for row in response.data["components"]):
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"host-a did not see demo/server/0 on host-b within {LATTICE_TIMEOUT:g} s "
                             f"({response.error or response.data})")
        time.sleep(0.1)


def _socket_of(config: Path) -> Path:
    import tomllib

    host = tomllib.loads(config.read_text())["host"]
    return Path(host["state_dir"]) / host.get("control_socket", "wasmhost.sock")


def cross_host_request(config: Path) -> str:
    """demo/client/0 on host A requests demo/server/0 on host B; returns the payload of the callback
    that came back (waited for up to LATTICE_TIMEOUT seconds)."""
    if wasmhost(config, "call", "demo/client/0", f"demo|server|0|{REQUEST}").returncode:
        raise SystemExit("the request from demo/client/0 failed")
    deadline = time.monotonic() + LATTICE_TIMEOUT
    while True:  # the callback arrives asynchronously: ask the client until it has one
        result = subprocess.run([sys.executable, "-m", "wasmhost.cli", "call", "--config", str(config),
                                 "demo/client/0", "?last-payload"], capture_output=True, text=True,
                                timeout=LATTICE_TIMEOUT, cwd=ROOT)
        if result.returncode == 0 and result.stdout.strip():
            wasmhost(config, "call", "demo/client/0", "?last-payload")
            return result.stdout.strip()
        if time.monotonic() > deadline:
            raise SystemExit(f"no callback reached demo/client/0 within {LATTICE_TIMEOUT:g} s {result.stderr}")
        time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    """Start NATS and both hosts, show a request crossing hosts and the lattice status, wait for Ctrl-C."""
    parser = argparse.ArgumentParser(prog="config/lattice/demo.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="NATS client port (default: %(default)s)")
    parser.add_argument("--run-dir", type=Path, default=HERE / "state",
                        help="state, logs and generated configs (default: config/lattice/state)")
    parser.add_argument("--components", type=Path, default=ROOT / "config" / "build",
                        help="the built example components (default: config/build, from `make examples`)")
    args = parser.parse_args(argv)
    run_dir: Path = args.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    for needed in ("echo.wasm", "callback.wasm"):
        if not (args.components / needed).exists():
            raise SystemExit(f"{args.components / needed} is missing: run `make examples` first")
    signal.signal(signal.SIGINT, _stop_signal)
    signal.signal(signal.SIGTERM, _stop_signal)
    demo = Demo(run_dir)
    url = f"nats://127.0.0.1:{args.port}"
    sockets = contextlib.ExitStack()  # the daemons' NOTIFY_SOCKETs, kept until they exited
    try:
        nats = demo.spawn("nats-server", [str(Path(sys.executable).parent / "nats-server"), "-c",
                                          str(HERE / "nats.conf"), "-p", str(args.port)])
        wait_for_port(args.port, nats, READY_TIMEOUT)
        say(f"nats-server: ready on {url}")
        configs = {}
        for name in HOSTS:
            configs[name] = host_config(HERE / f"{name}.toml", run_dir / f"{name}.toml", run_dir / name,
                                        args.components.resolve(), url)
            notify = sockets.enter_context(notify_socket(run_dir / f"{name}.notify"))
            env = {**os.environ, "NOTIFY_SOCKET": str(run_dir / f"{name}.notify")}
            proc = demo.spawn(name, [sys.executable, "-m", "wasmhost.cli", "run", "--config",
                                     str(configs[name]), "--log-format", "json"], env)
            wait_ready(notify, name, proc, READY_TIMEOUT)
            say(f"{name}: ready")
        wait_for_server(configs["host-a"])
        reply = cross_host_request(configs["host-a"])
        say(f"cross-host reply: {reply}")
        wasmhost(configs["host-a"], "status", "--lattice")
        # The same server from a plain NATS client (the CLI itself here): no daemon in between.
        if wasmhost(configs["host-a"], "call", "--lattice", "demo/server/0", "hello over NATS").returncode:
            raise SystemExit("call --lattice demo/server/0 failed")
        say("lattice demo running: Ctrl-C stops both hosts and nats-server")
        while True:
            signal.pause()
    except Stopped as stop:
        say(f"{stop}: stopping")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the stop itself is bounded: let it finish
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        clean = demo.stop()
        sockets.close()
        say("stopped" if clean else "stopped (some had to be killed)")
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
