"""The catalogue of closes the gateway initiates, each with a stable code browsers can act on.

On SSE a close is a final `event: gateway.close` frame whose data is
`{"code", "reconnect", "message", ...}`; on WebSocket the same code is sent in an
`error` message (one subscription) or as the socket's close code (the whole socket).
WebSocket codes 4000-4099 mean "reconnect and resume"; 4100-4199 mean "do not
reconnect automatically". The event names never collide with the upstream's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

CLOSE_EVENT = "gateway.close"
CONTINUITY_LOST_EVENT = "gateway.continuity_lost"


@dataclass(frozen=True, slots=True)
class CloseReason:
    """A documented reason for ending a stream."""

    code: str
    ws_code: int
    reconnect: bool
    message: str

    def payload(self, **extra: object) -> str:
        body: dict[str, object] = {"code": self.code, "reconnect": self.reconnect, "message": self.message}
        body.update({k: v for k, v in extra.items() if v is not None})
        return json.dumps(body, separators=(",", ":"))


SHUTTING_DOWN = CloseReason("shutting_down", 4000, True, "gateway is restarting; reconnect with Last-Event-ID")
SLOW_CONSUMER = CloseReason("slow_consumer", 4001, True, "client fell too far behind; reconnect with Last-Event-ID")
TOKEN_EXPIRED = CloseReason("token_expired", 4002, True, "session token expired; reconnect with a fresh token")
UPSTREAM_UNAVAILABLE = CloseReason("upstream_unavailable", 4003, True, "upstream is unavailable; retry later")
SUPERSEDED = CloseReason("superseded", 4100, False, "a newer stream for this resource replaced this one")
INACTIVITY_TIMEOUT = CloseReason(
    "inactivity_timeout", 4101, False, "no events for too long; poll the resource instead of streaming"
)
UPSTREAM_FAILED = CloseReason("upstream_failed", 4102, False, "upstream refused the stream")
POLICY_VIOLATION = CloseReason("policy_violation", 4103, False, "too many invalid or excessive client messages")
ACCESS_REVOKED = CloseReason("access_revoked", 4104, False, "access to this stream was revoked")
TERMINATED = CloseReason("terminated", 4105, False, "an operator ended this stream")
FORBIDDEN = CloseReason("forbidden", 4403, False, "the refreshed token does not grant this stream")
UNAUTHORIZED = CloseReason("unauthorized", 4401, False, "authentication failed")

CATALOGUE: tuple[CloseReason, ...] = (
    SHUTTING_DOWN,
    SLOW_CONSUMER,
    TOKEN_EXPIRED,
    UPSTREAM_UNAVAILABLE,
    SUPERSEDED,
    INACTIVITY_TIMEOUT,
    UPSTREAM_FAILED,
    POLICY_VIOLATION,
    ACCESS_REVOKED,
    TERMINATED,
    FORBIDDEN,
    UNAUTHORIZED,
)
