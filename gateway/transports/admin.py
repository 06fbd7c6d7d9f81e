"""The operators' API under `/admin`: see the streams this gateway serves, and end one.

Off unless `admin.api_key` is set (then every `/admin` path is a plain 404). Each request
must carry `Authorization: Bearer <admin.api_key>`, compared in constant time; anything else
(no header, another key, a browser's session token) is a 401 counted as
`gateway_auth_failures_total{reason="admin_unauthorized"}`, before any path is looked at.
Answers are JSON with `Cache-Control: no-store` and never carry CORS headers: no web page
may call this API from a browser.

    GET    /admin/streams                 every stream of this gateway (of this replica, with Redis)
    GET    /admin/streams/{kind}/{id}     one stream
    DELETE /admin/streams/{kind}/{id}     end it for every subscriber (`terminated`) and stop its upstream feed
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Callable
from typing import Any

from gateway.auth.address import header_map
from gateway.auth.admission import validate_resource
from gateway.errors import AuthError, GatewayError, NotFound, respond
from gateway.hub.registry import Hub
from gateway.hub.topic import Topic
from gateway.logs import new_request_id, request_id
from gateway.metrics import Metrics
from gateway.types import Receive, Scope, Send

log = logging.getLogger("gateway.admin")

PREFIX = "/admin"
#: Streams described at once while listing (with Redis, each may ask who holds its lease).
DESCRIBE_CONCURRENCY = 32
_TRANSPORTS = ("sse", "ws")


class AdminApi:
    """`/admin/*` for operators, as one raw ASGI handler: authentication first, then the path."""

    def __init__(self, api_key: str, hub: Hub, metrics: Metrics, clock: Callable[[], float]) -> None:
        self._key = api_key.encode()
        self.hub = hub
        self.metrics = metrics
        self.clock = clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        rid = new_request_id()
        token = request_id.set(rid)
        extra = [(b"x-request-id", rid.encode())]
        try:
            status, body = await self._handle(scope)
        except GatewayError as exc:
            await respond(send, exc, extra)
            return
        except Exception:
            log.exception("admin request failed")
            await respond(send, GatewayError("internal error", status=500, code="internal_error"), extra)
            return
        finally:
            request_id.reset(token)
        data = json.dumps(body, separators=(",", ":")).encode()
        headers = [(b"content-type", b"application/json"), (b"cache-control", b"no-store"),
                   (b"content-length", str(len(data)).encode()), *extra]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})

    async def _handle(self, scope: Scope) -> tuple[int, dict[str, Any]]:
        self._authenticate(scope)
        method = scope["method"]
        parts = scope["path"][len(PREFIX):].strip("/").split("/")
        if parts == ["streams"]:
            _allow(method, "GET")
            return 200, {"streams": await self._describe_all()}
        if len(parts) != 3 or parts[0] != "streams":
            raise NotFound("no such admin endpoint")
        _allow(method, "GET", "DELETE")
        key = validate_resource(parts[1], parts[2])
        topic = self.hub.topics.get(key)
        if topic is None:
            raise NotFound("no such stream on this gateway")
        if method == "GET":
            return 200, await self._describe(topic)
        told = self.hub.terminate(key) or 0
        log.info("admin stream terminated", extra={"stream_kind": topic.kind, "subscribers": told})
        return 200, {"stream": key, "terminated": True, "subscribers": told}

    def _authenticate(self, scope: Scope) -> None:
        scheme, _, credentials = header_map(scope).get("authorization", "").partition(" ")
        given = credentials.strip().encode("latin-1")
        # compare_digest takes as long whatever the bytes given; only the key's length is not secret.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, self._key):
            self.metrics.auth_failures.labels("admin_unauthorized").inc()
            log.warning("admin request refused", extra={"reason": "admin_unauthorized"})
            raise AuthError("an admin key is required (Authorization: Bearer <admin.api_key>)",
                            code="unauthorized", reason="admin_unauthorized")

    async def _describe_all(self) -> list[dict[str, Any]]:
        topics = sorted(self.hub.topics.values(), key=lambda topic: topic.key)
        gate = asyncio.Semaphore(DESCRIBE_CONCURRENCY)

        async def one(topic: Topic) -> dict[str, Any]:
            async with gate:
                return await self._describe(topic)

        return list(await asyncio.gather(*(one(topic) for topic in topics)))

    async def _describe(self, topic: Topic) -> dict[str, Any]:
        """One stream: subscribers per transport, upstream state, last event id and its age."""
        subscribers = dict.fromkeys(_TRANSPORTS, 0)
        for sub in topic.subscribers:
            if sub.transport in subscribers and not sub.closed:
                subscribers[sub.transport] += 1
        upstream = await self.hub.broker.describe(topic)
        if topic.ended:
            upstream["state"] = "ended"
        last_id = topic.last_id
        age = round(max(0.0, self.clock() - topic.last_event_at), 3) if last_id is not None else None
        return {
            "stream": topic.key, "kind": topic.kind, "id": topic.resource_id,
            "subscribers": subscribers,
            "upstream": upstream,
            "last_event_id": last_id,
            "last_event_age_seconds": age,
            "events_retained": topic.head - topic.base,
            "paused": topic.paused,
            "ended": topic.ended,
            "end_code": topic.end_reason.code if topic.end_reason is not None else None,
        }


def _allow(method: str, *allowed: str) -> None:
    if method not in allowed:
        raise GatewayError(f"use {' or '.join(allowed)}", status=405, code="method_not_allowed")
