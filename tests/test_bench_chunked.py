"""The bench's chunked-body decoder (used by its load generator and its raw reference server)."""

from __future__ import annotations

import pytest

from bench.chunked import Dechunker

BODY = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in [b"hello ", b"chunked ", b"world"]) + b"0\r\n\r\n"


@pytest.mark.parametrize("step", [1, 2, 3, 7, len(BODY)])
def test_reads_of_any_size_give_the_body_back(step: int) -> None:
    decoder = Dechunker()
    out = b"".join(decoder.feed(BODY[i:i + step]) for i in range(0, len(BODY), step))
    assert out == b"hello chunked world"
    assert decoder.ended


def test_nothing_after_the_last_chunk() -> None:
    decoder = Dechunker()
    assert decoder.feed(b"3\r\nabc\r\n0\r\n\r\n5\r\nxxxxx\r\n") == b"abc"
    assert decoder.ended and decoder.feed(b"3\r\nabc\r\n") == b""
