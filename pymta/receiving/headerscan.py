"""Watches the header section of a message as it streams to the spool.

Only the header section is looked at (it ends at the first empty line, or at the first line
that is neither a header field nor a continuation, as Postfix's cleanup decides; the field
rule is :data:`pymta.pipeline.headers.FIELD_START`, Postfix's ``is_header()``), so the cost
does not grow with the body. It counts ``Received`` fields for loop detection
(RFC 5321 §6.3), in any letter case and with blanks before the colon (``Received :``, RFC
5322's obsolete syntax, is a hop like any other: Postfix counts it), bounds the header
section's size, and notes a ``TLS-Required: No`` field (RFC 8689 §3: the sender lets relays
ignore TLS policy), whose value it keeps at most ``TLS_VALUE_MAX`` octets of: the one value
defined is ``No``, so anything longer is some other value.

A first line that starts with a blank continues no field of the client's: as Postfix's smtpd
(which writes an empty line before it, so it starts the body), the header section ends there.

Implementation summary. Work per read is O(len(data)) however long a line is: only the new
bytes are searched for the line end, and a line that has not ended yet is kept as what
still matters about it (issue 10 review: keeping the whole unfinished line and prepending
it to every read made a megabyte ``Subject:`` in 32-byte reads cost 3.6 s of CPU). Complete
lines are classified as they arrive and their size added to the header section's, which is
compared with the limit. A line still waiting for its end is classified as soon as its
beginning decides what it is: a field (its name is complete: whether it is ``Received`` is
known), a continuation, or the body. From then on it is a byte count that is compared with
the limit as it grows. While it is only "a name so far" (printable ASCII, then blanks) it is
kept shortened to what the decision still needs (the first nine name characters and one
blank) plus a count of the bytes left out, so memory stays bounded and the answers do not
depend on how the bytes were cut into reads; a name so far that is still the start of
``TLS-Required`` (longer than nine characters) is remembered by its length, and given back
its left-out characters when the line goes on. A field line that ends with the data (no final
CRLF, as BDAT allows) still counts: :attr:`received` includes it.
"""

from __future__ import annotations

import re

from pymta.pipeline.headers import FIELD_START

_match_field = FIELD_START.match
# the start of a line that may still become a field: name characters, then blanks
_name_so_far = re.compile(rb"([\x21-\x39\x3b-\x7e]*)([ \t]*)").fullmatch
_TLS_REQUIRED = b"tls-required"
_NAME_KEPT = 9          # characters of a name so far kept (enough to tell ``Received``)
TLS_VALUE_MAX = 64      # octets of a TLS-Required value kept: ``No`` with room for blanks


def _received_field(line: bytes, end: int) -> bool:
    """Is the field whose colon ends at ``end`` named ``Received`` (any case, blanks allowed
    before the colon)?"""
    return line[:8].lower() == b"received" and not line[8:end - 1].strip(b" \t")


def _tls_required_field(line: bytes, end: int) -> bool:
    """Is the field whose colon ends at ``end`` named ``TLS-Required`` (as ``Received``)?"""
    return line[:12].lower() == _TLS_REQUIRED and not line[12:end - 1].strip(b" \t")


def _says_no(value: bytes) -> bool:
    """Is a TLS-Required field's value (unfolded, blanks around it ignored) ``No``? RFC 8689
    §3: ``"TLS-Required:" [FWS] "No"``; ABNF strings ignore letter case."""
    if len(value) > TLS_VALUE_MAX:
        return False
    return value.replace(b"\r\n", b"").replace(b"\n", b"").strip(b" \t").lower() == b"no"


class HeaderScanner:
    __slots__ = ("limit", "size", "too_large", "done", "_received", "_partial", "_dropped",
                 "_fields", "_pending", "_pending_received", "_tls_prefix", "_tls_value",
                 "_tls_no", "_tls_other")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self.too_large = False
        self.done = False
        self._received = 0
        self._partial = b""     # the start of an undecided pending line, shortened
        self._dropped = 0       # bytes of that line left out of ``_partial``
        self._fields = False    # a field of the client's has been seen
        self._pending = -1      # bytes so far of a pending line known to be a header line
        self._pending_received = 0  # that line is a Received field
        self._tls_prefix = -1   # length of the name so far in ``_partial`` if TLS-Required's
        self._tls_value: bytes | None = None    # a TLS-Required value being read (bounded)
        self._tls_no = False    # a TLS-Required field said No
        self._tls_other = False  # a TLS-Required field said something else

    @property
    def tls_required_no(self) -> bool:
        """The header section has ``TLS-Required: No`` (RFC 8689 §3), and no TLS-Required
        field that says anything else: an unknown value asks for no relaxation."""
        no, other = self._tls_no, self._tls_other
        if self._tls_value is not None:         # the last field, its end still to come
            if _says_no(self._tls_value):
                no = True
            else:
                other = True
        return no and not other

    def _tls_end(self) -> None:
        """The TLS-Required field being read is complete: note what it said."""
        value = self._tls_value
        if value is not None:
            self._tls_value = None
            if _says_no(value):
                self._tls_no = True
            else:
                self._tls_other = True

    def _tls_start(self, line: bytes, end: int) -> None:
        """A field begins at ``line`` (its colon ends at ``end``): read its value if it is
        TLS-Required."""
        if _tls_required_field(line, end):
            self._tls_value = b""
            self._tls_more(line, end)

    def _tls_more(self, data: bytes, start: int = 0, stop: int | None = None) -> None:
        """``data[start:stop]`` continues the TLS-Required field being read, if one is (a
        continuation line, or its line's rest); only what the bound leaves room for is
        copied."""
        value = self._tls_value
        if value is not None and len(value) <= TLS_VALUE_MAX:
            room = TLS_VALUE_MAX + 1 - len(value)
            stop = len(data) if stop is None else stop
            self._tls_value = value + data[start:min(stop, start + room)]

    def _resume_partial(self) -> bytes:
        """The kept start of an undecided line, to be continued by the next read: a start of
        ``TLS-Required`` gets back the letters shortening left out (and they are no longer
        counted as left out)."""
        partial = self._partial
        if self._tls_prefix > _NAME_KEPT:
            self._dropped -= self._tls_prefix - _NAME_KEPT
            partial = _TLS_REQUIRED[:self._tls_prefix] + partial[_NAME_KEPT:]
        self._tls_prefix = -1
        self._partial = b""
        return partial

    @property
    def received(self) -> int:
        """``Received`` fields of the header section so far, the pending line included."""
        if self.done:
            return self._received
        return self._received + self._pending_received

    def feed(self, data: bytes) -> None:
        if self.done:
            return
        start = 0
        if self._pending >= 0:                  # a header line whose end is still to come
            nl = data.find(b"\n")
            self._tls_more(data, 0, nl + 1 if nl >= 0 else None)
            if nl < 0:
                self._pending += len(data)
                if self.size + self._pending > self.limit:
                    self._over_limit()
                return
            length = self._pending + nl + 1
            self._received += self._pending_received
            self._pending, self._pending_received = -1, 0
            self.size += length
            if self.size > self.limit:
                self.too_large = self.done = True
                return
            start = nl + 1
            text = data
        elif self._partial:                     # a few bytes: the start of an undecided line
            text = self._resume_partial() + data
        else:
            text = data
        while True:
            nl = text.find(b"\n", start)
            if nl < 0:
                break
            line = text[start:nl + 1]
            start = nl + 1
            length = len(line) + self._dropped
            self._dropped = 0
            if line in (b"\r\n", b"\n"):
                self._tls_end()
                self.done = True
                return
            if line[:1] in (b" ", b"\t") and self._fields:
                self._tls_more(line)    # a continuation line
            else:
                m = _match_field(line)
                self._tls_end()
                if m is None:
                    self.done = True    # not a header field: the body has begun
                    return
                self._fields = True
                end = m.end()
                if _received_field(line, end):
                    self._received += 1
                self._tls_start(line, end)
            self.size += length
            if self.size > self.limit:
                self.too_large = True
                self.done = True
                return
        if start < len(text):
            self._classify(text[start:] if start else text)

    def _classify(self, rest: bytes) -> None:
        """``rest`` begins the next line (its end is still to come): decide what it is if its
        beginning tells, else keep only what the decision needs."""
        if rest[:1] in (b" ", b"\t"):
            if not self._fields:
                self._tls_end()
                self.done = True                       # the body: nothing it can continue
                return
            self._pending_received = 0                 # a continuation line
            self._tls_more(rest)
        else:
            field = _match_field(rest)
            if field is not None:
                self._tls_end()
                self._fields = True
                end = field.end()
                self._pending_received = int(_received_field(rest, end))
                self._tls_start(rest, end)
            else:
                m = _name_so_far(rest)
                if m is None:
                    self._tls_end()
                    self.done = True                   # cannot become a field: the body
                    return
                full, blanks = m.group(1), m.group(2)[:1]
                # a name so far: shorten it, remembering a start of TLS-Required's by length
                self._tls_prefix = (len(full) if full and _TLS_REQUIRED.startswith(full.lower())
                                    and (not m.group(2) or len(full) == len(_TLS_REQUIRED))
                                    else -1)
                name = full[:_NAME_KEPT]
                self._dropped += len(rest) - len(name) - len(blanks)
                self._partial = name + blanks
                return
        self._pending = self._dropped + len(rest)
        self._dropped = 0
        if self.size + self._pending > self.limit:
            self._over_limit()

    def _over_limit(self) -> None:
        """The pending header line passes the limit: counted as a complete line would be."""
        self._received += self._pending_received
        self._pending, self._pending_received = -1, 0
        self.too_large = self.done = True
