"""The thin asyncio adapter between a socket and the sans-I/O engine.

Implementation summary. ``data_received`` only feeds the engine and wakes the session task;
one task per connection drives ``engine.next_event()``, awaits policy decisions (lookups,
group commit), streams message chunks to the spool and writes the engine's output once per
drained read, so a pipelined group gets one write. Reading pauses while the engine holds more
than a small buffer (a client cannot grow our memory while a decision is pending). An idle
timer closes sessions that say nothing for ``idle_timeout`` seconds. Connection limits (total
and per client address) are checked before the greeting.

AUTH: the engine runs the SASL exchange and hands over finished credentials; the session
checks them. A ``535`` is delayed by :class:`AuthThrottle` (``auth_fail_delay`` × the
client address's recent failures, capped) with ``asyncio.sleep``, so password guessing slows
down while every other session runs on. Neither this module nor the engine logs SASL lines.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import cast

from pymta.session import ReceiveContext, Session
from pymta.smtp import events as ev
from pymta.smtp.engine import Engine, EngineConfig
from pymta.tls import describe_tls
from pymta.types import Reply

log = logging.getLogger("pymta.smtpd")

READ_PAUSE_BYTES = 256 * 1024


class AuthThrottle:
    """Per-client-address failed-AUTH counter: the delay before each ``535`` grows with the
    failures of that address (``step`` × n, at most ``maximum``); an address that fails no
    more for ``forget`` seconds starts again from zero. Bounded: at most ``max_entries``
    addresses are remembered (the oldest are dropped first)."""

    def __init__(self, step: float = 0.5, maximum: float = 5.0, forget: float = 900.0,
                 max_entries: int = 10000) -> None:
        self.step = step
        self.maximum = maximum
        self.forget = forget
        self.max_entries = max_entries
        self._failures: dict[str, tuple[int, float]] = {}

    def failed(self, ip: str) -> float:
        """Record one failure of ``ip``; return how long to wait before answering."""
        now = time.monotonic()
        count, last = self._failures.pop(ip, (0, now))
        if now - last > self.forget:
            count = 0
        count += 1
        self._failures[ip] = (count, now)  # re-inserted: dict order is recency order
        while len(self._failures) > self.max_entries:
            del self._failures[next(iter(self._failures))]
        return min(self.step * count, self.maximum)

    def failures(self, ip: str) -> int:
        return self._failures.get(ip, (0, 0.0))[0]


@dataclass
class ListenerContext:
    """Shared by every connection of one server (all its listeners)."""

    receive: ReceiveContext
    engine_config: EngineConfig
    ssl_context: ssl.SSLContext | None
    idle_timeout: float = 300.0
    max_connections: int = 2000
    max_per_ip: int = 50
    tls_handshake_timeout: float = 30.0
    active: set[SMTPServerProtocol] = field(default_factory=set)
    per_ip: Counter[str] = field(default_factory=Counter)
    auth_throttle: AuthThrottle = field(default_factory=AuthThrottle)


class SMTPServerProtocol(asyncio.Protocol):
    __slots__ = ("ctx", "cfg", "transport", "engine", "session", "_task", "_waiter",
                 "_timer", "_last", "_peer_ip", "_paused", "_lost", "_implicit_tls",
                 "_tls_early")

    def __init__(self, ctx: ListenerContext, cfg: EngineConfig, implicit_tls: bool) -> None:
        self.ctx = ctx
        self.cfg = cfg
        self._implicit_tls = implicit_tls
        self.transport: asyncio.Transport | None = None
        self._task: asyncio.Task[None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._paused = False
        self._lost = False
        self._peer_ip = ""
        # Decrypted bytes that arrive while loop.start_tls() is still finishing: with TLS 1.3
        # the client's first command can come in the same read as its Finished message.
        self._tls_early: bytearray | None = None

    # ------------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance check: uvloop's transports do not derive from asyncio.Transport.
        self.transport = transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername") or ("", 0)
        self._peer_ip = ip = str(peer[0])
        ctx = self.ctx
        if len(ctx.active) >= ctx.max_connections:
            transport.write(Reply(421, "4.7.0", "Error: too many connections; "
                                                "try again later").render())
            transport.close()
            self._lost = True
            return
        if ctx.per_ip[ip] >= ctx.max_per_ip:
            transport.write(Reply(421, "4.7.0", f"Error: too many connections from {ip}")
                            .render())
            transport.close()
            self._lost = True
            return
        ctx.active.add(self)
        ctx.per_ip[ip] += 1
        self.engine = Engine(self.cfg)
        self.session = Session(ctx.receive, ip, int(peer[1]) if len(peer) > 1 else 0)
        if self._implicit_tls:
            self.session.tls_info = describe_tls(transport.get_extra_info("ssl_object"))
        self.engine.greeting()
        transport.write(self.engine.take_output())
        loop = asyncio.get_running_loop()
        self._last = loop.time()
        self._timer = loop.call_later(ctx.idle_timeout, self._check_idle)
        self._task = loop.create_task(self._run())

    def data_received(self, data: bytes) -> None:
        if self._lost:
            return
        self._last = asyncio.get_running_loop().time()
        if self._tls_early is not None:
            self._tls_early += data
            return
        engine = self.engine
        engine.feed(data)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if engine.buffered > READ_PAUSE_BYTES and not self._paused and self.transport:
            self._paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        ctx = self.ctx
        ctx.active.discard(self)
        ctx.per_ip[self._peer_ip] -= 1
        if ctx.per_ip[self._peer_ip] <= 0:
            del ctx.per_ip[self._peer_ip]
        if self._timer is not None:
            self._timer.cancel()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self.session.abort()

    # ------------------------------------------------------------------ the session task

    def _check_idle(self) -> None:
        if self._lost:
            return
        loop = asyncio.get_running_loop()
        idle = loop.time() - self._last
        if idle >= self.ctx.idle_timeout:
            self.engine.close(Reply(421, "4.4.2", f"{self.cfg.hostname} Error: timeout "
                                                  "exceeded"), "idle timeout")
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
            return
        self._timer = loop.call_later(self.ctx.idle_timeout - idle, self._check_idle)

    def _flush(self) -> None:
        out = self.engine.take_output()
        if out and self.transport is not None and not self._lost:
            self.transport.write(out)

    async def _run(self) -> None:
        engine = self.engine
        session = self.session
        loop = asyncio.get_running_loop()
        try:
            while not self._lost:
                event = engine.next_event()
                if event is ev.NEED_DATA:
                    self._flush()
                    if self._paused and self.transport is not None:
                        self._paused = False
                        self.transport.resume_reading()
                    self._waiter = loop.create_future()
                    await self._waiter
                    self._waiter = None
                    continue
                cls = type(event)
                if cls is ev.DataChunk:
                    session.on_data_chunk(event.data)
                elif cls is ev.RcptTo:
                    engine.respond(await session.on_rcpt(event))
                elif cls is ev.MailFrom:
                    engine.respond(session.on_mail(event))
                elif cls is ev.DataStart:
                    engine.respond(session.on_data_start(event))
                elif cls is ev.DataEnd:
                    engine.respond(await session.on_data_end(event))
                elif cls is ev.Helo:
                    session.on_helo(event)
                elif cls is ev.Reset:
                    session.on_reset()
                elif cls is ev.StartTLS:
                    self._flush()
                    if not await self._start_tls():
                        return
                elif cls is ev.Auth:
                    reply = await session.on_auth(event)
                    if reply.code == 235:
                        engine.auth_user = session.auth_user
                    elif reply.code == 535:
                        delay = self.ctx.auth_throttle.failed(self._peer_ip)
                        if delay > 0:
                            await asyncio.sleep(delay)
                    engine.respond(reply)
                elif cls is ev.Close:
                    self._flush()
                    session.abort()
                    if self.transport is not None:
                        self.transport.close()
                    return
        except Exception:
            log.exception("session with %s failed", self._peer_ip)
            session.abort()
            if self.transport is not None and not self._lost:
                self.transport.write(Reply(421, "4.3.0", "Error: local error in processing; "
                                                         "closing connection").render())
                self.transport.close()

    async def _start_tls(self) -> bool:
        loop = asyncio.get_running_loop()
        transport = self.transport
        ctx = self.ctx.ssl_context
        if transport is None or ctx is None:
            return False
        # From here on data_received only sees bytes from the TLS layer: start_tls pauses the
        # plaintext transport before its first await, and the engine dropped what came before.
        self._tls_early = bytearray()
        try:
            new = await loop.start_tls(transport, self, ctx, server_side=True,
                                       ssl_handshake_timeout=self.ctx.tls_handshake_timeout)
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as exc:
            self._tls_early = None
            log.info("TLS handshake with %s failed: %s", self._peer_ip, exc)
            if not transport.is_closing():
                transport.close()
            return False
        early, self._tls_early = self._tls_early, None
        if new is None:
            return False
        self.transport = new
        self.engine.tls_established()
        self.session.on_tls(describe_tls(new.get_extra_info("ssl_object")))
        if early:
            self.engine.feed(bytes(early))
        return True
