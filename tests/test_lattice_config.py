"""`[lattice]` in the config: defaults, every mistake named by its key, no NATS import without it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.lattice_support import NatsOperator
from tests.test_daemon import wasmhost
from wasmhost.core.ids import ComponentId
from wasmhost.lattice import settings
from wasmhost.lattice.settings import CREDS_MAX_BYTES, shown_url
from wasmhost.system.config import ConfigError, parse_config


def errors_of(text: str, where: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, where / "wasmhost.toml")
    return caught.value.errors


def test_without_lattice_nothing_changes(tmp_path: Path) -> None:
    assert parse_config("", tmp_path / "wasmhost.toml").lattice is None


def test_defaults_and_files(tmp_path: Path) -> None:
    NatsOperator().creds(tmp_path / "host.creds", "host")
    config = parse_config('[lattice]\ncredentials = "host.creds"\n[[lattice.grants]]\nid = "a/b/c"\n'
                          'request = ["x/*"]\n', tmp_path / "wasmhost.toml")
    settings = config.lattice
    assert settings is not None
    assert settings.urls == ("nats://127.0.0.1:4222",) and settings.name == "default"
    assert settings.host_id == socket.gethostname() and settings.heartbeat_s == 2.0
    assert settings.credentials == tmp_path / "host.creds"
    [(cid, grants)] = config.remote_grants
    assert cid == ComponentId("a", "b", "c") and [p.text for p in grants.request] == ["x/*"]


def test_every_mistake_is_named_by_its_key(tmp_path: Path) -> None:
    errors = errors_of('[lattice]\nurls = ["http://x", "nats://"]\nheartbeat_s = 0\nhost_id = " "\n'
                       'credentials = "none.creds"\ntls = { cert = "c.pem" }\nbogus = 1\n'
                       '[[lattice.grants]]\nid = "a/b"\n[[lattice.grants]]\nid = "a/b/c"\nsend = ["a/*/c"]\n',
                       tmp_path)
    assert errors == [
        "lattice.bogus: unknown key (expected one of urls, name, host_id, credentials, tls, heartbeat_s, grants, "
        "cli_inbox_prefix)",
        "lattice.heartbeat_s: expected a number >= 0.05, got 0",
        'lattice.urls[0]: expected a URL like "nats://HOST:4222" (scheme one of nats, tls, ws, wss), got "http://x"',
        'lattice.urls[1]: expected a URL like "nats://HOST:4222" (scheme one of nats, tls, ws, wss), got "nats://"',
        "lattice.host_id: expected a non-empty host id",
        f"lattice.credentials: no file at {tmp_path / 'none.creds'}",
        f"lattice.tls.cert: no file at {tmp_path / 'c.pem'}",
        "lattice.tls: give both cert and key (a client certificate needs its key), or neither",
        "lattice.grants[0].id: component id 'a/b': expected namespace/name/instance (three parts separated by "
        "'/'), got 2 part(s)",
        "lattice.grants[1].send[0]: target pattern 'a/*/c': expected '*', 'namespace/*', 'namespace/name/*' or "
        "'namespace/name/instance'",
    ]


def _creds_parts(tmp_path: Path) -> tuple[str, str, str]:
    """A real creds file's text, its JWT block (with the blank line after it) and the rest (the seed block)."""
    text = NatsOperator().creds(tmp_path / "made.creds", "host").read_text()
    jwt_block = text[:text.index("\n\n") + 2]
    return text, jwt_block, text[len(jwt_block):]


JWT_BEGIN, SEED_BEGIN = "-----BEGIN NATS USER JWT-----", "-----BEGIN USER NKEY SEED-----"
CREDS_FILE = "a NATS .creds file (a user JWT and its nkey seed, as nsc writes them)"


@pytest.mark.parametrize(("case", "expected"), [
    ("seed only", f"expected {CREDS_FILE}, found no {JWT_BEGIN} line"),  # nats-py looked for the JWT for ever
    ("jwt only", f"expected {CREDS_FILE}, found no {SEED_BEGIN} line"),  # nats-py: a TypeError at every attempt
    ("text", f"expected {CREDS_FILE}, found no {JWT_BEGIN} line"),
    ("empty", f"expected {CREDS_FILE}, found no {JWT_BEGIN} line"),
    ("crlf", f"expected {CREDS_FILE} with \\n line endings (nats-py does not read \\r\\n ones)"),
    ("not a jwt", f"expected a user JWT on the line after {JWT_BEGIN}"),
    ("account seed", f"expected a user nkey seed (SU...) on the line after {SEED_BEGIN}"),
    ("truncated seed", f"expected a user nkey seed (SU...) on the line after {SEED_BEGIN}"),
    ("seed on the last line", f"expected a user nkey seed (SU...) on the line after {SEED_BEGIN}"),
    # of the right form, but nkeys cannot sign with it: the daemon failed each connection ('nkeys: invalid
    # prefix byte') or signed as another user (an authorization violation), while `wasmhost check` said ok
    ("mangled seed", f"expected a user nkey seed (SU...) on the line after {SEED_BEGIN}"),
    ("seed with a wrong checksum", f"expected a user nkey seed (SU...) on the line after {SEED_BEGIN}"),
    ("too large", f"expected {CREDS_FILE}, got more than {CREDS_MAX_BYTES} bytes"),
])
def test_a_credentials_file_that_is_not_a_creds_file_is_named_without_its_secrets(tmp_path: Path, case: str,
                                                                                   expected: str) -> None:
    text, jwt_block, seed_block = _creds_parts(tmp_path)
    jwt, seed = text.split("\n")[1], seed_block.split(SEED_BEGIN + "\n")[1].split("\n")[0]
    bad = {"seed only": seed_block, "jwt only": jwt_block, "text": "not creds\n", "empty": "",
           "crlf": text.replace("\n", "\r\n"), "not a jwt": text.replace(jwt, "x" + jwt.replace(".", "", 1)),
           "account seed": text.replace(seed, "SA" + seed[2:]),
           "truncated seed": text.replace(seed, seed[:-4]),
           "seed on the last line": text[:text.index(seed) + len(seed)],
           "mangled seed": text.replace(seed, seed[:2] + "Z" + seed[3:]),
           "seed with a wrong checksum": text.replace(seed, seed[:20] + ("A" if seed[20] != "A" else "B") + seed[21:]),
           "too large": text + "#" * CREDS_MAX_BYTES}[case]
    (tmp_path / "host.creds").write_text(bad, newline="")
    [error] = errors_of('[lattice]\ncredentials = "host.creds"\n', tmp_path)
    assert error == f"lattice.credentials: {tmp_path / 'host.creds'}: {expected}"
    assert jwt not in error and seed not in error and seed[2:12] not in error and jwt[:20] not in error


def test_an_unreadable_credentials_file_is_named(tmp_path: Path) -> None:
    # /proc/self/mem is a regular file whose first bytes no read can reach (EIO), even as root
    [error] = errors_of('[lattice]\ncredentials = "/proc/self/mem"\n', tmp_path)
    assert error == "lattice.credentials: cannot read /proc/self/mem: Input/output error"


def test_a_credentials_path_that_is_no_regular_file_is_named_so(tmp_path: Path) -> None:
    # Both said "no file at PATH", which sent the operator looking for a file that was there.
    (tmp_path / "dir.creds").mkdir()
    os.mkfifo(tmp_path / "pipe.creds")
    for name in ("dir.creds", "pipe.creds"):
        [error] = errors_of(f'[lattice]\ncredentials = "{name}"\n', tmp_path)
        assert error == f"lattice.credentials: {tmp_path / name} is not a regular file"


def test_a_pipe_swapped_in_after_the_check_does_not_block_the_load(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # Our own logic: the path check is patched to pass a pipe, as if the file had been replaced by one right
    # after it. Opening it to read waited for a writer for ever, and with it `check` and the daemon's start.
    os.mkfifo(tmp_path / "pipe.creds")
    monkeypatch.setattr(settings, "_file", lambda where, name, base, errors: name and base / name)
    found: list[list[str]] = []
    loading = threading.Thread(target=lambda: found.append(
        errors_of('[lattice]\ncredentials = "pipe.creds"\n', tmp_path)), daemon=True)
    loading.start()
    loading.join(timeout=10)
    assert found == [[f"lattice.credentials: cannot read {tmp_path / 'pipe.creds'}: not a regular file"]]


def test_check_and_call_lattice_name_a_creds_file_without_its_jwt(tmp_path: Path) -> None:
    # Before, `call --lattice` spun at 100% CPU for ever in nats-py's search for the JWT block (and a daemon
    # never became ready), while `wasmhost check` said ok.
    _, _, seed_block = _creds_parts(tmp_path)
    (tmp_path / "seed.creds").write_text(seed_block)
    config = tmp_path / "wasmhost.toml"
    config.write_text(f'[host]\nstate_dir = "{tmp_path / "state"}"\n[lattice]\nurls = ["nats://127.0.0.1:1"]\n'
                      'credentials = "seed.creds"\n')
    expected = f"lattice.credentials: {tmp_path / 'seed.creds'}: expected {CREDS_FILE}, found no {JWT_BEGIN} line"
    for args in (("check",), ("call", "--lattice", "t/echo/0", "x")):
        result = wasmhost(*args[:1], "--config", str(config), *args[1:])
        assert result.returncode != 0 and expected in result.stderr, (args, result)
        assert seed_block.split(SEED_BEGIN + "\n")[1][:58] not in result.stderr + result.stdout  # the seed


def test_accept_external_is_a_component_key(tmp_path: Path) -> None:
    assert errors_of('[[components]]\nid = "a/b/c"\naccept_external = "yes"\n', tmp_path)[0] == \
        'components[0].accept_external: expected true or false, got "yes"'


def test_a_daemon_without_lattice_does_not_import_nats() -> None:
    probe = ("import sys, wasmhost.cli, wasmhost.system.daemon\n"
             "print(any(m.split('.')[0] == 'nats' for m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "False", result.stderr


@pytest.mark.parametrize(("url", "shown"), [
    ("nats://10.0.0.5:4222", "nats://10.0.0.5:4222"),
    ("nats://host:s3cret@10.0.0.5:4222", "nats://host:***@10.0.0.5:4222"),
    ("tls://T0KEN@nats.example:4222/x", "tls://***@nats.example:4222/x"),
    ("nats://a:b:c@h:1", "nats://a:***@h:1"),
    ("nats://user:p@ss@h:1", "nats://user:***@h:1"),
])
def test_credentials_in_a_url_are_not_shown(url: str, shown: str) -> None:
    assert shown_url(url) == shown


def test_a_bad_url_is_named_without_its_password(tmp_path: Path) -> None:
    errors = errors_of('[lattice]\nurls = ["http://host:s3cret@h:1"]\n', tmp_path)
    assert any("http://host:***@h:1" in e for e in errors) and not any("s3cret" in e for e in errors)


def test_the_clis_inbox_prefix_is_a_subject_prefix_outside_the_lattices(tmp_path: Path) -> None:
    config = parse_config('[lattice]\ncli_inbox_prefix = "_INBOX_ops.eu"\n', tmp_path / "wasmhost.toml")
    assert config.lattice is not None and config.lattice.cli_inbox_prefix == "_INBOX_ops.eu"
    assert parse_config("[lattice]\n", tmp_path / "wasmhost.toml").lattice.cli_inbox_prefix is None  # type: ignore[union-attr]
    for bad in ("_INBOX.*", "a..b", "a b", "", ".a", "wasmhost.default.inbox"):
        [error] = errors_of(f'[lattice]\ncli_inbox_prefix = "{bad}"\n', tmp_path)
        assert error.startswith("lattice.cli_inbox_prefix: expected subject tokens") and repr(bad) in error
