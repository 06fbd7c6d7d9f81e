"""The `gateway` command line: token minting, config checks and the demo, as a user runs them."""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jwt
from httpx_sse import aconnect_sse

SECRET = "c" * 40


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=30,
                          env=full_env)


def test_example_config_is_valid_and_holds_no_secret() -> None:
    result = run("check-config", "config/gateway.yaml",
                 env={"STRATIX_API_KEY": "ll_example", "GATEWAY_JWT_SECRET": SECRET})
    assert result.returncode == 0, result.stderr
    text = Path("config/gateway.yaml").read_text()
    assert "${STRATIX_API_KEY}" in text and "${GATEWAY_JWT_SECRET}" in text


def test_token_command_mints_a_verifiable_token() -> None:
    result = run("token", "--config", "config/gateway.yaml", "--sub", "dev", "--ttl", "120",
                 "--claim", 'streams=["evaluations/*"]', "--claim", "team=red",
                 env={"STRATIX_API_KEY": "ll_example", "GATEWAY_JWT_SECRET": SECRET})
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), SECRET, algorithms=["HS256"])
    assert claims["sub"] == "dev" and claims["streams"] == ["evaluations/*"] and claims["team"] == "red"
    assert 100 <= claims["exp"] - claims["iat"] <= 120


def test_token_command_reports_bad_claims_and_missing_secret() -> None:
    bad = run("token", "--config", "config/gateway.yaml", "--sub", "dev", "--claim", "novalue",
              env={"STRATIX_API_KEY": "ll_example", "GATEWAY_JWT_SECRET": SECRET})
    assert bad.returncode != 0 and "NAME=VALUE" in bad.stderr
    unset = run("token", "--config", "config/gateway.yaml", "--sub", "dev",
                env={"STRATIX_API_KEY": "ll_example", "GATEWAY_JWT_SECRET": ""})
    assert unset.returncode != 0 and "GATEWAY_JWT_SECRET is not set" in unset.stderr


async def test_demo_streams_an_evaluation_through_its_printed_curl_line_and_stops_cleanly() -> None:
    """`gateway demo --port 0` runs, its curl line streams an evaluation to `final`, and Ctrl-C stops it (exit 0)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "demo", "--port", "0", "--rows", "5", "--interval", "0.01",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    printed: list[str] = []
    try:
        async with asyncio.timeout(15):
            while not any(line.lstrip().startswith("curl -N") for line in printed):
                line = (await proc.stdout.readline()).decode()
                assert line, "the demo exited before printing its curl lines:\n" + "".join(printed)
                printed.append(line)
        curl = shlex.split(next(line for line in printed if line.lstrip().startswith("curl -N")))
        header, url = curl[curl.index("-H") + 1], curl[-1]
        name, _, value = header.partition(": ")
        assert name == "Authorization" and value.startswith("Bearer ")
        port = int(url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
        assert port != 0 and url == f"http://127.0.0.1:{port}/api/v1/evaluations/eval-demo-1/stream"
        events: list[str] = []
        async with (httpx.AsyncClient(timeout=10) as client, asyncio.timeout(15),
                    aconnect_sse(client, "GET", url, headers={name: value}) as source):
            assert source.response.status_code == 200
            async for sse in source.aiter_sse():
                events.append(sse.event)
                if sse.event == "final":
                    break
        assert events[-1] == "final" and events.count("row_complete") == 5
        proc.send_signal(signal.SIGINT)
        started = time.monotonic()
        async with asyncio.timeout(10):
            rest = await proc.stdout.read()
            code = await proc.wait()
        assert code == 0, rest.decode()
        assert time.monotonic() - started < 8 and "Traceback" not in rest.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
