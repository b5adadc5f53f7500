"""What WASI 0.2 gives an untrusted guest, tried by a hostile one (the `wasiprobe` fixture, which imports
wasi:sockets, wasi:clocks, wasi:io/poll and wasi:random directly): what it is denied, what bounds it, and
what its neighbours see while it waits inside a WASI call."""

from __future__ import annotations

import os
import socket

import pytest

from tests.conftest import Starter
from tests.test_runtime_calls import message
from wasmhost.core.errors import GuestTrap

ACCESS_DENIED = 1  # wasi:sockets/network error-code `access-denied`
NO_ERROR = 255  # what the fixture answers when every socket was made


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("kind", [b"t", b"u"])
def test_a_guest_gets_no_socket_and_no_file_descriptor(start: Starter, kind: bytes) -> None:
    # wasmtime's WASI allows TCP and UDP but denies every address; wasmhost grants none. Were sockets
    # made, each would be one of the daemon's file descriptors until the guest dropped it.
    probe = start("wasiprobe", "evil/wasiprobe/0")
    probe.handle_message(message(kind + b"1"))  # the first call may start WASI's own runtime (its fds)
    before = open_fds()
    assert probe.handle_message(message(kind + b"1000")) == b"0 %d" % ACCESS_DENIED
    assert open_fds() == before


@pytest.mark.parametrize("kind", [b"c", b"b"])
def test_a_guest_cannot_reach_or_bind_a_local_port(start: Starter, kind: bytes) -> None:
    with socket.socket() as listener:  # a local service (as the metrics port or nats-server would be)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        probe = start("wasiprobe", "evil/wasiprobe/0")
        # 100 + code: refused when the socket is created, before any address is tried
        assert probe.handle_message(message(kind + b"%d" % port)) == b"%d" % (100 + ACCESS_DENIED)
        listener.settimeout(0)
        with pytest.raises(BlockingIOError):
            listener.accept()


def test_random_bytes_are_capped_by_wasmtime(start: Starter) -> None:
    probe = start("wasiprobe", "evil/wasiprobe/0")
    assert probe.handle_message(message(b"r4096")) == b"4096"
    with pytest.raises(GuestTrap, match="requested len 67108865 exceeds limit 67108864"):
        probe.handle_message(message(b"r67108865"))  # checked before anything is allocated


def test_pollables_a_guest_hoards_are_capped_by_wasmtime(start: Starter) -> None:
    probe = start("wasiprobe", "evil/wasiprobe/0")
    assert probe.handle_message(message(b"h1000")) == b"1000"
    with pytest.raises(GuestTrap, match="handle limit exceeded"):
        probe.handle_message(message(b"h200000"))
