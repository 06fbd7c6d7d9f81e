"""Stream events as the hub stores them: encoded once per wire format, then shared.

An `Event` is created once per upstream event. Its SSE frame is built eagerly (every
stream has SSE subscribers in practice); its WebSocket message (and that message as a
ready frame) is built on first use and cached, so a thousand WebSocket subscribers cost
one `json` encoding.
"""

from __future__ import annotations

import json
import re

from gateway.sse import encode_event
from gateway.ws_frames import text_frame

#: Stream kinds a browser may open, as they appear in paths and in `<kind>/<id>` names.
KINDS = ("evaluations", "trace-evaluations", "optimizations")
#: Upstream event names that end a stream.
TERMINAL_EVENTS = frozenset({"final", "error", "job_complete", "job_failed", "job_cancelled"})

_INT = re.compile(r"0|[1-9][0-9]{0,17}")


def id_json(event_id: str) -> str:
    """Ids that are canonical integers travel as JSON numbers (as upstream sends them)."""
    return event_id if _INT.fullmatch(event_id) else json.dumps(event_id)


class Event:
    """One upstream event, owned by one stream."""

    __slots__ = ("_ws", "_ws_frame", "data", "id", "received_at", "sse", "stream", "type")

    def __init__(self, stream: str, id: str, type: str, data: str, received_at: float) -> None:
        self.stream = stream
        self.id = id
        self.type = type
        self.data = data
        self.received_at = received_at
        self.sse = encode_event(data, event=type, id=id)
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
            if kind == "optimizations":
                self._ws = ('{"type":"event","stream":' + json.dumps(self.stream) + ',"jobId":'
                            + json.dumps(resource_id) + ',"event":' + as_json_text(self.data) + "}")
            else:
                self._ws = (
                    '{"type":"event","stream":' + json.dumps(self.stream)
                    + ',"event":{"id":' + id_json(self.id) + ',"eventType":' + json.dumps(self.type)
                    + ',"data":' + as_json_text(self.data) + "}}"
                )
        return self._ws

    @property
    def ws_frame(self) -> bytes:
        """`ws` as a complete WebSocket text frame, for sockets written to directly."""
        if self._ws_frame is None:
            self._ws_frame = text_frame(self.ws.encode())
        return self._ws_frame


def as_json_text(raw: str) -> str:
    """Upstream data that is not JSON is carried as a JSON string so WebSocket frames stay valid."""
    try:
        json.loads(raw)
    except ValueError:
        return json.dumps(raw)
    return raw
