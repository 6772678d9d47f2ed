"""An SMTP/LMTP client session on asyncio streams: pipelined, streaming, bounded.

The relay used aiosmtplib, which sends each command and waits for its reply and wants the
whole message as one bytes object. This client does what Postfix's ``smtp`` does instead
(issue 15, item 5):

- **PIPELINING** (RFC 2920): MAIL, every RCPT and DATA leave in one write and their replies
  are read afterwards, in order: one round trip for the envelope instead of 2 + N. Without
  the extension, one command at a time.
- **Streaming**: the body comes from :class:`delivery.body.OutgoingBody` in pieces; DATA
  dot-stuffs across piece boundaries, **BDAT** (RFC 3030, when the peer offers CHUNKING)
  sends each piece as a chunk, pipelined when the peer pipelines.
- **Bounded**: every read has the session's timeout, a reply has at most
  :data:`MAX_REPLY_LINES` lines of at most :data:`MAX_LINE` bytes; a peer that breaks those
  rules, closes, or goes silent is :class:`SessionLost`, never a hang or a traceback.

The session only speaks the protocol; what each reply means for each recipient is the agent's
(``delivery.relay``, ``delivery.lmtp``). A :class:`Transaction` is filled in as replies
arrive, so when the session is lost half-way the agent still knows what was already decided.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Any

from .body import OutgoingBody, SpoolUnreadable

MAX_LINE = 4096          # bytes in one reply line (RFC 5321 §4.5.3.1.5 says 512)
MAX_REPLY_LINES = 1000   # lines in one (multi-line) reply
READ_LIMIT = MAX_LINE + 2
BDAT_CHUNK = 1 << 20    # bytes per BDAT chunk (sent in the body's smaller pieces)
RSET_TIMEOUT = 20.0      # seconds for the RSET that checks a cached session


class SessionLost(Exception):
    """The peer closed the connection, went silent, or broke the reply syntax."""


@dataclass(frozen=True, slots=True)
class Response:
    """One reply: its code, its lines' texts joined by newlines, and the lines."""

    code: int
    text: str
    lines: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300


@dataclass(slots=True)
class Transaction:
    """What one MAIL transaction got back, filled in as the replies are read.

    ``rcpts[i]`` is recipient i's RCPT reply (None until read). ``data`` holds the end of
    data reply (SMTP: one; LMTP: one per accepted recipient, in RCPT order). ``stage`` names
    where the session is, for a deferral's text. ``body_sent``: the whole message reached the
    peer (after that, an LMTP server delivers whether or not we listen)."""

    mail: Response | None = None
    rcpts: list[Response | None] = field(default_factory=list)
    data_start: Response | None = None
    data: list[Response] = field(default_factory=list)
    stage: str = "MAIL FROM"
    body_sent: bool = False
    chunk_refusal: Response | None = None   # a BDAT chunk before LAST refused

    def end_of_data(self) -> Response | None:
        """The reply that decides an SMTP transaction's accepted recipients."""
        if self.chunk_refusal is not None:
            return self.chunk_refusal
        return self.data[0] if self.data else None

    def accepted(self) -> list[int]:
        return [i for i, r in enumerate(self.rcpts) if r is not None and r.ok]


class ClientSession:
    """One connection to an SMTP or LMTP server (see the module docstring)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                 timeout: float, lmtp: bool = False) -> None:
        self.reader = reader
        self.writer = writer
        self.timeout = timeout
        self.lmtp = lmtp
        self.extensions: dict[str, str] = {}
        self.broken = False     # a failure left the session in an unknown state

    @classmethod
    async def connect(cls, host: str, port: int, *, timeout: float,
                      connect_timeout: float, lmtp: bool = False,
                      sock: Any = None, ssl_context: ssl.SSLContext | None = None,
                      server_hostname: str | None = None) -> ClientSession:
        """A TCP (or, with ``sock``, an already connected socket's) session; TLS from the
        first byte with ``ssl_context``. Raises OSError/TimeoutError/ssl errors."""
        kwargs: dict[str, Any] = {"limit": READ_LIMIT}
        if ssl_context is not None:
            kwargs.update(ssl=ssl_context, server_hostname=server_hostname or host,
                          ssl_handshake_timeout=connect_timeout)
        if sock is not None:
            opening = asyncio.open_connection(sock=sock, **kwargs)
        else:
            opening = asyncio.open_connection(host, port, **kwargs)
        reader, writer = await asyncio.wait_for(opening, connect_timeout)
        return cls(reader, writer, timeout=timeout, lmtp=lmtp)

    @classmethod
    async def connect_unix(cls, path: str, *, timeout: float, connect_timeout: float,
                           lmtp: bool = True) -> ClientSession:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(path, limit=READ_LIMIT), connect_timeout)
        return cls(reader, writer, timeout=timeout, lmtp=lmtp)

    # ------------------------------------------------------------------ state

    @property
    def is_connected(self) -> bool:
        return not self.broken and not self.writer.is_closing()

    def supports(self, keyword: str) -> bool:
        return keyword.lower() in self.extensions

    def transport_info(self, name: str) -> Any:
        return self.writer.get_extra_info(name)

    @property
    def ssl_object(self) -> ssl.SSLObject | None:
        obj = self.writer.get_extra_info("ssl_object")
        return obj if isinstance(obj, ssl.SSLObject) else None

    # ------------------------------------------------------------------ wire

    async def read_reply(self, timeout: float | None = None) -> Response:
        """One reply, every line of it within ``timeout`` (default: the session's)."""
        texts: list[str] = []
        limit = self.timeout if timeout is None else timeout
        for _ in range(MAX_REPLY_LINES):
            text = (await self._line(limit)).decode("utf-8", "replace").rstrip("\r\n")
            if len(text) < 3 or not text[:3].isdigit() or text[3:4] not in ("", " ", "-"):
                raise self._lost(f"malformed reply {text[:80]!r}")
            texts.append(text[4:])
            if text[3:4] != "-":
                return Response(int(text[:3]), "\n".join(texts), tuple(texts))
        raise self._lost(f"reply of more than {MAX_REPLY_LINES} lines")

    async def _line(self, limit: float) -> bytes:
        """One reply line; the timer is armed only when the line is not already here."""
        try:
            if self.reader._buffer.find(b"\n") >= 0:  # type: ignore[attr-defined]
                return await self.reader.readuntil(b"\n")
            async with asyncio.timeout(limit):
                return await self.reader.readuntil(b"\n")
        except asyncio.IncompleteReadError:
            raise self._lost("connection closed") from None
        except asyncio.LimitOverrunError:
            raise self._lost(f"reply line longer than {MAX_LINE} bytes") from None
        except TimeoutError:
            raise self._lost("timeout") from None
        except (OSError, ssl.SSLError) as exc:
            raise self._lost(str(exc) or type(exc).__name__) from None

    def _lost(self, why: str) -> SessionLost:
        """The session is unusable from now on: the exception that says why."""
        self.broken = True
        return SessionLost(why)

    def write(self, data: bytes | memoryview) -> None:
        """Into the send buffer; :meth:`drain` pushes it (and bounds the buffer)."""
        self.writer.write(data)

    async def drain(self) -> None:
        try:
            if self.writer.transport.get_write_buffer_size() == 0:
                await self.writer.drain()       # nothing waiting: returns at once
            else:
                async with asyncio.timeout(self.timeout):
                    await self.writer.drain()
        except TimeoutError:
            raise self._lost("timeout") from None
        except (OSError, ssl.SSLError) as exc:
            raise self._lost(str(exc) or type(exc).__name__) from None

    async def command(self, line: bytes, timeout: float | None = None) -> Response:
        self.write(line + b"\r\n")
        await self.drain()
        return await self.read_reply(timeout)

    # ------------------------------------------------------------------ session

    async def greeting(self, timeout: float | None = None) -> Response:
        return await self.read_reply(timeout)

    async def hello(self, name: str) -> Response:
        """EHLO (LHLO for LMTP; HELO when EHLO is refused); the extensions are kept."""
        verb = b"LHLO " if self.lmtp else b"EHLO "
        response = await self.command(verb + name.encode("ascii", "replace"))
        if not response.ok and not self.lmtp and 500 <= response.code < 600:
            response = await self.command(b"HELO " + name.encode("ascii", "replace"))
            self.extensions = {}
            return response
        self.extensions = _extensions(response.lines[1:]) if response.ok else {}
        return response

    async def starttls(self, context: ssl.SSLContext, server_hostname: str,
                       handshake_timeout: float) -> Response:
        """STARTTLS; on a 220, the handshake (ssl errors propagate). The caller says EHLO
        again: what was advertised before TLS is forgotten (RFC 3207 §4.2)."""
        response = await self.command(b"STARTTLS")
        if response.code != 220:
            return response
        if getattr(self.reader, "_buffer", b""):
            # Bytes after the 220 arrived in cleartext: replies an attacker could inject to
            # be read as the encrypted session's (CVE-2011-0411, the "STARTTLS injection"
            # class). The session is dropped, as Postfix does.
            raise self._lost("data after the STARTTLS reply (a command injection attempt?)")
        self.extensions = {}
        try:
            await asyncio.wait_for(
                self.writer.start_tls(context, server_hostname=server_hostname,
                                      ssl_handshake_timeout=handshake_timeout),
                handshake_timeout + 1)
        except BaseException:
            self.broken = True
            raise
        return response

    async def rset(self, timeout: float = RSET_TIMEOUT) -> bool:
        """RSET; True when the session answered 250 (it may be reused). A short timeout
        (Postfix's ``smtp_rset_timeout``): a cached session that went silent is dropped."""
        try:
            response = await self.command(b"RSET", timeout)
        except SessionLost:
            return False
        if not response.ok:
            self.broken = True
        return response.ok

    async def quit(self) -> None:
        """QUIT (briefly) and close; never raises."""
        if self.is_connected:
            with contextlib.suppress(SessionLost, OSError, TimeoutError):
                self.write(b"QUIT\r\n")
                await asyncio.wait_for(self.drain(), 5.0)
                await asyncio.wait_for(self.read_reply(), 5.0)
        await self.aclose()

    def close(self) -> None:
        """At once, without QUIT (an unknown state, or a stop)."""
        self.broken = True
        with contextlib.suppress(Exception):
            self.writer.close()

    async def aclose(self) -> None:
        self.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 5.0)

    # ------------------------------------------------------------------ transaction

    async def send_envelope(self, mail: bytes, rcpts: Sequence[bytes], tx: Transaction, *,
                            with_data: bool, rset: bool = False) -> None:
        """MAIL and RCPTs (and DATA when ``with_data``), pipelined when the peer allows.

        Fills ``tx.mail``, ``tx.rcpts`` and, with DATA sent, ``tx.data_start``. DATA goes
        in the same group only when there is a chance of a 354 (RFC 2920 §3.1 lets it end a
        group); without PIPELINING it is sent only if a recipient was accepted. ``rset``
        (pipelining peers only): an RSET leads the group, the check of a cached session;
        when it fails, ``tx.stage`` is still ``RSET`` and the session is lost (nothing of
        the transaction can have been taken: no body was sent)."""
        tx.rcpts = [None] * len(rcpts)
        if self.supports("pipelining"):
            group = [b"RSET", mail, *rcpts] if rset else [mail, *rcpts]
            if with_data:
                group.append(b"DATA")
            tx.stage = "RSET" if rset else "MAIL FROM"
            self.write(b"".join(line + b"\r\n" for line in group))
            await self.drain()
            if rset and not (await self.read_reply(RSET_TIMEOUT)).ok:
                raise self._lost("RSET refused")
            tx.stage = "MAIL FROM"
            tx.mail = await self.read_reply()
            tx.stage = "RCPT TO"
            for i in range(len(rcpts)):
                tx.rcpts[i] = await self.read_reply()
            if with_data:
                tx.stage = "DATA"
                tx.data_start = await self.read_reply()
            return
        tx.stage = "MAIL FROM"
        tx.mail = await self.command(mail)
        if not tx.mail.ok:
            return
        tx.stage = "RCPT TO"
        for i, line in enumerate(rcpts):
            tx.rcpts[i] = await self.command(line)
        if with_data and tx.accepted():
            tx.stage = "DATA"
            tx.data_start = await self.command(b"DATA")

    async def send_data(self, body: OutgoingBody, tx: Transaction) -> None:
        """After a 354: the body, dot-stuffed as it streams, and the terminating dot.
        The end-of-data replies are read by :meth:`read_data_replies`."""
        tx.stage = "end of DATA"
        stuffer = DotStuffer()
        async with contextlib.aclosing(body.pieces()) as pieces:
            async for piece in pieces:
                if piece:
                    self.write(stuffer.feed(piece))
                    await self.drain()
        self.write(stuffer.end())
        await self.drain()
        tx.body_sent = True

    async def send_bdat(self, body: OutgoingBody, tx: Transaction) -> None:
        """The body as BDAT chunks of at most :data:`BDAT_CHUNK` bytes (RFC 3030), the last
        marked LAST, each written in the body's pieces (never a chunk-sized copy);
        pipelined when the peer pipelines, else each chunk waits for its reply (a refusal
        stops the rest, and the caller resets). The reply to LAST is left for
        :meth:`read_data_replies`; an earlier chunk's refusal is ``tx.chunk_refusal``,
        which decides instead."""
        tx.stage = "end of DATA"
        async with contextlib.aclosing(body.pieces()) as pieces:
            pending = await self._chunks(pieces, body.size, tx)
        if pending is None:
            return
        tx.body_sent = True
        for _ in range(pending):
            response = await self.read_reply()
            if not response.ok and tx.chunk_refusal is None:
                tx.chunk_refusal = response

    async def _chunks(self, pieces: AsyncGenerator[bytes, None], total: int,
                      tx: Transaction) -> int | None:
        """Write ``total`` bytes of ``pieces`` as BDAT chunks; the replies still to read
        (pipelined), or None when a chunk was refused (not pipelined). A body that turns
        out longer than ``total`` is a local fault, found before its last byte leaves."""
        pipelined = self.supports("pipelining")
        pending = 0
        held = memoryview(b"")
        remaining = total
        while True:
            size = min(BDAT_CHUNK, remaining)
            last = size == remaining
            self.write(b"BDAT %d%s\r\n" % (size, b" LAST" if last else b""))
            need = size
            while need:
                if not held:
                    try:
                        held = memoryview(await anext(pieces))
                    except StopAsyncIteration:
                        self.broken = True
                        raise SpoolUnreadable("the queued message is shorter than its "
                                              "size") from None
                    continue
                taken = min(need, len(held))
                if last and taken == need:
                    more: bytes = b"" if len(held) > taken else await anext(pieces, b"")
                    if len(held) > taken or more:
                        self.broken = True      # the peer must not take a cut message
                        raise SpoolUnreadable("the queued message is longer than its size")
                self.write(held[:taken])
                held, need = held[taken:], need - taken
                await self.drain()
            await self.drain()
            remaining -= size
            if last:
                return pending
            if pipelined:
                pending += 1
                continue
            response = await self.read_reply()
            if not response.ok:
                tx.chunk_refusal = response
                return None

    async def abandon_data(self, tx: Transaction) -> None:
        """After a 354 with nothing to send (MAIL or every RCPT refused, and a peer that
        should have said 503 to the pipelined DATA, RFC 2920 §3.1): an empty message ends
        it, its reply read and ignored, so that the session stays in step."""
        if tx.data_start is not None and tx.data_start.code == 354:
            self.write(b".\r\n")
            await self.drain()
            await self.read_reply()

    async def read_data_replies(self, tx: Transaction, count: int) -> None:
        """The end-of-data reply (SMTP: ``count`` 1; LMTP: one per accepted recipient)."""
        while len(tx.data) < count:
            tx.data.append(await self.read_reply())


class DotStuffer:
    """DATA transparency (RFC 5321 §4.5.2) for a body that arrives in pieces: a dot that
    begins a line is doubled even when the line began in an earlier piece; :meth:`end`
    closes the last line if it is open and adds the terminating dot. A line begins after
    any LF, CRLF or not: a server that ends lines at a bare LF must not read ``LF . CRLF``
    as the end of the data (SMTP smuggling)."""

    __slots__ = ("_tail",)

    def __init__(self) -> None:
        self._tail = b"\r\n"     # the last two bytes fed

    def feed(self, piece: bytes) -> bytes:
        if not piece:
            return b""
        stuffed = piece.replace(b"\n.", b"\n..")
        if self._tail[-1:] == b"\n" and piece[:1] == b".":
            stuffed = b"." + stuffed
        self._tail = (self._tail + piece)[-2:]
        return stuffed

    def end(self) -> bytes:
        return (b"" if self._tail == b"\r\n" else b"\r\n") + b".\r\n"


def _extensions(lines: Sequence[str]) -> dict[str, str]:
    """EHLO lines → {keyword (lower case): parameters}."""
    out: dict[str, str] = {}
    for line in lines:
        keyword, _, params = line.strip().partition(" ")
        if keyword:
            out[keyword.lower()] = params
    return out
