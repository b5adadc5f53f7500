"""The link step of `run`, done when a component is loaded: every import must be one its linker defines.

A component whose imports cannot be satisfied compiles fine and fails only at instantiation ("a matching
implementation was not found in the linker"); checking at load lets `check`, `run` and `reload` refuse it
with every such import named and what to do about it, instead of restarting it until it is given up on.
"""

from __future__ import annotations

import hashlib
import threading

import wasmtime
from wasmtime import component as wc

from wasmhost.runtime.host_fn import HOST_FUNCTIONS, build_linker

WASI_HTTP = "wasi:http/"
"""Imports under this prefix are outbound HTTP: linked only for a component granted `outbound_http`."""

WASIP2_PACKAGES = frozenset({"io", "clocks", "random", "filesystem", "sockets", "cli"})
"""The WASI 0.2 packages `Linker.add_wasip2` defines. wasmtime-py cannot list what a linker defines, and
the linker reports only the first import it cannot satisfy, so every import is first judged by its name
(to name each one the host lacks) and the real link step then has the last word."""

NOT_PROVIDED = "not provided by this host"
NOT_GRANTED = "outbound HTTP, not granted"
HTTP_REMEDY = ("wasi:http is outbound network access: build the component without it (componentize-js or "
               "`jco componentize`: add `-d http -d fetch-event`), or grant it with `outbound_http = true` in "
               "the component's configuration")
HOST_REMEDY = ("wasmhost provides WASI 0.2 (wasi:io, clocks, random, filesystem, sockets, cli), wasi:http with "
               "`outbound_http = true`, and airssys:core@1.0.0 host-messaging, host-services and storage: build "
               "the component against wasmhost/wit with no other imports")
LINK_FAILED = "was not found in the linker"
"""wasmtime's words when an import cannot be satisfied (`component imports instance `X`, but a matching
implementation was not found in the linker`)."""


LINKER_FINGERPRINT = hashlib.sha256(repr(
    [(fn.interface, fn.name) for fn in HOST_FUNCTIONS] + sorted(WASIP2_PACKAGES)).encode()).hexdigest()[:16]
"""Changes whenever the linkers define other functions, invalidating remembered link checks (the
compilation cache's keys already change with wasmtime's version, which brings its WASI)."""


def imports_http(imports: frozenset[str]) -> bool:
    """Whether a component with these imports needs wasi:http linked."""
    return any(name.startswith(WASI_HTTP) for name in imports)


def wasi_problem(name: str, outbound_http: bool) -> str | None:
    """Why the WASI import `name` cannot be satisfied, judged by its name (None: leave it to the linker)."""
    if name.startswith(WASI_HTTP):
        return None if outbound_http else f"{name} ({NOT_GRANTED})"
    package = name.removeprefix("wasi:").split("/", 1)[0]
    if package in WASIP2_PACKAGES and name.partition("@")[2].startswith("0.2."):
        return None
    return f"{name} ({NOT_PROVIDED})"


def remedies(problems: list[str]) -> str:
    """What to do about `problems`, each remedy once."""
    http = any(p.endswith(f"({NOT_GRANTED})") for p in problems)
    other = any(not p.endswith(f"({NOT_GRANTED})") for p in problems)
    return ". ".join(text for text, needed in ((HTTP_REMEDY, http), (HOST_REMEDY, other)) if needed)


class Linkers:
    """The process's component linkers: WASI 0.2 and the host functions, and the same plus wasi:http for
    components granted outbound HTTP (built when first needed)."""

    def __init__(self, engine: wasmtime.Engine) -> None:
        self.engine = engine
        self.plain = build_linker(engine)
        self._http: wc.Linker | None = None
        self._lock = threading.Lock()  # loads run on several threads

    def for_imports(self, imports: frozenset[str]) -> wc.Linker:
        """The linker a component with these imports is instantiated with (wasi:http only if it imports it;
        the loader refuses such a component unless it was granted outbound HTTP)."""
        if not imports_http(imports):
            return self.plain
        with self._lock:
            if self._http is None:
                linker = build_linker(self.engine)
                linker.add_wasi_http()
                self._http = linker
            return self._http

    def link_problem(self, component: wc.Component, imports: frozenset[str]) -> tuple[str, str] | None:
        """Run the link step of instantiation for `component` (with wasi:http if it imports it, so that
        an ungranted wasi:http hides no other problem) and say which import failed and why, or None.

        The Store allows no instance at all: wasmtime checks every import against the linker before it
        creates anything, so a component that links fails on that limit instead, having created and run
        nothing (or, importing sleep-millis, an async host function, on the synchronous instantiate that
        wasmtime then refuses, also before creating anything: either is not a link failure)."""
        store = wasmtime.Store(self.engine)
        store.set_limits(instances=0, memories=0, tables=0)
        try:
            self.for_imports(imports).instantiate(store, component)
        except wasmtime.WasmtimeError as exc:
            text = str(exc).strip()
            if LINK_FAILED not in text:
                return None  # the instance limit: linking succeeded
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            name = lines[0].split("`")[1] if lines[0].count("`") >= 2 else lines[0]
            causes = [line.split(": ", 1)[-1] for line in lines[1:] if line != "Caused by:"]
            return name, f"{name} ({NOT_PROVIDED}: {': '.join(causes) or text})"
        return None
