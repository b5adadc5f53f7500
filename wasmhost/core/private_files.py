"""Owner-only files and directories for everything wasmhost keeps on disk (state, storage, cache), and
reading files without being made to wait on a FIFO.

Modes are given explicitly and re-applied with chmod, so the result does not depend on the umask;
anything found looser than owner-only is tightened and the change is logged. Anything owned by another
user is refused (NotOwned), never tightened: its owner could still replace what is in it, and the cache
in it holds native code wasmtime runs.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import structlog

log = structlog.get_logger("wasmhost.files")

DIR_MODE = 0o700
FILE_MODE = 0o600


class NotOwned(PermissionError):
    """A path wasmhost keeps private belongs to another user (or is not what was expected)."""

    def __init__(self, path: Path | str, found: str) -> None:
        self.path = str(path)
        self.found = found
        self.expected = f"uid {os.geteuid()}"
        super().__init__(f"{path}: {found}, expected one owned by {self.expected} (the user wasmhost runs as) "
                         "that no other user can write: another user could replace what wasmhost reads from it")


def untrusted(st: os.stat_result, kind: int = stat.S_IFREG) -> str | None:
    """Why a file or directory with this (l)stat is not to be trusted, or None: it must be of `kind`,
    owned by this process's effective uid, and not writable by group or others."""
    if stat.S_IFMT(st.st_mode) != kind:
        return f"is not a {'directory' if kind == stat.S_IFDIR else 'regular file'} (mode {st.st_mode:o})"
    if st.st_uid != os.geteuid():
        return f"is owned by uid {st.st_uid}"
    if st.st_mode & 0o022:
        return f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


@contextlib.contextmanager
def own_file(path: str) -> Iterator[int]:
    """A descriptor of the file at `path`, checked to be a regular file of ours that only we can write (a
    symbolic link is refused, never followed), so that what is read through it is what was checked.
    Raises NotOwned, or OSError when it cannot be opened."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)  # NONBLOCK: a FIFO won't hang
    try:
        problem = untrusted(os.fstat(fd))
        if problem is not None:
            raise NotOwned(path, problem)
        yield fd
    finally:
        os.close(fd)


def read_own_file(path: str) -> bytes:
    """The whole content of the file at `path`, read through `own_file`'s checked descriptor."""
    with own_file(path) as fd:
        return _read_all(fd)


class NotRegularFile(OSError):
    """A path that is not a regular file where one is read (a FIFO or device would block or never end)."""

    def __init__(self, path: Path | str, kind: str) -> None:
        self.kind = kind
        """What is there instead, as read through the descriptor: "a directory" or "not a regular file"."""
        super().__init__(f"{path} is {kind}")


@contextlib.contextmanager
def regular_file(path: Path | str) -> Iterator[tuple[int, os.stat_result]]:
    """A descriptor of the regular file at `path` (anyone's) and its stat: opened without blocking and
    checked through that descriptor, so a FIFO or a device is refused (NotRegularFile) rather than
    waited on, even one swapped in after an earlier look at the path."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(path, "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file")
        yield fd, st
    finally:
        os.close(fd)


def read_regular_file(path: Path | str, limit: int | None = None) -> bytes:
    """The bytes of the regular file at `path` (a configuration, anyone's), read through `regular_file`.
    With `limit`, at most `limit + 1` bytes are read: more than `limit` says the file is too large,
    without reading (and holding) all of a file that may be any size."""
    with regular_file(path) as (fd, _):
        return _read_all(fd, limit)


def _read_all(fd: int, limit: int | None = None) -> bytes:
    """Everything from `fd` (at most `limit + 1` bytes with a `limit`), without Python's file objects: a
    cached start reads one small note so, in 8 us against 31 us through pathlib."""
    chunks = []
    left = -1 if limit is None else limit + 1
    while left and (chunk := os.read(fd, 1 << 20 if left < 0 else min(left, 1 << 20))):
        chunks.append(chunk)
        left = left - len(chunk) if left > 0 else left
    return b"".join(chunks)


def private_dir(path: Path, mode: int = DIR_MODE, group: int | None = None) -> Path:
    """Create `path` (and missing parents) and make it `mode` (owner-only by default).

    `group`, when given, becomes the directory's group (for a control socket a group may reach).
    Raises OSError when it cannot be created or changed, NotADirectoryError when something else is at
    `path`: that is left as it is (a state_dir naming a file by mistake made it 0700).
    """
    if not path.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):  # created meanwhile, or something else is there (below)
            os.mkdir(path, mode)
        if not path.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(path))
    _tighten(path, mode)
    if group is not None and os.stat(path).st_gid != group:
        os.chown(path, -1, group)
    return path


def private_file(path: Path, mode: int = FILE_MODE) -> Path:
    """Create `path` empty if it is missing, and make it `mode` (owner-only by default)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, mode)
    os.close(fd)
    _tighten(path, mode)
    return path


def tighten_if_present(path: Path, mode: int = FILE_MODE) -> None:
    """Make an existing `path` `mode` if it is looser; a missing one is fine."""
    with contextlib.suppress(FileNotFoundError):
        _tighten(path, mode)


def _tighten(path: Path, mode: int) -> None:
    """Make `path` `mode` after checking it is ours; raises NotOwned when it is not."""
    current = stat.S_IMODE(_own(path).st_mode)
    if current != mode:
        os.chmod(path, mode)
        if current & ~mode:  # only a looser mode is worth the operator's attention
            log.warning("permissions_tightened", path=str(path), was=f"{current:04o}", now=f"{mode:04o}")


def _own(path: Path) -> os.stat_result:
    """The stat of `path`, checked to be owned by us: a symbolic link only when root or we own it (nobody
    else can point it elsewhere; systemd's StateDirectory= with DynamicUser= is one, owned by root),
    and then what it points to. Raises NotOwned naming the path and its owner."""
    found = os.lstat(path)
    if stat.S_ISLNK(found.st_mode):
        if found.st_uid not in (0, os.geteuid()):
            raise NotOwned(path, f"is a symbolic link owned by uid {found.st_uid}")
        found = os.stat(path)
    if found.st_uid != os.geteuid():
        raise NotOwned(path, f"is owned by uid {found.st_uid}")
    return found
