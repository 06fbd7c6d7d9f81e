"""How browsers are served: `sse` and `websocket` (the two stream transports), `direct` (the
socket handed over by the server), `ending` (when and how a stream ends, for both), `http`
(plain HTTP endpoints), `listing` and `dashboard`."""
