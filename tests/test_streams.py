"""The stream vocabulary: names, ids and resume positions, from examples and from Hypothesis."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.codec.streams import (
    KINDS,
    UNKNOWN_ID,
    StreamNameError,
    id_value,
    is_decimal,
    is_event_id,
    parse_stream_name,
    resource_key,
    resume_id,
)


class TestExamples:
    def test_resource_keys(self) -> None:
        assert resource_key("evaluations", "e-1") == "evaluations/e-1"
        assert parse_stream_name("optimizations/job:42") == "optimizations/job:42"
        with pytest.raises(StreamNameError) as info:
            resource_key("jobs", "x")
        assert info.value.unknown_kind
        for bad in ("", "../x", "a/b", "a..b", "-x", "x" * 129, "a b", "é"):
            with pytest.raises(StreamNameError) as info:
                resource_key("evaluations", bad)
            assert not info.value.unknown_kind

    def test_decimal_means_ascii_digits(self) -> None:
        assert is_decimal("0") and is_decimal("123") and is_decimal("9" * 18)
        for value in ("", "\u00b2", "1\u0663", "\uff11", "-1", "1.5", "9" * 19):
            assert not is_decimal(value)

    def test_resume_ids(self) -> None:
        assert resume_id(None) is None and resume_id("") is None
        assert resume_id("42") == "42" and resume_id("opaque_id:7") == "opaque_id:7"
        for bad in ("\u00b2", "a b", "x" * 129, "é", "a\nb", "\x00"):
            assert resume_id(bad) == UNKNOWN_ID
        assert not is_event_id(UNKNOWN_ID)

    def test_id_values(self) -> None:
        assert id_value("7") == 7 and id_value("0") == 0
        assert id_value("07") == "07" and id_value("x") == "x" and id_value(None) is None


@given(st.text(max_size=300))
def test_resume_id_never_raises_and_is_none_an_id_or_unknown(raw: str) -> None:
    result = resume_id(raw)
    assert result is None or result == UNKNOWN_ID or (result == raw and is_event_id(raw))
    if result is not None and result != UNKNOWN_ID:
        assert result.isascii() and result.isprintable() and " " not in result


@given(st.text(max_size=40))
def test_decimal_ids_always_convert(raw: str) -> None:
    if is_decimal(raw):
        assert 0 <= int(raw) < 10**18
        assert isinstance(id_value(raw), int | str)


@given(st.one_of(st.text(max_size=200), st.integers(), st.none(), st.lists(st.text(max_size=5))))
def test_stream_names_are_validated_or_refused(name: object) -> None:
    try:
        key = parse_stream_name(name)
    except StreamNameError as exc:
        assert exc.message
        return
    kind, _, resource = key.partition("/")
    assert kind in KINDS and key == name
    assert "/" not in resource and ".." not in resource and resource.isascii() and len(resource) <= 128


@given(st.sampled_from(KINDS), st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,20}", fullmatch=True))
def test_well_formed_names_round_trip(kind: str, resource: str) -> None:
    if ".." in resource:
        return
    assert parse_stream_name(f"{kind}/{resource}") == f"{kind}/{resource}"
