"""The ``Received:`` trace header pymta prepends to every accepted message (RFC 5321 §4.4).

Postfix's layout, so log and header readers see what they expect::

    Received: from HELO (unknown [IP])
            by HOST (pymta) with ESMTPS id QID
            (version=TLSv1.3 cipher=TLS_AES_256_GCM_SHA384 bits=256)
            for <rcpt@example.com>; Wed, 25 Nov 2026 17:00:00 +0000
"""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime

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
                    auth_user: str | None = None) -> bytes:
    ip = f"IPv6:{peer_ip}" if ":" in peer_ip else peer_ip
    helo_text = _clean(helo) or "unknown"
    lines = [f"Received: from {helo_text} (unknown [{ip}])"]
    if auth_user:
        lines.append(f"\t(Authenticated sender: {_clean(auth_user)})")
    lines.append(f"\tby {hostname} (pymta) with {protocol} id {qid}")
    if tls_info:
        lines.append(f"\t({tls_info})")
    tail = f"; {_rfc5322_date(now)}"
    if recipient:
        lines.append(f"\tfor <{_clean(recipient)}>{tail}")
    else:
        lines[-1] += tail
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "surrogateescape")


def _clean(text: str) -> str:
    """Keep header text on one line and free of comment-breaking characters."""
    if text.isprintable() and "(" not in text and ")" not in text and "\\" not in text:
        return text     # the usual case, without a loop over every character
    return "".join(c for c in text if c.isprintable() and c not in "()\\")
