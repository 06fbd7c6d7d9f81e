"""Sans-I/O Server-Sent Events codec (WHATWG HTML, "Server-sent events").

The encoder turns one event into the exact bytes of its wire frame, so the hub can
encode an event once and hand the same bytes to every subscriber. The decoder is a
push parser: feed it bytes as they arrive and it yields complete events; it never
touches a socket, which keeps it testable straight from the spec's examples.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

_FORBIDDEN_IN_FIELD = str.maketrans("", "", "\r\n\0")


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One dispatched event, as the spec's event stream interpretation defines it."""

    data: str
    event: str = "message"
    id: str | None = None


def sanitize_field(value: str) -> str:
    """Strip CR, LF and NUL so a value can never break out of an `id:`/`event:` line."""
    return value.translate(_FORBIDDEN_IN_FIELD)


def encode_event(data: str, *, event: str | None = None, id: str | None = None, retry: int | None = None) -> bytes:
    """Encode one event as its SSE frame; multi-line data becomes several `data:` lines."""
    parts: list[str] = []
    if id is not None:
        parts.append(f"id: {sanitize_field(id)}\n")
    if event is not None:
        parts.append(f"event: {sanitize_field(event)}\n")
    if retry is not None:
        parts.append(f"retry: {int(retry)}\n")
    for line in data.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        parts.append(f"data: {line}\n")
    parts.append("\n")
    return "".join(parts).encode("utf-8")


def encode_comment(text: str = "") -> bytes:
    """A comment line: ignored by clients, used as a heartbeat that keeps proxies from timing out."""
    lines = sanitize_field(text.replace("\n", " ")) if text else ""
    return f":{lines}\n\n".encode()


def encode_retry(milliseconds: int) -> bytes:
    """A frame that only sets the client's reconnection delay."""
    return f"retry: {int(milliseconds)}\n\n".encode()


class SSEDecoder:
    """Incremental SSE parser.

    Handles CR, LF and CRLF line endings (including a CRLF split across two chunks), a
    leading UTF-8 BOM, comments, fields without a colon, and the spec's rules for `id`
    (ignored when it contains NUL) and `retry` (ASCII digits only). `last_event_id` is
    the stream's last-event-ID buffer, which persists across events as the spec says;
    `retry` is the latest reconnection time the server asked for, in milliseconds.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._pending_cr = False
        self._bom_checked = False
        self._data: list[str] = []
        self._event = ""
        self._id_seen = False
        self.last_event_id = ""
        self.retry: int | None = None

    def feed(self, chunk: bytes) -> Iterator[SSEEvent]:
        """Consume bytes and yield every event they complete."""
        if not chunk:
            return  # an empty read must not forget a CR that may be half of a CRLF
        if self._pending_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        self._pending_cr = False
        buffer = self._buffer + chunk
        if not self._bom_checked:
            if len(buffer) < 3 and b"\xef\xbb\xbf".startswith(buffer):
                self._buffer = buffer
                return
            if buffer.startswith(b"\xef\xbb\xbf"):
                buffer = buffer[3:]
            self._bom_checked = True
        start = 0
        length = len(buffer)
        cr = lf = -2  # next CR / LF at or after `start`; -1 once none is left in the buffer
        while start < length:
            if -1 != cr < start:
                cr = buffer.find(b"\r", start)
            if -1 != lf < start:
                lf = buffer.find(b"\n", start)
            if cr == -1 and lf == -1:
                break
            if cr != -1 and (lf == -1 or cr < lf):
                end = cr
                if cr + 1 < length:
                    nxt = cr + 2 if buffer[cr + 1 : cr + 2] == b"\n" else cr + 1
                else:
                    nxt = cr + 1
                    self._pending_cr = True
            else:
                end = lf
                nxt = lf + 1
            line = buffer[start:end].decode("utf-8", errors="replace")
            start = nxt
            event = self._process_line(line)
            if event is not None:
                yield event
        self._buffer = buffer[start:]

    def _process_line(self, line: str) -> SSEEvent | None:
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self.last_event_id = value
                self._id_seen = True
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry = int(value)
        return None

    def _dispatch(self) -> SSEEvent | None:
        if not self._data:
            self._event = ""
            return None
        event = SSEEvent(
            data="\n".join(self._data),
            event=self._event or "message",
            id=self.last_event_id if self._id_seen else None,
        )
        self._data = []
        self._event = ""
        return event
