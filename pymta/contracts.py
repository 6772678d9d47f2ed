"""Every extension point of pymta, as a ``typing.Protocol`` whose docstring is its contract.

An adapter (a recipient lookup, an authenticator, a pre-queue check, a delivery agent, a queue
store) is any object with these methods: nothing to inherit, nothing to register by method
name. The core depends on these protocols only; which adapters fill them is decided in one
place, the wiring (``pymta.app``). Each docstring says what the core relies on when it calls
the method: what ``None`` means, what raising means (temporary or permanent), who enforces
time limits, who normalises case.

Rules shared by all of them:

* **Temporary versus permanent is explicit.** :class:`~pymta.types.TemporaryFailure` (a 4xx
  reply) means "cannot answer now, ask again later"; the core never turns it into a 5xx. Any
  other exception escaping an adapter is a fault of ours and is treated as temporary too,
  with one log line: an adapter's bug never loses or bounces mail.
* **The framework enforces the time limits** (architecture rule 5): the core wraps every
  call of a lookup, an authenticator, a check or a modifier in its own timeout, and a call
  that runs out is a temporary failure. Adapters keep their own, shorter limits on each
  network wait (``PYMTA_LOOKUP_TIMEOUT`` per connect and query); the framework's limit is
  the backstop for everything else (a hung thread, a library user's coroutine).
* **One lifecycle method.** An adapter that holds resources (pools, threads, cached
  connections, open files) has ``async aclose()`` (:class:`Closeable`); whoever built it
  calls it once at stop, and it must not raise for a resource that is already gone.
* **Optional capabilities are protocols of their own** (:class:`CramMD5Authenticator`,
  :class:`ProgressReportingAgent`, :class:`StoppableAgent`, :class:`FlushableAgent`), all
  ``runtime_checkable`` and tested with ``isinstance``: a capability is visible in the type,
  not discovered by attribute name.

The values these signatures use (Address, Envelope, Outcome, Verdict, Decision ...) are frozen
or slotted dataclasses in :mod:`pymta.types`; they are re-exported here so that an adapter
needs one import.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, BinaryIO, Protocol, runtime_checkable

from pymta.types import (
    Action,
    Address,
    ConnInfo,
    Decision,
    Destination,
    Envelope,
    Identity,
    Outcome,
    OutcomeKind,
    QueuedMessage,
    QueueId,
    Recipient,
    Reply,
    SMTPError,
    Target,
    TemporaryFailure,
    Verdict,
)

if TYPE_CHECKING:   # the pipeline's mutable working objects; pymta.pipeline imports this module
    from pymta.pipeline import SpooledBody, Transaction

__all__ = [
    # protocols
    "Authenticator", "Check", "Closeable", "CramMD5Authenticator", "DeliveryAgent",
    "FlushableAgent", "MessageLock", "Modifier", "Probeable", "ProgressReportingAgent",
    "QueueStore",
    "RecipientLookup", "Router", "Spool", "StoppableAgent",
    # values (from pymta.types)
    "Action", "Address", "ConnInfo", "Decision", "Destination", "Envelope", "Identity",
    "Outcome", "OutcomeKind", "QueueId", "QueuedMessage", "Recipient", "Reply", "SMTPError",
    "Target", "TemporaryFailure", "Verdict",
]


# --------------------------------------------------------------------------- lifecycle


@runtime_checkable
class Closeable(Protocol):
    """Something that holds resources until it is closed: pools, threads, connections.

    ``aclose()`` is called once, when the MTA stops, by whoever built the object (a chain
    closes its sources, a router its agents, the wiring the rest). It releases what it can
    and must not raise for a resource that is already gone; after it, no method is called
    again. Objects without resources do not need it.
    """

    async def aclose(self) -> None: ...


@runtime_checkable
class Probeable(Protocol):
    """An adapter that can tell whether the service behind it answers: ``pymta health`` asks
    every configured recipient source and SASL method that is one (issue 13).

    ``probe()`` asks the service the cheapest question that proves the adapter could do its
    work now, through the adapter's own connection code and settings (a directory: bind as
    the lookups do and read the search base; a database: connect and ``SELECT``; an IMAP
    server: greeting, ``CAPABILITY``, ``STARTTLS`` when offered). It returns a short detail
    for the health line (what answered) and raises an exception whose message says what
    failed (never a password). The caller bounds it with its own deadline and builds the
    adapter for the probe alone: it calls ``aclose()`` (when :class:`Closeable`) after.
    """

    async def probe(self) -> str: ...


# --------------------------------------------------------------------------- receiving


@runtime_checkable
class RecipientLookup(Protocol):
    """Resolves a recipient address for ``RCPT TO`` (and a notice's recipient for DSNs).

    Returns the :class:`~pymta.types.Destination` (after alias expansion) of an address this
    source knows, or ``None`` when it does not know it: the next source is asked, and when no
    source knows it the client gets ``550 5.1.1``. Raises
    :class:`~pymta.types.TemporaryFailure` when it cannot answer now (directory down, a
    timeout): the client gets ``451 4.3.0`` and retries; it must never answer ``None``
    instead, since "unknown" bounces mail. Raises another :class:`~pymta.types.SMTPError`
    with a permanent reply to refuse the address with that reply (a forged SRS address).
    Any other exception is a fault: ``451 4.3.0`` and one log line.

    Case: ``address`` arrives as the client wrote it; the source folds case where its table
    does (``Address.key``), as Postfix tables do. Time: the session cuts one RCPT's whole
    lookup at its lookup timeout (a temporary failure); a source bounds its own network
    waits with ``PYMTA_LOOKUP_TIMEOUT``. A source holding pools or threads is
    :class:`Closeable`.
    """

    async def lookup(self, address: Address) -> Destination | None: ...


@runtime_checkable
class Authenticator(Protocol):
    """Checks SASL credentials (AUTH PLAIN and LOGIN).

    Returns the :class:`~pymta.types.Identity` for right credentials, ``None`` for wrong ones
    (the client gets ``535 5.7.8``, delayed per client address by
    ``pymta.receiving.auth``). Raises
    :class:`~pymta.types.TemporaryFailure` when it cannot check now (the client gets ``454
    4.7.0``): a backend that is down must never turn a right password into ``535``. Any other
    exception is a fault: ``454 4.7.0`` and one log line naming only the exception's type.

    ``username`` arrives as the client sent it (an :class:`AuthChain
    <pymta.backends.authchain.AuthChain>` applies ``DOVECOT_AUTH_USERNAME_FORMAT`` before its
    methods see it); the returned Identity's username is what ``Received:`` and the queue
    record show. ``conn`` tells whether the connection is under TLS. Implementations never
    log the password. Time: ``pymta.receiving.auth`` cuts one check at its timeout
    (``454 4.7.0``).
    """

    async def authenticate(self, username: str, password: str,
                           conn: ConnInfo) -> Identity | None: ...


@runtime_checkable
class CramMD5Authenticator(Authenticator, Protocol):
    """An authenticator that can also check CRAM-MD5 (RFC 2195), which needs the plaintext
    secret on the server side.

    ``supports_cram_md5`` says whether it can right now (a password file can only when every
    entry is ``{PLAIN}``): CRAM-MD5 is advertised only when it is true. ``digest`` is the
    client's hex HMAC-MD5 of ``challenge``; the answers mean what they mean for
    :meth:`Authenticator.authenticate`.
    """

    @property
    def supports_cram_md5(self) -> bool: ...

    async def authenticate_cram_md5(self, username: str, challenge: str, digest: str,
                                    conn: ConnInfo) -> Identity | None: ...


@runtime_checkable
class Check(Protocol):
    """Read-only judgement of a complete message before the ``250`` (SPF, DKIM verify, DMARC,
    spam, virus, banned files).

    Returns a :class:`~pymta.types.Verdict`; the strongest verdict of all checks decides the
    message (REJECT > TEMPFAIL > DISCARD > QUARANTINE > PASS). ``name`` keys its verdict in
    ``Transaction.results`` for later stages. A check may record Authentication-Results
    fragments and ask for header fields through its Verdict; it must not change the body.
    Raising ``pymta.pipeline.CannotEvaluate`` means "this message cannot be judged" (no
    opinion, logged); any other exception, or running past the pipeline's timeout
    (``PYMTA_PIPELINE_TIMEOUT``, enforced by the pipeline), is a temporary failure: ``451
    4.7.0``, never a silent pass and never a 5xx.
    """

    name: str

    async def check(self, txn: Transaction, body: SpooledBody) -> Verdict: ...


@runtime_checkable
class Modifier(Protocol):
    """Rewrites envelope or header fields before the commit (SRS, DKIM sign, ARC seal,
    Authentication-Results): ``txn.sender``, ``txn.add_header``, ``txn.drop_header``.

    Must not change the body (signatures would break). Raising ``CannotEvaluate`` before
    changing anything leaves the message as it is (logged); any other exception, or running
    past the pipeline's timeout, is a temporary failure (``451 4.7.0``).
    """

    name: str

    async def modify(self, txn: Transaction, body: SpooledBody) -> None: ...


# --------------------------------------------------------------------------- delivering


@runtime_checkable
class DeliveryAgent(Protocol):
    """Delivers one message to some of its recipients (one next hop).

    Returns exactly one :class:`~pymta.types.Outcome` per recipient given, in any order:
    DELIVERED (a final 2xx), TEMPORARY (try again later), PERMANENT (bounce, with the reply
    for the DSN). Must not raise for a recipient's own problem. An exception, a missing
    outcome, or a call running past the queue manager's agent timeout is a temporary failure
    of every recipient concerned (never a loss, never a bounce).

    The body is ``msg.open()`` (a binary file; from memory when the queue handed a small
    message over in ``msg.body``) or the local file ``msg.body_path`` (made on first use for
    a body in memory): the message exactly as delivered (``Received:`` first, CRLF, no
    dot-stuffing; ``msg.envelope.prepend`` goes above it), readable while the call runs.
    Agents read it in threads or stream it to a socket; they never change it. An agent
    holding connections or threads is :class:`Closeable`.
    """

    async def deliver(self, msg: QueuedMessage,
                      rcpts: Sequence[Recipient]) -> list[Outcome]: ...


@runtime_checkable
class ProgressReportingAgent(DeliveryAgent, Protocol):
    """An agent that delivers recipients one after another (mailboxes, LMTP's reply per
    recipient, several SMTP transactions) and says so as it goes.

    ``deliver`` then accepts ``report``, a callable given each recipient's final Outcome as
    soon as it is known. If the call is cancelled (a stop) or fails, what was reported is
    recorded all the same and never delivered again; the return value still holds one
    outcome per recipient. ``reports_progress`` (always ``True``) is the marker
    ``isinstance`` sees: a runtime check cannot see a keyword parameter.
    """

    reports_progress: bool

    async def deliver(self, msg: QueuedMessage, rcpts: Sequence[Recipient],
                      report: Callable[[Outcome], None] | None = None) -> list[Outcome]: ...


@runtime_checkable
class StoppableAgent(Protocol):
    """An agent (or a router, which passes it on to its agents) that can be told the server
    is stopping before its calls are cancelled.

    ``begin_stop()`` returns at once; from then on the agent stops waiting (an mbox lock wait
    ends as a temporary failure), so its calls return with every outcome before the queue
    manager's stop grace runs out. Writes already under way finish.
    """

    def begin_stop(self) -> None: ...


@runtime_checkable
class FlushableAgent(Protocol):
    """An agent (or a router, passing it on) that remembers failures between messages (dead
    hosts): ``flush()`` forgets them, for ``pymta queue flush``. Returns at once."""

    def flush(self) -> None: ...


@runtime_checkable
class Router(Protocol):
    """Chooses the delivery agent for a recipient.

    Returns ``(transport_key, agent)``; recipients of one message with the same key are
    handed to the agent in one call (one LMTP/SMTP session can carry them all). Must not
    raise for a routable recipient; an exception defers that recipient (``451 4.3.0``). A
    router that owns its agents passes :class:`StoppableAgent`, :class:`FlushableAgent` and
    :class:`Closeable` on to them.
    """

    def route(self, rcpt: Recipient) -> tuple[str, DeliveryAgent]: ...


# --------------------------------------------------------------------------- the queue


@runtime_checkable
class NoticeSigner(Protocol):
    """Signs the notices the queue manager writes itself (DSNs: bounce, delay and success
    reports), which never pass through the pipeline's signing stage (issue 15).

    Called with the complete notice (CRLF line ends) in a worker thread: it may read a key
    file and does one RSA or ed25519 operation. Returns the header field(s) to put on top
    of the notice, each CRLF-terminated (a ``DKIM-Signature:``), or ``b""`` when the notice
    is not its to sign (its ``From:`` domain is not one we sign for). Raising means "cannot
    sign it now": the manager queues the notice unsigned and logs a warning, so a notice is
    never lost or held back for want of a signature.

    Between the wiring and the queue manager only (``wiring.notice_signer``): not in
    ``__all__``, since ``pymta.MTA`` takes no signer of an embedder's.
    """

    def __call__(self, message: bytes) -> bytes: ...


@runtime_checkable
class MessageLock(Protocol):
    """The claim on one queued message: while it is held, nobody else (no other task, worker
    process or node) attempts the message or changes its state.

    A claim is a lease. The local store's is an ``flock`` on the body: it cannot lapse, and
    it dies with its process, so a crashed worker frees its messages at once. A networked
    store's is a lease with an expiry that the store renews in the background while the claim
    is held; when it cannot (the store unreachable for longer than the lease) ``held`` turns
    false, and ``save``/``remove`` under that claim raise ``OSError`` (``ESTALE``): the queue
    manager then keeps the attempt's outcomes in memory and claims the message again, the
    same path as a write to a failing disk. The message may meanwhile have been attempted
    elsewhere: at-least-once delivery, the window a crash also leaves.

    ``release()`` is idempotent, synchronous and never raises (a networked store lets the
    lease go in the background, or lets it expire).
    """

    qid: QueueId

    @property
    def held(self) -> bool: ...

    def release(self) -> None: ...


@runtime_checkable
class Spool(Protocol):
    """A message body being received, before its commit (``QueueStore.new_spool``).

    ``write`` appends (it may raise ``OSError``: the session answers with
    ``QueueStore.write_fault``); ``size`` counts what was written. ``path`` is a local file
    holding the body, which the pipeline's stages read after ``flush()``: every store spools
    locally while DATA arrives (the client streams at disk speed, a stage reads a file), and a
    networked store sends the body to its server at the commit. ``abort()`` forgets the
    message and removes the file; it is idempotent, and a no-op once a commit has taken the
    spool (the commit then either makes it durable or removes it). ``closed`` is true after
    either. ``lock``: after a commit by a store that hands claims over, the message's claim,
    still held, for its first delivery attempt (see ``pymta.queue.intake``); else None.
    """

    qid: QueueId
    path: str
    size: int
    lock: MessageLock | None

    @property
    def closed(self) -> bool: ...

    def write(self, data: bytes) -> None: ...

    def flush(self) -> None: ...

    def in_memory(self) -> bytes | None:
        """The whole body while the spool still holds all of it in memory (stages then read
        it from there and the file is never written), else None: read ``path`` after
        ``flush()``."""
        ...

    def abort(self) -> None: ...


@runtime_checkable
class QueueStore(Protocol):
    """Where accepted messages live until every recipient is done: the only hand-off between
    receiving and delivering.

    The contract is written for a store that is not a local directory too (a database shared
    by several nodes): every operation that may wait for I/O is a coroutine; a message is
    worked on under a claim (:class:`MessageLock`) that may be a lease; file paths appear only
    where a body is handed to its readers (``Spool.path`` for pre-queue stages,
    :meth:`open_body` for delivery agents), as local files, because every reader streams a body
    from a file in a thread (mailbox writes, SMTP/LMTP sends) and a per-chunk await would put
    each chunk through the event loop. A networked store downloads a body into a local cache
    file when it is asked for it and removes that file when the claim is released.

    Faults: every local fault while taking a message is a
    :class:`~pymta.types.TemporaryFailure` with the client's reply (``452 4.3.1`` for a full
    disk, ``451 4.3.0`` otherwise), and the message is not queued: a client never gets ``250``
    for something not durable. Faults on the delivery side raise ``OSError``, and the caller
    retries that write alone (never the delivery); a message that is gone reads as ``None``.

    Receiving (the session, through ``pymta.queue.intake``): ``admission`` before ``MAIL
    FROM`` (cheap, cached), ``new_spool`` at ``DATA``, ``rewrite_spool`` for the rare removal
    of a received header field, ``commit`` before the ``250``. Delivering (the queue manager):
    ``list_queued``, ``claim``, ``load_envelope``, ``open_message`` (or ``open_body``),
    ``save``/``remove`` under
    the claim, ``enqueue_bytes`` for the notices it generates.
    """

    # ------------------------------------------------------------------ receiving

    def admission(self, size: int = 0, reserve: int = 0) -> TemporaryFailure | None:
        """Why no message of ``size`` bytes can be taken now (keeping ``reserve`` bytes
        free), or None. Called for every ``MAIL FROM``: must not wait for I/O each time."""
        ...

    def new_spool(self) -> Spool:
        """A new, empty spool with its queue id. Raises ``OSError`` on a local fault."""
        ...

    def write_fault(self, err: BaseException) -> TemporaryFailure:
        """The client's reply for a local fault ``err`` while taking a message."""
        ...

    async def rewrite_spool(self, spool: Spool,
                            transform: Callable[[BinaryIO, BinaryIO], None]) -> None:
        """Replace the uncommitted body by ``transform(old, new)``'s output, same queue id.
        Raises ``OSError`` (the spool is unchanged), or ``SpoolClosedError`` when the spool
        was aborted meanwhile (the client went away)."""
        ...

    async def commit(self, spool: Spool, envelope: Envelope) -> QueueId:
        """Make the message durable; on return it may be acknowledged with ``250``. Sets
        ``envelope.size``. Raises TemporaryFailure on any fault (the spool removed), and
        ``SpoolClosedError`` when the spool was aborted before the commit took it."""
        ...

    async def enqueue_bytes(self, envelope: Envelope, data: bytes) -> QueueId:
        """Queue a message held in memory (a DSN); as durable as ``commit``, same faults."""
        ...

    # ------------------------------------------------------------------ delivering

    async def list_queued(self) -> list[QueueId]:
        """Every committed message, oldest first. Raises ``OSError`` when the store cannot
        be read."""
        ...

    async def claim(self, qid: QueueId) -> MessageLock | None:
        """The claim on ``qid``, or None when another holder has it or the message is gone.
        Never waits for the holder."""
        ...

    async def load_envelope(self, qid: QueueId) -> Envelope | None:
        """The message's envelope as stored, or None when it is gone or unusable (then the
        store sets it aside, with one log line, and it is never offered again). Raises
        ``OSError`` for a read fault that is not a verdict on the message."""
        ...

    async def open_body(self, qid: QueueId) -> str:
        """A local file holding the body, for delivery agents; call with the claim held.
        The file stays readable until the claim is released."""
        ...

    async def open_message(self, qid: QueueId, envelope: Envelope) -> QueuedMessage:
        """The message for its delivery agents; call with the claim held, the body stays
        readable until the claim is released. A store that still holds a body it has just
        committed hands it over in memory (``QueuedMessage.body``, its file made only if an
        agent asks for ``body_path``), so a first attempt does not read back what the
        commit wrote; otherwise as :meth:`open_body`."""
        ...

    async def exists(self, qid: QueueId) -> bool:
        """Whether the message is still queued (after a write under its claim failed)."""
        ...

    async def save(self, qid: QueueId, envelope: Envelope) -> None:
        """Replace the envelope atomically and durably; call with the claim held. Raises
        ``OSError`` (the old envelope stays), ``FileNotFoundError`` when the message is
        gone (a message is never recreated)."""
        ...

    async def remove(self, qid: QueueId) -> None:
        """Delete the message (it is done); call with the claim held, which goes with it.
        Raises ``OSError`` when it could not, and the claim is then still held."""
        ...

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Ready to commit (connect, recover after a crash, start background work)."""
        ...

    async def aclose(self) -> None:
        """Finish commits in flight, then release every resource."""
        ...
