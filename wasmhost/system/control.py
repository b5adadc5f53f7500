"""The control socket: a Unix socket answering length-prefixed msgspec frames."""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import cast

import anyio
import anyio.lowlevel
import msgspec
import structlog
from anyio.abc import SocketAttribute, SocketListener, SocketStream, TaskStatus, UNIXSocketStream

from wasmhost.system.protocol import (
    LENGTH,
    MAX_RESPONSE_FRAME,
    REQUEST_TYPES,
    Call,
    FrameError,
    Request,
    Response,
    Send,
    frame,
    frame_length,
    request_decoder,
)
from wasmhost.system.request_reader import RequestReader

log = structlog.get_logger("wasmhost.control")

FRAME_TIMEOUT = 10.0
"""Seconds a client may take to send one whole frame once it started (slow clients are dropped)."""
ANSWER_SEND_TIMEOUT = 30.0
"""Seconds a client may take to read one answer (a client that stops reading is dropped, and with it the
answer it held in the daemon: up to 32 MiB)."""
IDLE_TIMEOUT = 300.0
"""Seconds a connection may sit idle between requests before it is closed (within a quarter more, at most
a second: idle connections are swept, not timed one by one)."""
ANSWER_BUDGET = 256 * 1024 * 1024
"""Bytes of answers the daemon holds for clients still taking them. Beyond it, a new answer closes the
connection of the client that has taken nothing for STALLED_AFTER seconds the longest, and lets its
answer go (each stalled client held its answer for ANSWER_SEND_TIMEOUT: 1,000 `status` requests to a
daemon of 2,000 components that were never read held 410 MB for 30 s, 1,024 answers of 32 MiB would
hold 32 GiB)."""
STALLED_AFTER = 1.0
"""Seconds a client must have taken nothing of its answer before a new answer may close it for room."""
SEND_CHUNK = 256 * 1024
"""Bytes of an answer sent at a time (each chunk taken counts as progress)."""
ANSWER_TIMEOUT = 1.0
"""Seconds `close` waits for requests being answered (a `call` answered as the daemon stops) to be sent."""
YIELD_EVERY = 16
"""Requests a connection answers in a row before it lets the rest of the daemon run: requests read together
(one read brings up to 64 KiB: 3,000 small ones) and answered without waiting (a `status`, a refusal, an
answer the socket takes whole) never yield to the event loop otherwise (measured: 250 ms stalls)."""
BACKLOG = 4096
"""Connections the kernel queues before the daemon accepts them (capped by net.core.somaxconn): a burst of
a thousand clients is queued, not refused with EAGAIN (clients also retry, see client.py)."""

MAX_CONNECTIONS = 1024
"""Most control connections served at once; fewer when the open-file limit is low (half of it: systemd's
default soft limit of 1024 gives 512), so that clients cannot take the file descriptors the components'
storage and the daemon itself need. A new client beyond it closes the connection idle the longest, else
waits in the backlog up to BUSY_WAIT for one to end, else is answered `busy`."""
IDLE_GRACE = 1.0
"""Seconds a connection must have waited for a request before a new client may close it for its slot."""
BUSY_WAIT = 1.0
"""Seconds a client beyond MAX_CONNECTIONS waits for a connection to end before it is answered `busy`."""
ACCEPT_PAUSE = 0.1
"""Seconds the server pauses accepting after the system refused it a descriptor (EMFILE, ENFILE...)."""
LOG_INTERVAL = 60.0
"""Seconds between two lines of a warning clients can cause at will (`control_peer_refused`,
`control_accept_failed`, `control_answers_dropped`); each line counts the times since the last."""
_CLIENT_GONE = (anyio.IncompleteRead, anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError,
                ConnectionError, TimeoutError)
"""How a connection ends when its client goes away or stops keeping up: the end of that conversation, no error."""
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE})

Handler = Callable[[Request], Awaitable[Response]]


class _Throttled:
    """A warning written at most once per LOG_INTERVAL, each line with `times`: how often it happened
    since the last line (the first time is written at once)."""

    def __init__(self, event: str) -> None:
        self.event = event
        self.times = 0
        self.next_line = 0.0

    def note(self, **fields: object) -> None:
        self.times += 1
        now = time.monotonic()
        if now >= self.next_line:
            log.warning(self.event, times=self.times, **fields)
            self.times = 0
            self.next_line = now + LOG_INTERVAL


class _Outgoing:
    """An answer being sent: its cancel scope (deadline: send_timeout), size, and when its client last
    took a chunk."""

    __slots__ = ("dropped", "progressed", "scope", "size")

    def __init__(self, scope: anyio.CancelScope, size: int) -> None:
        self.scope = scope
        self.size = size
        self.progressed = time.monotonic()
        self.dropped = False


def _send_now(sock: socket.socket, data: bytes) -> int:
    """What of `data` the socket takes at once (0 when it would block or failed: the stream's own send then
    waits, or raises what anyio raises). Most answers fit the socket's buffer: sent so, they need no deadline
    scope and no checkpoint (measured: 11,000 -> 12,300 - 13,500 small calls/s through the socket)."""
    try:
        return sock.send(data, socket.MSG_DONTWAIT)
    except OSError:
        return 0


def connection_limit() -> int:
    """MAX_CONNECTIONS, or half the process's open-file limit when that is lower (at least 16)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(16, min(MAX_CONNECTIONS, soft // 2))


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
    sock.listen(BACKLOG)  # a burst of CLI calls waits in the backlog, accepted one by one
    sock.setblocking(False)
    return sock


class ControlServer:
    """Serves control requests; a bad frame gets an error answer and its connection is closed.

    `start` binds (errors show at once); `serve` then runs in its owner's task group and owns a task
    group of its own in which every connection is served; `close` ends both."""

    def __init__(self, path: Path, mode: int, handler: Handler, gid: int | None = None,
                 frame_timeout: float = FRAME_TIMEOUT, idle_timeout: float = IDLE_TIMEOUT,
                 allowed_uids: frozenset[int] | None = None, send_timeout: float = ANSWER_SEND_TIMEOUT,
                 max_connections: int | None = None, answer_budget: int = ANSWER_BUDGET,
                 stalled_after: float = STALLED_AFTER) -> None:
        self.path = path
        self.max_connections = connection_limit() if max_connections is None else max_connections
        self.answer_budget = answer_budget
        self.stalled_after = stalled_after
        self.allowed_uids = allowed_uids
        self.mode = mode
        self.gid = gid
        self.frame_timeout = frame_timeout
        self.idle_timeout = idle_timeout
        self.send_timeout = send_timeout
        self.handler = handler
        self._listener: SocketListener | None = None
        self._spare: int | None = None  # a descriptor held back for a client when the process has none left
        self._inode: int | None = None
        self._accepting = anyio.CancelScope()  # cancelled by `close`
        self._served = anyio.Event()  # `serve` has ended (or never ran)
        self._serving = False
        self._answering = 0  # requests read and not yet answered
        self._answered = anyio.Event()  # set whenever _answering drops to 0
        self._open = 0  # connections being served
        self._closed_one = anyio.Event()  # set whenever a connection ends
        self._refusing = False  # full for BUSY_WAIT already: new clients are answered `busy` at once
        self._idle: dict[RequestReader, float] = {}  # connections waiting for a request since, oldest first
        self._accept_failed = _Throttled("control_accept_failed")
        self._peer_refused = _Throttled("control_peer_refused")
        self._answers_dropped = _Throttled("control_answers_dropped")
        self._outgoing: dict[_Outgoing, None] = {}  # answers being sent, oldest first
        self._held = 0  # their bytes

    async def start(self) -> None:
        """Bind the socket (SocketInUse, OSError); connections are accepted once `serve` runs."""
        sock = bind_control_socket(self.path, self.mode, self.gid)
        self._inode = os.stat(self.path).st_ino
        self._listener = await SocketListener.from_socket(sock)
        self._take_spare()

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Accept and serve connections until `close`; then give requests being answered (a `call`
        answered as the daemon stops) up to ANSWER_TIMEOUT to go out, and end every connection."""
        listener = self._listener
        if listener is None:
            raise RuntimeError("ControlServer.serve before start")
        self._serving = True
        try:
            async with anyio.create_task_group() as connections:
                connections.start_soon(self._sweep_idle, name="control idle sweep")
                task_status.started()
                with self._accepting:
                    while True:
                        try:
                            stream = await self._accept(listener)
                        except anyio.ClosedResourceError:  # by `close`
                            break
                        if stream is None:
                            continue
                        self._open += 1
                        connections.start_soon(self._serve, stream)
                with anyio.move_on_after(ANSWER_TIMEOUT):
                    while self._answering:
                        self._answered = anyio.Event()
                        await self._answered.wait()
                connections.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await listener.aclose()
            self._drop_spare()
            self._served.set()

    async def close(self) -> None:
        """Stop accepting, wait (bounded by ANSWER_TIMEOUT) for `serve` to end, and remove the socket
        file (if it is still ours)."""
        # The listener is closed before the accept is cancelled. anyio's accept waits on a future its socket's
        # reader completes; cancelled, it leaves the reader registered until its task runs again, and a client
        # connecting in that turn of the loop had the reader complete the cancelled future (asyncio logged
        # InvalidStateError from `Future.set_result`). Closing the listener takes the reader away first.
        if self._listener is not None:
            await self._listener.aclose()
        self._accepting.cancel()
        if self._serving:
            with anyio.move_on_after(ANSWER_TIMEOUT + 1.0):
                await self._served.wait()
        else:
            self._drop_spare()
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:
                self.path.unlink()

    async def _accept(self, listener: SocketListener) -> SocketStream | None:
        """The next connection to serve, or None when there was none to serve this time (answered `busy`,
        or the system is out of descriptors: then after a pause, so that the loop does not spin).

        Never raises for a lack of resources: before, EMFILE from accept ended the server's task group
        and with it the daemon (measured: 400 idle connections under a limit of 200 open files killed it)."""
        # Room for one more, or made by closing an idle connection (it ends at the next turn of the loop)
        room = self._open < self.max_connections or self._close_idle()
        if not room and not self._refusing:
            with anyio.move_on_after(BUSY_WAIT):  # every connection is answering: wait for one to end
                while self._open >= self.max_connections:
                    self._closed_one = anyio.Event()
                    await self._closed_one.wait()
            room = self._open < self.max_connections
        self._refusing = not room  # still full after BUSY_WAIT: the clients waiting now are answered at once
        self._take_spare()  # if it was used and could not be taken again when its connection ended
        try:
            stream = await listener.accept()
        except anyio.BrokenResourceError as exc:
            cause = exc.__cause__
            if not isinstance(cause, OSError) or cause.errno not in _OUT_OF_RESOURCES:
                raise
            self._accept_failed.note(error=str(cause), connections=self._open)
            spared = await self._accept_with_spare(listener) if cause.errno in _OUT_OF_DESCRIPTORS else None
            if spared is None:
                self._close_idle()  # frees a descriptor for the clients waiting in the backlog
                await anyio.sleep(ACCEPT_PAUSE)
                return None
            stream = spared
        if not room and self._open >= self.max_connections:
            with anyio.CancelScope(shield=True):
                await self._refuse_busy(stream)
            return None
        return stream

    def _take_spare(self) -> None:
        """Hold a descriptor back (of /dev/null), unless one is held already or none is left."""
        if self._spare is None:
            with contextlib.suppress(OSError):
                self._spare = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)

    def _drop_spare(self) -> None:
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None

    async def _accept_with_spare(self, listener: SocketListener) -> SocketStream | None:
        """The waiting client, accepted in the descriptor held back for it, or None (none held, or taken
        first by another thread of the process, or the client gone).

        The daemon's descriptors may be held by what it cannot close: a guest granted outbound_http holds
        a socket per request in flight, for as long as wasmtime lets it wait (600 s). Before, such a guest
        locked out every new client, `wasmhost restart` (which gives its sockets back) included, whenever
        no idle connection was there to close."""
        if self._spare is None:
            return None
        self._drop_spare()
        try:
            conn, _address = listener.extra(SocketAttribute.raw_socket).accept()
        except OSError:
            return None
        conn.setblocking(False)
        return await UNIXSocketStream.from_socket(conn)  # as the listener's own accept makes it

    def _close_idle(self) -> bool:
        """Close the connection waiting longest for a request, if for IDLE_GRACE at least (it holds a slot
        doing nothing; one just accepted has its request on the way); False if there is none."""
        return self._end_idle_for(IDLE_GRACE)

    async def _sweep_idle(self) -> None:
        """Close the connections idle for idle_timeout, every quarter of it (at most every second), until the
        server's task group ends (a timeout armed around each wait for a request cost a cancel scope and a
        timer per call)."""
        interval = min(1.0, max(0.01, self.idle_timeout / 4))
        while True:
            await anyio.sleep(interval)
            while self._end_idle_for(self.idle_timeout):
                pass

    def _end_idle_for(self, seconds: float) -> bool:
        """End the connection waiting longest for a request if it has waited `seconds` at least (`_idle` is
        oldest first); False if none has."""
        oldest = next(iter(self._idle), None)
        if oldest is None or time.monotonic() - self._idle[oldest] < seconds:
            return False
        del self._idle[oldest]
        oldest.end()
        return True

    async def _refuse_busy(self, stream: SocketStream) -> None:
        """Answer `busy` without waiting (a small frame fits the socket's buffer) and close the connection."""
        answer = frame(Response(False, f"busy: the daemon serves at most {self.max_connections} control "
                                       "connections at once and all are answering requests; try again"),
                       MAX_RESPONSE_FRAME)
        _send_now(stream.extra(SocketAttribute.raw_socket), answer)
        await stream.aclose()

    def _refusal(self, sock: socket.socket) -> str | None:
        """Why the peer on `sock` may not control the daemon (SO_PEERCRED), or None."""
        if self.allowed_uids is None:
            return None
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", creds)
        if uid in self.allowed_uids:
            return None
        # Throttled: each refused connection wrote a line, and a refused user looping on connect wrote
        # 11,000 lines (1.4 MB) in 3 s; now the first is written, then a count a minute.
        self._peer_refused.note(uid=uid, pid=pid)
        return f"permission denied: uid {uid} is not allowed to control this daemon (host.control_users)"

    async def _answer_request(self, request: Request) -> Response:
        try:
            return await self.handler(request)
        except Exception as exc:  # a bug answering one request must not take the daemon down
            log.exception("control_request_failed", request=type(request).__name__)
            return Response(False, f"internal error: {type(exc).__name__}: {exc}")

    async def _answer(self, stream: SocketStream, response: Response, sock: socket.socket | None = None) -> None:
        """Send `response` (through `sock`, the stream's own socket, first when given); TimeoutError when the
        client does not take it within send_timeout."""
        try:
            data = frame(response, MAX_RESPONSE_FRAME)
        except FrameError as exc:
            data = frame(Response(False, str(exc)), MAX_RESPONSE_FRAME)
        sent = 0 if sock is None else _send_now(sock, data)
        if sent == len(data):
            return
        out = _Outgoing(anyio.CancelScope(deadline=anyio.current_time() + self.send_timeout), len(data) - sent)
        self._outgoing[out] = None
        self._held += out.size
        try:
            self._make_room(out)
            with out.scope:
                view = memoryview(data)  # chunks without copies (anyio sends any buffer)
                for start in range(sent, len(data), SEND_CHUNK):
                    await stream.send(cast(bytes, view[start:start + SEND_CHUNK]))
                    out.progressed = time.monotonic()
        finally:
            del self._outgoing[out]
            self._held -= out.size
        if out.scope.cancelled_caught:  # the deadline passed, or _make_room let it go
            if not out.dropped:
                log.warning("control_client_not_reading", bytes=len(data), seconds=self.send_timeout)
            raise TimeoutError

    def _make_room(self, new: _Outgoing) -> None:
        """While the answers held exceed answer_budget, let go of the one whose client has taken nothing
        for the longest, if for stalled_after at least (clients taking theirs are never cut off)."""
        now = time.monotonic()
        while self._held > self.answer_budget:
            stalled = [out for out in self._outgoing
                       if out is not new and not out.dropped and now - out.progressed >= self.stalled_after]
            if not stalled:
                break
            oldest = min(stalled, key=lambda out: out.progressed)
            oldest.dropped = True
            oldest.scope.cancel()
            oldest_size = oldest.size
            self._held -= oldest_size  # counted out now: its task lets go of it at its next turn
            oldest.size = 0
            self._answers_dropped.note(budget=self.answer_budget, bytes=oldest_size,
                                       reason="its client took nothing of it while newer answers needed the room")

    async def _serve(self, stream: SocketStream) -> None:
        try:
            sock = stream.extra(SocketAttribute.raw_socket)
            refusal = self._refusal(sock)
            if refusal is not None:
                await self._answer(stream, Response(False, refusal))
                return
            async with anyio.create_task_group() as connection:  # owns the reader's read-ahead task
                await self._converse(stream, RequestReader(sock, connection), sock)
                connection.cancel_scope.cancel()
        except _CLIENT_GONE:  # before the conversation: a refused peer gone before its refusal was sent
            pass
        except Exception:  # one connection's bug must not end the server (or the daemon's task group)
            log.exception("control_connection_failed")
        finally:
            with anyio.CancelScope(shield=True):
                await stream.aclose()
            self._take_spare()  # in the descriptor just closed, if the spare was used, before a guest takes it
            self._open -= 1
            self._closed_one.set()

    async def _converse(self, stream: SocketStream, reader: RequestReader, sock: socket.socket) -> None:
        """Read and answer requests one after another until the client ends, idles out or sends a bad frame."""
        served = 0
        try:
            while True:
                served += 1
                if served % YIELD_EVERY == 0:  # pipelined requests answered from the buffer never wait otherwise
                    await anyio.lowlevel.checkpoint()
                header = await self._read_header(reader)
                if header is None:
                    return
                try:
                    body = await self._take(reader, frame_length(header))
                    request = request_decoder.decode(body)
                except FrameError as exc:
                    await self._answer(stream, Response(False, f"bad frame: {exc}"))
                    return
                except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                    await self._answer(stream, Response(False, f"malformed request: {_expected(exc)}"))
                    return
                except TimeoutError:
                    await self._answer(stream, Response(False, f"incomplete frame after {self.frame_timeout:g} s"))
                    return
                self._answering += 1
                try:
                    if isinstance(request, Call | Send):
                        reader.arm(request)  # its client hanging up meanwhile cancels it: its message is withdrawn
                        try:  # from the mailbox unless the component already took it
                            response = await self._answer_request(request)
                        finally:
                            reader.answered()
                    else:  # a reload or stop is carried out even if its client does not wait for it
                        response = await self._answer_request(request)
                    await self._answer(stream, response, sock)
                finally:
                    self._answering -= 1
                    if not self._answering:
                        self._answered.set()
        except _CLIENT_GONE:
            return

    async def _read_header(self, reader: RequestReader) -> bytes | None:
        """The frame header, or None on a clean end of stream. A connection waiting for it is idle: `_sweep_idle`
        or `_close_idle` may end it meanwhile (its task group is cancelled)."""
        if not reader.ready:
            self._idle[reader] = time.monotonic()
            try:
                await reader.wait_for_bytes()
            finally:
                self._idle.pop(reader, None)
        if not reader.buffered(1):
            return None  # the stream ended
        return await self._take(reader, LENGTH.size)

    async def _take(self, reader: RequestReader, nbytes: int) -> bytes:
        """`nbytes` of the frame begun: within frame_timeout unless they are in hand already (the common case:
        a client sends a request whole; a timeout costs more than the read)."""
        if reader.buffered(nbytes):
            return await reader.take(nbytes)
        with anyio.fail_after(self.frame_timeout):
            return await reader.take(nbytes)


def _expected(exc: msgspec.DecodeError) -> str:
    """msgspec's text for a request it could not decode; for an unknown or missing `type`, which types
    there are (msgspec says only `Invalid value 'x' - at `$.type``)."""
    text = str(exc)
    if text.endswith("`$.type`") or text.endswith("field `type`"):
        text += f" (expected one of: {', '.join(REQUEST_TYPES)})"
    return text
