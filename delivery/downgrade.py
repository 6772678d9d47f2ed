"""Outbound message hygiene: what a message needs before it may go to a given SMTP peer.

RFC 6152 §3: an 8-bit body must not be sent to a server that does not advertise 8BITMIME;
the client converts it to 7 bits (or returns it). :func:`to_7bit` does Postfix's conversion:
every MIME leaf part whose body holds 8-bit octets and whose Content-Transfer-Encoding is
7bit/8bit/binary/absent is re-encoded as quoted-printable, and its Content-Transfer-Encoding
header is replaced. Multipart bodies are walked by their boundaries at the byte level, so
every other byte -- headers included, and with them DKIM signatures over unchanged parts --
stays exactly as received. Header fields with raw 8-bit octets are left alone (only
SMTPUTF8 makes them legal; Postfix sends them as they are too). So are 8-bit octets that
belong to no leaf part: a multipart preamble or epilogue, or the body of a multipart whose
delimiter never occurs or whose boundary is empty (malformed messages, where a part
begins only by a reader's guess); no Content-Transfer-Encoding applies there
(RFC 2045 §6.4), and re-encoding would change the structure a signature covers.
Parts nested deeper than 32 levels are sent as they are too (bounded work per message).

The other checks (SMTPUTF8, SIZE) are small predicates used by the relay agent.
"""

from __future__ import annotations

import binascii
import re
from email.parser import BytesHeaderParser
from email.policy import compat32

_HEADER_END = re.compile(rb"\r?\n\r?\n")
# A line that may belong to a header section (the stdlib parser's own test): a field
# "name:" (any printable name, even empty), a continuation, or an mbox "From " line.
_HEADER_LINE = re.compile(rb"From |[\x21-\x39\x3b-\x7e]*:|[\t ]")
_CTE_LINE = re.compile(rb"(?im)^content-transfer-encoding[ \t]*:.*(?:\r?\n[ \t].*)*\r?\n")
_8BIT = re.compile(rb"[\x80-\xff]")
_LEADING_DASH = re.compile(rb"(?m)^-")
_MAX_DEPTH = 32


def has_8bit(data: bytes) -> bool:
    return not data.isascii()


def header_section(data: bytes) -> bytes:
    """The header section of a message: up to the empty line, or up to the first line that
    cannot be a header field (a message without the empty line, or whose first line is
    already text: everything from there is body, as every MIME parser reads it)."""
    headers, _, _ = _split(data)
    return headers.rstrip(b"\r\n")


def _split(part: bytes) -> tuple[bytes, bytes, bytes]:
    """(headers incl. their final line break, the empty line, body).

    The body starts after the first empty line, or -- without one -- at the first line that
    cannot be part of a header section; then the empty line is ``b""`` and the body is not
    (a message whose first line is text has no header fields at all). A ``From `` line that
    is the last of several header lines is read as the body's first line, with the empty
    line after it dropped, as the stdlib's parser (and with it most Python readers) reads
    it; the body returned is then a new string and the empty line ``b""``. Work is linear
    in the header section: each line is looked at once.
    """
    pos = 0
    last = -1       # where the previous header line starts
    size = len(part)
    while pos < size:
        nl = part.find(b"\n", pos)
        end = size if nl < 0 else nl + 1
        line = part[pos:end]
        if line in (b"\r\n", b"\n"):
            if _from_line_last(part, last):
                return part[:last], b"", part[last:pos] + part[end:]
            return part[:pos], line, part[end:]
        if not _HEADER_LINE.match(line):
            break
        last, pos = pos, end
    if _from_line_last(part, last):
        return part[:last], b"", part[last:]
    return part[:pos], b"", part[pos:]


def _from_line_last(part: bytes, last: int) -> bool:
    """The last header line is a ``From `` line that is not the first (which is an mbox
    envelope line): a reader takes it for the first line of the body."""
    return last > 0 and part.startswith(b"From ", last)


def _without_trailing_from_lines(headers: bytes) -> bytes:
    """``headers`` without the ``From `` lines at its end (never the first line). A reader
    ignores a ``From `` line inside a header section but takes the last line for the body's
    first: once we write an empty line after the header section, such a line would become
    the last one and turn into body text. Dropping it keeps what every reader sees."""
    end = len(headers)
    while end > 0:
        start = headers.rfind(b"\n", 0, end - 1) + 1     # where the line before ``end`` starts
        if start == 0 or not headers.startswith(b"From ", start):
            break
        end = start
    return headers[:end]


def _qp(body: bytes) -> bytes:
    """Quoted-printable with CRLF line breaks and soft breaks at 76 columns.

    A soft break can start a line with text that was mid-line before, such as ``--XX``, a
    delimiter of the enclosing multipart: a leading ``-`` is therefore always written as
    ``=2D`` (the same octet once decoded), so no line we make can end a part."""
    lines = body.split(b"\r\n")
    out = binascii.b2a_qp(b"\n".join(lines), quotetabs=False, istext=True, header=False)
    out = _LEADING_DASH.sub(b"=2D", out)
    return out.replace(b"\n", b"\r\n")


def _convert(part: bytes, depth: int, default_type: str = "text/plain") -> bytes:
    """``part`` converted; ``default_type`` is its type when it declares none (RFC 2046
    §5.1.5: message/rfc822 in a multipart/digest)."""
    headers, empty, body = _split(part)
    if not has_8bit(body) or depth > _MAX_DEPTH:
        return part
    if not empty:   # no empty line before the body: we write one
        headers, empty = _without_trailing_from_lines(headers), b"\r\n"
    msg = BytesHeaderParser(policy=compat32).parsebytes(headers)
    msg.set_default_type(default_type)
    maintype = msg.get_content_maintype()
    cte = str(msg.get("content-transfer-encoding", "7bit")).strip().lower()
    if maintype == "multipart":
        boundary = msg.get_boundary()
        try:    # the header's own octets (kept by surrogateescape), as delimiter lines hold them
            delimiter = boundary.encode("ascii", "surrogateescape") if boundary else b""
        except UnicodeEncodeError:
            delimiter = b""     # e.g. RFC 2231-decoded text no delimiter line can carry
        if not delimiter:
            return part
        child_type = ("message/rfc822" if msg.get_content_subtype() == "digest"
                      else "text/plain")
        converted = _convert_multipart(body, delimiter, depth, child_type)
        if converted == body:
            return part         # no delimiter, or no 8-bit leaf: nothing to write anew
        return headers + empty + converted
    if maintype == "message":
        # Every message/* (not only rfc822) holds a message, as MIME parsers read it, and
        # must not be given a Content-Transfer-Encoding: convert inside, or leave it.
        if msg.get_content_type() == "message/delivery-status":
            return part         # header blocks, no body parts: nothing to convert in it
        return headers + empty + _convert(body, depth + 1)
    if cte in ("base64", "quoted-printable"):
        return part  # already encoded: 8-bit octets there are garbage, not text
    # 7bit/8bit/binary, empty, or a token nobody knows: the octets are the content as sent,
    # and a reader that cannot decode the declared encoding has nothing better (RFC 2045 §6.4)
    new_headers = _CTE_LINE.sub(b"", headers)
    new_headers += b"Content-Transfer-Encoding: quoted-printable\r\n"
    if depth == 0 and msg.get("mime-version") is None:
        new_headers += b"MIME-Version: 1.0\r\n"
    return new_headers + empty + _qp(body)


def _convert_multipart(body: bytes, boundary: bytes, depth: int, child_type: str) -> bytes:
    delimiter = re.compile(rb"(?m)^--" + re.escape(boundary) + rb"(--)?[ \t]*\r?$")
    out: list[bytes] = []
    pos = 0
    start: int | None = None
    for m in delimiter.finditer(body):
        line_end = body.find(b"\n", m.end())
        line_end = len(body) if line_end < 0 else line_end + 1
        if start is None:
            out.append(body[:line_end])  # preamble and first delimiter
        else:
            # the line break before a delimiter belongs to the delimiter (RFC 2046 §5.1.1)
            # (but never one that already ended the previous delimiter: an empty part)
            seg_end = m.start()
            crlf = 2 if body[max(seg_end - 2, 0):seg_end] == b"\r\n" else (
                1 if body[max(seg_end - 1, 0):seg_end] == b"\n" else 0)
            brk = max(seg_end - crlf, start)
            out.append(_convert(body[start:brk], depth + 1, child_type))
            out.append(body[brk:line_end])
        pos = start = line_end
        if m.group(1):  # close delimiter: the rest is epilogue
            start = None
            break
    if start is not None:  # no close delimiter: the last part runs to the end
        out.append(_convert(body[start:], depth + 1, child_type))
    else:
        out.append(body[pos:])
    return b"".join(out)


def to_7bit(data: bytes) -> bytes:
    """``data`` with every 8-bit body part re-encoded as quoted-printable (see the module
    docstring). A message that is already 7-bit is returned unchanged."""
    if not has_8bit(data):
        return data
    return _convert(data, 0)
