"""Finds, validates and compiles component binaries, telling apart every way a file can be wrong."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import msgspec
import wasmtime
from wasmtime import component as wc
from wasmtime.component._types import ComponentExtern  # what ComponentType.imports maps names to; not re-exported

from wasmhost.core.errors import (
    CompileError,
    CoreModuleError,
    FootprintError,
    LoadError,
    MissingExportsError,
    NotWasmError,
    UnsatisfiedImportsError,
)
from wasmhost.core.ids import ComponentId
from wasmhost.core.limits import MAX_COMPONENT_INSTANCES, MAX_INSTANCES, MAX_MEMORIES, MAX_TABLES
from wasmhost.core.private_files import NotRegularFile, read_regular_file
from wasmhost.runtime import capi, contract, linking
from wasmhost.runtime.cache import CompilationCache
from wasmhost.runtime.codec import Converter, converter_for
from wasmhost.runtime.footprint import Footprint, Uncountable, UnreadableBinary, footprint

_EXPECTED = (
    sorted(contract.LIFECYCLE_EXPORTS.items()),
    sorted((name, sorted(functions.items())) for name, functions in contract.HOST_IMPORTS.items()),
)
CONTRACT_FINGERPRINT = hashlib.sha256(repr(_EXPECTED).encode()).hexdigest()[:16]
"""Changes whenever the expected signatures change, invalidating remembered validations."""

MAX_COMPONENT_BYTES = 128 * 1024 * 1024
"""The largest component file loaded (an 18 MB componentize-py guest is a large one). Whoever can write a
component's file must not make the daemon read gigabytes (a sparse file costs them nothing) nor count its
sections for minutes: 1.5 GB of zeros after a valid component held a reload for over 9 minutes at 3.2 GB."""


def read_component_file(where: Path) -> bytes:
    """The bytes of the component file at `where`: a regular file (a FIFO is refused, not waited on) of at most
    MAX_COMPONENT_BYTES, read no further than that; LoadError saying why not."""
    try:
        wasm = read_regular_file(where, MAX_COMPONENT_BYTES)
    except FileNotFoundError:
        raise LoadError(str(where), "no such file") from None
    except NotRegularFile as exc:  # what the descriptor showed: the path may have changed since
        raise LoadError(str(where), f"is {exc.kind}, expected a .wasm file") from None
    except OSError as exc:
        raise LoadError(str(where), f"cannot read: {exc.strerror or exc}") from None
    if len(wasm) > MAX_COMPONENT_BYTES:
        raise LoadError(str(where), f"larger than {MAX_COMPONENT_BYTES} bytes (128 MiB), the largest component "
                                    "file loaded")
    return wasm


MAX_PROBLEMS_SHOWN = 16
"""Unsatisfied imports named in a load error; the others are counted."""
MAX_PROBLEM_CHARS = 300
"""Characters of one unsatisfied import's line in a load error (an import name is as long as its binary says)."""

WASM_MAGIC = b"\0asm"
CORE_VERSION = b"\x01\x00\x00\x00"
COMPONENT_LAYER = b"\x01\x00"


class ExportIndexes:
    """The export indexes (wasmtime_component_export_index_t) looked up in one compiled component,
    made through the C API and freed once nothing refers to this object any more."""

    def __init__(self, compiled: wc.Component) -> None:
        self._component = capi.addr_of(compiled.ptr())
        self._made: list[int] = []

    def find(self, name: str, within: int = 0) -> int:
        """The address of the index of export `name` (of the instance export at index `within`, if
        given), or 0 when there is none."""
        encoded = name.encode()
        address = capi.component_get_export_index(self._component, within or None, encoded, len(encoded)) or 0
        if address:
            self._made.append(address)
        return address

    def __del__(self) -> None:
        for address in self._made:
            capi.component_export_index_delete(address)


@dataclass(frozen=True)
class ExportSpec:
    """A lifecycle export: where to find it and its converters, built once per component."""

    name: str
    params: list[Converter]
    result: Converter | None
    index_address: int
    """The address of its export index, for the C API's instance_get_func (owned by `indexes`)."""
    indexes: ExportIndexes


@dataclass(frozen=True)
class LoadedComponent:
    """A validated, compiled component ready to be instantiated any number of times."""

    source: str
    digest: str
    component: wc.Component
    exports: dict[str, ExportSpec]
    imports: frozenset[str]
    size: int
    footprint: Footprint
    """What one instantiation creates: core instances, memories, tables (the limiter's budget)."""

    @functools.cached_property
    def uses_wasi(self) -> bool:
        """Whether the component imports any WASI interface (read at every instantiation: kept)."""
        return any(name.startswith("wasi:") for name in self.imports)

    @functools.cached_property
    def uses_http(self) -> bool:
        """Whether the component imports wasi:http: it is instantiated with the wasi:http linker, whose
        functions need the Store's WASI HTTP context (read at every instantiation: kept)."""
        return linking.imports_http(self.imports)


@dataclass(frozen=True)
class Signature:
    """A function type read once: its converters and its description in the contract's notation."""

    params: list[Converter]
    result: Converter | None
    text: str


def signature_of(fty: wc.FuncType) -> Signature:
    """Read a function type through the FFI once and build its converters."""
    params = [(name, converter_for(ty)) for name, ty in fty.params]
    result_type = fty.result
    result = converter_for(result_type) if result_type is not None else None
    text = contract.signature([(name, conv.wit) for name, conv in params], result.wit if result else None)
    return Signature([conv for _, conv in params], result, text)


def describe(fty: wc.FuncType) -> str:
    """A function type in the contract's notation."""
    return signature_of(fty).text


def mismatch(expected: str, got: str) -> str:
    """`expected X, got Y` for two signatures, and where they part when that is hard to see: a field
    swapped deep inside handle-message's record hides in two 600-character lines otherwise."""
    text = f"expected {expected}, got {got}"
    if len(expected) <= SHORT_SIGNATURE:
        return text
    at = next((i for i, (a, b) in enumerate(zip(expected, got, strict=False)) if a != b), min(len(expected), len(got)))
    start = max(0, at - 30)

    def around(signature: str) -> str:
        end = at + 40
        return ("..." if start else "") + signature[start:end] + ("..." if end < len(signature) else "")

    return f"{text} (they differ at: expected `{around(expected)}`, got `{around(got)}`)"


SHORT_SIGNATURE = 120
"""Signatures up to this long are compared at a glance; longer ones get the place where they differ."""


_VALIDATED: dict[str, Signature] = {}
"""Converters of the lifecycle exports, shared by every component that matched the contract
(converters hold no state); filled by the first full validation in this process."""


def check_header(wasm: bytes, source: str) -> None:
    """Reject bytes that are not wasm, and core modules, with what to do about them."""
    if len(wasm) < 8 or wasm[:4] != WASM_MAGIC:
        raise NotWasmError(source, f"not a WebAssembly binary (expected the magic bytes \\0asm, got {wasm[:4]!r})")
    if wasm[4:8] == CORE_VERSION:
        raise CoreModuleError(
            source,
            "this is a core WebAssembly module, not a component; wasmhost runs Component Model components "
            "only. Turn it into one with `wasm-tools component new MODULE.wasm -o COMPONENT.wasm` "
            "(after `wasm-tools component embed` of the airssys:core WIT if it lacks type information)",
        )
    if wasm[6:8] != COMPONENT_LAYER:
        raise NotWasmError(source, f"unknown WebAssembly version/layer {wasm[4:8].hex()} (expected a component)")


ASYNC_REMEDY = ("\nwasmhost calls the airssys:core functions synchronously: build the component without "
                "component-model async (no `async func` in its WIT, no streams, futures or WASI 0.3)")
"""Added to a compile error caused by component-model async, which the engine has off (engine.py)."""


def compile_remedy(error: str) -> str:
    """What to do about wasmtime's compile `error`, when there is something to say ("" otherwise)."""
    return ASYNC_REMEDY if "requires the component model async" in error else ""


LOAD_NOTE = "load-3"
"""Name under which a component's counts (footprint.py) and import names are kept in the compilation
cache (bump it when footprint.py counts differently). Counting an 18 MB componentize-py binary takes a
few milliseconds, a small one about a third of a cached start; walking its import types 15 - 25 us."""

_LOAD_NOTE = msgspec.json.Decoder(tuple[str, list[str]])


def encode_load_note(counted: Footprint, imports: list[str]) -> bytes:
    """What LOAD_NOTE keeps: the counts and the import names."""
    return msgspec.json.encode((counted.encode().decode(), imports))


def decode_load_note(noted: bytes | None) -> tuple[Footprint, list[str]] | None:
    """The counts and import names `encode_load_note` kept, or None for anything else."""
    if noted is None:
        return None
    try:
        counts, imports = _LOAD_NOTE.decode(noted)
    except msgspec.DecodeError:
        return None
    found = Footprint.decode(counts.encode())
    return (found, imports) if found is not None else None


def read_footprint(wasm: bytes) -> Footprint | UnreadableBinary:
    """What instantiating the component `wasm` creates, or why it cannot be counted (Uncountable: a
    component instantiating what it does not define; otherwise the bytes are most likely invalid)."""
    try:
        return footprint(wasm)
    except UnreadableBinary as exc:
        return exc


def check_footprint(found: Footprint, source: str) -> None:
    """FootprintError when a component creates more than one Store allows (core/limits.py)."""
    problems = [
        f"{count} {what} (at most {limit})"
        for what, count, limit in (
            ("core module instances", found.instances, MAX_INSTANCES),
            ("component instances", found.component_instances, MAX_COMPONENT_INSTANCES),
            ("linear memories", found.memories, MAX_MEMORIES),
            ("tables", found.tables, MAX_TABLES),
        )
        if count > limit
    ]
    if found.shared_memories:
        problems.append(f"{found.shared_memories} shared memories (not supported)")
    if problems:
        raise FootprintError(source, "creates more than one component's Store allows: " + ", ".join(problems))


def _lifecycle_exports(compiled: wc.Component, engine: wasmtime.Engine, source: str) -> dict[str, ExportSpec]:
    exported = {name: item.ty for name, item in compiled.type.exports(engine).items()}
    interface = exported.get(contract.LIFECYCLE)
    if not isinstance(interface, wc.ComponentInstanceType):
        names = ", ".join(sorted(exported)) or "nothing"
        raise MissingExportsError(
            source, f"does not export {contract.LIFECYCLE} (it exports {names})", sorted(contract.LIFECYCLE_EXPORTS)
        )
    functions = {name: item.ty for name, item in interface.exports(engine).items()}
    missing = [name for name in contract.LIFECYCLE_EXPORTS if not isinstance(functions.get(name), wc.FuncType)]
    wrong = []
    found: dict[str, Signature] = {}
    for name, expected in contract.LIFECYCLE_EXPORTS.items():
        fty = functions.get(name)
        if isinstance(fty, wc.FuncType):
            found[name] = signature_of(fty)
            if found[name].text != expected:
                wrong.append(f"{name}: {mismatch(expected, found[name].text)}")
    if missing or wrong:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing)}")
        if wrong:
            parts.append("wrong signature: " + "; ".join(wrong))
        raise MissingExportsError(source, f"{contract.LIFECYCLE} is incomplete: " + "; ".join(parts), missing + wrong)
    for name, sig in found.items():
        _VALIDATED.setdefault(name, sig)
    return _export_specs(compiled, found)


def _export_specs(compiled: wc.Component, signatures: dict[str, Signature]) -> dict[str, ExportSpec]:
    indexes = ExportIndexes(compiled)
    lifecycle = indexes.find(contract.LIFECYCLE)
    specs = {}
    for name, sig in signatures.items():
        address = indexes.find(name, lifecycle)
        assert address, "the loader checked these exports"
        specs[name] = ExportSpec(name, sig.params, sig.result, address, indexes)
    return specs


def _contract_problems(imported: Mapping[str, ComponentExtern], engine: wasmtime.Engine) -> list[str]:
    """What is wrong with the component's imports (`compiled.type.imports`) that are not WASI: each airssys
    host function must exist with the contract's signature, and nothing else may be imported."""
    problems = []
    for name, extern in imported.items():
        item = extern.ty
        if name.startswith("wasi:") or name in contract.TYPE_ONLY_IMPORTS:
            continue
        offered = contract.HOST_IMPORTS.get(name)
        if offered is None or not isinstance(item, wc.ComponentInstanceType):
            problems.append(f"{name} ({linking.NOT_PROVIDED})")
            continue
        for fname, fitem in item.exports(engine).items():
            fty = fitem.ty
            if not isinstance(fty, wc.FuncType):
                continue  # exported types (records, variants) need nothing from the host
            if fname not in offered:
                problems.append(f"{name}#{fname} (no such host function)")
            elif (actual := describe(fty)) != offered[fname]:
                problems.append(f"{name}#{fname} ({mismatch(offered[fname], actual)})")
    return problems


class FileComponentLoader:
    """Loads components from `{base}/{namespace}/{name}/{instance}.wasm` or an explicit path."""

    def __init__(self, base: Path | None, cache: CompilationCache, linkers: linking.Linkers) -> None:
        self.base = base
        self.cache = cache
        self.linkers = linkers

    def path_for(self, component: ComponentId) -> Path:
        """Where the loader looks for `component` when no explicit path is given."""
        if self.base is None:
            raise LoadError(str(component), "no components directory configured and no explicit path given")
        return self.base / component.namespace / component.name / f"{component.instance}.wasm"

    def load(self, component: ComponentId, path: Path | None = None, outbound_http: bool = False) -> LoadedComponent:
        """Read, validate, compile and link-check the binary for `component` (`outbound_http`: whether its
        configuration grants it wasi:http)."""
        where = path if path is not None else self.path_for(component)
        return self.load_bytes(read_component_file(where), str(where), outbound_http, str(component))

    def load_bytes(self, wasm: bytes, source: str, outbound_http: bool = False,
                   component: str | None = None) -> LoadedComponent:
        """Validate, compile and link-check `wasm`; `source` (and `component`) name it in errors and logs."""
        check_header(wasm, source)
        engine = self.cache.engine.engine
        key = self.cache.key(wasm)
        # Counted before compiling: wasmtime flattens nested instantiations when it compiles, so a
        # few hundred bytes nesting components ten deep would take gigabytes to compile.
        recalled = decode_load_note(self.cache.recall(key, LOAD_NOTE))
        counted = recalled[0] if recalled is not None else read_footprint(wasm)
        # What cannot be counted is not compiled either: it could be a bomb only the compiler would unfold.
        if isinstance(counted, Uncountable):
            raise FootprintError(source, f"cannot count the instances, memories and tables it creates, so "
                                 f"nothing of it was compiled: {counted}")
        if isinstance(counted, UnreadableBinary):
            raise CompileError(source, f"invalid component: {counted} (read before compiling: nothing of it was "
                               "compiled)")
        check_footprint(counted, source)
        try:
            compiled = self.cache.component(wasm, key, source, component)
        except wasmtime.WasmtimeError as exc:
            raise CompileError(source, f"invalid component: {str(exc).strip()}{compile_remedy(str(exc))}") from None
        import_types = None  # walked at most once per load, only when the note or the contract check needs it
        if recalled is None:
            import_types = compiled.type.imports(engine)
            imports = list(import_types)
            self.cache.note(key, LOAD_NOTE, encode_load_note(counted, imports))  # kept only for bytes that compile
        else:
            imports = recalled[1]
        problems: list[str] = []
        try:
            if len(_VALIDATED) == len(contract.LIFECYCLE_EXPORTS) and self.cache.is_marked(key, CONTRACT_FINGERPRINT):
                # These very bytes matched this very contract before: skip walking their types again.
                exports = _export_specs(compiled, _VALIDATED)
            else:
                try:
                    exports = _lifecycle_exports(compiled, engine, source)
                except MissingExportsError as wrong_exports:
                    # The imports are judged too, so that one `check` names everything to fix.
                    raise self._with_import_problems(wrong_exports, compiled, engine, key, imports,
                                                     outbound_http, source) from None
                if import_types is None:
                    import_types = compiled.type.imports(engine)
                problems = _contract_problems(import_types, engine)
                if not problems:
                    self.cache.mark(key, CONTRACT_FINGERPRINT)
            self._check_links(compiled, key, imports, problems, outbound_http, source)
        except LoadError:
            self.cache.forget(wasm)
            raise
        return LoadedComponent(source, key, compiled, exports, frozenset(imports), len(wasm), counted)

    def _with_import_problems(self, wrong_exports: MissingExportsError, compiled: wc.Component,
                              engine: wasmtime.Engine, key: str, imports: list[str], outbound_http: bool,
                              source: str) -> MissingExportsError:
        """`wrong_exports`, with what is wrong with the component's imports added to its reason."""
        try:
            problems = _contract_problems(compiled.type.imports(engine), engine)
            self._check_links(compiled, key, imports, problems, outbound_http, source)
        except UnsatisfiedImportsError as wrong_imports:
            return MissingExportsError(source, f"{wrong_exports.reason}; and it {wrong_imports.reason}",
                                       wrong_exports.missing)
        return wrong_exports

    def _check_links(self, compiled: wc.Component, key: str, names: list[str], problems: list[str],
                     outbound_http: bool, source: str) -> None:
        """UnsatisfiedImportsError naming every import `run` could not link, with what to do about it:
        `problems` found in the contract, WASI imports judged by name, then the real link step. Bytes
        that linked before with the same linkers and grant skip the link step (a Store and a failed
        instantiation: about 70 us of a cached start)."""
        problems = problems + [p for name in names if name.startswith("wasi:")
                               and (p := linking.wasi_problem(name, outbound_http)) is not None]
        linked = f"linked-{linking.LINKER_FINGERPRINT}-{'http' if outbound_http else 'plain'}"
        if not problems and self.cache.is_marked(key, linked):
            return
        failed = self.linkers.link_problem(compiled, frozenset(names))
        if failed is not None and not any(p.split(" ", 1)[0].split("#", 1)[0] == failed[0] for p in problems):
            problems.append(failed[1])
        if problems:
            # The import names are the binary's: thousands of them, each as long as it likes, made the error
            # (kept in status, logged, answered by reload) as large as the binary. The first few say what is wrong.
            shown = [p if len(p) <= MAX_PROBLEM_CHARS else f"{p[:MAX_PROBLEM_CHARS]}..."
                     for p in problems[:MAX_PROBLEMS_SHOWN]]
            if len(problems) > MAX_PROBLEMS_SHOWN:
                shown.append(f"and {len(problems) - MAX_PROBLEMS_SHOWN} more")
            raise UnsatisfiedImportsError(
                source, f"imports the host cannot satisfy: {'; '.join(shown)}. {linking.remedies(problems)}",
                problems,
            )
        self.cache.mark(key, linked)
