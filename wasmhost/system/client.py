"""A blocking client of the control socket, for the CLI."""

from __future__ import annotations

import contextlib
import random
import socket
import time
from pathlib import Path

import msgspec

from wasmhost.system.protocol import (
    LENGTH,
    MAX_RESPONSE_FRAME,
    FrameError,
    Request,
    Response,
    frame,
    frame_length,
    response_decoder,
)

CONNECT_RETRY_FIRST = 0.002
"""Seconds before the first retry of a connection the daemon's full accept queue refused (EAGAIN)."""
CONNECT_RETRY_MAX = 0.2
"""Longest pause between two such retries (the pauses double up to it, with jitter)."""


class DaemonUnavailable(Exception):
    """Nothing is listening on the control socket, or it did not answer in time."""


class NoAnswer(DaemonUnavailable):
    """The daemon took the request but did not answer within the client's timeout (it may still be
    carrying it out: a stop draining its component, a reload)."""


def _connect(sock: socket.socket, path: Path, deadline: float) -> None:
    """Connect, retrying with backoff while the daemon's accept queue is full, until `deadline`."""
    pause = CONNECT_RETRY_FIRST
    while True:
        try:
            sock.connect(str(path))
            return
        except (FileNotFoundError, ConnectionRefusedError):
            raise DaemonUnavailable(f"no wasmhost daemon is listening on {path}") from None
        except PermissionError:
            raise DaemonUnavailable(f"not allowed to connect to {path} (permission denied)") from None
        except (BlockingIOError, InterruptedError):  # EAGAIN: a burst of clients filled the queue
            left = deadline - time.monotonic()
            if left <= 0:
                raise DaemonUnavailable(f"the daemon on {path} accepted no connection in time: "
                                        "its queue of waiting clients stayed full") from None
            time.sleep(min(left, pause * random.uniform(0.5, 1.5)))  # jitter: retries do not arrive in step
            pause = min(pause * 2, CONNECT_RETRY_MAX)
        except TimeoutError:
            raise
        except OSError as exc:
            # Not a directory, a path too long for a socket, a symlink loop: before, printed without the
            # path (`wasmhost: [Errno 20] Not a directory`, `wasmhost: AF_UNIX path too long`).
            reason = exc.strerror.lower() if exc.strerror else str(exc)
            raise DaemonUnavailable(f"cannot connect to the control socket {path}: {reason}") from None


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
    """Send one request and wait for its response, all within `timeout` seconds (an oversized request
    raises FrameError unsent; no answer in time, a connection closed without one, or an answer that is
    no wasmhost answer, raises DaemonUnavailable: before, a daemon stopping left its queued clients with
    `[Errno 104] Connection reset by peer`)."""
    data = frame(message)
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        _connect(sock, path, deadline)
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        with contextlib.suppress(BrokenPipeError):  # refused before reading: its answer is waiting
            sock.sendall(data)
        length = frame_length(_read_exactly(sock, LENGTH.size), MAX_RESPONSE_FRAME)
        return response_decoder.decode(_read_exactly(sock, length))
    except TimeoutError:
        raise NoAnswer(f"no answer from the daemon on {path} within {timeout:g} s") from None
    except ConnectionError:  # reset or closed: a daemon stopping ends the connections it has not served
        raise DaemonUnavailable(f"the daemon on {path} closed the connection without answering (is it "
                                "stopping?); the request may not have been carried out") from None
    except (FrameError, msgspec.DecodeError) as exc:
        # Another program's socket (a --socket typo): before, a FrameError traceback, or msgspec's words
        # alone (`wasmhost: Expected `object`, got `int``).
        raise DaemonUnavailable(f"{path} answered with something that is not a wasmhost control answer "
                                f"({exc}); is it a wasmhost daemon's control socket?") from None
    finally:
        sock.close()
