"""Admission of a browser stream: origin, token, authorization, resource name and limits.

Both transports (SSE and WebSocket) and the polling endpoints go through here, so a
request is refused the same way whichever door it knocks on, and always before
anything is opened upstream.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gateway.auth.address import ClientAddress
from gateway.auth.authz import Authorizer
from gateway.auth.tokens import Authenticator, Principal
from gateway.codec.streams import StreamNameError, resource_key
from gateway.config import ServerConfig
from gateway.errors import AuthError, GatewayError, NotFound
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


def header_map(scope: Scope) -> dict[str, str]:
    """Request headers as a dict (first value wins), names lower-case."""
    headers: dict[str, str] = {}
    for name, value in scope.get("headers", ()):
        headers.setdefault(name.decode("latin-1"), value.decode("latin-1"))
    return headers


def own_origin(scope: Scope, headers: Mapping[str, str]) -> str:
    scheme = scope.get("scheme", "http")
    scheme = {"ws": "http", "wss": "https"}.get(scheme, scheme)
    return f"{scheme}://{headers.get('host', '')}"


@dataclass(slots=True)
class Admitted:
    principal: Principal
    resource: str | None
    client_ip: str
    origin: str | None
    cookie_auth: bool


class Admission:
    """Runs the checks every stream and poll request must pass."""

    def __init__(self, server: ServerConfig, authenticator: Authenticator, authorizer: Authorizer,
                 metrics: Metrics) -> None:
        self.server = server
        self.authenticator = authenticator
        self.authorizer = authorizer
        self.metrics = metrics
        self.addresses = ClientAddress(server.trusted_proxies)
        self._allowed = frozenset(server.allowed_origins)

    def origin_allowed(self, origin: str | None, scope: Scope, headers: Mapping[str, str]) -> bool:
        if origin is None:
            return True
        return origin == own_origin(scope, headers) or origin in self._allowed or "*" in self._allowed

    def cors_headers(self, origin: str | None, scope: Scope, headers: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
        """CORS headers for a cross-origin browser that is on the allowlist (credentials included)."""
        if origin is None or origin == own_origin(scope, headers):
            return []
        if origin in self._allowed or "*" in self._allowed:
            return [(b"access-control-allow-origin", origin.encode("latin-1")),
                    (b"access-control-allow-credentials", b"true"), (b"vary", b"Origin")]
        return []

    async def admit(self, scope: Scope, headers: Mapping[str, str], resource: str | None,
                    websocket: bool = False) -> Admitted:
        """Authenticate and authorize; raises GatewayError (401/403) with a short reason."""
        try:
            origin = headers.get("origin")
            token, cookie_auth = self._token(scope, headers, websocket)
            if (websocket or cookie_auth) and not self.origin_allowed(origin, scope, headers):
                raise AuthError("origin is not allowed", status=403, code="origin_not_allowed",
                                reason="origin_not_allowed")
            principal = await self.authenticator.authenticate(token)
            if resource is not None:
                await self.authorizer.check(principal, resource)
        except AuthError as exc:
            self.metrics.auth_failures.labels(exc.reason).inc()
            raise
        client = scope.get("client") or ("unknown", 0)
        ip = self.addresses.resolve(str(client[0]), headers.get("x-forwarded-for"))
        return Admitted(principal, resource, ip, origin, cookie_auth)

    async def authorize(self, admitted: Admitted, resource: str) -> None:
        try:
            await self.authorizer.check(admitted.principal, resource)
        except AuthError as exc:
            self.metrics.auth_failures.labels(exc.reason).inc()
            raise

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
