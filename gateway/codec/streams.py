"""The stream vocabulary: kinds, event names, stream names and event ids (pure, no I/O).

Everything that names a stream or an event id from outside (a URL path, a WebSocket
message, a `Last-Event-ID` header, an upstream frame) is checked here, once, where it
enters; the rest of the gateway can then compare ids without surprises. In particular a
"decimal" id is ASCII digits only: `'²'.isdigit()` is true in Python and `int('²')` raises.
"""

from __future__ import annotations

import re

#: Stream kinds a browser may open, as they appear in paths and in `<kind>/<id>` names.
KINDS = ("evaluations", "trace-evaluations", "optimizations")
#: The kind fed by the upstream's job WebSocket (all other kinds are SSE streams upstream).
JOB_KIND = "optimizations"
#: Kinds with a polling endpoint (`GET /api/v1/<kind>/<id>`): the job API is not proxied.
POLLABLE_KINDS = ("evaluations", "trace-evaluations")
#: Kinds with a listing endpoint (`GET /api/v1/<kind>`).
LISTABLE_KINDS = ("evaluations", "optimizations")
#: Upstream event names that end a stream.
TERMINAL_EVENTS = frozenset({"final", "error", "job_complete", "job_failed", "job_cancelled"})
#: A job waiting on a person: it does not count towards the inactivity limit until resumed.
PAUSE_EVENT = "job_paused"
RESUME_EVENT = "job_resumed"

MAX_EVENT_ID_LENGTH = 128
"""Longest event id accepted from a browser (the upstream's are small integers)."""
MAX_DECIMAL_DIGITS = 18
"""Longer digit strings are compared as opaque ids (no arbitrary-size integers from a client)."""

#: Resource ids: no '/', no control characters, bounded length.
_RESOURCE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
#: Event ids: visible ASCII (what an `id:` line, a JSON string and a Redis field all carry safely).
_EVENT_ID = re.compile(rf"[\x21-\x7e]{{1,{MAX_EVENT_ID_LENGTH}}}")

UNKNOWN_ID = "\x00"
"""What a malformed resume id becomes: never a valid id, so the hub treats it as unknown
(`continuity_lost`, history from the start) and never waits for it to arrive."""


class StreamNameError(ValueError):
    """A stream name or resource id that the gateway refuses (`unknown_kind`: 404 rather than 400)."""

    def __init__(self, message: str, unknown_kind: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.unknown_kind = unknown_kind


def resource_key(kind: str, resource_id: str) -> str:
    """`<kind>/<id>` for a known kind and a well-formed id; StreamNameError otherwise."""
    if kind not in KINDS:
        raise StreamNameError(f"unknown stream kind {kind[:32]!r}", unknown_kind=True)
    if not _RESOURCE_ID.fullmatch(resource_id) or ".." in resource_id:
        raise StreamNameError("invalid resource id")
    return f"{kind}/{resource_id}"


def parse_stream_name(name: object) -> str:
    """Validate a `<kind>/<id>` stream name from a client message."""
    if not isinstance(name, str) or "/" not in name:
        raise StreamNameError("stream must be '<kind>/<id>'")
    kind, _, resource_id = name.partition("/")
    return resource_key(kind, resource_id)


def split_key(key: str) -> tuple[str, str]:
    """(kind, resource id) of a validated `<kind>/<id>` key."""
    kind, _, resource_id = key.partition("/")
    return kind, resource_id


def is_event_id(value: str) -> bool:
    """Whether `value` is an id the gateway can resume from: visible ASCII, at most 128 characters."""
    return _EVENT_ID.fullmatch(value) is not None


def is_decimal(value: str) -> bool:
    """ASCII digits only (and not too many): the ids that compare by value."""
    return 0 < len(value) <= MAX_DECIMAL_DIGITS and value.isascii() and value.isdigit()


def resume_id(raw: str | None) -> str | None:
    """A client's resume position as the hub takes it: None (from the start), an id, or `UNKNOWN_ID`."""
    if raw is None or raw == "":
        return None
    return raw if is_event_id(raw) else UNKNOWN_ID


def id_value(event_id: str | None) -> int | str | None:
    """Ids travel in JSON as numbers when they are canonical integers, as the upstream sends them."""
    if event_id is not None and is_decimal(event_id) and (event_id == "0" or event_id[0] != "0"):
        return int(event_id)
    return event_id
