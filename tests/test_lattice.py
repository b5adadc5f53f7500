"""The lattice end to end: real daemons (subprocesses) on a real nats-server, loopback only."""

from __future__ import annotations

import time
from pathlib import Path

from tests import lattice_support
from tests.lattice_support import NatsServer, lattice_daemon, wait_for_log
from tests.test_daemon import Daemon, component

nats_server = lattice_support.nats_server  # the fixtures this module uses
daemons = lattice_support.daemons

ECHO = component("t/echo/0", "echo")


def until(what: str, check: object, timeout: float = 30.0) -> object:
    """Call `check` until it returns something true (bounded); that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()  # type: ignore[operator]
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.05)  # the daemons are subprocesses: polling their answers is all there is


def test_a_host_calls_a_component_on_another_host(tmp_path: Path, nats_server: NatsServer,
                                                  daemons: list[Daemon]) -> None:
    a = lattice_daemon(tmp_path / "a", ECHO, [nats_server.url], "host-a", daemons)
    b = lattice_daemon(tmp_path / "b", component("t/other/0", "counter"), [nats_server.url], "host-b", daemons)
    wait_for_log(b, "lattice_connected")
    until("b sees the echo", lambda: b.cli("call", "t/echo/0", "across").stdout.rstrip("\n") == "across")
    assert a.stop() == 0 and b.stop() == 0
