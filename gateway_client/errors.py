"""What the client raises: one small hierarchy, so callers can tell "stop" from "fix the token".

A refused request keeps the gateway's own `{"error": {"code", "message"}}`; a stream the
gateway ended keeps every field of its `gateway.close` frame, including the resume point.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping


class GatewayClientError(Exception):
    """Base class of every error this package raises."""


class GatewayResponseError(GatewayClientError):
    """The gateway answered a request with an error status instead of a stream or a result."""

    def __init__(self, status: int, code: str | None, message: str, retry_after: float | None = None,
                 retryable: bool = False) -> None:
        super().__init__(f"{status} {code or 'error'}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.retryable = retryable


class AuthError(GatewayResponseError):
    """401 or 403: the token is missing, invalid or expired, or does not grant the resource."""


class ProtocolError(GatewayClientError):
    """The answer was not what a gateway sends (e.g. HTML from a proxy's login page)."""


class StreamClosed(GatewayClientError):
    """The gateway ended the stream with a code that says not to reconnect automatically.

    `poll` is set for `inactivity_timeout` on evaluations: the path to poll instead.
    """

    def __init__(self, code: str, message: str, last_event_id: str | None, detail: str | None = None,
                 poll: str | None = None, reconnect: bool = False) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.last_event_id = last_event_id
        self.detail = detail
        self.poll = poll
        self.reconnect = reconnect


class RetriesExhausted(GatewayClientError):
    """Reconnecting kept failing for longer than the `Backoff` policy allows; `__cause__` is the last failure."""

    def __init__(self, attempts: int, last_event_id: str | None) -> None:
        super().__init__(f"gave up after {attempts} reconnect attempts (last event id {last_event_id!r})")
        self.attempts = attempts
        self.last_event_id = last_event_id


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a `Retry-After` header in seconds; HTTP-dates and junk count as absent."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def error_from_response(status: int, headers: Mapping[str, str], body: bytes) -> GatewayResponseError:
    """Translate an error answer; 429 and 5xx are marked retryable (the caller backs off)."""
    code: str | None = None
    message = ""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, dict):
        code = error["code"] if isinstance(error.get("code"), str) else None
        message = error["message"] if isinstance(error.get("message"), str) else ""
    message = message or f"HTTP {status}"
    retry_after = parse_retry_after(headers.get("retry-after"))
    cls = AuthError if status in (401, 403) else GatewayResponseError
    return cls(status, code, message, retry_after, retryable=status == 429 or status >= 500)
