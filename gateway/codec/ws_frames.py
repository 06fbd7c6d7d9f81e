"""WebSocket frames the gateway writes itself (sans-I/O), for sockets it writes to directly."""

from __future__ import annotations


def text_frame(payload: bytes) -> bytes:
    """One unfragmented, unmasked RFC 6455 text frame (what a server sends without extensions).

    Server frames carry no mask, so the same bytes are valid on every socket: an event's
    frame is built once and written to all of its WebSocket subscribers.
    """
    size = len(payload)
    if size < 126:
        head = bytes((0x81, size))
    elif size < 1 << 16:
        head = bytes((0x81, 126)) + size.to_bytes(2, "big")
    else:
        head = bytes((0x81, 127)) + size.to_bytes(8, "big")
    return head + payload
