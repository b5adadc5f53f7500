"""The link step at load: `check`, `run` and `reload` refuse a component whose imports `run` could not
link, naming every such import and the remedy; wasi:http only for a component granted outbound_http."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import fixture_path
from tests.test_daemon import component, config_text, daemon, wasmhost
from wasmhost.core import ComponentConfig, ComponentId, ComponentMessage, MessageMetadata, Timestamp
from wasmhost.core.errors import UnsatisfiedImportsError
from wasmhost.runtime.runtime import Runtime

__all__ = ["daemon"]  # the real-daemon fixture of test_daemon.py

CID = ComponentId.parse("test-org/web/0")
HTTP_IMPORTS = ["wasi:http/types@0.2.0 (outbound HTTP, not granted)",
                "wasi:http/outgoing-handler@0.2.0 (outbound HTTP, not granted)"]
HTTP_REMEDY = "build the component without it (componentize-js or `jco componentize`: add `-d http -d fetch-event`)"


def test_wasi_http_is_refused_without_the_grant_naming_each_import_and_the_remedy(runtime: Runtime) -> None:
    with pytest.raises(UnsatisfiedImportsError) as info:
        runtime.load(CID, fixture_path("httpclient"))
    assert info.value.imports == HTTP_IMPORTS
    assert HTTP_REMEDY in str(info.value)
    assert "grant it with `outbound_http = true`" in str(info.value)


def test_wasi_http_is_linked_for_a_component_granted_outbound_http(runtime: Runtime) -> None:
    loaded = runtime.load(CID, fixture_path("httpclient"), outbound_http=True)
    manager = runtime.store(loaded, CID)
    try:
        manager.instantiate()  # the same linker `run` uses: wasmtime's wasi:http is there
        manager.initialize(ComponentConfig())
        message = ComponentMessage(CID, b"through the http linker", MessageMetadata(timestamp=Timestamp.now()))
        assert manager.handle_message(message) == b"through the http linker"
    finally:
        manager.close()


def test_a_granted_guest_calling_wasi_http_gets_an_answer_and_the_daemon_lives_on(daemon: object) -> None:
    """A guest granted outbound_http that calls wasi:http (here: makes the fields resource every request
    starts with). The Store had no WASI HTTP context: wasmtime's C API panicked at that first call and
    the whole daemon aborted (SIGABRT), the `call` unanswered and every neighbour gone with it."""
    d = daemon(component("t/web/0", "httpfields", "outbound_http = true")  # type: ignore[operator]
               + component("t/echo/0", "echo"))
    assert d.call("t/web/0", "made a fields resource") == "made a fields resource"
    assert d.call("t/echo/0", "still here") == "still here"
    assert d.stop() == 0


def test_every_import_the_host_does_not_provide_is_named_with_each_remedy(runtime: Runtime) -> None:
    with pytest.raises(UnsatisfiedImportsError) as info:
        runtime.load(CID, fixture_path("wasiextra"))
    assert info.value.imports == ["wasi:keyvalue/store@0.2.0-draft (not provided by this host)",
                                  "wasi:http/types@0.2.0 (outbound HTTP, not granted)"]
    text = str(info.value)
    assert HTTP_REMEDY in text
    assert "wasmhost provides WASI 0.2 (wasi:io, clocks, random, filesystem, sockets, cli)" in text
    with pytest.raises(UnsatisfiedImportsError) as granted:  # the grant covers wasi:http only
        runtime.load(CID, fixture_path("wasiextra"), outbound_http=True)
    assert granted.value.imports == ["wasi:keyvalue/store@0.2.0-draft (not provided by this host)"]


def test_the_real_link_step_catches_a_function_wasi_0_2_does_not_have(runtime: Runtime) -> None:
    # wasi:cli@0.2.0 is provided, so only the linker itself can tell that get-everything is not.
    with pytest.raises(UnsatisfiedImportsError) as info:
        runtime.load(CID, fixture_path("wasimismatch"))
    assert info.value.imports == ["wasi:cli/environment@0.2.0 (not provided by this host: instance export "
                                  "`get-everything` has the wrong type: function implementation is missing)"]


def test_a_componentize_py_guest_importing_all_of_wasi_0_2_links(runtime: Runtime) -> None:
    loaded = runtime.load(CID, fixture_path("prober"))
    assert "wasi:sockets/tcp@0.2.9" in loaded.imports  # whatever it imports, the host defines


def test_check_names_the_refused_imports_and_passes_with_the_grant(tmp_path: Path) -> None:
    config = tmp_path / "wasmhost.toml"
    config.write_text(config_text(tmp_path / "state", component("t/web/0", "httpclient")
                                  + component("t/kv/0", "wasiextra", "outbound_http = true")))
    result = wasmhost("check", "--config", str(config))
    assert result.returncode == 1
    assert "2 component(s) cannot be loaded" in result.stderr
    web = next(line for line in result.stderr.splitlines() if "t/web/0:" in line)
    assert all(name in web for name in HTTP_IMPORTS) and HTTP_REMEDY in web
    kv = next(line for line in result.stderr.splitlines() if "t/kv/0:" in line)
    assert "wasi:keyvalue/store@0.2.0-draft (not provided by this host)" in kv and "wasi:http" not in kv.split(". ")[0]
    config.write_text(config_text(tmp_path / "state", component("t/web/0", "httpclient", "outbound_http = true")))
    granted = wasmhost("check", "--config", str(config))
    assert granted.returncode == 0 and "ok, 1 component(s)" in granted.stdout, granted.stderr


def test_run_never_starts_a_component_it_cannot_link_and_reload_refuses_one(daemon: object, tmp_path: Path) -> None:
    d = daemon(component("t/echo/0", "echo") + component("t/web/0", "httpclient")  # type: ignore[operator]
               + component("t/granted/0", "httpclient", "outbound_http = true"))
    rows = {r["id"]: r for r in json.loads(d.cli("status", "--json").stdout)["components"]}
    assert rows["t/web/0"]["state"] == "failed" and rows["t/web/0"]["restarts"] == 0
    assert HTTP_IMPORTS[0] in rows["t/web/0"]["last_error"] and HTTP_REMEDY in rows["t/web/0"]["last_error"]
    assert d.call("t/granted/0", "linked with wasi:http") == "linked with wasi:http"
    failed = [e for e in d.events() if e["event"] == "component_load_failed"]
    assert [e["component"] for e in failed] == ["t/web/0"]
    assert not any(e["event"] == "component_restarting" and e.get("component") == "t/web/0" for e in d.events())
    d.config.write_text(config_text(tmp_path / "state", component("t/echo/0", "echo")
                                    + component("t/granted/0", "httpclient", "outbound_http = true")
                                    + component("t/new/0", "wasiextra")))
    result = d.cli("reload")
    assert result.returncode == 1
    assert "reload rejected, nothing changed" in result.stderr
    refused = next(line for line in result.stderr.splitlines() if "t/new/0: " in line)
    assert "wasi:keyvalue/store@0.2.0-draft (not provided by this host)" in refused
    assert d.call("t/echo/0", "still here") == "still here"
    assert d.stop() == 0


def test_inspect_links_wasi_http_only_when_asked() -> None:
    refused = wasmhost("inspect", str(fixture_path("httpclient")))
    assert refused.returncode == 1 and HTTP_IMPORTS[0] in refused.stderr
    granted = wasmhost("inspect", "--outbound-http", str(fixture_path("httpclient")))
    assert granted.returncode == 0, granted.stderr
    assert "httpclient 0.1.0" in granted.stdout


def test_bytes_that_linked_before_skip_the_link_step_unless_the_grant_differs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Counts the calls of our own link step (wasmtime is left alone): a new Runtime over the same
    cache directory, as a restarted daemon, trusts what linked before with the same grant only."""
    from wasmhost.runtime.linking import Linkers

    steps: list[str] = []
    real = Linkers.link_problem

    def counted(self: Linkers, component: object, imports: frozenset[str]) -> tuple[str, str] | None:
        steps.append("link")
        return real(self, component, imports)  # type: ignore[arg-type]

    monkeypatch.setattr(Linkers, "link_problem", counted)
    for expected in (["link"], []):  # a fresh cache directory, then the same one in a new Runtime
        runtime = Runtime(cache_dir=tmp_path)
        try:
            steps.clear()
            runtime.load(CID, fixture_path("httpclient"), outbound_http=True)
            assert steps == expected
        finally:
            runtime.close()
    runtime = Runtime(cache_dir=tmp_path)
    try:
        steps.clear()
        with pytest.raises(UnsatisfiedImportsError) as info:  # linked with the grant: still refused without it
            runtime.load(CID, fixture_path("httpclient"))
        assert info.value.imports == HTTP_IMPORTS and steps == ["link"]
    finally:
        runtime.close()
