"""The SSE codec, straight from WHATWG HTML "Server-sent events" (event stream interpretation)."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.codec.sse import SSEDecoder, SSEEvent, encode_comment, encode_event, encode_retry, sanitize_field

BOM = b"\xef\xbb\xbf"


def decode(*chunks: bytes) -> list[SSEEvent]:
    decoder = SSEDecoder()
    return [event for chunk in chunks for event in decoder.feed(chunk)]


def decode_bytewise(stream: bytes) -> list[SSEEvent]:
    return decode(*(stream[i : i + 1] for i in range(len(stream))))


# Streams from the spec's examples (plus the codec's edge cases); chunking must never change their result.
SPEC_STREAMS = {
    "stock quote": b"data: YHOO\ndata: +2\ndata: 10\n\n",
    "test stream": (
        b": test stream\n\ndata: first event\nid: 1\n\ndata:second event\nid\n\ndata:  third event\n\n"
    ),
    "empty data fields": b"data\n\ndata\ndata\n\ndata:",
    "space after colon": b"data:test\n\ndata: test\n\n",
    "event types": b"event: add\ndata: 73857293\n\nevent: remove\ndata: 2153\n\nevent: add\ndata: 113411\n\n",
    "crlf": b"id: 7\r\nevent: update\r\ndata: a\r\ndata: b\r\n\r\n",
    "cr": b"id: 7\revent: update\rdata: a\rdata: b\r\r",
    "mixed endings": b"data: a\r\ndata: b\rdata: c\n\r\ndata: d\r\r\n",
    "bom": BOM + b"data: x\n\n",
    "utf-8": "data: héllo → 世界\n\n".encode(),
    "retry and comments": b"retry: 2500\n: keep-alive\ndata: x\n\n",
}


class TestSpecExamples:
    def test_stock_quote_lines_are_joined_with_lf(self) -> None:
        assert decode(SPEC_STREAMS["stock quote"]) == [SSEEvent(data="YHOO\n+2\n10")]

    def test_test_stream(self) -> None:
        decoder = SSEDecoder()
        events = list(decoder.feed(SPEC_STREAMS["test stream"]))
        # The comment-only block fires nothing; `id: 1` applies to the event of its own block;
        # a bare `id` resets the last event ID to ""; only one leading space is removed.
        assert events == [
            SSEEvent(data="first event", id="1"),
            SSEEvent(data="second event", id=""),
            SSEEvent(data=" third event", id=""),
        ]
        assert decoder.last_event_id == ""

    def test_field_without_colon_and_incomplete_final_block(self) -> None:
        decoder = SSEDecoder()
        events = list(decoder.feed(SPEC_STREAMS["empty data fields"]))
        # "data" alone is a data field with an empty value; the last block has no blank line: discarded.
        assert [e.data for e in events] == ["", "\n"]
        assert list(decoder.feed(b"")) == []

    def test_incomplete_final_block_dispatches_once_completed(self) -> None:
        decoder = SSEDecoder()
        list(decoder.feed(SPEC_STREAMS["empty data fields"]))
        assert list(decoder.feed(b"\n")) == []  # ends the "data:" line
        assert list(decoder.feed(b"\n")) == [SSEEvent(data="")]

    def test_space_after_colon_is_optional(self) -> None:
        assert decode(SPEC_STREAMS["space after colon"]) == [SSEEvent(data="test"), SSEEvent(data="test")]

    def test_event_types(self) -> None:
        events = decode(SPEC_STREAMS["event types"])
        assert [(e.event, e.data) for e in events] == [("add", "73857293"), ("remove", "2153"), ("add", "113411")]

    def test_end_of_stream_is_not_a_blank_line(self) -> None:
        assert decode(b"data: This is the first message.\n\ndata: unfinished") == [
            SSEEvent(data="This is the first message.")
        ]


class TestLineEndings:
    @pytest.mark.parametrize("name", ["crlf", "cr"])
    def test_crlf_and_cr(self, name: str) -> None:
        assert decode(SPEC_STREAMS[name]) == [SSEEvent(data="a\nb", event="update", id="7")]

    def test_mixed_endings(self) -> None:
        assert decode(SPEC_STREAMS["mixed endings"]) == [SSEEvent(data="a\nb\nc"), SSEEvent(data="d")]

    def test_crlf_split_across_chunks_is_one_line_ending(self) -> None:
        # Were the LF taken as a second line ending, "a" would dispatch alone before "b".
        assert decode(b"data: a\r", b"\ndata: b\n\n") == [SSEEvent(data="a\nb")]

    def test_cr_at_chunk_end_followed_by_other_byte(self) -> None:
        assert decode(b"data: a\r", b"data: b\r\r") == [SSEEvent(data="a\nb")]

    def test_cr_at_chunk_end_then_cr_is_a_blank_line(self) -> None:
        assert decode(b"data: a\r", b"\r") == [SSEEvent(data="a")]

    def test_lone_cr_line_ends_before_lf(self) -> None:
        # "\r\r\n": CR ends the data line, then CRLF is the blank line.
        assert decode(b"data: a\r\r\n") == [SSEEvent(data="a")]

    def test_empty_chunk_between_cr_and_lf(self) -> None:
        assert decode(b"data: a\r", b"", b"\ndata: b\n\n") == [SSEEvent(data="a\nb")]


class TestBOM:
    def test_leading_bom_is_stripped(self) -> None:
        assert decode(SPEC_STREAMS["bom"]) == [SSEEvent(data="x")]

    @pytest.mark.parametrize("split", [1, 2, 3])
    def test_bom_split_across_chunks(self, split: int) -> None:
        stream = BOM + b"data: x\n\n"
        assert decode(stream[:split], stream[split:]) == [SSEEvent(data="x")]

    def test_bom_byte_by_byte(self) -> None:
        assert decode_bytewise(BOM + b"data: x\n\n") == [SSEEvent(data="x")]

    def test_only_the_first_bom_is_stripped(self) -> None:
        # A second BOM is part of the first field name, so "\ufeffdata" is an unknown field.
        assert decode(BOM + BOM + b"data: x\n\ndata: y\n\n") == [SSEEvent(data="y")]

    def test_bom_later_in_the_stream_is_not_stripped(self) -> None:
        assert decode(b"data: x\n\n" + BOM + b"data: y\n\n") == [SSEEvent(data="x")]

    def test_partial_bom_prefix_that_is_not_a_bom_is_kept(self) -> None:
        assert decode(b"\xef", b"data: x\n\n") == []  # "\xef" makes the field name unknown
        assert decode(b"d", b"ata: x\n\n") == [SSEEvent(data="x")]


class TestFields:
    def test_comments_are_ignored(self) -> None:
        assert decode(b": hello\n:\ndata: x\n: between\n\n") == [SSEEvent(data="x")]

    def test_comment_only_block_dispatches_nothing(self) -> None:
        assert decode(b": just a heartbeat\n\n") == []

    def test_blank_line_without_data_dispatches_nothing_and_resets_event_type(self) -> None:
        assert decode(b"event: add\n\ndata: x\n\n") == [SSEEvent(data="x", event="message")]

    def test_event_type_defaults_to_message(self) -> None:
        assert decode(b"data: x\n\n")[0].event == "message"
        assert decode(b"event\ndata: x\n\n")[0].event == "message"
        assert decode(b"event:\ndata: x\n\n")[0].event == "message"

    def test_event_type_does_not_carry_to_next_event(self) -> None:
        events = decode(b"event: add\ndata: 1\n\ndata: 2\n\n")
        assert [e.event for e in events] == ["add", "message"]

    def test_only_one_space_after_colon_is_removed(self) -> None:
        assert decode(b"data:   x  \n\n") == [SSEEvent(data="  x  ")]
        assert decode(b"data:\tx\n\n") == [SSEEvent(data="\tx")]
        assert decode(b"data: \n\n") == [SSEEvent(data="")]

    def test_value_may_contain_colons(self) -> None:
        assert decode(b"data: a: b:c\n\n") == [SSEEvent(data="a: b:c")]

    def test_unknown_fields_and_wrong_case_are_ignored(self) -> None:
        assert decode(b"foo: bar\nData: no\nDATA: no\ndata: yes\n\n") == [SSEEvent(data="yes")]

    def test_leading_and_trailing_empty_data_lines(self) -> None:
        assert decode(b"data:\ndata: x\ndata:\n\n") == [SSEEvent(data="\nx\n")]

    @pytest.mark.parametrize(("line", "expected"), [
        (b"retry: 2500", 2500), (b"retry:0", 0), (b"retry: 007", 7),
        (b"retry: 1.5", None), (b"retry: -1", None), (b"retry: 10s", None), (b"retry: ", None),
        (b"retry", None), (b"retry:  100", None), ("retry: ٣".encode(), None),
    ])
    def test_retry_accepts_ascii_digits_only(self, line: bytes, expected: int | None) -> None:
        decoder = SSEDecoder()
        assert list(decoder.feed(line + b"\n\n")) == []
        assert decoder.retry == expected

    def test_invalid_retry_keeps_previous_value(self) -> None:
        decoder = SSEDecoder()
        list(decoder.feed(b"retry: 3000\n\nretry: soon\n\n"))
        assert decoder.retry == 3000

    def test_retry_field_does_not_dispatch_but_accompanies_data(self) -> None:
        decoder = SSEDecoder()
        assert list(decoder.feed(SPEC_STREAMS["retry and comments"])) == [SSEEvent(data="x")]
        assert decoder.retry == 2500


class TestLastEventId:
    def test_id_persists_across_events(self) -> None:
        decoder = SSEDecoder()
        events = list(decoder.feed(b"id: 1\ndata: a\n\ndata: b\n\nid: 2\ndata: c\n\n"))
        assert [e.id for e in events] == ["1", "1", "2"]
        assert decoder.last_event_id == "2"

    def test_events_before_any_id_have_none(self) -> None:
        assert decode(b"data: a\n\n") == [SSEEvent(data="a", id=None)]

    def test_id_with_nul_is_ignored(self) -> None:
        decoder = SSEDecoder()
        events = list(decoder.feed(b"id: 1\ndata: a\n\nid: 2\x003\ndata: b\n\n"))
        assert [e.id for e in events] == ["1", "1"]
        assert decoder.last_event_id == "1"

    def test_id_without_data_updates_buffer_but_dispatches_nothing(self) -> None:
        decoder = SSEDecoder()
        assert list(decoder.feed(b"id: 5\n\n")) == []
        assert decoder.last_event_id == "5"
        assert list(decoder.feed(b"data: x\n\n")) == [SSEEvent(data="x", id="5")]

    def test_empty_id_resets(self) -> None:
        decoder = SSEDecoder()
        events = list(decoder.feed(b"id: 9\ndata: a\n\nid:\ndata: b\n\n"))
        assert [e.id for e in events] == ["9", ""]
        assert decoder.last_event_id == ""

    def test_id_applies_to_its_block_even_after_data(self) -> None:
        assert decode(b"data: a\nid: 3\n\n") == [SSEEvent(data="a", id="3")]


def _all_splits(stream: bytes) -> list[tuple[bytes, bytes, bytes]]:
    n = len(stream)
    return [(stream[:i], stream[i:j], stream[j:]) for i in range(n + 1) for j in range(i, n + 1)]


class TestChunking:
    @pytest.mark.parametrize("name", sorted(SPEC_STREAMS))
    def test_byte_by_byte_equals_whole(self, name: str) -> None:
        stream = SPEC_STREAMS[name]
        assert decode_bytewise(stream) == decode(stream)

    @pytest.mark.parametrize("name", ["test stream", "crlf", "cr", "mixed endings", "bom", "utf-8"])
    def test_every_three_way_split_equals_whole(self, name: str) -> None:
        stream = SPEC_STREAMS[name]
        whole = decode(stream)
        assert whole  # the property must be about something
        for chunks in _all_splits(stream):
            if b"" in chunks:
                continue  # empty chunks: see test_empty_chunk_between_cr_and_lf
            assert decode(*chunks) == whole, chunks

    def test_multibyte_character_split_across_chunks(self) -> None:
        stream = "data: 世界\n\n".encode()
        assert decode(stream[:7], stream[7:]) == [SSEEvent(data="世界")]

    def test_last_event_id_and_retry_survive_chunking(self) -> None:
        stream = b"retry: 1234\nid: abc\ndata: x\n\ndata: y\n\n"
        whole, bytewise = SSEDecoder(), SSEDecoder()
        list(whole.feed(stream))
        for i in range(len(stream)):
            list(bytewise.feed(stream[i : i + 1]))
        assert (bytewise.last_event_id, bytewise.retry) == (whole.last_event_id, whole.retry) == ("abc", 1234)


class TestEncoder:
    def test_single_line_frame(self) -> None:
        assert encode_event("hi", event="update", id="42") == b"id: 42\nevent: update\ndata: hi\n\n"

    def test_plain_data_frame(self) -> None:
        assert encode_event("hi") == b"data: hi\n\n"

    def test_multi_line_data_becomes_several_data_lines(self) -> None:
        assert encode_event("a\nb\r\nc\rd") == b"data: a\ndata: b\ndata: c\ndata: d\n\n"

    def test_retry_field(self) -> None:
        assert encode_event("x", retry=1500) == b"retry: 1500\ndata: x\n\n"

    @pytest.mark.parametrize("data", ["", "x", "a\nb", "\n", "\n\n", " leading space", "  two", "colon: inside",
                                      ": looks like a comment", "data: nested", "héllo 世界", "trailing\n"])
    def test_round_trip(self, data: str) -> None:
        decoder = SSEDecoder()
        events = list(decoder.feed(encode_event(data, event="update", id="e-1", retry=900)))
        assert events == [SSEEvent(data=data, event="update", id="e-1")]
        assert decoder.retry == 900

    def test_cr_in_data_is_normalised_to_lf(self) -> None:
        assert decode(encode_event("a\r\nb\rc")) == [SSEEvent(data="a\nb\nc")]

    @pytest.mark.parametrize("evil", ["1\ndata: injected", "1\r\nevent: close", "1\rretry: 1", "1\x00", "\n\n"])
    def test_id_and_event_cannot_inject_lines(self, evil: str) -> None:
        decoder = SSEDecoder()
        events = list(decoder.feed(encode_event("payload", event=evil, id=evil)))
        clean = sanitize_field(evil)
        assert events == [SSEEvent(data="payload", event=clean or "message", id=clean)]
        assert decoder.retry is None
        for forbidden in "\r\n\0":
            assert forbidden not in clean

    def test_id_with_nul_is_not_dropped_by_the_decoder_after_encoding(self) -> None:
        # The spec ignores an id containing NUL; the encoder strips NUL so the id still arrives.
        assert decode(encode_event("x", id="a\x00b"))[0].id == "ab"

    def test_sanitize_field(self) -> None:
        assert sanitize_field("a\r\nb\x00c\td") == "abc\td"

    def test_comment(self) -> None:
        assert encode_comment() == b":\n\n"
        assert encode_comment("ping") == b":ping\n\n"
        assert encode_comment("a\nb\r\x00c") == b":a bc\n\n"

    @pytest.mark.parametrize("text", ["", "ping", "multi\nline", "data: x", "\r\n"])
    def test_comment_dispatches_nothing(self, text: str) -> None:
        frame = encode_comment(text)
        assert frame.endswith(b"\n\n") and frame.count(b"\n") == 2 and b"\r" not in frame
        assert decode(frame + encode_event("after")) == [SSEEvent(data="after")]

    def test_retry_frame(self) -> None:
        decoder = SSEDecoder()
        assert encode_retry(3000) == b"retry: 3000\n\n"
        assert list(decoder.feed(encode_retry(3000))) == []
        assert decoder.retry == 3000

    def test_frames_concatenate_into_a_stream(self) -> None:
        stream = encode_retry(100) + encode_event("a", id="1") + encode_comment("hb") + encode_event("b\nc", event="t")
        assert decode_bytewise(stream) == [SSEEvent(data="a", id="1"), SSEEvent(data="b\nc", event="t", id="1")]


# --- property-based: any bytes, any split ------------------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from gateway.codec.sse import EventTooLarge  # noqa: E402

_sse_lines = st.lists(st.one_of(
    st.sampled_from(["", ":comment", "event: update", "event:", "id: 7", "id", "retry: 100", "retry: x",
                     "data", "data:", "data: \u00e9\u00b2", "id: a\u0000b"]),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=20).map(
        lambda t: "data: " + t),
), max_size=30)


def _decode(chunks: list[bytes], limit: int | None = None) -> tuple[list[Any], str, int | None]:
    decoder = SSEDecoder(limit)
    events = [e for chunk in chunks for e in decoder.feed(chunk)]
    return events, decoder.last_event_id, decoder.retry


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@settings(max_examples=300)
@given(_sse_lines, st.sampled_from(["\n", "\r", "\r\n"]), st.lists(st.integers(min_value=0), max_size=8))
def test_any_split_gives_the_same_events(lines: list[str], ending: str, cuts: list[int]) -> None:
    data = ("\ufeff" + ending.join(lines) + ending).encode()
    assert _decode(_split(data, cuts)) == _decode([data])
    assert _decode([bytes([b]) for b in data]) == _decode([data])


@settings(max_examples=300)
@given(st.binary(max_size=400), st.lists(st.integers(min_value=0), max_size=6))
def test_no_exception_on_any_bytes(data: bytes, cuts: list[int]) -> None:
    events, _, retry = _decode(_split(data, cuts))
    assert (events, retry) == _decode([data])[::2]
    for event in events:
        assert isinstance(event.data, str) and isinstance(event.event, str)


@given(st.integers(min_value=64, max_value=4096), st.integers(min_value=1, max_value=5000))
def test_a_line_that_never_ends_is_refused_past_the_limit(limit: int, chunk: int) -> None:
    decoder = SSEDecoder(limit)
    fed = 0
    with pytest.raises(EventTooLarge):
        while fed <= 4 * limit + chunk:
            list(decoder.feed(b"x" * chunk))
            fed += chunk
    assert fed <= limit + chunk


def test_an_event_whose_data_lines_add_up_past_the_limit_is_refused() -> None:
    decoder = SSEDecoder(100)
    assert list(decoder.feed(b"data: " + b"a" * 40 + b"\n" + b"data: " + b"b" * 40 + b"\n")) == []
    with pytest.raises(EventTooLarge):
        list(decoder.feed(b"data: " + b"c" * 40 + b"\n"))


def test_an_unfinished_line_is_kept_in_pieces_and_joined_once() -> None:
    """Linear decoding: a long line is not re-copied or rescanned on every read."""
    decoder = SSEDecoder()
    for _ in range(1000):
        assert list(decoder.feed(b"y" * 1000)) == []
    assert len(decoder._parts) == 1000 and decoder._partial == 1_000_000
    assert list(decoder.feed(b"\n\n")) == []  # a field named "yyy…": ignored
    assert decoder._parts == [] and decoder._partial == 0


def test_huge_retry_values_are_ignored() -> None:
    decoder = SSEDecoder()
    list(decoder.feed(b"retry: " + b"9" * 5000 + b"\n\n"))
    assert decoder.retry is None
