"""`GET /api/v1/evaluations` and `GET /api/v1/optimizations`: the upstream's listings, for browsers.

Authenticated like polling and forwarded with the API key through the poller (so many
browsers cost one upstream request per `limits.poll_cache_ttl`). Each browser sees only
the items it may open: those its streams claim grants or, with `auth.authorize_url`, the
webhook allows (at most `MAX_ITEMS`, decisions cached as for streams). Items whose id the
gateway would refuse to stream are left out, and a listing the gateway cannot read is not
passed on (it might name resources the caller may not see).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from gateway.auth.address import header_map
from gateway.auth.admission import Admission, validate_resource
from gateway.auth.authz import Authorizer
from gateway.auth.tokens import Principal
from gateway.codec.streams import LISTABLE_KINDS
from gateway.errors import AuthError, GatewayError
from gateway.upstream.polling import Poller

#: Most items one listing returns.
MAX_ITEMS = 500
#: Most items of one listing that the authorization webhook is asked about (the token's streams claim
#: decides the others for free); items past it that only the webhook could grant are left out.
MAX_WEBHOOK_CHECKS = 20
_WRAPPER_KEYS = ("items", "data", "results")


class Listings:
    """The listing endpoints; one instance per app."""

    def __init__(self, admission: Admission, authorizer: Authorizer, poller: Poller) -> None:
        self.admission = admission
        self.authorizer = authorizer
        self.poller = poller

    async def endpoint(self, request: Request) -> Response:
        kind = request.url.path.rstrip("/").rsplit("/", 1)[-1]
        headers = header_map(request.scope)
        cors = self.admission.cors_headers(headers.get("origin"), request.scope, headers)
        try:
            if kind not in LISTABLE_KINDS:
                raise GatewayError("not found", status=404, code="not_found")
            admitted = await self.admission.admit(request.scope, headers)
        except GatewayError as exc:
            return _response(exc.status, exc.body(), exc.headers() + cors)
        result = await self.poller.get(kind)
        extra: list[tuple[bytes, bytes]] = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]
        if result.retry_after is not None:
            extra.append((b"retry-after", str(max(1, round(result.retry_after))).encode()))
        if result.status != 200:
            return _response(result.status, result.body, extra + cors)
        try:
            body = await self._visible(kind, json.loads(result.body), admitted.principal)
        except ValueError:
            error = GatewayError("upstream listing was not understood", status=502, code="upstream_error")
            return _response(502, error.body(), error.headers() + cors)
        return _response(200, json.dumps(body, separators=(",", ":")).encode(), extra + cors)

    async def _visible(self, kind: str, listing: Any, principal: Principal) -> Any:
        """The listing with only the items `principal` may open (same shape as upstream's)."""
        if isinstance(listing, list):
            return await self._filter(kind, listing, principal)
        if isinstance(listing, dict):
            for key in (kind, *_WRAPPER_KEYS):
                if isinstance(listing.get(key), list):
                    return {**listing, key: await self._filter(kind, listing[key], principal)}
        raise ValueError("unrecognised listing")

    async def _filter(self, kind: str, items: list[Any], principal: Principal) -> list[Any]:
        candidates: list[tuple[dict[str, Any], str]] = []
        for item in items[:MAX_ITEMS]:
            if not isinstance(item, dict) or not isinstance(item.get("id"), str | int):
                continue
            try:
                candidates.append((item, validate_resource(kind, str(item["id"]))))
            except GatewayError:
                continue
        granted = [self.authorizer.granted_by_claim(principal, resource) for _, resource in candidates]
        asked = [resource for (_, resource), ok in zip(candidates, granted, strict=True) if not ok]
        asked = asked[:MAX_WEBHOOK_CHECKS]
        answers = dict(zip(asked, await asyncio.gather(*(self._allowed(principal, r) for r in asked)), strict=True))
        return [item for (item, resource), ok in zip(candidates, granted, strict=True)
                if ok or answers.get(resource, False)]

    async def _allowed(self, principal: Principal, resource: str) -> bool:
        try:
            await self.authorizer.check(principal, resource)
        except AuthError:
            return False
        return True


def _response(status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> Response:
    return Response(body, status_code=status,
                    headers={k.decode("latin-1"): v.decode("latin-1") for k, v in headers})
