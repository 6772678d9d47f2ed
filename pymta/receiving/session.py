"""The receiving side's policy for one SMTP session: who may send, to whom, and the hand-off
of a complete message to the queue.

The protocol engine decides what is well-formed; this module decides what is acceptable and
hands it to the queue. Implementation summary: RCPT resolves each address through the server's
one recipient lookup (its sources composed by ``pymta.wiring``: the lookup chain,
``REGEX_ALIAS``, SRS) and keeps the expanded, de-duplicated targets; DATA and BDAT open a spool
file and write our ``Received:`` header before the first byte of the message; chunks stream
straight to the spool; the end of data runs the content checks (hop count, header size) and the
pipeline, tags the envelope for RFC 8689 (REQUIRETLS, else a ``TLS-Required: No`` field the
header scan saw), then hands envelope, spool and the pipeline's Decision to the queue's
intake, which commits them durably (group commit); only then does the client get ``250``.
Every local fault becomes a 4xx and the partial spool file is removed: ``452 4.3.1`` when the
queue's disk is full (already at ``MAIL FROM`` when less than Postfix's ``queue_minfree``
reserve is free, see ``pymta.queue.space``), ``451 4.3.0`` for any other fault (a read-only or
failing file system, a bug).

A client that disconnects while the end-of-data decision runs (slow pre-queue checks) gets
nothing queued: the pipeline keeps the spool file until it ends (its stages may be reading
the file), then the session removes it and logs one NOTICE line, ``lost connection after
END-OF-MESSAGE from NAME[IP]``. Once the pipeline is done, a disconnect aborts the spool at once
(its own state machine waits for a header rewrite running in a thread, and does nothing once
the commit has taken it). Nothing was acknowledged, so the client sends the message again;
only a disconnect after the commit has started leaves it queued (the unavoidable window of
RFC 1047, as with Postfix).

Relay policy (Postfix's ``permit_mynetworks, permit_sasl_authenticated, reject``): a recipient
outside the local domains is accepted only from an authenticated client (``auth_user``, set by
a successful AUTH) or from an address in ``MYNETWORKS`` (``relay_allowed``); everyone else
gets ``554 5.7.1 Relay access denied``.

What the session does not do: check AUTH credentials (``pymta.receiving.auth`` does, and says
who the client is), judge or rewrite the message (``pymta.pipeline`` returns one Decision), or touch
the store (``pymta.queue.intake`` applies the Decision, commits and hands the message to the
scheduler). Every call out of the session runs under a framework time limit: a recipient
lookup under ``lookup_timeout`` (``451 4.3.0`` beyond), AUTH and the pipeline's stages under
their own.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pymta import metrics
from pymta.bounded import bounded
from pymta.contracts import RecipientLookup, Spool
from pymta.log import NOTICE
from pymta.peername import UNKNOWN
from pymta.pipeline import Pipeline, SpooledBody, Transaction
from pymta.queue.intake import Intake
from pymta.receiving import smtpdlog
from pymta.receiving.auth import R_AUTH_TEMP, AuthPolicy
from pymta.receiving.headerscan import HeaderScanner
from pymta.receiving.received import protocol_name, received_header
from pymta.smtp import events as ev
from pymta.types import (
    Action,
    Address,
    ConnInfo,
    Decision,
    Envelope,
    Recipient,
    Reply,
    SMTPError,
    SpoolClosedError,
    Target,
    TemporaryFailure,
)

log = logging.getLogger("pymta.smtpd")

R_RELAY_DENIED = "Relay access denied"
R_LOOKUP_TEMP = TemporaryFailure().reply     # 451 4.3.0 Temporary lookup failure
R_LOCAL_ERROR = Reply(451, "4.3.0", "Error: local error in processing")
# Never sent (the client is gone); what the engine is told so that it forgets the message.
R_LOST = Reply(451, "4.4.2", "Error: lost connection")
R_QUEUE_WRITE_ERROR = Reply(451, "4.3.0", "Error: queue file write error")

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


@dataclass
class ReceiveContext:
    """What every session of a server shares: configuration-derived policy and the queue's
    intake. ``lookup`` is the server's one recipient lookup (the DSN resolver asks the same
    object); ``lookup_timeout`` bounds one RCPT's whole lookup (every source, alias
    expansion); ``auth`` is None when no SASL method is configured."""

    hostname: str
    local_domains: frozenset[str]
    first_domain: str
    lookup: RecipientLookup
    intake: Intake
    header_size_limit: int = 1048576
    max_received: int = 50
    relay_allowed: Callable[[str], bool] = field(default=lambda ip: False)
    auth: AuthPolicy | None = None
    pipeline: Pipeline | None = None
    lookup_timeout: float = 15.0


class Session:
    """Policy state of one connection; the protocol adapter calls it on decision events.
    ``peer_name`` is the client's verified name or ``unknown`` (the listener looks it up
    before the greeting), for the ``Received:`` field and the log lines."""

    __slots__ = ("ctx", "peer_ip", "peer_port", "peer_name", "helo", "extended", "tls_info",
                 "auth_user", "auth_method", "_sender", "_mail", "_targets", "_spool", "_scanner",
                 "_write_error", "_started", "_head", "_head_room", "_ending", "_reading",
                 "_gone", "_at_start")

    def __init__(self, ctx: ReceiveContext, peer_ip: str, peer_port: int,
                 peer_name: str = UNKNOWN) -> None:
        self.ctx = ctx
        self.peer_ip = peer_ip
        self.peer_port = peer_port
        self.peer_name = peer_name
        self.helo = ""
        self.extended = False
        self.tls_info: str | None = None
        self.auth_user: str | None = None
        self.auth_method: str | None = None
        self._spool: Spool | None = None
        # True while on_data_end runs: an abort (the client disconnected) then sets ``_gone``
        # for it to report. ``_reading``: while the pipeline runs, whose stages may be
        # reading the spool file, the abort leaves the file to on_data_end as well.
        self._ending = False
        self._reading = False
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

        While the pipeline runs, its stages may be reading the spool file: the end of data
        is told instead, and drops the message when the pipeline returns. After that the
        spool is aborted at once; its own state machine waits for a header rewrite running
        in a thread, and ignores the abort once the commit has taken the spool."""
        if self._ending:
            self._gone = True
            if self._reading:
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
        # queue could not take the message.
        refusal = self.ctx.intake.admission(event.params.size or 0)
        if refusal is not None:
            self._log_reject(None, "MAIL", refusal.reply, event.address, None)
            return refusal.reply
        self._mail = event
        self._sender = event.address
        self._targets = {}
        self._started = time.time()
        return Reply(250, "2.1.0", "Ok")

    async def on_rcpt(self, event: ev.RcptTo) -> Reply:
        reply = await self._rcpt(event)
        if reply.code >= 400:
            self._log_reject(None, "RCPT", reply, self._sender, event.address)
        return reply

    @property
    def ending(self) -> bool:
        """True while the end-of-data decision runs (its own line reports a lost client)."""
        return self._ending

    def _log_reject(self, qid: str | None, where: str, reply: Reply, sender: str | None,
                    rcpt: str | None, verdict: str = "reject", reason: str = "") -> None:
        """Postfix's ``NOQUEUE: reject: RCPT from NAME[IP]: ...`` line (pflogsumm's rejects,
        fail2ban's ``postfix`` filter)."""
        smtpdlog.reject(qid, where, self.peer_name, self.peer_ip, reply, sender=sender,
                        rcpt=rcpt, proto="ESMTP" if self.extended else "SMTP", helo=self.helo,
                        verdict=verdict, reason=reason)

    async def _rcpt(self, event: ev.RcptTo) -> Reply:
        text = event.address
        if "@" not in text:  # bare <postmaster> (RFC 5321 §4.1.1.3)
            text = f"postmaster@{self.ctx.first_domain}"
        address = Address(text)
        domain = address.domain
        if domain in self.ctx.local_domains:
            try:
                destination = await bounded(self.ctx.lookup.lookup(address),
                                            self.ctx.lookup_timeout)
            except SMTPError as exc:
                log.warning("lookup of <%s> failed: %s", text, exc.reply)
                metrics.error("lookup", exc.reply)
                return exc.reply
            except TimeoutError:
                log.warning("lookup of <%s> failed: no answer within %gs", text,
                            self.ctx.lookup_timeout)
                metrics.error("lookup")
                return R_LOOKUP_TEMP
            except Exception as exc:  # noqa: BLE001 - a broken lookup is a temporary failure
                log.error("lookup of <%s> failed: %r", text, exc)
                metrics.error("lookup")
                return R_LOOKUP_TEMP
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
        intake = self.ctx.intake
        try:
            spool = intake.new_spool()
        except OSError as exc:
            log.error("cannot create a spool file: %s", exc)
            return intake.write_fault(exc).reply
        self._spool = spool
        self._scanner = HeaderScanner(self.ctx.header_size_limit)
        rcpts = list(self._targets.values())
        originals = {r.original for r in rcpts}
        header = received_header(
            helo=self.helo, peer_ip=self.peer_ip, hostname=self.ctx.hostname,
            protocol=self.protocol, qid=spool.qid, tls_info=self.tls_info,
            recipient=next(iter(originals)) if len(originals) == 1 else None,
            now=time.time(), auth_user=self.auth_user, peer_name=self.peer_name)
        self._write(header)
        self._head = [header]
        self._head_room = HEAD_KEEP
        self._at_start = True
        if event.bdat:
            return Reply(250, "2.0.0", "Ok")
        return Reply(354, "", "End data with <CR><LF>.<CR><LF>")

    async def on_auth(self, event: ev.Auth) -> Reply:
        """The AUTH policy's answer (``pymta.receiving.auth``); ``235`` makes the client
        ``auth_user``."""
        auth = self.ctx.auth
        if auth is None:
            return R_AUTH_TEMP
        conn = ConnInfo(self.peer_ip, self.peer_port, self.helo,
                        tls=self.tls_info is not None, peer_name=self.peer_name)
        result = await auth.check(event, conn)
        if result.identity is not None:
            self.auth_user = result.identity.username
            self.auth_method = event.mechanism
        return result.reply

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
            log.exception("%s[%s]: end of data failed", self.peer_name, self.peer_ip)
            return R_LOCAL_ERROR
        finally:
            self._ending = self._reading = False
            if self._gone:
                self._gone = False
                log.log(NOTICE, "lost connection after END-OF-MESSAGE from %s[%s]",
                        self.peer_name, self.peer_ip)
            if self._spool is not None:
                self._spool.abort()     # a no-op once committed
            self._spool = None
            self._reset_after_message()

    async def _end_of_data(self, event: ev.DataEnd) -> Reply:
        spool = self._spool
        if spool is None:
            return R_QUEUE_WRITE_ERROR
        if event.error is not None:
            self._log_eom_reject(spool.qid, event.error)
            return event.error
        if self._write_error is not None:
            log.error("%s: queue file write error: %s", spool.qid, self._write_error)
            return self.ctx.intake.write_fault(self._write_error).reply
        scanner = self._scanner
        if scanner is not None and scanner.too_large:
            return self._log_eom_reject(spool.qid, Reply(552, "5.3.4", "Error: message header "
                                                                       "size exceeds limit"))
        if scanner is not None and scanner.received > self.ctx.max_received:
            return self._log_eom_reject(spool.qid, Reply(554, "5.4.6", "Error: too many hops "
                                                                       "(mail forwarding loop)"))
        mail = self._mail
        assert mail is not None
        rcpts = list(self._targets.values())
        decision: Decision | None = None
        pipeline = self.ctx.pipeline
        if pipeline:
            self._reading = True
            try:
                decision = await self._run_pipeline(pipeline, spool, mail, rcpts)
            finally:
                self._reading = False
            if self._gone:
                return R_LOST
            refused = self._refusal(decision, spool.qid)
            if refused is not None and decision.quarantine is None:
                self._log_refusal(decision, spool.qid, mail.address, refused)
                return refused
        else:
            refused = None
        now = time.time()
        # RFC 8689 §4.1: REQUIRETLS (the engine takes it only under TLS) tags the message;
        # without it, a "TLS-Required: No" field does; with it, that field is ignored.
        requiretls = mail.params.requiretls
        envelope = Envelope(
            sender=mail.address, recipients=rcpts, received_at=now, next_attempt=now,
            client_ip=self.peer_ip, client_name=self.peer_name, helo=self.helo,
            auth_user=self.auth_user,
            body_type=mail.params.body, smtputf8=mail.params.smtputf8, ret=mail.params.ret,
            envid=mail.params.envid, protocol=self.protocol, requiretls=requiretls,
            tls_optional=not requiretls and scanner is not None and scanner.tls_required_no)
        try:
            qid = await self.ctx.intake.accept(spool, envelope, decision)
        except TemporaryFailure as exc:
            return exc.reply
        except SpoolClosedError:
            self._gone = True       # the client went away before the commit took the spool
            return R_LOST
        # Queued: a client gone during the commit is not "lost after END-OF-MESSAGE" (that
        # line says nothing was queued); its disconnect is logged as any other.
        self._gone = False
        # the client= line before the queue manager's from= line (its task has not run yet)
        smtpdlog.client(qid, self.peer_name, self.peer_ip, self.auth_method, self.auth_user)
        smtpdlog.message_id(qid, self._head)
        if refused is not None:     # refused, and kept in the quarantine (content filter)
            assert decision is not None
            self._log_refusal(decision, qid, mail.address, refused)
            return refused
        return Reply(250, "2.0.0", f"Ok: queued as {qid}")

    def _log_eom_reject(self, qid: str, reply: Reply) -> Reply:
        mail = self._mail
        self._log_reject(qid, "END-OF-MESSAGE", reply, mail.address if mail else None,
                         self._last_rcpt())
        return reply

    def _last_rcpt(self) -> str | None:
        """The recipient Postfix names in an END-OF-MESSAGE line: the last one given."""
        rcpts = self._targets
        return next(reversed(rcpts.values())).original if rcpts else None

    def _reset_after_message(self) -> None:
        self._sender = None
        self._mail = None
        self._targets = {}
        self._scanner = None
        self._write_error = None
        self._head = []

    async def _run_pipeline(self, pipeline: Pipeline, spool: Spool, mail: ev.MailFrom,
                            rcpts: list[Recipient]) -> Decision:
        """Run the checks and modifiers over the spooled message."""
        ctx = self.ctx
        txn = Transaction(
            qid=spool.qid, sender=mail.address, recipients=rcpts,
            peer_ip=self.peer_ip, helo=self.helo, hostname=ctx.hostname,
            local_domains=ctx.local_domains, auth_user=self.auth_user,
            trusted=self.auth_user is not None or ctx.relay_allowed(self.peer_ip),
            tls=self.tls_info is not None, smtputf8=mail.params.smtputf8)
        # Written bytes stay in the spool's buffer unless a stage reads the file (then the body
        # flushes them first); the commit thread writes them out otherwise.
        body = SpooledBody(spool.path, spool.size, b"".join(self._head), spool.flush,
                           getattr(spool, "in_memory", None))    # older stores: no memory
        return await pipeline.run(txn, body)

    @staticmethod
    def _refusal(decision: Decision, qid: str) -> Reply | None:
        """The reply for a message the pipeline refuses or discards (not queued, unless
        kept in the quarantine); None when it goes to the queue (PASS, QUARANTINE)."""
        if decision.action in (Action.REJECT, Action.TEMPFAIL):
            return decision.reply or R_LOCAL_ERROR
        if decision.action is Action.DISCARD:
            return Reply(250, "2.0.0", f"Ok: queued as {qid}")
        return None

    def _log_refusal(self, decision: Decision, qid: str, sender: str, reply: Reply) -> None:
        """Postfix's ``QID: reject: END-OF-MESSAGE from NAME[IP]: REPLY; from=<s> to=<r>
        proto=ESMTP helo=<h>`` (``discard:`` with the reasons for a discarded message), the
        pipeline's reasons in parentheses."""
        why = "; ".join(decision.reasons)
        verdict = "discard" if decision.action is Action.DISCARD else "reject"
        self._log_reject(qid, "END-OF-MESSAGE", reply, sender, self._last_rcpt(),
                         verdict=verdict, reason=why)
