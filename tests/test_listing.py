"""`GET /api/v1/evaluations` and `/api/v1/optimizations`: authenticated, forwarded, filtered per token."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.auth.authz import Authorizer
from gateway.auth.tokens import Principal
from gateway.config import AuthConfig
from gateway.transports.listing import Listings
from tests.conftest import API_KEY, SECRET, Gateway, Sim
from tests.servers import serve


async def test_listings_need_a_token_and_show_only_what_the_token_may_open(sim: Sim, gateway: Gateway) -> None:
    async with httpx.AsyncClient() as client:
        for kind in ("evaluations", "optimizations"):
            refused = await client.get(f"{gateway.url}/api/v1/{kind}")
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "missing_token"
        everything = await client.get(f"{gateway.url}/api/v1/evaluations", headers=gateway.headers())
        assert everything.status_code == 200
        assert [item["id"] for item in everything.json()] == ["eval-demo-1", "eval-demo-2", "eval-fail-1"]
        jobs = await client.get(f"{gateway.url}/api/v1/optimizations", headers=gateway.headers())
        assert [item["id"] for item in jobs.json()] == ["job-demo-1", "job-demo-2"]
        narrow = gateway.headers("erin", streams=["evaluations/eval-demo-*"])
        some = await client.get(f"{gateway.url}/api/v1/evaluations", headers=narrow)
        assert [item["id"] for item in some.json()] == ["eval-demo-1", "eval-demo-2"]
        none = await client.get(f"{gateway.url}/api/v1/optimizations", headers=narrow)
        assert none.status_code == 200 and none.json() == []
        for response in (everything, jobs, some, none):
            assert API_KEY not in response.text and API_KEY not in str(response.headers)
            assert response.headers["cache-control"] == "no-store"


async def test_listing_shapes_are_filtered_or_refused() -> None:
    listings = Listings(admission=None, authorizer=Authorizer(AuthConfig(jwt={"secret": SECRET})), poller=None)  # type: ignore[arg-type]
    principal = Principal("u", {}, 0.0, ("evaluations/a-*",))
    items = [{"id": "a-1"}, {"id": "b-1"}, {"id": "a-../x"}, {"id": "a-2", "status": "success"}, "junk", {"no": 1}]
    assert await listings._visible("evaluations", items, principal) == [{"id": "a-1"},
                                                                        {"id": "a-2", "status": "success"}]
    wrapped = {"evaluations": items, "total": 6}
    assert await listings._visible("evaluations", wrapped, principal) == {
        "evaluations": [{"id": "a-1"}, {"id": "a-2", "status": "success"}], "total": 6}
    assert await listings._visible("evaluations", {"data": [{"id": "b-2"}]}, principal) == {"data": []}
    with pytest.raises(ValueError):
        await listings._visible("evaluations", {"something": "else"}, principal)


async def test_listing_asks_the_authorization_webhook_for_what_the_claim_does_not_grant(
        sim: Sim, gateway_factory: Any) -> None:
    asked: list[str] = []

    async def decide(request: Request) -> Response:
        resource = (await request.json())["resource"]
        asked.append(resource)
        return JSONResponse({"allow": resource.endswith("-1")})

    async with serve(Starlette(routes=[Route("/decide", decide, methods=["POST"])])) as hook:
        gateway: Gateway = await gateway_factory(auth={"authorize_url": f"{hook}/decide"})
        headers = gateway.headers("frank", streams=["evaluations/eval-demo-2"])
        async with httpx.AsyncClient() as client:
            listed = await client.get(f"{gateway.url}/api/v1/evaluations", headers=headers)
    assert [item["id"] for item in listed.json()] == ["eval-demo-1", "eval-demo-2", "eval-fail-1"]
    assert sorted(asked) == ["evaluations/eval-demo-1", "evaluations/eval-fail-1"]  # the claim covered the other
