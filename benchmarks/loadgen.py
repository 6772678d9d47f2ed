"""Asyncio SMTP load generator (the Python counterpart of Postfix's ``smtp-source``).

Why not smtplib or aiosmtplib: the client must be cheaper than the server it measures, or on a
2-core machine the numbers describe the client. This one speaks just enough SMTP over raw
asyncio streams: the message is rendered once, each transaction is at most two writes (with
PIPELINING: MAIL+RCPT+DATA in one, then body and the final dot in another), and replies are
parsed only as far as the three-digit code.

Model (same as ``smtp-source -s SESSIONS -m MESSAGES``): ``sessions`` connections run at once;
each sends ``per_session`` messages, QUITs, and a new connection takes its place until
``messages`` have been attempted in total. Latency per message is measured from the write of
the body and final ``.\\r\\n`` to the arrival of the reply to it, i.e. the time the server needs
to make the message safe (for pymta: spool, fsync, queue) and answer.

Run as ``python -m benchmarks.loadgen HOST:PORT ...`` it loads any SMTP server and prints a
summary (``benchmarks/loadgen_cli.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import math
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

CRLF = b"\r\n"


class SMTPClientError(Exception):
    """The server broke the protocol (bad reply, early close) in a way that ends the session."""


@dataclass(frozen=True, slots=True)
class LoadResult:
    """Outcome of one load run; ``msgs_per_s`` counts only messages answered with 2xx."""

    messages: int          # attempted
    accepted: int          # final reply 2xx
    temp_failed: int       # a 4xx on MAIL, RCPT, DATA or end of data
    perm_failed: int       # a 5xx on MAIL, RCPT, DATA or end of data
    errors: int            # not answered at all: connection refused/reset, timeout, garbage
    seconds: float
    msgs_per_s: float
    p50_ms: float
    p99_ms: float
    sessions: int
    size: int
    pipelining_used: bool

    @property
    def failed(self) -> int:
        """Every attempted message that was not accepted, whatever the reason."""
        return self.messages - self.accepted


def make_message(size: int, sender: str, recipient: str) -> bytes:
    """Render one RFC 5322 message of exactly ``size`` bytes (or its headers, if larger).

    Body lines are 76 letters (never a leading dot, so no dot-stuffing is needed and the bytes
    can be written as they are), CRLF line ends, and the message ends with CRLF so that the
    caller can append ``.\\r\\n``.
    """
    headers = (
        f"From: <{sender}>\r\n"
        f"To: <{recipient}>\r\n"
        f"Subject: pymta benchmark message\r\n"
        f"Date: {email.utils.formatdate(localtime=False)}\r\n"
        f"Message-ID: {email.utils.make_msgid(domain='loadgen.test')}\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
    ).encode("ascii")
    alphabet = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    body = bytearray()
    remaining = size - len(headers)
    row = 0
    while remaining > 0:
        # A line of n letters costs n + 2 bytes; a final short line is at least one letter.
        n = min(76, max(1, remaining - 2))
        start = row % len(alphabet)
        letters = (alphabet[start:] + alphabet * 2)[:n]
        body += letters + CRLF
        remaining -= n + 2
        row += 1
    return headers + bytes(body)


class RateLimiter:
    """Open-loop pacing: message ``n`` may start no earlier than ``t0 + n / rate``.

    Used for latency at a fixed offered load (half the measured peak): sessions that would run
    ahead wait for their slot, so the server sees ``rate`` messages per second as long as it
    keeps up, and latency is not inflated by a queue of our own making.
    """

    __slots__ = ("rate", "t0", "issued")

    def __init__(self, rate: float, t0: float | None = None) -> None:
        if rate <= 0:
            raise ValueError("rate must be > 0")
        self.rate = rate
        self.t0 = time.perf_counter() if t0 is None else t0
        self.issued = 0

    def delay(self, now: float) -> float:
        """Claim the next slot; seconds to wait for it (0 when it is already due)."""
        slot = self.t0 + self.issued / self.rate
        self.issued += 1
        return max(0.0, slot - now)

    async def wait(self) -> None:
        """Sleep until the next slot."""
        pause = self.delay(time.perf_counter())
        if pause > 0:
            await asyncio.sleep(pause)


def _percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile: a value that was really observed, never an interpolation."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(pct / 100.0 * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass(slots=True)
class Tally:
    """Counters shared by all sessions of a run (one event loop, so no locking needed).

    A ``monitor`` given to :func:`run_load` gets the live object and may only read it: the
    counters and ``latencies`` (appended in the order replies arrive) grow as the run goes.
    """

    to_send: int
    accepted: int = 0
    temp_failed: int = 0
    perm_failed: int = 0
    errors: int = 0
    pipelining_used: bool = False
    latencies: list[float] = field(default_factory=list)
    limiter: RateLimiter | None = None

    def take(self) -> bool:
        """Claim the next message of the total; False once all have been handed out."""
        if self.to_send <= 0:
            return False
        self.to_send -= 1
        return True

    def count_code(self, code: int) -> None:
        """Book a final reply code against the message it ended."""
        if 200 <= code < 300:
            self.accepted += 1
        elif 400 <= code < 500:
            self.temp_failed += 1
        else:
            self.perm_failed += 1


class _Session:
    """One SMTP connection: greeting, EHLO, up to ``per_session`` transactions, QUIT."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        timeout: float,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.timeout = timeout
        self.pipelining = False

    async def reply(self) -> tuple[int, list[bytes]]:
        """Read one (possibly multi-line) reply; return its code and its lines.

        No timeout here: callers put one ``asyncio.timeout`` around a whole exchange, which
        is far cheaper than ``wait_for`` (a new Task) per line.
        """
        lines: list[bytes] = []
        while True:
            try:
                line = await self.reader.readline()
            except ValueError:      # LimitOverrunError: no newline within the stream limit
                raise SMTPClientError("reply line too long") from None
            if not line.endswith(b"\n") or len(line) < 4 or not line[:3].isdigit():
                raise SMTPClientError(f"bad or missing reply line: {line[:80]!r}")
            lines.append(line)
            if line[3:4] != b"-":
                return int(line[:3]), lines

    async def greet(self, helo: str, tls: ssl.SSLContext | None = None,
                    server_hostname: str | None = None) -> None:
        """Read the banner and EHLO (STARTTLS and EHLO again when ``tls`` is given); note
        whether PIPELINING may be used."""
        code, _ = await self.reply()
        if code != 220:
            raise SMTPClientError(f"greeting {code}, expected 220")
        await self._ehlo(helo)
        if tls is not None:
            self.writer.write(b"STARTTLS\r\n")
            code, _ = await self.reply()
            if code != 220:
                raise SMTPClientError(f"STARTTLS answered {code}, expected 220")
            await self.writer.start_tls(tls, server_hostname=server_hostname)
            await self._ehlo(helo)

    async def _ehlo(self, helo: str) -> None:
        self.writer.write(b"EHLO " + helo.encode("ascii") + CRLF)
        code, lines = await self.reply()
        if code != 250:
            raise SMTPClientError(f"EHLO answered {code}")
        self.pipelining = any(
            line[4:].strip().upper().split(b" ")[0] == b"PIPELINING" for line in lines[1:]
        )

    async def transaction(
        self, envelope: tuple[bytes, bytes, bytes], payload: bytes, pipeline: bool
    ) -> tuple[int, float | None]:
        """Send one message; return the code that ended it and the end-of-data latency."""
        mail, rcpt, data = envelope
        if pipeline:
            self.writer.write(mail + rcpt + data)
            codes = [(await self.reply())[0] for _ in range(3)]
        else:
            codes = []
            for cmd in envelope:
                self.writer.write(cmd)
                code, _ = await self.reply()
                codes.append(code)
                if code >= 400:
                    break
        failed = [c for c in codes[:2] if c >= 400]
        if codes[-1] != 354 or failed:
            # RFC 2920: after a pipelined failure the server still answers DATA (554 when no
            # recipient was accepted, or a 354 we must honour by sending an empty message).
            if codes[-1] == 354:
                self.writer.write(b".\r\n")
                await self.reply()
            self.writer.write(b"RSET\r\n")
            await self.reply()
            worst = max(failed) if failed else codes[-1]
            if worst < 400:
                raise SMTPClientError(f"DATA answered {worst}, expected 354")
            return worst, None
        start = time.perf_counter()
        self.writer.write(payload)
        code, _ = await self.reply()
        return code, time.perf_counter() - start

    async def quit(self) -> None:
        """Say goodbye politely but never wait long for the 221."""
        try:
            self.writer.write(b"QUIT\r\n")
            async with asyncio.timeout(min(self.timeout, 5.0)):
                await self.reader.readline()
        except (OSError, TimeoutError):
            pass
        finally:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()


async def _worker(
    host: str,
    port: int,
    tally: Tally,
    per_session: int,
    envelope: tuple[bytes, bytes, bytes],
    payload: bytes,
    pipelining: bool,
    helo: str,
    timeout: float,
    tls: ssl.SSLContext | None = None,
) -> None:
    """Open connections one after another until the shared total has been handed out."""
    while tally.to_send > 0:
        in_flight = 0
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port), timeout
            )
        except (OSError, TimeoutError):
            if tally.take():
                tally.errors += 1
            continue
        session = _Session(reader, writer, timeout)
        try:
            async with asyncio.timeout(timeout):
                await session.greet(helo, tls, host if tls is not None else None)
            pipeline = pipelining and session.pipelining
            tally.pipelining_used |= pipeline
            for _ in range(per_session):
                if not tally.take():
                    break
                in_flight = 1
                if tally.limiter is not None:
                    await tally.limiter.wait()
                async with asyncio.timeout(timeout):
                    code, latency = await session.transaction(envelope, payload, pipeline)
                in_flight = 0
                tally.count_code(code)
                if latency is not None:
                    tally.latencies.append(latency)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, SMTPClientError):
            # The message in flight is lost; a session that died before claiming one costs
            # one message too, or a server that refuses every greeting would loop us forever.
            if in_flight or tally.take():
                tally.errors += 1
            writer.close()
            continue
        await session.quit()


async def run_load(
    host: str,
    port: int,
    *,
    sessions: int = 20,
    messages: int = 2000,
    per_session: int = 1,
    size: int = 4096,
    sender: str = "a@x.test",
    recipient: str = "box@example.com",
    pipelining: bool = True,
    helo: str = "loadgen.test",
    timeout: float = 30.0,
    rate: float | None = None,
    message: bytes | None = None,
    starttls: ssl.SSLContext | None = None,
    monitor: Callable[[Tally], Awaitable[None]] | None = None,
) -> LoadResult:
    """Send ``messages`` messages over ``sessions`` concurrent connections and measure.

    Never raises for server misbehaviour: refusals and broken sessions are counted in the
    result, because a benchmark that stops at the first 4xx says nothing about the other 1999.
    ``rate`` (messages per second) paces the start of transactions (see :class:`RateLimiter`);
    ``None`` sends as fast as the server answers. ``message`` replaces the generated message
    (CRLF, no line starting with a dot: it is sent as is; e.g. one with a DKIM signature).
    ``starttls``: every session says STARTTLS after its EHLO and runs on this context.
    ``monitor``: a coroutine function started with the live :class:`Tally` and cancelled when
    the last session ends (progress display, a timeline); it must only read the tally.
    """
    if sessions < 1 or messages < 0 or per_session < 1 or size < 1:
        raise ValueError("sessions and per_session must be >= 1, messages >= 0, size >= 1")
    payload = (message if message is not None
               else make_message(size, sender, recipient)) + b".\r\n"
    envelope = (
        f"MAIL FROM:<{sender}>\r\n".encode("ascii"),
        f"RCPT TO:<{recipient}>\r\n".encode("ascii"),
        b"DATA\r\n",
    )
    tally = Tally(to_send=messages)
    start = time.perf_counter()
    if rate is not None:
        tally.limiter = RateLimiter(rate, start)
    watcher = asyncio.ensure_future(monitor(tally)) if monitor is not None else None
    try:
        await asyncio.gather(
            *(
                _worker(host, port, tally, per_session, envelope, payload, pipelining, helo,
                        timeout, starttls)
                for _ in range(min(sessions, max(messages, 1)))
            )
        )
    finally:
        seconds = time.perf_counter() - start
        if watcher is not None:
            watcher.cancel()
            await asyncio.wait([watcher])  # never raises; an outer cancellation still does
            if not watcher.cancelled():
                watcher.result()  # a monitor that failed on its own: say so
    lat = sorted(tally.latencies)
    return LoadResult(
        messages=messages,
        accepted=tally.accepted,
        temp_failed=tally.temp_failed,
        perm_failed=tally.perm_failed,
        errors=tally.errors,
        seconds=seconds,
        msgs_per_s=tally.accepted / seconds if seconds > 0 else 0.0,
        p50_ms=_percentile(lat, 50) * 1000.0,
        p99_ms=_percentile(lat, 99) * 1000.0,
        sessions=sessions,
        size=len(payload) - 3,
        pipelining_used=tally.pipelining_used,
    )


if __name__ == "__main__":
    from benchmarks.loadgen_cli import main

    raise SystemExit(main())
