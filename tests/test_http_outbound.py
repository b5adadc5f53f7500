"""Outbound HTTP end to end: a granted guest (tests/fixtures/wat/httpget.wat) sends real requests through
wasmtime's wasi:http to a real server in the test, beside an echo neighbour in a real daemon."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.test_daemon import Daemon, component, daemon, kill_leftovers, launch
from tests.waits import wait_for
from wasmhost.system import protocol
from wasmhost.system.client import request

__all__ = ["daemon"]  # the real-daemon fixture of test_daemon.py

GRANTED = component("t/echo/0", "echo") + component("t/web/0", "httpget", "outbound_http = true")


class Hello(BaseHTTPRequestHandler):
    """Answers every GET with 201 and a body naming the path; `/gate` once gate_open is set."""

    gate_reached = threading.Event()
    gate_open = threading.Event()

    def do_GET(self) -> None:
        if self.path == "/gate":
            Hello.gate_reached.set()
            Hello.gate_open.wait(60)
        body = f"hello from the test server at {self.path}".encode()
        self.send_response(201)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[ThreadingHTTPServer]:
    """A real HTTP server on a free local port, served by a thread."""
    Hello.gate_reached.clear()
    Hello.gate_open.clear()
    with ThreadingHTTPServer(("127.0.0.1", 0), Hello) as httpd:
        thread = threading.Thread(target=httpd.serve_forever, daemon=True)
        thread.start()
        try:
            yield httpd
        finally:
            Hello.gate_open.set()
            httpd.shutdown()
            thread.join()


def test_a_granted_guest_gets_a_real_response_and_a_refused_port_is_a_clean_error(
        daemon: object, server: ThreadingHTTPServer) -> None:
    d = daemon(GRANTED)  # type: ignore[operator]
    port = server.server_address[1]
    assert d.call("t/web/0", f"get http://127.0.0.1:{port}/some/path?q=1") == (
        "201 hello from the test server at /some/path?q=1")
    with socket.socket() as bound:  # bound, never listening: a connection to it is refused at once
        bound.bind(("127.0.0.1", 0))
        closed = bound.getsockname()[1]
        assert d.call("t/web/0", f"get http://127.0.0.1:{closed}/") == "error connection-refused"
    assert d.call("t/echo/0", "still here") == "still here"
    assert d.call("t/web/0", f"get http://127.0.0.1:{port}/again") == "201 hello from the test server at /again"
    assert d.stop() == 0


def converse(sock: socket.socket, message: protocol.Request) -> protocol.Response:
    """One request and its answer on an open control connection (the daemon serves many per connection)."""
    sock.sendall(protocol.frame(message))
    header = sock.recv(protocol.LENGTH.size, socket.MSG_WAITALL)
    body = sock.recv(protocol.frame_length(header, protocol.MAX_RESPONSE_FRAME), socket.MSG_WAITALL)
    return protocol.response_decoder.decode(body)


@pytest.fixture
def started() -> Iterator[list[Daemon]]:
    daemons: list[Daemon] = []
    yield daemons
    kill_leftovers(daemons)


def test_a_guest_holding_every_descriptor_in_requests_leaves_the_operator_a_way_in(
        tmp_path: Path, started: list[Daemon], server: ThreadingHTTPServer) -> None:
    """Requests in flight hold a socket each in the daemon until they end (wasmtime's timeouts: 600 s) or the
    component's Store is dropped. Before, a guest sending more than the daemon's open-file limit allows
    (300 requests to a server that never answers, under a limit of 256) locked every new control client out
    while the open ones were busy: accept failed with EMFILE, there was no idle connection to close, and
    `wasmhost restart`, the remedy, could not even be asked for."""
    limited = ("-c", "import resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256)); "
                     "from wasmhost.cli import main; sys.exit(main())")
    d = launch(tmp_path, GRANTED + component("t/wait/0", "httpget", "outbound_http = true"), started,
               python_args=limited)
    port = server.server_address[1]
    gate = f"get http://127.0.0.1:{port}/gate".encode()
    with socket.socket() as silent, socket.socket(socket.AF_UNIX) as first, socket.socket(socket.AF_UNIX) as second:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1024)  # connections complete in the backlog and are never answered
        silent_url = f"http://127.0.0.1:{silent.getsockname()[1]}/"
        first.connect(str(d.socket))
        first.sendall(protocol.frame(protocol.Call(id="t/wait/0", payload=gate)))  # busy: not idle, not closed
        assert Hello.gate_reached.wait(30)
        second.connect(str(d.socket))
        for _ in range(300):
            assert converse(second, protocol.Send(id="t/web/0", payload=f"fire {silent_url}".encode())).ok
        # wasmtime connects them on threads of its own: the limit is reached a moment after the sends
        wait_for(lambda: len(os.listdir(f"/proc/{d.proc.pid}/fd")) >= 256, "the daemon holding all 256 descriptors", 30)
        # handled after the 300 (one mailbox, in order): no descriptor is left for its connection
        starved = converse(second, protocol.Call(id="t/web/0", payload=f"get http://127.0.0.1:{port}/".encode()))
        assert starved.data is not None and starved.data.startswith(b"error "), starved
        second.sendall(protocol.frame(protocol.Call(id="t/wait/0", payload=gate)))  # busy too
        # a new client (the CLI) is still served, and restarting the component gives its sockets back
        answer = request(d.socket, protocol.Call(id="t/echo/0", payload=b"still here"), timeout=10)
        assert answer.data == b"still here", answer
        assert request(d.socket, protocol.Restart(id="t/web/0"), timeout=10).ok
        Hello.gate_open.set()
    assert d.call("t/web/0", f"get http://127.0.0.1:{port}/back") == "201 hello from the test server at /back"
    assert d.stop() == 0
