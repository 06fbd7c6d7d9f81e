"""Typed items of a gateway stream, decoded from SSE fields without any I/O.

Pure so that the mapping from the gateway's frames (upstream events, `gateway.continuity_lost`,
`gateway.close`) to what a caller sees, and the no-duplicate rule, are tested without sockets.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

CLOSE_EVENT = "gateway.close"
CONTINUITY_LOST_EVENT = "gateway.continuity_lost"
EVALUATION_TERMINALS = frozenset({"final", "error"})
"""Upstream evaluation events after which the stream is over."""
JOB_TERMINALS = frozenset({"job_complete", "job_failed", "job_cancelled"})
"""Upstream optimization job events after which the stream is over."""

_INT = re.compile(r"0|[1-9][0-9]*")


@dataclass(frozen=True, slots=True)
class Event:
    """One upstream event as the gateway relayed it.

    `type` is the SSE event name, i.e. the upstream `eventType`; `data` is the parsed JSON
    payload (the raw text if it is not JSON). For optimization jobs `data` is the upstream
    event object, `{"id", "eventType", "iteration", "timestamp", "data"}`.
    """

    id: str | None
    type: str
    data: Any


@dataclass(frozen=True, slots=True)
class ContinuityLost(Event):
    """The resume point is gone (`reason` "trimmed", "unknown" or "truncated").

    What follows restarts from the oldest retained event: discard what was built from
    earlier events and rebuild it from the events after this one.
    """

    reason: str = "unknown"
    oldest_retained_id: str | None = None


@dataclass(frozen=True, slots=True)
class CloseNotice:
    """The gateway's `gateway.close` frame: why the stream ended and whether to come back."""

    code: str
    reconnect: bool
    message: str
    last_event_id: str | None = None
    detail: str | None = None
    poll: str | None = None


def parse_data(text: str) -> Any:
    """JSON payloads become Python values; anything else stays the text the gateway sent."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def decode(event: str, data: str, event_id: str | None) -> Event | CloseNotice | None:
    """Map one dispatched SSE event to a stream item; None for frames that carry nothing (a lone `retry:`)."""
    if event == CLOSE_EVENT:
        body = parse_data(data)
        body = body if isinstance(body, dict) else {}
        return CloseNotice(
            code=str(body.get("code") or "unknown"),
            reconnect=body.get("reconnect") is True,  # an unknown code is judged by its flag alone
            message=str(body.get("message") or ""),
            last_event_id=_text(body.get("lastEventId")),
            detail=_text(body.get("detail")),
            poll=_text(body.get("poll")),
        )
    if event == CONTINUITY_LOST_EVENT:
        body = parse_data(data)
        body = body if isinstance(body, dict) else {}
        return ContinuityLost(None, event, body, str(body.get("reason") or "unknown"),
                              _text(body.get("oldestRetainedId")))
    if event == "message" and data == "":
        return None  # the spec dispatches nothing for an empty data buffer
    return Event(event_id or None, event, parse_data(data))


@dataclass
class Cursor:
    """The resume point, and the memory that keeps a replayed event from being yielded twice.

    Integer ids (what Stratix sends, and what the gateway assigns when it sends none) are
    compared as numbers; opaque ids are remembered in a bounded window.
    """

    last_event_id: str | None = None
    window: int = 1024
    _recent: OrderedDict[str, None] = field(default_factory=OrderedDict, repr=False)

    def accept(self, event_id: str | None) -> bool:
        """True if an event with this id is new, and make it the resume point."""
        if event_id is None:
            return True
        last = self.last_event_id
        if last is not None:
            if _INT.fullmatch(event_id) and _INT.fullmatch(last):
                if int(event_id) <= int(last):
                    return False
            elif event_id in self._recent:
                return False
        self.last_event_id = event_id
        self._recent[event_id] = None
        if len(self._recent) > self.window:
            self._recent.popitem(last=False)
        return True

    def restart(self) -> None:
        """After continuity_lost the retained history is authoritative again: forget what was seen."""
        self.last_event_id = None
        self._recent.clear()
