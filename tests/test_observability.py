"""Health, readiness (upstream evidence, drain) and the structured logs of a real `gateway serve` run."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway.auth.tokens import mint_token
from gateway.sim import SimSettings, create_sim_app
from tests.conftest import API_KEY, SECRET, Gateway, Received, Sim, read_sse, terminal
from tests.servers import reserved_socket, serve, wait_for


async def get_json(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    async with httpx.AsyncClient() as client:
        response = await client.get(url, headers=headers or {})
    return response.status_code, response.json()


async def test_healthz_and_readyz_when_all_is_well(sim: Sim, gateway: Gateway) -> None:
    assert await get_json(f"{gateway.url}/healthz") == (200, {"status": "ok", "broker": {"kind": "memory"}})
    status, body = await get_json(f"{gateway.url}/readyz")
    assert status == 200
    assert body["status"] == "ready" and body["ready"] is True and body["draining"] is False
    # An idle gateway has no evidence yet: it probed the upstream (any answer proves it is there).
    assert body["upstream"]["reachable"] is True
    assert body["upstream"]["last_success_age_seconds"] is not None


async def test_readyz_uses_the_evidence_of_running_streams(sim: Sim, gateway: Gateway) -> None:
    await read_sse(f"{gateway.url}/api/v1/evaluations/o-ev/stream", gateway.headers(), until=terminal)
    probe = gateway.app.health._run_probe
    probed: list[bool] = []

    async def spy(*args: Any) -> None:
        probed.append(True)
        await probe(*args)

    gateway.app.health._run_probe = spy  # type: ignore[method-assign]
    status, body = await get_json(f"{gateway.url}/readyz")
    assert status == 200 and body["upstream"]["last_success_age_seconds"] < 5
    assert probed == []  # a recent stream answer is enough; no probe load on the upstream


async def test_readyz_fails_while_the_upstream_is_unreachable_and_recovers(gateway_factory: Any) -> None:
    reserved = reserved_socket()  # bound, not listening: the upstream refuses connections until it serves on it
    port = reserved.getsockname()[1]
    gateway: Gateway = await gateway_factory(sim_url=f"http://127.0.0.1:{port}")
    gateway.app.health.probe_interval = 0.05
    status, body = await get_json(f"{gateway.url}/readyz")
    assert status == 503
    assert body["status"] == "upstream_unreachable" and body["ready"] is False
    assert body["upstream"]["reachable"] is False and body["upstream"]["last_error"] == "error"
    assert (await get_json(f"{gateway.url}/healthz"))[0] == 200  # alive, just not ready
    async with serve(create_sim_app(SimSettings(api_key=API_KEY)), reserved, timeout_graceful_shutdown=1):
        async def ready() -> bool:
            return (await get_json(f"{gateway.url}/readyz"))[0] == 200

        await wait_for(ready, timeout=5, message="ready once the upstream is back")


async def test_readiness_goes_false_at_the_start_of_a_drain(sim: Sim, gateway: Gateway) -> None:
    await sim.post("/_sim/configure", {"resource": "evaluations/o-drain", "rows": 200, "interval": 0.05})
    received = Received()
    task = asyncio.create_task(read_sse(f"{gateway.url}/api/v1/evaluations/o-drain/stream", gateway.headers(),
                                        until=terminal, received=received))
    await wait_for(lambda: len(received.events) >= 3, message="stream flowing")
    assert (await get_json(f"{gateway.url}/readyz"))[0] == 200
    assert gateway.app.begin_drain() == 1
    status, body = await get_json(f"{gateway.url}/readyz")
    assert status == 503 and body["status"] == "draining" and body["draining"] is True
    await asyncio.wait_for(task, timeout=3)
    close = json.loads(received.events[-1][2])
    assert received.events[-1][1] == "gateway.close" and close["code"] == "shutting_down"
    async with httpx.AsyncClient() as client:
        metrics = (await client.get(f"{gateway.url}/metrics")).text
    assert 'gateway_closes_total{code="shutting_down"} 1.0' in metrics


async def test_every_response_carries_its_own_request_id(sim: Sim, gateway: Gateway) -> None:
    async with httpx.AsyncClient() as client:
        ids = {(await client.get(f"{gateway.url}{path}", headers={"X-Request-ID": "chosen-by-client"}))
               .headers["x-request-id"] for path in ("/healthz", "/readyz", "/metrics", "/api/v1/evaluations",
                                                     "/nope")}
    assert len(ids) == 5 and "chosen-by-client" not in ids


# --- the log scan ---------------------------------------------------------------------------------


@contextlib.contextmanager
def gateway_process(config: Path, log_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """`gateway serve` on port 0 as a child process, its whole output going to `log_path`; yields it and its port."""
    import time

    port_file = log_path.with_suffix(".ports")
    with log_path.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(config),
                                 "--port-file", str(port_file)],
                                env={**os.environ, "OBS_API_KEY": API_KEY, "OBS_JWT_SECRET": SECRET},
                                stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 15
            while not port_file.exists():
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, "gateway did not start"
                time.sleep(0.02)
            yield proc, json.loads(port_file.read_text())["port"]
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@pytest.mark.slow
async def test_logs_are_json_with_request_ids_and_never_hold_a_secret(sim: Sim, tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({
        "server": {"host": "127.0.0.1", "port": 0, "drain_timeout": 2},
        "upstream": {"base_url": sim.url, "api_key": "${OBS_API_KEY}", "backoff_initial": 0.05,
                     "backoff_max": 0.2},
        "auth": {"jwt": {"algorithms": ["HS256"], "secret": "${OBS_JWT_SECRET}"}, "query_param": "access_token"},
        "limits": {"heartbeat": 0.5, "linger": 0.2},
        "logging": {"level": "debug"},
        "dashboard": {"enabled": True},
    }))
    tokens = {name: mint_token(SECRET, "HS256", name, 300, {"streams": ["*/*"]})
              for name in ("bearer", "cookie", "query", "poller")}
    bad = mint_token("w" * 48, "HS256", "mallory", 300, {"streams": ["*/*"]})
    log_path = tmp_path / "gateway.log"
    await sim.post("/_sim/configure", {"resource": "evaluations/o-logs", "rows": 40, "interval": 0.02})
    with gateway_process(config, log_path) as (proc, port):
        base = f"http://127.0.0.1:{port}"
        url = f"{base}/api/v1/evaluations/o-logs/stream"
        clients = {
            "bearer": read_sse(url, {"Authorization": f"Bearer {tokens['bearer']}"}, until=terminal),
            "cookie": read_sse(url, {"Cookie": f"gateway_session={tokens['cookie']}; theme=dark"}, until=terminal),
            "query": read_sse(f"{url}?access_token={tokens['query']}", until=terminal),
        }
        tasks = {name: asyncio.create_task(c) for name, c in clients.items()}

        async def upstream_open() -> bool:
            return bool((await sim.resource("evaluations/o-logs")).get("open"))

        async with httpx.AsyncClient() as client:
            await wait_for(upstream_open, message="upstream stream open")
            await sim.post("/_sim/drop", {"resource": "evaluations/o-logs", "mode": "abort"})
            poller = {"Authorization": f"Bearer {tokens['poller']}"}
            for path in ("/api/v1/evaluations/o-logs", "/api/v1/evaluations", "/api/v1/optimizations", "/readyz",
                         "/metrics", "/", "/api/v1/evaluations/missing-1"):
                assert (await client.get(base + path, headers=poller)).status_code < 500
            refused = await client.get(f"{url}?access_token={bad}")
            assert refused.status_code == 401
            refused = await client.get(url, headers={"Cookie": f"gateway_session={bad}"})
            assert refused.status_code == 401
        results = {name: await task for name, task in tasks.items()}
        assert all(r.events[-1][1] == "final" for r in results.values())
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 10)
    text = log_path.read_text()

    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert lines, "the run logged nothing"
    for entry in lines:
        assert {"ts", "level", "logger", "msg", "request_id"} <= set(entry), entry
    opened = [e for e in lines if e["msg"] == "stream opened"]
    closed = [e for e in lines if e["msg"] == "stream closed"]
    assert len(opened) == 3 and len(closed) == 3
    for entry in closed:
        assert {"duration", "bytes", "events", "close_code", "transport", "stream_kind"} <= set(entry)
        assert entry["events"] == 2 + 80 + 2 and entry["bytes"] > 0 and entry["close_code"] == "ended"
    # One id per connection, the same on its open and close lines; none is the placeholder.
    assert {e["request_id"] for e in opened} == {e["request_id"] for e in closed}
    assert len({e["request_id"] for e in opened}) == 3 and "-" not in {e["request_id"] for e in opened}
    refused = [e for e in lines if e["msg"] == "stream refused"]
    assert [(e["status"], e["reason"]) for e in refused] == [(401, "bad_signature")] * 2
    assert len({e["request_id"] for e in refused} | {e["request_id"] for e in opened}) == 5
    connects = [e for e in lines if e["msg"] == "upstream connected"]
    assert len(connects) == 2 and {"attempt", "resume", "stream_kind"} <= set(connects[0])
    assert [c["resume"] for c in connects] == [False, True]
    scheduled = [e for e in lines if e["msg"] == "upstream reconnect scheduled"]
    assert scheduled and {"reason", "delay", "attempt"} <= set(scheduled[0])
    feed_ids = {e["request_id"] for e in connects + scheduled}
    assert len(feed_ids) == 1 and not feed_ids & {e["request_id"] for e in opened}

    secrets = [API_KEY, SECRET, bad, *tokens.values()]
    for secret in secrets:
        assert secret not in text
        # Also no recognisable piece of one (a JWT's signature part, or the key's tail).
        assert secret[-24:] not in text

