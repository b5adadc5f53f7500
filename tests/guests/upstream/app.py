"""upstream: a guest written against upstream airssys-wasm's WIT, as its authors would write it.

Every type is imported from the interface upstream declares it in: `ComponentMetadata` from
`component-lifecycle`, `ComponentInfo` from `host-services`, the rest from `types` and `errors`.
If wasmhost's WIT declared them elsewhere, componentize-py would not find these names and the
build (tests/fixtures/build.py) would fail.

Payload commands:
  echo TEXT  -> TEXT
  whoami     -> `NAME VERSION HEALTH` from host-services.get-component-metadata of its own id
  keep TEXT  -> stores TEXT under `kept` and answers the stored bytes read back
"""

from componentize_py_types import Err
from wit_world import exports
from wit_world.exports.component_lifecycle import ComponentMetadata
from wit_world.imports import host_messaging, host_services, storage
from wit_world.imports.errors import WasmError_RuntimeError
from wit_world.imports.host_services import ComponentInfo
from wit_world.imports.types import ComponentConfig, ComponentMessage, HealthStatus


def whoami() -> str:
    """This component as the host describes it to others."""
    info: ComponentInfo = host_services.get_component_metadata(host_messaging.self_id())
    return f"{info.name} {info.version} {info.health}"


def keep(text: str) -> str:
    """Round trip through storage: set, then get."""
    storage.set("kept", text.encode())
    value = storage.get("kept")
    return "missing" if value is None else value.decode()


class ComponentLifecycle(exports.ComponentLifecycle):
    """The lifecycle exports, typed as upstream's WIT types them."""

    def initialize(self, config: ComponentConfig) -> None:
        """Nothing to set up."""

    def handle_message(self, msg: ComponentMessage) -> bytes | None:
        """Answer one payload command."""
        op, _, rest = msg.payload.decode("utf-8", "replace").partition(" ")
        try:
            if op == "echo":
                return rest.encode()
            if op == "whoami":
                return whoami().encode()
            if op == "keep":
                return keep(rest).encode()
        except Err as exc:
            raise Err(WasmError_RuntimeError(f"{op} failed: {exc.value}")) from None
        raise Err(WasmError_RuntimeError(f"unknown command {op!r}"))

    def handle_callback(self, msg: ComponentMessage) -> None:
        """It makes no requests."""

    def metadata(self) -> ComponentMetadata:
        """Who it is."""
        return ComponentMetadata(
            name="upstream", version="1.2.3", description="Written against upstream airssys-wasm's WIT",
            author="wasmhost tests", license="Apache-2.0", supported_operations=["echo", "whoami", "keep"],
            stateful=True,
        )

    def health(self) -> HealthStatus:
        """Always healthy."""
        return HealthStatus.HEALTHY

    def shutdown(self) -> None:
        """Nothing to release."""
