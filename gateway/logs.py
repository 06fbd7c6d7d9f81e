"""Structured JSON logs with a request id on every line, and a last-line scrubber for secrets.

Handlers never receive tokens by design (we log ids and codes, not requests); the
`Redactor` filter is the safety net that replaces any configured secret that still
slips into a message with `[redacted]`.
"""

from __future__ import annotations

import contextvars
import json
import logging
import secrets
import sys
import time
from collections.abc import Iterable
from typing import Any

from gateway.types import ASGIApp, Message, Receive, Scope, Send

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

_STANDARD = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


def new_request_id() -> str:
    return secrets.token_hex(8)


class RequestIdMiddleware:
    """Gives every HTTP request and WebSocket its own request id for its log lines, echoed as X-Request-ID.

    The id is always generated here: an incoming header is not trusted (it could carry anything,
    a token included, into the logs).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        rid = new_request_id()
        token = request_id.set(rid)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id.reset(token)


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id and any `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "request_id": getattr(record, "request_id", None) or request_id.get(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key != "request_id" and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, separators=(",", ":"))


class Redactor(logging.Filter):
    """Replaces configured secrets in the final message text (defence in depth)."""

    def __init__(self, secrets_: Iterable[str]) -> None:
        super().__init__()
        self.secrets = tuple(s for s in secrets_ if len(s) >= 4)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        message = record.getMessage()
        if any(s in message for s in self.secrets):
            for s in self.secrets:
                message = message.replace(s, "[redacted]")
            record.msg, record.args = message, None
        return True


class RefusedUpgradeFilter(logging.Filter):
    """Drops uvicorn's false alarm when the gateway refuses a WebSocket upgrade with an HTTP response.

    uvicorn (websockets-sansio) logs "ASGI callable returned without completing handshake" at
    ERROR even though the client got the intended 401/403; alerting on it would page on every
    rejected token.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "without completing handshake" not in record.getMessage()


def configure_logging(level: str, secrets_: Iterable[str] = (), stream: Any = None) -> None:
    """Route every gateway (and uvicorn error) log line through the JSON formatter."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JSONFormatter())
    handler.addFilter(Redactor(secrets_))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers = []
        logger.propagate = True
    logging.getLogger("uvicorn.access").disabled = True
    logging.getLogger("uvicorn.error").addFilter(RefusedUpgradeFilter())
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
