"""A small run of the fan-out benchmark (bench/), so the benchmark keeps working.

Full runs (`python -m bench --full`) are not part of CI; this checks the whole chain on a
few subscribers: upstream/publisher, load generator, the real gateway with auth, the
exactly-once-in-order check and the single upstream connection.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from bench import systems
from bench.run import SMOKE, run_bench

pytestmark = pytest.mark.slow


def _only_run(document: dict[str, object]) -> dict[str, object]:
    runs = document["runs"]
    assert isinstance(runs, list) and len(runs) == 1
    run: dict[str, object] = runs[0]
    return run


@pytest.mark.timeout(60)
def test_gateway_fanout_smoke() -> None:
    document = run_bench(replace(SMOKE), write=False)
    run = _only_run(document)
    assert run["problems"] == []
    assert run["exactly_once_in_order"] is True
    assert run["upstream_connections"] == 1
    assert run["deliveries"] == 20 * run["published"] > 0
    assert run["deliveries_per_s"] > 0 and run["p99_ms"] > 0
    assert run["per_sub_bytes"] > 0


@pytest.mark.timeout(60)
@pytest.mark.skipif(systems.nchan_module() is None, reason="nginx-light + libnginx-mod-nchan not installed")
def test_nchan_fanout_smoke() -> None:
    document = run_bench(replace(SMOKE, systems=["nchan"], deliveries=2000), write=False)
    run = _only_run(document)
    assert run["problems"] == []
    assert run["exactly_once_in_order"] is True


@pytest.mark.timeout(60)
def test_gateway_websocket_fanout_smoke() -> None:
    # Enough deliveries for reads that carry several frames (the reader's no-walk path) and
    # some that end inside a frame.
    document = run_bench(replace(SMOKE, transports=["ws"], deliveries=20_000), write=False)
    run = _only_run(document)
    assert run["transport"] == "ws"
    assert run["problems"] == []
    assert run["exactly_once_in_order"] is True
    assert run["upstream_connections"] == 1


def test_flush_pass_micro_benchmark_runs() -> None:
    import uvloop

    from bench import flushpass

    for measure in (flushpass.sse, flushpass.ws):
        per_subscriber = uvloop.run(measure(50))
        assert 0 < per_subscriber < 0.001  # seconds per subscriber per pass
