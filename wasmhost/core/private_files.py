"""Owner-only files and directories for everything wasmhost keeps on disk (state, storage, cache).

Modes are given explicitly and re-applied with chmod, so the result does not depend on the umask;
anything found looser than owner-only is tightened and the change is logged.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

import structlog

log = structlog.get_logger("wasmhost.files")

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: Path, mode: int = DIR_MODE, group: int | None = None) -> Path:
    """Create `path` (and missing parents) and make it `mode` (owner-only by default).

    `group`, when given, becomes the directory's group (for a control socket a group may reach).
    Raises OSError when it cannot be created or changed.
    """
    if not path.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):  # created meanwhile (or not a directory: used later, reported)
            os.mkdir(path, mode)
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
    current = stat.S_IMODE(os.stat(path).st_mode)
    if current != mode:
        os.chmod(path, mode)
        if current & ~mode:  # only a looser mode is worth the operator's attention
            log.warning("permissions_tightened", path=str(path), was=f"{current:04o}", now=f"{mode:04o}")
