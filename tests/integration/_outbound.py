"""Helpers for the outbound-delivery tests (issue 4): a scripted SMTP peer, queue injection,
and waiting for outcomes.

The scripted peer is a deliberately small SMTP server on raw asyncio streams whose EHLO
keywords, greeting and per-recipient replies a test chooses, and which records every command
line and the raw (still dot-stuffed) DATA bytes: what a hygiene test needs to see exactly what
pymta sent. aiosmtpd and the real services (Postfix, Dovecot) are the independent peers.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

from pymta.app import MTA
from pymta.types import Envelope, RcptState, Recipient
from tests.conftest import wait_for


@dataclass
class Transaction:
    mail: str = ""
    rcpts: list[str] = field(default_factory=list)
    data: bytes = b""        # as on the wire, dot-stuffed, without the final ".\r\n"


class ScriptedPeer:
    """A raw SMTP server on 127.0.0.1 (or ``host``) with scripted capabilities and replies."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *,
                 ehlo: tuple[str, ...] = ("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES",
                                          "SIZE 0", "SMTPUTF8", "DSN"),
                 greeting: str = "220 peer.test ESMTP scripted",
                 rcpt_replies: dict[str, str] | None = None,
                 data_reply: str = "250 2.0.0 Ok: queued as SCRIPTED") -> None:
        self.host, self.port = host, port
        self.ehlo = ehlo
        self.greeting = greeting
        self.rcpt_replies = {k.lower(): v for k, v in (rcpt_replies or {}).items()}
        self.data_reply = data_reply
        self.lines: list[str] = []
        self.transactions: list[Transaction] = []
        self.connections = 0
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> ScriptedPeer:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        txn: Transaction | None = None

        def say(text: str) -> None:
            writer.write(text.encode() + b"\r\n")

        try:
            say(self.greeting)
            if not self.greeting.startswith("220"):
                await writer.drain()
                return
            while True:
                raw = await reader.readline()
                if not raw:
                    return
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                self.lines.append(line)
                verb = line[:4].upper()
                if verb in ("EHLO", "HELO"):
                    say(self._ehlo_reply())
                elif verb == "MAIL":
                    txn = Transaction(mail=line)
                    say("250 2.1.0 Ok")
                elif verb == "RCPT":
                    addr = line.split("<", 1)[1].split(">", 1)[0].lower()
                    reply = self.rcpt_replies.get(addr, "250 2.1.5 Ok")
                    if reply.startswith("2") and txn is not None:
                        txn.rcpts.append(line)
                    say(reply)
                elif verb == "DATA":
                    say("354 End data with <CR><LF>.<CR><LF>")
                    await writer.drain()
                    data = await _read_data(reader)
                    if txn is not None:
                        txn.data = data
                        self.transactions.append(txn)
                    txn = None
                    say(self.data_reply)
                elif verb == "RSET":
                    txn = None
                    say("250 2.0.0 Ok")
                elif verb == "QUIT":
                    say("221 2.0.0 Bye")
                    await writer.drain()
                    return
                else:
                    say("250 2.0.0 Ok")
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    def _ehlo_reply(self) -> str:
        caps = ["peer.test", *self.ehlo]
        return "\r\n".join(f"250{'-' if i < len(caps) - 1 else ' '}{c}"
                            for i, c in enumerate(caps))


async def _read_data(reader: asyncio.StreamReader) -> bytes:
    """The DATA lines up to the final dot (or the connection's end), still dot-stuffed."""
    chunks = []
    while True:
        line = await reader.readline()
        if not line or line == b".\r\n":
            return b"".join(chunks)
        chunks.append(line)


def unstuff(data: bytes) -> bytes:
    """Wire DATA lines back to the message (RFC 5321 §4.5.2)."""
    return b"".join(line[1:] if line.startswith(b".") else line
                    for line in data.splitlines(keepends=True))


def message(sender: str, to: str, subject: str, body: str = "Hello.\r\n") -> bytes:
    return (f"From: <{sender}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n"
            f"Message-ID: <{time.time_ns()}@client.test>\r\n\r\n{body}").encode()


async def inject(mta: MTA, sender: str, rcpts: list[str | Recipient], data: bytes,
                 **env: object) -> str:
    """Queue a message for ``rcpts`` as the receiving side would (remote when the domain is
    not ours; a Recipient is taken as given) and submit it for delivery at once."""
    ours = set(mta.config.mail_domain)
    recipients = []
    for r in rcpts:
        if isinstance(r, Recipient):
            recipients.append(r)
        elif r.rpartition("@")[2].lower() in ours:
            resolved = await mta.resolve(r)
            assert resolved is not None, r
            recipients.append(resolved)
        else:
            recipients.append(Recipient(r, r, local=False))
    now = time.time()
    envelope = Envelope(sender=sender, recipients=recipients, received_at=now,
                        next_attempt=now, size=len(data), **env)  # type: ignore[arg-type]
    qid = await mta.store.enqueue_bytes(envelope, data)
    assert mta.manager is not None
    mta.manager.submit(qid, envelope)
    return qid


def envelope(mta: MTA, qid: str) -> Envelope | None:
    return mta.store.load(qid)


async def wait_gone(mta: MTA, qid: str, timeout: float = 15.0) -> None:
    await wait_for(lambda: qid not in mta.store.ids(), timeout)


async def wait_attempted(mta: MTA, qid: str, attempts: int = 1,
                         timeout: float = 15.0) -> Envelope:
    def check():
        env = mta.store.load(qid)
        if env is not None and all(r.attempts >= attempts or r.state is not RcptState.PENDING
                                   for r in env.recipients):
            return env
        return None
    return await wait_for(check, timeout)


class RecordingHandler:
    """An aiosmtpd handler that accepts every message and keeps its recipients."""

    def __init__(self) -> None:
        self.received: list[list[str]] = []

    async def handle_DATA(self, server, session, envelope):
        self.received.append(list(envelope.rcpt_tos))
        return "250 2.0.0 Ok"


class RecordingProxy:
    """A TCP proxy on 127.0.0.1 in front of a real server, keeping what each side sent, in
    the order it arrived, per connection: what the server saw, seen from its doorstep
    (commands grouped in one write = pipelining; connections counted = reuse)."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.connections: list[list[tuple[str, bytes]]] = []
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._open: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []

    def drop_all(self) -> None:
        """Close every connection as a peer that drops idle sessions would."""
        for down, up in self._open:
            down.close()
            up.close()
        self._open.clear()

    async def start(self) -> RecordingProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._tasks):
            task.cancel()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        events: list[tuple[str, bytes]] = []
        self.connections.append(events)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._open.append((writer, up_writer))

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, side: str) -> None:
            try:
                while chunk := await src.read(65536):
                    events.append((side, chunk))
                    dst.write(chunk)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        tasks = [asyncio.ensure_future(pump(reader, up_writer, "client")),
                 asyncio.ensure_future(pump(up_reader, writer, "server"))]
        for task in tasks:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        await asyncio.gather(*tasks, return_exceptions=True)

    def client_turns(self, index: int = -1) -> list[bytes]:
        """What the client sent on connection ``index``, one item per turn: the bytes it
        sent between two replies of the server."""
        turns: list[bytes] = []
        last = ""
        for side, chunk in self.connections[index]:
            if side == "client":
                if last == "client":
                    turns[-1] += chunk
                else:
                    turns.append(chunk)
            last = side
        return turns
