"""The fan-out engine: topics with one shared, bounded log each, and a cursor per subscriber.

`ports` (the seams), `subscription` (a cursor and its owner's callbacks), `topic` (the log,
resume positions and the fan-out pass), `flush` (one deferred pass per loop iteration) and
`registry` (the `Hub`: topics by key, their lifecycle and the subscribers' clock). No I/O
library is imported here: the hub never touches a socket.
"""
