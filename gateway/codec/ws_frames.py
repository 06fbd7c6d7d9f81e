"""RFC 6455 frames, sans-I/O: the frames the gateway writes, and a parser for what browsers send.

Server frames carry no mask, so the same bytes are valid on every socket: an event's frame is
built once and written to all of its WebSocket subscribers. Client frames are masked; the
parser unmasks them, reassembles fragmented messages, answers nothing itself, and refuses
whatever the protocol forbids with the close code to send (`FrameError`). No extension is
negotiated (the gateway turns permessage-deflate off), so any RSV bit is an error.
"""

from __future__ import annotations

from dataclasses import dataclass

TEXT, BINARY, CLOSE, PING, PONG, CONTINUATION = 0x1, 0x2, 0x8, 0x9, 0xA, 0x0
#: Close codes the parser may ask for.
PROTOCOL_ERROR, INVALID_DATA, MESSAGE_TOO_BIG = 1002, 1007, 1009


def _frame(opcode: int, payload: bytes) -> bytes:
    size = len(payload)
    first = 0x80 | opcode
    if size < 126:
        head = bytes((first, size))
    elif size < 1 << 16:
        head = bytes((first, 126)) + size.to_bytes(2, "big")
    else:
        head = bytes((first, 127)) + size.to_bytes(8, "big")
    return head + payload


def text_frame(payload: bytes) -> bytes:
    """One unfragmented, unmasked text frame (what a server sends without extensions)."""
    return _frame(TEXT, payload)


def ping_frame(payload: bytes = b"") -> bytes:
    return _frame(PING, payload[:125])


def pong_frame(payload: bytes = b"") -> bytes:
    return _frame(PONG, payload[:125])


def close_frame(code: int | None, reason: str = "") -> bytes:
    """A close frame with its code and a reason cut to fit a control frame (123 bytes of UTF-8).

    `code` None: an empty close frame (the answer to a client's close that gave no code).
    """
    if code is None:
        return _frame(CLOSE, b"")
    raw = reason.encode()[:123]
    while raw:
        try:
            raw.decode()
            break
        except UnicodeDecodeError:  # cut inside a character
            raw = raw[:-1]
    return _frame(CLOSE, code.to_bytes(2, "big") + raw)


class FrameError(Exception):
    """The peer broke the protocol: close the connection with `code`."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Message:
    """One complete message: `kind` is "text", "binary", "ping", "pong" or "close"."""

    kind: str
    data: str | bytes
    #: For a close: the peer's code (1005 when it gave none).
    code: int = 0


_KINDS = {TEXT: "text", BINARY: "binary", PING: "ping", PONG: "pong", CLOSE: "close"}


class FrameParser:
    """Incremental parser of a client's frames: `feed(bytes)` returns the messages they complete.

    Holds at most one frame's header and `max_size` bytes of message; anything larger is
    refused (1009) before it is buffered.
    """

    __slots__ = ("_buffer", "_fragments", "_fragments_kind", "_fragments_size", "max_size")

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._buffer = b""
        self._fragments: list[bytes] | None = None
        self._fragments_kind = 0
        self._fragments_size = 0

    def feed(self, data: bytes) -> list[Message]:
        buffer = self._buffer + data if self._buffer else data
        messages: list[Message] = []
        start = 0
        length = len(buffer)
        while length - start >= 2:
            first, second = buffer[start], buffer[start + 1]
            if first & 0x70:
                raise FrameError(PROTOCOL_ERROR, "reserved bits set")
            if not second & 0x80:
                raise FrameError(PROTOCOL_ERROR, "client frames must be masked")
            fin, opcode, size = first & 0x80, first & 0x0F, second & 0x7F
            offset = start + 2
            if size == 126:
                if length - offset < 2:
                    break
                size = int.from_bytes(buffer[offset:offset + 2], "big")
                offset += 2
            elif size == 127:
                if length - offset < 8:
                    break
                size = int.from_bytes(buffer[offset:offset + 8], "big")
                offset += 8
            self._check(opcode, fin, size)
            if length - offset < 4 + size:
                break
            mask = buffer[offset:offset + 4]
            payload = _unmask(buffer[offset + 4:offset + 4 + size], mask)
            start = offset + 4 + size
            message = self._message(opcode, fin, payload)
            if message is not None:
                messages.append(message)
        self._buffer = buffer[start:]
        return messages

    def _check(self, opcode: int, fin: int, size: int) -> None:
        if opcode >= 0x8:
            if opcode not in _KINDS:
                raise FrameError(PROTOCOL_ERROR, "unknown control frame")
            if size > 125 or not fin:
                raise FrameError(PROTOCOL_ERROR, "control frames are short and unfragmented")
            return
        if opcode not in (TEXT, BINARY, CONTINUATION):
            raise FrameError(PROTOCOL_ERROR, "unknown data frame")
        if opcode == CONTINUATION and self._fragments is None:
            raise FrameError(PROTOCOL_ERROR, "continuation without a message")
        if opcode != CONTINUATION and self._fragments is not None:
            raise FrameError(PROTOCOL_ERROR, "a message inside an unfinished one")
        if self._fragments_size + size > self.max_size:
            raise FrameError(MESSAGE_TOO_BIG, "message too big")

    def _message(self, opcode: int, fin: int, payload: bytes) -> Message | None:
        if opcode == CLOSE:
            return _close(payload)
        if opcode in (PING, PONG):
            return Message(_KINDS[opcode], payload)
        if opcode == CONTINUATION:
            assert self._fragments is not None
            self._fragments.append(payload)
            self._fragments_size += len(payload)
            if not fin:
                return None
            opcode, payload = self._fragments_kind, b"".join(self._fragments)
            self._fragments, self._fragments_size = None, 0
        elif not fin:
            self._fragments, self._fragments_kind, self._fragments_size = [payload], opcode, len(payload)
            return None
        if opcode == TEXT:
            try:
                return Message("text", payload.decode())
            except UnicodeDecodeError:
                raise FrameError(INVALID_DATA, "text is not UTF-8") from None
        return Message("binary", payload)


def _unmask(payload: bytes, mask: bytes) -> bytes:
    if not payload:
        return payload
    size = len(payload)
    key = int.from_bytes((mask * (size // 4 + 1))[:size], "little")
    return (int.from_bytes(payload, "little") ^ key).to_bytes(size, "little")


def _close(payload: bytes) -> Message:
    if not payload:
        return Message("close", "", 1005)
    if len(payload) == 1:
        raise FrameError(PROTOCOL_ERROR, "a close frame with half a code")
    code = int.from_bytes(payload[:2], "big")
    if not (1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999):
        raise FrameError(PROTOCOL_ERROR, "invalid close code")
    try:
        reason = payload[2:].decode()
    except UnicodeDecodeError:
        raise FrameError(INVALID_DATA, "close reason is not UTF-8") from None
    return Message("close", reason, code)
