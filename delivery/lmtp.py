"""The LMTP delivery agent: local recipients handed to an LMTP server (Dovecot, Cyrus, ...).

``VIRTUAL_TRANSPORT=lmtp:HOST:PORT`` or ``lmtp:unix:PATH`` (``mlan/postfix-amavis``'s syntax) sends
every local recipient here instead of to maildir/mbox. aiosmtplib does not speak LMTP
(cole/aiosmtplib#210), and the protocol is small, so this is a client of its own on asyncio
streams.

Implementation summary (RFC 2033): connect, read the 220 greeting, ``LHLO`` (never HELO),
``MAIL FROM`` with the parameters the server advertises (shared with the SMTP relay:
``delivery._client.prepare``), one ``RCPT TO`` per recipient, ``DATA``, the dot-stuffed body,
then **one reply per accepted recipient, in RCPT order** -- that is LMTP's point: each mailbox
says for itself whether it took the message. ``QUIT``. Every reply maps to a per-recipient
outcome (2xx delivered, 4xx temporary, 5xx permanent, quoted). A server that cannot be
reached, or a connection lost before a recipient's final reply, is temporary for every
undecided recipient: LMTP is a local transport, and a local fault never bounces mail. An
envelope that can never be sent (``_client.screen``: controls or undecodable bytes in an
address) is refused before connecting; any other error closes the connection (no QUIT on a
session in an unknown state) and leaves the undecided recipients deferred.

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
import contextlib
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pymta.types import Outcome, OutcomeKind, QueuedMessage, Recipient, Reply

from ._client import kind_of, outcomes, parse_reply, prepare, rcpt_options, read_body, screen

log = logging.getLogger(__name__)

_LEADING_DOT = re.compile(rb"(?m)^\.")
_MAX_REPLY_LINES = 1000


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


def dot_stuff(data: bytes) -> bytes:
    """The DATA payload: CRLF line ends guaranteed, leading dots doubled, terminator added."""
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return _LEADING_DOT.sub(b"..", data) + b".\r\n"


class _Lost(Exception):
    """The server closed the connection or went silent."""


class _Session:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 timeout: float) -> None:
        self.reader = reader
        self.writer = writer
        self.timeout = timeout

    async def reply(self) -> tuple[int, str, list[str]]:
        """(code, text of all lines joined by newlines, the lines' texts)."""
        texts: list[str] = []
        for _ in range(_MAX_REPLY_LINES):
            try:
                line = await asyncio.wait_for(self.reader.readline(), self.timeout)
            except (TimeoutError, OSError, ValueError) as exc:
                raise _Lost(str(exc) or type(exc).__name__) from None
            if not line:
                raise _Lost("connection closed")
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            if len(text) < 3 or not text[:3].isdigit():
                raise _Lost(f"malformed reply {text[:80]!r}")
            texts.append(text[4:])
            if text[3:4] != "-":
                return int(text[:3]), "\n".join(texts), texts
        raise _Lost("reply too long")

    async def command(self, line: bytes) -> tuple[int, str, list[str]]:
        await self.send(line + b"\r\n")
        return await self.reply()

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        try:
            await asyncio.wait_for(self.writer.drain(), self.timeout)
        except (TimeoutError, OSError) as exc:
            raise _Lost(str(exc) or type(exc).__name__) from None

    async def close(self, quit_: bool) -> None:
        if quit_:
            with contextlib.suppress(_Lost):
                await asyncio.wait_for(self.command(b"QUIT"), 5.0)
        self.writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(self.writer.wait_closed(), 5.0)


class LMTPDeliveryAgent:
    """A :class:`~pymta.contracts.DeliveryAgent` delivering over LMTP (see the module docstring)."""

    reports_progress = True     # deliver() takes report=

    def __init__(self, spec: str, hostname: str, *, connect_timeout: float = 30.0,
                 timeout: float = 300.0) -> None:
        self.spec = spec
        self.where = parse_transport(spec)
        self.hostname = hostname
        self.connect_timeout = connect_timeout
        self.timeout = timeout

    @classmethod
    def from_config(cls, config: Any) -> LMTPDeliveryAgent:
        """Delivery to ``VIRTUAL_TRANSPORT`` (checked by ``load_config``)."""
        return cls(config.virtual_transport, config.hostname,
                   connect_timeout=config.smtp_connect_timeout, timeout=config.smtp_timeout)

    async def _connect(self) -> tuple[_Session, str]:
        host, port = self.where
        if host == "unix":
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(port)), self.connect_timeout)
            return _Session(reader, writer, self.timeout), str(port)
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, int(port)), self.connect_timeout)
        peer = writer.get_extra_info("peername") or (host, port)
        return _Session(reader, writer, self.timeout), f"{host}[{peer[0]}]:{port}"

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
            session, relay = await self._connect()
        except (OSError, TimeoutError) as exc:
            reason = "Connection timed out" if isinstance(exc, TimeoutError) else (
                exc.strerror or str(exc))
            return outcomes(rcpts, Reply(451, "4.4.1", f"connect to {fallback_relay}: "
                                                       f"{reason}"),
                            fallback_relay, OutcomeKind.TEMPORARY)
        progress = _Progress(rcpts, relay, report)
        aborted = False
        try:
            refused = await self._converse(session, msg, progress)
            if refused is not None:
                return refused
        except _Lost as exc:
            reply = Reply(451, "4.4.2",
                          f"lost connection with {relay} while sending {progress.stage}")
            log.warning("%s: %s (%s)", msg.qid, reply.text, exc)
            progress.defer_undecided(reply)
        except Exception:
            log.exception("%s: error while sending %s to %s", msg.qid, progress.stage, relay)
            progress.defer_undecided(
                Reply(451, "4.3.0", f"local error while sending {progress.stage} to {relay}"))
        except BaseException:
            aborted = True      # cancelled: close at once, wait for nothing
            raise
        finally:
            if aborted or progress.cancelled:
                session.writer.close()
            else:
                await session.close(quit_=progress.clean)
        if progress.cancelled:  # every reply read and reported: now the cancellation goes on
            raise asyncio.CancelledError
        return [progress.decided[i] for i in range(len(rcpts))]

    async def _converse(self, session: _Session, msg: QueuedMessage,
                        progress: _Progress) -> list[Outcome] | None:
        """The LMTP dialogue, greeting to the last reply. What refuses the whole transaction
        (greeting, LHLO, the message itself, MAIL FROM) is returned as every recipient's
        outcome, unreported; else None, each recipient decided (and reported) in
        ``progress``."""
        rcpts, relay = progress.rcpts, progress.relay
        code, text, _ = await session.reply()
        if code != 220:
            reply = parse_reply(code, text)
            return outcomes(rcpts, Reply(451, "4.4.2" if code < 500 else "4.3.0",
                                         f"host {relay} refused to talk to me: {reply}"),
                            relay, OutcomeKind.TEMPORARY)
        progress.stage = "LHLO"
        code, text, lines = await session.command(b"LHLO " + self.hostname.encode())
        if code != 250:
            reply = parse_reply(code, text)
            return outcomes(rcpts, Reply(451, "4.5.0", f"LHLO refused by {relay}: {reply}"),
                            relay, OutcomeKind.TEMPORARY)
        extensions = _extensions(lines[1:])
        data = await asyncio.to_thread(read_body, msg)
        prepared = prepare(msg, rcpts, data, extensions, relay)
        if prepared.refusal is not None:
            progress.clean = True
            return outcomes(rcpts, prepared.refusal, relay)
        enc = "utf-8" if prepared.smtputf8 else "ascii"
        progress.stage = "MAIL FROM"
        mail = f"MAIL FROM:<{msg.envelope.sender}>"
        if prepared.mail_options:
            mail += " " + " ".join(prepared.mail_options)
        code, text, _ = await session.command(mail.encode(enc))
        if code != 250:
            progress.clean = True
            return outcomes(rcpts, parse_reply(code, text), relay)
        accepted = await _send_rcpts(session, progress, extensions, prepared.smtputf8)
        if accepted:
            await _send_data(session, progress, accepted, prepared.data)
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
    stage: str = "greeting"
    decided: dict[int, Outcome] = field(default_factory=dict)
    clean: bool = False
    cancelled: bool = False

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


async def _send_rcpts(session: _Session, progress: _Progress, extensions: dict[str, str],
                      smtputf8: bool) -> list[int]:
    """One RCPT TO per recipient; the indexes of those accepted (the others are decided)."""
    progress.stage = "RCPT TO"
    enc = "utf-8" if smtputf8 else "ascii"
    accepted: list[int] = []
    for i, r in enumerate(progress.rcpts):
        line = f"RCPT TO:<{r.address}>"
        options = rcpt_options(r, extensions, smtputf8)
        if options:
            line += " " + " ".join(options)
        code, text, _ = await session.command(line.encode(enc))
        if 200 <= code < 300:
            accepted.append(i)
        else:
            progress.decide(i, parse_reply(code, text))
    return accepted


async def _send_data(session: _Session, progress: _Progress, accepted: list[int],
                     data: bytes) -> None:
    """DATA, the message, then one reply per accepted recipient, in RCPT order (RFC 2033
    §4.2). The server delivers once it has the message, whether we listen or not: a first
    cancellation while waiting for the replies is held (``progress.cancelled``) until all
    are read and reported; a second one goes through."""
    progress.stage = "DATA"
    code, text, _ = await session.command(b"DATA")
    if code != 354:
        reply = parse_reply(code, text)
        for i in accepted:
            progress.decide(i, reply)
        return
    progress.stage = "end of DATA"
    await session.send(dot_stuff(data))
    for i in accepted:
        try:
            code, text, _ = await session.reply()
        except asyncio.CancelledError:
            if progress.cancelled:
                raise
            progress.cancelled = True
            code, text, _ = await session.reply()
        progress.decide(i, parse_reply(code, text))


def _extensions(lines: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in lines:
        keyword, _, params = line.strip().partition(" ")
        if keyword:
            out[keyword.lower()] = params
    return out
