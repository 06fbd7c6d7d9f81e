"""Stream events as the hub stores them: encoded once per wire format, then shared.

An `Event` is created once per upstream event. Its SSE frame is built eagerly (every
stream has SSE subscribers in practice); its WebSocket message (and that message as a
ready frame) is built on first use and cached, so a thousand WebSocket subscribers cost
one `json` encoding.
"""

from __future__ import annotations

import json

from gateway.codec.sse import encode_event
from gateway.codec.streams import JOB_KIND, PAUSE_EVENT, RESUME_EVENT, TERMINAL_EVENTS, id_value
from gateway.codec.ws_frames import text_frame


def id_json(event_id: str) -> str:
    """Ids that are canonical integers travel as JSON numbers (as upstream sends them)."""
    return json.dumps(id_value(event_id))


class Event:
    """One upstream event, owned by one stream."""

    __slots__ = ("_ws", "_ws_frame", "data", "id", "pause", "received_at", "sse", "stream", "type")

    def __init__(self, stream: str, id: str, type: str, data: str, received_at: float) -> None:
        self.stream = stream
        self.id = id
        self.type = type
        #: The upstream's data as browser-safe JSON text (see `as_json_text`), shared by both formats.
        self.data = data = as_json_text(data)
        self.received_at = received_at
        self.sse = encode_event(data, event=type, id=id)
        #: True: the job now waits on a person (`job_paused`); False: it resumed; None: neither.
        self.pause: bool | None = True if type == PAUSE_EVENT else False if type == RESUME_EVENT else None
        self._ws: str | None = None
        self._ws_frame: bytes | None = None

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_EVENTS

    @property
    def ws(self) -> str:
        """The `{"type":"event",...}` WebSocket message, built once.

        Job events carry the upstream's event object as it was sent (with `iteration` and
        `timestamp`) plus `jobId`; evaluation events wrap their payload as `data`.
        """
        if self._ws is None:
            kind, _, resource_id = self.stream.partition("/")
            if kind == JOB_KIND:
                self._ws = ('{"type":"event","stream":' + json.dumps(self.stream) + ',"jobId":'
                            + json.dumps(resource_id) + ',"event":' + self.data + "}")
            else:
                self._ws = (
                    '{"type":"event","stream":' + json.dumps(self.stream)
                    + ',"event":{"id":' + id_json(self.id) + ',"eventType":' + json.dumps(self.type)
                    + ',"data":' + self.data + "}}"
                )
        return self._ws

    @property
    def ws_frame(self) -> bytes:
        """`ws` as a complete WebSocket text frame, for sockets written to directly."""
        if self._ws_frame is None:
            self._ws_frame = text_frame(self.ws.encode())
        return self._ws_frame


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _null_constant(name: str) -> object:
    return None


def strict_json_loads(text: str | bytes) -> object:
    """`json.loads` without Python's extensions (`NaN`, `Infinity`), which `JSON.parse` rejects."""
    return json.loads(text, parse_constant=_reject_constant)


def browser_json(text: str) -> str | None:
    """`text` as JSON every browser's `JSON.parse` accepts, or None if it is not JSON at all.

    JSON passes unchanged; JSON with `NaN`/`Infinity` (which Python's parser accepts and
    browsers do not) is re-encoded with `null` in their place.
    """
    try:
        strict_json_loads(text)
        return text
    except (ValueError, RecursionError):
        pass
    try:
        value = json.loads(text, parse_constant=_null_constant)
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (ValueError, RecursionError):
        return None


def as_json_text(raw: str) -> str:
    """Upstream event data as browser-safe JSON (`browser_json`); anything else as a JSON string."""
    safe = browser_json(raw)
    return json.dumps(raw) if safe is None else safe
