"""Admission: the one path every stream, socket and poll goes through, before anything opens upstream.

`admit` authenticates a request (origin, token, client address). `connection` takes its
connection slot. `join` authorizes one stream and subscribes it to the hub, and
`StreamHold.claim` then takes the stream's per-user slot and the one-stream claim. Each
hold releases what it took exactly once, on every exit path (`release` is idempotent), so
SSE and WebSocket refuse, count and release the same way whichever door a browser knocks on.
Refusals are `GatewayError`s, counted here once (auth failures by reason, limits by limit).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gateway.auth.address import ClientAddress
from gateway.auth.authz import Authorizer
from gateway.auth.tokens import Authenticator, Principal
from gateway.codec.streams import StreamNameError, resource_key
from gateway.config import ServerConfig
from gateway.errors import AuthError, GatewayError, LimitError, NotFound
from gateway.hub.ports import StreamUnavailable
from gateway.hub.registry import Hub
from gateway.hub.subscription import Subscription
from gateway.limits.connections import ConnectionLimiter
from gateway.limits.exclusive import ExclusiveStreams
from gateway.limits.quota import StreamQuota
from gateway.metrics import Metrics
from gateway.types import Scope


def validate_resource(kind: str, resource_id: str) -> str:
    """`<kind>/<id>` for a well-formed id (404 for an unknown kind, 400 for a malformed id)."""
    try:
        return resource_key(kind, resource_id)
    except StreamNameError as exc:
        if exc.unknown_kind:
            raise NotFound(exc.message) from None
        raise GatewayError(exc.message, status=400, code="invalid_id") from None


@dataclass(slots=True)
class Admitted:
    """An authenticated request: who, from where, and how it proved it."""

    principal: Principal
    client_ip: str
    origin: str | None
    cookie_auth: bool

    @property
    def consumer(self) -> str:
        return self.principal.consumer


class ConnectionHold:
    """One open connection counted towards `server.max_connections*`; released once."""

    __slots__ = ("_limiter", "consumer", "ip", "released")

    def __init__(self, limiter: ConnectionLimiter, consumer: str, ip: str) -> None:
        self._limiter = limiter
        self.consumer = consumer
        self.ip = ip
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._limiter.release(self.consumer, self.ip)


class StreamHold:
    """One admitted stream: its hub subscription and, once claimed, its per-user slot and one-stream claim."""

    __slots__ = ("_admission", "admitted", "claimed", "consumer", "released", "resource", "sub")

    def __init__(self, admission: Admission, admitted: Admitted, resource: str, sub: Subscription) -> None:
        self._admission = admission
        #: Whose stream this is (its principal changes when a WebSocket refreshes its token).
        self.admitted = admitted
        self.consumer = admitted.consumer
        self.resource = resource
        self.sub = sub
        self.claimed = False
        self.released = False

    async def claim(self) -> None:
        """Take the per-user stream slot and the one-stream claim (cluster-wide with Redis).

        Raises LimitError (counted); whatever happens, including cancellation, a failed claim
        leaves the hold released.
        """
        admission = self._admission
        try:
            admission.quota.acquire(self.consumer, self.resource)
        except LimitError as exc:
            self.release()
            admission.refused(exc)
            raise
        self.claimed = True
        try:
            await admission.exclusive.acquire(self.consumer, self.resource, self.sub)
        except BaseException as exc:
            if isinstance(exc, LimitError):
                admission.refused(exc)
            self.release()
            raise
        if not self.released:
            admission.holds.add(self)

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        admission = self._admission
        if self.claimed:
            admission.holds.discard(self)
            admission.exclusive.leave(self.consumer, self.resource, self.sub)
            admission.quota.release(self.consumer, self.resource)
        admission.hub.unsubscribe(self.sub)


class Admission:
    """Runs the checks every stream, socket and poll must pass, and takes and releases what they hold."""

    def __init__(self, server: ServerConfig, authenticator: Authenticator, authorizer: Authorizer,
                 metrics: Metrics, *, hub: Hub, limiter: ConnectionLimiter, quota: StreamQuota,
                 exclusive: ExclusiveStreams) -> None:
        self.server = server
        self.authenticator = authenticator
        self.authorizer = authorizer
        self.metrics = metrics
        self.hub = hub
        self.limiter = limiter
        self.quota = quota
        self.exclusive = exclusive
        self.addresses = ClientAddress(server.trusted_proxies)
        self._allowed = frozenset(server.allowed_origins)
        #: Every claimed stream, for the periodic re-check of webhook decisions (`auth.recheck`).
        self.holds: set[StreamHold] = set()

    def origin_allowed(self, origin: str | None, scope: Scope, headers: Mapping[str, str]) -> bool:
        if origin is None:
            return True
        return origin == self.addresses.own_origin(scope, headers) or origin in self._allowed

    def cors_headers(self, origin: str | None, scope: Scope, headers: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
        """CORS headers for a cross-origin browser that is on the allowlist (credentials included)."""
        if origin is None or origin == self.addresses.own_origin(scope, headers):
            return []
        if origin in self._allowed:
            return [(b"access-control-allow-origin", origin.encode("latin-1")),
                    (b"access-control-allow-credentials", b"true"), (b"vary", b"Origin")]
        return []

    async def admit(self, scope: Scope, headers: Mapping[str, str], *, websocket: bool = False) -> Admitted:
        """Authenticate (origin, token); raises AuthError (401/403) with a short reason."""
        try:
            origin = headers.get("origin")
            token, cookie_auth = self._token(scope, headers, websocket)
            if (websocket or cookie_auth) and not self.origin_allowed(origin, scope, headers):
                raise AuthError("origin is not allowed", status=403, code="origin_not_allowed",
                                reason="origin_not_allowed")
            principal = await self.authenticator.authenticate(token)
        except AuthError as exc:
            self.metrics.auth_failures.labels(exc.reason).inc()
            raise
        client = scope.get("client") or ("unknown", 0)
        ip = self.addresses.resolve(str(client[0]), headers.get("x-forwarded-for"))
        return Admitted(principal, ip, origin, cookie_auth)

    async def authorize(self, admitted: Admitted, resource: str) -> None:
        """May this principal watch (or poll) `resource`? AuthError (403) if not."""
        try:
            await self.authorizer.check(admitted.principal, resource)
        except AuthError as exc:
            self.metrics.auth_failures.labels(exc.reason).inc()
            raise

    def refused(self, exc: LimitError) -> None:
        """Count a refusal by a limit (once, whichever transport)."""
        self.metrics.limit_rejections.labels(exc.reason).inc()

    def connection(self, admitted: Admitted) -> ConnectionHold:
        """Count one open connection towards the caps; LimitError (429/503) when one is full."""
        try:
            self.limiter.acquire(admitted.consumer, admitted.client_ip)
        except LimitError as exc:
            self.refused(exc)
            raise
        return ConnectionHold(self.limiter, admitted.consumer, admitted.client_ip)

    async def join(self, admitted: Admitted, resource: str, after_id: str | None) -> StreamHold:
        """Authorize `resource` and subscribe to it: AuthError (403), LimitError (409/429/503).

        Nothing is claimed yet (see `StreamHold.claim`), so a join that turns out to need no
        stream (a resume after the stream's end) supersedes nobody; release it either way.
        """
        await self.authorize(admitted, resource)
        consumer = admitted.consumer
        try:
            self.exclusive.check(consumer, resource)
            self.quota.check(consumer, resource)
            try:
                sub = self.hub.subscribe(resource, after_id, consumer)
            except StreamUnavailable as exc:
                raise LimitError(str(exc), status=503, code="over_capacity", retry_after=5,
                                 reason="max_streams") from None
        except LimitError as exc:
            self.refused(exc)
            raise
        return StreamHold(self, admitted, resource, sub)

    async def refresh(self, admitted: Admitted, token: str) -> Principal:
        """A fresh token for an open connection: valid and for the same consumer, or AuthError (counted).

        On success `admitted` carries the new principal (its expiry and its grants).
        """
        try:
            principal = await self.authenticator.authenticate(token)
            if principal.consumer != admitted.consumer:
                raise AuthError("the token is for another user", status=403, code="refresh_refused",
                                reason="refresh_other_consumer")
        except AuthError as exc:
            self.metrics.auth_failures.labels(exc.reason).inc()
            raise
        admitted.principal = principal
        return principal

    def _token(self, scope: Scope, headers: Mapping[str, str], websocket: bool) -> tuple[str, bool]:
        if websocket and "authorization" not in headers:
            for proto in headers.get("sec-websocket-protocol", "").split(","):
                proto = proto.strip()
                if proto.startswith("bearer."):
                    return proto[len("bearer."):], False
        token = self.authenticator.extract(headers, scope.get("query_string", b""))
        cookie_auth = "authorization" not in headers and _has_cookie(headers, self.authenticator.config.cookie)
        return token, cookie_auth


def _has_cookie(headers: Mapping[str, str], name: str | None) -> bool:
    return bool(name) and f"{name}=" in headers.get("cookie", "")
