"""A blocking client of the control socket, for the CLI."""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

from wasmhost.system.protocol import (
    LENGTH,
    MAX_RESPONSE_FRAME,
    Request,
    Response,
    frame,
    frame_length,
    response_decoder,
)


class DaemonUnavailable(Exception):
    """Nothing is listening on the control socket."""


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        chunk = sock.recv(min(size, 1 << 20))
        if not chunk:
            raise ConnectionError("the daemon closed the connection")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def request(path: Path, message: Request, timeout: float = 60.0) -> Response:
    """Send one request and wait for its response (an oversized request raises FrameError unsent)."""
    data = frame(message)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise DaemonUnavailable(f"no wasmhost daemon is listening on {path}") from None
        except PermissionError:
            raise DaemonUnavailable(f"not allowed to connect to {path} (permission denied)") from None
        with contextlib.suppress(BrokenPipeError):  # refused before reading: its answer is waiting
            sock.sendall(data)
        length = frame_length(_read_exactly(sock, LENGTH.size), MAX_RESPONSE_FRAME)
        return response_decoder.decode(_read_exactly(sock, length))
    finally:
        sock.close()
