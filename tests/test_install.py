"""wasmhost installed the way deploy/README.md step 1 does it (pip, non-editable, into a venv of its own)
and used through that venv's real `wasmhost` command: which configuration it reads when none is named.

The venv is made offline: pip builds and installs this tree with --no-deps --no-build-isolation
--no-index, and the dependencies (wasmtime, anyio, ...; setuptools for the build) are seen from the
running environment through a .pth file, as --system-site-packages would, minus this checkout.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import pytest

from tests.conftest import FIXTURES
from wasmhost.system.config_location import SYSTEM_CONFIG, ConfigNotFound, find_config

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Installed:
    """A venv holding a non-editable install of this tree."""

    venv: Path
    site_packages: Path

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a shell that has not been told about wasmhost or this checkout."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "WASMHOST_CONFIG", "NOTIFY_SOCKET")}
        return {**env, **extra}

    def wasmhost(self, *args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
        """Run the venv's `wasmhost` console script."""
        return subprocess.run([str(self.venv / "bin" / "wasmhost"), *args], capture_output=True, text=True,
                              timeout=60, cwd=cwd, env=self.env(**env))


def _major(text: str) -> int:
    return int(text.split(".")[0])


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    assert _major(version("setuptools")) >= 77, (
        f"setuptools {version('setuptools')} cannot build this project (pyproject.toml needs >= 77): "
        "`pip install -e '.[dev]'` brings it")
    base = tmp_path_factory.mktemp("install")
    source = base / "source"  # a copy: an in-tree build would leave build/ and *.egg-info in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "wasmhost", source / "wasmhost", ignore=shutil.ignore_patterns("__pycache__"))
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    [site_packages] = venv.glob("lib/python*/site-packages")
    visible = [p for p in sys.path if p and Path(p).is_dir() and Path(p).resolve() != ROOT]
    (site_packages / "test-deps.pth").write_text("\n".join(visible) + "\n")
    installed = Installed(venv, site_packages)
    done = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--verbose", "--no-deps",
                           "--no-build-isolation", "--no-index", "--ignore-installed", str(source)],
                          capture_output=True, text=True, timeout=300, cwd=base, env=installed.env())
    assert done.returncode == 0, done.stdout + done.stderr
    # pyproject.toml as the build backend expects it: no deprecation warning (a license table was one)
    assert "BuildBackendWarning" not in done.stdout + done.stderr, done.stdout + done.stderr
    assert "SetuptoolsDeprecationWarning" not in done.stdout + done.stderr, done.stdout + done.stderr
    yield installed


def test_the_install_is_a_copy_in_site_packages(installed: Installed, tmp_path: Path) -> None:
    where = subprocess.run([str(installed.venv / "bin" / "python"), "-c", "import wasmhost; print(wasmhost.__file__)"],
                           capture_output=True, text=True, timeout=60, cwd=tmp_path, env=installed.env())
    assert Path(where.stdout.strip()).parent == installed.site_packages / "wasmhost", where.stdout + where.stderr
    assert list((installed.site_packages / "wasmhost" / "wit").glob("*.wit"))  # package data came along


def test_without_a_config_every_command_names_the_places_it_tried(installed: Installed, tmp_path: Path) -> None:
    assert not SYSTEM_CONFIG.exists(), f"this test needs a machine where {SYSTEM_CONFIG} does not exist"
    for command in (["check"], ["run"], ["status"]):
        result = installed.wasmhost(*command, cwd=tmp_path)
        assert result.returncode == 1, (command, result.stdout, result.stderr)
        message = result.stderr
        assert "no configuration file found; tried, in order:" in message, message
        assert "--config" in message and "not given" in message
        assert "$WASMHOST_CONFIG" in message and "not set" in message
        assert f"{SYSTEM_CONFIG}  no such file" in message
        assert "is an installed package" in message  # no checkout config/ looked for beside site-packages
        assert "site-packages/config" not in message and "Traceback" not in message


def test_with_wasmhost_config_it_checks_runs_and_is_controlled(installed: Installed, tmp_path: Path) -> None:
    config = tmp_path / "wasmhost.toml"
    config.write_text(f'[host]\ncomponents_dir = "{FIXTURES}"\nstate_dir = "{tmp_path / "state"}"\n'
                      'log_format = "json"\n\n[[components]]\nid = "t/echo/0"\npath = "echo.wasm"\n')
    checked = installed.wasmhost("check", cwd=tmp_path, WASMHOST_CONFIG=str(config))
    assert checked.returncode == 0 and checked.stdout == f"{config}: ok, 1 component(s)\n", checked.stderr

    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(60)
    with (tmp_path / "daemon.log").open("w") as log:
        daemon = subprocess.Popen([str(installed.venv / "bin" / "wasmhost"), "run"], stdout=log,
                                  stderr=subprocess.STDOUT, cwd=tmp_path,
                                  env=installed.env(WASMHOST_CONFIG=str(config),
                                                    NOTIFY_SOCKET=str(tmp_path / "notify.sock")))
    try:
        while b"READY=1" not in notify.recv(4096).split(b"\n"):
            pass
        # No --socket: the control socket is the one the configuration from $WASMHOST_CONFIG names.
        called = installed.wasmhost("call", "t/echo/0", "installed", cwd=tmp_path, WASMHOST_CONFIG=str(config))
        assert called.returncode == 0 and called.stdout.rstrip("\n") == "installed", called.stderr
        status = installed.wasmhost("status", cwd=tmp_path, WASMHOST_CONFIG=str(config))
        assert status.returncode == 0 and "t/echo/0" in status.stdout, status.stderr
    finally:
        daemon.terminate()
        assert daemon.wait(timeout=60) == 0, (tmp_path / "daemon.log").read_text()
        notify.close()


def test_a_config_named_by_wasmhost_config_that_is_missing_is_named(installed: Installed, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.toml"
    checked = installed.wasmhost("check", cwd=tmp_path, WASMHOST_CONFIG=str(missing))
    assert checked.returncode == 1 and f"{missing}: 1 error(s):\n  cannot read: No such file" in checked.stderr
    status = installed.wasmhost("status", cwd=tmp_path, WASMHOST_CONFIG=str(missing))
    assert status.returncode == 1, status.stdout
    assert f"cannot read the configuration {missing} to find the control socket" in status.stderr


def test_the_order_of_the_default_places(tmp_path: Path) -> None:
    """find_config on its own (our logic, on real directories): a checkout's config/ comes before /etc,
    a package without a pyproject.toml beside it is no checkout, and a name given always wins."""
    checkout = tmp_path / "checkout"
    (checkout / "wasmhost").mkdir(parents=True)
    (checkout / "config").mkdir()
    system = tmp_path / "etc" / "wasmhost.toml"
    system.parent.mkdir()
    system.write_text("")

    def find(given: str | None = None, **environ: str) -> Path:
        return find_config(given, environ, checkout / "wasmhost", system)

    assert find() == system  # no pyproject.toml: an installed package
    (checkout / "pyproject.toml").write_text("")
    assert find() == system  # a checkout without config/wasmhost.toml
    (checkout / "config" / "wasmhost.toml").write_text("")
    assert find() == checkout / "config" / "wasmhost.toml"
    assert find(WASMHOST_CONFIG="/x.toml") == Path("/x.toml")
    assert find("/y.toml", WASMHOST_CONFIG="/x.toml") == Path("/y.toml")
    system.unlink()
    (checkout / "config" / "wasmhost.toml").unlink()
    with pytest.raises(ConfigNotFound) as raised:
        find()
    assert raised.value.tried == [("--config", "not given"), ("$WASMHOST_CONFIG", "not set"),
                                  (str(checkout / "config" / "wasmhost.toml"), "no such file"),
                                  (str(system), "no such file")]
