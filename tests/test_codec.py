"""The typed codec: values survive a trip through wasmtime's C representation, bad values are
refused with a clear error, and the private layout it relies on is what it expects."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from importlib.metadata import version
from typing import Any

import pytest

from wasmhost.runtime import capi, contract, message_arg
from wasmhost.runtime.codec import (
    BoolConverter,
    BytesConverter,
    CharConverter,
    ConversionError,
    Converter,
    EnumConverter,
    Err,
    FlagsConverter,
    FloatConverter,
    IntConverter,
    ListConverter,
    Ok,
    OptionConverter,
    RecordConverter,
    ResultConverter,
    StringConverter,
    TupleConverter,
    VariantConverter,
)

U8 = IntConverter("u8", capi.U8, "B", 0, 255)
S64 = IntConverter("s64", capi.S64, "q", -(2**63), 2**63 - 1)
U64 = IntConverter("u64", capi.U64, "Q", 0, 2**64 - 1)
STRING = StringConverter()
COMPONENT_ID = RecordConverter([("namespace", STRING), ("name", STRING), ("instance", STRING)])
STORAGE_ERROR = VariantConverter(
    [("not-found", STRING), ("already-exists", STRING), ("quota-exceeded", None), ("invalid-key", STRING),
     ("io-error", STRING)]
)


@pytest.fixture
def slot() -> Iterator[int]:
    """A value slot in Python memory; whatever is lowered into it is freed afterwards."""
    buffer = (ctypes.c_uint8 * capi.VAL_SIZE)()
    address = ctypes.addressof(buffer)
    yield address
    capi.val_delete(address)


def round_trip(conv: Converter, value: Any, slot: int) -> Any:
    conv.lower(value, slot)
    return conv.lift(slot)


@pytest.mark.parametrize(
    ("conv", "value"),
    [
        (BoolConverter(), True),
        (BoolConverter(), False),
        (U8, 255),
        (S64, -(2**63)),
        (U64, 2**64 - 1),
        (FloatConverter("f64", capi.F64, "d"), 3.25),
        (CharConverter(), "λ"),
        (STRING, "héllo wörld"),
        (STRING, ""),
        (BytesConverter(), b""),
        (BytesConverter(), bytes(range(256)) * 300),
        (ListConverter(STRING), ["a", "", "ccc"]),
        (TupleConverter([STRING, U8]), ("k", 7)),
        (COMPONENT_ID, {"namespace": "n", "name": "m", "instance": "i"}),
        (EnumConverter(["trace", "info"]), "info"),
        (OptionConverter(BytesConverter()), None),
        (OptionConverter(BytesConverter()), b"\x00\x01"),
        (FlagsConverter(["read", "write", "exec"]), frozenset({"read", "exec"})),
        (VariantConverter([("timeout", None), ("runtime-error", STRING)]), ("timeout", None)),
        (VariantConverter([("timeout", None), ("target", COMPONENT_ID)]),
         ("target", {"namespace": "n", "name": "m", "instance": "i"})),
    ],
)
def test_values_survive_the_c_representation(conv: Converter, value: Any, slot: int) -> None:
    assert round_trip(conv, value, slot) == value


def test_every_result_case_lowers_including_err_of_result_option_bytes(slot: int) -> None:
    # wasmtime-py's stock converter cannot return this err case from a host function.
    conv = ResultConverter(OptionConverter(BytesConverter()), STORAGE_ERROR)
    for value in (Ok(None), Ok(b"v"), Ok(b""), Err(("io-error", "disk gone")), Err(("quota-exceeded", None))):
        capi.val_delete(slot)
        ctypes.memset(slot, 0, capi.VAL_SIZE)
        assert round_trip(conv, value, slot) == value
    unit = ResultConverter(None, STORAGE_ERROR)
    capi.val_delete(slot)
    ctypes.memset(slot, 0, capi.VAL_SIZE)
    assert round_trip(unit, Ok(None), slot) == Ok(None)


def test_large_byte_lists_are_byte_exact(slot: int) -> None:
    payload = os.urandom(3 * 32768 + 17)  # spans several bulk-copy chunks
    assert round_trip(BytesConverter(), payload, slot) == payload


@pytest.mark.parametrize(
    ("conv", "value", "message"),
    [
        (U8, 256, "out of range for u8"),
        (U8, -1, "out of range for u8"),
        (U64, 2**64, "out of range for u64"),
        (S64, 2**63, "out of range for s64"),
        (U8, True, "expected u8"),
        (STRING, b"bytes", "expected string"),
        (STRING, "\ud800", "not valid Unicode"),
        (CharConverter(), "ab", "expected char"),
        (BytesConverter(), "text", "expected list<u8>"),
        (COMPONENT_ID, {"namespace": "n"}, r"missing field\(s\) name, instance"),
        (EnumConverter(["a"]), "b", "expected enum"),
        (STORAGE_ERROR, ("no-such-case", None), "expected variant"),
        (STORAGE_ERROR, ("quota-exceeded", "x"), "carries no payload"),
        (ResultConverter(None, STORAGE_ERROR), Ok(b"x"), "carries no payload"),
        (ResultConverter(None, None), "plain", "expected result"),
    ],
)
def test_values_that_do_not_fit_are_refused(conv: Converter, value: Any, message: str, slot: int) -> None:
    with pytest.raises(ConversionError, match=message):
        conv.lower(value, slot)


def test_a_failed_nested_lowering_leaves_nothing_allocated(slot: int) -> None:
    conv = ListConverter(COMPONENT_ID)
    good = {"namespace": "n", "name": "m", "instance": "i"}
    with pytest.raises(ConversionError):
        conv.lower([good, good, {"namespace": 1, "name": "m", "instance": "i"}], slot)
    assert ctypes.string_at(slot, 1) == bytes((capi.BOOL,))


def test_private_value_layout_is_the_one_the_codec_writes() -> None:
    # Fails loudly when a wasmtime-py upgrade changes the structures we write by offset.
    capi.check_layout()
    assert version("wasmtime") == capi.WASMTIME_VERSION, (
        f"wasmtime {version('wasmtime')} installed; the codec was checked against {capi.WASMTIME_VERSION}: "
        "re-run the layout and codec tests, then update capi.WASMTIME_VERSION"
    )


def test_contract_notation_matches_the_codec_description() -> None:
    assert COMPONENT_ID.wit == contract.COMPONENT_ID
    assert STORAGE_ERROR.wit == contract.STORAGE_ERROR


def test_bytes_data_addresses_are_where_ctypes_finds_them() -> None:
    # The message argument points wasmtime at the characters of encoded strings (correlation ids) by
    # id() plus an offset measured at import: it must be the address ctypes gives, for any bytes.
    for data in (b"", b"x", b"19581e10-73875", "\u00e9t\u00e9".encode(), bytes(range(256)) * 64):
        address = message_arg._address(data)
        assert address == message_arg._data_address(data)
        assert ctypes.string_at(address, len(data)) == data
