"""`wasmhost status --lattice` and `wasmhost call --lattice` as a user runs them: the real CLI against real
daemons and a real nats-server on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lattice_support import NatsServer, free_port, lattice_section
from tests.test_daemon import Daemon, component, config_text, kill_leftovers, launch, wasmhost

ECHO = component("t/echo/0", "echo")


@pytest.fixture
def started() -> Iterator[list[Daemon]]:
    """Daemons a test starts; those still running at its end are killed."""
    daemons: list[Daemon] = []
    yield daemons
    kill_leftovers(daemons)


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server on a random loopback port."""
    server = NatsServer(tmp_path / "nats").start()
    yield server
    server.kill()


def write_config(tmp_path: Path, text: str) -> Path:
    config = tmp_path / "wasmhost.toml"
    config.write_text(text)
    return config


def test_status_lattice_on_a_daemon_without_lattice_says_so(tmp_path: Path, started: list[Daemon]) -> None:
    d = launch(tmp_path, ECHO, started)
    result = d.cli("status", "--lattice")
    assert result.returncode == 1
    assert "not part of a lattice" in result.stderr and "[lattice]" in result.stderr


def test_call_lattice_without_lattice_section_names_the_config(tmp_path: Path) -> None:
    config = write_config(tmp_path, config_text(tmp_path / "state", ECHO))
    result = wasmhost("call", "--lattice", "--config", str(config), "t/echo/0", "hi")
    assert result.returncode == 1
    assert f"{config} has no [lattice] section" in result.stderr


def test_call_lattice_with_nats_unreachable_fails_fast_naming_the_server(tmp_path: Path) -> None:
    url = f"nats://127.0.0.1:{free_port()}"  # nobody listens there
    config = write_config(tmp_path, config_text(tmp_path / "state", lattice_section([url], "cli") + ECHO))
    result = wasmhost("call", "--lattice", "--config", str(config), "t/echo/0", "hi")
    assert result.returncode == 1
    assert f"cannot reach NATS at {url}" in result.stderr


def test_call_lattice_to_a_component_no_host_runs(tmp_path: Path, nats: NatsServer) -> None:
    config = write_config(tmp_path, config_text(tmp_path / "state", lattice_section([nats.url], "cli") + ECHO))
    result = wasmhost("call", "--lattice", "--config", str(config), "t/nowhere/0", "hi")
    assert result.returncode == 1
    assert "no host of lattice 'default' runs t/nowhere/0" in result.stderr
    assert "wasmhost.default.msg.t.nowhere.0" in result.stderr
