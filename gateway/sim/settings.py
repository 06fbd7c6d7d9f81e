"""Settings of the Stratix simulator, and the command-line flags that build them.

Validated once, when the object is built, with every problem reported together, so a
bad flag fails at startup instead of halfway through a demo.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

DEFAULT_API_KEY = "sim-key"
"""Key the simulator accepts when neither `--api-key` nor STRATIX_API_KEY is given."""
DEFAULT_ROWS = 20
"""Rows (scored examples) per evaluation."""
DEFAULT_INTERVAL = 0.5
"""Seconds between two generated evaluation events."""
DEFAULT_INACTIVITY_TIMEOUT = 3600.0
"""Seconds without an event after which an SSE stream is closed (the documented 60 minutes)."""
DEFAULT_HEARTBEAT = 15.0
"""Seconds of silence after which a `:` comment is written; heartbeats are not activity."""
DEFAULT_RETRY_MS = 3000
"""Reconnection delay announced with `retry:` at the start of every SSE stream."""
DEFAULT_ITERATIONS = 5
"""Optimization iterations per job."""
DEFAULT_JOB_INTERVAL = 0.3
"""Seconds between two generated optimization events."""
DEFAULT_EVALUATION_IDS = ("eval-demo-1", "eval-demo-2", "eval-fail-1")
DEFAULT_JOB_IDS = ("job-demo-1", "job-demo-2")


@dataclass(frozen=True, slots=True)
class SimSettings:
    """Everything the simulator can be told; any id works, the id lists only feed the listings."""

    api_key: str = DEFAULT_API_KEY
    rows: int = DEFAULT_ROWS
    interval: float = DEFAULT_INTERVAL
    inactivity_timeout: float = DEFAULT_INACTIVITY_TIMEOUT
    heartbeat: float = DEFAULT_HEARTBEAT
    retry_ms: int = DEFAULT_RETRY_MS
    iterations: int = DEFAULT_ITERATIONS
    job_interval: float = DEFAULT_JOB_INTERVAL
    evaluation_ids: tuple[str, ...] = DEFAULT_EVALUATION_IDS
    job_ids: tuple[str, ...] = DEFAULT_JOB_IDS

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not self.api_key:
            problems.append("api_key must not be empty")
        if self.rows < 0:
            problems.append("rows must be >= 0")
        if self.iterations < 0:
            problems.append("iterations must be >= 0")
        if self.retry_ms < 0:
            problems.append("retry_ms must be >= 0")
        for name in ("interval", "job_interval"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0")
        for name in ("inactivity_timeout", "heartbeat"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0")
        for name in ("evaluation_ids", "job_ids"):
            if any(not ident or "/" in ident for ident in getattr(self, name)):
                problems.append(f"{name} must be non-empty ids without '/'")
        if problems:
            raise ValueError("invalid simulator settings: " + "; ".join(problems))


def _id_list(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def add_sim_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the simulator's flags (`--host`, `--port` and one per SimSettings field) to `parser`."""
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8090, help="port to listen on (default: %(default)s)")
    parser.add_argument("--api-key", default=os.environ.get("STRATIX_API_KEY") or DEFAULT_API_KEY,
                        help="X-API-Key the simulator accepts (default: $STRATIX_API_KEY, else sim-key)")
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS,
                        help="rows per evaluation (default: %(default)s)")
    parser.add_argument("--interval", type=float, default=DEFAULT_INTERVAL,
                        help="seconds between evaluation events (default: %(default)s)")
    parser.add_argument("--inactivity-timeout", type=float, default=DEFAULT_INACTIVITY_TIMEOUT,
                        help="close an idle SSE stream after this many seconds (default: %(default)s)")
    parser.add_argument("--heartbeat", type=float, default=DEFAULT_HEARTBEAT,
                        help="seconds between heartbeat comments (default: %(default)s)")
    parser.add_argument("--retry-ms", type=int, default=DEFAULT_RETRY_MS,
                        help="reconnection delay sent as `retry:` (default: %(default)s)")
    parser.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS,
                        help="optimization iterations per job (default: %(default)s)")
    parser.add_argument("--job-interval", type=float, default=DEFAULT_JOB_INTERVAL,
                        help="seconds between optimization events (default: %(default)s)")
    parser.add_argument("--evaluations", "--evaluation-ids", dest="evaluation_ids", type=_id_list,
                        default=DEFAULT_EVALUATION_IDS,
                        help="comma-separated evaluation ids to list (default: %(default)s)")
    parser.add_argument("--jobs", "--job-ids", dest="job_ids", type=_id_list, default=DEFAULT_JOB_IDS,
                        help="comma-separated optimization job ids to list (default: %(default)s)")


def settings_from_args(ns: argparse.Namespace) -> SimSettings:
    """Build validated settings from parsed flags; raises ValueError listing every problem."""
    return SimSettings(
        api_key=ns.api_key,
        rows=ns.rows,
        interval=ns.interval,
        inactivity_timeout=ns.inactivity_timeout,
        heartbeat=ns.heartbeat,
        retry_ms=ns.retry_ms,
        iterations=ns.iterations,
        job_interval=ns.job_interval,
        evaluation_ids=tuple(ns.evaluation_ids),
        job_ids=tuple(ns.job_ids),
    )


_OVERRIDE_TYPES: dict[str, tuple[type, ...]] = {
    "rows": (int,),
    "iterations": (int,),
    "interval": (int, float),
    "inactivity_timeout": (int, float),
    "fail": (bool,),
    "cancel": (bool,),
    "pause": (bool,),
}


@dataclass(frozen=True, slots=True)
class ResourceOverrides:
    """Per-resource settings set through `/_sim/configure` before the resource is first touched.

    `interval` is the evaluation interval or, for a job, the job interval. `fail`, `cancel`
    and `pause` force (True) or suppress (False) the outcome an id's name would select.
    """

    rows: int | None = None
    iterations: int | None = None
    interval: float | None = None
    inactivity_timeout: float | None = None
    fail: bool | None = None
    cancel: bool | None = None
    pause: bool | None = None

    @classmethod
    def parse(cls, body: dict[str, object]) -> ResourceOverrides:
        """Validate a configure request's fields (all but `resource`); raises ValueError listing problems."""
        problems: list[str] = []
        values: dict[str, object] = {}
        for name, value in body.items():
            if name == "resource":
                continue
            expected = _OVERRIDE_TYPES.get(name)
            if expected is None:
                problems.append(f"unknown field {name!r}")
            elif value is None:
                continue
            elif not isinstance(value, expected) or (bool not in expected and isinstance(value, bool)):
                problems.append(f"{name} must be {' or '.join(t.__name__ for t in expected)}")
            elif isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
                problems.append(f"{name} must be >= 0")
            elif name == "inactivity_timeout" and value == 0:
                problems.append("inactivity_timeout must be > 0")
            else:
                values[name] = float(value) if float in expected else value  # type: ignore[arg-type]
        if problems:
            raise ValueError("; ".join(problems))
        return cls(**values)  # type: ignore[arg-type]
