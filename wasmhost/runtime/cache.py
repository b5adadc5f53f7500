"""Compilation cache: compiled components serialised to disk, keyed by wasm hash, wasmtime version
and engine settings; a corrupt or stale entry is recompiled, never fatal.

Deserializing an entry maps it as native code, and its key is predictable, so the cache trusts only
what no other user can have written: a cache directory owned by another user disables the cache (a
warning says so; components still compile), and an entry, load note or mark that is not a regular
file of ours, writable only by us, is refused, removed and made again.

wasmtime checks only an entry's headers and engine metadata, not its machine code, so damaged code
(zeros left by a power cut) would pass and crash the process at its first call, at every start. Each
entry therefore ends with the sha256 of the serialized bytes before it, checked on every read (a
mismatch is recompiled), and is written with fsync before and after its atomic rename.

Entries are pruned (`CompilationCache.prune`, run by `CachePruner` on a thread of its own): what the
running configuration uses always stays; any other entry (a removed component, an older version of a
binary, another wasmtime version or engine setting, whose keys can never be hits) goes once unused for
PRUNE_UNUSED_AFTER_S, or earlier, oldest first, while such entries take more than PRUNE_UNUSED_BYTES."""

from __future__ import annotations

import hashlib
import mmap
import os
import re
import stat
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import structlog
import wasmtime
from wasmtime import component as wc

from wasmhost.core.errors import CompileError
from wasmhost.core.private_files import NotOwned, own_file, private_dir, read_own_file, untrusted
from wasmhost.runtime.engine import RuntimeEngine

log = structlog.get_logger("wasmhost.cache")

DIGEST_SIZE = hashlib.sha256().digest_size
"""The sha256 trailer after an entry's serialized bytes."""

COMPILE_WAIT_S = 600.0
"""How long a load waits for another load's compilation of the same bytes (a 12 MB JavaScript guest
compiles in 10 to 30 s on two busy cores); the wait ends earlier when that compilation ends."""

PRUNE_UNUSED_AFTER_S = 7 * 86400.0
"""An entry no running component uses is removed once unused for this long (a week: time to roll back to
the version before without recompiling it, 10 to 65 s for a large guest)."""
PRUNE_UNUSED_BYTES = 1 << 30
"""Entries no running component uses are removed, oldest first, while they take more than this (1 GiB: some
25 versions of an 18 MB componentize-py guest, each 40 MB compiled)."""
PRUNE_GRACE_S = 3600.0
"""An unused entry written or used this recently stays whatever the size (another process, `wasmhost check`,
may have just compiled it for the next reload), and so does a temporary file (a write in progress)."""
_TOUCH_AFTER_S = 3600.0
"""An entry in use is marked as used now (its mtime) when its mark is older than this: one metadata write per
entry per hour at most, however often the daemon reloads."""
_CACHE_FILE = re.compile(r"(?P<key>[0-9a-f]{64})\.(?P<kind>cwasm|[A-Za-z0-9_-]+(?:\.ok)?)")
"""The names the cache writes: an entry `KEY.cwasm`, a load note `KEY.NAME`, a mark `KEY.TAG.ok`."""
_TEMP_FILE = re.compile(r"tmp[a-z0-9_]{8}\.tmp")
"""The temporary files `_write` makes (tempfile.mkstemp's names), left behind by a crash during a write."""


class _Compilation:
    """One compilation (or cache read) in progress, shared by every load of the same bytes meanwhile."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: wc.Component | None = None
        self.error: str | None = None
        """wasmtime's message when the bytes did not compile."""


def wasmtime_version() -> str:
    """The installed wasmtime-py version."""
    from importlib.metadata import version

    return version("wasmtime")


class CompilationCache:
    """Compiles components once per process and once per cache directory."""

    def __init__(self, engine: RuntimeEngine, directory: Path | None) -> None:
        self.engine = engine
        self.directory = directory
        self._salt = f"wasmtime={wasmtime_version()};{engine.settings.fingerprint()}".encode()
        self._memory: dict[str, wc.Component] = {}
        # Marks and notes by key, so that a prune removing a key's files drops what memory holds of it too
        self._marks: dict[str, set[str]] = {}
        self._listing: frozenset[str] | None = None  # the directory's names at the first is_marked
        self._notes: dict[str, dict[str, bytes]] = {}
        self._pending: dict[str, _Compilation] = {}
        self._lock = threading.Lock()
        self.hits = 0
        """Components found in memory or on disk."""
        self.misses = 0
        """Compilations: one per distinct binary not in the cache, however many loads asked for it."""
        self.joined = 0
        """Loads that found a compilation of the same bytes under way and waited for it instead."""
        if directory is not None and directory.exists():
            self._private_directory()  # tighten what an older version left readable by others

    def key(self, wasm: bytes) -> str:
        """Cache key of `wasm` under this engine's version and settings."""
        return hashlib.sha256(self._salt + b"\0" + wasm).hexdigest()

    def entry_path(self, wasm: bytes) -> Path | None:
        """Where the compiled form of `wasm` is stored, if there is a cache directory."""
        return self.directory / f"{self.key(wasm)}.cwasm" if self.directory else None

    def component(self, wasm: bytes, key: str | None = None, source: str = "", component: str | None = None
                  ) -> wc.Component:
        """The compiled component for `wasm` (whose `key` may be given): from memory, from disk, or
        freshly compiled, once per distinct binary: concurrent calls for the same bytes share one
        compilation. `source` and `component` name it in the log. Raises wasmtime.WasmtimeError when the
        bytes do not compile, CompileError when another load's compilation outlasts COMPILE_WAIT_S.
        """
        key = key or self.key(wasm)
        with self._lock:
            found = self._memory.get(key)
            if found is not None:
                self.hits += 1
                return found
            pending = self._pending.get(key)
            owner = pending is None
            if pending is None:
                pending = self._pending[key] = _Compilation()
        if not owner:
            return self._join(pending, source, component)
        try:
            compiled = pending.result = self._produce(wasm, key, source, component)
        except wasmtime.WasmtimeError as exc:
            pending.error = str(exc)
            raise
        finally:
            with self._lock:
                del self._pending[key]
            pending.done.set()  # also after an unexpected error: waiters then find no result and say so
        return compiled

    def _join(self, pending: _Compilation, source: str, component: str | None) -> wc.Component:
        """Wait for the compilation another load started for the same bytes, and take its outcome."""
        log.debug("compile_joined", source=source, component=component)
        with self._lock:
            self.joined += 1
        if not pending.done.wait(COMPILE_WAIT_S):
            raise CompileError(source, f"another load of the same binary has been compiling it for more than "
                                       f"{COMPILE_WAIT_S:.0f} s")
        if pending.error is not None:
            raise wasmtime.WasmtimeError(pending.error)
        if pending.result is None:
            raise CompileError(source, "the compilation this load waited for failed (see the log)")
        return pending.result

    def _produce(self, wasm: bytes, key: str, source: str, component: str | None) -> wc.Component:
        """Read the compiled form from disk or compile it, logging how long it took, and keep it in
        memory; the result is also handed to the loads waiting for it. A compile is announced before
        it starts (a cold start of a large guest takes seconds, and would otherwise be silent); a read
        from disk takes milliseconds at most and is logged once, when done."""
        began = time.monotonic()
        compiled = self._from_disk(key)
        hit = compiled is not None
        if compiled is None:
            log.info("compile_started", source=source, component=component, size=len(wasm))
            try:
                compiled = wc.Component(self.engine.engine, wasm)
            except wasmtime.WasmtimeError:
                log.info("compile_finished", source=source, component=component, size=len(wasm), cache="miss",
                         seconds=round(time.monotonic() - began, 3), ok=False)
                raise
            self._to_disk(key, compiled)
        with self._lock:
            if hit:
                self.hits += 1
            else:
                self.misses += 1
        log.info("compile_finished", source=source, component=component, size=len(wasm),
                 cache="hit" if hit else "miss", seconds=round(time.monotonic() - began, 3), ok=True)
        with self._lock:  # before the waiters wake: a load arriving now finds it in memory
            self._memory[key] = compiled
        return compiled

    def is_marked(self, key: str, tag: str) -> bool:
        """Whether `mark(key, tag)` was done, in this process or an earlier one (one that marked it
        while this process was running may go unseen: the fact is then checked again)."""
        with self._lock:
            if tag in self._marks.get(key, ()):
                return True
        name = f"{key}.{tag}.ok"
        return self.directory is not None and name in self._listed() and self._trusted_mark(name)

    def _trusted_mark(self, name: str) -> bool:
        """Whether the mark file `name`, listed in the cache directory, is ours (one lstat, only for
        a mark that is there); one that is not is refused and removed."""
        directory = self.directory
        if directory is None:
            return False
        try:
            problem = untrusted(os.lstat(directory / name))
        except OSError:
            return False
        if problem is not None:
            self._refuse(NotOwned(directory / name, problem))
            return False
        return True

    def _listed(self) -> frozenset[str]:
        """The cache directory's names when first asked: one scan instead of a stat per check (two per
        cached start; a directory of 40,000 entries is scanned in about 20 ms)."""
        if self._listing is None and self.directory is not None:
            try:
                names = frozenset(entry.name for entry in os.scandir(self.directory))
            except OSError:
                names = frozenset()
            self._listing = names
        return self._listing or frozenset()

    def mark(self, key: str, tag: str) -> None:
        """Remember a fact about the component with this key (the loader: "validated against tag")."""
        with self._lock:
            self._marks.setdefault(key, set()).add(tag)
        self._write(f"{key}.{tag}.ok", b"")

    def note(self, key: str, name: str, data: bytes) -> None:
        """Keep a small fact about the component with this key (the loader: its footprint)."""
        with self._lock:
            self._notes.setdefault(key, {})[name] = data
        self._write(f"{key}.{name}", data)

    def recall(self, key: str, name: str) -> bytes | None:
        """What `note(key, name, ...)` kept, in this process or an earlier one, or None."""
        with self._lock:
            found = self._notes.get(key, {}).get(name)
        if found is not None or self.directory is None:
            return found
        return self._read(f"{key}.{name}")

    def _read(self, name: str) -> bytes | None:
        """The content of the cache file `name` if it is there and ours (read_own_file); one that is
        not ours is refused and removed."""
        directory = self.directory
        if directory is None:
            return None
        try:
            return read_own_file(f"{directory}/{name}")
        except NotOwned as exc:
            self._refuse(exc)
        except OSError:
            pass
        return None

    def _refuse(self, exc: NotOwned) -> None:
        """Log and remove a cache file that another user could have written."""
        log.warning("cache_entry_refused", path=exc.path, found=exc.found, expected=exc.expected)
        Path(exc.path).unlink(missing_ok=True)

    def remembered_keys(self) -> set[str]:
        """The keys whose marks or notes memory holds."""
        with self._lock:
            return set(self._marks) | set(self._notes)

    def keep_only(self, keys: set[str]) -> None:
        """Drop the in-memory copies of every binary but `keys` (the disk entries stay): a daemon reloaded with a
        new version of a component kept every version it ever compiled (a componentize-py guest's is 40 MB).
        A component still running an old version holds it itself; a later load of one reads its disk entry.

        With a cache directory, their marks and load notes go too: they are on disk, and a prune removes
        those files only after a week unused, so a daemon given a new binary every deploy kept some 0.8 KB
        per version for that week (measured). A later load of one reads its note from disk; a mark written
        since the directory was listed is not seen, so that load checks its exports and links again and
        marks it anew (measured: 3.9 ms instead of 0.2 for the echo fixture, 46 instead of 40 for an 18 MB
        componentize-py guest; rewriting the marks takes most of it)."""
        with self._lock:
            for key in [key for key in self._memory if key not in keys]:
                del self._memory[key]
            if self.directory is None:
                return  # memory holds the only copy of the marks and notes
            for key in [key for key in self._marks if key not in keys]:
                del self._marks[key]
            for key in [key for key in self._notes if key not in keys]:
                del self._notes[key]

    def forget(self, wasm: bytes) -> None:
        """Drop the in-memory copy for `wasm` (the disk entry stays)."""
        with self._lock:
            self._memory.pop(self.key(wasm), None)

    def prune(self, in_use: Iterable[str], now: float | None = None) -> tuple[int, int]:
        """Remove the cache files of keys not in `in_use` (with their load notes and marks) that were last
        used more than PRUNE_UNUSED_AFTER_S ago, or beyond PRUNE_UNUSED_BYTES of such files, oldest first
        (never one used within PRUNE_GRACE_S), and temporary files a crashed write left; the entries of
        `in_use` are marked as used now. A key being read or compiled, or held in memory, stays whatever
        its age. Only regular files of ours with the names the cache writes are touched: a symbolic link,
        another user's file or any other name is left alone. Returns (files removed, bytes), logged as
        `cache_pruned`; an error is logged, never raised. Blocking: run it on a thread (CachePruner)."""
        directory = self.directory
        if directory is None:
            return 0, 0
        now = time.time() if now is None else now
        keep = set(in_use)
        try:
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return 0, 0  # none yet
        try:
            if untrusted(os.fstat(dir_fd), stat.S_IFDIR) is not None:
                return 0, 0  # not ours (or not private): nothing in it is ours to remove
            found = _CacheFiles(dir_fd, keep)
            removed = freed = 0
            for name, mtime, size in found.temps:
                if now - mtime > PRUNE_GRACE_S and _unlink(name, dir_fd):
                    removed, freed = removed + 1, freed + size
            for name, mtime in found.in_use:
                if now - mtime > _TOUCH_AFTER_S:
                    _touch(name, dir_fd, now)
            unused = found.unused
            unused_bytes = sum(files.size for files in unused.values())
            for key in sorted(unused, key=lambda key: unused[key].last_used):  # oldest first
                files = unused[key]
                age = now - files.last_used
                if not (age > PRUNE_UNUSED_AFTER_S or (unused_bytes > PRUNE_UNUSED_BYTES and age > PRUNE_GRACE_S)):
                    break  # the rest were used more recently still, and fewer bytes are left over the cap
                with self._lock:  # a load registers its key in _pending, under this lock, before it reads the entry
                    if key in self._pending or key in self._memory:
                        continue
                    for kind, file_size in zip(files.kinds, files.sizes, strict=True):
                        if _unlink(f"{key}.{kind}", dir_fd):
                            removed, freed = removed + 1, freed + file_size
                    # What memory held of it goes with its files: one set of marks and notes stayed for every
                    # binary ever loaded (a new version each deploy), long after the prune removed its files.
                    self._marks.pop(key, None)
                    self._notes.pop(key, None)
                unused_bytes -= files.size
        except OSError as exc:
            log.warning("cache_prune_failed", directory=str(directory), error=str(exc))
            return 0, 0
        finally:
            os.close(dir_fd)
        if removed:
            log.info("cache_pruned", directory=str(directory), removed=removed, bytes=freed,
                     unused_bytes_left=unused_bytes)
        return removed, freed

    def _from_disk(self, key: str) -> wc.Component | None:
        """The compiled component stored under `key`, or None. The entry is checked through one
        descriptor (ours, only we can write it) and its code against the sha256 stored after it, then
        wasmtime maps that same file itself, through /proc/self/fd (3 ms for a 40 MB componentize-py
        entry, against 53 ms from bytes, measured): the entry's name may be removed or replaced meanwhile
        (a prune, by this daemon or another process sharing the directory), the file checked is the
        file mapped."""
        directory = self.directory
        if directory is None:
            return None
        path = directory / f"{key}.cwasm"
        try:
            with own_file(str(path)) as fd:
                if not _intact(fd):
                    self._unusable(path, "its code does not match the sha256 stored with it (damaged on disk, or "
                                         "written by an older wasmhost)")
                    return None
                try:
                    # wasmtime reads its image and ignores the digest after it (measured, wasmtime 50)
                    return wc.Component.deserialize_file(self.engine.engine, _open_file_path(fd, path))
                except wasmtime.WasmtimeError as exc:
                    self._unusable(path, str(exc))
                    return None
        except NotOwned as exc:
            self._refuse(exc)
            return None
        except OSError:
            return None  # not there

    @staticmethod
    def _unusable(path: Path, error: str) -> None:
        """Log and remove an entry that cannot be used as it is: the component is compiled again."""
        log.warning("cache_entry_unusable", path=str(path), error=error)
        path.unlink(missing_ok=True)

    def _to_disk(self, key: str, compiled: wc.Component) -> None:
        if self.directory is None:
            return
        try:
            data = compiled.serialize()
        except wasmtime.WasmtimeError as exc:
            log.warning("cache_write_failed", directory=str(self.directory), error=str(exc))
            return
        self._write(f"{key}.cwasm", bytes(data) + hashlib.sha256(data).digest())

    def _private_directory(self) -> None:
        """Create the cache directory owner-only (0700) and tighten a looser one; logged, never fatal.
        One owned by another user turns the cache off for this process: that user could plant entries."""
        directory = self.directory
        if directory is None:
            return
        try:
            private_dir(directory)
        except NotOwned as exc:
            self.directory = None
            log.warning("cache_directory_refused", directory=exc.path, found=exc.found, expected=exc.expected,
                        consequence="compilation cache off: every component is compiled at each start")
        except OSError as exc:
            log.warning("cache_directory_unusable", directory=str(directory), error=str(exc))

    def _write(self, name: str, data: bytes) -> None:
        """Write a cache file atomically and durably: its bytes reach the disk before the rename
        makes them the entry, and the rename before this returns (otherwise a power cut can leave the
        name pointing at zeros). A failure is logged, never fatal."""
        self._private_directory()
        directory = self.directory  # None now when it turned out to be another user's
        if directory is None:
            return
        try:
            fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")  # mkstemp files are 0600
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, directory / name)
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            log.warning("cache_write_failed", directory=str(directory), error=str(exc))


_FD_DIRECTORY = "/proc/self/fd"
_HAVE_FD_DIRECTORY = os.path.isdir(_FD_DIRECTORY)


def _open_file_path(fd: int, path: Path) -> str:
    """A path that opens the very file open at `fd` (Linux's /proc/self/fd/N, which stays that file even
    once its name is gone), or `path` itself where /proc is not mounted."""
    return f"{_FD_DIRECTORY}/{fd}" if _HAVE_FD_DIRECTORY else str(path)


def _intact(fd: int) -> bool:
    """Whether the entry open at `fd` ends with the sha256 of what comes before it (read through a
    mapping: a 40 MB entry is hashed in about 25 ms, and not copied)."""
    size = os.fstat(fd).st_size
    if size <= DIGEST_SIZE:
        return False
    with mmap.mmap(fd, size, prot=mmap.PROT_READ) as mapped, memoryview(mapped) as view:
        return hashlib.sha256(view[:-DIGEST_SIZE]).digest() == bytes(view[-DIGEST_SIZE:])


class _UnusedKey:
    """The files of one key nothing uses, as a prune needs them: when last used (the newest mtime), their bytes,
    and each file's kind (its name after `KEY.`) and size."""

    __slots__ = ("kinds", "last_used", "size", "sizes")

    def __init__(self) -> None:
        self.last_used = 0.0
        self.size = 0
        self.kinds: list[str] = []
        self.sizes: list[int] = []


class _CacheFiles:
    """The cache's own files in a directory: regular files of ours that only we can write, named as the
    cache names them. Only what a prune needs is looked at (an lstat each): the entries of keys in use,
    every file of the other keys, the temporary files (40,000 names, 10,000 keys in use: about 0.1 s).

    A prune after every reload lists every version deployed that is still on disk (a week of them), so little
    is kept of each: one _UnusedKey per key, whose kinds are shared strings (0.4 KB per version at the
    prune's peak). An os.stat_result, a name and a dict per file made that peak 3.3 KB per version, and the
    daemon's resident memory kept each new peak (Python's allocator hands an arena back only once all of it
    is free): +4 KB per version deployed, reload after reload (measured)."""

    def __init__(self, dir_fd: int, in_use: set[str]) -> None:
        self.in_use: list[tuple[str, float]] = []
        """The entries (`KEY.cwasm`) of keys in use, with their mtime."""
        self.unused: dict[str, _UnusedKey] = {}
        """The files of each key not in use, by key."""
        self.temps: list[tuple[str, float, int]] = []
        """The temporary files: name, mtime and size."""
        kinds: dict[str, str] = {}  # one string per kind of file, not one per file
        with os.scandir(dir_fd) as names:
            for item in names:
                name = item.name
                found = _CACHE_FILE.fullmatch(name)
                if found is None:
                    if _TEMP_FILE.fullmatch(name) is not None and (st := _ours(item)) is not None:
                        self.temps.append((name, st.st_mtime, st.st_size))
                    continue  # any other name is not the cache's
                key = found["key"]
                if key not in in_use:
                    if (st := _ours(item)) is not None:
                        files = self.unused.get(key)
                        if files is None:
                            files = self.unused[key] = _UnusedKey()
                        kind = kinds.setdefault(found["kind"], found["kind"])
                        files.last_used = max(files.last_used, st.st_mtime)
                        files.size += st.st_size
                        files.kinds.append(kind)
                        files.sizes.append(st.st_size)
                elif found["kind"] == "cwasm" and (st := _ours(item)) is not None:
                    self.in_use.append((name, st.st_mtime))


def _ours(item: os.DirEntry[str]) -> os.stat_result | None:
    """The lstat of a directory entry if it is a regular file of ours only we can write, else None (a link,
    a directory, another user's file, or one gone meanwhile: not the cache's to touch)."""
    try:
        st = item.stat(follow_symlinks=False)
    except OSError:
        return None
    return st if untrusted(st) is None else None


def _unlink(name: str, dir_fd: int) -> bool:
    """Remove `name` from the directory open at `dir_fd` (unlink removes a link, never what it points to);
    False when it was gone already."""
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    return True


def _touch(name: str, dir_fd: int, now: float) -> None:
    """Mark the entry `name` as used at `now` (its mtime), without following a link."""
    try:
        os.utime(name, (now, now), dir_fd=dir_fd, follow_symlinks=False)
    except OSError as exc:
        log.debug("cache_touch_failed", name=name, error=str(exc))


class CachePruner:
    """Runs CompilationCache.prune on a thread of its own, one at a time: the event loop and a reload's
    answer never wait for the disk. A request made while a prune runs is merged into the next one (the
    keys of both stay), done as soon as the running one ends."""

    def __init__(self, cache: CompilationCache) -> None:
        self.cache = cache
        self._lock = threading.Lock()
        self._wanted: set[str] | None = None
        self._thread: threading.Thread | None = None

    def request(self, in_use: Iterable[str]) -> None:
        """Prune the cache soon, keeping the entries of `in_use` (the keys of what runs)."""
        with self._lock:
            self._wanted = set(in_use) | (self._wanted or set())
            if self._thread is not None:
                return  # the running thread takes it when it ends
            # daemon: an exit does not wait for a prune (an interrupted one leaves files for the next)
            self._thread = threading.Thread(target=self._run, name="wasmhost-cache-prune", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                wanted, self._wanted = self._wanted, None
                if wanted is None:
                    self._thread = None
                    return
            try:
                self.cache.prune(wanted)
            except Exception:  # a bug must not end the thread with requests left unserved
                log.exception("cache_prune_failed")

    def join(self, timeout: float | None = None) -> None:
        """Wait until no prune runs or is asked for (tests)."""
        with self._lock:
            thread = self._thread
        while thread is not None:
            thread.join(timeout)
            with self._lock:
                if self._thread is thread or self._thread is None:
                    return
                thread = self._thread
