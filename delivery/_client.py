"""What the SMTP relay and the LMTP client share: reply mapping, envelope parameters, hygiene.

Both clients make the same per-recipient decisions (2xx delivered, 4xx temporary, 5xx
permanent, always with the remote reply), send the same MAIL/RCPT parameters when the peer
advertises the extension (SIZE, BODY, SMTPUTF8, and DSN's RET/ENVID/NOTIFY/ORCPT), and apply
the same outbound hygiene before the transaction (RFC 6531 §3.2, RFC 6152 §3, RFC 1870).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from pymta.types import Outcome, OutcomeKind, QueuedMessage, Recipient, Reply

from .downgrade import has_8bit, needs_smtputf8, to_7bit

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
    for byte in text.encode("utf-8"):
        if 33 <= byte <= 126 and byte not in (0x2B, 0x3D):
            out.append(chr(byte))
        else:
            out.append(f"+{byte:02X}")
    return "".join(out)


def read_body(msg: QueuedMessage) -> bytes:
    """The message as it leaves: the pipeline's prepended header fields, then the spool."""
    with open(msg.body_path, "rb") as fh:
        body = fh.read()
    prepend = msg.envelope.prepend
    return prepend.encode("utf-8", "surrogateescape") + body if prepend else body


@dataclass(slots=True)
class Prepared:
    """A message made ready for one peer: the bytes to send and the MAIL parameters, or the
    reply that refuses it for every recipient (``refusal``)."""

    data: bytes
    mail_options: list[str]
    smtputf8: bool
    refusal: Reply | None = None


def prepare(msg: QueuedMessage, rcpts: Sequence[Recipient], data: bytes,
            extensions: dict[str, str], peer: str) -> Prepared:
    """Apply outbound hygiene for a peer with these (lower-case) EHLO/LHLO extensions."""
    env = msg.envelope
    options: list[str] = []
    utf8 = bool(env.smtputf8) and needs_smtputf8(env.sender, [r.address for r in rcpts], data)
    if utf8 and "smtputf8" not in extensions:
        return Prepared(data, options, utf8, Reply(
            550, "5.6.7", f"SMTPUTF8 is required, but was not offered by host {peer}"))
    eight = has_8bit(data)
    if eight and "8bitmime" not in extensions:
        data = to_7bit(data)  # RFC 6152 §3: convert; 8-bit header bytes stay (see downgrade)
        eight = has_8bit(data)
    if "size" in extensions:
        limit_text = extensions["size"].strip()
        limit = int(limit_text) if limit_text.isdigit() else 0
        if limit and len(data) > limit:
            return Prepared(data, options, utf8, Reply(
                552, "5.3.4", f"message size {len(data)} exceeds size limit {limit} "
                              f"of server {peer}"))
        options.append(f"SIZE={len(data)}")
    if "8bitmime" in extensions:
        options.append("BODY=8BITMIME" if eight else "BODY=7BIT")
    if utf8:
        options.append("SMTPUTF8")
    if "dsn" in extensions:
        if env.ret:
            options.append(f"RET={env.ret.upper()}")
        if env.envid:
            options.append(f"ENVID={env.envid}")
    return Prepared(data, options, utf8)


def rcpt_options(rcpt: Recipient, extensions: dict[str, str]) -> list[str]:
    """NOTIFY and ORCPT for one RCPT when the peer speaks DSN (RFC 3461 §4.1, §4.2).

    Without an ORCPT from the client, the original recipient (before alias expansion) is
    sent, as Postfix does, so the final DSN names the address the sender used."""
    if "dsn" not in extensions:
        return []
    out = []
    if rcpt.notify:
        out.append(f"NOTIFY={rcpt.notify.upper()}")
    if rcpt.orcpt:
        out.append(f"ORCPT={rcpt.orcpt}")
    elif rcpt.original and rcpt.original.isascii():
        out.append(f"ORCPT=rfc822;{xtext(rcpt.original)}")
    return out
