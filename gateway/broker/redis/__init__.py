"""The shared broker on Redis, by concept: `keys` and `scripts` (the keyspace and its Lua), `client`
(connection and health), `writer` (the holder's fenced appends), `session` (tailer and lease per
stream), `broker` (the `Broker`), `exclusive` (the cluster-wide one-stream rule), `caches`."""
