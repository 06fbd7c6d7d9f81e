"""The Stratix upstream: `sse_feed` (one resilient SSE stream per evaluation), `job_mux` (one
WebSocket for every optimization job), `pool` (the feeds' runner), `polling` (the coalescing
poller), `health` (is it reachable), `backoff` and `answers` (how its answers are read)."""
