"""prober: a test guest (Python, componentize-py) that tries what a hostile component would try.

Payload commands, each answered with a short text:
  env                 -> the environment it can see (KEY=VALUE lines)
  read PATH           -> the first bytes of a host file, or "denied: ..."
  list PATH           -> the directory entries it can see, or "denied: ..."
  send|request|broadcast NS NAME INST SIZE -> calls the import with a SIZE-byte payload
  badid               -> send to ids with empty, slash and NUL parts
  timeout N           -> request with timeout-ms N (0 and 2^64-1 included)
  cancel ID           -> cancel-request of an unknown id
  bigkey N / bigvalue N / manykeys N / prefix TEXT -> storage with extreme arguments
  self                -> self-id
  exit N              -> ends the process through WASI exit with status N (WASI 0.2 passes 0 or 1)
Every host error comes back as "error: <case>: <detail>"; anything else means the call succeeded.
"""

import os

from componentize_py_types import Err
from wit_world import exports
from wit_world.exports.component_lifecycle import ComponentMetadata
from wit_world.imports import host_messaging, storage, types
from wit_world.imports.errors import WasmError_RuntimeError


def describe(err: Err) -> str:
    value = err.value
    name = type(value).__name__.split("_", 1)[-1]
    detail = getattr(value, "value", "")
    return f"error: {name}: {detail}"


def component_id(ns: str, name: str, inst: str) -> types.ComponentId:
    return types.ComponentId(namespace=ns, name=name, instance=inst)


def run(words: list[str]) -> str:
    op = words[0]
    if op == "env":
        return "\n".join(f"{k}={v}" for k, v in sorted(os.environ.items()))
    if op == "read":
        try:
            with open(words[1], "rb") as f:
                return "read: " + f.read(64).decode("utf-8", "replace")
        except OSError as exc:
            return f"denied: {type(exc).__name__}"
    if op == "list":
        try:
            return "entries: " + ",".join(sorted(os.listdir(words[1])))
        except OSError as exc:
            return f"denied: {type(exc).__name__}"
    if op in ("send", "request", "broadcast"):
        target = component_id(words[1], words[2], words[3])
        payload = b"x" * int(words[4])
        if op == "send":
            host_messaging.send(target, payload)
        elif op == "request":
            return "ok: " + host_messaging.request(target, payload, 5000)
        else:
            host_messaging.broadcast([target] * 3, payload)
        return "ok"
    if op == "badid":
        results = []
        for parts in (("", "b", "c"), ("a/b", "c", "d"), ("a", "b\x00", "c"), ("..", "b", "c")):
            try:
                host_messaging.send(component_id(*parts), b"x")
                results.append("ok")
            except Err as err:
                results.append(describe(err))
        return "\n".join(results)
    if op == "timeout":
        return "ok: " + host_messaging.request(component_id(words[1], words[2], words[3]), b"t", int(words[4]))
    if op == "cancel":
        host_messaging.cancel_request(words[1])
        return "ok"
    if op == "bigkey":
        storage.set("k" * int(words[1]), b"v")
        return "ok"
    if op == "bigvalue":
        storage.set("big", b"v" * int(words[1]))
        return "ok"
    if op == "manykeys":
        for i in range(int(words[1])):
            storage.set(f"key-{i:06d}", b"")
        return f"ok: {len(storage.list_keys(None))} keys"
    if op == "prefix":
        return "ok: " + ",".join(storage.list_keys(words[1] if len(words) > 1 else None))
    if op == "exit":
        os._exit(int(words[1]))
    if op == "self":
        me = host_messaging.self_id()
        return f"{me.namespace}/{me.name}/{me.instance}"
    raise Err(WasmError_RuntimeError(f"unknown command {op!r}"))


class ComponentLifecycle(exports.ComponentLifecycle):
    """Lifecycle exports of the prober."""

    def initialize(self, config: types.ComponentConfig) -> None:
        pass

    def handle_message(self, msg: types.ComponentMessage) -> bytes | None:
        try:
            return run(msg.payload.decode().split(" ")).encode()
        except Err as err:
            if isinstance(err.value, WasmError_RuntimeError):
                raise
            return describe(err).encode()

    def handle_callback(self, msg: types.ComponentMessage) -> None:
        pass

    def metadata(self) -> ComponentMetadata:
        return ComponentMetadata(
            name="prober", version="0.1.0", description="Tries what a hostile component would try",
            author="wasmhost tests", license="Apache-2.0", supported_operations=["probe"], stateful=False,
        )

    def health(self) -> types.HealthStatus:
        return types.HealthStatus.HEALTHY

    def shutdown(self) -> None:
        pass
