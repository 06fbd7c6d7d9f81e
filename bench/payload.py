"""The benchmark's event payload: ~90 bytes of JSON carrying a sequence number and its send time.

The send time is `time.time_ns()` in the publisher; the load generator subtracts it from its
own `time.time_ns()` on receipt (one machine, one clock). Every system under test passes the
payload through untouched, so one regular expression finds it in SSE frames and WebSocket
messages alike.
"""

from __future__ import annotations

import re

PAYLOAD_BYTES = 90
#: Finds (sequence, send time) in any framing; the payload has no other digits in those places.
PATTERN = re.compile(rb'"s":(\d+),"t":(\d+)')


def make_payload(seq: int, sent_ns: int) -> bytes:
    head = b'{"s":%d,"t":%d,"p":"' % (seq, sent_ns)
    return head + b"x" * max(0, PAYLOAD_BYTES - len(head) - 2) + b'"}'
