"""The receiving side's policy for one SMTP session: who may send, to whom, and the hand-off
of a complete message to the queue.

The protocol engine decides what is well-formed; this module decides what is acceptable and
makes it durable. Implementation summary: RCPT resolves each address through the recipient
lookups (first source that knows it wins) and keeps the expanded, de-duplicated targets; DATA
and BDAT open a spool file and write our ``Received:`` header before the first byte of the
message; chunks stream straight to the spool; the end of data runs the content checks
(hop count, header size), then commits envelope and body durably (group commit) and only
then answers ``250``. Every local fault becomes a 4xx and the partial spool file is removed:
``452 4.3.1`` when the queue's disk is full (already at ``MAIL FROM`` when less than
Postfix's ``queue_minfree`` reserve is free, see ``pymta.queue.space``), ``451 4.3.0`` for
any other fault (a read-only or failing file system, a bug).

A client that disconnects while the end-of-data decision runs (slow pre-queue checks) gets
nothing queued: the decision keeps the spool file until it ends (its stages may be reading
the file, or a thread rewriting it), then removes it and logs one NOTICE line, ``lost
connection after end of data from unknown[IP]``. Nothing was acknowledged, so the client
sends the message again; only a disconnect after the commit has started leaves it queued
(the unavoidable window of RFC 1047, as with Postfix).

Relay policy (Postfix's ``permit_mynetworks, permit_sasl_authenticated, reject``): a recipient
outside the local domains is accepted only from an authenticated client (``auth_user``, set by
a successful AUTH) or from an address in ``MYNETWORKS`` (``relay_allowed``); everyone else
gets ``554 5.7.1 Relay access denied``. AUTH credentials go to the configured Authenticator;
the password is never logged, the user name only in Postfix's ``sasl_username=`` form.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pymta.headerscan import HeaderScanner
from pymta.log import NOTICE
from pymta.pipeline import Action, Pipeline, SpooledBody, Transaction
from pymta.pipeline.headers import copy_without
from pymta.queue.space import reserve_for
from pymta.queue.store import QueueStore, SpoolClosedError, SpoolWriter, queue_write_error
from pymta.received import protocol_name, received_header
from pymta.smtp import events as ev
from pymta.types import (
    Address,
    Authenticator,
    ConnInfo,
    Envelope,
    Recipient,
    RecipientLookup,
    Reply,
    SMTPError,
    Target,
    TemporaryFailure,
)

log = logging.getLogger("pymta.smtpd")

R_RELAY_DENIED = "Relay access denied"
R_AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
R_AUTH_FAILED = Reply(535, "5.7.8", "Error: authentication failed")
R_AUTH_TEMP = Reply(454, "4.7.0", "Temporary authentication failure")
R_LOCAL_ERROR = Reply(451, "4.3.0", "Error: local error in processing")
# Never sent (the client is gone); what the engine is told so that it forgets the message.
R_LOST = Reply(451, "4.4.2", "Error: lost connection")

# How much of a message's start a session keeps in memory for the pipeline's header reads
# (``SpooledBody.head``); a header section longer than this is read back from the spool file.
HEAD_KEEP = 32 * 1024


def network_matcher(networks: Sequence[str]) -> Callable[[str], bool]:
    """``relay_allowed`` for ``MYNETWORKS``: is a client address inside one of the networks?
    Empty (the default) trusts nobody. IPv4-mapped IPv6 clients match their IPv4 networks."""
    nets = [ipaddress.ip_network(n, strict=False) for n in networks]
    if not nets:
        return lambda ip: False

    def allowed(ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip.partition("%")[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr.version == net.version and addr in net for net in nets)

    return allowed


def _printable(text: str) -> str:
    """A client-given name as it may appear in a log line: one line, no control bytes."""
    return "".join(c if c.isprintable() else "?" for c in text)[:255]


@dataclass
class ReceiveContext:
    """What every session of a server shares: configuration-derived policy and the queue."""

    hostname: str
    local_domains: frozenset[str]
    first_domain: str
    lookups: Sequence[RecipientLookup]
    store: QueueStore
    submit: Callable[..., None]        # (qid, envelope[, lock]): see QueueManager.submit
    header_size_limit: int = 1048576
    max_received: int = 50
    relay_allowed: Callable[[str], bool] = field(default=lambda ip: False)
    authenticator: Authenticator | None = None
    pipeline: Pipeline | None = None
    # Every accepted message waits on hold until ``pymta queue release`` (Postfix's HOLD
    # action for all mail): for maintenance of what is behind us, and for measuring
    # the receiving side alone.
    hold_incoming: bool = False
    # Free space the queue keeps before a MAIL FROM is accepted (452 4.3.1 below it):
    # Postfix's queue_minfree, and never less than 1.5 x the message size limit.
    message_size_limit: int = 10240000
    queue_minfree: int = 0


class Session:
    """Policy state of one connection; the protocol adapter calls it on decision events."""

    __slots__ = ("ctx", "peer_ip", "peer_port", "helo", "extended", "tls_info", "auth_user",
                 "_sender", "_mail", "_targets", "_spool", "_scanner", "_write_error",
                 "_started", "_head", "_head_room", "_ending", "_gone", "_at_start")

    def __init__(self, ctx: ReceiveContext, peer_ip: str, peer_port: int) -> None:
        self.ctx = ctx
        self.peer_ip = peer_ip
        self.peer_port = peer_port
        self.helo = ""
        self.extended = False
        self.tls_info: str | None = None
        self.auth_user: str | None = None
        self._spool: SpoolWriter | None = None
        # True while on_data_end runs: it owns the spool then, and an abort (the client
        # disconnected) only sets ``_gone`` for it to act on.
        self._ending = False
        self._gone = False
        self._reset()

    # ------------------------------------------------------------------ transaction

    def _reset(self) -> None:
        self.abort()
        self._sender: str | None = None
        self._mail: ev.MailFrom | None = None
        self._targets: dict[str, Recipient] = {}
        self._scanner: HeaderScanner | None = None
        self._write_error: OSError | None = None
        self._started = 0.0
        self._head: list[bytes] = []
        self._head_room = 0
        self._at_start = False

    def abort(self) -> None:
        """Drop a partial message (failed DATA, disconnect): nothing was acknowledged.

        While the end-of-data decision runs, its stages may be reading the spool file (or a
        thread rewriting it): the decision is told instead, and drops the message when its
        current step ends."""
        if self._ending:
            self._gone = True
            return
        spool = self._spool
        if spool is not None:
            self._spool = None
            spool.abort()

    def on_helo(self, event: ev.Helo) -> None:
        self.helo = event.name
        self.extended = event.extended
        self._reset()

    def on_reset(self) -> None:
        self._reset()

    def on_tls(self, info: str) -> None:
        self.tls_info = info
        self.helo = ""
        self._reset()

    def on_mail(self, event: ev.MailFrom) -> Reply:
        # Postfix's queue_minfree check: refuse before the client sends anything when the
        # queue could not take the message (cached statvfs: no syscall per command).
        refusal = self.ctx.store.admission(
            event.params.size or 0,
            reserve_for(self.ctx.message_size_limit, self.ctx.queue_minfree))
        if refusal is not None:
            return refusal.reply
        self._mail = event
        self._sender = event.address
        self._targets = {}
        self._started = time.time()
        return Reply(250, "2.1.0", "Ok")

    async def on_rcpt(self, event: ev.RcptTo) -> Reply:
        text = event.address
        if "@" not in text:  # bare <postmaster> (RFC 5321 §4.1.1.3)
            text = f"postmaster@{self.ctx.first_domain}"
        address = Address(text)
        domain = address.domain
        if domain in self.ctx.local_domains:
            try:
                destination = None
                for source in self.ctx.lookups:
                    destination = await source.lookup(address)
                    if destination is not None:
                        break
            except SMTPError as exc:
                log.warning("lookup of <%s> failed: %s", text, exc.reply)
                return exc.reply
            if destination is None:
                return Reply(550, "5.1.1", f"<{text}>: Recipient address rejected: "
                                           "User unknown in virtual mailbox table")
            targets: Sequence[Target] = destination.targets
        elif self.auth_user is not None or self.ctx.relay_allowed(self.peer_ip):
            targets = (Target(text, local=False),)
        else:
            return Reply(554, "5.7.1", f"<{text}>: {R_RELAY_DENIED}")
        params = event.params
        for target in targets:
            key = target.address.lower()
            if key not in self._targets:
                self._targets[key] = Recipient(
                    address=target.address, original=text, local=target.local,
                    mailbox=target.mailbox, notify=params.notify, orcpt=params.orcpt)
        return Reply(250, "2.1.5", "Ok")

    def on_data_start(self, event: ev.DataStart) -> Reply:
        try:
            spool = self.ctx.store.new_spool()
        except OSError as exc:
            log.error("cannot create a spool file: %s", exc)
            return self.ctx.store.write_fault(exc).reply
        self._spool = spool
        self._scanner = HeaderScanner(self.ctx.header_size_limit)
        rcpts = list(self._targets.values())
        originals = {r.original for r in rcpts}
        header = received_header(
            helo=self.helo, peer_ip=self.peer_ip, hostname=self.ctx.hostname,
            protocol=self.protocol, qid=spool.qid, tls_info=self.tls_info,
            recipient=next(iter(originals)) if len(originals) == 1 else None,
            now=time.time(), auth_user=self.auth_user)
        self._write(header)
        self._head = [header]
        self._head_room = HEAD_KEEP
        self._at_start = True
        if event.bdat:
            return Reply(250, "2.0.0", "Ok")
        return Reply(354, "", "End data with <CR><LF>.<CR><LF>")

    async def on_auth(self, event: ev.Auth) -> Reply:
        """Check SASL credentials: ``235`` (and ``auth_user`` set), ``535 5.7.8``, or
        ``454 4.7.0`` when no method could answer."""
        auth = self.ctx.authenticator
        user = event.username
        shown = _printable(user)
        if auth is None:
            return R_AUTH_TEMP
        if (any(c in user or c in event.password for c in "\r\n\0") or len(user) > 255
                or (event.authzid and event.authzid != user)):
            # a name no backend should ever see (IMAP/LDAP syntax), or a proxy login
            log.warning("unknown[%s]: SASL %s authentication failed: bad user name or "
                        "authorization id, sasl_username=%s", self.peer_ip, event.mechanism,
                        shown)
            return R_AUTH_FAILED
        conn = ConnInfo(self.peer_ip, self.peer_port, self.helo, tls=True)
        try:
            if event.mechanism == "CRAM-MD5":
                identity = await auth.authenticate_cram_md5(  # type: ignore[attr-defined]
                    user, event.challenge, event.password, conn)
            else:
                identity = await auth.authenticate(user, event.password, conn)
        except TemporaryFailure as exc:
            log.warning("unknown[%s]: SASL %s authentication failed: %s, sasl_username=%s",
                        self.peer_ip, event.mechanism, exc.reply.text, shown)
            return R_AUTH_TEMP
        except Exception as exc:  # a broken authenticator: temporary, and no traceback
            log.error("unknown[%s]: SASL %s authenticator failed: %s, sasl_username=%s",
                      self.peer_ip, event.mechanism, type(exc).__name__, shown)
            return R_AUTH_TEMP
        if identity is None:
            log.warning("unknown[%s]: SASL %s authentication failed: authentication failure, "
                        "sasl_username=%s", self.peer_ip, event.mechanism, shown)
            return R_AUTH_FAILED
        self.auth_user = identity.username
        log.info("unknown[%s]: sasl_method=%s, sasl_username=%s", self.peer_ip,
                 event.mechanism, _printable(identity.username))
        return R_AUTH_OK

    @property
    def protocol(self) -> str:
        return protocol_name(self.extended, self.tls_info is not None, self.auth_user is not None)

    def on_data_chunk(self, data: bytes) -> None:
        if self._at_start:
            self._at_start = False
            if data[:1] in (b" ", b"\t"):
                # A first line starting with a blank would read as a continuation of our
                # Received: field (a client appending "by trusted.example" to our trace).
                # An empty line first makes it body, as Postfix's cleanup does.
                data = b"\r\n" + data
        scanner = self._scanner
        if scanner is not None and not scanner.done:
            scanner.feed(data)
            # Keep the spool file's start until the header section is complete, so the
            # pipeline's header reads need not open the file (see SpooledBody).
            room = self._head_room
            if room > 0:
                self._head.append(data if len(data) <= room else data[:room])
                self._head_room = room - len(data)
        self._write(data)

    def _write(self, data: bytes) -> None:
        if self._write_error is not None or self._spool is None:
            return
        try:
            self._spool.write(data)
        except OSError as exc:
            self._write_error = exc

    async def on_data_end(self, event: ev.DataEnd) -> Reply:
        """The end-of-data decision: ``250`` only once the message is durable (group commit
        done), a 4xx for every local fault, and the spool file removed unless committed."""
        self._ending = True
        try:
            return await self._end_of_data(event)
        except Exception:   # a bug: the client retries, and the log says where
            log.exception("unknown[%s]: end of data failed", self.peer_ip)
            return R_LOCAL_ERROR
        finally:
            self._ending = False
            if self._gone:
                self._gone = False
                log.log(NOTICE, "lost connection after end of data from unknown[%s]",
                        self.peer_ip)
            if self._spool is not None:
                self._spool.abort()
            self._spool = None
            self._reset_after_message()

    async def _end_of_data(self, event: ev.DataEnd) -> Reply:
        spool = self._spool
        if spool is None:
            return queue_write_error().reply
        if event.error is not None:
            return event.error
        if self._write_error is not None:
            log.error("%s: queue file write error: %s", spool.qid, self._write_error)
            return self.ctx.store.write_fault(self._write_error).reply
        scanner = self._scanner
        if scanner is not None and scanner.too_large:
            return Reply(552, "5.3.4", "Error: message header size exceeds limit")
        if scanner is not None and scanner.received > self.ctx.max_received:
            return Reply(554, "5.4.6", "Error: too many hops (mail forwarding loop)")
        pipeline = self.ctx.pipeline
        txn = None
        if pipeline:
            txn, early = await self._run_pipeline(pipeline, spool)
            if self._gone:
                return R_LOST
            if early is not None:
                return early
        return await self._commit(spool, txn)

    def _reset_after_message(self) -> None:
        self._sender = None
        self._mail = None
        self._targets = {}
        self._scanner = None
        self._write_error = None
        self._head = []

    async def _run_pipeline(self, pipeline: Pipeline,
                            spool) -> tuple[Transaction, Reply | None]:
        """Run the checks and modifiers; a reply means the message ends here (not queued)."""
        mail = self._mail
        assert mail is not None
        ctx = self.ctx
        txn = Transaction(
            qid=spool.qid, sender=mail.address, recipients=list(self._targets.values()),
            peer_ip=self.peer_ip, helo=self.helo, hostname=ctx.hostname,
            local_domains=ctx.local_domains, auth_user=self.auth_user,
            trusted=self.auth_user is not None or ctx.relay_allowed(self.peer_ip),
            tls=self.tls_info is not None)
        # Written bytes stay in the spool's buffer unless a stage reads the file (then the body
        # flushes them first); the commit thread writes them out otherwise.
        body = SpooledBody(spool.path, spool.size, b"".join(self._head), spool.flush)
        outcome = await pipeline.run(txn, body)
        why = "; ".join(outcome.reasons)
        if outcome.action in (Action.REJECT, Action.TEMPFAIL):
            log.log(25, "%s: %s: from=<%s> %s (%s)", spool.qid,
                    "reject" if outcome.action is Action.REJECT else "tempfail", mail.address,
                    outcome.reply, why)
            return txn, outcome.reply
        if outcome.action is Action.DISCARD:
            log.log(25, "%s: discard: from=<%s> (%s)", spool.qid, mail.address, why)
            return txn, Reply(250, "2.0.0", f"Ok: queued as {spool.qid}")
        if outcome.action is Action.QUARANTINE:
            txn.results["quarantine"] = why or "quarantined"
        return txn, None

    async def _commit(self, spool, txn: Transaction | None = None) -> Reply:
        mail = self._mail
        assert mail is not None
        now = time.time()
        envelope = Envelope(
            sender=mail.address, recipients=list(self._targets.values()), received_at=now,
            next_attempt=now, client_ip=self.peer_ip, helo=self.helo,
            auth_user=self.auth_user, body_type=mail.params.body,
            smtputf8=mail.params.smtputf8, ret=mail.params.ret, envid=mail.params.envid,
            protocol=self.protocol, held=self.ctx.hold_incoming)
        if txn is not None:
            envelope.sender = txn.sender
            envelope.recipients = txn.recipients
            envelope.prepend = "".join(txn.prepend)
            quarantine = txn.results.get("quarantine")
            if isinstance(quarantine, str):
                # Held in the queue: `pymta queue list` shows it, `queue release` delivers it.
                envelope.held = True
                envelope.extra["quarantine"] = quarantine
            if txn.header_drops:
                # A stage removes fields of the message as received (a forged
                # Authentication-Results): rare, so the spool file is rewritten only then.
                try:
                    await self.ctx.store.rewrite_spool(
                        spool, functools.partial(copy_without,
                                                 predicates=tuple(txn.header_drops)))
                except SpoolClosedError:
                    self._gone = True
                    return R_LOST
                except OSError as exc:
                    log.error("%s: queue file rewrite failed: %s", spool.qid, exc)
                    return self.ctx.store.write_fault(exc).reply
                if self._gone:
                    return R_LOST
        self._spool = None  # the store owns the file from here on: it commits or removes it
        try:
            qid = await self.ctx.store.commit(spool, envelope)
        except TemporaryFailure as exc:
            log.error("%s: queue commit failed: %s", spool.qid, exc.reply)
            return exc.reply
        except OSError as exc:
            log.error("%s: queue commit failed: %s", spool.qid, exc)
            spool.abort()
            return self.ctx.store.write_fault(exc).reply
        log.info("%s: client=unknown[%s], from=<%s>, size=%d, nrcpt=%d%s", qid, self.peer_ip,
                 mail.address, envelope.size, len(envelope.recipients),
                 f", sasl_username={self.auth_user}" if self.auth_user else "")
        lock = getattr(spool, "lock", None)   # still held: see QueueStore.hand_over_locks
        if lock is not None:
            spool.lock = None
            self.ctx.submit(qid, envelope, lock)
        else:
            self.ctx.submit(qid, envelope)
        return Reply(250, "2.0.0", f"Ok: queued as {qid}")
