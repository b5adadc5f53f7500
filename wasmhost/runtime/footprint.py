"""Counts what one instantiation of a component creates: core instances, linear memories, tables
and component instances.

wasmtime limits memory size and table elements per memory and per table, and the numbers of
instances, memories and tables per Store; it has no limit on their sum. To bound a Store's total,
the limiter needs these counts before instantiation, so this module reads them from the component
binary (no library reads the component binary format from Python). Only what matters is decoded:
core modules' table and memory sections, core and component instantiations, and the imports,
exports and aliases that add modules or components to their index spaces; everything else is
skipped by its section size. The loader reads the counts before wasmtime compiles (and validates)
the binary, so anything malformed ends in UnreadableBinary.

The cost follows the structure, not the bytes: a section's payload (a custom section, a code or data
section) is skipped in O(1) by its declared size, whatever it holds. What is walked one by one is
bounded: at most MAX_SECTIONS sections (nested ones included) and MAX_ENTRIES vector entries in the
sections read, each vector's length checked against the bytes left before any entry is read. Whoever
can write a component's file appended 128 MiB of zeros, or of 3-byte custom sections, and held the
reload for 45 s while each was read in Python: zeros are refused at their first byte (a custom
section must hold its name, as in wasmtime), a run of sections once it passes MAX_SECTIONS.

Counts are exact for the components wit-component and componentize-py produce. wasmtime enforces
the memory and table counts at instantiation, so a count that were too low would make
instantiation fail; it could never let a guest create more than the limiter budgeted for.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

PAGE_BYTES = 65536
"""The default (and, without the custom-page-sizes proposal, only) WebAssembly page size."""


class UnreadableBinary(ValueError):
    """The binary uses a construct this reader cannot account for, or is cut short; the message says which."""


class Uncountable(UnreadableBinary):
    """A binary read whole that instantiates something it does not define (imported, or taken from an
    instance's exports): what that creates cannot be counted from the binary."""


class TooManyParts(Uncountable):
    """A binary with more sections (MAX_SECTIONS) or vector entries (MAX_ENTRIES) than the reader walks:
    refused rather than counted one by one for seconds (it may well be valid for wasmtime)."""


MAX_SECTIONS = 100_000
"""Sections read in one binary, nested components' and core modules' included. The largest components
seen (componentize-py's, 18 MB) have 718; 100,000 take about 0.08 s to walk. 128 MiB of empty custom
sections (3 bytes each) are 44 million: 45 s in Python (wasmtime compiles them in 2 to 6 s)."""

MAX_ENTRIES = 250_000
"""Vector entries (instantiations, aliases, imports, exports, tables, memories) read in one binary.
componentize-py's components have about 3,000; 250,000 aliases take about 0.3 s."""


@dataclass(frozen=True)
class Footprint:
    """What instantiating a component creates in its Store."""

    instances: int = 0
    """Core module instances (what wasmtime's instance limit counts)."""
    memories: int = 0
    """Linear memories defined (not imported) by the instantiated core modules."""
    tables: int = 0
    """Tables defined by the instantiated core modules."""
    largest_memory_min: int = 0
    """The largest initial size of any of those memories, in bytes."""
    largest_table_min: int = 0
    """The largest initial size of any of those tables, in elements."""
    shared_memories: int = 0
    """Memories declared `shared` (the threads proposal)."""
    component_instances: int = 0
    """Component instances (nested components instantiated), which create no memories themselves."""

    def encode(self) -> bytes:
        """The counts as ASCII, for the compilation cache."""
        return ",".join(str(getattr(self, name)) for name in _FIELDS).encode()

    @classmethod
    def decode(cls, data: bytes) -> Footprint | None:
        """What `encode` made, or None for anything else."""
        parts = data.split(b",")
        if len(parts) != len(_FIELDS) or not all(part.isdigit() for part in parts):
            return None
        return cls(*(int(part) for part in parts))

    def __add__(self, other: Footprint) -> Footprint:
        return Footprint(
            self.instances + other.instances,
            self.memories + other.memories,
            self.tables + other.tables,
            max(self.largest_memory_min, other.largest_memory_min),
            max(self.largest_table_min, other.largest_table_min),
            self.shared_memories + other.shared_memories,
            self.component_instances + other.component_instances,
        )


_FIELDS = (
    "instances", "memories", "tables", "largest_memory_min", "largest_table_min", "shared_memories",
    "component_instances",
)

_ONE_COMPONENT = Footprint(component_instances=1)

_UNKNOWN = None
"""An index-space entry whose footprint cannot be known (imported or aliased from an instance)."""


class _Budget:
    """What is left of MAX_SECTIONS and MAX_ENTRIES for one binary, shared by all its readers."""

    def __init__(self) -> None:
        self.sections = MAX_SECTIONS
        self.entries = MAX_ENTRIES


class _Reader:
    """A cursor over bytes with the LEB128 and vector readers of the wasm binary format."""

    __slots__ = ("budget", "data", "end", "pos")

    def __init__(self, data: bytes | memoryview, start: int = 0, end: int | None = None,
                 budget: _Budget | None = None) -> None:
        self.data = memoryview(data)
        self.pos = start
        self.end = len(data) if end is None else end
        self.budget = _Budget() if budget is None else budget

    def within(self, start: int, end: int) -> _Reader:
        """A reader of data[start:end] (a section's body) sharing this one's budget."""
        return _Reader(self.data, start, end, self.budget)

    def count(self) -> int:
        """A vector's length, refused at once when its entries (a byte at least each) cannot fit in the bytes
        left, or would take the binary past MAX_ENTRIES."""
        at = self.pos
        count = self.leb()
        if count > self.end - self.pos:
            raise UnreadableBinary(f"a vector of {count} entries at offset {at} cannot fit in the "
                                   f"{self.end - self.pos} bytes left of its section")
        self.budget.entries -= count
        if self.budget.entries < 0:
            raise TooManyParts(f"more than {MAX_ENTRIES} entries in its sections (the vector at offset {at} "
                               f"has {count}): too many to count")
        return count

    def byte(self) -> int:
        if self.pos >= self.end:
            raise UnreadableBinary(f"unexpected end of data at offset {self.pos}")
        value = self.data[self.pos]
        self.pos += 1
        return value

    def leb(self) -> int:
        """An unsigned LEB128 number (also skips a signed one, whose value is then not needed)."""
        result = shift = 0
        while True:
            byte = self.byte()
            result |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return result
            if shift > 70:
                raise UnreadableBinary(f"overlong LEB128 number at offset {self.pos}")

    def skip(self, count: int) -> None:
        if count < 0 or self.pos + count > self.end:
            raise UnreadableBinary(f"a length of {count} at offset {self.pos} runs past the end")
        self.pos += count

    def name(self) -> None:
        self.skip(self.leb())


def _sections(reader: _Reader) -> Iterator[tuple[int, int, _Reader]]:
    """(id, offset of its body, body reader) of each section but custom ones, from the reader's position to its
    end. Every section is counted against MAX_SECTIONS and skipped by its size without reading its payload,
    which must fit; a custom section (id 0) must hold its name, as wasmtime requires: zeros appended to a
    binary read as empty custom sections, refused at the first."""
    budget = reader.budget
    while reader.pos < reader.end:
        offset = reader.pos
        section, size = reader.byte(), reader.leb()
        start = reader.pos
        if size > reader.end - start:
            raise UnreadableBinary(f"section {section} at offset {offset} declares {size} bytes, but only "
                                   f"{reader.end - start} are left")
        reader.pos = start + size
        budget.sections -= 1
        if budget.sections < 0:
            raise TooManyParts(f"more than {MAX_SECTIONS} sections (the one at offset {offset} is past the "
                               "limit): too many to count")
        if section == 0:
            name = reader.within(start, start + size)
            if size == 0 or name.leb() > name.end - name.pos:
                raise UnreadableBinary(f"the custom section at offset {offset} ({size} bytes) cannot hold its "
                                       "name: bytes after the last section (padding?) or a malformed section")
        else:
            yield section, start, reader.within(start, start + size)


def _limits(reader: _Reader) -> tuple[int, bool]:
    """Skip limits; return (minimum, shared). Flags: 1 has max, 2 shared, 4 64-bit, 8 custom page size."""
    flags = reader.byte()
    if flags & ~0x0F:
        raise UnreadableBinary(f"unknown limits flags {flags:#x} at offset {reader.pos - 1}")
    minimum = reader.leb()
    if flags & 1:
        reader.leb()
    if flags & 8:
        reader.leb()  # log2 of the page size; wasmtime refuses custom page sizes unless enabled
    return minimum, bool(flags & 2)


def _const_expr(reader: _Reader) -> None:
    """Skip a constant expression up to its `end`."""
    immediates = {0x41: "leb", 0x42: "leb", 0x23: "leb", 0xD0: "leb", 0xD2: "leb", 0x43: 4, 0x44: 8}
    arithmetic = {0x6A, 0x6B, 0x6C, 0x7C, 0x7D, 0x7E}  # extended-const: i32/i64 add, sub, mul
    while (opcode := reader.byte()) != 0x0B:
        immediate = immediates.get(opcode)
        if immediate == "leb":
            reader.leb()
        elif isinstance(immediate, int):
            reader.skip(immediate)
        elif opcode not in arithmetic:
            raise UnreadableBinary(f"unsupported opcode {opcode:#x} in a table initializer at offset {reader.pos - 1}")


def _reftype(reader: _Reader) -> None:
    code = reader.byte()
    if code in (0x63, 0x64):  # (ref null? heaptype)
        reader.leb()


def module_footprint(reader: _Reader) -> Footprint:
    """The tables and memories a core module defines (its own, not imported ones); one instance."""
    if bytes(reader.data[reader.pos : reader.pos + 8]) != b"\0asm\x01\x00\x00\x00":
        raise UnreadableBinary(f"a core module at offset {reader.pos} lacks the core wasm header")
    reader.skip(8)
    tables = memories = shared = largest_table = largest_memory = 0
    for section, _, body in _sections(reader):
        if section == 4:
            for _ in range(body.count()):
                if body.pos < body.end and body.data[body.pos] == 0x40:  # a table with an initializer
                    body.skip(2)
                    _reftype(body)
                    minimum, _ = _limits(body)
                    _const_expr(body)
                else:
                    _reftype(body)
                    minimum, _ = _limits(body)
                tables += 1
                largest_table = max(largest_table, minimum)
        elif section == 5:
            for _ in range(body.count()):
                minimum, is_shared = _limits(body)
                memories += 1
                shared += is_shared
                largest_memory = max(largest_memory, minimum * PAGE_BYTES)
    return Footprint(1, memories, tables, largest_memory, largest_table, shared)


@dataclass
class _Scope:
    """The core module and component index spaces of one component being read."""

    modules: list[Footprint | None]
    components: list[Footprint | None]


def _pick(space: list[Footprint | None], index: int, what: str, offset: int) -> Footprint:
    if index >= len(space):
        raise UnreadableBinary(f"{what} index {index} at offset {offset} is out of range")
    found = space[index]
    if found is None:
        raise Uncountable(
            f"instantiates {what} {index} (offset {offset}), which is imported or taken from an instance, "
            "so what it creates cannot be counted"
        )
    return found


def _sort(reader: _Reader) -> int:
    """A component-level sort; core sorts come back as 0x100 + the core sort byte."""
    sort = reader.byte()
    return 0x100 + reader.byte() if sort == 0x00 else sort


CORE_MODULE, COMPONENT = 0x111, 0x04


def _extern_desc(reader: _Reader) -> int:
    """Skip an externdesc; return its sort."""
    kind = reader.byte()
    if kind == 0x00:
        reader.byte()  # 0x11: core module
        reader.leb()
        return CORE_MODULE
    if kind in (0x01, 0x04, 0x05):
        reader.leb()
        return kind
    if kind == 0x03:
        if reader.byte() == 0x00:
            reader.leb()
        return kind
    raise UnreadableBinary(f"unsupported import/export description {kind:#x} at offset {reader.pos - 1}")


def _extern_name(reader: _Reader) -> None:
    discriminant = reader.byte()
    if discriminant not in (0x00, 0x01):
        raise UnreadableBinary(f"unsupported name encoding {discriminant:#x} at offset {reader.pos - 1}")
    reader.name()


def component_footprint(reader: _Reader, outer: list[_Scope]) -> Footprint:
    """What one instantiation of the component at the reader creates, nested components included."""
    reader.skip(8)  # header, checked by the caller (top level) or by wasmtime's validation
    scope = _Scope([], [])
    stack = [*outer, scope]
    total = Footprint()
    for section, start, body in _sections(reader):
        if section == 1:
            scope.modules.append(module_footprint(body))
        elif section == 4:
            scope.components.append(component_footprint(body, stack))
        elif section == 2:
            for _ in range(body.count()):
                if body.byte() == 0x00:
                    at = body.pos
                    total += _pick(scope.modules, body.leb(), "core module", at)
                    for _ in range(body.count()):
                        body.name()
                        body.skip(1)  # 0x12: instance
                        body.leb()
                else:
                    for _ in range(body.count()):
                        body.name()
                        body.skip(1)
                        body.leb()
        elif section == 5:
            for _ in range(body.count()):
                if body.byte() == 0x00:
                    at = body.pos
                    total += _pick(scope.components, body.leb(), "component", at) + _ONE_COMPONENT
                    for _ in range(body.count()):
                        body.name()
                        _sort(body)
                        body.leb()
                else:
                    for _ in range(body.count()):
                        _extern_name(body)
                        _sort(body)
                        body.leb()
        elif section == 6:
            for _ in range(body.count()):
                sort, target = _sort(body), body.byte()
                if target == 0x02:
                    depth, index = body.leb(), body.leb()
                    if depth >= len(stack):
                        raise UnreadableBinary(f"outer alias of depth {depth} at offset {body.pos}")
                    enclosing = stack[len(stack) - 1 - depth]
                    if sort == CORE_MODULE:
                        scope.modules.append(_entry(enclosing.modules, index))
                    elif sort == COMPONENT:
                        scope.components.append(_entry(enclosing.components, index))
                    continue
                if target not in (0x00, 0x01):
                    raise UnreadableBinary(f"unsupported alias target {target:#x} at offset {body.pos - 1}")
                body.leb()
                body.name()
                if sort == CORE_MODULE:
                    scope.modules.append(_UNKNOWN)
                elif sort == COMPONENT:
                    scope.components.append(_UNKNOWN)
        elif section == 10:
            for _ in range(body.count()):
                _extern_name(body)
                sort = _extern_desc(body)
                if sort == CORE_MODULE:
                    scope.modules.append(_UNKNOWN)
                elif sort == COMPONENT:
                    scope.components.append(_UNKNOWN)
        elif section == 11:
            for _ in range(body.count()):
                _extern_name(body)
                sort, index = _sort(body), body.leb()
                if body.byte() == 0x01:
                    _extern_desc(body)
                if sort == CORE_MODULE:  # an export is a new index for the same definition
                    scope.modules.append(_entry(scope.modules, index))
                elif sort == COMPONENT:
                    scope.components.append(_entry(scope.components, index))
        elif section not in (3, 7, 8, 9):
            raise UnreadableBinary(f"unsupported component section {section} at offset {start}")
    return total


def _entry(space: list[Footprint | None], index: int) -> Footprint | None:
    if index >= len(space):
        raise UnreadableBinary(f"index {index} is out of range")
    return space[index]


def footprint(wasm: bytes) -> Footprint:
    """What instantiating the component `wasm` creates; UnreadableBinary when it cannot be read."""
    try:
        return component_footprint(_Reader(wasm), [])
    except IndexError:
        raise UnreadableBinary("a length runs past the end of the binary") from None
    except RecursionError:
        raise UnreadableBinary("components nested too deeply") from None
