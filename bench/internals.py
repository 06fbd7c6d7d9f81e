"""The bench's one door into gateway internals: token minting and the admission path.

Everything in bench/ that needs a gateway module in-process imports it from here (except
`bench.flushpass`, which drives the hub and the stream objects themselves), so when the
gateway's modules move, this file is the one to change.
"""

from __future__ import annotations

from typing import Any

import httpx

from gateway.admission import Admission, Admitted, header_map, validate_resource
from gateway.auth import Authenticator, mint_token
from gateway.authz import Authorizer
from gateway.config import parse_config
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
    admission = Admission(config.server, authenticator, Authorizer(config.auth, client), Metrics())
    return admission, authenticator
