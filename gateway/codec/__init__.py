"""Wire formats and vocabulary, pure (no I/O, nothing else of the gateway): `streams` (names and
ids), `sse` (SSE encode/decode), `ws_frames` and `ws_messages` (the browser WebSocket), `events`
(an event encoded once per wire format) and `closes` (the close-code catalogue)."""
