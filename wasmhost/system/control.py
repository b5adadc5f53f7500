"""The control socket: a Unix socket answering length-prefixed msgspec frames."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import msgspec
import structlog

from wasmhost.system.protocol import (
    LENGTH,
    MAX_RESPONSE_FRAME,
    Call,
    FrameError,
    Request,
    Response,
    Send,
    frame,
    frame_length,
    request_decoder,
)

log = structlog.get_logger("wasmhost.control")

FRAME_TIMEOUT = 10.0
"""Seconds a client may take to send one whole frame once it started (slow clients are dropped)."""
IDLE_TIMEOUT = 300.0
"""Seconds a connection may sit idle between requests before it is closed."""
ANSWER_TIMEOUT = 1.0
"""Seconds `close` waits for requests being answered (a `call` answered as the daemon stops) to be sent."""
BACKLOG = 4096
"""Connections the kernel queues before the daemon accepts them (capped by net.core.somaxconn): a burst of
a thousand clients is queued, not refused with EAGAIN (clients also retry, see client.py)."""

Handler = Callable[[Request], Awaitable[Response]]


class SocketInUse(Exception):
    """Another live process is listening on the control socket path."""


def bind_control_socket(path: Path, mode: int, gid: int | None = None) -> socket.socket:
    """A listening Unix socket at `path`, with `mode` (and group `gid`) set before it listens.

    A stale socket file from a crashed run is replaced; a live one is not stolen.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK):
                raise
            path.unlink(missing_ok=True)
        else:
            raise SocketInUse(f"{path}: another wasmhost is listening there")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o777 ^ mode)  # created with the final mode: never briefly wider
    try:
        sock.bind(str(path))
    finally:
        os.umask(old_umask)
    os.chmod(path, mode)
    if gid is not None:
        os.chown(path, -1, gid)
    sock.listen(BACKLOG)
    sock.setblocking(False)
    return sock


class ControlServer:
    """Serves control requests; a bad frame gets an error answer and its connection is closed."""

    def __init__(self, path: Path, mode: int, handler: Handler, gid: int | None = None,
                 frame_timeout: float = FRAME_TIMEOUT, idle_timeout: float = IDLE_TIMEOUT,
                 allowed_uids: frozenset[int] | None = None) -> None:
        self.path = path
        self.allowed_uids = allowed_uids
        self.mode = mode
        self.gid = gid
        self.frame_timeout = frame_timeout
        self.idle_timeout = idle_timeout
        self.handler = handler
        self._server: asyncio.Server | None = None
        self._inode: int | None = None
        self._answering = 0  # requests read and not yet answered
        self._answered = asyncio.Event()  # set whenever _answering drops to 0

    async def start(self) -> None:
        """Bind and start accepting connections."""
        sock = bind_control_socket(self.path, self.mode, self.gid)
        self._inode = os.stat(self.path).st_ino
        self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=2**16,
                                                   backlog=BACKLOG)  # it listens again, with its own default

    async def close(self) -> None:
        """Stop accepting and remove the socket file (if it is still ours)."""
        if self._server is not None:
            self._server.close()
            with anyio.move_on_after(ANSWER_TIMEOUT):  # answers already decided (stop answers every message) go out
                while self._answering:
                    self._answered.clear()
                    await self._answered.wait()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:
                self.path.unlink()

    def _refusal(self, writer: asyncio.StreamWriter) -> str | None:
        """Why this peer may not control the daemon (SO_PEERCRED), or None."""
        if self.allowed_uids is None:
            return None
        sock = writer.get_extra_info("socket")
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", creds)
        if uid in self.allowed_uids:
            return None
        log.warning("control_peer_refused", uid=uid, pid=pid)
        return f"permission denied: uid {uid} is not allowed to control this daemon (host.control_users)"

    async def _handle_unless_gone(self, request: Request, reader: asyncio.StreamReader
                                  ) -> tuple[Response | None, bytes]:
        """Answer a call or send, cancelling it if its client hangs up first (its message is then
        withdrawn from the mailbox unless the component already took it): (None, b"") then. Also
        returns the first byte of a next request the client sent meanwhile (pipelined)."""
        handling = asyncio.ensure_future(self.handler(request))
        watching = asyncio.ensure_future(reader.read(1))
        try:
            await asyncio.wait((handling, watching), return_when=asyncio.FIRST_COMPLETED)
            if not handling.done() and (watching.exception() is not None or not watching.result()):
                handling.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await handling
                log.info("control_client_gone", request=type(request).__name__, id=getattr(request, "id", None))
                return None, b""
            return await handling, (await watching if watching.done() else b"")
        finally:
            for task in (handling, watching):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                        await task

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            refusal = self._refusal(writer)
            if refusal is not None:
                await _answer(writer, Response(False, refusal))
                return
            early = b""  # a byte of the next request, read while watching for a hang-up
            while True:
                try:
                    header = await _read_exactly_or_eof(reader, LENGTH.size, self.idle_timeout, self.frame_timeout,
                                                        early)
                except TimeoutError:
                    return
                if header is None:
                    return
                try:
                    length = frame_length(header)
                    body = await asyncio.wait_for(reader.readexactly(length), self.frame_timeout)
                    request = request_decoder.decode(body)
                except FrameError as exc:
                    await _answer(writer, Response(False, f"bad frame: {exc}"))
                    return
                except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                    await _answer(writer, Response(False, f"malformed request: {exc}"))
                    return
                except TimeoutError:
                    await _answer(writer, Response(False, f"incomplete frame after {self.frame_timeout:g} s"))
                    return
                self._answering += 1
                try:
                    try:
                        if isinstance(request, Call | Send):
                            response, early = await self._handle_unless_gone(request, reader)
                        else:  # a reload or stop is carried out even if its client does not wait for it
                            response, early = await self.handler(request), b""
                    except Exception as exc:  # a bug answering one request must not take the daemon down
                        log.exception("control_request_failed", request=type(request).__name__)
                        response, early = Response(False, f"internal error: {type(exc).__name__}: {exc}"), b""
                    if response is None:
                        return
                    await _answer(writer, response)
                finally:
                    self._answering -= 1
                    if not self._answering:
                        self._answered.set()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def _read_exactly_or_eof(reader: asyncio.StreamReader, size: int, idle: float, frame: float,
                               first: bytes = b"") -> bytes | None:
    """`size` bytes (starting with `first` if already read), or None on a clean end of stream before
    the first byte."""
    if not first:
        first = await asyncio.wait_for(reader.read(1), idle)
    if not first:
        return None
    rest = await asyncio.wait_for(reader.readexactly(size - 1), frame)
    return first + rest


async def _answer(writer: asyncio.StreamWriter, response: Response) -> None:
    try:
        data = frame(response, MAX_RESPONSE_FRAME)
    except FrameError as exc:
        data = frame(Response(False, str(exc)), MAX_RESPONSE_FRAME)
    writer.write(data)
    await writer.drain()
