"""Watches the header section of a message as it streams to the spool.

Only the header section is looked at (it ends at the first empty line, or at the first line
that is neither a header field nor a continuation, as Postfix's cleanup decides), so the cost
does not grow with the body. It counts ``Received:`` fields for loop detection
(RFC 5321 §6.3) and bounds the header section's size.
"""

from __future__ import annotations


class HeaderScanner:
    __slots__ = ("limit", "received", "size", "too_large", "done", "_partial")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.received = 0
        self.size = 0
        self.too_large = False
        self.done = False
        self._partial = b""

    def feed(self, data: bytes) -> None:
        if self.done:
            return
        text = self._partial + data if self._partial else data
        start = 0
        while True:
            nl = text.find(b"\n", start)
            if nl < 0:
                break
            line = text[start:nl + 1]
            start = nl + 1
            self.size += len(line)
            if line in (b"\r\n", b"\n"):
                self.done = True
                return
            first = line[:1]
            if first in (b" ", b"\t"):
                continue
            colon = line.find(b":")
            if colon <= 0 or b" " in line[:colon].rstrip(b" \t") :
                self.done = True  # not a header field: the body has begun
                return
            if line[:9].lower() == b"received:":
                self.received += 1
            if self.size > self.limit:
                self.too_large = True
                self.done = True
                return
        self._partial = text[start:]
        if len(self._partial) + self.size > self.limit:
            self.too_large = True
            self.done = True
