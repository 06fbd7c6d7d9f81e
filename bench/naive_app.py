"""The naive Python design, as a yardstick: Starlette + uvicorn, one `asyncio.Queue` per subscriber.

What a first version of a fan-out service usually looks like: one upstream SSE reader per
evaluation (httpx) puts each event, encoded once, into every subscriber's queue; each
subscriber is a `StreamingResponse` over an async generator that awaits its queue. The
queues are unbounded (the design's flaw; the benchmark never lets them grow far). No
authentication: it only makes the comparison kinder to this design (tokens are checked
once per connection, not per delivery). Same server settings as the gateway (uvloop,
httptools, no access log).

`python -m bench.naive_app --port P --upstream http://127.0.0.1:U --api-key KEY`
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route


def create_app(upstream: str, api_key: str) -> Starlette:
    subscribers: dict[str, set[asyncio.Queue[bytes]]] = {}
    feeds: dict[str, asyncio.Task[None]] = {}
    client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0))

    async def feed(evaluation: str) -> None:
        url = f"{upstream}/api/v1/evaluations/{evaluation}/stream"
        async with client.stream("GET", url, headers={"X-API-Key": api_key, "Accept": "text/event-stream"}) as r:
            lines: list[str] = []
            async for line in r.aiter_lines():
                if line:
                    lines.append(line)
                    continue
                if any(x.startswith("data:") for x in lines):
                    frame = ("\n".join(lines) + "\n\n").encode()
                    for queue in subscribers.get(evaluation, ()):
                        queue.put_nowait(frame)
                lines = []

    async def stream(request: Request) -> StreamingResponse:
        evaluation = request.path_params["evaluation"]
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        subscribers.setdefault(evaluation, set()).add(queue)
        if evaluation not in feeds:
            feeds[evaluation] = asyncio.get_running_loop().create_task(feed(evaluation))

        async def events() -> AsyncIterator[bytes]:
            try:
                yield b"retry: 1000\n\n"
                while True:
                    yield await queue.get()
            finally:
                subscribers[evaluation].discard(queue)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"cache-control": "no-store"})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        for task in feeds.values():
            task.cancel()
        await client.aclose()

    return Starlette(routes=[Route("/api/v1/evaluations/{evaluation}/stream", stream)], lifespan=lifespan)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the naive fan-out design (benchmark yardstick)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--api-key", required=True)
    args = parser.parse_args(argv)
    uvicorn.run(create_app(args.upstream, args.api_key), host=args.host, port=args.port, loop="uvloop",
                http="httptools", access_log=False, log_level="warning", backlog=4096, timeout_graceful_shutdown=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
