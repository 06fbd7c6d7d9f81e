"""The gateway's error hierarchy, translated to HTTP at the boundary.

Every refusal is a `GatewayError` with a status, a stable machine code and a short
message; `respond` turns it into `{"error": {"code", "message"}}`. Messages are written
by us and never echo tokens, keys or request input.
"""

from __future__ import annotations

import json

from gateway.types import Send


class GatewayError(Exception):
    """A refusal a browser can act on."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 retry_after: float | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        self.retry_after = retry_after
        #: Low-cardinality label for metrics (defaults to the code).
        self.reason = reason or self.code

    def body(self) -> bytes:
        return json.dumps({"error": {"code": self.code, "message": self.message}},
                          separators=(",", ":")).encode()

    def headers(self) -> list[tuple[bytes, bytes]]:
        headers = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]
        if self.retry_after is not None:
            headers.append((b"retry-after", str(max(1, round(self.retry_after))).encode()))
        if self.status == 401:
            headers.append((b"www-authenticate", b'Bearer realm="gateway"'))
        return headers


class AuthError(GatewayError):
    """Missing or invalid credentials (401) or a resource the consumer may not open (403)."""

    status = 401
    code = "unauthorized"


class LimitError(GatewayError):
    """A connection cap or the one-stream-per-consumer policy refused the request."""

    status = 429
    code = "too_many_connections"


class NotFound(GatewayError):
    status = 404
    code = "not_found"


async def respond(send: Send, error: GatewayError, extra_headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """Send `error` as a complete JSON response on a raw ASGI channel."""
    body = error.body()
    headers = error.headers() + (extra_headers or [])
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
