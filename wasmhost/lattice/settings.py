"""The `[lattice]` config section: its schema and the checks of its meaning (files exist, URLs are NATS URLs).

Absent, the daemon is a single host and nats-py is never imported.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import socket
import stat
from collections import UserString
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from wasmhost.lattice.wire import LATTICE_ROOT, HeartbeatSeconds

DEFAULT_URL = "nats://127.0.0.1:4222"
DEFAULT_HEARTBEAT_S = 2.0
URL_SCHEMES = ("nats://", "tls://", "ws://", "wss://")
_INBOX_PREFIX = re.compile(r"[^.*>\s]+(\.[^.*>\s]+)*")
"""A NATS subject prefix: tokens of anything but '.', wildcards and whitespace, joined by '.'."""
CREDS_MAX_BYTES = 64 * 1024
"""A `.creds` file is a user JWT and a seed (a few KiB); more is not one, and is not read whole."""
JWT_BEGIN = "-----BEGIN NATS USER JWT-----"
SEED_BEGIN = "-----BEGIN USER NKEY SEED-----"
_JWT = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
_USER_SEED = re.compile(r"SU[A-Z2-7]{56}")
"""A user nkey seed as nkeys encodes it: its prefix bytes, 32 bytes of seed and a checksum, in base32."""


class TlsSection(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """`[lattice.tls]`: the CA that signs the servers, and this host's client certificate and key (optional)."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None


class RemoteGrant(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """`[[lattice.grants]]`: what a component of another host may do to this host's components."""

    id: str
    send: list[str] = msgspec.field(default_factory=list)
    request: list[str] = msgspec.field(default_factory=list)
    broadcast: list[str] = msgspec.field(default_factory=list)


class LatticeSection(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The `[lattice]` table."""

    urls: list[str] = msgspec.field(default_factory=lambda: [DEFAULT_URL])
    name: str = "default"
    host_id: str | None = None
    credentials: str | None = None
    tls: TlsSection = msgspec.field(default_factory=TlsSection)
    heartbeat_s: HeartbeatSeconds = DEFAULT_HEARTBEAT_S
    grants: list[RemoteGrant] = msgspec.field(default_factory=list)
    cli_inbox_prefix: str | None = None


@dataclass(frozen=True)
class LatticeSettings:
    """A validated `[lattice]` with its files resolved."""

    urls: tuple[str, ...]
    name: str
    host_id: str
    heartbeat_s: float
    credentials: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    cli_inbox_prefix: str | None = None
    """Where `wasmhost call --lattice` takes its answers (nats-py's inbox_prefix; None: nats-py's `_INBOX`)."""
    credentials_text: str | None = field(default=None, repr=False)
    """The credentials file's contents, as read and checked at start (a secret: not in the repr)."""

    def user_credentials(self) -> UserString | None:
        """nats-py's `user_credentials`: the `.creds` contents checked at start (nats-py reads a UserString as
        them), not the file's path, which nats-py reads again at every reconnection. A file being rewritten
        then (empty for a moment, or a seed without its JWT) ended nats-py's reconnecting for good (a TypeError
        in its task: the host never came back, nothing logged) or kept the event loop reading at the file's end
        for ever (the whole daemon frozen at 100% CPU). `[lattice]` is read at start only anyway."""
        return UserString(self.credentials_text) if self.credentials_text is not None else None


def shown_url(url: str) -> str:
    """`url` fit for logs, errors and `status`: the password of a `user:password@` in it, or a token (a user part
    alone, `token@`), replaced by `***`. nats-py takes credentials in a URL, and `status --lattice` showed them."""
    scheme, separator, rest = url.partition("://")
    authority, slash, path = rest.partition("/")
    userinfo, at, host = authority.rpartition("@")
    if not separator or not at:
        return url
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}://{user + ':***' if colon else '***'}@{host}{slash}{path}"


def _file(where: str, name: str | None, base: Path, errors: list[str]) -> Path | None:
    if name is None:
        return None
    path = Path(name) if Path(name).is_absolute() else base / name
    if not path.is_file():
        # a directory, a pipe or a device there is a different mistake from a missing file: say which
        errors.append(f"{where}: {path} is not a regular file" if path.exists() else f"{where}: no file at {path}")
        return None
    return path


def _creds_file(name: str | None, base: Path, errors: list[str]) -> tuple[Path, str] | None:
    """The credentials file and its contents, checked to be what nats-py can read: it takes the line after
    each block's BEGIN line. Without the JWT's it read on at the end for ever (a daemon stuck before READY at
    100% CPU, no line logged; `call --lattice` hung), without the seed's it failed each attempt with a
    TypeError, and it kept a CRLF file's '\\r'. Errors name the file and what was expected, never its
    contents (secrets)."""
    path = _file("lattice.credentials", name, base, errors)
    if path is None:
        return None
    try:
        # non-blocking, and checked through the descriptor read from: a pipe put there after the check above
        # would block the configuration's load (and `check`) until someone wrote to it
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(0, "not a regular file")
            data = f.read(CREDS_MAX_BYTES + 1)
    except OSError as exc:
        errors.append(f"lattice.credentials: cannot read {path}: {exc.strerror or type(exc).__name__}")
        return None
    what = "a NATS .creds file (a user JWT and its nkey seed, as nsc writes them)"
    if len(data) > CREDS_MAX_BYTES:
        errors.append(f"lattice.credentials: {path}: expected {what}, got more than {CREDS_MAX_BYTES} bytes")
        return None
    lines = data.decode("utf-8", "replace").split("\n")
    if any(line.endswith("\r") for line in lines):
        errors.append(f"lattice.credentials: {path}: expected {what} with \\n line endings (nats-py does not read "
                      "\\r\\n ones)")
        return None
    blocks = ((JWT_BEGIN, _JWT, "a user JWT"), (SEED_BEGIN, _USER_SEED, "a user nkey seed (SU...)"))
    for begin, form, expected in blocks:
        at = next((i for i, line in enumerate(lines) if begin.strip("-") in line), None)  # as nats-py finds it
        if at is None:
            errors.append(f"lattice.credentials: {path}: expected {what}, found no {begin} line")
            return None
        # nats-py takes that line less its last character, the '\n' (so a line the file ends on loses one)
        if at + 2 >= len(lines) or not form.fullmatch(lines[at + 1]) or (
                form is _USER_SEED and not _usable_user_seed(lines[at + 1])):
            errors.append(f"lattice.credentials: {path}: expected {expected} on the line after {begin}")
            return None
    return path, "\n".join(lines)


def _usable_user_seed(seed: str) -> bool:
    """Whether nkeys signs with `seed` (its form checked already) as a user, and its checksum holds. nkeys
    decodes a seed only when nats-py signs the server's nonce: a mangled one (its third character, say) passed
    `wasmhost check`, then failed every connection attempt of the daemon ('nkeys: invalid prefix byte'); one
    with a wrong checksum signed as some other key, refused by the server as an authorization violation."""
    import nkeys  # type: ignore[import-untyped]  # here: only a configuration with credentials pays for it

    try:
        raw = base64.b32decode(seed + "=" * (-len(seed) % 8))
        prefix, _ = nkeys.decode_seed(bytearray(seed.encode()))
    except (binascii.Error, nkeys.NkeysError):
        return False
    return bool(prefix == nkeys.PREFIX_BYTE_USER and nkeys.crc16_checksum(raw[:-2]) == raw[-2:])


def lattice_settings(section: LatticeSection, base: Path, errors: list[str]) -> LatticeSettings | None:
    """The settings of a shape-checked `[lattice]` table, or None with its errors added (relative paths are
    relative to the config file's directory `base`). Its grants are the system layer's to parse (security)."""
    before = len(errors)
    if not section.urls:
        errors.append("lattice.urls: expected at least one NATS URL, got an empty array")
    for index, url in enumerate(section.urls):
        if not url.startswith(URL_SCHEMES) or len(url) <= len(url.split("://")[0]) + 3:
            errors.append(f"lattice.urls[{index}]: expected a URL like \"nats://HOST:4222\" "
                          f"(scheme one of {', '.join(s[:-3] for s in URL_SCHEMES)}), got \"{shown_url(url)}\"")
    if not section.name.strip():
        errors.append("lattice.name: expected a non-empty lattice name")
    host_id = section.host_id if section.host_id is not None else socket.gethostname()
    if not host_id.strip():
        errors.append("lattice.host_id: expected a non-empty host id")
    creds = _creds_file(section.credentials, base, errors)
    tls = section.tls
    ca = _file("lattice.tls.ca", tls.ca, base, errors)
    cert = _file("lattice.tls.cert", tls.cert, base, errors)
    key = _file("lattice.tls.key", tls.key, base, errors)
    prefix = section.cli_inbox_prefix
    if prefix is not None and (not _INBOX_PREFIX.fullmatch(prefix) or prefix.startswith(LATTICE_ROOT)):
        errors.append("lattice.cli_inbox_prefix: expected subject tokens joined by '.', without wildcards or "
                      f"spaces, outside {LATTICE_ROOT} (hosts take no client's reply subject there), got "
                      f"{prefix!r}")
    if (tls.cert is None) != (tls.key is None):
        errors.append("lattice.tls: give both cert and key (a client certificate needs its key), or neither")
    if len(errors) > before:
        return None
    return LatticeSettings(tuple(section.urls), section.name, host_id, section.heartbeat_s,
                           creds[0] if creds else None, ca, cert, key, prefix, creds[1] if creds else None)
