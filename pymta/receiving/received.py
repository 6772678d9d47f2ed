"""The ``Received:`` trace header pymta prepends to every accepted message (RFC 5321 §4.4).

Postfix's layout, so log and header readers see what they expect::

    Received: from HELO (NAME [IP])
            by HOST (pymta) with ESMTPS id QID
            (version=TLSv1.3 cipher=TLS_AES_256_GCM_SHA384 bits=256)
            for <rcpt@example.com>; Wed, 25 Nov 2026 17:00:00 +0000

What the client said goes in only through :mod:`pymta.headervalue`: the HELO as it is when
it is a domain or an address literal, else cleaned to one word of at most 255 characters
(``EHLO evil.test;dkim=pass`` shows as ``from evil.test?dkim=pass``: no ``;`` that would end
the clause early, no parenthesis, no control); the SASL user name as comment text; the
recipient only when it is a well-formed mailbox (otherwise the ``for`` clause is left out,
as for several recipients). NAME is the client's forward-confirmed name from
:mod:`pymta.peername`, which checks its syntax; here it is checked again, since a header field
must never carry text a PTR record made up: anything but a valid host name is ``unknown``.
Every line stays below 998 octets; the ``(NAME [IP])`` comment moves to its own line when the
first one would pass 78.
"""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime

from pymta.headervalue import comment_text, trace_helo, trace_mailbox
from pymta.peername import UNKNOWN, valid_hostname

_date_cache: tuple[int, str] = (-1, "")


def _rfc5322_date(now: float) -> str:
    """``format_datetime`` of ``now`` in UTC, computed once per second (it is slow)."""
    global _date_cache
    sec = int(now)
    cached_sec, text = _date_cache
    if cached_sec != sec:
        text = format_datetime(datetime.fromtimestamp(sec, UTC))
        _date_cache = (sec, text)
    return text


def protocol_name(extended: bool, tls: bool, authenticated: bool) -> str:
    """The ``with`` keyword of RFC 3848: SMTP, ESMTP, ESMTPS, ESMTPA, ESMTPSA."""
    if not extended:
        return "SMTP"
    return "ESMTP" + ("S" if tls else "") + ("A" if authenticated else "")


def received_header(*, helo: str, peer_ip: str, hostname: str, protocol: str, qid: str,
                    tls_info: str | None, recipient: str | None, now: float,
                    auth_user: str | None = None, peer_name: str = UNKNOWN) -> bytes:
    ip = f"IPv6:{peer_ip}" if ":" in peer_ip else peer_ip
    first = f"Received: from {trace_helo(helo)}"
    name = UNKNOWN if peer_name == UNKNOWN else valid_hostname(peer_name) or UNKNOWN
    client = f"({name} [{comment_text(ip)}])"
    fits = len(first) + 1 + len(client) <= 78
    lines = [f"{first} {client}"] if fits else [first, "\t" + client]
    if auth_user:
        lines.append(f"\t(Authenticated sender: {comment_text(auth_user)})")
    lines.append(f"\tby {hostname} (pymta) with {protocol} id {qid}")
    if tls_info:
        lines.append(f"\t({tls_info})")
    tail = f"; {_rfc5322_date(now)}"
    mailbox = trace_mailbox(recipient) if recipient else None
    if mailbox:
        lines.append(f"\tfor <{mailbox}>{tail}")
    else:
        lines[-1] += tail
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "surrogateescape")
