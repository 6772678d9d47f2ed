"""Delivery Status Notifications (RFC 3464): the bounce and success reports pymta sends.

A DSN is a ``multipart/report; report-type=delivery-status`` with three parts: a human
explanation (worded like Postfix's, because users and helpdesks recognise it), the machine
readable ``message/delivery-status`` and the returned original: complete as
``message/rfc822`` or only its header as ``text/rfc822-headers`` when the sender asked for
``RET=HDRS`` or the original is larger than ``bounce_size_limit`` (Postfix's default 50000).
For SMTPUTF8 messages the RFC 6533 types ``message/global*`` are used instead.

The report is assembled by hand rather than with :mod:`email`: the original is streamed from
the spool (it may be large, and only its header may be needed), it must be returned byte for
byte, and every line must end in CRLF. Tests parse the result back with the stdlib parser.
"""

from __future__ import annotations

import email.utils
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from ..types import Envelope, Recipient, Reply

BOUNCE_SIZE_LIMIT = 50000
CRLF = b"\r\n"
_READ_CHUNK = 65536
_MAX_FIELD = 900  # keep every delivery-status line well under the 998-octet limit

Action = Literal["failed", "delivered", "delayed"]


@dataclass(frozen=True, slots=True)
class DsnEntry:
    """One recipient's line in a report: what happened, why, and where."""

    recipient: Recipient
    action: Action
    status: str                    # enhanced status code, e.g. "5.1.1", "4.4.7", "2.0.0"
    diagnostic: Reply | None = None
    remote_mta: str | None = None  # host name of the next hop, for Remote-MTA


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


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_FIELD else text[:_MAX_FIELD] + "..."


def _xtext_decode(value: str) -> str:
    """ORCPT travels xtext-encoded (RFC 3461 §4): ``+HH`` stands for one octet."""
    out = bytearray()
    raw = value.encode("utf-8", "surrogateescape")
    i = 0
    while i < len(raw):
        if raw[i : i + 1] == b"+" and _is_hex(raw[i + 1 : i + 3]):
            out.append(int(raw[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(raw[i])
            i += 1
    return out.decode("utf-8", "replace")


def _is_hex(b: bytes) -> bool:
    return len(b) == 2 and all(c in b"0123456789ABCDEFabcdef" for c in b)


def _addr_type(address: str, utf8: bool) -> str:
    return "utf-8" if utf8 and not address.isascii() else "rfc822"


def _original_recipient(rcpt: Recipient) -> str | None:
    if not rcpt.orcpt or ";" not in rcpt.orcpt:
        return None
    kind, _, addr = rcpt.orcpt.partition(";")
    return f"{kind.strip()}; {_one_line(_xtext_decode(addr.strip()))}"


def _human_part(reporting_mta: str, entries: Sequence[DsnEntry], action_kind: str) -> str:
    lines = [f"This is the mail system at host {reporting_mta}.", "",
             _INTRO.get(action_kind, _INTRO["failed"]),
             "                   The mail system", ""]
    for e in entries:
        r = e.recipient
        who = f"<{r.address}>"
        if r.original and r.original.lower() != r.address.lower():
            who += f" (expanded from <{r.original}>)"
        if e.action == "delivered":
            why = "delivered to mailbox" if r.local else "delivery via " + (e.remote_mta or "relay")
            if e.diagnostic is not None:
                why += f": {_one_line(e.diagnostic.text)}"
        elif e.diagnostic is None:
            why = f"delivery failed (status {e.status})"
        else:
            where = f"host {e.remote_mta} said: " if e.remote_mta else ""
            why = _one_line(f"{where}{e.diagnostic}")
            if e.status == "4.4.7":
                why = f"message expired, last error: {why}"
        lines.append(f"{who}: {why}")
        lines.append("")
    return "\n".join(lines)


def _status_part(*, reporting_mta: str, qid: str, envelope: Envelope,
                 entries: Sequence[DsnEntry]) -> str:
    utf8 = envelope.smtputf8
    head = [f"Reporting-MTA: dns; {reporting_mta}",
            f"X-Pymta-Queue-ID: {qid}",
            f"X-Pymta-Sender: {_addr_type(envelope.sender, utf8)}; {envelope.sender}"]
    if envelope.envid:
        head.append(f"Original-Envelope-Id: {_one_line(_xtext_decode(envelope.envid))}")
    head.append(f"Arrival-Date: {email.utils.formatdate(envelope.received_at, localtime=True)}")
    blocks = ["\n".join(head)]
    for e in entries:
        r = e.recipient
        block = [f"Final-Recipient: {_addr_type(r.address, utf8)}; {r.address}"]
        orig = _original_recipient(r)
        if orig:
            block.append(f"Original-Recipient: {orig}")
        block.append(f"Action: {e.action}")
        block.append(f"Status: {e.status}")
        if e.remote_mta:
            block.append(f"Remote-MTA: dns; {e.remote_mta}")
        if e.diagnostic is not None:
            block.append(f"Diagnostic-Code: smtp; {_one_line(str(e.diagnostic))}")
        if r.last_attempt:
            block.append("Last-Attempt-Date: "
                         + email.utils.formatdate(r.last_attempt, localtime=True))
        blocks.append("\n".join(block))
    return "\n\n".join(blocks) + "\n"


def _crlf(text: str) -> bytes:
    """Text with ``\\n`` line ends as CRLF wire bytes (UTF-8 for non-ASCII addresses)."""
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode("utf-8", "surrogateescape")


def _read_headers(body_path: str) -> bytes:
    """The original's header block, read line by line up to (excluding) the empty line."""
    out = bytearray()
    with open(body_path, "rb") as f:
        for line in f:
            if line in (b"\r\n", b"\n"):
                break
            out += line
            if len(out) > 4 * BOUNCE_SIZE_LIMIT:  # a pathological header: stop somewhere sane
                break
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
    The original is returned in full unless ``envelope.ret`` is ``HDRS`` or the spool file
    is larger than ``size_limit``; a missing spool file returns no original at all rather
    than losing the notice.
    """
    if not entries:
        raise ValueError("a DSN needs at least one recipient entry")
    utf8 = envelope.smtputf8
    boundary = f"{qid}.{int(now)}.{secrets.token_hex(6)}/{reporting_mta}"
    date = email.utils.formatdate(now, localtime=True)
    msgid = f"<{int(now)}.{qid}.{secrets.token_hex(4)}@{reporting_mta}>"
    rcpt_to = envelope.sender if to is None else to

    headers_only = (envelope.ret or "").upper() == "HDRS"
    try:
        size = os.path.getsize(body_path)
        original: bytes | None
        if headers_only or size > size_limit:
            headers_only = True
            original = _read_headers(body_path)
        else:
            original = _read_all(body_path)
    except FileNotFoundError:
        original = None

    human = _human_part(reporting_mta, entries, action_kind)
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
        if headers_only:
            ctype = "message/global-headers" if utf8 else "text/rfc822-headers"
            desc = "Undelivered Message Headers"
        else:
            ctype = "message/global" if utf8 else "message/rfc822"
            desc = "Undelivered Message" if action_kind == "failed" else "Delivered Message"
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
        f"To: {rcpt_to}\n"
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
