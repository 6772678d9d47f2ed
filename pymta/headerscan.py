"""Watches the header section of a message as it streams to the spool.

Only the header section is looked at (it ends at the first empty line, or at the first line
that is neither a header field nor a continuation, as Postfix's cleanup decides; the field
rule is :data:`pymta.pipeline.headers.FIELD_START`, Postfix's ``is_header()``), so the cost
does not grow with the body. It counts ``Received`` fields for loop detection
(RFC 5321 §6.3), in any letter case and with blanks before the colon (``Received :``, RFC
5322's obsolete syntax, is a hop like any other: Postfix counts it), and bounds the header
section's size.

A first line that starts with a blank continues no field of the client's: as Postfix's smtpd
(which writes an empty line before it, so it starts the body), the header section ends there.

Implementation summary. Complete lines are classified as they arrive; the size of the header
section (fields and their continuation lines) is compared with the limit after each. A line
still waiting for its end is classified as soon as its beginning decides what it is (a field,
a continuation, or the body); while it is only "a name so far" (printable ASCII, then
blanks) it is kept shortened to what still matters for that decision (the first nine name
characters and one blank), so memory stays bounded and the answers do not depend on how the
bytes were cut into reads. A field line that ends with the data (no final CRLF, as BDAT
allows) still counts: :attr:`received` includes it.
"""

from __future__ import annotations

import re

from pymta.pipeline.headers import FIELD_START

_match_field = FIELD_START.match
# the start of a line that may still become a field: name characters, then blanks
_name_so_far = re.compile(rb"([\x21-\x39\x3b-\x7e]*)([ \t]*)").fullmatch


def _received_field(line: bytes, end: int) -> bool:
    """Is the field whose colon ends at ``end`` named ``Received`` (any case, blanks allowed
    before the colon)?"""
    return line[:8].lower() == b"received" and not line[8:end - 1].strip(b" \t")


class HeaderScanner:
    __slots__ = ("limit", "size", "too_large", "done", "_received", "_partial", "_dropped",
                 "_fields")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self.too_large = False
        self.done = False
        self._received = 0
        self._partial = b""
        self._dropped = 0       # bytes of the pending line left out of ``_partial``
        self._fields = False    # a field of the client's has been seen

    @property
    def received(self) -> int:
        """``Received`` fields of the header section so far, the pending line included."""
        partial = self._partial
        if self.done or not partial or partial[:1] in (b" ", b"\t"):
            return self._received
        m = _match_field(partial)
        return self._received + (m is not None and _received_field(partial, m.end()))

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
            length = len(line) + self._dropped
            self._dropped = 0
            if line in (b"\r\n", b"\n"):
                self.done = True
                return
            if line[:1] in (b" ", b"\t") and self._fields:
                pass                    # a continuation line
            else:
                m = _match_field(line)
                if m is None:
                    self.done = True    # not a header field: the body has begun
                    return
                self._fields = True
                if _received_field(line, m.end()):
                    self._received += 1
            self.size += length
            if self.size > self.limit:
                self.too_large = True
                self.done = True
                return
        self._partial = text[start:]
        if self.size + len(self._partial) + self._dropped > self.limit:
            self._pending_over_limit()

    def _pending_over_limit(self) -> None:
        """The line still waiting for its end would pass the limit if it is a header line:
        decide now when its beginning tells, else keep only what the decision needs."""
        partial = self._partial
        field = _match_field(partial)
        if partial[:1] in (b" ", b"\t"):
            header = self._fields                      # a continuation, or the body
        elif field is not None:
            header = True                              # counted as a complete line would be
            self._received += _received_field(partial, field.end())
        else:
            m = _name_so_far(partial)
            if m is None:
                header = False                         # cannot become a field: the body
            else:                                      # a name so far: shorten it
                name, blanks = m.group(1)[:9], m.group(2)[:1]
                self._dropped += len(partial) - len(name) - len(blanks)
                self._partial = name + blanks
                return
        self.done = True
        self.too_large = header
