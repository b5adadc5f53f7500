"""`wasmhost inspect`: a component file or a running component's id, through the real CLI; a component
that cannot run is a clear error with a non-zero exit, never a Python traceback."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import FIXTURES, fixture_path
from tests.test_daemon import Daemon, component, config_text, wasmhost
from tests.test_stop import wait_for_status


def test_inspect_prints_a_component_files_metadata_and_imports() -> None:
    shown = wasmhost("inspect", str(fixture_path("logger")))
    assert shown.returncode == 0, shown.stderr
    assert "name        logger 0.1.0\n" in shown.stdout
    assert "author      wasmhost tests  license Apache-2.0\n" in shown.stdout
    assert "airssys:core/host-services@1.0.0" in shown.stdout


def test_inspect_of_a_file_whose_metadata_traps_says_so_and_exits_1() -> None:
    shown = wasmhost("inspect", str(fixture_path("metatrap")))
    assert shown.returncode == 1
    assert "Traceback" not in shown.stderr
    assert shown.stderr.startswith(f"wasmhost: {fixture_path('metatrap')} is a valid component, but calling its "
                                   "metadata export failed, so it cannot run:\n")
    assert "wasm trap: wasm `unreachable` instruction executed" in shown.stderr
    assert shown.stdout == ""


def test_inspect_of_a_file_with_oversized_metadata_names_the_field_and_its_bound() -> None:
    shown = wasmhost("inspect", str(fixture_path("bigmeta")))
    assert shown.returncode == 1 and shown.stdout == ""
    assert shown.stderr.endswith("metadata refused: its name is 8388608 characters, at most 256\n")


def test_inspect_names_what_it_could_not_make_sense_of() -> None:
    missing = wasmhost("inspect", "no/such/file.wasm")
    assert (missing.returncode, missing.stderr) == (1, "wasmhost: no/such/file.wasm: no such file\n")
    neither = wasmhost("inspect", "greeter")
    assert neither.returncode == 1
    assert neither.stderr == ("wasmhost: inspect: 'greeter' is neither a component file (no such file) nor a "
                              "component id NAMESPACE/NAME/INSTANCE\n")


def test_inspect_of_a_failed_component_of_the_daemon_prints_its_state_and_last_error(tmp_path: Path) -> None:
    config = tmp_path / "wasmhost.toml"
    config.write_text(config_text(tmp_path / "state", component(
        "t/broken/0", "metatrap", "max_restarts = 2\nbackoff_base_ms = 1\nbackoff_max_ms = 2") + component(
        "t/echo/0", "echo"), FIXTURES))
    d = Daemon(tmp_path, config)
    try:
        d.expect("READY=1")
        wait_for_status(d, "t/broken/0", lambda row: row["state"] == "failed")

        shown = d.cli("inspect", "t/broken/0")
        assert shown.returncode == 1
        assert "Traceback" not in shown.stderr
        assert "id          t/broken/0\nstate       failed\n" in shown.stdout
        assert "health      -\n" in shown.stdout  # no health to report, as in `status` (before: `None`)
        assert "restarts    2\n" in shown.stdout
        last_error = shown.stdout.split("last error  ", 1)[1]
        assert "metadata trapped" in last_error and "wasm `unreachable` instruction executed" in last_error
        assert shown.stderr == ("wasmhost: t/broken/0 has failed and stays down after 2 restart(s); fix it, then "
                                "`wasmhost start` or `wasmhost reload`\n")

        running = d.cli("inspect", "t/echo/0")
        assert running.returncode == 0, running.stderr
        assert "state       running\n" in running.stdout and "last error  -\n" in running.stdout

        unknown = d.cli("inspect", "t/nobody/0")
        assert unknown.returncode == 1
        assert unknown.stderr == "wasmhost: the daemon runs no component t/nobody/0 (it runs: t/broken/0, t/echo/0)\n"
        assert d.stop() == 0
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()
