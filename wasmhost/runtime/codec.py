"""Typed converters between Python values and wasmtime component values, built once per type.

wasmtime-py's generic conversion re-reads every type through the FFI on each call and converts
`list<u8>` one byte at a time; these converters are built once from a function's types and move
byte lists with strided memoryview copies (our own: no library does this).

Python representation: record -> dict keyed by WIT field name, variant -> (case, payload),
enum -> str, option -> value or None, result -> Ok(value) / Err(value), list<u8> -> bytes,
other lists -> list, tuple -> tuple, flags -> frozenset[str], char -> str of length 1.

`lift(addr)` reads the value at `addr` without freeing it. `lower(value, addr)` writes an owned
value (all inner storage allocated by wasmtime's allocator) that wasmtime or `capi.val_delete`
frees later; on failure nothing is left allocated and `addr` holds a valid `bool`.
"""

from __future__ import annotations

import ctypes
import struct
import threading
from typing import Any, Generic, TypeVar

from wasmtime import component as wc

from wasmhost.runtime import capi
from wasmhost.runtime.capi import ENTRY_SIZE, ENTRY_VAL, NAME_SIZE, VAL_PAYLOAD, VAL_SIZE

T = TypeVar("T")

_MEMORY = capi.HOST_MEMORY
_memmove = ctypes.memmove  # for copies from C addresses; bytes are written with _put
_U64 = struct.Struct("<Q")
_TWO_U64 = struct.Struct("<QQ")
_KIND_WORD = struct.Struct("<B7xQ")
_RESULT_HEAD = struct.Struct("<?7xQ")
_RESULT_VAL = struct.Struct("<B7xB7xQ")
_ZERO_VAL = bytes(VAL_SIZE)


class _ResultCase(Generic[T]):
    """A case of a WIT result with its payload (None when the case carries none)."""

    __slots__ = ("value",)

    def __init__(self, value: T = None) -> None:  # type: ignore[assignment]
        self.value = value

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.value == self.value  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), self.value))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.value!r})"


class Ok(_ResultCase[T]):
    """The `ok` case of a WIT result."""

    __slots__ = ()


class Err(_ResultCase[T]):
    """The `err` case of a WIT result."""

    __slots__ = ()


class ConversionError(ValueError):
    """A Python value does not fit the WIT type it is converted to."""


def read_word(addr: int) -> int:
    """The 64-bit word at `addr`."""
    return int(_U64.unpack_from(_MEMORY, addr)[0])


def read_name(addr: int) -> str:
    """The UTF-8 text of the wasm_name_t at `addr`."""
    size, data = _TWO_U64.unpack_from(_MEMORY, addr)
    return str(_MEMORY[data:data + size], "utf-8") if size else ""


def write_name(addr: int, text: bytes) -> None:
    """Allocate a wasm_name_t holding `text` at `addr`."""
    capi.byte_vec_new(addr, len(text), text)


def _put(addr: int, data: bytes) -> None:
    """Write `data` at `addr`, in place through HOST_MEMORY. Not ctypes.memmove: a foreign call converts
    its arguments and lets go of the GIL and takes it back (0.7 us against 0.2 us, measured), and every
    host function's result is written so (a guest-to-guest send or request: two writes per call)."""
    _MEMORY[addr : addr + len(data)] = data


def clear_val(addr: int) -> None:
    """Mark the value at `addr` as a plain bool so that dropping it frees nothing."""
    _MEMORY[addr : addr + VAL_SIZE] = _ZERO_VAL  # see _put


_CHUNK = 32768  # values per bulk copy: 1 MiB of C values, so copies stay in reusable heap memory
_staging = threading.local()


def strided_bytes(data: int, count: int) -> bytes:
    """The u8 payloads of `count` consecutive values starting at `data`.

    bytes slicing with a step is ~5x faster than a strided memoryview, so copy out and slice.
    """
    if count <= _CHUNK:
        return read_bytes(data + VAL_PAYLOAD, (count - 1) * VAL_SIZE + 1)[::VAL_SIZE] if count else b""
    parts = []
    for start in range(0, count, _CHUNK):
        n = min(_CHUNK, count - start)
        parts.append(read_bytes(data + start * VAL_SIZE + VAL_PAYLOAD, (n - 1) * VAL_SIZE + 1)[::VAL_SIZE])
    return b"".join(parts)


def read_bytes(addr: int, size: int) -> bytes:
    """A copy of the `size` bytes at `addr` (none read when `size` is 0)."""
    return _MEMORY[addr:addr + size].tobytes()


def u8_template(count: int) -> bytearray:
    """Zeroed room for `count` u8 values with every kind byte already set."""
    buffer = bytearray(count * VAL_SIZE)
    buffer[0::VAL_SIZE] = bytes((capi.U8,)) * count
    return buffer


def _stage() -> tuple[bytearray, int]:
    stage: tuple[bytearray, int] | None = getattr(_staging, "stage", None)
    if stage is None:
        buffer = u8_template(_CHUNK)
        stage = _staging.stage = (buffer, ctypes.addressof((ctypes.c_uint8 * len(buffer)).from_buffer(buffer)))
    return stage


def fill_u8_vals(data: int, payload: bytes | bytearray | memoryview) -> None:
    """Write `payload` as consecutive u8 values starting at `data` (C memory)."""
    buffer, address = _stage()
    view = memoryview(payload)
    for start in range(0, len(view), _CHUNK):
        part = view[start : start + _CHUNK]
        n = len(part)
        buffer[VAL_PAYLOAD : VAL_PAYLOAD + n * VAL_SIZE : VAL_SIZE] = part
        _memmove(data + start * VAL_SIZE, address, n * VAL_SIZE)


class Converter:
    """Moves values of one WIT type between Python and wasmtime's C representation."""

    wit: str = "?"

    def lift(self, addr: int) -> Any:
        """Read the value at `addr`."""
        raise NotImplementedError

    def lower(self, value: Any, addr: int) -> None:
        """Write `value` as an owned value at `addr`."""
        raise NotImplementedError

    def lower_boxed(self, value: Any) -> int:
        """Lower `value` into a fresh heap value owned by wasmtime; return its address."""
        tmp = (ctypes.c_uint8 * VAL_SIZE)()
        self.lower(value, ctypes.addressof(tmp))
        return int(capi.val_new(ctypes.addressof(tmp)))

    def mismatch(self, value: Any) -> ConversionError:
        """The error for a value that does not fit this type."""
        return ConversionError(f"expected {self.wit}, got {type(value).__name__} {value!r:.80}")


class BoolConverter(Converter):
    """WIT `bool`."""

    wit = "bool"

    def lift(self, addr: int) -> bool:
        return _MEMORY[addr + VAL_PAYLOAD] != 0

    def lower(self, value: Any, addr: int) -> None:
        if not isinstance(value, bool):
            raise self.mismatch(value)
        _put(addr, _KIND_WORD.pack(capi.BOOL, int(value)))


class IntConverter(Converter):
    """WIT integers: range-checked on the way in, never wrapped."""

    def __init__(self, wit: str, kind: int, fmt: str, low: int, high: int) -> None:
        self.wit = wit
        self.kind = kind
        self.payload = struct.Struct("<" + fmt)
        self.low = low
        self.high = high

    def lift(self, addr: int) -> int:
        return int(self.payload.unpack_from(_MEMORY, addr + VAL_PAYLOAD)[0])

    def lower(self, value: Any, addr: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.mismatch(value)
        if not self.low <= value <= self.high:
            raise ConversionError(f"{value} is out of range for {self.wit} ({self.low}..{self.high})")
        _put(addr, bytes((self.kind,)) + bytes(7) + self.payload.pack(value))


class FloatConverter(Converter):
    """WIT `f32` / `f64`."""

    def __init__(self, wit: str, kind: int, fmt: str) -> None:
        self.wit = wit
        self.kind = kind
        self.payload = struct.Struct("<" + fmt)

    def lift(self, addr: int) -> float:
        return float(self.payload.unpack_from(_MEMORY, addr + VAL_PAYLOAD)[0])

    def lower(self, value: Any, addr: int) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.mismatch(value)
        _put(addr, bytes((self.kind,)) + bytes(7) + self.payload.pack(value))


class CharConverter(Converter):
    """WIT `char`: one Unicode scalar value."""

    wit = "char"

    def lift(self, addr: int) -> str:
        return chr(struct.unpack_from("<I", _MEMORY, addr + VAL_PAYLOAD)[0])

    def lower(self, value: Any, addr: int) -> None:
        if not isinstance(value, str) or len(value) != 1 or 0xD800 <= ord(value) <= 0xDFFF:
            raise self.mismatch(value)
        _put(addr, _KIND_WORD.pack(capi.CHAR, ord(value)))


class StringConverter(Converter):
    """WIT `string` <-> str."""

    wit = "string"

    def lift(self, addr: int) -> str:
        return read_name(addr + VAL_PAYLOAD)

    def lower(self, value: Any, addr: int) -> None:
        if not isinstance(value, str):
            raise self.mismatch(value)
        try:
            encoded = value.encode()
        except UnicodeEncodeError as exc:
            raise ConversionError(f"string is not valid Unicode: {exc}") from None
        clear_val(addr)
        write_name(addr + VAL_PAYLOAD, encoded)
        _put(addr, bytes((capi.STRING,)))


class BytesConverter(Converter):
    """WIT `list<u8>` <-> bytes, copied with strided memoryviews instead of per-byte values."""

    wit = "list<u8>"

    def lift(self, addr: int) -> bytes:
        size, data = _TWO_U64.unpack_from(_MEMORY, addr + VAL_PAYLOAD)
        return strided_bytes(data, size)

    def lower(self, value: Any, addr: int) -> None:
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise self.mismatch(value)
        clear_val(addr)
        capi.vallist_new_uninit(addr + VAL_PAYLOAD, len(value))
        _put(addr, bytes((capi.LIST,)))
        fill_u8_vals(read_word(addr + VAL_PAYLOAD + 8), value)


class ListConverter(Converter):
    """WIT `list<T>` <-> list."""

    def __init__(self, element: Converter) -> None:
        self.element = element
        self.wit = f"list<{element.wit}>"

    def lift(self, addr: int) -> list[Any]:
        size, data = _TWO_U64.unpack_from(_MEMORY, addr + VAL_PAYLOAD)
        lift = self.element.lift
        return [lift(data + i * VAL_SIZE) for i in range(size)]

    def lower(self, value: Any, addr: int) -> None:
        if not isinstance(value, (list, tuple)):
            raise self.mismatch(value)
        _lower_sequence(capi.vallist_new_uninit, capi.LIST, [self.element] * len(value), value, addr)


def _lower_sequence(
    alloc: Any, kind: int, converters: list[Converter], values: Any, addr: int
) -> None:
    """Allocate an array of values at `addr` and lower each element; clean up on failure."""
    clear_val(addr)
    count = len(converters)
    alloc(addr + VAL_PAYLOAD, count)
    data = read_word(addr + VAL_PAYLOAD + 8)
    if count:
        ctypes.memset(data, 0, count * VAL_SIZE)
    _put(addr, bytes((kind,)))
    try:
        for i, (conv, item) in enumerate(zip(converters, values, strict=True)):
            conv.lower(item, data + i * VAL_SIZE)
    except Exception:
        capi.val_delete(addr)
        clear_val(addr)
        raise


class TupleConverter(Converter):
    """WIT `tuple<...>` <-> tuple."""

    def __init__(self, elements: list[Converter]) -> None:
        self.elements = elements
        self.wit = "tuple<" + ", ".join(e.wit for e in elements) + ">"

    def lift(self, addr: int) -> tuple[Any, ...]:
        data = read_word(addr + VAL_PAYLOAD + 8)
        return tuple(conv.lift(data + i * VAL_SIZE) for i, conv in enumerate(self.elements))

    def lower(self, value: Any, addr: int) -> None:
        if not isinstance(value, (tuple, list)) or len(value) != len(self.elements):
            raise self.mismatch(value)
        _lower_sequence(capi.valtuple_new_uninit, capi.TUPLE, self.elements, value, addr)


class RecordConverter(Converter):
    """WIT `record` <-> dict keyed by field name."""

    def __init__(self, fields: list[tuple[str, Converter]]) -> None:
        self.fields = fields
        self.encoded_names = [name.encode() for name, _ in fields]
        self.wit = "record {" + ", ".join(f"{name}: {conv.wit}" for name, conv in fields) + "}"

    def lift(self, addr: int) -> dict[str, Any]:
        data = read_word(addr + VAL_PAYLOAD + 8)
        return {
            name: conv.lift(data + i * ENTRY_SIZE + ENTRY_VAL) for i, (name, conv) in enumerate(self.fields)
        }

    def lower(self, value: Any, addr: int) -> None:
        if not isinstance(value, dict):
            raise self.mismatch(value)
        missing = [name for name, _ in self.fields if name not in value]
        if missing:
            raise ConversionError(f"{self.wit}: missing field(s) {', '.join(missing)}")
        clear_val(addr)
        count = len(self.fields)
        capi.valrecord_new_uninit(addr + VAL_PAYLOAD, count)
        data = read_word(addr + VAL_PAYLOAD + 8)
        for i, encoded in enumerate(self.encoded_names):
            entry = data + i * ENTRY_SIZE
            write_name(entry, encoded)
            clear_val(entry + ENTRY_VAL)
        _put(addr, bytes((capi.RECORD,)))
        try:
            for i, (name, conv) in enumerate(self.fields):
                conv.lower(value[name], data + i * ENTRY_SIZE + ENTRY_VAL)
        except Exception:
            capi.val_delete(addr)
            clear_val(addr)
            raise


class VariantConverter(Converter):
    """WIT `variant` <-> (case, payload or None)."""

    def __init__(self, cases: list[tuple[str, Converter | None]]) -> None:
        self.cases = dict(cases)
        self.wit = "variant {" + ", ".join(name if c is None else f"{name}({c.wit})" for name, c in cases) + "}"

    def lift(self, addr: int) -> tuple[str, Any]:
        case = read_name(addr + VAL_PAYLOAD)
        conv = self.cases[case]
        payload = read_word(addr + VAL_PAYLOAD + NAME_SIZE)
        return (case, conv.lift(payload) if conv is not None and payload else None)

    def lower(self, value: Any, addr: int) -> None:
        if not isinstance(value, tuple) or len(value) != 2 or value[0] not in self.cases:
            raise self.mismatch(value)
        case, payload = value
        conv = self.cases[case]
        if conv is None and payload is not None:
            raise ConversionError(f"{self.wit}: case {case} carries no payload, got {payload!r:.80}")
        boxed = conv.lower_boxed(payload) if conv is not None else 0
        clear_val(addr)
        write_name(addr + VAL_PAYLOAD, case.encode())
        _put(addr + VAL_PAYLOAD + NAME_SIZE, _U64.pack(boxed))
        _put(addr, bytes((capi.VARIANT,)))


class EnumConverter(Converter):
    """WIT `enum` <-> case name."""

    def __init__(self, names: list[str]) -> None:
        self.names = frozenset(names)
        self.wit = "enum {" + ", ".join(names) + "}"

    def lift(self, addr: int) -> str:
        return read_name(addr + VAL_PAYLOAD)

    def lower(self, value: Any, addr: int) -> None:
        if value not in self.names:
            raise self.mismatch(value)
        clear_val(addr)
        write_name(addr + VAL_PAYLOAD, value.encode())
        _put(addr, bytes((capi.ENUM,)))


class OptionConverter(Converter):
    """WIT `option<T>` <-> value or None."""

    def __init__(self, payload: Converter) -> None:
        self.payload = payload
        self.wit = f"option<{payload.wit}>"

    def lift(self, addr: int) -> Any:
        inner = read_word(addr + VAL_PAYLOAD)
        return self.payload.lift(inner) if inner else None

    def lower(self, value: Any, addr: int) -> None:
        boxed = self.payload.lower_boxed(value) if value is not None else 0
        _put(addr, _KIND_WORD.pack(capi.OPTION, boxed))


class ResultConverter(Converter):
    """WIT `result<T, E>` <-> Ok(value) / Err(value); every case can be lowered, including err of
    result<option<T>, E> that wasmtime-py's stock converter rejects."""

    def __init__(self, ok: Converter | None, err: Converter | None) -> None:
        self.ok = ok
        self.err = err
        self.ok_is_optional_bytes = isinstance(ok, OptionConverter) and isinstance(ok.payload, BytesConverter)
        self.wit = f"result<{ok.wit if ok else '_'}, {err.wit if err else '_'}>"

    def lift(self, addr: int) -> Ok[Any] | Err[Any]:
        is_ok, value = self.lift_parts(addr)
        return Ok(value) if is_ok else Err(value)

    def lift_parts(self, addr: int) -> tuple[bool, Any]:
        """(is_ok, payload) without building an Ok/Err object, for hot paths."""
        is_ok, inner = _RESULT_HEAD.unpack_from(_MEMORY, addr + VAL_PAYLOAD)
        if is_ok and self.ok_is_optional_bytes:
            # handle-message's result<option<list<u8>>, _>: fused to skip two converter hops
            some = read_word(inner + VAL_PAYLOAD) if inner else 0
            if not some:
                return True, None
            size, data = _TWO_U64.unpack_from(_MEMORY, some + VAL_PAYLOAD)
            return True, strided_bytes(data, size)
        if is_ok:
            return True, (self.ok.lift(inner) if self.ok is not None and inner else None)
        return False, (self.err.lift(inner) if self.err is not None and inner else None)

    def lower(self, value: Any, addr: int) -> None:
        if isinstance(value, Ok):
            is_ok, conv = 1, self.ok
        elif isinstance(value, Err):
            is_ok, conv = 0, self.err
        else:
            raise self.mismatch(value)
        if conv is None and value.value is not None:
            raise ConversionError(f"{self.wit}: this case carries no payload, got {value.value!r:.80}")
        if is_ok and self.ok_is_optional_bytes:
            boxed = _box_optional_bytes(value.value)  # storage.get's result: fused, no converter hops
        else:
            boxed = conv.lower_boxed(value.value) if conv is not None else 0
        _RESULT_VAL.pack_into(_MEMORY, addr, capi.RESULT, is_ok, boxed)  # see _put


_LIST_KIND = bytes((capi.LIST,))


def _scratch() -> int:
    """The address of this thread's scratch room for one value (for lowering that does not nest)."""
    address: int | None = getattr(_staging, "scratch", None)
    if address is None:
        room = (ctypes.c_uint8 * VAL_SIZE)()
        _staging.scratch_room = room  # kept alive with the thread
        address = _staging.scratch = ctypes.addressof(room)
    return address


def _box_optional_bytes(payload: Any) -> int:
    """A fresh heap `option<list<u8>>` value holding `payload` (bytes or None), owned by wasmtime:
    what OptionConverter(BytesConverter).lower_boxed makes, without two temporary buffers and
    four converter calls (the hot path of storage.get)."""
    scratch = _scratch()
    inner = 0
    if payload is not None:
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise ConversionError(f"expected list<u8>, got {type(payload).__name__} {payload!r:.80}")
        clear_val(scratch)
        capi.vallist_new_uninit(scratch + VAL_PAYLOAD, len(payload))
        _put(scratch, _LIST_KIND)
        fill_u8_vals(read_word(scratch + VAL_PAYLOAD + 8), payload)
        inner = int(capi.val_new(scratch))  # moves the list out of the scratch room
    _put(scratch, _KIND_WORD.pack(capi.OPTION, inner))
    return int(capi.val_new(scratch))


class FlagsConverter(Converter):
    """WIT `flags` <-> frozenset of set flag names."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.wit = "flags {" + ", ".join(names) + "}"

    def lift(self, addr: int) -> frozenset[str]:
        size, data = _TWO_U64.unpack_from(_MEMORY, addr + VAL_PAYLOAD)
        return frozenset(read_name(data + i * NAME_SIZE) for i in range(size))

    def lower(self, value: Any, addr: int) -> None:
        if not isinstance(value, (set, frozenset)) or not value <= set(self.names):
            raise self.mismatch(value)
        chosen = [name for name in self.names if name in value]
        clear_val(addr)
        capi.valflags_new_uninit(addr + VAL_PAYLOAD, len(chosen))
        data = read_word(addr + VAL_PAYLOAD + 8)
        for i, name in enumerate(chosen):
            write_name(data + i * NAME_SIZE, name.encode())
        _put(addr, bytes((capi.FLAGS,)))


class UnhostedConverter(Converter):
    """A type wasmhost cannot move (resources, streams, futures, error contexts): it only describes
    itself, so that the loader can show a signature using it next to the contract's and refuse the
    component; moving a value of it raises ConversionError."""

    def __init__(self, wit: str) -> None:
        self.wit = wit

    def lift(self, addr: int) -> Any:
        raise ConversionError(f"{self.wit} values are not hosted (resources, streams and futures)")

    def lower(self, value: Any, addr: int) -> None:
        raise ConversionError(f"{self.wit} values are not hosted (resources, streams and futures)")


def _unhosted(ty: wc.ValType) -> UnhostedConverter | None:
    """The converter of a type wasmhost does not host, or None for a hosted one."""
    if isinstance(ty, wc.OwnType):
        return UnhostedConverter("own<resource>")
    if isinstance(ty, wc.BorrowType):
        return UnhostedConverter("borrow<resource>")
    if isinstance(ty, (wc.StreamType, wc.FutureType)):
        kind = "stream" if isinstance(ty, wc.StreamType) else "future"
        payload = ty.payload
        return UnhostedConverter(f"{kind}<{converter_for(payload).wit}>" if payload is not None else kind)
    if isinstance(ty, wc.ErrorContext):
        return UnhostedConverter("error-context")
    return None


_INTS: dict[type, tuple[str, int, str, int, int]] = {
    wc.U8: ("u8", capi.U8, "B", 0, 2**8 - 1),
    wc.U16: ("u16", capi.U16, "H", 0, 2**16 - 1),
    wc.U32: ("u32", capi.U32, "I", 0, 2**32 - 1),
    wc.U64: ("u64", capi.U64, "Q", 0, 2**64 - 1),
    wc.S8: ("s8", capi.S8, "b", -(2**7), 2**7 - 1),
    wc.S16: ("s16", capi.S16, "h", -(2**15), 2**15 - 1),
    wc.S32: ("s32", capi.S32, "i", -(2**31), 2**31 - 1),
    wc.S64: ("s64", capi.S64, "q", -(2**63), 2**63 - 1),
}


def converter_for(ty: wc.ValType) -> Converter:
    """Build the converter for a wasmtime-py type; reads the type through the FFI once. A type wasmhost
    does not host gets an UnhostedConverter, which describes it but moves no value."""
    if type(ty) in _INTS:
        return IntConverter(*_INTS[type(ty)])
    if isinstance(ty, wc.Bool):
        return BoolConverter()
    if isinstance(ty, wc.F32):
        return FloatConverter("f32", capi.F32, "f")
    if isinstance(ty, wc.F64):
        return FloatConverter("f64", capi.F64, "d")
    if isinstance(ty, wc.Char):
        return CharConverter()
    if isinstance(ty, wc.String):
        return StringConverter()
    if isinstance(ty, wc.ListType):
        element = ty.element
        if isinstance(element, wc.U8):
            return BytesConverter()
        return ListConverter(converter_for(element))
    if isinstance(ty, wc.RecordType):
        return RecordConverter([(name, converter_for(field)) for name, field in ty.fields])
    if isinstance(ty, wc.TupleType):
        return TupleConverter([converter_for(e) for e in ty.elements])
    if isinstance(ty, wc.VariantType):
        return VariantConverter([(name, converter_for(c) if c is not None else None) for name, c in ty.cases])
    if isinstance(ty, wc.EnumType):
        return EnumConverter(ty.names)
    if isinstance(ty, wc.OptionType):
        return OptionConverter(converter_for(ty.payload))
    if isinstance(ty, wc.ResultType):
        ok, err = ty.ok, ty.err
        return ResultConverter(converter_for(ok) if ok else None, converter_for(err) if err else None)
    if isinstance(ty, wc.FlagsType):
        return FlagsConverter(ty.names)
    unhosted = _unhosted(ty)
    if unhosted is not None:  # a guest may put any type in a signature: it is refused by what it reads
        return unhosted
    raise ConversionError(f"unsupported WIT type {type(ty).__name__} (resources, streams and futures are not hosted)")
