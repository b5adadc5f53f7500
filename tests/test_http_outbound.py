"""Outbound HTTP end to end: a granted guest (tests/fixtures/wat/httpget.wat) sends real requests through
wasmtime's wasi:http to a real server in the test, beside an echo neighbour in a real daemon."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.test_daemon import component, daemon

__all__ = ["daemon"]  # the real-daemon fixture of test_daemon.py

GRANTED = component("t/echo/0", "echo") + component("t/web/0", "httpget", "outbound_http = true")


class Hello(BaseHTTPRequestHandler):
    """Answers every GET with 201 and a body naming the path."""

    def do_GET(self) -> None:
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
    with ThreadingHTTPServer(("127.0.0.1", 0), Hello) as httpd:
        thread = threading.Thread(target=httpd.serve_forever, daemon=True)
        thread.start()
        yield httpd
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
