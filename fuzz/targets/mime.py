"""Fuzz target: the 8-bit to quoted-printable downgrade (``pymta.delivery.downgrade``) and the
other predicates the relay agent applies to a spooled message.

Input: the message (raw, then in spool form: CRLF lines, as the spool holds it).

Contract checked (module docstring of ``downgrade``):
* ``to_7bit``, ``header_section`` and ``body.in_memory`` (the relay's outgoing body: 8-bit
  and header checks) never raise; a 7-bit message comes
  back unchanged;
* after ``to_7bit`` of a spool-form message, the body of every leaf part whose
  Content-Transfer-Encoding is not base64/quoted-printable is 7-bit (only header fields may
  keep raw 8-bit octets, as documented, and so may a declared multipart whose delimiter
  never occurs), no line longer than 998 octets appears that was not
  in the input already, and the stdlib parser sees the same MIME tree with the same decoded
  content in every leaf (line ends aside).
"""

from __future__ import annotations

import email
import email.message
import re
from email.policy import compat32

from fuzz.harness import MAX_HEADER_LINE, Input, require, spool_form
from pymta.delivery.body import in_memory
from pymta.delivery.downgrade import header_section, to_7bit

_ENCODED = ("base64", "quoted-printable")


def _leaves(data: bytes) -> list[email.message.Message]:
    msg = email.message_from_bytes(data, policy=compat32)
    return [part for part in msg.walk() if not part.is_multipart()]


def _decoded(part: email.message.Message) -> bytes:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):      # message/rfc822 leaves and the like
        return repr(part.get_payload()).encode()
    return payload.replace(b"\r\n", b"\n").rstrip(b"\n")


def _cte(part: email.message.Message) -> str:
    return str(part.get("content-transfer-encoding", "7bit")).strip().lower()


def _declared_multipart(part: email.message.Message) -> bool:
    """A part that says it is multipart but that the parser took as a leaf (its delimiter
    never occurs): its octets belong to no leaf, and ``downgrade`` documents that it sends
    them as they are (RFC 2045 §6.4: no encoding applies to a multipart body)."""
    return str(part.get("content-type", "")).strip().lower().startswith("multipart")


_BCHARS = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")


def _malformed_multipart(data: bytes) -> bool:
    """A multipart without a valid RFC 2046 boundary (empty, too long, other characters):
    where its parts begin is a guess the stdlib makes and ``downgrade`` does not, so it is
    sent as it is (an empty boundary, documented there) or converted by its own reading."""
    msg = email.message_from_bytes(data, policy=compat32)
    return any(part.get_content_maintype() == "multipart"
               and not _BCHARS.fullmatch(part.get_boundary() or "")
               for part in msg.walk())


def _check(data: bytes) -> None:
    out = to_7bit(data)
    if data.isascii():
        require(out is data or out == data, "to_7bit changed a 7-bit message")
        return
    old_lines = set(data.split(b"\r\n"))
    long_new = [ln for ln in out.split(b"\r\n")
                if len(ln) > MAX_HEADER_LINE and ln not in old_lines]
    require(not long_new, "to_7bit made a line longer than 998 octets", long_new[:1])
    before, after = _leaves(data), _leaves(out)
    require(len(before) == len(after), "to_7bit changed the MIME structure",
            (len(before), len(after)))
    malformed = _malformed_multipart(data)
    for old, new in zip(before, after, strict=True):
        require(old.get_content_type() == new.get_content_type(),
                "to_7bit changed a part's content type",
                (old.get_content_type(), new.get_content_type()))
        if _cte(new) not in _ENCODED and not _declared_multipart(new) and not malformed:
            body = new.get_payload(decode=True)     # the raw octets for 7bit/8bit/binary
            if isinstance(body, bytes):
                require(body.isascii(), "8-bit body left in a part that is not encoded",
                        body[:200])
        require(_decoded(old) == _decoded(new), "to_7bit changed a part's decoded content",
                (_decoded(old)[:200], _decoded(new)[:200]))


def test_one_input(data: bytes) -> None:
    inp = Input(data)
    inp.text(64)        # was the sender of a check now made on the envelope alone
    message = inp.rest()
    header_section(message)
    in_memory(b"", message)
    to_7bit(message)
    _check(spool_form(message))
