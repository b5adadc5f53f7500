"""greeter: a wasmhost component written in Python, built with componentize-py.

`handle-message` answers "Hello, NAME!" for a payload NAME, logs through the host, and keeps a
greeting count in its storage.
"""

from componentize_py_types import Err
from wit_world import exports
from wit_world.exports.component_lifecycle import ComponentMetadata
from wit_world.imports import host_services, storage, types
from wit_world.imports.errors import WasmError_RuntimeError


class ComponentLifecycle(exports.ComponentLifecycle):
    """The lifecycle exports of the greeter."""

    def initialize(self, config: types.ComponentConfig) -> None:
        """Nothing to set up: the count lives in storage."""

    def handle_message(self, msg: types.ComponentMessage) -> bytes | None:
        """Greet the name in the payload and count the greeting."""
        name = msg.payload.decode("utf-8", "replace").strip() or "world"
        try:
            count = int(storage.get("greetings") or b"0") + 1
            storage.set("greetings", str(count).encode())
        except Err as exc:
            raise Err(WasmError_RuntimeError(f"storage unavailable: {exc.value}")) from None
        host_services.log(types.LogLevel.INFO, f"greeting {name}", [("count", str(count))])
        return f"Hello, {name}! (greeting #{count}, from Python)".encode()

    def handle_callback(self, msg: types.ComponentMessage) -> None:
        """The greeter makes no requests."""

    def metadata(self) -> ComponentMetadata:
        """Who the greeter is."""
        return ComponentMetadata(
            name="greeter", version="0.1.0", description="Greets by name; written in Python",
            author="wasmhost examples", license="Apache-2.0", supported_operations=["greet"], stateful=False,
        )

    def health(self) -> types.HealthStatus:
        """Always healthy."""
        return types.HealthStatus.HEALTHY

    def shutdown(self) -> None:
        """Nothing to release."""
