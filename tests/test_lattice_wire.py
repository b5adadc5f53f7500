"""The lattice subject scheme: component ids and host ids survive the trip through subject tokens."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wasmhost.core.ids import ComponentId, InvalidComponentId
from wasmhost.lattice.wire import Subjects, decode_token, encode_token

PART = st.text(min_size=1, max_size=12).filter(lambda p: "/" not in p and "\x00" not in p and ".." not in p
                                                and p not in (".", ".."))


def test_a_plain_component_id_is_three_readable_tokens() -> None:
    subjects = Subjects("default")
    assert subjects.message(ComponentId("demo", "echo", "0")) == "wasmhost.default.msg.demo.echo.0"


def test_hosts_and_plain_clients_send_on_subjects_of_their_own() -> None:
    subjects = Subjects("default")
    echo = ComponentId("demo", "echo", "0")
    assert subjects.ingress(echo) == "wasmhost.default.in.demo.echo.0"
    assert subjects.from_client(subjects.ingress(echo)) and not subjects.from_client(subjects.message(echo))
    assert subjects.component(subjects.ingress(echo)) == subjects.component(subjects.message(echo)) == echo
    with pytest.raises(InvalidComponentId):
        subjects.component("wasmhost.default.hb.demo.echo.0")


def test_dots_wildcards_spaces_and_percent_are_encoded() -> None:
    subjects = Subjects("default")
    subject = subjects.message(ComponentId("a.b", "x*y", "1.0 >%"))
    assert subject == "wasmhost.default.msg.a%2Eb.x%2Ay.1%2E0%20%3E%25"
    assert subjects.component(subject) == ComponentId("a.b", "x*y", "1.0 >%")


@given(PART, PART, PART)
def test_every_component_id_round_trips(ns: str, name: str, inst: str) -> None:
    subjects = Subjects("lat.tice")
    cid = ComponentId(ns, name, inst)
    for subject in (subjects.message(cid), subjects.ingress(cid)):
        tokens = subject.split(".")
        assert len(tokens) == 6 and all(t and not any(c in t for c in "*> \t\n") for t in tokens)
        assert subjects.component(subject) == cid


@given(st.text(max_size=20))
def test_tokens_round_trip(text: str) -> None:
    assert decode_token(encode_token(text)) == text
