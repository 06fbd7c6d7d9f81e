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


class EventTooLarge(ValueError):
    """One line, or one event's data, grew past the decoder's `max_event_bytes`."""


_BOM = b"\xef\xbb\xbf"


class SSEDecoder:
    """Incremental SSE parser.

    Handles CR, LF and CRLF line endings (including a CRLF split across two chunks), a
    leading UTF-8 BOM, comments, fields without a colon, and the spec's rules for `id`
    (ignored when it contains NUL) and `retry` (ASCII digits only). `last_event_id` is
    the stream's last-event-ID buffer, which persists across events as the spec says;
    `retry` is the latest reconnection time the server asked for, in milliseconds.

    Every byte is scanned once (an incomplete line is kept as pieces, joined once when it
    ends), so a line that never ends costs linear time; with `max_event_bytes` set, a line
    or an event's data past that size raises `EventTooLarge` instead of growing memory.
    """

    def __init__(self, max_event_bytes: int | None = None) -> None:
        self.max_event_bytes = max_event_bytes
        self._parts: list[bytes] = []  # the line being received, in pieces
        self._partial = 0  # its size
        self._pending_cr = False
        self._bom_checked = False
        self._head = b""  # the first bytes, held until it is known whether they are a BOM
        self._data: list[str] = []
        self._data_bytes = 0
        self._event = ""
        self._id_seen = False
        self.last_event_id = ""
        self.retry: int | None = None

    def feed(self, chunk: bytes) -> Iterator[SSEEvent]:
        """Consume bytes and yield every event they complete."""
        if not chunk:
            return  # an empty read must not forget a CR that may be half of a CRLF
        if not self._bom_checked:
            chunk = self._head + chunk
            if len(chunk) < 3 and _BOM.startswith(chunk):
                self._head = chunk
                return
            self._head = b""
            self._bom_checked = True
            if chunk.startswith(_BOM):
                chunk = chunk[3:]
                if not chunk:
                    return
        if self._pending_cr:
            self._pending_cr = False
            if chunk.startswith(b"\n"):
                chunk = chunk[1:]
        start = 0
        length = len(chunk)
        cr = lf = -2  # next CR / LF at or after `start`; -1 once none is left in the chunk
        while start < length:
            if -1 != cr < start:
                cr = chunk.find(b"\r", start)
            if -1 != lf < start:
                lf = chunk.find(b"\n", start)
            if cr == -1 and lf == -1:
                break
            if cr != -1 and (lf == -1 or cr < lf):
                end = cr
                if cr + 1 < length:
                    nxt = cr + 2 if chunk[cr + 1] == 0x0A else cr + 1
                else:
                    nxt = cr + 1
                    self._pending_cr = True
            else:
                end = lf
                nxt = lf + 1
            if self._parts:
                self._parts.append(chunk[start:end])
                raw = b"".join(self._parts)
                self._parts.clear()
                self._partial = 0
            else:
                raw = chunk[start:end]
            start = nxt
            self._check(len(raw))
            event = self._process_line(raw.decode("utf-8", errors="replace"))
            if event is not None:
                yield event
        if start < length:
            rest = chunk[start:] if start else chunk
            self._parts.append(rest)
            self._partial += len(rest)
            self._check(self._partial)

    def _check(self, line_bytes: int) -> None:
        limit = self.max_event_bytes
        if limit is not None and self._data_bytes + line_bytes > limit:
            raise EventTooLarge(f"an event over {limit} bytes")

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
            self._data_bytes += len(value) + 1
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self.last_event_id = value
                self._id_seen = True
        elif name == "retry" and 0 < len(value) <= 9 and value.isascii() and value.isdigit():
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
        self._data_bytes = 0
        self._event = ""
        return event
