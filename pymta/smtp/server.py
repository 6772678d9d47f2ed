"""The thin asyncio adapter between a socket and the sans-I/O engine.

Implementation summary. ``data_received`` only feeds the engine and wakes the session task;
one task per connection drives ``engine.next_event()``, awaits policy decisions (lookups,
group commit), streams message chunks to the spool and writes the engine's output once per
drained read, so a pipelined group gets one write. Reading pauses while the engine holds more
than a small buffer (a client cannot grow our memory while a decision is pending). An idle
timer closes sessions that say nothing for ``idle_timeout`` seconds. Connection limits (total
and per client address) are checked before the greeting.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import Counter
from dataclasses import dataclass, field

from pymta.session import ReceiveContext, Session
from pymta.smtp import events as ev
from pymta.smtp.engine import Engine, EngineConfig
from pymta.tls import describe_tls
from pymta.types import Reply

log = logging.getLogger("pymta.smtpd")

READ_PAUSE_BYTES = 256 * 1024


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


class SMTPServerProtocol(asyncio.Protocol):
    __slots__ = ("ctx", "cfg", "transport", "engine", "session", "_task", "_waiter",
                 "_timer", "_last", "_peer_ip", "_paused", "_lost", "_implicit_tls")

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

    # ------------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
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
                    engine.respond(Reply(535, "5.7.8", "Error: authentication failed"))
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
        try:
            new = await loop.start_tls(transport, self, ctx, server_side=True,
                                       ssl_handshake_timeout=self.ctx.tls_handshake_timeout)
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as exc:
            log.info("TLS handshake with %s failed: %s", self._peer_ip, exc)
            if not transport.is_closing():
                transport.close()
            return False
        if new is None:
            return False
        self.transport = new
        self.engine.tls_established()
        self.session.on_tls(describe_tls(new.get_extra_info("ssl_object")))
        return True
