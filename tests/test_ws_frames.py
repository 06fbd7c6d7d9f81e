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
