"""Sans-I/O browser WebSocket protocol (`/ws`, subprotocol `gateway.v1`): parse client messages, build replies.

No sockets here: `parse_message` turns one text message into a typed command or raises
`ProtocolError` with a stable code, and the builders return the exact JSON text of each
server message. Event messages are not built here: each `Event` carries its own `ws` text,
encoded once for every subscriber (see `codec.events`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from gateway.codec.streams import JOB_KIND, StreamNameError, is_event_id, parse_stream_name

SUBPROTOCOL = "gateway.v1"
"""Offered by browsers (with `bearer.<token>`) and selected by the gateway."""


class ProtocolError(Exception):
    """A client message the gateway cannot act on; answered with an `error` frame, never a crash."""

    def __init__(self, code: str, message: str, stream: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.stream = stream


@dataclass(frozen=True, slots=True)
class Subscribe:
    stream: str
    after_event_id: str | None = None


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    stream: str


@dataclass(frozen=True, slots=True)
class Ping:
    pass


@dataclass(frozen=True, slots=True)
class Refresh:
    """A fresh session token for the open socket (its expiry moves to the new token's)."""

    token: str = field(repr=False)


Command = Subscribe | Unsubscribe | Ping | Refresh


def parse_message(raw: str | bytes) -> Command:
    """One client message as a command; ProtocolError for anything malformed."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("invalid_json", "message is not UTF-8 JSON") from None
    try:
        message = json.loads(raw)
    except ValueError:
        raise ProtocolError("invalid_json", "message is not valid JSON") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ProtocolError("invalid_message", "message must be a JSON object with a string 'type'")
    kind = message["type"]
    if kind == "ping":
        return Ping()
    if kind == "refresh":
        token = message.get("token")
        if not isinstance(token, str) or not token:
            raise ProtocolError("invalid_message", "refresh needs 'token' (a JWT)")
        return Refresh(token)
    if kind not in ("subscribe", "unsubscribe"):
        raise ProtocolError("unknown_type", "unknown message type; expected subscribe, unsubscribe, refresh or ping")
    stream = _stream(message, kind)
    if kind == "unsubscribe":
        return Unsubscribe(stream)
    return Subscribe(stream, _event_id(message.get("afterEventId"), stream))


def _stream(message: dict[str, Any], kind: str) -> str:
    """`stream` ("<kind>/<id>"), or `jobId` as shorthand for "optimizations/<jobId>"."""
    name = message.get("stream")
    job_id = message.get("jobId")
    if name is None and job_id is None:
        raise ProtocolError("invalid_message", f"{kind} needs 'stream' (or 'jobId')")
    if name is None:
        if not isinstance(job_id, str):
            raise ProtocolError("invalid_stream", "'jobId' must be a string")
        name = f"{JOB_KIND}/{job_id}"
    try:
        stream = parse_stream_name(name)
    except StreamNameError as exc:
        raise ProtocolError("invalid_stream", exc.message) from None
    if job_id is not None and stream != f"{JOB_KIND}/{job_id}":
        raise ProtocolError("invalid_message", "'stream' and 'jobId' name different streams")
    return stream


def _event_id(value: object, stream: str) -> str | None:
    """`afterEventId` as the hub's string id: integers as their decimal text, strings verbatim.

    Anything that cannot be an event id (`streams.is_event_id`: visible ASCII, at most 128
    characters) is refused here, where it enters, with an error frame.
    """
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ProtocolError("invalid_message", "'afterEventId' must not be negative", stream)
        text = str(value)
        if is_event_id(text):
            return text
    elif isinstance(value, str) and is_event_id(value):
        return value
    raise ProtocolError("invalid_message", "'afterEventId' must be an integer or an id of at most 128 visible "
                        "ASCII characters", stream)


# -- server messages ------------------------------------------------------------------------------


def _dumps(body: dict[str, Any]) -> str:
    return json.dumps(body, separators=(",", ":"))


def _stream_fields(stream: str | None) -> dict[str, Any]:
    """`stream`, plus `jobId` for jobs so clients written against the upstream protocol find it."""
    if stream is None:
        return {}
    kind, _, resource_id = stream.partition("/")
    return {"stream": stream, "jobId": resource_id} if kind == JOB_KIND else {"stream": stream}


def subscribed(stream: str) -> str:
    return _dumps({"type": "subscribed", **_stream_fields(stream)})


def unsubscribed(stream: str) -> str:
    return _dumps({"type": "unsubscribed", **_stream_fields(stream)})


def pong() -> str:
    return '{"type":"pong"}'


def refreshed(exp: float) -> str:
    return _dumps({"type": "refreshed", "exp": int(exp)})


def error(code: str, message: str, stream: str | None = None, **details: object) -> str:
    """`{"type":"error","stream"?,"error":{"code","message",...details}}`; None details are left out."""
    body: dict[str, Any] = {"code": code, "message": message}
    body.update({k: v for k, v in details.items() if v is not None})
    return _dumps({"type": "error", **_stream_fields(stream), "error": body})
