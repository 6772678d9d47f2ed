"""The LMTP delivery agent: local recipients handed to an LMTP server (Dovecot, Cyrus, ...).

``VIRTUAL_TRANSPORT=lmtp:HOST:PORT`` or ``lmtp:unix:PATH`` (``mlan/postfix-amavis``'s syntax) sends
every local recipient here instead of to maildir/mbox. It runs on the relay's client session
(``delivery.smtpclient``: pipelined, the body streamed from the spool).

Implementation summary (RFC 2033): connect, read the 220 greeting, ``LHLO`` (never HELO),
``MAIL FROM`` with the parameters the server advertises (shared with the SMTP relay:
``delivery._client.prepare``), one ``RCPT TO`` per recipient, ``DATA`` (the three pipelined
when the server offers PIPELINING, as Dovecot does), the dot-stuffed body, then **one reply per
accepted recipient, in RCPT order** -- that is LMTP's point: each mailbox says for itself
whether it took the message. The session is then kept for ``cache_time`` seconds (at most
``cache_size`` idle, ``reuse_limit`` messages, 300 s old) and the next message reuses it after
an ``RSET`` that must answer 250; one that failed in any way is closed, never reused. Every
reply maps to a per-recipient outcome (2xx delivered, 4xx temporary, 5xx permanent, quoted). A
server that cannot be reached, or a connection lost before a recipient's final reply, is
temporary for every undecided recipient: LMTP is a local transport, and a local fault never
bounces mail. An envelope that can never be sent (``_client.screen``: controls or undecodable
bytes in an address) is refused before connecting; any other error closes the connection (no
QUIT on a session in an unknown state) and leaves the undecided recipients deferred.

Each recipient's reply is delivered to the mailbox the moment the server sends it, so the
agent ``reports_progress``: every outcome goes to ``report`` as soon as it is read (a RCPT
refusal, each reply after DATA), and the queue manager records those even when a stop
cancels the call before it returns (else a restart would deliver them again). Once the
message is sent, the server delivers whether or not we listen: a first cancellation then
waits for the remaining replies (each within ``timeout``, as always) and reports them before
it goes on; a second one closes the connection at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pymta.types import Outcome, OutcomeKind, QueuedMessage, Recipient, Reply

from ._client import kind_of, outcomes, parse_reply, prepare, rcpt_options, screen
from .body import SpoolUnreadable, load_body
from .smtpclient import ClientSession, SessionLost, Transaction

log = logging.getLogger(__name__)

REUSE_TIME_LIMIT = 300.0   # seconds a session is reused at most (Postfix's 300 s)

def parse_transport(spec: str) -> tuple[str, str | int]:
    """``lmtp:unix:/run/lmtp`` → ``("unix", "/run/lmtp")``; ``lmtp:host:24`` →
    ``("host", 24)``; ``lmtp:[::1]:24`` → ``("::1", 24)``."""
    kind, _, rest = spec.partition(":")
    if kind.lower() != "lmtp" or not rest:
        raise ValueError(f"not an LMTP transport: {spec!r}")
    if rest.startswith("unix:"):
        return "unix", rest[5:]
    host, _, port = rest.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or not port.isdigit():
        raise ValueError(f"not lmtp:HOST:PORT: {spec!r}")
    return host, int(port)


class _Refused(Exception):
    """The server refused the session itself (greeting, LHLO): ``reply`` for everyone."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


@dataclass(eq=False, slots=True)
class _Cached:
    """A greeted session and its use count, kept between messages."""

    session: ClientSession
    relay: str
    created: float
    uses: int = 0
    expiry: asyncio.TimerHandle | None = None


class LMTPDeliveryAgent:
    """A :class:`~pymta.contracts.DeliveryAgent` delivering over LMTP (see the module docstring)."""

    reports_progress = True     # deliver() takes report=

    def __init__(self, spec: str, hostname: str, *, connect_timeout: float = 30.0,
                 timeout: float = 300.0, cache_time: float = 2.0, reuse_limit: int = 100,
                 cache_size: int = 8, clock: Callable[[], float] = time.monotonic) -> None:
        self.spec = spec
        self.where = parse_transport(spec)
        self.hostname = hostname
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.cache_time = cache_time
        self.reuse_limit = reuse_limit
        self.cache_size = cache_size
        self._clock = clock
        self._idle: list[_Cached] = []
        self._background: set[asyncio.Task[None]] = set()
        self.connections_opened = 0   # counters for tests and metrics

    @classmethod
    def from_config(cls, config: Any) -> LMTPDeliveryAgent:
        """Delivery to ``VIRTUAL_TRANSPORT`` (checked by ``load_config``)."""
        return cls(config.virtual_transport, config.hostname,
                   connect_timeout=config.smtp_connect_timeout, timeout=config.smtp_timeout,
                   cache_time=config.connection_cache_time,
                   reuse_limit=config.connection_reuse_limit)

    async def _connect(self) -> tuple[ClientSession, str]:
        host, port = self.where
        if host == "unix":
            session = await ClientSession.connect_unix(
                str(port), timeout=self.timeout, connect_timeout=self.connect_timeout)
            return session, str(port)
        session = await ClientSession.connect(host, int(port), timeout=self.timeout,
                                              connect_timeout=self.connect_timeout,
                                              lmtp=True)
        peer = session.transport_info("peername") or (host, port)
        return session, f"{host}[{peer[0]}]:{port}"

    async def _session(self) -> _Cached:
        """A cached session that still answers RSET, else a new greeted one (``_Refused``,
        ``SessionLost``, OSError, TimeoutError)."""
        while self._idle:
            cached = self._idle.pop()
            if cached.expiry is not None:
                cached.expiry.cancel()
                cached.expiry = None
            try:
                if cached.session.is_connected and await cached.session.rset():
                    return cached
            except BaseException:   # cancelled (a stop, the agent's time limit)
                cached.session.close()
                raise
            self._drop(cached)
        session, relay = await self._connect()
        self.connections_opened += 1
        try:
            response = await session.greeting()
            if response.code != 220:
                reply = parse_reply(response.code, response.text)
                raise _Refused(Reply(451, "4.4.2" if response.code < 500 else "4.3.0",
                                     f"host {relay} refused to talk to me: {reply}"))
            response = await session.hello(self.hostname)
            if not response.ok:
                reply = parse_reply(response.code, response.text)
                raise _Refused(Reply(451, "4.5.0", f"LHLO refused by {relay}: {reply}"))
        except BaseException:
            session.close()
            raise
        return _Cached(session, relay, created=self._clock())

    def _release(self, cached: _Cached) -> None:
        """Keep a clean session for the next message, a few seconds at most."""
        if (self.cache_time <= 0 or cached.uses >= self.reuse_limit
                or not cached.session.is_connected or len(self._idle) >= self.cache_size
                or self._clock() - cached.created >= REUSE_TIME_LIMIT):
            self._drop(cached)
            return
        self._idle.append(cached)
        cached.expiry = asyncio.get_running_loop().call_later(self.cache_time, self._expire,
                                                              cached)

    def _expire(self, cached: _Cached) -> None:
        if cached in self._idle:
            self._idle.remove(cached)
            self._drop(cached)

    def _drop(self, cached: _Cached) -> None:
        """QUIT in the background (a clean session) or close at once."""
        if cached.expiry is not None:
            cached.expiry.cancel()
            cached.expiry = None
        if not cached.session.is_connected:
            cached.session.close()
            return
        task = asyncio.get_running_loop().create_task(cached.session.quit())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def aclose(self) -> None:
        """Close every cached session (on server stop)."""
        for cached in self._idle:
            self._drop(cached)
        self._idle.clear()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    async def deliver(self, msg: QueuedMessage, rcpts: Sequence[Recipient],
                      report: Callable[[Outcome], None] | None = None) -> list[Outcome]:
        """One outcome per recipient; each also goes to ``report`` as soon as it is read."""
        fallback_relay = self.spec.partition(":")[2]
        refused, rcpts = screen(msg, rcpts, fallback_relay)
        if report is not None:
            for outcome in refused:
                report(outcome)
        if not rcpts:
            return refused
        return refused + await self._deliver(msg, rcpts, fallback_relay, report)

    async def _deliver(self, msg: QueuedMessage, rcpts: list[Recipient],
                       fallback_relay: str,
                       report: Callable[[Outcome], None] | None = None) -> list[Outcome]:
        try:
            cached = await self._session()
        except _Refused as refusal:
            return outcomes(rcpts, refusal.reply, fallback_relay, OutcomeKind.TEMPORARY)
        except SessionLost as exc:
            return outcomes(rcpts, Reply(451, "4.4.2", f"lost connection with "
                                         f"{fallback_relay} while sending LHLO: {exc}"),
                            fallback_relay, OutcomeKind.TEMPORARY)
        except (OSError, TimeoutError) as exc:
            reason = "Connection timed out" if isinstance(exc, TimeoutError) else (
                exc.strerror or str(exc))
            return outcomes(rcpts, Reply(451, "4.4.1", f"connect to {fallback_relay}: "
                                                       f"{reason}"),
                            fallback_relay, OutcomeKind.TEMPORARY)
        session, relay = cached.session, cached.relay
        cached.uses += 1
        progress = _Progress(rcpts, relay, report)
        aborted = False
        try:
            refused = await self._converse(session, msg, progress)
            if refused is not None:
                return refused
        except SessionLost as exc:
            reply = Reply(451, "4.4.2",
                          f"lost connection with {relay} while sending {progress.stage}")
            log.warning("%s: %s (%s)", msg.qid, reply.text, exc)
            progress.defer_undecided(reply)
        except SpoolUnreadable as exc:
            log.error("%s: %s", msg.qid, exc)
            progress.defer_undecided(Reply(451, "4.3.0", f"local error while sending "
                                                         f"{progress.stage} to {relay}: {exc}"))
        except Exception:
            log.exception("%s: error while sending %s to %s", msg.qid, progress.stage, relay)
            progress.defer_undecided(
                Reply(451, "4.3.0", f"local error while sending {progress.stage} to {relay}"))
        except BaseException:
            aborted = True      # cancelled: close at once, wait for nothing
            raise
        finally:
            if aborted or progress.cancelled or not progress.clean:
                session.close()
            else:
                self._release(cached)
        if progress.cancelled:  # every reply read and reported: now the cancellation goes on
            raise asyncio.CancelledError
        return [progress.decided[i] for i in range(len(rcpts))]

    async def _converse(self, session: ClientSession, msg: QueuedMessage,
                        progress: _Progress) -> list[Outcome] | None:
        """One transaction on a greeted session. What refuses the whole transaction (the
        message itself, MAIL FROM) is returned as every recipient's outcome, unreported;
        else None, each recipient decided (and reported) in ``progress``."""
        rcpts, relay = progress.rcpts, progress.relay
        body = await asyncio.to_thread(load_body, msg)
        prepared = prepare(msg, rcpts, body, session.extensions, relay)
        if prepared.refusal is not None:
            progress.clean = True
            return outcomes(rcpts, prepared.refusal, relay)
        enc = "utf-8" if prepared.smtputf8 else "ascii"
        mail = f"MAIL FROM:<{msg.envelope.sender}>"
        if prepared.mail_options:
            mail += " " + " ".join(prepared.mail_options)
        lines = []
        for r in rcpts:
            line = f"RCPT TO:<{r.address}>"
            options = rcpt_options(r, session.extensions, prepared.smtputf8)
            if options:
                line += " " + " ".join(options)
            lines.append(line.encode(enc))
        tx = Transaction()
        progress.tx = tx
        await session.send_envelope(mail.encode(enc), lines, tx, with_data=True)
        assert tx.mail is not None
        if not tx.mail.ok:
            await session.abandon_data(tx)
            progress.clean = await session.rset() if tx.mail.code < 500 else True
            return outcomes(rcpts, parse_reply(tx.mail.code, tx.mail.text), relay)
        for i, response in enumerate(tx.rcpts):
            if response is not None and not response.ok:
                progress.decide(i, parse_reply(response.code, response.text))
        accepted = tx.accepted()
        start = tx.data_start
        if not accepted:
            await session.abandon_data(tx)
            progress.clean = True
            return None
        if start is None or start.code != 354:
            reply = (parse_reply(start.code, start.text) if start is not None
                     else Reply(451, "4.4.2", f"no reply to DATA from {relay}"))
            if reply.code < 400:    # no message was sent: never a delivery
                reply = Reply(451, "4.5.0", f"unexpected reply to DATA from {relay}: {reply}")
            for i in accepted:
                progress.decide(i, reply)
            progress.clean = start is not None
            return None
        await session.send_data(prepared.body, tx)
        await _read_replies(session, progress, tx, accepted)
        progress.clean = True
        return None
@dataclass
class _Progress:
    """How far one delivery got, for the error paths and the cancellation: the protocol
    stage (named in a deferral's text), each recipient's outcome once known (reported at
    once), whether the session may end with QUIT, and whether a cancellation is waiting
    for the replies of a message already sent."""

    rcpts: list[Recipient]
    relay: str
    report: Callable[[Outcome], None] | None
    decided: dict[int, Outcome] = field(default_factory=dict)
    clean: bool = False
    cancelled: bool = False
    tx: Transaction | None = None

    @property
    def stage(self) -> str:
        return self.tx.stage if self.tx is not None else "MAIL FROM"

    def decide(self, i: int, reply: Reply) -> None:
        """Recipient ``i`` has the server's ``reply``: record and report it."""
        outcome = Outcome(self.rcpts[i].address, kind_of(reply), reply, self.relay)
        self.decided[i] = outcome
        if self.report is not None:
            self.report(outcome)

    def defer_undecided(self, reply: Reply) -> None:
        """Every recipient without an outcome yet is deferred with ``reply``."""
        for i, r in enumerate(self.rcpts):
            self.decided.setdefault(i, Outcome(r.address, OutcomeKind.TEMPORARY, reply,
                                               self.relay))



async def _read_replies(session: ClientSession, progress: _Progress, tx: Transaction,
                        accepted: list[int]) -> None:
    """One reply per accepted recipient, in RCPT order (RFC 2033 §4.2). The server delivers
    once it has the message, whether we listen or not: a first cancellation while waiting
    for the replies is held (``progress.cancelled``) until all are read and reported; a
    second one goes through."""
    for i in accepted:
        try:
            response = await session.read_reply()
        except asyncio.CancelledError:
            if progress.cancelled:
                raise
            progress.cancelled = True
            response = await session.read_reply()
        tx.data.append(response)
        progress.decide(i, parse_reply(response.code, response.text))
