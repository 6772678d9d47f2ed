"""Events the SMTP engine hands to its driver.

Events marked *decision* pause the engine until the driver calls ``engine.respond(reply)``:
the reply decides what happens (2xx/3xx go on, 4xx/5xx refuse). Other events are
notifications the driver acts on without answering.

The HELO name, the addresses and the ESMTP parameters are text the engine has checked (see
``pymta.smtp.params``): valid Unicode from valid UTF-8, without control characters, line or
paragraph separators, format characters, surrogates or unassigned code points, parameters in
their RFC syntax. Consumers still quote them for the field they write them into. SASL
credentials (``Auth``) are only base64-decoded UTF-8: the session checks them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pymta.smtp.params import MailParams, RcptParams
from pymta.types import Reply


class _Sentinel:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA = _Sentinel("NEED_DATA")   # the engine has consumed its input; flush output, read more
PAUSED = _Sentinel("PAUSED")         # a decision is pending; call respond() first


@dataclass(frozen=True, slots=True)
class Helo:
    """Notification: HELO/EHLO accepted (the transaction was reset). ``name`` is what the
    client said, unverified: printable, no spaces, at most 255 octets; not necessarily a
    domain or an address literal."""

    name: str
    extended: bool


@dataclass(frozen=True, slots=True)
class MailFrom:
    """Decision: accept this sender? ``address`` is ``""`` for the null sender; non-ASCII
    only when ``params.smtputf8``."""

    address: str
    params: MailParams


@dataclass(frozen=True, slots=True)
class RcptTo:
    """Decision: accept this recipient? A 2xx counts it for the transaction."""

    address: str
    params: RcptParams


@dataclass(frozen=True, slots=True)
class DataStart:
    """Decision: open the spool for a message. Reply 354 (DATA) or any 2xx (BDAT) to go on."""

    bdat: bool


@dataclass(frozen=True, slots=True)
class DataChunk:
    """Notification: message bytes, unstuffed, CRLF line endings, in order; never empty,
    never a bare CR or LF, never a NUL (once one is seen no more chunks come, and the
    ``DataEnd`` carries the refusal)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class DataEnd:
    """Decision: the message is complete. ``error`` is set when the engine already knows it
    must be refused (size exceeded ``552 5.3.4``, a NUL or a bare CR/LF in BDAT ``554
    5.6.0``); the driver discards the spool and answers with it. Otherwise the driver
    commits and answers 250 (or 4xx on local fault). ``size`` is the message's size in
    octets (unstuffed), however it was cut into reads and whether or not it is refused."""

    error: Reply | None
    size: int


@dataclass(frozen=True, slots=True)
class Reset:
    """Notification: the transaction is gone (RSET, HELO, or a failed DATA/BDAT)."""


@dataclass(frozen=True, slots=True)
class StartTLS:
    """Notification: ``220`` is in the output; flush it, upgrade the transport, then call
    ``engine.tls_established()``. Input received meanwhile is discarded by the engine."""


@dataclass(frozen=True, slots=True)
class Auth:
    """Decision: a SASL exchange finished and its credentials wait to be checked.

    The engine has already run the exchange (``334`` challenges, base64, cancel, line limits);
    the driver checks the credentials and answers ``235`` (the engine then sets
    ``engine.auth_user`` to ``username`` unless the driver set it first), ``535``, or ``454``.

    PLAIN and LOGIN carry ``password``; CRAM-MD5 carries ``challenge`` (what the server sent,
    decoded) and ``password`` holds the client's hex digest. ``authzid`` is PLAIN's
    authorization identity ("" when absent). The secret is kept out of ``repr`` so that an
    event logged by mistake does not carry it.
    """

    mechanism: str
    username: str
    password: str = field(repr=False)
    authzid: str = ""
    challenge: str = field(default="", repr=False)


@dataclass(frozen=True, slots=True)
class Close:
    """Notification: flush the output and close the connection."""

    reason: str


Event = Helo | MailFrom | RcptTo | DataStart | DataChunk | DataEnd | Reset | StartTLS | Auth | Close

__all__ = [
    "NEED_DATA", "PAUSED", "Helo", "MailFrom", "RcptTo", "DataStart", "DataChunk", "DataEnd",
    "Reset", "StartTLS", "Auth", "Close", "Event", "Reply",
]
