"""The values that cross module boundaries: addresses, replies, envelopes, delivery outcomes,
and the pre-queue pipeline's verdicts and decision.

Values only: the ``typing.Protocol`` interfaces that adapters implement (recipient lookups,
authenticators, checks, delivery agents, the queue store) are in :mod:`pymta.contracts`, which
imports this module and nothing else of pymta. The core imports these two modules, never an
adapter by name; the wiring (``pymta.wiring``) connects adapters. Two modules with no pymta
imports of their own are what keeps the core and its adapters free of import cycles (maddy's
``framework/module``). The protocols' old names here (``pymta.types.RecipientLookup`` ...)
still resolve, lazily, for code written before they moved.
"""

from __future__ import annotations

import enum
import io
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:   # the protocols' old home, for type checkers (at run time: __getattr__)
    from pymta.contracts import (  # noqa: F401
        Authenticator,
        DeliveryAgent,
        RecipientLookup,
        Router,
    )


@dataclass(frozen=True, slots=True)
class Reply:
    """An SMTP reply: every reply pymta sends carries an enhanced status code (RFC 3463)."""

    code: int
    enhanced: str
    text: str

    def render(self) -> bytes:
        """The reply as wire bytes; multi-line text becomes ``code-`` continuation lines.

        An empty ``enhanced`` is for the few replies RFC 2034 exempts (greeting, EHLO, 354).
        """
        lines = self.text.split("\n")
        out = []
        code = self.code
        enh = f"{self.enhanced} " if self.enhanced else ""
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            out.append(f"{code}{sep}{enh}{line}\r\n")
        return "".join(out).encode("utf-8", "surrogateescape")

    @property
    def is_permanent(self) -> bool:
        return 500 <= self.code < 600

    @property
    def is_temporary(self) -> bool:
        return 400 <= self.code < 500

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"


class SMTPError(Exception):
    """A failure that already knows the SMTP reply it should become."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


class TemporaryFailure(SMTPError):
    """A backend could not answer now (directory down, disk full): always a 4xx, never a 5xx."""

    def __init__(self, text: str = "Temporary lookup failure", enhanced: str = "4.3.0",
                 code: int = 451) -> None:
        super().__init__(Reply(code, enhanced, text))


class SpoolClosedError(ValueError):
    """A spool was aborted (the client went away) or committed already: the message it held
    cannot be written, rewritten or committed any more (see ``pymta.contracts.Spool``)."""


@dataclass(frozen=True, slots=True)
class Address:
    """An RFC 5321 mailbox as given on the wire. The null sender ``<>`` is ``Address("")``."""

    text: str

    @property
    def is_null(self) -> bool:
        return self.text == ""

    @property
    def local(self) -> str:
        return self.text.rpartition("@")[0] if "@" in self.text else self.text

    @property
    def domain(self) -> str:
        return self.text.rpartition("@")[2].lower() if "@" in self.text else ""

    @property
    def key(self) -> str:
        """Case-folded form used for lookups and de-duplication (Postfix tables fold case)."""
        return self.text.lower()

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True, slots=True)
class Target:
    """One final destination of a recipient after alias expansion.

    ``local`` targets are delivered by a local transport (maildir/mbox, or LMTP when
    configured); ``mailbox`` is the mailbox path relative to the mail directory, ending in
    ``/`` for maildir. Remote targets (``local=False``) are handed to the relay transport.
    """

    address: str
    local: bool
    mailbox: str | None = None


@dataclass(frozen=True, slots=True)
class Destination:
    """What a recipient address resolves to: one or more final targets (aliases fan out)."""

    targets: tuple[Target, ...]


@dataclass(frozen=True, slots=True)
class ConnInfo:
    """Facts about the client connection that policy may use. ``peer_name`` is the client's
    forward-confirmed PTR name (``pymta.peername``), ``unknown`` when it has none or the
    lookup is off: as trustworthy as DNS, so fit for logs and trace fields, not for granting
    anything."""

    peer_ip: str
    peer_port: int
    helo: str = ""
    tls: bool = False
    authenticated_as: str | None = None
    peer_name: str = "unknown"


@dataclass(frozen=True, slots=True)
class Identity:
    """Who an authenticated client is (the SASL username after normalisation)."""

    username: str


class Notify(enum.Flag):
    """DSN NOTIFY (RFC 3461 §4.1). An empty flag set means the default: FAILURE (and DELAY)."""

    NEVER = 0
    SUCCESS = enum.auto()
    FAILURE = enum.auto()
    DELAY = enum.auto()


class RcptState(enum.Enum):
    PENDING = "pending"      # not yet delivered; due at Envelope.next_attempt
    DELIVERED = "delivered"  # final 2xx from the delivery agent
    FAILED = "failed"        # permanent failure or expired; a DSN was generated (unless NEVER)
    # Failed (permanent or expired) but its failure DSN is not queued yet: never handed to a
    # delivery agent again, kept until the notice is queued (Postfix's bounce log, kept
    # apart from the recipient's delivery state). Then FAILED.
    NOTICE_OWED = "notice_owed"


@dataclass(slots=True)
class Recipient:
    """Per-recipient queue state. Mutable: the queue manager updates it after each attempt.

    ``address`` is the final target address; ``original`` is the RCPT TO address the client
    gave (they differ after alias expansion), used in DSNs together with ``orcpt``.
    """

    address: str
    original: str
    local: bool = True
    mailbox: str | None = None
    notify: str | None = None           # raw NOTIFY value, e.g. "SUCCESS,FAILURE"; None = default
    orcpt: str | None = None            # raw ORCPT value, e.g. "rfc822;bob@example.com"
    state: RcptState = RcptState.PENDING
    attempts: int = 0
    last_reply: str = ""                # last reply text from an attempt, for logs/CLI/DSN
    last_attempt: float = 0.0
    next_hop: str = ""                  # where the last attempt went (e.g. "local", "mx.example")

    @property
    def notify_flags(self) -> Notify:
        if self.notify is None:
            return Notify.FAILURE | Notify.DELAY
        flags = Notify.NEVER
        for word in self.notify.upper().split(","):
            if word in ("SUCCESS", "FAILURE", "DELAY"):
                flags |= Notify[word]
        return flags


@dataclass(slots=True)
class Envelope:
    """Everything about a queued message except its body (kept in the spool file).

    ``received_at`` and ``next_attempt`` are Unix timestamps. ``body_type`` is the BODY=
    parameter (``7BIT``/``8BITMIME``), ``smtputf8`` the SMTPUTF8 flag; ``ret``/``envid`` the DSN
    RET and ENVID parameters. ``is_bounce`` marks DSNs pymta generated (never bounced again).
    ``prepend`` holds header fields the pipeline decided on after the body was spooled
    (Authentication-Results, DKIM-Signature, ARC-*); every delivery agent writes them first.

    TLS on the way out (RFC 8689): ``requiretls`` is the REQUIRETLS parameter of MAIL FROM
    (taken only over TLS): relay it only over verified TLS to a next hop that offers
    REQUIRETLS, else bounce (5.7.30); its DSNs carry it too and return headers only, and
    such a report (null sender) still goes on where the next hop lacks REQUIRETLS (§5).
    ``tls_optional`` is the message's ``TLS-Required: No`` header field, honoured only
    without REQUIRETLS: the sender lets the relay ignore TLS policy (DANE, MTA-STS, a
    configured level) and try TLS opportunistically (level ``may``). Never both true.
    """

    sender: str
    recipients: list[Recipient]
    received_at: float
    next_attempt: float
    client_ip: str = ""
    helo: str = ""
    auth_user: str | None = None
    body_type: str = "7BIT"
    smtputf8: bool = False
    ret: str | None = None
    envid: str | None = None
    size: int = 0
    held: bool = False
    is_bounce: bool = False
    protocol: str = "ESMTP"
    prepend: str = ""              # header lines (CRLF-terminated) added above the spooled body
    extra: dict[str, str] = field(default_factory=dict)
    client_name: str = ""          # the client's verified name (pymta.peername); "": unknown
    requiretls: bool = False       # MAIL FROM ... REQUIRETLS (RFC 8689 §4.1)
    tls_optional: bool = False     # "TLS-Required: No" without REQUIRETLS (RFC 8689 §4.2.2)

    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if r.state is RcptState.PENDING]


class OutcomeKind(enum.Enum):
    DELIVERED = "delivered"
    TEMPORARY = "temporary"
    PERMANENT = "permanent"


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result of one delivery attempt for one recipient, with the reply that decided it.

    ``reply`` is the remote or local reply (for a DSN's Diagnostic-Code and for logs);
    ``relay`` names the next hop (``local``, ``maildir``, ``host[ip]:port``).
    ``dsn_passed``: the next hop advertised DSN and took the recipient with its NOTIFY and
    ORCPT, so a success notice is its to send, not ours (RFC 3461 §4.1).
    """

    recipient: str
    kind: OutcomeKind
    reply: Reply
    relay: str = ""
    dsn_passed: bool = False


QueueId = str


class QueuedMessage:
    """A message handed to a delivery agent: its id, its envelope and its body.

    The body is the message exactly as it will be delivered (``Received:`` added, CRLF line
    endings, no dot-stuffing). ``open()`` reads it: from memory when the queue handed it over
    as bytes (``body``: a small message on its first attempt, so delivery does not read back
    what was just committed), else from the spool file. ``body_path`` is always a local file
    holding it, for agents that want a path: for a body in memory the file is made at the
    first use (``materialize``, the store's copy), so agents that only ``open()`` never cost
    one.
    """

    __slots__ = ("qid", "envelope", "body", "_path", "_materialize", "_lock")

    def __init__(self, qid: QueueId, envelope: Envelope, body_path: str = "", *,
                 body: bytes | None = None,
                 materialize: Callable[[], str] | None = None) -> None:
        if not body_path and (body is None or materialize is None):
            raise ValueError("a QueuedMessage needs body_path, or body with materialize")
        self.qid = qid
        self.envelope = envelope
        self.body = body
        self._path = body_path
        self._materialize = materialize
        # agents may ask for the path from their threads; only a body in memory makes one
        self._lock = threading.Lock() if materialize is not None else None

    @property
    def body_path(self) -> str:
        if not self._path:
            assert self._lock is not None and self._materialize is not None
            with self._lock:
                if not self._path:
                    self._path = self._materialize()
        return self._path

    def open(self) -> BinaryIO:
        """The body as a binary file from its start; the caller closes it."""
        if self.body is not None:
            return io.BytesIO(self.body)
        return open(self._path or self.body_path, "rb")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QueuedMessage):
            return NotImplemented
        return (self.qid, self.envelope, self._path, self.body) == (
            other.qid, other.envelope, other._path, other.body)

    __hash__ = None     # type: ignore[assignment]   # the envelope changes

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled (a process pool's agent) with its body as a file: a path travels, a
        lock and the store's callback do not."""
        return (QueuedMessage, (self.qid, self.envelope, self.body_path))

    def __repr__(self) -> str:
        where = f"{len(self.body)} bytes in memory" if self.body is not None else self._path
        return f"QueuedMessage({self.qid!r}, {where})"


# --------------------------------------------------------------------------- pipeline values

# Selects header fields of the message as received, for removal: called with one raw field
# (name, folded value, CRLF), true to drop it (see ``pymta.pipeline.headers``).
DropPredicate = Callable[[bytes], bool]


class Action(enum.IntEnum):
    """What happens to a message at the end of data; ordered by strength, so that the
    strongest verdict of all checks wins. (Not a DSN's ``Action:`` field: that is
    ``pymta.queue.dsn``'s own vocabulary.)"""

    PASS = 0          # queue it (with the header fields the stages added)
    QUARANTINE = 1    # queue it on hold, with a reason; ``pymta queue release`` delivers it
    DISCARD = 2       # answer 250 and drop it
    TEMPFAIL = 3      # answer the verdict's 4xx; nothing queued
    REJECT = 4        # answer the verdict's 5xx; nothing queued


@dataclass(frozen=True, slots=True)
class Verdict:
    """What one check concluded. ``reply`` is sent for REJECT/TEMPFAIL; ``headers`` are added
    (``"Name: value"`` without CRLF); ``auth_result`` is an RFC 8601 resinfo fragment such as
    ``spf=pass smtp.mailfrom=example.com`` for the Authentication-Results header.
    ``quarantine_kind``: the kind of blocked content (``virus``, ``banned``, ``spam``,
    ``bad-header``) when the message is to be kept in the quarantine (with QUARANTINE, and
    with REJECT: a refused message is kept too); ``bounce``: with QUARANTINE, the reply the
    sender's failure notice quotes (amavis's ``D_BOUNCE``)."""

    action: Action = Action.PASS
    reply: Reply | None = None
    headers: tuple[str, ...] = ()
    auth_result: str | None = None
    reason: str = ""
    quarantine_kind: str = ""
    bounce: Reply | None = None


@dataclass(slots=True)
class Decision:
    """The pipeline's one result for one message, applied by the queue side.

    ``action`` and, for REJECT/TEMPFAIL, ``reply`` are what the client is told. For PASS and
    QUARANTINE: ``prepend`` are header fields (each CRLF-terminated, in order) that stand above
    the spooled message (``Envelope.prepend``); ``drops`` select fields of the message as
    received to remove from the spool file before the commit; ``sender`` is the new envelope
    sender (SRS), None to keep the client's; ``quarantine`` is why the message is held (set
    when ``action`` is QUARANTINE, and with REJECT when the refused message is kept in the
    quarantine all the same); ``quarantine_kind`` says what was found (``pymta.queue.
    quarantine``: empty for a plain hold); ``bounce`` is the reply quoted in the failure
    notice the sender gets for a blocked message (``D_BOUNCE``). ``reasons`` are the
    stages' explanations, for the log line.

    A value: built once by the pipeline, then only read (by the session and the intake).
    Not ``frozen``: a frozen dataclass of seven fields costs about a microsecond more to
    build, on the accept path of every message.
    """

    action: Action = Action.PASS
    reply: Reply | None = None
    prepend: tuple[str, ...] = ()
    drops: tuple[DropPredicate, ...] = ()
    sender: str | None = None
    quarantine: str | None = None
    reasons: tuple[str, ...] = ()
    quarantine_kind: str = ""
    bounce: Reply | None = None


# ------------------------------------------------------------------ the protocols' old home

_MOVED = frozenset({"RecipientLookup", "Authenticator", "DeliveryAgent", "Router"})


def __getattr__(name: str) -> Any:
    """``pymta.types.RecipientLookup`` and the other protocols moved to :mod:`pymta.contracts`
    (issue 11); resolved lazily, since that module imports this one."""
    if name in _MOVED:
        from pymta import contracts

        return getattr(contracts, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

