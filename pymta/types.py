"""Values and extension-point contracts shared by the core and its adapters.

Everything that crosses a module boundary is defined here: frozen value objects (addresses,
replies, envelopes, outcomes) and the ``typing.Protocol`` interfaces that adapters in
``pymta.backends`` and ``pymta.delivery`` implement. The core imports only this module, never
an adapter by name; configuration wires adapters in. Keeping the contracts in one module is
what prevents import cycles between the core and its adapters (maddy's ``framework/module``).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


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
    """Facts about the client connection that policy may use."""

    peer_ip: str
    peer_port: int
    helo: str = ""
    tls: bool = False
    authenticated_as: str | None = None


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
    """

    recipient: str
    kind: OutcomeKind
    reply: Reply
    relay: str = ""


QueueId = str


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    """A message handed to a delivery agent: its id, envelope and the spool path of its body.

    The body file holds the message exactly as it will be delivered (``Received:`` added,
    CRLF line endings, no dot-stuffing). Agents open it read-only and stream from it.
    """

    qid: QueueId
    envelope: Envelope
    body_path: str


# --------------------------------------------------------------------------- extension points


@runtime_checkable
class RecipientLookup(Protocol):
    """Resolves a recipient address for the RCPT stage.

    Returns the Destination (after alias expansion) for an address this source knows, or
    None when it does not know it (the caller tries the next source; if none knows it the
    client gets ``550 5.1.1``). Raises TemporaryFailure when the backend cannot answer now
    (the client gets ``451 4.3.0`` and retries). Implementations fold case themselves.
    """

    async def lookup(self, address: Address) -> Destination | None: ...


@runtime_checkable
class Authenticator(Protocol):
    """Checks SASL credentials. None → ``535 5.7.8``; TemporaryFailure → ``454 4.7.0``.

    Implementations must never log the password. ``username`` arrives as the client sent it
    (``pymta.backends.authchain.AuthChain`` applies ``DOVECOT_AUTH_USERNAME_FORMAT`` first);
    the returned Identity's username is what ``Received:`` and the queue record show.

    Optional: an authenticator that holds plaintext secrets may set ``supports_cram_md5 =
    True`` and provide ``async authenticate_cram_md5(username, challenge, digest, conn)``
    (``digest`` = hex HMAC-MD5 of the challenge); CRAM-MD5 is offered only then.
    """

    async def authenticate(self, username: str, password: str,
                           conn: ConnInfo) -> Identity | None: ...


@runtime_checkable
class DeliveryAgent(Protocol):
    """Delivers one message to some of its recipients.

    Returns exactly one Outcome per recipient given, in any order. Must not raise for
    per-recipient problems; an unexpected exception is treated by the caller as a temporary
    failure of every recipient in the call (never a loss, never a bounce).

    An agent that delivers recipients one after another (mailboxes, LMTP replies, several
    SMTP transactions) should set ``reports_progress = True`` and accept ``report=``, a
    callable it gives each final Outcome as soon as it is known: if the call is then cancelled
    (a stop), what was reported is recorded and never delivered again. An optional
    ``begin_stop()`` (reached through the router) asks it to stop waiting (lock waits end as
    temporary failures) before the queue manager's stop grace runs out.
    """

    async def deliver(self, msg: QueuedMessage,
                      rcpts: Sequence[Recipient]) -> list[Outcome]: ...


@runtime_checkable
class Router(Protocol):
    """Chooses the delivery agent for a recipient.

    Returns ``(transport_key, agent)``; recipients of one message with the same key are
    handed to the agent in one call (one LMTP/SMTP session can carry them all).
    """

    def route(self, rcpt: Recipient) -> tuple[str, DeliveryAgent]: ...
