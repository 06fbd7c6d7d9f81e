"""Small runs of the benchmarks (bench/), so they keep working.

Full runs (`python -m bench --full`, `--storm`, `--soak`) are not part of CI; these check
each whole chain on a few subscribers: upstream/publisher, load generator, the real gateway
with auth, the exactly-once-in-order check and the single upstream connection; the storm's
drop-and-resume; the soak's churn, evaluation ends and return to baseline; the admission
micro-benchmark.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

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
@pytest.mark.requires("nchan")
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


@pytest.mark.timeout(60)
def test_reconnect_storm_smoke() -> None:
    from bench.storm import StormOptions, run_storm

    document = run_storm(StormOptions(n=50, systems=["gateway"], events_per_s=20, timeout=20), write=False)
    (run,) = document["runs"]
    assert run["problems"] == []
    assert run["admitted"] == run["resumed"] == run["no_gap"] == 50
    assert run["upstream_connections"] == 1
    assert 0 < run["all_admitted_s"] <= run["all_resumed_s"]
    assert run["admissions_per_s"] > 0 and run["admission_p99_ms"] > 0


@pytest.mark.timeout(60)
def test_soak_smoke(tmp_path: Path) -> None:
    # 12 s of load (the ~20 s per-test budget; CI's half-minute soak is this with --minutes 0.5):
    # more churn and faster rotation than the defaults so both kinds of reconnect and several
    # evaluation ends happen in that time.
    from bench.soak import main

    status = main(["--minutes", "0.2", "--n", "200", "--evaluations", "10", "--rate", "2000", "--churn", "0.5",
                   "--rotate", "3", "--linger", "1", "--out", str(tmp_path), "--no-plot"])
    document = json.loads((tmp_path / "soak.json").read_text())
    result = document["result"]
    assert result["problems"] == [] and status == 0
    assert result["violations"] == 0 and result["complete"] == 200
    assert result["after"]["back"] is True
    assert result["after"]["fds"] <= result["baseline"]["fds"]
    assert result["after"]["gateway_upstream_streams"] == result["baseline"]["gateway_upstream_streams"] == 0
    assert result["after"]["gateway_subscribers"] == 0
    assert result["reconnects"].get("with Last-Event-ID", 0) > 0 and result["reconnects"].get("without an id", 0) > 0
    assert result["rotations"] >= 3 and result["moves"] > 0
    assert "zero delivery gaps" in (tmp_path / "soak.md").read_text()


def test_admission_micro_benchmark_runs() -> None:
    import uvloop

    from bench import admission

    result = uvloop.run(admission.measure(count=20, rounds=1))
    assert [row["kind"] for row in result["rows"]] == ["HS256", "RS256", "ES256"]
    for row in result["rows"]:
        assert row["decode_distinct_us"] > 0 and 0 < row["admit_distinct_us"] < 100_000
    assert result["jwks_requests"] == 2  # once per JWKS kind (RS256, ES256), then cached, as in production
