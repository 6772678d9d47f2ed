"""The Postfix-style delivery log: one line per message event on logger ``pymta.delivery``.

Operators grep these lines by queue id (``grep 3F2A1B /var/log/mail.log``) and existing log
tools (pflogsumm and friends) expect Postfix's shape, so the format copies it::

    QID: from=<alice@example.org>, size=1234, nrcpt=2 (queue active)
    QID: to=<bob@example.net>, orig_to=<info@example.org>, relay=mx.example.net[192.0.2.1]:25,
         delay=1.2, delays=0.1/0/0/1.1, dsn=2.0.0, status=sent (250 2.0.0 Ok)
    QID: sender non-delivery notification: DSNQID
    QID: removed

Addresses, relays and replies come from clients and remote servers; they are written with
every non-printable character (CR, LF, U+2028, U+0085, undecodable bytes ...) escaped as
``\\xHH``/``\\uHHHH``, so one log line stays one line and says what was really there.

``delays`` is ``a/b/c/d`` as in Postfix, but pymta only measures two of the four: ``a`` is the
time from arrival to the start of this attempt and ``d`` the time the delivery agent took;
``b`` and ``c`` are always ``0``. Each record also carries the fields as
``extra={"mta_event": {...}}`` so a JSON formatter can emit them without parsing the text.

Each line is tagged with the Postfix daemon that writes it (``extra={"service": ...}``, see
:mod:`pymta.log`): ``qmgr`` for ``from=``/``removed``, the delivery agent (``local``,
``lmtp``, ``smtp``) for ``to=``, ``bounce`` for the notices. The ``from=<>, size=`` line is
NOTICE, as the ``to=`` lines are: pflogsumm takes the sender and the size from it.
"""

from __future__ import annotations

import logging

from ..types import Envelope, Recipient, Reply

NOTICE = 25  # pymta.log.NOTICE: shown at the default SYSLOG_LEVEL=5, as Postfix mail.info lines are
LOG = logging.getLogger("pymta.delivery")

STATUSES = ("sent", "deferred", "bounced", "expired")


def _num(value: float) -> str:
    """Postfix prints delays with at most two decimals and no trailing zeros."""
    if value <= 0:
        return "0"
    if value >= 10:
        return str(int(round(value)))
    text = f"{value:.2f}".rstrip("0").rstrip(".")
    return text or "0"


def printable(text: str) -> str:
    """``text`` with every non-printable character escaped (a byte kept by
    ``surrogateescape`` as ``\\xHH``, the byte it was)."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable():
            out.append(ch)
            continue
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:
            code -= 0xDC00
        out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
    return "".join(out)


def _reply_text(reply: Reply) -> str:
    return printable(str(reply).replace("\r\n", " ").replace("\r", " ").replace("\n", " "))


def format_active(qid: str, envelope: Envelope) -> str:
    return (f"{qid}: from=<{printable(envelope.sender)}>, size={envelope.size}, "
            f"nrcpt={len(envelope.pending())} (queue active)")


def format_recipient(qid: str, rcpt: Recipient, *, status: str, reply: Reply, relay: str,
                     delay: float, delays: tuple[float, float, float, float]) -> str:
    """The ``to=<..>`` line for one recipient of one attempt."""
    if status not in STATUSES:
        raise ValueError(f"unknown delivery status {status!r}")
    parts = [f"{qid}: to=<{printable(rcpt.address)}>"]
    if rcpt.original and rcpt.original.lower() != rcpt.address.lower():
        parts.append(f"orig_to=<{printable(rcpt.original)}>")
    parts.append(f"relay={printable(relay) or 'none'}")
    parts.append(f"delay={_num(delay)}")
    parts.append("delays=" + "/".join(_num(d) for d in delays))
    parts.append(f"dsn={reply.enhanced}")
    parts.append(f"status={status} ({_reply_text(reply)})")
    return ", ".join(parts)


def log_active(qid: str, envelope: Envelope) -> None:
    """An attempt starts: who sent it, how big, how many recipients are still pending."""
    if not LOG.isEnabledFor(NOTICE):
        return
    LOG.log(NOTICE, format_active(qid, envelope), extra={
        "service": "qmgr",
        "mta_event": {"qid": qid, "event": "active", "from": envelope.sender,
                      "size": envelope.size, "nrcpt": len(envelope.pending())}})


def log_recipient(qid: str, rcpt: Recipient, *, status: str, reply: Reply, relay: str,
                  delay: float, delays: tuple[float, float, float, float],
                  service: str = "qmgr") -> None:
    """The result of one attempt for one recipient; ``service`` is the agent that made it
    (``local``, ``lmtp``, ``smtp``), the Postfix daemon the line is tagged with."""
    if not LOG.isEnabledFor(NOTICE):
        return
    line = format_recipient(qid, rcpt, status=status, reply=reply, relay=relay, delay=delay,
                            delays=delays)
    LOG.log(NOTICE, line, extra={"service": service, "mta_event": {
        "qid": qid, "event": "recipient", "to": rcpt.address, "orig_to": rcpt.original,
        "relay": relay, "delay": round(delay, 3), "dsn": reply.enhanced, "status": status,
        "reply": _reply_text(reply)}})


def log_notice(qid: str, kind: str, notice_qid: str) -> None:
    """A DSN was queued for this message (Postfix: ``sender non-delivery notification``)."""
    label = {"failed": "sender non-delivery notification",
             "delivered": "sender delivery status notification",
             "delayed": "sender delay notification"}.get(kind, f"sender {kind} notification")
    LOG.log(NOTICE, f"{qid}: {label}: {notice_qid}",
            extra={"service": "bounce", "mta_event": {"qid": qid, "event": "dsn",
                                                       "kind": kind, "dsn_qid": notice_qid}})


def log_removed(qid: str) -> None:
    """Every recipient reached a final state; the message left the queue."""
    if not LOG.isEnabledFor(logging.INFO):
        return
    LOG.info(f"{qid}: removed", extra={"service": "qmgr",
                                       "mta_event": {"qid": qid, "event": "removed"}})
