"""Outbound message hygiene: what a message needs before it may go to a given SMTP peer.

RFC 6152 §3: an 8-bit body must not be sent to a server that does not advertise 8BITMIME;
the client converts it to 7 bits (or returns it). :func:`to_7bit` does Postfix's conversion:
every MIME leaf part whose body holds 8-bit octets and whose Content-Transfer-Encoding is
7bit/8bit/binary/absent is re-encoded as quoted-printable, and its Content-Transfer-Encoding
header is replaced. Multipart bodies are walked by their boundaries at the byte level, so
every other byte -- headers included, and with them DKIM signatures over unchanged parts --
stays exactly as received. Header fields with raw 8-bit octets are left alone (only
SMTPUTF8 makes them legal; Postfix sends them as they are too).

The other checks (SMTPUTF8, SIZE) are small predicates used by the relay agent.
"""

from __future__ import annotations

import binascii
import re
from email.parser import BytesHeaderParser
from email.policy import compat32

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_CTE_LINE = re.compile(rb"(?im)^content-transfer-encoding[ \t]*:.*(?:\r?\n[ \t].*)*\r?\n")
_8BIT = re.compile(rb"[\x80-\xff]")
_MAX_DEPTH = 32


def has_8bit(data: bytes) -> bool:
    return not data.isascii()


def header_section(data: bytes) -> bytes:
    """The header section of a message (up to, not including, the empty line)."""
    m = _HEADER_END.search(data)
    return data[:m.start()] if m else data


def needs_smtputf8(sender: str, recipients: list[str], data: bytes) -> bool:
    """True when the envelope or the header section has non-ASCII text (RFC 6531 §3.2):
    such a message cannot be sent to a server without SMTPUTF8."""
    if not sender.isascii() or not all(r.isascii() for r in recipients):
        return True
    return not header_section(data).isascii()


def _split(part: bytes) -> tuple[bytes, bytes, bytes]:
    """(headers incl. their final line break, the empty line, body)."""
    for lead in (b"\r\n", b"\n"):
        if part.startswith(lead):  # a body part without header fields
            return b"", lead, part[len(lead):]
    m = _HEADER_END.search(part)
    if m is None:
        return part, b"", b""
    first_break = data_break = m.group()
    # the first line break ends the last header line, the second is the empty line
    split = 2 if first_break.startswith(b"\r\n") else 1
    return part[:m.start() + split], data_break[split:], part[m.end():]


def _qp(body: bytes) -> bytes:
    """Quoted-printable with CRLF line breaks and soft breaks at 76 columns."""
    lines = body.split(b"\r\n")
    out = binascii.b2a_qp(b"\n".join(lines), quotetabs=False, istext=True, header=False)
    return out.replace(b"\n", b"\r\n")


def _convert(part: bytes, depth: int) -> bytes:
    headers, empty, body = _split(part)
    if not empty or not has_8bit(body) or depth > _MAX_DEPTH:
        return part
    msg = BytesHeaderParser(policy=compat32).parsebytes(headers)
    ctype = msg.get_content_type()
    cte = str(msg.get("content-transfer-encoding", "7bit")).strip().lower()
    if msg.get_content_maintype() == "multipart":
        boundary = msg.get_boundary()
        if not boundary:
            return part
        return headers + empty + _convert_multipart(body, boundary.encode("latin-1"), depth)
    if ctype == "message/rfc822":
        return headers + empty + _convert(body, depth + 1)
    if cte not in ("7bit", "8bit", "binary"):
        return part  # already encoded (base64/qp): 8-bit octets there are garbage, not text
    new_headers = _CTE_LINE.sub(b"", headers)
    new_headers += b"Content-Transfer-Encoding: quoted-printable\r\n"
    if depth == 0 and msg.get("mime-version") is None:
        new_headers += b"MIME-Version: 1.0\r\n"
    return new_headers + empty + _qp(body)


def _convert_multipart(body: bytes, boundary: bytes, depth: int) -> bytes:
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
            seg_end = m.start()
            crlf = 2 if body[max(seg_end - 2, 0):seg_end] == b"\r\n" else (
                1 if body[max(seg_end - 1, 0):seg_end] == b"\n" else 0)
            out.append(_convert(body[start:seg_end - crlf], depth + 1))
            out.append(body[seg_end - crlf:line_end])
        pos = start = line_end
        if m.group(1):  # close delimiter: the rest is epilogue
            start = None
            break
    if start is not None:  # no close delimiter: the last part runs to the end
        out.append(_convert(body[start:], depth + 1))
    else:
        out.append(body[pos:])
    return b"".join(out)


def to_7bit(data: bytes) -> bytes:
    """``data`` with every 8-bit body part re-encoded as quoted-printable (see the module
    docstring). A message that is already 7-bit is returned unchanged."""
    if not has_8bit(data):
        return data
    return _convert(data, 0)
