"""wasmtime C API entry points with address-based signatures, and the value layout they rely on.

wasmtime-py's own prototypes take ctypes pointer objects; building those costs more than the call
on the hot path, so these prototypes take plain integer addresses (our own: no public API offers it).
"""

from __future__ import annotations

import ctypes
import sys
from ctypes import c_size_t, c_void_p
from typing import Any

from wasmtime import _bindings, _ffi

WASMTIME_VERSION = "50.0.1"
"""The wasmtime-py release whose private value layout this module was written against."""

VAL_SIZE = 32  # sizeof(wasmtime_component_val_t)
VAL_PAYLOAD = 8  # offset of the union inside wasmtime_component_val_t
ENTRY_SIZE = 48  # sizeof(wasmtime_component_valrecord_entry_t): name (16) + val (32)
ENTRY_VAL = 16  # offset of the val inside a record entry
NAME_SIZE = 16  # sizeof(wasm_name_t): size_t size, char *data

# Value kinds (wasmtime_component_valkind_t).
BOOL, S8, U8, S16, U16, S32, U32, S64, U64, F32, F64, CHAR = range(12)
STRING, LIST, RECORD, TUPLE, VARIANT, ENUM, OPTION, RESULT, FLAGS = range(12, 21)

_dll = _bindings.dll


def _proto(name: str, restype: Any, *argtypes: Any) -> Any:
    """A fresh prototype for `name` in the wasmtime library (does not touch wasmtime-py's)."""
    return ctypes.CFUNCTYPE(restype, *argtypes)((name, _dll))


val_delete = _proto("wasmtime_component_val_delete", None, c_void_p)
val_new = _proto("wasmtime_component_val_new", c_void_p, c_void_p)
val_clone = _proto("wasmtime_component_val_clone", None, c_void_p, c_void_p)
"""(src, dst): a deep copy of the value at src written to dst, overwriting what dst held without freeing it.
Runs without the GIL, like every call through these prototypes."""
byte_vec_new = _proto("wasm_byte_vec_new", None, c_void_p, c_size_t, c_void_p)
byte_vec_new_uninit = _proto("wasm_byte_vec_new_uninitialized", None, c_void_p, c_size_t)
vallist_new_uninit = _proto("wasmtime_component_vallist_new_uninit", None, c_void_p, c_size_t)
valrecord_new_uninit = _proto("wasmtime_component_valrecord_new_uninit", None, c_void_p, c_size_t)
valtuple_new_uninit = _proto("wasmtime_component_valtuple_new_uninit", None, c_void_p, c_size_t)
valflags_new_uninit = _proto("wasmtime_component_valflags_new_uninit", None, c_void_p, c_size_t)
func_call = _proto(
    "wasmtime_component_func_call", c_void_p, c_void_p, c_void_p, c_void_p, c_size_t, c_void_p, c_size_t
)
error_new = _proto("wasmtime_error_new", c_void_p, ctypes.c_char_p)
error_exit_status = _proto("wasmtime_error_exit_status", ctypes.c_bool, c_void_p, c_void_p)
"""(error, int *status) -> whether the error is a WASI exit, whose status it then writes."""

FUNC_CALLBACK = ctypes.CFUNCTYPE(c_void_p, c_void_p, c_void_p, c_void_p, c_void_p, c_size_t, c_void_p, c_size_t)
"""Host function trampoline: (env, context, type, args, nargs, results, nresults) -> error or NULL."""
FINALIZER = ctypes.CFUNCTYPE(None, c_void_p)
linker_instance_add_func = _proto(
    "wasmtime_component_linker_instance_add_func",
    c_void_p,
    c_void_p,
    ctypes.c_char_p,
    c_size_t,
    FUNC_CALLBACK,
    c_void_p,
    FINALIZER,
)

ASYNC_FUNC_CALLBACK = ctypes.CFUNCTYPE(
    None, c_void_p, c_void_p, c_void_p, c_void_p, c_size_t, c_void_p, c_size_t, c_void_p, c_void_p
)
"""Async host function trampoline: (env, context, type, args, nargs, results, nresults, error_ret,
continuation) -> nothing. It runs when the guest makes the call and must always fill the
wasmtime_async_continuation_t at `continuation` (wasmtime panics, aborting the process, if it is left
unset); `args` are only valid during it. wasmtime then polls the continuation, whenever the call future
is polled, until it returns true (the call future's poll returns false meanwhile: the guest is suspended
and no thread waits), reads `results` and resumes the guest; the continuation's finalizer runs once it is
dropped, also when the call future is deleted mid-suspension (the call abandoned)."""
CONTINUATION_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_bool, c_void_p)
"""A continuation's poll: (env) -> whether the host function has finished."""
CONTINUATION_FIELDS = 3
"""wasmtime_async_continuation_t: callback, env, finalizer (three pointers)."""
linker_instance_add_func_async = _proto(
    "wasmtime_component_linker_instance_add_func_async",
    c_void_p,
    c_void_p,
    ctypes.c_char_p,
    c_size_t,
    ASYNC_FUNC_CALLBACK,
    c_void_p,
    FINALIZER,
)
# (linker, context, component, instance_out, error_ret) -> wasmtime_call_future_t*: instantiation as a call
# future, which a Store whose component imports an async host function requires (the synchronous
# instantiate fails with "store configuration requires that `*_async` functions are used instead").
linker_instantiate_async = _proto(
    "wasmtime_component_linker_instantiate_async", c_void_p, c_void_p, c_void_p, c_void_p, c_void_p, c_void_p
)
INSTANCE = _ffi.wasmtime_component_instance_t
"""wasmtime_component_instance_t: a Store's handle to a component instance."""


class LayoutMismatch(RuntimeError):
    """wasmtime-py's value structures no longer match what the fast codec writes."""


def check_layout() -> None:
    """Fail loudly if the private structures the codec writes by offset have changed."""
    val = _ffi.wasmtime_component_val_t
    entry = _ffi.wasmtime_component_valrecord_entry_t
    union = _ffi.wasmtime_component_valunion_t
    expected: list[tuple[str, int, int]] = [
        ("sizeof(wasmtime_component_val_t)", ctypes.sizeof(val), VAL_SIZE),
        ("offsetof(val, of)", val.of.offset, VAL_PAYLOAD),
        ("sizeof(valrecord_entry)", ctypes.sizeof(entry), ENTRY_SIZE),
        ("offsetof(entry, val)", entry.val.offset, ENTRY_VAL),
        ("sizeof(wasm_name_t)", ctypes.sizeof(_ffi.wasm_name_t), NAME_SIZE),
        ("offsetof(union, list)", union.list.offset, 0),
        ("offsetof(valvariant, val)", _ffi.wasmtime_component_valvariant_t.val.offset, 16),
        ("offsetof(valresult, val)", _ffi.wasmtime_component_valresult_t.val.offset, 8),
        ("sizeof(wasmtime_async_continuation_t)", ctypes.sizeof(_ffi.wasmtime_async_continuation_t),
         CONTINUATION_FIELDS * ctypes.sizeof(c_void_p)),
    ]
    kinds = {
        "U8": (_ffi.WASMTIME_COMPONENT_U8.value, U8),
        "STRING": (_ffi.WASMTIME_COMPONENT_STRING.value, STRING),
        "LIST": (_ffi.WASMTIME_COMPONENT_LIST.value, LIST),
        "RECORD": (_ffi.WASMTIME_COMPONENT_RECORD.value, RECORD),
        "VARIANT": (_ffi.WASMTIME_COMPONENT_VARIANT.value, VARIANT),
        "FLAGS": (_ffi.WASMTIME_COMPONENT_FLAGS.value, FLAGS),
        "RESULT": (_ffi.WASMTIME_COMPONENT_RESULT.value, RESULT),
    }
    problems = [f"{what} is {got}, expected {want}" for what, got, want in expected if got != want]
    problems += [f"kind {name} is {got}, expected {want}" for name, (got, want) in kinds.items() if got != want]
    if problems:
        raise LayoutMismatch(
            f"wasmtime-py's component value layout changed (written for {WASMTIME_VERSION}): " + "; ".join(problems)
        )


HOST_MEMORY = memoryview((ctypes.c_char * sys.maxsize).from_address(0)).cast("B")
"""This process's address space as one buffer (nothing is mapped or copied to make it), so that the
C values wasmtime hands us are read in place: `struct.unpack_from(HOST_MEMORY, address)` takes 0.15
us where `ctypes.string_at` + `unpack` takes 0.9 us (measured), and a message's hop reads about nine.
An address that is not mapped faults exactly as `string_at` would."""


def addr_of(ptr: Any) -> int:
    """The integer address of a ctypes pointer (0 for NULL), read in place: `ctypes.cast` would tie
    the pointer into a reference cycle (a Store's context pointer, left for the collector)."""
    return c_void_p.from_buffer(ptr).value or 0


# (instance*, context*, export_index*, func_out*) -> found: fills a wasmtime_component_func_t we own, without
# the Python Func object wasmtime-py's get_func builds around it (six of them per boot, 12 us each).
instance_get_func = _proto(
    "wasmtime_component_instance_get_func", ctypes.c_bool, c_void_p, c_void_p, c_void_p, c_void_p
)
# (component*, instance export_index* or NULL, name, name_len) -> a new export index we own, or NULL when
# there is no such export; wasmtime-py's get_export_index spends 8 us per name around the same call.
component_get_export_index = _proto(
    "wasmtime_component_get_export_index", c_void_p, c_void_p, c_void_p, ctypes.c_char_p, c_size_t
)
component_export_index_delete = _proto("wasmtime_component_export_index_delete", None, c_void_p)
FUNC = _ffi.wasmtime_component_func_t
"""wasmtime_component_func_t: a Store's handle to one exported function."""
context_set_fuel = _proto("wasmtime_context_set_fuel", c_void_p, c_void_p, ctypes.c_uint64)
context_get_fuel = _proto("wasmtime_context_get_fuel", c_void_p, c_void_p, c_void_p)
context_set_epoch_deadline = _proto("wasmtime_context_set_epoch_deadline", None, c_void_p, ctypes.c_uint64)
context_fuel_async_yield_interval = _proto(
    "wasmtime_context_fuel_async_yield_interval", c_void_p, c_void_p, ctypes.c_uint64
)
# Our own prototype: wasmtime-py declares a pointer result for this void function.
context_epoch_deadline_async_yield_and_update = _proto(
    "wasmtime_context_epoch_deadline_async_yield_and_update", None, c_void_p, ctypes.c_uint64
)

# Async calls: (func, context, args, nargs, results, nresults, error_ret) -> wasmtime_call_future_t*.
# The future reads `args` on its first poll (not when created) and writes `results` and *error_ret
# (a wasmtime_error_t*, NULL on success) once a poll returns true; delete it after that, or to abandon
# the call (which leaves the instance unusable).
func_call_async = _proto(
    "wasmtime_component_func_call_async",
    c_void_p, c_void_p, c_void_p, c_void_p, c_size_t, c_void_p, c_size_t, c_void_p,
)
call_future_poll = _proto("wasmtime_call_future_poll", ctypes.c_bool, c_void_p)
call_future_delete = _proto("wasmtime_call_future_delete", None, c_void_p)
# The same, keeping the GIL: freeing a suspended call takes about 10 us, but letting go of the GIL
# for it meant waiting to get it back behind busy threads, 0.6 - 1.2 ms per call the deadline thread
# ended while 1,024 spinners timed out (measured), so the calls queued after it were ended late.
call_future_abandon = ctypes.PYFUNCTYPE(None, c_void_p)(("wasmtime_call_future_delete", _dll))


def take_error(error: int) -> str:
    """The message of a wasmtime_error_t* returned by the C API; frees the error."""
    from wasmtime import WasmtimeError

    return str(WasmtimeError._from_ptr(ctypes.cast(error, ctypes.POINTER(_ffi.wasmtime_error_t))))
