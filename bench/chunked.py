"""HTTP/1.1 chunked transfer decoding (sans-I/O), for the bench's own clients and servers."""

from __future__ import annotations


class Dechunker:
    """Turns a chunked body, fed in reads of any size, back into its bytes."""

    __slots__ = ("ended", "left", "size_line")

    def __init__(self) -> None:
        self.left = 0  # bytes of the current chunk still to come, its trailing CRLF included
        self.size_line = b""  # an incomplete chunk-size line carried over to the next read
        self.ended = False  # the last (zero-size) chunk arrived

    def feed(self, data: bytes) -> bytes:
        """The body bytes in `data` (none once the body has ended)."""
        if self.size_line:
            data = self.size_line + data
            self.size_line = b""
        parts: list[bytes] = []
        pos = 0
        size = len(data)
        while pos < size and not self.ended:
            if self.left:
                take = min(self.left, size - pos)
                body_bytes = min(take, self.left - 2)
                if body_bytes > 0:
                    parts.append(data[pos:pos + body_bytes])
                pos += take
                self.left -= take
                continue
            eol = data.find(b"\r\n", pos)
            if eol < 0:
                self.size_line = data[pos:]
                break
            length = int(data[pos:eol].split(b";", 1)[0], 16)
            pos = eol + 2
            if length == 0:
                self.ended = True
                break
            self.left = length + 2
        if len(parts) == 1:
            return parts[0]
        return b"".join(parts)
