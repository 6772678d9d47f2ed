"""The receiving side's log lines, worded as Postfix's smtpd and cleanup write them.

pflogsumm and fail2ban's ``postfix`` filters parse these lines by their words, so the words
are Postfix's (``smtpd.c``, ``smtpd_check.c``, ``cleanup_message.c``), and every line about a
message carries the queue id the queue and delivery lines use::

    connect from NAME[IP]
    QID: client=NAME[IP], sasl_method=PLAIN, sasl_username=alice
    QID: message-id=<...>                                      (cleanup)
    NOQUEUE: reject: RCPT from NAME[IP]: 550 5.1.1 <x@y>: Recipient address rejected: User
        unknown in virtual mailbox table; from=<s> to=<x@y> proto=ESMTP helo=<h>
    QID: reject: END-OF-MESSAGE from NAME[IP]: 554 5.7.1 ...; from=<s> to=<r> proto=ESMTP ...
    lost connection after RCPT from NAME[IP]
    timeout after DATA (1234 bytes) from NAME[IP]
    improper command pipelining after DATA from NAME[IP]:
    too many errors after RCPT from NAME[IP]
    disconnect from NAME[IP] ehlo=1 mail=1 rcpt=1/2 data=1 quit=1 commands=5/6

The per-message lines (``client=``, ``reject:``) are NOTICE, shown at the default
``SYSLOG_LEVEL``: they are what log summaries count. Connection lines are INFO, as every
Postfix line is ``mail.info``. Values a client chose (HELO, addresses) go into the message
as they are; :mod:`pymta.log` escapes the whole line, so none can split it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence

from pymta.log import NOTICE

log = logging.getLogger("pymta.smtpd")
cleanup_log = logging.getLogger("pymta.cleanup")

# Postfix's order in smtpd_cmd_table; commands it does not have follow in order of use.
_ORDER = ("helo", "ehlo", "starttls", "auth", "mail", "rcpt", "data", "bdat", "rset", "noop",
          "vrfy", "etrn", "quit")
_RANK = {name: i for i, name in enumerate(_ORDER)}


def command_stats(stats: Mapping[str, list[int]]) -> str:
    """`` ehlo=1 mail=1 rcpt=0/1 quit=1 commands=3/4``: per command ``ok`` or ``ok/total``
    when some failed, ``unknown`` last, then the sums (``commands=0/0`` for none)."""
    parts = []
    ok_all = total_all = 0
    for name in sorted(stats, key=lambda n: (n == "unknown", _RANK.get(n, len(_RANK)))):
        ok, total = stats[name]
        parts.append(f" {name}={ok}" if ok == total else f" {name}={ok}/{total}")
        ok_all += ok
        total_all += total
    parts.append(f" commands={ok_all}" if ok_all == total_all and total_all
                 else f" commands={ok_all}/{total_all}")
    return "".join(parts)


def after(where: str, data_bytes: int) -> str:
    """The ``after X`` of a lost or timed-out session: ``DATA (N bytes)`` inside a message."""
    if where in ("DATA", "BDAT"):
        return f"{where} ({data_bytes} bytes)"
    return where


def connect(name: str, ip: str) -> None:
    log.info("connect from %s[%s]", name, ip)


def disconnect(name: str, ip: str, stats: Mapping[str, list[int]]) -> None:
    if log.isEnabledFor(logging.INFO):
        log.info("disconnect from %s[%s]%s", name, ip, command_stats(stats))


def ended(what: str, where: str, name: str, ip: str) -> None:
    """``lost connection|timeout|too many errors after WHERE from NAME[IP]``."""
    log.info("%s after %s from %s[%s]", what, where, name, ip)


def pipelining(where: str, name: str, ip: str) -> None:
    """The client sent message text before our 354 (fail2ban's ``postfix`` filter bans it)."""
    log.info("improper command pipelining after %s from %s[%s]:", where, name, ip)


def reject(qid: str | None, where: str, name: str, ip: str, reply: object, *, sender: str | None,
           rcpt: str | None, proto: str, helo: str, verdict: str = "reject",
           reason: str = "") -> None:
    """``NOQUEUE: reject: RCPT from NAME[IP]: REPLY; from=<s> to=<r> proto=ESMTP helo=<h>``
    (``to=`` only when a recipient is known, ``from=`` once MAIL was given); ``reason`` is
    appended in parentheses (a pipeline's reasons, when the reply does not say them)."""
    if not log.isEnabledFor(NOTICE):
        return
    env = []
    if sender is not None:
        env.append(f"from=<{sender}>")
    if rcpt is not None:
        env.append(f"to=<{rcpt}>")
    env.append(f"proto={proto}")
    env.append(f"helo=<{helo}>")
    text = str(reply).replace("\r\n", " ")
    log.log(NOTICE, "%s: %s: %s from %s[%s]: %s; %s%s", qid or "NOQUEUE", verdict, where, name,
            ip, text, " ".join(env), f" ({reason})" if reason else "",
            extra={"qid": qid or "NOQUEUE", "client": f"{name}[{ip}]", "verdict": verdict,
                   "stage": where})


def client(qid: str, name: str, ip: str, method: str | None, user: str | None) -> None:
    """``QID: client=NAME[IP]``, with the SASL method and user of an authenticated client:
    the line pflogsumm counts as a message received."""
    if not log.isEnabledFor(NOTICE):
        return
    if user is not None:
        log.log(NOTICE, "%s: client=%s[%s], sasl_method=%s, sasl_username=%s", qid, name, ip,
                method or "PLAIN", user,
                extra={"qid": qid, "client": f"{name}[{ip}]", "sasl_username": user})
    else:
        log.log(NOTICE, "%s: client=%s[%s]", qid, name, ip,
                extra={"qid": qid, "client": f"{name}[{ip}]"})


# The Message-ID field of a header section: its name at a line start, its value up to the
# line end (folded continuation lines are rare for it and are left out).
_MESSAGE_ID = re.compile(rb"(?:^|\n)message-id[ \t]*:[ \t]*([^\r\n]*)", re.IGNORECASE)


def message_id(qid: str, head_chunks: Sequence[bytes]) -> None:
    """``QID: message-id=<...>`` (cleanup's line; ``<>`` when the message has none), read from
    the start of the message the session kept. INFO: the join and the search are skipped
    below it (the default level)."""
    if not cleanup_log.isEnabledFor(logging.INFO):
        return
    head = b"".join(head_chunks)
    end = head.find(b"\r\n\r\n")
    match = _MESSAGE_ID.search(head, 0, end if end >= 0 else len(head))
    value = match.group(1).decode("utf-8", "replace").strip() if match else ""
    if value and not value.startswith("<"):
        value = f"<{value}>"
    cleanup_log.info("%s: message-id=%s", qid, value or "<>",
                     extra={"qid": qid, "message_id": value})
