"""The browser WebSocket protocol as pure functions: client messages in, server messages out."""

from __future__ import annotations

import json

import pytest

from gateway.codec import ws_messages as proto
from gateway.codec.ws_messages import Ping, ProtocolError, Subscribe, Unsubscribe, parse_message


def _error(raw: str | bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse_message(raw)
    return info.value


class TestParse:
    def test_subscribe_by_stream(self) -> None:
        assert parse_message('{"type":"subscribe","stream":"evaluations/e1"}') == Subscribe("evaluations/e1")

    def test_job_id_is_shorthand_for_an_optimization_stream(self) -> None:
        assert parse_message('{"type":"subscribe","jobId":"job-42"}') == Subscribe("optimizations/job-42")
        assert parse_message('{"type":"unsubscribe","jobId":"job-42"}') == Unsubscribe("optimizations/job-42")
        both = '{"type":"subscribe","jobId":"j","stream":"optimizations/j"}'
        assert parse_message(both) == Subscribe("optimizations/j")

    @pytest.mark.parametrize(("value", "expected"), [(7, "7"), (0, "0"), ("7", "7"), ("opaque-id", "opaque-id"),
                                                     (None, None)])
    def test_after_event_id_int_or_string(self, value: object, expected: str | None) -> None:
        raw = json.dumps({"type": "subscribe", "stream": "trace-evaluations/t1", "afterEventId": value})
        assert parse_message(raw) == Subscribe("trace-evaluations/t1", expected)

    @pytest.mark.parametrize("value", [True, -1, 1.5, "", "a\nb", "x" * 200, [], {}])
    def test_bad_after_event_id(self, value: object) -> None:
        raw = json.dumps({"type": "subscribe", "stream": "evaluations/e1", "afterEventId": value})
        exc = _error(raw)
        assert exc.code == "invalid_message"
        assert exc.stream == "evaluations/e1"

    def test_ping_and_bytes(self) -> None:
        assert parse_message('{"type":"ping"}') == Ping()
        assert parse_message(b'{"type":"unsubscribe","stream":"evaluations/e1"}') == Unsubscribe("evaluations/e1")

    @pytest.mark.parametrize(("raw", "code"), [
        ("not json", "invalid_json"),
        (b"\xff\xfe", "invalid_json"),
        ("[1,2]", "invalid_message"),
        ('{"type":5}', "invalid_message"),
        ("{}", "invalid_message"),
        ('{"type":"publish","stream":"evaluations/e1"}', "unknown_type"),
        ('{"type":"subscribe"}', "invalid_message"),
        ('{"type":"subscribe","stream":"evaluations"}', "invalid_stream"),
        ('{"type":"subscribe","stream":"users/1"}', "invalid_stream"),
        ('{"type":"subscribe","stream":"evaluations/../x"}', "invalid_stream"),
        ('{"type":"subscribe","stream":"evaluations/a/b"}', "invalid_stream"),
        ('{"type":"subscribe","stream":"evaluations/a\\r\\nb"}', "invalid_stream"),
        ('{"type":"subscribe","stream":7}', "invalid_stream"),
        ('{"type":"subscribe","jobId":7}', "invalid_stream"),
        ('{"type":"subscribe","jobId":"a","stream":"optimizations/b"}', "invalid_message"),
    ])
    def test_malformed(self, raw: str | bytes, code: str) -> None:
        assert _error(raw).code == code

    def test_errors_never_echo_client_input(self) -> None:
        exc = _error('{"type":"<script>alert(1)</script>"}')
        assert "script" not in exc.message


class TestBuild:
    def test_replies_are_compact_json(self) -> None:
        assert proto.subscribed("evaluations/e1") == '{"type":"subscribed","stream":"evaluations/e1"}'
        assert proto.unsubscribed("evaluations/e1") == '{"type":"unsubscribed","stream":"evaluations/e1"}'
        assert json.loads(proto.pong()) == {"type": "pong"}

    def test_job_replies_carry_the_job_id(self) -> None:
        assert json.loads(proto.subscribed("optimizations/j1")) == {
            "type": "subscribed", "stream": "optimizations/j1", "jobId": "j1"}

    def test_error_with_and_without_stream(self) -> None:
        assert json.loads(proto.error("rate_limited", "slow down")) == {
            "type": "error", "error": {"code": "rate_limited", "message": "slow down"}}
        body = json.loads(proto.error("superseded", "replaced", "optimizations/j", reconnect=False, lastEventId=4,
                                      detail=None))
        assert body == {"type": "error", "stream": "optimizations/j", "jobId": "j",
                        "error": {"code": "superseded", "message": "replaced", "reconnect": False, "lastEventId": 4}}


# --- property-based: the parser answers any message with a command or a ProtocolError -------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from gateway.codec.streams import is_event_id  # noqa: E402

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10)
_messages = st.fixed_dictionaries(
    {"type": st.sampled_from(["subscribe", "unsubscribe", "ping", "refresh", "", 7])},
    optional={"stream": st.one_of(st.text(max_size=40), _json_values,
                                  st.sampled_from(["evaluations/e1", "optimizations/j", "nope/x"])),
              "jobId": st.one_of(st.text(max_size=20), _json_values),
              "afterEventId": st.one_of(st.integers(), st.text(max_size=140), _json_values)})


@settings(max_examples=400)
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200), _messages.map(json.dumps)))
def test_any_message_is_a_command_or_a_protocol_error(raw: str | bytes) -> None:
    try:
        command = parse_message(raw)
    except ProtocolError as exc:
        assert exc.code in {"invalid_json", "invalid_message", "unknown_type", "invalid_stream"}
        return
    if isinstance(command, Subscribe):
        assert command.after_event_id is None or is_event_id(command.after_event_id)
        kind, _, resource = command.stream.partition("/")
        assert kind in ("evaluations", "trace-evaluations", "optimizations") and resource
