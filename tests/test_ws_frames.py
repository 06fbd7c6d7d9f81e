"""The gateway's own WebSocket frames, read back by an independent parser (websockets')."""

from __future__ import annotations

import pytest
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from gateway.codec.events import Event
from gateway.codec.ws_frames import text_frame


def parse(data: bytes) -> Frame:
    reader = StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    parser = Frame.parse(reader.read_exact, mask=False)
    try:
        next(parser)
    except StopIteration as done:
        frame: Frame = done.value
        assert reader.at_eof(), "bytes left over after the frame"
        return frame
    raise AssertionError("incomplete frame")


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 200_000])
def test_text_frames_of_every_length_encoding(size: int) -> None:
    payload = ("é" * (size // 2) + "x" * (size % 2)).encode()
    frame = parse(text_frame(payload))
    assert frame.opcode is Opcode.TEXT and frame.fin and frame.data == payload


def test_an_events_frame_is_its_websocket_message_built_once() -> None:
    event = Event("evaluations/e-1", "7", "row_complete", '{"row": 3}', 0.0)
    assert event.ws_frame is event.ws_frame
    assert parse(event.ws_frame).data.decode() == event.ws


# --- the parser of client frames, checked against websockets' own client protocol ----------------------

import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from websockets.frames import Frame as WSFrame  # noqa: E402

from gateway.codec.ws_frames import (  # noqa: E402
    MESSAGE_TOO_BIG,
    PROTOCOL_ERROR,
    FrameError,
    FrameParser,
    Message,
    close_frame,
    ping_frame,
    pong_frame,
)


def client_bytes(*frames: Frame) -> bytes:
    """Frames as a browser sends them: masked, serialized by an independent implementation."""
    return b"".join(frame.serialize(mask=True, extensions=[]) for frame in frames)


def test_text_binary_control_and_fragmented_messages() -> None:
    data = client_bytes(
        WSFrame(Opcode.TEXT, "héllo".encode()),
        WSFrame(Opcode.BINARY, b"\x00\x01"),
        WSFrame(Opcode.TEXT, b"frag", fin=False),
        WSFrame(Opcode.PING, b"p"),  # control frames may come between fragments
        WSFrame(Opcode.CONT, b"mented", fin=False),
        WSFrame(Opcode.CONT, b"", fin=True),
        WSFrame(Opcode.CLOSE, (4000).to_bytes(2, "big") + b"bye"),
    )
    assert FrameParser(1 << 20).feed(data) == [
        Message("text", "héllo"), Message("binary", b"\x00\x01"), Message("ping", b"p"),
        Message("text", "fragmented"), Message("close", "bye", 4000)]


@settings(max_examples=200)
@given(st.lists(st.one_of(st.text(max_size=300), st.binary(max_size=300)), max_size=6),
       st.lists(st.integers(min_value=0), max_size=6))
def test_any_split_gives_the_same_messages(payloads: list[str | bytes], cuts: list[int]) -> None:
    frames = [WSFrame(Opcode.TEXT, p.encode()) if isinstance(p, str) else WSFrame(Opcode.BINARY, p) for p in payloads]
    data = client_bytes(*frames)
    whole = FrameParser(1 << 20).feed(data)
    assert [m.data for m in whole] == payloads
    parser = FrameParser(1 << 20)
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    assert [m for piece in pieces for m in parser.feed(piece)] == whole


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_any_bytes_give_messages_or_a_frame_error(data: bytes) -> None:
    try:
        FrameParser(1024).feed(data)
    except FrameError as exc:
        assert exc.code in (1002, 1007, 1009)


@pytest.mark.parametrize(("frame", "code"), [
    (WSFrame(Opcode.CONT, b"x"), PROTOCOL_ERROR),
    (WSFrame(Opcode.TEXT, b"\xff"), 1007),
    (WSFrame(Opcode.TEXT, b"x" * 2000), MESSAGE_TOO_BIG),
    (WSFrame(Opcode.CLOSE, (999).to_bytes(2, "big")), PROTOCOL_ERROR),
])
def test_what_the_protocol_forbids_is_refused_with_its_close_code(frame: Frame, code: int) -> None:
    with pytest.raises(FrameError) as info:
        FrameParser(1024).feed(client_bytes(frame))
    assert info.value.code == code


def test_reserved_bits_are_refused() -> None:
    with pytest.raises(FrameError) as info:
        FrameParser(1024).feed(bytes((0x81 | 0x40, 0x81)) + b"\0\0\0\0x")
    assert info.value.code == PROTOCOL_ERROR


def test_long_control_frames_are_refused() -> None:
    long_ping = bytes((0x89, 0x80 | 126)) + (126).to_bytes(2, "big") + b"\0\0\0\0" + b"x" * 126
    with pytest.raises(FrameError) as info:
        FrameParser(1024).feed(long_ping)
    assert info.value.code == PROTOCOL_ERROR


def test_unmasked_frames_and_oversized_fragments_are_refused() -> None:
    with pytest.raises(FrameError) as unmasked:
        FrameParser(1024).feed(WSFrame(Opcode.TEXT, b"x").serialize(mask=False, extensions=[]))
    assert unmasked.value.code == PROTOCOL_ERROR
    parser = FrameParser(1024)
    parser.feed(client_bytes(WSFrame(Opcode.TEXT, b"x" * 1000, fin=False)))
    with pytest.raises(FrameError) as big:
        parser.feed(client_bytes(WSFrame(Opcode.CONT, b"x" * 100)))
    assert big.value.code == MESSAGE_TOO_BIG


def test_server_control_frames_parse_back() -> None:
    from websockets.frames import Close

    close = close_frame(4001, "slow_consumer" + "é" * 100)
    assert len(close) <= 127 and close[0] == 0x88
    parsed = Close.parse(close[2:])
    assert parsed.code == 4001 and parsed.reason.startswith("slow_consumer")
    assert ping_frame(b"abc") == b"\x89\x03abc" and pong_frame(b"abc") == b"\x8a\x03abc"
