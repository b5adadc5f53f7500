"""Configuration validation: every mistake with its place, warnings, path confinement."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import FIXTURES
from wasmhost.actors.restart import RestartPolicy, Strategy
from wasmhost.security.capabilities import TargetPattern
from wasmhost.system.config import ConfigError, parse_config


def parse(tmp_path: Path, text: str) -> object:
    return parse_config(f'[host]\ncomponents_dir = "{FIXTURES}"\nstate_dir = "{tmp_path}"\n' + text,
                        tmp_path / "wasmhost.toml")


def errors(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(tmp_path, text)
    return info.value.errors


def test_a_full_component_table_becomes_its_spec(tmp_path: Path) -> None:
    (tmp_path / "data.json").write_text('{"k": 1}')
    config = parse(tmp_path, '''
[[components]]
id = "a/echo/0"
path = "echo.wasm"
limits = { max_fuel = 1000, max_execution_time_ms = 250 }
env = { MODE = "test" }
config_file = "data.json"
mailbox_capacity = 8
restart = "permanent"
max_restarts = 2
group = "g"
strategy = "rest-for-one"
capabilities = { send = ["a/*"], storage = true, storage_quota_bytes = 4096 }
''')
    plan = config.components[0]  # type: ignore[attr-defined]
    spec = plan.spec
    assert str(spec.component_id) == "a/echo/0" and spec.path == FIXTURES / "echo.wasm"
    assert (spec.limits.max_fuel, spec.limits.max_execution_time_ms) == (1000, 250)
    assert spec.limits.max_memory_bytes == 64 * 1024 * 1024
    assert spec.env_vars == (("MODE", "test"),) and spec.config_data == b'{"k": 1}'
    assert (spec.mailbox_capacity, spec.restart, spec.strategy) == (8, RestartPolicy.PERMANENT, Strategy.REST_FOR_ONE)
    assert spec.storage and plan.storage_quota_bytes == 4096


def test_outstanding_requests_take_the_host_default_unless_a_component_sets_its_own(tmp_path: Path) -> None:
    config = parse(tmp_path, 'max_outstanding_requests = 300\n'
                             '[[components]]\nid = "a/echo/0"\npath = "echo.wasm"\n'
                             '[[components]]\nid = "a/echo/1"\npath = "echo.wasm"\nmax_outstanding_requests = 7\n')
    assert [plan.spec.max_outstanding_requests for plan in config.components] == [300, 7]  # type: ignore[attr-defined]
    assert errors(tmp_path, '[[components]]\nid = "a/echo/0"\npath = "echo.wasm"\nmax_outstanding_requests = 0\n') == [
        "components[0].max_outstanding_requests: expected an integer > 0, got 0"]


def test_every_mistake_is_reported_with_its_place(tmp_path: Path) -> None:
    found = errors(tmp_path, '''
bogus = 1
[[components]]
id = "a/b/c"
path = "echo.wasm"
limits = { max_fuel = "lots", max_memory_bytes = -5 }
restart = "sometimes"
colour = "red"
[[components]]
id = "a/b"
[[components]]
id = "x/y/z"
path = "../../../../etc/passwd"
[[components]]
id = "a/b/c"
path = "echo.wasm"
config_data = "x"
config_file = "y"
''')
    assert found[0].startswith("host.bogus: unknown key (expected one of components_dir, state_dir,")
    assert found[1:] == [
        "components[0].colour: unknown key (expected one of id, path, limits, env, config_data, config_file, "
        "mailbox_capacity, restart, max_restarts, restart_window_s, backoff_base_ms, backoff_max_ms, group, strategy, "
        "health_interval_s, shutdown_timeout_s, capabilities, wasi, outbound_http, log_rate, log_burst, "
        "max_message_bytes, max_outstanding_requests, rollout_check_s, accept_external)",
        'components[0].limits.max_memory_bytes: expected an integer > 0, got -5',
        'components[0].limits.max_fuel: expected an integer > 0, got "lots"',
        'components[0].restart: expected one of "permanent", "transient", "temporary", got "sometimes"',
        "components[1].id: component id 'a/b': expected namespace/name/instance (three parts separated by '/'), "
        "got 2 part(s)",
        # the [host] table has a mistake, but its good values (components_dir) still apply
        f"components[2].path: {FIXTURES / '../../../../etc/passwd'} is outside the components "
        f"directory {FIXTURES}",
        "components[3].id: duplicate id 'a/b/c' (also components[0])",
    ]


def test_a_component_may_not_run_under_the_hosts_own_id(tmp_path: Path) -> None:
    """The host's id passes every capability check: a blaster configured as wasmhost/host/0 without
    grants sent, requested and broadcast to another component with no denial, seen as the operator."""
    assert errors(tmp_path, '[[components]]\nid = "wasmhost/host/0"\npath = "blaster.wasm"\n') == [
        "components[0].id: 'wasmhost/host/0' is the host's own id (the sender of what the control socket sends, "
        "allowed to message every component); choose another"]
    assert parse(tmp_path, '[[components]]\nid = "wasmhost/host/1"\npath = "blaster.wasm"\n')  # only that id


def test_symlinks_out_of_the_components_directory_are_refused(tmp_path: Path) -> None:
    components = tmp_path / "components"
    components.mkdir()
    os.symlink(FIXTURES / "echo.wasm", components / "sneaky.wasm")
    with pytest.raises(ConfigError, match="is outside the components directory"):
        parse_config(f'[host]\ncomponents_dir = "{components}"\n[[components]]\nid = "a/b/c"\npath = "sneaky.wasm"\n',
                     tmp_path / "wasmhost.toml")


def test_core_modules_and_missing_files_are_named(tmp_path: Path) -> None:
    found = errors(tmp_path, '[[components]]\nid = "a/core/0"\npath = "core.wasm"\n'
                             '[[components]]\nid = "a/none/0"\n')
    assert found[0].startswith("components[0].path: this is a core WebAssembly module")
    assert found[1] == f"components[1].id: no component file at {FIXTURES / 'a' / 'none' / '0.wasm'}"


def test_component_paths_naming_a_fifo_or_a_directory_say_so_without_waiting(tmp_path: Path) -> None:
    """The file is checked through the descriptor it is read from, opened without blocking: a FIFO is
    named as such at once (opening it to read would wait for a writer forever), never taken for a
    missing file."""
    components = tmp_path / "components"
    components.mkdir()
    os.mkfifo(components / "pipe.wasm")
    (components / "dir.wasm").mkdir()
    with pytest.raises(ConfigError) as info:
        parse_config(f'[host]\ncomponents_dir = "{components}"\nstate_dir = "{tmp_path}"\n'
                     '[[components]]\nid = "a/b/0"\npath = "pipe.wasm"\n'
                     '[[components]]\nid = "a/b/1"\npath = "dir.wasm"\n', tmp_path / "wasmhost.toml")
    assert info.value.errors == [
        f"components[0].path: {components / 'pipe.wasm'} is not a regular file, expected a component file",
        f"components[1].path: {components / 'dir.wasm'} is a directory, expected a component file",
    ]


def test_capabilities_naming_unknown_components_are_warnings(tmp_path: Path) -> None:
    config = parse(tmp_path, '[[components]]\nid = "a/echo/0"\npath = "echo.wasm"\n'
                             'capabilities = { send = ["a/*", "b/*"], request = ["a/echo/1"] }\n')
    assert config.warnings == [  # type: ignore[attr-defined]
        "components[0].capabilities.send[1]: 'b/*' matches no component in this configuration",
        "components[0].capabilities.request[0]: 'a/echo/1' matches no component in this configuration",
    ]
    in_lattice = parse(tmp_path, '[lattice]\n[[components]]\nid = "a/echo/0"\npath = "echo.wasm"\n'
                                 'capabilities = { request = ["b/*"] }\n')
    assert in_lattice.warnings == [  # type: ignore[attr-defined]
        "components[0].capabilities.request[0]: 'b/*' matches no component in this configuration (fine if another "
        "host of the lattice runs it)",
    ]


def test_capability_warnings_look_at_each_pattern_once_however_many_components(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each pattern was tried on every id: 10,000 entries each naming the next one took 9 s to read (the square).
    tried = []
    matches = TargetPattern.matches
    monkeypatch.setattr(TargetPattern, "matches", lambda self, cid: tried.append(cid) or matches(self, cid))
    count = 2000
    config = parse(tmp_path, "".join(f'[[components]]\nid = "chain/c/{i}"\npath = "echo.wasm"\n'
                                     f'capabilities.send = ["chain/c/{i + 1}"]\n' for i in range(count))
                   + '[[components]]\nid = "x/y/0"\npath = "echo.wasm"\n'
                     'capabilities = { send = ["*", "chain/*", "chain/c/*", "chain/d/*", "x/y/1", "z/*"] }\n')
    assert config.warnings == [  # type: ignore[attr-defined]
        f"components[{count - 1}].capabilities.send[0]: 'chain/c/{count}' matches no component in this configuration",
        f"components[{count}].capabilities.send[3]: 'chain/d/*' matches no component in this configuration",
        f"components[{count}].capabilities.send[4]: 'x/y/1' matches no component in this configuration",
        f"components[{count}].capabilities.send[5]: 'z/*' matches no component in this configuration",
    ]
    assert len(tried) <= count + 6


def test_socket_settings_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(f'[host]\nstate_dir = "{tmp_path}"\nsocket_mode = "0666"\nsocket_group = "no-such-group-x"\n',
                     tmp_path / "wasmhost.toml")
    assert info.value.errors[0].startswith('host.socket_mode: expected an octal mode like "0600" or "0660"')
    assert info.value.errors[1] == 'host.socket_group: no group named "no-such-group-x" on this system'


def test_not_toml_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("[host\n", tmp_path / "x.toml")
    assert info.value.errors[0].startswith("not valid TOML:")


def test_guest_log_limits_come_from_the_component_else_the_host_defaults(tmp_path: Path) -> None:
    config = parse(tmp_path, 'default_log_rate = 20\ndefault_log_burst = 40\n'
                             '[[components]]\nid = "a/echo/0"\npath = "echo.wasm"\nlog_rate = 2.5\n'
                             '[[components]]\nid = "a/echo/1"\npath = "echo.wasm"\nlog_burst = 7\n')
    limits = [(p.spec.log_limit.rate, p.spec.log_limit.burst) for p in config.components]  # type: ignore[attr-defined]
    assert limits == [(2.5, 40), (20.0, 7)]
    default = parse(tmp_path, '[[components]]\nid = "a/echo/0"\npath = "echo.wasm"\n')
    assert default.components[0].spec.log_limit.rate == 100.0  # type: ignore[attr-defined]
    assert default.components[0].spec.log_limit.burst == 1000  # type: ignore[attr-defined]


def test_guest_log_limits_that_cannot_limit_are_located_errors(tmp_path: Path) -> None:
    assert errors(tmp_path, 'default_log_rate = inf\n') == [
        "host.default_log_rate: expected a finite number > 0 (lines per second), got inf"]
    assert errors(tmp_path, '[[components]]\nid = "a/echo/0"\npath = "echo.wasm"\nlog_rate = 0\nlog_burst = 1.5\n'
                            '[[components]]\nid = "a/echo/1"\npath = "echo.wasm"\nlog_rate = inf\n'
                            '[[components]]\nid = "a/echo/2"\npath = "echo.wasm"\nlog_burst = "lots"\n') == [
        "components[0].log_rate: expected a number > 0, got 0",
        "components[0].log_burst: expected an integer > 0, got 1.5",
        'components[2].log_burst: expected an integer > 0, got "lots"',
        "components[1].log_rate: expected a finite number > 0 (lines per second), got inf",  # checked after shapes
    ]


def test_one_bad_host_value_hides_neither_the_others_nor_the_components_dir(tmp_path: Path) -> None:
    found = errors(tmp_path, 'epoch_tick_ms = "fast"\ndrain_timeout_s = -1\nstorage_cache_bytes = -1\n'
                             '[[components]]\nid = "a/none/0"\n')
    assert found == [
        'host.epoch_tick_ms: expected an integer > 0, got "fast"',
        "host.drain_timeout_s: expected a number >= 0, got -1",
        "host.storage_cache_bytes: expected an integer >= 0, got -1",
        f"components[0].id: no component file at {FIXTURES / 'a' / 'none' / '0.wasm'}",
    ]


def test_bad_capability_patterns_are_located_errors(tmp_path: Path) -> None:
    found = errors(tmp_path, '[[components]]\nid = "a/echo/0"\npath = "echo.wasm"\n'
                             'capabilities = { send = ["demo/echo", "a/*"], broadcast = ["a/*/x"] }\n')
    assert found == [
        "components[0].capabilities.send[0]: target pattern 'demo/echo': expected '*', 'namespace/*', "
        "'namespace/name/*' or 'namespace/name/instance'",
        "components[0].capabilities.broadcast[0]: target pattern 'a/*/x': expected '*', 'namespace/*', "
        "'namespace/name/*' or 'namespace/name/instance'",
    ]


def test_config_file_stays_inside_the_config_directory(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "ok.json").write_text("{}")
    outside = tmp_path.parent / f"{tmp_path.name}-secret.txt"
    outside.write_text("secret")
    os.symlink(outside, tmp_path / "sneaky.txt")
    os.mkfifo(tmp_path / "fifo")
    component = '[[components]]\nid = "a/echo/{0}"\npath = "echo.wasm"\nconfig_file = "{1}"\n'
    found = errors(tmp_path, component.format(0, "sub/ok.json") + component.format(1, f"../{outside.name}")
                   + component.format(2, "sneaky.txt") + component.format(3, "fifo")
                   + component.format(4, "a\\u0000b"))
    assert found == [
        f"components[1].config_file: {tmp_path / '..' / outside.name} is outside the configuration's directory "
        f"{tmp_path}",
        f"components[2].config_file: {tmp_path / 'sneaky.txt'} is outside the configuration's directory {tmp_path}",
        f"components[3].config_file: no regular file at {tmp_path / 'fifo'}",
        "components[4].config_file: contains a NUL byte",
    ]


def test_nul_bytes_in_host_paths_and_names_are_located_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config('[host]\nstate_dir = "s\\u0000"\nsocket_group = "g\\u0000"\ncontrol_users = ["u\\u0000"]\n',
                     tmp_path / "wasmhost.toml")
    assert info.value.errors == [
        "host.state_dir: contains a NUL byte",
        'host.control_users[0]: no user named "u\x00" on this system',
        'host.socket_group: no group named "g\x00" on this system',
    ]


def test_timeouts_and_ticks_that_would_hang_or_overflow_a_running_daemon_are_errors(tmp_path: Path) -> None:
    found = errors(tmp_path, 'drain_timeout_s = inf\nepoch_tick_ms = 100000000000\nworker_threads = 1000000\n'
                             '[[components]]\nid = "a/echo/0"\npath = "echo.wasm"\nshutdown_timeout_s = inf\n'
                             'health_interval_s = nan\nrestart_window_s = 1e300\nbackoff_base_ms = 86400001\n'
                             'backoff_max_ms = 9223372036854775807\n')
    assert found == [
        "host.epoch_tick_ms: expected an integer > 0 and <= 1000, got 100000000000",
        "host.worker_threads: expected an integer > 0 and <= 4096, got 1000000",
        "host.drain_timeout_s: expected a number >= 0 and <= 86400.0, got inf",
        "components[0].restart_window_s: expected a number > 0 and <= 86400.0, got 1e+300",
        "components[0].backoff_base_ms: expected an integer > 0 and <= 86400000, got 86400001",
        "components[0].backoff_max_ms: expected an integer > 0 and <= 86400000, got 9223372036854775807",
        "components[0].health_interval_s: expected a number > 0, got nan",
        "components[0].shutdown_timeout_s: expected a number > 0 and <= 86400.0, got inf",
    ]


def test_a_call_deadline_too_long_for_a_thread_to_wait_on_is_an_error(tmp_path: Path) -> None:
    """max_execution_time_ms = 2^63 - 1 (meant as "no deadline") was accepted: the worker pool's deadline thread
    then waited for a deadline 292 million years away at the component's first call, Python refused the wait
    (OverflowError: timestamp out of range for platform time_t) and the thread died, so no call of any component
    was timed out any more: a neighbour's 300 ms call left sleeping went unanswered (`wasmhost call` gave up
    after 30 s, where it had been answered "timed out" in 0.4 s)."""
    found = errors(tmp_path, '[host.default_limits]\nmax_execution_time_ms = 9223372036854775807\n'
                             '[[components]]\nid = "a/echo/0"\npath = "echo.wasm"\n'
                             'limits = { max_execution_time_ms = 86400001 }\n')
    assert found == [
        "host.default_limits.max_execution_time_ms: expected an integer > 0 and <= 86400000, got 9223372036854775807",
        "components[0].limits.max_execution_time_ms: expected an integer > 0 and <= 86400000, got 86400001",
    ]
    longest = parse(tmp_path, '[[components]]\nid = "a/echo/0"\npath = "echo.wasm"\n'
                              'limits = { max_execution_time_ms = 86400000 }\n')
    assert longest.components[0].spec.limits.max_execution_time_ms == 86_400_000  # type: ignore[attr-defined]


def test_a_control_socket_path_too_long_to_bind_is_an_error(tmp_path: Path) -> None:
    state = tmp_path / ("s" * 120)
    with pytest.raises(ConfigError) as info:
        parse_config(f'[host]\nstate_dir = "{state}"\n', tmp_path / "wasmhost.toml")
    length = len(str(state / "wasmhost.sock"))
    assert info.value.errors == [f"host.control_socket: {state / 'wasmhost.sock'} is {length} bytes long; a Unix "
                                 "socket path holds at most 107 (shorten state_dir or control_socket)"]


def test_outbound_http_is_granted_per_component_and_must_be_a_boolean(tmp_path: Path) -> None:
    config = parse(tmp_path, '[[components]]\nid = "a/web/0"\npath = "echo.wasm"\noutbound_http = true\n'
                             '[[components]]\nid = "a/echo/0"\npath = "echo.wasm"\n')
    assert [plan.outbound_http for plan in config.components] == [True, False]  # type: ignore[attr-defined]
    found = errors(tmp_path, '[[components]]\nid = "a/web/0"\npath = "echo.wasm"\noutbound_http = "yes"\n')
    assert found == ['components[0].outbound_http: expected true or false, got "yes"']


def test_the_rollout_check_window_has_a_host_default_and_a_per_component_override(tmp_path: Path) -> None:
    config = parse(tmp_path, 'rollout_check_s = 0.5\n[[components]]\nid = "a/b/c"\npath = "echo.wasm"\n'
                             '[[components]]\nid = "a/b/d"\npath = "echo.wasm"\nrollout_check_s = 0\n')
    assert [p.rollout_check_s for p in config.components] == [0.5, 0.0]  # type: ignore[attr-defined]
    found = errors(tmp_path, 'rollout_check_s = -1\n[[components]]\nid = "a/b/c"\npath = "echo.wasm"\n'
                             'rollout_check_s = "long"\n')
    assert found == ["host.rollout_check_s: expected a number >= 0, got -1",
                     'components[0].rollout_check_s: expected a number >= 0, got "long"'], found


def test_a_configuration_or_component_data_too_large_to_be_one_is_refused_naming_the_limit(tmp_path: Path) -> None:
    """A file written to the config's path by mistake (a log, a dump) took 1.1 s and 55 MB per MiB to parse
    and check; config data is lowered anew for every instance at 32 bytes per byte."""
    from wasmhost.system.config import load_config

    MAX_CONFIG_BYTES, MAX_CONFIG_DATA_BYTES = 8 * 1024 * 1024, 1024 * 1024  # noqa: N806 (as config.py names them)
    huge = tmp_path / "huge.toml"
    huge.write_text("[host]\n" + ("# " + "x" * 97 + "\n") * (MAX_CONFIG_BYTES // 100 + 1))
    with pytest.raises(ConfigError) as info:
        load_config(huge)
    assert info.value.errors == ["larger than 8388608 bytes (8 MiB): not a wasmhost configuration (large "
                                 "component data belongs in a config_file)"]

    (tmp_path / "blob.bin").write_bytes(b"x" * (MAX_CONFIG_DATA_BYTES + 1))
    (tmp_path / "fits.bin").write_bytes(b"x" * MAX_CONFIG_DATA_BYTES)
    component = '[[components]]\nid = "a/echo/{0}"\npath = "echo.wasm"\n{1}\n'
    found = errors(tmp_path, component.format(0, 'config_file = "blob.bin"')
                   + component.format(1, f'config_data = "{"y" * (MAX_CONFIG_DATA_BYTES + 1)}"')
                   + component.format(2, 'config_file = "fits.bin"'))
    assert found == [
        f"components[0].config_file: {tmp_path / 'blob.bin'} is larger than 1048576 bytes (1 MiB), the most "
        "handed to initialize",
        "components[1].config_data: 1048577 bytes; at most 1048576 (1 MiB) are handed to initialize",
    ]


def test_ids_that_print_alike_are_an_error_and_ids_differing_in_case_a_warning(tmp_path: Path) -> None:
    composed, decomposed = "a/caf\u00e9/0", "a/cafe\u0301/0"  # é as one code point, and as e + combining accent
    component = '[[components]]\nid = "{0}"\npath = "echo.wasm"\n'
    assert errors(tmp_path, component.format(composed) + component.format(decomposed)) == [
        f"components[1].id: {decomposed!r} is components[0]'s id written in another Unicode normalisation form "
        "(it prints the same): use one spelling, or different ids"]
    config = parse(tmp_path, component.format("a/echo/0") + component.format("a/Echo/0"))
    assert [str(p.spec.component_id) for p in config.components] == ["a/echo/0", "a/Echo/0"]  # type: ignore[attr-defined]
    assert config.warnings == [  # type: ignore[attr-defined]
        "components[1].id: 'a/Echo/0' differs from components[0]'s id only in case: they are two components"]
    spaced = parse(tmp_path, "".join(component.format(cid) for cid in (
        "a/echo/0 ", " a/echo/1", "a/echo\u3000/2", "a/ec ho/3", "a/echo/4")))
    assert spaced.warnings == [  # type: ignore[attr-defined]
        "components[0].id: 'a/echo/0 ' has a part starting or ending with whitespace",
        "components[1].id: ' a/echo/1' has a part starting or ending with whitespace",
        "components[2].id: 'a/echo\\u3000/2' has a part starting or ending with whitespace"]


def test_a_component_file_larger_than_the_loader_takes_is_a_config_error(tmp_path: Path) -> None:
    components = tmp_path / "components"
    components.mkdir()
    with (components / "big.wasm").open("wb") as f:
        f.write((FIXTURES / "echo.wasm").read_bytes())  # a valid header: only the size is wrong
        f.truncate(128 * 1024 * 1024 + 1)
    with pytest.raises(ConfigError) as info:
        parse_config(f'[host]\ncomponents_dir = "{components}"\n[[components]]\nid = "a/big/0"\npath = "big.wasm"\n',
                     tmp_path / "wasmhost.toml")
    assert info.value.errors == [f"components[0].path: {components / 'big.wasm'} is 134217729 bytes, larger than "
                                 "134217728 (128 MiB), the largest component file loaded"]


def test_a_state_dir_or_components_dir_naming_a_file_is_an_error_and_the_file_is_left_alone(tmp_path: Path) -> None:
    """`state_dir = "wasmhost.toml"` (or any file's name) made run and check chmod that file 0700 and then fail
    on the control socket ('File exists'); check said ok."""
    from wasmhost.core.private_files import private_dir

    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    a_file.chmod(0o644)
    with pytest.raises(ConfigError) as info:
        parse_config('[host]\nstate_dir = "notes.txt"\ncomponents_dir = "notes.txt"\n', tmp_path / "wasmhost.toml")
    assert info.value.errors == [f"host.components_dir: {a_file} is not a directory",
                                 f"host.state_dir: {a_file} is not a directory"]
    with pytest.raises(NotADirectoryError):
        private_dir(a_file)  # what the daemon makes of its state_dir, should one be swapped for a file later
    assert (a_file.stat().st_mode & 0o777) == 0o644 and a_file.read_text() == "mine"


def test_a_file_that_is_not_utf8_or_starts_with_a_bom_says_where_and_what_to_do(tmp_path: Path) -> None:
    """A Latin-1 file said only 'not UTF-8 text'; one saved with a byte order mark (by some Windows editors)
    got tomllib's 'Invalid statement (at line 1, column 1)' about a line that reads `[host]`."""
    from wasmhost.system.config import load_config

    latin = tmp_path / "latin.toml"
    latin.write_bytes(b'[host]\nlog_level = "caf\xe9"\n')
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b'\xef\xbb\xbf[host]\nlog_level = "info"\n')
    for path, error in ((latin, "not UTF-8 text: byte 0xe9 at line 2, column 17 (save the file as UTF-8)"),
                        (bom, "starts with a byte order mark (U+FEFF), which TOML does not allow: save the file as "
                              "UTF-8 without one")):
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert info.value.errors == [error]


def test_entries_with_the_same_settings_share_them_and_each_bad_one_is_reported_at_its_place(tmp_path: Path) -> None:
    # What entries have in common is worked out once per read (a third of an entry's checks at 10,000 entries);
    # a bad value is not remembered: every entry that has it is reported.
    good = '[[components]]\nid = "a/echo/{0}"\npath = "echo.wasm"\ncapabilities.send = ["a/*"]\nlog_rate = 5.0\n'
    bad = '[[components]]\nid = "a/echo/{0}"\npath = "echo.wasm"\ncapabilities.send = ["a/b"]\nlog_rate = inf\n'
    assert errors(tmp_path, good.format(0) + bad.format(1) + good.format(2) + bad.format(3)) == [
        f"components[{i}].{error}" for i in (1, 3) for error in (
            "log_rate: expected a finite number > 0 (lines per second), got inf",
            "capabilities.send[0]: target pattern 'a/b': expected '*', 'namespace/*', 'namespace/name/*' or "
            "'namespace/name/instance'")]
    first, second = parse(tmp_path, good.format(0) + good.format(1)).components  # type: ignore[attr-defined]
    for name in ("limits", "log_limit", "restart", "intensity", "backoff", "strategy"):
        assert getattr(first.spec, name) is getattr(second.spec, name), name
    assert first.grants is second.grants
    assert first.spec.log_limit.rate == 5.0 and [p.text for p in first.grants.send] == ["a/*"]
