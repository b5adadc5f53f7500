"""StateLock: one daemon per state_dir.

Two daemons on one state_dir would deploy against one storage database, each keeping its own read
cache of it (storage/read_cache.py) that the other's writes never reach: a guest could read a value
another daemon had already replaced. The control socket cannot tell (it may live elsewhere), so
`run` holds an exclusive `flock` on `state_dir/daemon.lock` for its whole life; the kernel lets go
of it when the process ends, however it ends (kill -9 included), so a stale lock never blocks a
restart. The file holds the holder's pid, for the error message.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

import structlog

log = structlog.get_logger("wasmhost.daemon")

LOCK_NAME = "daemon.lock"


class StateDirInUse(Exception):
    """Another live daemon holds the state directory."""


class StateLock:
    """The held lock of one state directory; `release` (or the process's end) lets go of it."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise StateDirInUse naming the holder's pid. A lock file that cannot be
        made at all (an unusable state_dir) is logged and not held: storage reports that directory's
        trouble as io-errors, as it always has."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            log.warning("state_lock_unavailable", path=str(self.path), error=str(exc))
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                log.warning("state_lock_unavailable", path=str(self.path), error=str(exc))
                return
            raise StateDirInUse(f"{self.path.parent}: another wasmhost daemon{holder} uses this state_dir; "
                                "give each daemon its own state_dir") from None
        self._fd = fd
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:  # a full disk: the lock is held all the same, only the message loses the pid
            pass

    def release(self) -> None:
        """Let go of the lock (closing the file does); the file stays, the next daemon reuses it."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _read_pid(fd: int) -> str:
    """' (pid N)' from the lock file's content, or '' when it says nothing usable."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return f" (pid {text})" if text.isdigit() else ""
