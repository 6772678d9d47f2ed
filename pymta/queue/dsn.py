"""Delivery Status Notifications (RFC 3464): the bounce, delay and success reports pymta sends.

A DSN is a ``multipart/report; report-type=delivery-status`` with three parts: a human
explanation (worded like Postfix's, because users and helpdesks recognise it), the machine
readable ``message/delivery-status`` and the returned original: complete as
``message/rfc822`` or only its header as ``text/rfc822-headers`` when the sender asked for
``RET=HDRS``, the original came with REQUIRETLS (RFC 8689 §5: as if ``RET=HDRS`` was given,
``RET=FULL`` disregarded, since the report may travel where TLS is not required), or the
original is larger than ``bounce_size_limit`` (Postfix's default 50000).
For SMTPUTF8 messages the RFC 6533 types ``message/global*`` are used instead.

Only failure reports return the message itself (subject to ``RET`` and the size limit).
Success and delay reports carry its header section only, whatever ``RET`` says, as Postfix's
do: ``NOTIFY=SUCCESS`` is asked for by a sender nobody has verified, and a full copy would make
every local mailbox a reflector of arbitrary content to arbitrary addresses (RFC 3461 §4.3
leaves the choice to the MTA).

A delay report ("Delayed Mail (still being retried)", ``Action: delayed``) is Postfix's
delay warning: its status is a 4.x.x (``4.0.0`` when the last reply gave none), and each
recipient's block ends with ``Will-Retry-Until:`` (RFC 3464 §2.3.9; only in delay reports),
the time the queue gives up, which the explanation at the top repeats with the time the
message has waited so far.

"Header section" is meant as Postfix's ``bounce`` means it when it returns headers only: the
lines from the top that are header fields or their continuation lines, up to the first line
that is neither (:data:`pymta.pipeline.headers.FIELD_START`, Postfix's ``is_header()``) --
not up to the first empty line, since a message without one is accepted and its body would
otherwise come back as "headers". The spool file starts with our own ``Received:`` field,
then the client's header section. What is returned is bounded too, in whole fields (a field
that would cross the bound ends the part): ``NOTICE_HEADER_LIMIT`` (16 KiB, room for a long
``Received``/ARC chain) for success and delay reports, which anybody can ask for; for failure
reports the bounce size limit (``bounce_size_limit``, 50,000), the most of the original any
failure report returns in full, so no notice carries more of a message than that.

Every value written into a header field or a DSN field is checked for that field's syntax
here, whatever the receiving side let through (old queue files exist): addresses go in as
``rfc822`` when they are plain printable ASCII, else as RFC 6533 ``utf-8`` addresses with
``\\x{HHHH}`` escapes; ENVID and ORCPT are xtext-decoded only when the result is printable;
Remote-MTA must be a host name or address literal; free text (remote replies) is one line of
printable characters. Nothing a client chose reaches the report raw.

No line we write exceeds RFC 5322's 998 octets, whatever the input (a next hop answers a
longer one with ``500 Line too long``, and the notice is lost). Lengths are counted in octets,
not characters: under SMTPUTF8 a character is up to four. A ``Diagnostic-Code`` longer than a
line is folded at its spaces (DSN fields are header fields, RFC 3464 §2.1.1, so folding is
allowed and a parser unfolds it); a word too long for any line, an address, and the reason in
the human-readable part (plain text that is not unfolded) are cut instead. The returned
original is returned as it was received.

The report is assembled by hand rather than with :mod:`email`: the original is streamed from
the spool (it may be large, and only its header may be needed), it must be returned byte for
byte, and every line must end in CRLF. Tests parse the result back with the stdlib parser.
"""

from __future__ import annotations

import email.utils
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from ..pipeline.headers import FIELD_START
from ..types import Envelope, Recipient, Reply

BOUNCE_SIZE_LIMIT = 50000
NOTICE_HEADER_LIMIT = 16384   # octets of the original's header a success/delay report returns
CRLF = b"\r\n"
_READ_CHUNK = 65536
_MAX_FIELD = 900  # octets of one value in a field: well under the 998-octet line limit
_LINE_MAX = 998   # octets in a line, CRLF excluded (RFC 5322 §2.1.1)
_HUMAN_ADDRESS = 320   # octets of an address in the human-readable part (RFC 5321: 256)
_BOUNDARY_MAX = 70     # characters of a MIME boundary (RFC 2046 §5.1.1)

# A DSN's per-recipient ``Action:`` field (RFC 3464 §2.3.3); not the pipeline's
# pymta.types.Action. ``relayed``: handed to a next hop that does not speak DSN (it will not
# report success itself), in a success report.
DsnAction = Literal["failed", "delivered", "relayed", "delayed"]


@dataclass(frozen=True, slots=True)
class DsnEntry:
    """One recipient's line in a report: what happened, why, and where.

    ``will_retry_until`` (a Unix time) is when the queue gives up on the recipient: written
    as ``Will-Retry-Until`` in "delayed" reports only (RFC 3464 §2.3.9 forbids it in others).
    """

    recipient: Recipient
    action: DsnAction
    status: str                    # enhanced status code, e.g. "5.1.1", "4.4.7", "2.0.0"
    diagnostic: Reply | None = None
    remote_mta: str | None = None  # host name of the next hop, for Remote-MTA
    will_retry_until: float | None = None


_SUBJECTS = {
    "failed": "Undelivered Mail Returned to Sender",
    "delivered": "Successful Mail Delivery Report",
    "delayed": "Delayed Mail (still being retried)",
}

_INTRO = {
    "failed": (
        "I'm sorry to have to inform you that your message could not\n"
        "be delivered to one or more recipients. It's attached below.\n"
        "\n"
        "For further assistance, please send mail to postmaster.\n"
        "\n"
        "If you do so, please include this problem report. You can\n"
        "delete your own text from the attached returned message.\n"
    ),
    "delivered": (
        "Your message was successfully delivered to the destination(s)\n"
        "listed below. If the message was delivered to mailbox you will\n"
        "receive no further notifications. Otherwise you may still receive\n"
        "notifications of mail delivery errors from other systems.\n"
    ),
    "delayed": (
        "####################################################################\n"
        "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #\n"
        "####################################################################\n"
        "\n"
        "Your message could not be delivered yet. The mail system will keep\n"
        "trying; you will be notified if it finally gives up.\n"
    ),
}

# The delay report's explanation when its age and end are known (Postfix's delay template:
# "could not be delivered for more than N hour(s). It will be retried until ...").
_DELAYED_INTRO = (
    "####################################################################\n"
    "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #\n"
    "####################################################################\n"
    "\n"
    "Your message could not be delivered for more than {age}.\n"
    "It will be retried until {until};\n"
    "you will be notified if the mail system finally gives up.\n"
)
_AGE_UNITS = ((86400, "day"), (3600, "hour"), (60, "minute"), (1, "second"))


_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_REPLY = re.compile(r"([2-5]\d\d)[ -](?:([245]\.\d{1,3}\.\d{1,3})\s+)?(.*)", re.DOTALL)
_ATOM = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,63}")
_HOST = re.compile(r"(?:[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})?\.)*[A-Za-z0-9_-]{1,63}\.?"
                   r"|\[[0-9A-Fa-f:.]{2,45}\]|\[IPv6:[0-9A-Fa-f:.]{2,45}\]")


def _char_escape(ch: str) -> str:
    """RFC 6533 ``EmbeddedUnicodeChar`` for one character; an undecodable byte kept by
    ``surrogateescape`` becomes U+FFFD (a code point, unlike the byte, is well defined)."""
    code = ord(ch)
    if 0xD800 <= code <= 0xDFFF:
        code = 0xFFFD
    return f"\\x{{{code:X}}}"


def _clean_text(text: str, utf8: bool) -> str:
    """One line of printable text: whitespace runs (CR, LF, U+2028 ...) become one space,
    other controls (and non-ASCII unless ``utf8``) ``\\x{HH}`` escapes."""
    text = " ".join(text.split())
    if text.isascii() and text.isprintable():
        return text
    return "".join(ch if ch.isprintable() and (utf8 or ch.isascii()) else _char_escape(ch)
                   for ch in text)


def _octets(text: str) -> int:
    return len(text.encode("utf-8", "surrogateescape"))


def _cut(text: str, octets: int, mark: str = "...") -> str:
    """``text`` in at most ``octets`` UTF-8 octets, cut at a character and ending in
    ``mark`` when it was cut. For cleaned text (``_clean_text``: no surrogates)."""
    raw = text.encode("utf-8", "surrogateescape")
    if len(raw) <= octets:
        return text
    keep = max(octets - len(mark), 0)
    return raw[:keep].decode("utf-8", "ignore") + mark[:octets]   # drops a split character


def _one_line(text: str, utf8: bool = True, octets: int = _MAX_FIELD) -> str:
    """``text`` as one printable line (``_clean_text``) of at most ``octets`` octets."""
    return _cut(_clean_text(text, utf8), octets)


def _fold(line: str) -> str:
    """A field line folded at its spaces (a line break before the space) so that no line is
    longer than ``_LINE_MAX`` octets; a word too long for any line ends the value, cut to
    what the line has room for. Unchanged when it fits already (the usual case)."""
    if _octets(line) <= _LINE_MAX:
        return line
    lines: list[str] = []
    current = ""
    for i, word in enumerate(line.split(" ")):
        piece = word if i == 0 else " " + word
        size = _octets(piece)
        if size > _LINE_MAX:        # a run without a space: nothing to fold at
            lines.append(current + _cut(piece, _LINE_MAX - _octets(current)))
            return "\n".join(lines)
        if current and _octets(current) + size > _LINE_MAX:
            lines.append(current)
            current = piece
        else:
            current += piece
    lines.append(current)
    return "\n".join(lines)


def _plain_address(address: str) -> bool:
    """Printable ASCII (spaces only inside a quoted local part): fine as an ``rfc822``
    address in any header or DSN field as it is."""
    if not (address.isascii() and address.isprintable()):
        return False
    return " " not in address or address.startswith('"')


def sendable_address(address: str, smtputf8: bool) -> bool:
    """Can a notice be sent to ``address``: one ``local@domain`` without controls, spaces,
    or undecodable bytes, and non-ASCII only in an SMTPUTF8 message?"""
    if not address or "@" not in address or len(address) > 998:
        return False
    local, _, domain = address.rpartition("@")
    if not local or not domain or not address.isprintable():
        return False
    if " " in domain or (" " in local and not local.startswith('"')):
        return False
    return smtputf8 or address.isascii()


def _address_field(address: str, utf8: bool) -> str:
    """``address-type ; generic-address`` (RFC 3464 §2.1.2) for Final-Recipient and kin:
    ``rfc822`` for a plain address, else RFC 6533 ``utf-8`` (raw UTF-8 only where the
    report is ``message/global-delivery-status``, escapes otherwise)."""
    if _plain_address(address) and len(address) <= _MAX_FIELD:
        return f"rfc822; {address}"
    out = []
    room = _MAX_FIELD
    for ch in address:
        keep = ch.isprintable() and (ch not in " \\+=" if ch.isascii() else utf8)
        piece = ch if keep else _char_escape(ch)
        room -= _octets(piece)
        if room < 0:
            break       # cut whole characters and escapes only
        out.append(piece)
    return "utf-8; " + "".join(out)


def _xtext_decode(value: str) -> str | None:
    """RFC 3461 §4 xtext (``+HH`` stands for one octet) to text; None when the value is not
    xtext at all (raw controls, spaces, non-ASCII) or does not decode as UTF-8."""
    if not (value.isascii() and value.isprintable()) or " " in value:
        return None
    out = bytearray()
    raw = value.encode("ascii")
    i = 0
    while i < len(raw):
        if raw[i : i + 1] == b"+":
            if not _is_hex(raw[i + 1 : i + 3]):
                return None
            out.append(int(raw[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(raw[i])
            i += 1
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _is_hex(b: bytes) -> bool:
    return len(b) == 2 and all(c in b"0123456789ABCDEFabcdef" for c in b)


_EMBEDDED = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")


def _unembed(text: str) -> str | None:
    """RFC 6533 ``\\x{HHHH}`` escapes to characters; None for a code point that is none."""
    def one(m: re.Match[str]) -> str:
        code = int(m.group(1), 16)
        if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
            raise ValueError(m.group(0))
        return chr(code)
    try:
        return _EMBEDDED.sub(one, text)
    except ValueError:
        return None


def _original_recipient(rcpt: Recipient, utf8: bool) -> str | None:
    """Original-Recipient from the ORCPT parameter (``type;xtext``), or None when it is
    absent or malformed (a wrong value is worse than none)."""
    if not rcpt.orcpt or ";" not in rcpt.orcpt:
        return None
    kind, _, value = rcpt.orcpt.partition(";")
    kind = kind.strip()
    if not _ATOM.fullmatch(kind):
        return None
    value = value.strip()
    address = _xtext_decode(value)
    if address is None and kind.lower() == "utf-8" and value.isprintable():
        address = value         # RFC 6533 utf-8-addr-unitext: raw UTF-8 under SMTPUTF8
    if address is not None and kind.lower() == "utf-8":
        address = _unembed(address)
    if not address:
        return None
    if kind.lower() == "rfc822" and _plain_address(address):
        return f"rfc822; {address}"
    if kind.lower() in ("rfc822", "utf-8"):
        return _address_field(address, utf8)
    text = _clean_text(address, False)
    return f"{kind}; {text}" if len(text) <= _MAX_FIELD else None


def _envelope_id(envid: str) -> str | None:
    """Original-Envelope-Id: the decoded ENVID when it is printable ASCII, else its xtext
    form (always printable ASCII); None when empty."""
    decoded = _xtext_decode(envid)
    if decoded is not None and decoded.isascii() and decoded.isprintable():
        text = decoded
    else:
        raw = (decoded if decoded is not None else envid).encode("utf-8", "surrogateescape")
        text = "".join(chr(b) if 33 <= b <= 126 and b not in (0x2B, 0x3D) else f"+{b:02X}"
                       for b in raw)
    text = text.strip()
    return text[:_MAX_FIELD] or None


def _host(name: str | None) -> str | None:
    """A host name or address literal for Remote-MTA / Reporting-MTA, else None."""
    if not name or len(name) > 255 or not _HOST.fullmatch(name):
        return None
    return name


def _status(status: str, action: str) -> str:
    """An RFC 3463 status code; a malformed one becomes its class default, and so does a
    delay reported with anything but a 4.x.x (a delay is a persistent transient failure)."""
    if _STATUS.fullmatch(status) and (action != "delayed" or status.startswith("4.")):
        return status
    return {"delivered": "2.0.0", "relayed": "2.0.0", "delayed": "4.0.0"}.get(action, "5.0.0")


def _date(when: float | None) -> str | None:
    """An RFC 5322 date-time, or None for a time that has none (0, not finite, too far)."""
    if not when:
        return None
    try:
        return email.utils.formatdate(when, localtime=True)
    except (OverflowError, ValueError, OSError):
        return None


def _age(seconds: float) -> str:
    """A queueing time in words, rounded down to its largest unit: ``4 hours``."""
    for size, unit in _AGE_UNITS:
        if seconds >= size:
            count = int(seconds // size)
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return "0 seconds"


def parse_reply_text(text: str) -> Reply:
    """A reply as ``str(Reply)`` wrote it (``550 5.1.1 text``), back into a Reply; text that
    is not one (an old or hand-edited queue file) becomes a ``550 5.0.0`` with that text."""
    m = _REPLY.fullmatch(text.strip())
    if m is None:
        return Reply(550, "5.0.0", text.strip() or "delivery failed")
    code = int(m.group(1))
    enhanced = m.group(2) or f"{str(code)[0]}.0.0"
    if enhanced[0] != str(code)[0]:
        enhanced = f"{str(code)[0]}.0.0"
    return Reply(code, enhanced, m.group(3))


def _intro(action_kind: str, entries: Sequence[DsnEntry], envelope: Envelope,
           now: float) -> str:
    """The explanation at the top; a delay report says how long the message has waited and
    until when it will be retried, when it knows."""
    if action_kind == "delayed":
        ends = [e.will_retry_until for e in entries if e.will_retry_until]
        until = _date(min(ends)) if ends else None
        if until is not None and envelope.received_at:
            return _DELAYED_INTRO.format(age=_age(max(now - envelope.received_at, 0.0)),
                                         until=until)
    return _INTRO.get(action_kind, _INTRO["failed"])


def _human_part(reporting_mta: str, entries: Sequence[DsnEntry], action_kind: str,
                intro: str | None = None) -> str:
    lines = [f"This is the mail system at host {reporting_mta}.", "",
             intro if intro is not None else _INTRO.get(action_kind, _INTRO["failed"]),
             "                   The mail system", ""]
    for e in entries:
        r = e.recipient
        who = f"<{_one_line(r.address, octets=_HUMAN_ADDRESS)}>"
        if r.original and r.original.lower() != r.address.lower():
            who += f" (expanded from <{_one_line(r.original, octets=_HUMAN_ADDRESS)}>)"
        remote = _host(e.remote_mta)
        if e.action in ("delivered", "relayed"):
            why = "delivered to mailbox" if r.local else "delivery via " + (remote or "relay")
            if e.diagnostic is not None:
                why += f": {e.diagnostic.text}"
        elif e.diagnostic is None:
            what = "delayed" if e.action == "delayed" else "failed"
            why = f"delivery {what} (status {_status(e.status, e.action)})"
        else:
            where = f"host {remote} said: " if remote else ""
            why = f"{where}{e.diagnostic}"
            if e.status == "4.4.7" and e.action == "failed":
                why = f"message expired, last error: {why}"
        # plain text, never unfolded: the reason is cut to what the line has room for
        why = _one_line(why, octets=_LINE_MAX - _octets(who) - 2)
        lines.append(f"{who}: {why}")
        lines.append("")
    return "\n".join(lines)


def _status_part(*, reporting_mta: str, qid: str, envelope: Envelope,
                 entries: Sequence[DsnEntry]) -> str:
    utf8 = envelope.smtputf8
    head = [f"Reporting-MTA: dns; {reporting_mta}",
            f"X-Pymta-Queue-ID: {qid}",
            f"X-Pymta-Sender: {_address_field(envelope.sender, utf8)}"]
    envid = _envelope_id(envelope.envid) if envelope.envid else None
    if envid:
        head.append(f"Original-Envelope-Id: {envid}")
    head.append(f"Arrival-Date: {email.utils.formatdate(envelope.received_at, localtime=True)}")
    blocks = ["\n".join(head)]
    for e in entries:
        r = e.recipient
        block = [f"Final-Recipient: {_address_field(r.address, utf8)}"]
        orig = _original_recipient(r, utf8)
        if orig:
            block.append(f"Original-Recipient: {orig}")
        block.append(f"Action: {e.action}")
        block.append(f"Status: {_status(e.status, e.action)}")
        remote = _host(e.remote_mta)
        if remote:
            block.append(f"Remote-MTA: dns; {remote}")
        if e.diagnostic is not None:
            text = _clean_text(str(e.diagnostic), utf8)
            if len(text) > _MAX_FIELD:      # characters: folding makes room for the octets
                text = text[:_MAX_FIELD] + "..."
            block.append(_fold(f"Diagnostic-Code: smtp; {text}"))
        if r.last_attempt:
            block.append("Last-Attempt-Date: "
                         + email.utils.formatdate(r.last_attempt, localtime=True))
        until = _date(e.will_retry_until) if e.action == "delayed" else None
        if until is not None:
            block.append(f"Will-Retry-Until: {until}")
        blocks.append("\n".join(block))
    return "\n\n".join(blocks) + "\n"


def _header_address(address: str, utf8: bool) -> str:
    """The DSN's ``To:`` value: the address as it is when it is one (the envelope is what
    routes the notice); otherwise escaped into one printable line, so that no byte a client
    chose can break or add a header field."""
    if ((_plain_address(address) or (utf8 and sendable_address(address, True)))
            and _octets(address) <= _MAX_FIELD):
        return address
    return _one_line(address, False) or "undisclosed-recipients:;"


def _crlf(text: str) -> bytes:
    """Text with ``\\n`` line ends as CRLF wire bytes (UTF-8 for non-ASCII addresses)."""
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode("utf-8", "surrogateescape")


def _read_headers(body_path: str, limit: int) -> bytes:
    """The original's header section (see the module docstring): its fields from the top up
    to the first line that is neither a field nor a continuation line, in whole fields of at
    most ``limit`` octets in all. Lines are read with a bound, so a huge line costs no more
    than ``limit``."""
    out = bytearray()
    field = bytearray()
    with open(body_path, "rb") as f:
        while True:
            line = f.readline(limit + 1)
            if line[:1] in (b" ", b"\t") and field:
                field += line                   # a continuation line
            elif FIELD_START.match(line):
                out += field
                field[:] = line
            else:                               # the empty line, the body, or the end
                break
            if len(out) + len(field) > limit:   # this field would cross the bound: it ends
                field.clear()
                break
    out += field
    if out and not out.endswith(b"\n"):
        out += CRLF
    return bytes(out)


def _read_all(body_path: str) -> bytes:
    out = bytearray()
    with open(body_path, "rb") as f:
        while chunk := f.read(_READ_CHUNK):
            out += chunk
    if out and not out.endswith(b"\n"):
        out += CRLF
    return bytes(out)


def build_dsn(*, reporting_mta: str, qid: str, envelope: Envelope, entries: Sequence[DsnEntry],
              body_path: str, now: float, action_kind: str, to: str | None = None,
              size_limit: int = BOUNCE_SIZE_LIMIT) -> bytes:
    """The complete DSN message (CRLF line ends) about ``entries`` of message ``qid``.

    ``action_kind`` (``failed``/``delivered``/``delayed``) picks the subject and wording;
    ``to`` is the DSN's recipient for the ``To:`` header (default: the original sender).
    A failure report returns the original in full unless ``envelope.ret`` is ``HDRS``, the
    message came with REQUIRETLS (``envelope.requiretls``), or the spool file is larger than
    ``size_limit``; success and delay reports return its
    header section only (see the module docstring). A missing spool file returns no
    original at all rather than losing the notice.
    """
    if not entries:
        raise ValueError("a DSN needs at least one recipient entry")
    utf8 = envelope.smtputf8
    boundary = f"{qid}.{int(now)}.{secrets.token_hex(6)}/{reporting_mta}"[:_BOUNDARY_MAX]
    date = email.utils.formatdate(now, localtime=True)
    msgid = f"<{int(now)}.{qid}.{secrets.token_hex(4)}@{reporting_mta}>"
    rcpt_to = envelope.sender if to is None else to

    headers_only = (action_kind != "failed" or (envelope.ret or "").upper() == "HDRS"
                    or envelope.requiretls)     # RFC 8689 §5
    header_limit = (max(size_limit, NOTICE_HEADER_LIMIT) if action_kind == "failed"
                    else NOTICE_HEADER_LIMIT)
    try:
        size = os.path.getsize(body_path)
        original: bytes | None
        if headers_only or size > size_limit:
            headers_only = True
            original = _read_headers(body_path, header_limit)
        else:
            original = _read_all(body_path)
    except FileNotFoundError:
        original = None

    human = _human_part(reporting_mta, entries, action_kind,
                        _intro(action_kind, entries, envelope, now))
    status = _status_part(reporting_mta=reporting_mta, qid=qid, envelope=envelope,
                          entries=entries)
    human_cs = "us-ascii" if human.isascii() else "utf-8"
    status_type = "message/global-delivery-status" if utf8 else "message/delivery-status"
    status_cte = "7bit" if status.isascii() else "8bit"

    body = bytearray()
    body += _crlf(
        "This is a MIME-encapsulated message.\n"
        "\n"
        f"--{boundary}\n"
        "Content-Description: Notification\n"
        f"Content-Type: text/plain; charset={human_cs}\n"
        f"Content-Transfer-Encoding: {'7bit' if human.isascii() else '8bit'}\n"
        "\n"
    )
    body += _crlf(human)
    body += _crlf(
        f"\n--{boundary}\n"
        "Content-Description: Delivery report\n"
        f"Content-Type: {status_type}\n"
        f"Content-Transfer-Encoding: {status_cte}\n"
        "\n"
    )
    body += _crlf(status)
    if original is not None:
        eight = envelope.body_type.upper() != "7BIT" or not original.isascii()
        undelivered = "Undelivered " if action_kind != "delivered" else ""   # as Postfix
        if headers_only:
            ctype = "message/global-headers" if utf8 else "text/rfc822-headers"
            desc = f"{undelivered}Message Headers"
        else:
            ctype = "message/global" if utf8 else "message/rfc822"
            desc = f"{undelivered}Message"
        body += _crlf(
            f"\n--{boundary}\n"
            f"Content-Description: {desc}\n"
            f"Content-Type: {ctype}\n"
            f"Content-Transfer-Encoding: {'8bit' if eight else '7bit'}\n"
            "\n"
        )
        body += original
    body += _crlf(f"\n--{boundary}--\n")
    head = _crlf(
        f"From: MAILER-DAEMON@{reporting_mta} (Mail Delivery System)\n"
        f"To: {_header_address(rcpt_to, utf8)}\n"
        f"Subject: {_SUBJECTS.get(action_kind, _SUBJECTS['failed'])}\n"
        f"Date: {date}\n"
        f"Message-ID: {msgid}\n"
        "Auto-Submitted: auto-replied\n"
        "MIME-Version: 1.0\n"
        "Content-Type: multipart/report; report-type=delivery-status;\n"
        f'\tboundary="{boundary}"\n'
        f"Content-Transfer-Encoding: {'7bit' if body.isascii() else '8bit'}\n"
        "\n"
    )
    return head + bytes(body)
