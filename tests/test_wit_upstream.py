"""wasmhost's WIT is upstream airssys-wasm's, in meaning: compared with a pinned copy (tests/upstream_wit),
and proven by a guest written against upstream's interfaces (tests/guests/upstream) running on the daemon.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import FIXTURES, Starter
from tests.test_daemon import Daemon, component, config_text, warm_cache
from wasmhost.core import ComponentMetadata
from wasmhost.runtime.runtime import Runtime

ROOT = Path(__file__).resolve().parent.parent
OURS = ROOT / "wasmhost" / "wit"
UPSTREAM = ROOT / "tests" / "upstream_wit"
WASM_TOOLS = str(Path(sys.executable).parent / "wasm-tools")


def resolve(wit_dir: Path) -> dict[str, Any]:
    """wasm-tools' JSON resolution of a WIT package directory."""
    result = subprocess.run([WASM_TOOLS, "component", "wit", "--json", str(wit_dir)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, f"wasm-tools cannot parse {wit_dir}:\n{result.stderr}"
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


def meaning(wit_dir: Path) -> dict[str, Any]:
    """The package as plain data without docs or declaration order: every interface's types (named
    types refer to each other as `interface.name`, so the interface a type lives in counts, and a `use`
    is a type defined as another interface's type) and functions, and the world's imports and exports.
    Order still counts where it is meaning: record fields, variant cases, enum names, parameters."""
    doc = resolve(wit_dir)
    types, interfaces = doc["types"], doc["interfaces"]

    def ref(ty: Any) -> Any:
        if isinstance(ty, str) or ty is None:
            return ty  # a primitive, or an absent result case
        named = types[ty]
        if named["name"] is not None:
            owner = named["owner"]
            return f"{interfaces[owner['interface']]['name']}.{named['name']}" if "interface" in owner \
                else f"world.{named['name']}"
        return shape(named["kind"])

    def shape(kind: Any) -> Any:
        if not isinstance(kind, dict):
            return kind
        (tag, body), = kind.items()
        if tag == "record":
            return {"record": [(f["name"], ref(f["type"])) for f in body["fields"]]}
        if tag == "variant":
            return {"variant": [(c["name"], ref(c["type"])) for c in body["cases"]]}
        if tag in ("enum", "flags"):
            return {tag: [c["name"] for c in body["cases" if tag == "enum" else "flags"]]}
        if tag == "tuple":
            return {"tuple": [ref(t) for t in body["types"]]}
        if tag == "result":
            return {"result": [ref(body["ok"]), ref(body["err"])]}
        return {tag: ref(body)}  # type (alias or use), list, option

    def item(key: str, value: dict[str, Any]) -> str:
        if "interface" in value:
            return interfaces[value["interface"]["id"]]["name"] or key
        return key

    package = doc["packages"][0]
    return {
        "package": package["name"],
        "worlds": {world["name"]: {"imports": sorted(item(k, v) for k, v in world["imports"].items()),
                                   "exports": sorted(item(k, v) for k, v in world["exports"].items())}
                   for world in doc["worlds"]},
        "interfaces": {
            iface["name"]: {
                "types": {name: shape(types[index]["kind"]) for name, index in iface["types"].items()},
                "functions": {name: {"params": [(p["name"], ref(p["type"])) for p in fn["params"]],
                                     "result": ref(fn.get("result"))}
                              for name, fn in iface["functions"].items()},
            }
            for iface in interfaces
        },
    }


def test_the_pinned_upstream_copy_is_the_package_wasmhost_implements() -> None:
    upstream = meaning(UPSTREAM)
    assert upstream["package"] == "airssys:core@1.0.0"
    assert upstream["worlds"]["runtime-host"] == {  # types and errors come in with the interfaces using them
        "imports": ["errors", "host-messaging", "host-services", "storage", "types"],
        "exports": ["component-lifecycle"]}
    assert "component-metadata" in upstream["interfaces"]["component-lifecycle"]["types"]
    assert "component-info" in upstream["interfaces"]["host-services"]["types"]
    assert upstream["interfaces"]["storage"]["types"]["storage-value"] == {"list": "u8"}


def test_our_wit_means_exactly_what_upstreams_does() -> None:
    ours, upstream = meaning(OURS), meaning(UPSTREAM)
    assert ours["package"] == upstream["package"]
    assert ours["worlds"] == upstream["worlds"]
    assert sorted(ours["interfaces"]) == sorted(upstream["interfaces"])
    for name, interface in upstream["interfaces"].items():
        assert ours["interfaces"][name] == interface, f"interface {name} differs from upstream's"


def test_the_comparison_sees_a_type_declared_in_another_interface(tmp_path: Path) -> None:
    # The drift issue 11 found: component-metadata declared in `types` and used by the lifecycle.
    moved = tmp_path / "wit"
    moved.mkdir()
    for wit in OURS.glob("*.wit"):
        (moved / wit.name).write_text(wit.read_text())
    lifecycle = (moved / "component-lifecycle.wit").read_text()
    record_at = lifecycle.index("    /// Self-description")
    record = lifecycle[record_at:lifecycle.rindex("}")]
    (moved / "component-lifecycle.wit").write_text(
        lifecycle.replace(record, "").replace("message-payload, health-status}",
                                              "message-payload, health-status, component-metadata}"))
    types = (moved / "types.wit").read_text()
    (moved / "types.wit").write_text(types[:types.rindex("}")] + record + "}\n")
    drifted = meaning(moved)["interfaces"]["component-lifecycle"]
    assert drifted != meaning(UPSTREAM)["interfaces"]["component-lifecycle"]
    assert drifted["types"]["component-metadata"] == {"type": "types.component-metadata"}


def test_a_guest_written_against_upstreams_wit_runs_on_wasmhost(start: Starter, runtime: Runtime,
                                                                tmp_path: Path) -> None:
    # tests/guests/upstream imports ComponentMetadata from component_lifecycle and ComponentInfo
    # from host_services, as upstream declares them; build.py built it with componentize-py.
    meta = start("upstream", "authors/upstream/0").metadata()
    assert meta == ComponentMetadata(
        name="upstream", version="1.2.3", description="Written against upstream airssys-wasm's WIT",
        author="wasmhost tests", license="Apache-2.0", supported_operations=("echo", "whoami", "keep"), stateful=True)

    config = tmp_path / "wasmhost.toml"
    config.write_text(config_text(tmp_path / "state", component(
        "authors/upstream/0", "upstream", "capabilities = { storage = true }"), FIXTURES))
    warm_cache(runtime, tmp_path / "state", FIXTURES / "upstream.wasm")  # the daemon links it, need not compile it
    d = Daemon(tmp_path, config)
    try:
        d.expect("READY=1")
        assert d.call("authors/upstream/0", "echo round trip") == "round trip"
        assert d.call("authors/upstream/0", "whoami") == "upstream 1.2.3 healthy"
        assert d.call("authors/upstream/0", "keep some bytes") == "some bytes"
        row = d.cli("inspect", "authors/upstream/0")
        assert row.returncode == 0, row.stderr
        assert "state       running\n" in row.stdout and "restarts    0\n" in row.stdout
        assert d.stop() == 0
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()


def test_a_binary_built_for_wasmhosts_earlier_layout_still_runs(tmp_path: Path) -> None:
    # Component-model types are structural: a binary whose component-metadata and component-info come
    # from `types` (tests/fixtures/wit-variants/earlier-layout) links against the same host functions.
    config = tmp_path / "wasmhost.toml"
    config.write_text(config_text(tmp_path / "state", component("t/earlier/0", "earlier"), FIXTURES))
    d = Daemon(tmp_path, config)
    try:
        d.expect("READY=1")
        assert d.call("t/earlier/0", "who") == "earlier 0.1.0 healthy"
        assert d.stop() == 0
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()
