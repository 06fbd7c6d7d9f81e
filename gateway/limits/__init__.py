"""Limits the gateway enforces towards browsers: `connections` (caps on open connections),
`quota` (distinct streams per consumer), `exclusive` (one stream per consumer and resource) and
`ratelimit` (the token bucket on WebSocket client messages)."""
