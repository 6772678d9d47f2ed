"""The thin asyncio adapter between a socket and the sans-I/O engine.

Implementation summary. ``data_received`` only feeds the engine and wakes the session task;
one task per connection drives ``engine.next_event()``, awaits policy decisions (lookups,
group commit), streams message chunks to the spool and writes the engine's output once per
drained read, so a pipelined group gets one write. Reading pauses while the engine holds more
than a small buffer (a client cannot grow our memory while a decision is pending), and while
the client does not read our replies (``pause_writing``: a client that only sends cannot grow
our output buffer either).

Timeouts. ``idle_timeout`` is the client's clock, like Postfix's ``smtpd_timeout``, but per
record (Postfix's ``smtpd_per_record_deadline``): a command line, or a line of message text,
must be complete within ``idle_timeout`` of the previous one, so trickling one byte at a time
cannot hold a session forever. The clock runs only while we wait for the client: while a
decision of ours is pending (a slow DNS check at the end of data, an AUTH delay) it does not
run, and it restarts when we hand the turn back. So a session is never closed for idleness
while its answer is still being made, and once a ``421`` is written nothing follows it (a
``421`` followed by a ``250`` made clients send the message again: issue 10, defect 5).

The client's name (``pymta.peername``: its PTR, when that forward-confirms) is looked up
after the connection limits and before the ``connect from NAME[IP]`` line and the greeting,
as Postfix's smtpd does: a refused connection costs no lookup. The lookup is our turn, not
the client's: its idle clock starts with the greeting; bytes it sends early wait in the
engine until then. A client that goes away meanwhile is forgotten at once (the lookup is
dropped with it); a stop meanwhile answers ``421`` without a greeting.

Connection limits, checked before the greeting: in total, per client address at a time
(Postfix's ``smtpd_client_connection_count_limit``) and per client address per minute
(:class:`ConnectionRateLimit`, Postfix's ``smtpd_client_connection_rate_limit``); clients in
``MYNETWORKS`` are exempt from the per-address limits, as Postfix exempts
``smtpd_client_event_limit_exceptions``. A worker process counts its own connections (the
kernel spreads a client's connections over the workers).

Stopping (:func:`close_sessions`): a session waiting for its client gets ``421 4.3.2`` at once;
one whose decision is pending (a message being committed) gets its answer first and then the
``421``, within a grace period, so a message is not committed without its ``250`` being sent.
Draining first (:func:`drain_sessions`, SIGTERM with ``PYMTA_SHUTDOWN_TIMEOUT``): a mail
transaction under way is let finish (its ``250`` is the point of the wait); a session outside
one gets ``421 4.3.2`` as soon as it is its client's turn, and so does a new ``MAIL``.

AUTH: the engine runs the SASL exchange and hands over finished credentials; the session asks
``pymta.receiving.auth`` (credentials, the delay before a ``535``, the log lines) and this
module only tells the engine who the client is after a ``235``. Neither this module nor the
engine logs SASL lines.

STARTTLS: the engine answers ``220`` and forgets what was pipelined after the command; the
handshake runs here. A connection whose handshake fails, or for which the event loop gives
back no TLS transport, is closed and forgotten (its connection counts released) at once:
neither may stay open without a reader.

PROXY protocol (``PYMTA_PROXY_PROTOCOL_FROM``, :mod:`pymta.receiving.proxyproto`): a
connection from an address in that list must start with a v1 or v2 header, read before
anything else within ``PROXY_HEADER_TIMEOUT`` seconds; a missing, late or malformed one closes
the connection without a greeting and one log line. Until then the connection counts only
towards the total limit; with the header read, the client address it names (``LOCAL`` and
``UNKNOWN``: the balancer's own) is the peer everywhere: the per-address limits, the name
lookup, the log lines and the session (Received, SPF, MYNETWORKS). Bytes after the header in
the same read go to the engine. Connections from other addresses are served as direct clients
without a header (a host may have HAProxy in front and direct clients at once; a header from
them is a bad command): a balancer is trusted by its address, never by what it sends. Not on
the implicit-TLS port, where the handshake runs before this protocol sees a byte.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

from pymta import metrics
from pymta.peername import PeerNameResolver
from pymta.receiving import proxyproto, smtpdlog
from pymta.receiving.session import ReceiveContext, Session
from pymta.smtp import events as ev
from pymta.smtp.engine import Engine, EngineConfig
from pymta.tls import describe_tls
from pymta.types import Reply

log = logging.getLogger("pymta.smtpd")

# Unparsed input a session holds before it stops reading the socket: with one read on top
# (READ_SIZE) this bounds a session's input memory. 64 KiB, not 256: 50 clients streaming
# 25 MB each grew the server by 26 MB at 256 KiB and by 13 MB at 64 (issue 14, ``python -m
# benchmarks --scenario memory-large --no-postfix``), no slower.
READ_PAUSE_BYTES = 64 * 1024
# The most one read of the socket hands a session. The event loops read up to 256 KiB at a
# time (asyncio's and uvloop's own buffers), so 50 clients streaming at once held 50 such
# reads; a session reads into a buffer of this size instead (the protocol is a
# ``BufferedProtocol``; one buffer per thread, as a read is copied out before the next).
# Same benchmark: growth 15.2-15.6 MB before, 9.5-10.7 MB with it; throughput of 4 KiB
# messages unchanged (interleaved smtp-source runs, 1,024 vs 1,048 msg/s end to end).
READ_SIZE = 64 * 1024
_read_buffers = threading.local()


def _read_buffer() -> memoryview:
    """This thread's read buffer (an event loop runs in one thread: a read fills it and is
    copied out before the next read starts)."""
    view: memoryview | None = getattr(_read_buffers, "view", None)
    if view is None:
        view = _read_buffers.view = memoryview(bytearray(READ_SIZE))
    return view
# How long stopping waits for sessions whose answer is being made (a message being checked
# and committed) before it drops them; the pipeline's own timeouts bound most decisions.
SHUTDOWN_GRACE = 5.0
# How long sessions that are only sending their last replies (the 421) get after that grace,
# when a slow one used it up: a short time of their own, not an abort in the same step.
DRAIN_GRACE = 1.0
# How long a closing connection may take to drain our last reply before it is dropped (a
# client that stopped reading must not keep the socket forever).
CLOSE_LINGER = 10.0
# How often draining looks whether every session has ended.
DRAIN_POLL = 0.05
# How long a balancer in PYMTA_PROXY_PROTOCOL_FROM has to send its PROXY header.
PROXY_HEADER_TIMEOUT = 10.0

R_SHUTDOWN = "Error: service shutting down, closing transmission channel"


class ConnectionRateLimit:
    """Connections per client address per ``window`` seconds (Postfix's anvil,
    ``smtpd_client_connection_rate_limit`` over ``anvil_rate_time_unit``).

    A client's window starts with its first connection and lasts ``window`` seconds; every
    connection counts, refused ones too (as in anvil: a client that keeps hammering stays
    refused until it slows down). The table is bounded: at most ``max_entries`` addresses,
    the oldest windows dropped first (a dropped address starts again from zero, so an attack
    from more addresses than that in one window is limited less, never wrongly refused).
    Expired windows are dropped as new ones are made, a few per call: O(1) per connection.
    """

    __slots__ = ("limit", "window", "max_entries", "_clock", "_table")

    def __init__(self, limit: int, window: float = 60.0, max_entries: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window = window
        self.max_entries = max_entries
        self._clock = clock
        # ip -> [window start, connections]; dict order is window-start order because an
        # address is re-inserted whenever its window restarts
        self._table: dict[str, list[float]] = {}

    def __len__(self) -> int:
        return len(self._table)

    def hit(self, ip: str) -> int:
        """Count one connection of ``ip``; return its connections in the current window
        (more than ``limit`` means: refuse it)."""
        now = self._clock()
        table = self._table
        entry = table.get(ip)
        if entry is not None and now - entry[0] < self.window:
            entry[1] += 1
            return int(entry[1])
        if entry is not None:
            del table[ip]
        table[ip] = [now, 1]
        # drop up to two expired windows from the front (one comes in per call, so the table
        # holds the addresses of the last window and no more), and the oldest beyond the cap
        for _ in range(2):
            oldest = next(iter(table))
            if now - table[oldest][0] < self.window:
                break
            del table[oldest]
        while len(table) > self.max_entries:
            del table[next(iter(table))]
        return 1


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
    rate_limit: ConnectionRateLimit | None = None   # None: no per-minute limit (the default)
    peer_names: PeerNameResolver | None = None      # None: every client unknown, no lookup
    proxy_from: Callable[[str], bool] | None = None  # PYMTA_PROXY_PROTOCOL_FROM; None: off
    active: set[SMTPServerProtocol] = field(default_factory=set)
    per_ip: Counter[str] = field(default_factory=Counter)
    draining: bool = False   # transactions under way may finish; nothing new is begun
    stopping: bool = False

    def refusal(self, ip: str) -> Reply | None:
        """The ``421`` for a new connection from ``ip`` that a limit refuses, else None.
        Per-address limits spare ``MYNETWORKS`` (asked only when a limit would refuse)."""
        if len(self.active) >= self.max_connections:
            metrics.refused("total")
            return Reply(421, "4.7.0", "Error: too many connections; try again later")
        rate = self.rate_limit.hit(ip) if self.rate_limit is not None else 0
        over_rate = self.rate_limit is not None and rate > self.rate_limit.limit
        if (over_rate or self.per_ip[ip] >= self.max_per_ip) and \
                not self.receive.relay_allowed(ip):
            if over_rate and self.rate_limit is not None and rate == self.rate_limit.limit + 1:
                # once per client and window, not once per refused connection
                log.warning("connection rate limit exceeded: %d from [%s] in %gs", rate, ip,
                            self.rate_limit.window)
            metrics.refused("rate" if over_rate else "per_ip")
            return Reply(421, "4.7.0", f"Error: too many connections from {ip}")
        return None


class SMTPServerProtocol(asyncio.BufferedProtocol):
    __slots__ = ("ctx", "cfg", "transport", "engine", "session", "_task", "_waiter",
                 "_timer", "_last", "_peer_ip", "_paused", "_write_paused", "_lost",
                 "_implicit_tls", "_tls_early", "_greeted", "_busy", "_proxy_buf", "kind")

    def __init__(self, ctx: ListenerContext, cfg: EngineConfig, implicit_tls: bool,
                 kind: str = "smtp") -> None:
        self.ctx = ctx
        self.cfg = cfg
        self.kind = kind    # the listener: smtp, submission, submissions (for the metrics)
        self._implicit_tls = implicit_tls
        self.transport: asyncio.Transport | None = None
        self._task: asyncio.Task[None] | None = None
        # Set while the session task waits for the client (its bytes, or room to write);
        # None while we are the ones working (a decision, an AUTH delay, a TLS handshake).
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._paused = False          # we paused reading
        self._write_paused = False    # the transport's write buffer is full
        self._lost = False
        self._greeted = False         # "connect from" logged and the greeting written
        self._peer_ip = ""
        # Decrypted bytes that arrive while loop.start_tls() is still finishing: with TLS 1.3
        # the client's first command can come in the same read as its Finished message.
        self._tls_early: bytearray | None = None
        self._busy = False    # did we make the client wait since it last had the turn?
        # The PROXY header read so far; None when none is expected (or it has been read).
        self._proxy_buf: bytearray | None = None

    # ------------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance check: uvloop's transports do not derive from asyncio.Transport.
        self.transport = transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername") or ("", 0)
        ip, port = str(peer[0]), int(peer[1]) if len(peer) > 1 else 0
        metrics.connection(self.kind)
        ctx = self.ctx
        if ctx.proxy_from is not None and not self._implicit_tls and ctx.proxy_from(ip):
            self._await_proxy_header(ip)
            return
        self._accept(ip, port)

    def _await_proxy_header(self, ip: str) -> None:
        """A balancer's connection: nothing happens until its PROXY header is read; it counts
        towards the total limit meanwhile (``shutdown`` and the deadline close it)."""
        self._peer_ip = ip
        if len(self.ctx.active) >= self.ctx.max_connections:
            metrics.refused("total")
            self._refuse(Reply(421, "4.7.0", "Error: too many connections; try again later"))
            return
        self._proxy_buf = bytearray()
        self.ctx.active.add(self)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(PROXY_HEADER_TIMEOUT, self._proxy_timeout)

    def _proxy_timeout(self) -> None:
        if self._proxy_buf is not None and self.transport is not None and not self._lost:
            log.warning("no PROXY header from [%s] within %gs; closing", self._peer_ip,
                        PROXY_HEADER_TIMEOUT)
            self.transport.abort()

    def _proxy_data(self, data: bytes) -> None:
        """Bytes before the PROXY header is complete: parse; then serve the client it names,
        handing it what followed the header."""
        buf = self._proxy_buf
        assert buf is not None and self.transport is not None
        buf += data
        try:
            header = proxyproto.parse(bytes(buf))
        except proxyproto.ProxyError as exc:
            log.warning("bad PROXY header from [%s]: %s; closing", self._peer_ip, exc)
            self.transport.abort()
            return
        if header is None:
            return
        rest = bytes(buf[header.length:])
        self._proxy_buf = None
        if self._timer is not None:
            self._timer.cancel()
        self.ctx.active.discard(self)
        if header.local:
            peer = self.transport.get_extra_info("peername") or ("", 0)
            ip, port = self._peer_ip, int(peer[1]) if len(peer) > 1 else 0
        else:
            ip, port = header.src_ip, header.src_port
        self._accept(ip, port)
        if rest and not self._lost:
            self.data_received(rest)

    def _refuse(self, refusal: Reply) -> None:
        transport = self.transport
        assert transport is not None
        transport.write(refusal.render())
        transport.close()
        self._lost = True

    def _accept(self, ip: str, port: int) -> None:
        """The connection limits, then the session of client ``ip``: its name, its greeting."""
        transport = self.transport
        assert transport is not None
        self._peer_ip = ip
        ctx = self.ctx
        refusal = ctx.refusal(ip)
        if ctx.draining or ctx.stopping:    # accepted just before the listener closed
            refusal = Reply(421, "4.3.2", f"{self.cfg.hostname} {R_SHUTDOWN}")
        if refusal is not None:
            self._refuse(refusal)
            return
        ctx.active.add(self)
        ctx.per_ip[ip] += 1
        metrics.session_opened()
        self.engine = Engine(self.cfg)
        self.session = Session(ctx.receive, ip, port)
        if self._implicit_tls:
            ssl_object = transport.get_extra_info("ssl_object")
            self.session.tls_info = describe_tls(ssl_object)
            metrics.tls_handshake(ssl_object)
        loop = asyncio.get_running_loop()
        self._last = loop.time()
        self._timer = loop.call_later(ctx.idle_timeout, self._check_idle)
        names = ctx.peer_names
        if names is None or not names.enabled:
            self._greet()               # no name to look up: nothing to wait for
        self._task = loop.create_task(self._run())

    def get_buffer(self, sizehint: int) -> memoryview:
        return _read_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(_read_buffer()[:nbytes]))

    def data_received(self, data: bytes) -> None:
        if self._lost:
            return
        if self._proxy_buf is not None:
            self._proxy_data(data)
            return
        if data.rfind(b"\n") >= 0:
            # a line is complete: the client's clock restarts (a deadline per record, not
            # per read, so a byte now and then does not keep a session alive)
            self._last = asyncio.get_running_loop().time()
        if self._tls_early is not None:
            self._tls_early += data
            return
        engine = self.engine
        engine.feed(data)
        self._wake()
        if engine.buffered > READ_PAUSE_BYTES and not self._paused and self.transport:
            self._paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool | None:
        return False

    def pause_writing(self) -> None:
        # The client does not read our replies: read no more commands until it does.
        self._write_paused = True
        if not self._paused and self.transport is not None and not self._lost:
            self._paused = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._lost:
            return
        if self._proxy_buf is not None:
            # gone before its PROXY header was complete: no session was made
            self._lost = True
            self.ctx.active.discard(self)
            if self._timer is not None:
                self._timer.cancel()
            return
        self._lost = True
        metrics.session_closed()
        ctx = self.ctx
        ctx.active.discard(self)
        ctx.per_ip[self._peer_ip] -= 1
        if ctx.per_ip[self._peer_ip] <= 0:
            del ctx.per_ip[self._peer_ip]
        if self._timer is not None:
            self._timer.cancel()
        task = self._task
        if self._greeted:
            name, engine = self.session.peer_name, self.engine
            if not engine.closed and not self.session.ending:    # gone without QUIT
                smtpdlog.ended("lost connection", smtpdlog.after(engine.where,
                                                                 engine.data_bytes),
                               name, self._peer_ip)
            if not self.session.ending:     # else once its decision is made (_dispatch)
                smtpdlog.disconnect(name, self._peer_ip, engine.stats)
        elif task is not None and not task.done() and not task.cancelling():
            # gone while its name was looked up: nobody waits for that name any more
            task.cancel()
            log.info("lost connection after CONNECT from %s[%s]", self.session.peer_name,
                     self._peer_ip)
        self._wake()
        self.session.abort()

    # ------------------------------------------------------------------ the session task

    def _greet(self) -> None:
        """``connect from NAME[IP]`` and the greeting: the client's turn, and its idle
        clock, start now."""
        self._greeted = True
        smtpdlog.connect(self.session.peer_name, self._peer_ip)
        self.engine.greeting()
        self._flush()
        self._last = asyncio.get_running_loop().time()

    async def _name_then_greet(self) -> None:
        """Look up the client's name, then greet it (unless ``connection_made`` greeted it
        already). Our turn, not the client's: ``_check_idle`` sees no waiter and waits on."""
        if self._greeted:
            return
        names = self.ctx.peer_names
        assert names is not None
        self.session.peer_name = await names.name(self._peer_ip)
        self._greet()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _check_idle(self) -> None:
        if self._lost:
            return
        loop = asyncio.get_running_loop()
        timeout = self.ctx.idle_timeout
        if self._waiter is None:
            # We are the slow ones (the answer to a command is being made): the client's
            # clock does not run; it restarts when the task waits for the client again.
            self._timer = loop.call_later(timeout, self._check_idle)
            return
        idle = loop.time() - self._last
        if idle < timeout:
            self._timer = loop.call_later(timeout - idle, self._check_idle)
            return
        if self._write_paused and self.transport is not None:
            # it does not even read what we sent: a 421 could not reach it
            log.info("timeout writing to %s; dropping the connection", self._peer_ip)
            self.transport.abort()
            return
        if not self.engine.closed:
            smtpdlog.ended("timeout", smtpdlog.after(self.engine.where, self.engine.data_bytes),
                           self.session.peer_name, self._peer_ip)
        self.engine.close(Reply(421, "4.4.2", f"{self.cfg.hostname} Error: timeout "
                                              "exceeded"), "idle timeout")
        self._wake()

    def shutdown(self) -> None:
        """The server is stopping: a session waiting for its client is told ``421 4.3.2``
        now; one whose answer is being made is told after that answer (see ``_run``); one
        whose name is being looked up gets the ``421`` instead of a greeting, at once; one
        whose PROXY header is still awaited is closed."""
        if self._proxy_buf is not None:
            if self.transport is not None:
                self.transport.abort()
            return
        if self._lost or self.engine.closed:
            return
        if not self._greeted:
            if self._task is not None:
                self._task.cancel()
            self.engine.close(Reply(421, "4.3.2", f"{self.cfg.hostname} {R_SHUTDOWN}"),
                              "shutdown")
            self._flush()
            self._close_transport()
            return
        if self._waiter is not None:
            self.engine.close(Reply(421, "4.3.2", f"{self.cfg.hostname} {R_SHUTDOWN}"),
                              "shutdown")
            self._wake()

    def drain(self) -> None:
        """The server is draining: like ``shutdown`` for a session outside a mail
        transaction; one inside goes on, and is told ``421`` once it has ended (see
        ``_closing_for_shutdown``)."""
        if self._proxy_buf is None and not self._lost and self._greeted \
                and self.engine.in_transaction:
            return
        self.shutdown()

    def _flush(self) -> None:
        out = self.engine.take_output()
        if out and self.transport is not None and not self._lost:
            self.transport.write(out)

    def _close_transport(self) -> None:
        """Close after our last reply is written; drop the connection if the client does not
        take that reply within ``CLOSE_LINGER`` seconds."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.close()
        if transport.get_write_buffer_size():
            asyncio.get_running_loop().call_later(CLOSE_LINGER, transport.abort)

    async def _run(self) -> None:
        engine = self.engine
        loop = asyncio.get_running_loop()
        try:
            await self._name_then_greet()
            while not self._lost:
                if self._write_paused:
                    self._flush()
                    # wait for the client to read (resume_writing) or to go away; inline, not
                    # a helper coroutine: an idle session's memory is mostly what it awaits
                    self._waiter = loop.create_future()
                    await self._waiter
                    self._waiter = None
                    continue
                event = engine.next_event()
                if event is ev.NEED_DATA:
                    if self._closing_for_shutdown():
                        continue
                    self._clients_turn()
                    self._waiter = loop.create_future()     # inline too, as above
                    await self._waiter
                    self._waiter = None
                    continue
                if not await self._dispatch(event):
                    return
        except Exception:
            log.exception("session with %s failed", self._peer_ip)
            self.session.abort()
            if self.transport is not None and not self._lost:
                self.transport.write(Reply(421, "4.3.0", "Error: local error in processing; "
                                                         "closing connection").render())
                self._close_transport()

    def _closing_for_shutdown(self) -> bool:
        """Our replies so far go out; when the server is stopping, the engine closes with a
        ``421`` (True: it has that to say before the task waits)."""
        self._flush()
        ctx = self.ctx
        if (ctx.stopping or (ctx.draining and not self.engine.in_transaction)) \
                and not self.engine.closed:
            self.engine.close(Reply(421, "4.3.2", f"{self.cfg.hostname} {R_SHUTDOWN}"),
                              "shutdown")
            return True
        return False

    def _clients_turn(self) -> None:
        """The client has the turn: read from it again if we paused, and if we made it wait,
        its idle clock starts now."""
        if self._paused and not self._write_paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        if self._busy:
            self._busy = False
            self._last = asyncio.get_running_loop().time()

    async def _dispatch(self, event: ev.Event | ev._Sentinel) -> bool:
        """Hand one engine event to the session, and a decision's answer back to the engine;
        False when the session is over. ``_busy`` marks the events that make the client wait
        for us (a lookup, the queue, a handshake, an AUTH check)."""
        engine, session = self.engine, self.session
        match event:
            case ev.DataChunk():
                session.on_data_chunk(event.data)
            case ev.RcptTo():
                self._busy = True
                engine.respond(metrics.replied("rcpt", await session.on_rcpt(event)))
            case ev.MailFrom():
                if self.ctx.draining:    # no new transaction while the server drains
                    engine.close(Reply(421, "4.3.2", f"{self.cfg.hostname} {R_SHUTDOWN}"),
                                 "shutdown")
                    return True
                engine.respond(metrics.replied("mail", session.on_mail(event)))
            case ev.DataStart():
                engine.respond(metrics.replied("data", session.on_data_start(event)))
            case ev.DataEnd():
                self._busy = True
                await self._end_of_data(event)
            case ev.Helo():
                session.on_helo(event)
            case ev.Reset():
                session.on_reset()
            case ev.StartTLS():
                self._flush()
                self._busy = True
                return await self._start_tls()
            case ev.Auth():
                self._busy = True     # the check, and the delay before a 535 (receiving.auth)
                reply = await session.on_auth(event)
                if reply.code == 235:
                    engine.auth_user = session.auth_user
                engine.respond(reply)
            case ev.Close():
                if event.reason == "too many errors":
                    smtpdlog.ended("too many errors", engine.where, session.peer_name,
                                   self._peer_ip)
                elif event.reason == "pipelining violation":
                    smtpdlog.pipelining(engine.where, session.peer_name, self._peer_ip)
                self._flush()
                session.abort()
                self._close_transport()
                return False
        return True

    async def _end_of_data(self, event: ev.DataEnd) -> None:
        engine, session = self.engine, self.session
        try:
            # (the clock is read before the await: arguments are evaluated in order)
            engine.respond(metrics.end_of_data(metrics.clock(),
                                               await session.on_data_end(event)))
        finally:
            if self._lost:
                # gone while the message was decided: its disconnect line counts the
                # outcome (data=1 when it was queued all the same)
                smtpdlog.disconnect(session.peer_name, self._peer_ip, engine.stats)

    async def _start_tls(self) -> bool:
        loop = asyncio.get_running_loop()
        transport = self.transport
        ctx = self.ctx.ssl_context
        if transport is None or ctx is None:
            if transport is not None:
                self._drop_after_tls(transport)
            return False
        # From here on data_received only sees bytes from the TLS layer: start_tls pauses the
        # plaintext transport before its first await, and the engine dropped what came before.
        self._tls_early = bytearray()
        try:
            new = await loop.start_tls(transport, self, ctx, server_side=True,
                                       ssl_handshake_timeout=self.ctx.tls_handshake_timeout)
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as exc:
            self._tls_early = None
            metrics.tls_failed()
            log.info("TLS handshake with %s failed: %s", self._peer_ip, exc)
            self._drop_after_tls(transport)
            return False
        early, self._tls_early = self._tls_early, None
        if new is None:
            # No TLS transport came back (the connection was closed during the handshake):
            # nothing will read from it again, so it must not stay open (issue 11).
            log.info("TLS handshake with %s gave no connection", self._peer_ip)
            self._drop_after_tls(transport)
            return False
        self.transport = new
        metrics.tls_handshake(new.get_extra_info("ssl_object"))
        self.engine.tls_established()
        self.session.on_tls(describe_tls(new.get_extra_info("ssl_object")))
        if early:
            self.engine.feed(bytes(early))
        return True

    def _drop_after_tls(self, transport: asyncio.Transport) -> None:
        """Close a connection whose TLS upgrade failed, and forget it. Its plaintext
        transport may belong to the TLS layer by now, which only passes the loss on to us
        once a handshake completed: so the bookkeeping of ``connection_lost`` is done here
        (it ignores a second call)."""
        if not transport.is_closing():
            transport.close()
        self.connection_lost(None)


async def close_sessions(ctx: ListenerContext, grace: float = SHUTDOWN_GRACE,
                         drain: float = DRAIN_GRACE) -> None:
    """Stop every session of ``ctx`` (the listeners are closed already): ``421 4.3.2`` to
    those waiting for their client at once; those whose answer is being made get it first
    (a message being committed is acknowledged, not left for the client to send again), for
    up to ``grace`` seconds; those still making it then are dropped. Sessions that are only
    sending their last replies have until the grace ends, and at least ``drain`` seconds
    after the wait for the others, before they are dropped too."""
    ctx.stopping = True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    tasks = []
    for proto in list(ctx.active):
        proto.shutdown()
        if proto._task is not None and not proto._task.done():
            tasks.append(proto._task)
    if tasks:
        await asyncio.wait(tasks, timeout=grace)
    for proto in list(ctx.active):       # still making an answer: out of time
        if proto._task is not None and not proto._task.done():
            _drop(proto)
    deadline = max(deadline, loop.time() + drain)
    while ctx.active and loop.time() < deadline:   # the last replies on their way out
        await asyncio.sleep(0.02)
    for proto in list(ctx.active):
        _drop(proto)


async def drain_sessions(ctx: ListenerContext, timeout: float,
                         poll: float = DRAIN_POLL) -> None:
    """Let the sessions of ``ctx`` (the listeners are closed already) finish the mail
    transactions they are in, for up to ``timeout`` seconds, then stop what is left
    (:func:`close_sessions`). Sessions outside a transaction are told ``421 4.3.2`` at once,
    and every session once its transaction has ended."""
    ctx.draining = True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    for proto in list(ctx.active):
        proto.drain()
    while ctx.active and loop.time() < deadline:
        await asyncio.sleep(poll)
    await close_sessions(ctx)


def _drop(proto: SMTPServerProtocol) -> None:
    if proto.transport is not None:
        proto.transport.abort()
    if proto._task is not None and not proto._task.done():
        proto._task.cancel()
