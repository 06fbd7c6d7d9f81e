"""The browser client library (`/client/gateway-client.js`) in headless Chromium, against a real gateway + simulator.

The page under test is served by the gateway's own origin through a test-only ASGI wrapper
(`Harness`): `/_harness` imports the library and records what each client reports into
`window.runs`, and `/_harness/token` mints session tokens for the library's token provider.
Synchronisation is on conditions only (`page.wait_for_function` with deadlines), never sleeps.
"""

from __future__ import annotations

import contextlib
import importlib.util
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import pytest
from prometheus_client import CollectorRegistry

from gateway.app import GatewayApp, create_app
from gateway.types import Receive, Scope, Send
from tests.conftest import Gateway, Sim, gateway_config
from tests.servers import reserved_socket, serve_gateway
from tests.test_dashboard_browser import CHROMIUM, LAUNCH_ARGS

pytestmark = [pytest.mark.slow, pytest.mark.requires("chromium"), pytest.mark.timeout(30)]

if importlib.util.find_spec("playwright") is not None:
    from playwright.async_api import Browser, Page, async_playwright
else:  # pragma: no cover - the module is skipped
    Browser = Page = Any

HARNESS_PAGE = """<!doctype html>
<meta charset="utf-8"><title>gateway-client harness</title>
<script type="module">
import * as lib from "/client/gateway-client.js";
const clients = {};
const subs = {};
window.lib = lib;
window.runs = {};
// A client whose sockets, fetches and token requests are counted; `user` makes it use a token provider.
window.makeClient = (name, { user, ttl = 300, ...options } = {}) => {
  const run = (window.runs[name] = { sockets: 0, fetches: 0, tokens: 0, socket: [], streams: {} });
  class CountingSocket extends WebSocket {
    constructor(...args) { super(...args); run.sockets += 1; }
  }
  const token = async () => {
    run.tokens += 1;
    return (await fetch(`/_harness/token?sub=${user}&ttl=${ttl}`)).text();
  };
  clients[name] = new lib.GatewayClient({
    backoff: { baseMs: 100, capMs: 1000 }, token: user ? token : null, WebSocket: CountingSocket,
    fetch: (...args) => { run.fetches += 1; return fetch(...args); },
    onSocket: (event) => run.socket.push(event), ...options,
  });
};
window.watch = (name, stream, options = {}) => {
  const record = { events: [], states: [], closes: [], continuity: [], polls: [], state: null };
  window.runs[name].streams[stream] = record;
  subs[`${name} ${stream}`] = clients[name].subscribe(stream, { ...options,
    onEvent: (event) => record.events.push([event.id, event.type, event.data]),
    onState: (state, info) => { record.state = state; record.states.push([state, info.code ?? null]); },
    onClose: (info) => record.closes.push(info),
    onContinuityLost: (info) => record.continuity.push(info),
    onPoll: (snapshot) => record.polls.push(snapshot.status),
  });
};
window.harnessReady = true;
</script>
"""


class Harness:
    """The gateway, plus the test page and a token endpoint on its origin (tests only)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.minted = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in ("/_harness", "/_harness/token"):
            if scope["path"] == "/_harness":
                body, media_type = HARNESS_PAGE.encode(), b"text/html; charset=utf-8"
            else:
                query = parse_qs(scope["query_string"].decode())
                self.minted += 1
                body = self.gateway.token(query["sub"][0], ttl=float(query["ttl"][0])).encode()
                media_type = b"text/plain"
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", media_type), (b"cache-control", b"no-store")]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.gateway.app(scope, receive, send)


@dataclass
class Served:
    url: str
    app: GatewayApp
    harness: Harness


@contextlib.asynccontextmanager
async def harnessed(sim_url: str, sock: socket.socket | None = None, **overrides: Any) -> AsyncIterator[Served]:
    """A gateway served exactly as `gateway serve` serves it, wrapped by the harness, on port 0 or `sock`."""
    config = gateway_config(sim_url, **overrides)
    app = create_app(config, registry=CollectorRegistry())
    harness = Harness(Gateway("", app, config))
    async with serve_gateway(harness, config, sock) as url:
        yield Served(url, app, harness)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        instance = await playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS)
        try:
            yield instance
        finally:
            await instance.close()


async def open_harness(browser: Browser, url: str) -> Page:
    page = await (await browser.new_context()).new_page()
    page.set_default_timeout(15000)
    await page.goto(url + "/_harness")
    await page.wait_for_function("window.harnessReady === true")
    return page


async def make_client(page: Page, name: str, **options: Any) -> None:
    await page.evaluate("([name, options]) => makeClient(name, options)", [name, options])


async def watch(page: Page, name: str, stream: str, **options: Any) -> None:
    await page.evaluate("([name, stream, options]) => watch(name, stream, options)", [name, stream, options])


async def record(page: Page, name: str, stream: str) -> dict[str, Any]:
    result: dict[str, Any] = await page.evaluate("([n, s]) => runs[n].streams[s]", [name, stream])
    return result


async def run(page: Page, name: str) -> dict[str, Any]:
    result: dict[str, Any] = await page.evaluate("(n) => runs[n]", name)
    return result


async def wait_state(page: Page, name: str, stream: str, state: str, timeout: float = 15000) -> None:
    await page.wait_for_function("([n, s, state]) => runs[n].streams[s].state === state", arg=[name, stream, state],
                                 timeout=timeout)


async def wait_events(page: Page, name: str, stream: str, count: int) -> None:
    await page.wait_for_function("([n, s, c]) => runs[n].streams[s].events.length >= c", arg=[name, stream, count])


def evaluation_events(rows: int) -> list[list[str]]:
    """(id, type) of a simulated evaluation that succeeds: 2 statuses, a row and a progress per row, status, final."""
    types = ["status", "status", *["row_complete", "progress"] * rows, "status", "final"]
    return [[str(i), kind] for i, kind in enumerate(types, 1)]


def seen(rec: dict[str, Any]) -> list[list[str]]:
    return [[event[0], event[1]] for event in rec["events"]]


def states(rec: dict[str, Any]) -> list[str]:
    return [state for state, _ in rec["states"]]


# --- pure parts, from their specs --------------------------------------------------------------

PURE_CHECKS = r"""() => {
  const { SSEParser, Backoff, jwtClaims, closeReconnects } = lib;
  const parse = (text, size) => {          // the same events whatever the chunking
    const parser = new SSEParser();
    const events = [];
    for (let i = 0; i < text.length; i += size) events.push(...parser.push(text.slice(i, i + size)));
    return { events: events.map((e) => [e.type, e.data, e.id]), last: parser.lastEventId, retry: parser.retry };
  };
  const examples = [
    "data: YHOO\ndata: +2\ndata: 10\n\n",                                           // WHATWG 9.2.6 examples
    ": test stream\n\ndata: first event\nid: 1\n\ndata:second event\nid\n\ndata:  third event\n\n",
    "data\n\ndata\ndata\n\ndata:",
    "data:test\n\ndata: test\n\n",
    "\ufeffevent: status\r\nid: 7\r\nretry: 2500\r\ndata: {\"a\":1}\r\n\r\nretry: x\rid: a\0b\rdata: cr\r\r",
  ];
  const out = examples.map((text) => [1, 2, 3, 7, text.length].map((size) => parse(text, size)));
  const backoff = new Backoff({ baseMs: 100, capMs: 800, giveUpMs: 1000 }, () => 0.999);
  const windows = [0, 1, 2, 3, 4, 5].map(() => Math.round(backoff.next(0, 10)));
  const floored = new Backoff({}, () => 0).next(1500, 0);
  const late = new Backoff({ giveUpMs: 1000 }, () => 0.5);
  const gaveUp = [late.next(0, 0), late.next(0, 999), late.next(0, 1000)];
  const utf8 = String.fromCharCode(...new TextEncoder().encode(JSON.stringify({ exp: 5, name: "\u00e9?>" })));
  const claims = jwtClaims(`x.${btoa(utf8).replace(/=+$/, "").replace(/\+/g, "-").replace(/\//g, "_")}.y`);
  const codes = [4000, 4001, 4002, 4003, 1006, 1012, 1000, 4100, 4101, 4105, 4403, 1008, 1009];
  return { out, windows, floored, gaveUp, claims, notJwt: jwtClaims("nope"),
           reconnects: codes.map((code) => closeReconnects(code)) };
}"""


async def test_parser_backoff_and_helpers_follow_their_specs(sim: Sim, browser: Browser) -> None:
    async with harnessed(sim.url) as served:
        page = await open_harness(browser, served.url)
        result = await page.evaluate(PURE_CHECKS)
    expected = [
        [["message", "YHOO\n+2\n10", None]],
        [["message", "first event", "1"], ["message", "second event", ""], ["message", " third event", None]],
        [["message", "", None], ["message", "\n", None]],
        [["message", "test", None], ["message", "test", None]],
        [["status", '{"a":1}', "7"], ["message", "cr", None]],
    ]
    for example, chunkings in zip(expected, result["out"], strict=True):
        for parsed in chunkings:
            assert parsed["events"] == example
    assert result["out"][1][0]["last"] == ""  # `id` with no value resets the last event id
    assert result["out"][4][0]["last"] == "7" and result["out"][4][0]["retry"] == 2500  # NUL id and bad retry ignored
    assert result["windows"] == [100, 200, 400, 799, 799, 799]  # full jitter under min(cap, base * 2^n)
    assert result["floored"] == 1500  # never sooner than the server's hint
    assert result["gaveUp"][:2] != [None, None] and result["gaveUp"][2] is None
    assert result["claims"] == {"exp": 5, "name": "\u00e9?>"} and result["notJwt"] is None
    assert result["reconnects"] == [True] * 7 + [False] * 6


# --- whole streams -----------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_streams_an_evaluation_and_a_job_to_their_ends(sim: Sim, browser: Browser, transport: str) -> None:
    evaluation, job = f"evaluations/e-whole-{transport}", f"optimizations/job-whole-{transport}"
    await sim.post("/_sim/configure", {"resource": evaluation, "rows": 20, "interval": 0.02})
    await sim.post("/_sim/configure", {"resource": job, "iterations": 3, "interval": 0.02})
    async with harnessed(sim.url) as served:
        page = await open_harness(browser, served.url)
        await make_client(page, "a", user="alice")
        await watch(page, "a", evaluation, transport=transport)
        await watch(page, "a", job, transport=transport)
        await wait_state(page, "a", evaluation, "ended")
        await wait_state(page, "a", job, "ended")
        rec, jobs, counts = await record(page, "a", evaluation), await record(page, "a", job), await run(page, "a")
    assert seen(rec) == evaluation_events(20)
    assert states(rec) == ["connecting", "live", "ended"] and rec["closes"] == [] and rec["continuity"] == []
    assert rec["events"][2][2]["row"]["index"] == 0 and rec["events"][-1][2]["result"]["status"] == "success"
    # Job events carry the upstream event object over both transports, ids in order, ending at job_complete.
    assert [int(e[0]) for e in jobs["events"]] == list(range(1, len(jobs["events"]) + 1))
    assert jobs["events"][-1][1] == "job_complete" and states(jobs)[-1] == "ended"
    for event_id, kind, data in jobs["events"]:
        assert data["eventType"] == kind and str(data["id"]) == event_id
        assert {"iteration", "timestamp", "data"} <= set(data)
    if transport == "ws":
        assert counts["sockets"] == 1 and counts["fetches"] == 0 and counts["tokens"] == 1  # one socket for both
    else:
        assert counts["sockets"] == 0 and counts["fetches"] == 2
    assert (await sim.resource(evaluation))["connects"] == 1


@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_upstream_drop_mid_stream_leaves_no_gap_and_no_duplicate(sim: Sim, browser: Browser,
                                                                        transport: str) -> None:
    stream = f"evaluations/e-drop-{transport}"
    await sim.post("/_sim/configure", {"resource": stream, "rows": 40, "interval": 0.04})
    async with harnessed(sim.url) as served:
        page = await open_harness(browser, served.url)
        await make_client(page, "a", user="alice")
        await watch(page, "a", stream, transport=transport)
        await wait_events(page, "a", stream, 10)
        assert (await sim.post("/_sim/drop", {"resource": stream, "mode": "abort"}))["dropped"] == 1
        await wait_state(page, "a", stream, "ended")
        rec = await record(page, "a", stream)
    assert seen(rec) == evaluation_events(40)
    assert (await sim.resource(stream))["connects"] >= 2  # the gateway resumed upstream; the browser saw nothing
    assert "reconnecting" not in states(rec)


@pytest.mark.parametrize(("transport", "shutdown"), [("sse", "drain"), ("sse", "abrupt"), ("ws", "drain"),
                                                     ("ws", "abrupt")])
async def test_gateway_restart_mid_stream_resumes_with_no_gap(sim: Sim, browser: Browser, transport: str,
                                                              shutdown: str) -> None:
    """Stop the gateway mid-stream (draining, or just stopping the server) and start a new one on its port."""
    stream = f"evaluations/e-restart-{transport}-{shutdown}"
    await sim.post("/_sim/configure", {"resource": stream, "rows": 60, "interval": 0.04})
    first_socket = reserved_socket()
    port = first_socket.getsockname()[1]
    async with harnessed(sim.url, first_socket) as first:
        page = await open_harness(browser, first.url)
        await make_client(page, "a", user="alice")
        await watch(page, "a", stream, transport=transport)
        await wait_events(page, "a", stream, 10)
        if shutdown == "drain":
            first.app.begin_drain()
    stopped_at = len((await record(page, "a", stream))["events"])  # the first gateway and its port are gone
    async with harnessed(sim.url, reserved_socket(port)) as second:
        await wait_state(page, "a", stream, "ended")
        rec, counts = await record(page, "a", stream), await run(page, "a")
    assert stopped_at < len(evaluation_events(60))
    assert seen(rec) == evaluation_events(60)
    assert "reconnecting" in states(rec) and rec["closes"] == []
    assert second.harness.minted >= 1  # the reconnect asked the provider for a fresh token
    if transport == "ws":
        opens = [event for event in counts["socket"] if event["type"] == "open"]
        assert len(opens) == 2 and counts["sockets"] >= 2
        if shutdown == "drain":
            assert {"type": "close", "code": 4000, "reason": "shutting_down", "opened": True} in counts["socket"]


# --- tokens -----------------------------------------------------------------------------------


async def test_websocket_refreshes_its_token_before_exp_without_reconnecting(sim: Sim, browser: Browser) -> None:
    stream = "evaluations/e-refresh"
    await sim.post("/_sim/configure", {"resource": stream, "rows": 30, "interval": 0.1})  # ~6.4 s
    async with harnessed(sim.url) as served:  # auth.jwt.leeway is 0 in test configs: exp is exp
        assert served.app.config.auth.jwt.leeway == 0
        page = await open_harness(browser, served.url)
        await make_client(page, "a", user="alice", ttl=3)
        await watch(page, "a", stream, transport="ws")
        await wait_state(page, "a", stream, "ended")
        rec, counts = await record(page, "a", stream), await run(page, "a")
    assert seen(rec) == evaluation_events(30)
    assert counts["sockets"] == 1 and [event["type"] for event in counts["socket"]].count("open") == 1
    assert not any(event["type"] == "close" for event in counts["socket"])  # outlived its first 3 s token
    refreshed = [event for event in counts["socket"] if event["type"] == "refreshed"]
    assert len(refreshed) >= 2 and not any(event["type"] == "refresh_refused" for event in counts["socket"])
    # One token to connect, one per refresh (plus, rarely, one whose refresh was under way when the stream ended).
    assert counts["tokens"] == served.harness.minted and counts["tokens"] - 1 - len(refreshed) in (0, 1)
    assert refreshed == sorted(refreshed, key=lambda event: event["exp"])
    assert states(rec) == ["connecting", "live", "ended"]


async def test_sse_reconnects_with_a_fresh_token_when_its_token_expires(sim: Sim, browser: Browser) -> None:
    stream = "evaluations/e-expiry"
    await sim.post("/_sim/configure", {"resource": stream, "rows": 20, "interval": 0.1})  # ~4.4 s
    async with harnessed(sim.url) as served:
        page = await open_harness(browser, served.url)
        await make_client(page, "a", user="alice", ttl=2)
        await watch(page, "a", stream)
        await wait_state(page, "a", stream, "ended")
        rec, counts = await record(page, "a", stream), await run(page, "a")
    assert seen(rec) == evaluation_events(20)
    assert ["reconnecting", "token_expired"] in rec["states"]
    assert counts["tokens"] >= 2 and counts["fetches"] >= 2


# --- stopping and polling -----------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_superseded_stops_without_reconnecting(sim: Sim, browser: Browser, transport: str) -> None:
    stream = f"evaluations/e-superseded-{transport}"
    await sim.post("/_sim/configure", {"resource": stream, "rows": 30, "interval": 0.05})
    async with harnessed(sim.url) as served:
        page = await open_harness(browser, served.url)
        await make_client(page, "first", user="sam")
        await make_client(page, "second", user="sam")  # the same user, elsewhere (another tab, say)
        await watch(page, "first", stream, transport=transport)
        await wait_events(page, "first", stream, 5)
        await watch(page, "second", stream, transport=transport)
        await wait_state(page, "first", stream, "closed")
        # The newcomer streams to the end: far longer than the backoff (0.1-1 s) a wrong reconnect would wait.
        await wait_state(page, "second", stream, "ended")
        first, second, counts = await record(page, "first", stream), await record(page, "second", stream), \
            await run(page, "first")
    assert [close["code"] for close in first["closes"]] == ["superseded"]
    assert first["closes"][0]["reconnect"] is False and first["closes"][0]["lastEventId"] == first["events"][-1][0]
    assert states(first) == ["connecting", "live", "closed"]
    assert counts["sockets" if transport == "ws" else "fetches"] == 1
    assert seen(second) == evaluation_events(30)


@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_inactivity_switches_to_polling_until_finished(sim: Sim, browser: Browser, transport: str) -> None:
    stream = f"evaluations/e-idle-{transport}"
    # Four events 2.5 s apart (no rows): the gateway closes the stream after one quiet second.
    await sim.post("/_sim/configure", {"resource": stream, "rows": 0, "interval": 2.5})
    async with harnessed(sim.url, limits={"inactivity_timeout": 1, "heartbeat": 0.25, "poll_cache_ttl": 0.2}) as served:
        page = await open_harness(browser, served.url)
        await make_client(page, "a", user="alice", pollIntervalMs=300)
        await watch(page, "a", stream, transport=transport)
        await wait_state(page, "a", stream, "polling", timeout=5000)
        await wait_state(page, "a", stream, "ended", timeout=12000)
        rec = await record(page, "a", stream)
    assert ["polling", "inactivity_timeout"] in rec["states"] and rec["closes"] == []
    assert states(rec)[-2:] == ["polling", "ended"]
    assert rec["polls"][-1] == "success" and len(rec["polls"]) >= 2 and set(rec["polls"]) <= {
        "pending", "in-progress", "success"}
    assert seen(rec) == evaluation_events(0)[:1]  # only what came before the quiet second
    stats = await sim.resource(stream)
    assert stats["connects"] == 1 and stats["polls"] >= 1


async def test_refusals_stop_or_retry_as_the_catalogue_says(sim: Sim, browser: Browser) -> None:
    """Without credentials an SSE 401 stops at once; a refused WebSocket upgrade is retried until giving up."""
    async with harnessed(sim.url) as served:
        page = await open_harness(browser, served.url)
        await make_client(page, "anon", backoff={"baseMs": 50, "capMs": 200, "giveUpMs": 1000})
        await watch(page, "anon", "evaluations/e-anon-sse")
        await watch(page, "anon", "evaluations/e-anon-ws", transport="ws")
        await wait_state(page, "anon", "evaluations/e-anon-sse", "closed")
        await wait_state(page, "anon", "evaluations/e-anon-ws", "closed")
        sse, ws, counts = await record(page, "anon", "evaluations/e-anon-sse"), \
            await record(page, "anon", "evaluations/e-anon-ws"), await run(page, "anon")
    assert [(c["code"], c["status"]) for c in sse["closes"]] == [("missing_token", 401)] and counts["fetches"] == 1
    assert [c["code"] for c in ws["closes"]] == ["retries_exhausted"] and counts["sockets"] >= 3
    assert all(event == {"type": "close", "code": 1006, "reason": "", "opened": False} for event in counts["socket"])


# --- the WebSocket close catalogue, scripted ------------------------------------------------------

SCRIPTED_SOCKET = r"""async () => {
  const made = [];
  class FakeSocket {               // the server side is this script: open, messages and closes on cue
    constructor(url, protocols) { Object.assign(this, { url, protocols, sent: [] }); made.push(this); }
    send(text) { this.sent.push(JSON.parse(text)); }
    close(code) { this.closedWith = code; }
    accept() { this.onopen(); }
    say(message) { this.onmessage({ data: JSON.stringify(message) }); }
    drop(code, reason = "") { this.onclose({ code, reason }); }
  }
  const until = async (check) => {
    for (let i = 0; i < 400 && !check(); i += 1) await new Promise((resolve) => setTimeout(resolve, 5));
    if (!check()) throw new Error(`timed out: ${check}`);
  };
  const log = [];
  const events = [];
  let tokens = 0;
  const client = new lib.GatewayClient({ baseUrl: "https://gw.test", token: () => `t${++tokens}`, WebSocket: FakeSocket,
    backoff: { baseMs: 10, capMs: 40 }, random: () => 0.5 });
  const handlers = (name) => ({ transport: "ws", onEvent: (e) => events.push([name, e.id]),
    onState: (state, info) => log.push([name, state, info.code ?? null, info.delayMs ?? null]),
    onContinuityLost: (info) => log.push([name, "continuity", info.reason, info.oldestRetainedId]) });
  const S = "evaluations/e1";
  const event = (id) => ({ type: "event", stream: S, event: { id, eventType: "progress", data: {} } });
  client.subscribe(S, handlers("a"));
  await until(() => made.length === 1);
  made[0].accept();
  made[0].say({ type: "subscribed", stream: S });
  made[0].say(event(1));
  made[0].say(event(2));
  made[0].drop(4001, "slow_consumer");                          // 40xx: reconnect, fresh token
  await until(() => made.length === 2);
  made[1].drop(1006);                                           // refused upgrade: again, fresh token
  await until(() => made.length === 3);
  made[2].accept();                                             // resumes after id 2
  made[2].say({ type: "subscribed", stream: S });
  made[2].say(event(2));                                        // a replay: dropped
  made[2].say({ type: "error", stream: S, error: { code: "continuity_lost", reason: "trimmed", oldestRetainedId: 5 } });
  made[2].say(event(5));
  made[2].say({ type: "error", stream: S, error: { code: "upstream_unavailable", reconnect: true } });
  made[2].say({ type: "unsubscribed", stream: S });
  await until(() => made[2].sent.length === 2);                 // re-subscribed on the same socket
  made[2].say({ type: "subscribed", stream: S });
  made[2].drop(4103, "policy_violation");                       // 41xx: stop
  const stopped = made.length;
  client.subscribe("evaluations/e2", handlers("b"));
  await until(() => made.length === stopped + 1);
  made[stopped].accept();
  made[stopped].drop(1009);                                     // message too big: stop
  await new Promise((resolve) => setTimeout(resolve, 150));     // > the largest backoff window (40 ms)
  const sockets = made.map((s) => ({ url: s.url, protocols: s.protocols, sent: s.sent }));
  // One subscription per stream per socket: a polling subscription gave the stream up, and reopening it
  // while another subscription of the same client holds the stream is refused, not silently merged.
  const other = new lib.GatewayClient({ baseUrl: "https://gw.test", WebSocket: FakeSocket,
    fetch: () => new Promise(() => {}) });
  const c = other.subscribe("evaluations/e3", handlers("c"));
  await until(() => made.length === sockets.length + 1);
  made[sockets.length].accept();
  made[sockets.length].say({ type: "subscribed", stream: "evaluations/e3" });
  made[sockets.length].say({ type: "error", stream: "evaluations/e3",
    error: { code: "inactivity_timeout", reconnect: false, poll: "/api/v1/evaluations/e3" } });
  other.subscribe("evaluations/e3", handlers("d"));
  c.reopen();
  return { log, events, tokens, made: sockets };
}"""


async def test_websocket_close_catalogue_with_a_scripted_socket(sim: Sim, browser: Browser) -> None:
    async with harnessed(sim.url) as served:
        page = await open_harness(browser, served.url)
        result = await page.evaluate(SCRIPTED_SOCKET)
    made = result["made"]
    assert len(made) == 4 and result["tokens"] == 4  # a fresh token for every connection, none after a stop
    assert made[0]["url"] == "wss://gw.test/ws" and made[0]["protocols"] == ["gateway.v1", "bearer.t1"]
    assert [m["protocols"][1] for m in made] == ["bearer.t1", "bearer.t2", "bearer.t3", "bearer.t4"]
    assert made[0]["sent"] == [{"type": "subscribe", "stream": "evaluations/e1"}]
    resume = {"type": "subscribe", "stream": "evaluations/e1", "afterEventId": "2"}
    assert made[2]["sent"] == [resume, {"type": "subscribe", "stream": "evaluations/e1", "afterEventId": "5"}]
    assert result["events"] == [["a", "1"], ["a", "2"], ["a", "5"]]
    assert [entry for entry in result["log"] if entry[0] == "a"] == [
        ["a", "connecting", None, None], ["a", "live", None, None],
        ["a", "reconnecting", "slow_consumer", 5],       # 0.5 * min(40, 10 * 2^0)
        ["a", "reconnecting", "close_1006", 10],         # 0.5 * min(40, 10 * 2^1): no event since
        ["a", "live", None, None], ["a", "continuity", "trimmed", "5"],
        ["a", "reconnecting", "upstream_unavailable", 5], ["a", "live", None, None],
        ["a", "closed", "policy_violation", None],
    ]
    assert [entry for entry in result["log"] if entry[0] == "b"] == [
        ["b", "connecting", None, None], ["b", "closed", "message_too_big", None]]
    assert [entry[:3] for entry in result["log"] if entry[0] in "cd"] == [
        ["c", "connecting", None], ["c", "live", None], ["c", "polling", "inactivity_timeout"],
        ["d", "connecting", None], ["c", "connecting", None], ["c", "closed", "already_subscribed"]]
