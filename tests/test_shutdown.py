"""Graceful shutdown of a real `gateway serve` process: SIGTERM ends every stream promptly."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import API_KEY, SECRET, Received, Sim, read_sse
from tests.servers import subprocess_server, wait_for

pytestmark = pytest.mark.slow


def write_config(tmp_path: Path, sim_url: str, port: int) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({
        "server": {"host": "127.0.0.1", "port": port, "drain_timeout": 3},
        "upstream": {"base_url": sim_url, "api_key": "${TEST_STRATIX_KEY}"},
        "auth": {"jwt": {"algorithms": ["HS256"], "secret_file": str(tmp_path / "jwt-secret")}},
        "limits": {"heartbeat": 1},
    }))
    (tmp_path / "jwt-secret").write_text(SECRET + "\n")
    return path


async def test_sigterm_ends_streams_with_reconnect_code_and_exits(sim: Sim, tmp_path: Path) -> None:
    from gateway.auth.tokens import mint_token

    await sim.post("/_sim/configure", {"resource": "evaluations/e-term", "rows": 500, "interval": 0.05})
    config = write_config(tmp_path, sim.url, 0)
    with subprocess_server(["serve", "--config", str(config)], env={"TEST_STRATIX_KEY": API_KEY}) as (proc, ports):
        port = ports["port"]
        url = f"http://127.0.0.1:{port}/api/v1/evaluations/e-term/stream"
        clients = [Received() for _ in range(5)]
        tasks = [asyncio.create_task(read_sse(url, {"Authorization": "Bearer " + mint_token(
            SECRET, "HS256", f"user-{i}", 300, {"streams": ["*/*"]})}, received=r, timeout=15))
            for i, r in enumerate(clients)]
        await wait_for(lambda: all(len(r.events) >= 3 for r in clients), message="streams flowing")
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=5)
        ended = time.monotonic() - started
        for received in clients:
            name, data = received.events[-1][1], json.loads(received.events[-1][2])
            assert name == "gateway.close"
            assert data["code"] == "shutting_down" and data["reconnect"] is True
            assert data["lastEventId"] == received.ids[-1]
        assert ended < 3
        await wait_for(lambda: proc.poll() is not None, timeout=6, message="process exit")
        assert proc.returncode == 0
        output = proc.stdout.read().decode() if proc.stdout else ""
        assert API_KEY not in output and SECRET not in output


def test_invalid_config_fails_at_startup_naming_the_key(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({
        "server": {"port": "eighty", "colour": "blue"},
        "upstream": {"base_url": "http://x.example/api/v1", "api_key": "${SURELY_UNSET_VAR_123}"},
        "auth": {"jwt": {"algorithms": ["none"], "secret": "short"}},
        "limits": {"one_stream_per_consumer": "sometimes"},
    }))
    for args in (["serve", "--config", str(path)], ["check-config", str(path)]):
        result = subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True,
                                timeout=30)
        assert result.returncode != 0
        for expected in ("server.port", "server.colour: unknown key", "upstream.base_url",
                         "SURELY_UNSET_VAR_123 is not set", "auth.jwt.algorithms", "limits.one_stream_per_consumer"):
            assert expected in result.stderr, (expected, result.stderr)
