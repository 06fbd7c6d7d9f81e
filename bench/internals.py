"""The bench's one door into gateway internals: token minting and the admission path.

Everything in bench/ that needs a gateway module in-process imports it from here (except
`bench.flushpass`, which drives the hub and the stream objects themselves), so when the
gateway's modules move, this file is the one to change.
"""

from __future__ import annotations

from typing import Any

import httpx

from gateway.auth.address import header_map
from gateway.auth.admission import Admission, Admitted, validate_resource
from gateway.auth.authz import Authorizer
from gateway.auth.tokens import Authenticator, mint_token
from gateway.config import parse_config
from gateway.hub.registry import Hub
from gateway.limits.connections import ConnectionLimiter
from gateway.limits.exclusive import ExclusiveStreams
from gateway.limits.quota import StreamQuota
from gateway.metrics import Metrics

__all__ = ["Admission", "Admitted", "Authenticator", "build_admission", "header_map", "mint_token",
           "validate_resource"]


def build_admission(jwt: dict[str, Any], client: httpx.AsyncClient) -> tuple[Admission, Authenticator]:
    """The gateway's `Admission` (and its `Authenticator`) for an `auth.jwt` section, built as the app builds them.

    Call it inside a running event loop; `client` fetches the JWKS (the caller closes it).
    """
    config = parse_config({"upstream": {"base_url": "http://127.0.0.1:9", "api_key": "bench"},
                           "auth": {"jwt": jwt}}, env={})
    authenticator = Authenticator(config.auth, client)
    metrics = Metrics()
    hub = Hub(config.limits, _NoFeeds(), metrics)
    admission = Admission(config.server, authenticator, Authorizer(config.auth, client), metrics, hub=hub,
                          limiter=ConnectionLimiter(config.server),
                          quota=StreamQuota(config.limits.max_streams_per_consumer),
                          exclusive=ExclusiveStreams(config.limits))
    return admission, authenticator


class _NoFeeds:
    """The admission micro-benchmark opens no stream: nothing is fed."""

    def attach(self, topic: Any) -> None:
        return None

    async def detach(self, topic: Any) -> None:
        return None
