"""What the SMTP relay and the LMTP client share: reply mapping, envelope parameters, hygiene.

Both clients make the same per-recipient decisions (2xx delivered, 4xx temporary, 5xx
permanent, always with the remote reply), send the same MAIL/RCPT parameters when the peer
advertises the extension (SIZE, BODY, SMTPUTF8, and DSN's RET/ENVID/NOTIFY/ORCPT), and apply
the same outbound hygiene before the transaction (RFC 6531 §3.2, RFC 6152 §3, RFC 1870).

The envelope comes from the queue, and the queue may hold what the receiving side no longer
lets in (old queue files, other paths): :func:`screen` refuses, before any connection, an
address that cannot be written on the wire at all (controls, undecodable bytes: ``5.1.7``
for the sender, ``5.1.3`` for a recipient; non-ASCII without SMTPUTF8: ``5.6.7``), and the
DSN parameters are passed on only in their RFC 3461 syntax (a malformed ORCPT is replaced
by the one pymta would have made, a malformed ENVID re-encoded as xtext). What is sent is
then always encodable: an encoding error can never turn one message into an endless retry.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from pymta.types import Outcome, OutcomeKind, QueuedMessage, Recipient, Reply

from .body import OutgoingBody

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?:\s+|$)")


def parse_reply(code: int, text: str) -> Reply:
    """A remote reply as a :class:`Reply`; a missing enhanced code gets the class default
    (``X.0.0``), as Postfix does. Multi-line text is joined with spaces."""
    text = " ".join(line.strip() for line in text.replace("\r", "").split("\n") if line.strip())
    m = _ENHANCED.match(text)
    if m and m.group(1) == str(code)[0]:
        return Reply(code, f"{m.group(1)}.{m.group(2)}.{m.group(3)}", text[m.end():])
    cls = str(code)[0] if str(code)[0] in "245" else "4"
    return Reply(code, f"{cls}.0.0", text)


def kind_of(reply: Reply) -> OutcomeKind:
    if 200 <= reply.code < 300:
        return OutcomeKind.DELIVERED
    if 500 <= reply.code < 600:
        return OutcomeKind.PERMANENT
    return OutcomeKind.TEMPORARY


def outcomes(rcpts: Sequence[Recipient], reply: Reply, relay: str,
             kind: OutcomeKind | None = None) -> list[Outcome]:
    """The same outcome for every recipient in ``rcpts``."""
    k = kind if kind is not None else kind_of(reply)
    return [Outcome(r.address, k, reply, relay) for r in rcpts]


def xtext(text: str) -> str:
    """RFC 3461 §4 xtext: ``+``, ``=``, controls and non-ASCII as ``+HH``."""
    out = []
    for byte in text.encode("utf-8", "surrogateescape"):
        if 33 <= byte <= 126 and byte not in (0x2B, 0x3D):
            out.append(chr(byte))
        else:
            out.append(f"+{byte:02X}")
    return "".join(out)


_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})+")
_ADDR_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,63}")
_NOTIFY_WORDS = frozenset(("SUCCESS", "FAILURE", "DELAY"))
ENVID_MAX = 100      # RFC 3461 §4.4
ORCPT_MAX = 500      # RFC 3461 §4.2


def address_problem(address: str, smtputf8: bool | None, *, sender: bool) -> Reply | None:
    """Why ``address`` can never be sent in a MAIL/RCPT command, or None.

    Controls (CR, LF, NUL, U+2028 ...), undecodable bytes (``surrogateescape``) or spaces
    outside a quoted local part: bad syntax. Non-ASCII in a message that did not ask for
    SMTPUTF8: not permitted (RFC 6531 §3.2) -- unless ``smtputf8`` is None (a mailbox on
    disk, where only the syntax matters). The null sender is fine.
    """
    if address.isascii() and address.isprintable() and " " not in address:
        return None     # the common case, at once
    who = "sender" if sender else "recipient"
    shown = _shown(address)
    if not address.isprintable() or (" " in address and not address.startswith('"')):
        enhanced = "5.1.7" if sender else "5.1.3"
        return Reply(550, enhanced, f"Bad {who} address syntax: <{shown[:200]}> cannot be "
                                    f"sent (control characters or undecodable bytes)")
    if not address.isascii() and smtputf8 is False:
        return Reply(550, "5.6.7", f"Non-ASCII {who} address <{shown[:200]}> in a message "
                                   f"without SMTPUTF8")
    return None


def _shown(text: str) -> str:
    """``text`` for a reply: printable ASCII, an undecodable byte as the ``\\xHH`` it was."""
    out = []
    for ch in text:
        code = ord(ch)
        if ch.isascii() and ch.isprintable():
            out.append(ch)
        elif 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        else:
            out.append(ch.encode("ascii", "backslashreplace").decode("ascii"))
    return "".join(out)


def screen(msg: QueuedMessage, rcpts: Sequence[Recipient], relay: str, *,
           local: bool = False) -> tuple[list[Outcome], list[Recipient]]:
    """Split off what can never be sent, before any connection: (permanent outcomes, the
    recipients still to try). A bad sender refuses every recipient. ``local``: for a
    mailbox on disk (``Return-Path:``), only the syntax rule applies."""
    env = msg.envelope
    utf8: bool | None = None if local else env.smtputf8
    problem = address_problem(env.sender, utf8, sender=True)
    if problem is not None:
        return outcomes(rcpts, problem, relay, OutcomeKind.PERMANENT), []
    refused: list[Outcome] = []
    keep: list[Recipient] = []
    for r in rcpts:
        problem = address_problem(r.address, utf8, sender=False)
        if problem is None:
            keep.append(r)
        else:
            refused.append(Outcome(r.address, OutcomeKind.PERMANENT, problem, relay))
    return refused, keep


def _envid(value: str) -> str | None:
    """ENVID as xtext: as queued when it is xtext, else re-encoded; None when too long."""
    text = value if _XTEXT.fullmatch(value) else xtext(value)
    return text if 0 < len(text) <= ENVID_MAX else None


def _notify(value: str) -> str | None:
    words = [w.strip().upper() for w in value.split(",")]
    if words == ["NEVER"]:
        return "NEVER"
    if words and all(w in _NOTIFY_WORDS for w in words) and len(set(words)) == len(words):
        return ",".join(words)
    return None


def _orcpt(value: str, smtputf8: bool) -> str | None:
    """ORCPT as ``addr-type;xtext`` (RFC 6533 unitext under SMTPUTF8), or None."""
    kind, sep, addr = value.partition(";")
    if not sep or not _ADDR_TYPE.fullmatch(kind) or not addr or len(value) > ORCPT_MAX:
        return None
    if _XTEXT.fullmatch(addr):
        return value
    if (smtputf8 and kind.lower() == "utf-8" and addr.isprintable() and " " not in addr
            and "+" not in addr and "=" not in addr):
        return value
    return None


@dataclass(slots=True)
class Prepared:
    """A message made ready for one peer: the body to send and the MAIL parameters, or the
    reply that refuses it for every recipient (``refusal``)."""

    body: OutgoingBody
    mail_options: list[str]
    smtputf8: bool
    refusal: Reply | None = None


def prepare(msg: QueuedMessage, rcpts: Sequence[Recipient], body: OutgoingBody,
            extensions: dict[str, str], peer: str, *, requiretls: bool = False) -> Prepared:
    """Apply outbound hygiene for a peer with these (lower-case) EHLO/LHLO extensions.
    ``requiretls``: the message asked for REQUIRETLS (RFC 8689) and the session qualifies:
    the MAIL parameter is sent."""
    env = msg.envelope
    options: list[str] = []
    utf8 = bool(env.smtputf8) and (
        not body.header_ascii or not env.sender.isascii()
        or not all(r.address.isascii() for r in rcpts))
    if utf8 and "smtputf8" not in extensions:
        return Prepared(body, options, utf8, Reply(
            550, "5.6.7", f"SMTPUTF8 is required, but was not offered by host {peer}"))
    eight = body.eight_bit
    if eight and "8bitmime" not in extensions:
        body = body.converted_to_7bit()  # RFC 6152 §3; 8-bit header bytes stay (downgrade)
        eight = body.eight_bit
    if "size" in extensions:
        limit_text = extensions["size"].strip()
        limit = int(limit_text) if limit_text.isdigit() else 0
        if limit and body.size > limit:
            return Prepared(body, options, utf8, Reply(
                552, "5.3.4", f"message size {body.size} exceeds size limit {limit} "
                              f"of server {peer}"))
        options.append(f"SIZE={body.size}")
    if "8bitmime" in extensions:
        options.append("BODY=8BITMIME" if eight else "BODY=7BIT")
    if utf8:
        options.append("SMTPUTF8")
    if requiretls:
        options.append("REQUIRETLS")
    if "dsn" in extensions:
        if env.ret and env.ret.upper() in ("FULL", "HDRS"):
            options.append(f"RET={env.ret.upper()}")
        envid = _envid(env.envid) if env.envid else None
        if envid:
            options.append(f"ENVID={envid}")
    return Prepared(body, options, utf8)


def rcpt_options(rcpt: Recipient, extensions: dict[str, str],
                 smtputf8: bool = False) -> list[str]:
    """NOTIFY and ORCPT for one RCPT when the peer speaks DSN (RFC 3461 §4.1, §4.2).

    Without a (well-formed) ORCPT from the client, the original recipient (before alias
    expansion) is sent, as Postfix does, so the final DSN names the address the sender
    used. ``smtputf8``: the transaction uses SMTPUTF8 (a raw UTF-8 ``utf-8`` ORCPT is fine)."""
    if "dsn" not in extensions:
        return []
    out = []
    notify = _notify(rcpt.notify) if rcpt.notify else None
    if notify:
        out.append(f"NOTIFY={notify}")
    orcpt = _orcpt(rcpt.orcpt, smtputf8) if rcpt.orcpt else None
    if orcpt:
        out.append(f"ORCPT={orcpt}")
    elif (rcpt.original and rcpt.original.isascii() and rcpt.original.isprintable()
          and " " not in rcpt.original):
        out.append(f"ORCPT=rfc822;{xtext(rcpt.original)}")
    return out
