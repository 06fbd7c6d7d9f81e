"""A stand-in for the Stratix upstream API, for the demo, the tests and the benchmarks.

It serves what UPSTREAM.md decides the real API does, deterministically per id:

* `GET /api/v1/evaluations/{id}/stream` and `/api/v1/trace-evaluations/{id}/stream`: SSE
  (`status`, `row_complete`, `progress`, then `final` or, for ids containing "fail", `error`),
  integer ids from 1, `retry:` once, `Last-Event-ID` replay, 409 `stream_already_open` for a
  second concurrent stream per API key, heartbeat comments, close after inactivity;
* `GET /api/v1/evaluations/{id}`, `/api/v1/trace-evaluations/{id}`: the Evaluation object;
  `GET /api/v1/evaluations` and `/api/v1/optimizations`: the configured ids with their status;
  `GET /api/v1/optimizations/{id}`: a job's progress; ids starting with "missing" are 404;
* `/ws/optimization`: the multiplexed optimization WebSocket (subscribe, unsubscribe, ping).

Everything under `/api/` and `/ws/` needs `X-API-Key`. The `/_sim/` control plane needs none;
it is a loopback tool for tests and benchmarks, never to be exposed:

* `GET /_sim/stats`: per resource ("evaluations/e1", "trace-evaluations/t1", "optimizations/j1")
  `{"connects", "open", "max_concurrent", "rejected", "polls"}`, plus
  `"ws_connections": {"connects", "open", "max_concurrent"}` and `"requests": {resource: {"polls"}}`;
* `POST /_sim/drop` `{"resource"?: str, "mode"?: "abort"|"eof"}`: cut live connections (all when no
  resource); SSE "abort" kills the socket mid-body, "eof" ends the body without a terminal event;
  WebSockets close with 1011. Answers `{"dropped": n}`;
* `POST /_sim/configure` `{"resource", "rows"?, "iterations"?, "interval"?, "inactivity_timeout"?,
  "fail"?, "cancel"?, "pause"?}`: per-resource overrides, before the resource is first touched (409 after);
* `POST /_sim/jobs/{id}/pause|resume|cancel`: steer a job (409 once it has ended);
* `POST /_sim/reset`: drop every connection and forget all runs, overrides and counters.

Runs start on first touch (stream, GET, subscribe) and are one task each, cancelled by the
app's lifespan. An open SSE stream keeps uvicorn's graceful shutdown waiting (ASGI has no
shutdown signal for HTTP responses), so run it with `timeout_graceful_shutdown` set.
"""

from gateway.sim.app import create_sim_app
from gateway.sim.settings import SimSettings, add_sim_arguments, settings_from_args

__all__ = ["SimSettings", "add_sim_arguments", "create_sim_app", "settings_from_args"]
