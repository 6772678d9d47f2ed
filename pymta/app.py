"""``pymta.MTA``: one mail server, usable inside any asyncio program, and ``serve_async``, one
server process until a signal (``pymta serve`` is :mod:`pymta.daemon`).

An ``MTA`` assembles a server from a ``Config``: the adapters the configuration names (built
by ``pymta.wiring``, the one place that knows adapters by name), the queue store and manager,
the TLS context and the listeners. Each ``MTA`` owns everything it uses (its DNS resolver,
its settings, its lookups and agents): several can run in one program.

Library use::

    async with pymta.MTA(config) as mta:
        print(mta.addresses["smtp"])      # [(host, port), ...], real ports when 0 was asked
        await asyncio.Event().wait()

An application can give its own parts instead of the configured ones: ``lookups`` (its
recipients: RecipientLookup objects, or a dict, or a function or coroutine taking the address;
see :mod:`pymta.callbacks`), ``agent`` (where local recipients' mail goes: a DeliveryAgent or
a coroutine given each message), ``router``, ``authenticator``, ``pipeline``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from pymta import wiring
from pymta.callbacks import AgentLike, LookupLike
from pymta.config.errors import ConfigError
from pymta.config.model import Config, ListenAddress
from pymta.contracts import (
    Authenticator,
    Closeable,
    RecipientLookup,
    Router,
    StoppableAgent,
)
from pymta.log import python_level
from pymta.pipeline import Pipeline
from pymta.queue.choice import make_store, resolve
from pymta.queue.intake import Intake
from pymta.queue.manager import QueueManager
from pymta.queue.quarantine import expire_quarantine
from pymta.queue.retry import RetryPolicy
from pymta.queue.store import QueueStore
from pymta.receiving.auth import AuthPolicy, AuthThrottle
from pymta.receiving.listener import (
    ConnectionRateLimit,
    ListenerContext,
    SMTPServerProtocol,
    close_sessions,
    drain_sessions,
)
from pymta.receiving.session import ReceiveContext, network_matcher
from pymta.reload import ReloadPlan, plan
from pymta.servertls import ServerTLS
from pymta.smtp.engine import EngineConfig
from pymta.types import Address, Recipient, SMTPError, TemporaryFailure

if TYPE_CHECKING:
    from pymta.content.learn import LearnFolders

log = logging.getLogger("pymta")

DELIVERY_STOP_GRACE = 3.0
"""Seconds the delivery attempts running at a stop get to finish, at least (a drain gives them
what is left of ``PYMTA_SHUTDOWN_TIMEOUT`` when that is more); an agent call cancelled after
its peer took the message is sent again after the restart, so this is never cut short."""

QUARANTINE_EXPIRY_INTERVAL = 3600.0
"""Seconds between two quarantine expiry runs (the first one a minute after start)."""


class MTA:
    """A running mail server: listeners, queue, delivery. Start and stop it with
    ``async with`` (or ``await start()`` / ``await stop()``)."""

    def __init__(self, config: Config, *,
                 lookups: Sequence[LookupLike] | LookupLike | None = None,
                 router: Router | None = None, agent: AgentLike | None = None,
                 sockets: dict[str, list[socket.socket]] | None = None,
                 authenticator: Authenticator | None = None,
                 pipeline: Pipeline | None = None) -> None:
        """Build the server (no I/O: nothing listens, nothing is read until ``start``).
        Raises ConfigError naming the variable for a setting an adapter cannot use.

        ``lookups``: the recipient sources instead of the configured ones (``MAIL_BOXES``,
        LDAP, MySQL), in the order they are asked; each a RecipientLookup, a mapping or a
        callable (:mod:`pymta.callbacks`). They go into the same lookup chain (cache,
        aliases across sources, limits) with ``REGEX_ALIAS`` and SRS around it, as the
        configured sources would. ``agent``: delivers local recipients instead of the
        configured maildir/mbox or LMTP transport (a DeliveryAgent or a callable); remote
        recipients still go to the relay. ``router``: chooses every recipient's agent
        itself (not with ``agent``). ``sockets``: listening sockets bound by a supervisor
        (worker processes share them); without them the MTA binds ``config``'s listen
        addresses itself."""
        if router is not None and agent is not None:
            raise ValueError("give a router or a local delivery agent, not both")
        self.config = config
        self._sockets = sockets
        # What the application gave: a reload rebuilds only what was built from the config
        self._given_lookups = lookups is not None
        self._given_authenticator = authenticator is not None
        # Replaced by a reload, closed once the sessions that may still use them are done
        self._retired: list[object] = []
        # What the adapters share: this server's DNS resolver (SPF, DKIM, DMARC, MX), its
        # SRS codec (the forward rewrite is a pipeline stage, the reverse a recipient
        # lookup), its DKIM/ARC keys. No process-wide state: each MTA has its own.
        self.services = wiring.Services.from_config(config)
        self.dns = self.services.dns
        self.srs = self.services.srs
        self.dkim_keys = self.services.dkim_keys
        self.local_domains = self.services.local_domains
        # Every client's name (PTR, forward-confirmed), looked up before its greeting
        self.peer_names = self.services.peer_names
        # The one recipient lookup, asked by every session (RCPT) and for DSN recipients
        self.lookup: RecipientLookup = wiring.recipient_lookup(config, lookups,
                                                               services=self.services)
        self.router = (router if router is not None
                       else wiring.build_router(config, self.services, agent=agent))
        # AUTH on the submission ports; None (no SASL method configured): no ports 587/465
        self.authenticator = (authenticator if authenticator is not None
                              else wiring.build_authenticator(config))
        # The AUTH policy: one check under PYMTA_PIPELINE_TIMEOUT, 535s delayed per address
        self.auth = (AuthPolicy(self.authenticator,
                                throttle=AuthThrottle(config.auth_fail_delay,
                                                      config.auth_fail_delay_max),
                                timeout=config.pipeline_timeout)
                     if self.authenticator is not None else None)
        self.pipeline = (pipeline if pipeline is not None
                         else wiring.build_pipeline(config, self.services))
        # The server's hot path: delivery takes over the lock of a message just queued, and
        # empty spool files are made ahead of time off the event loop.
        # The queue (issue 14: PYMTA_QUEUE_STORE, the file layout or one SQLite database)
        queue_root = os.path.join(config.state_dir, "queue")
        self.store: QueueStore = make_store(
            queue_root, resolve(queue_root, config.queue_store), hand_over_locks=True,
            prealloc=32)
        self.manager: QueueManager | None = None
        self.addresses: dict[str, list[tuple[str, int]]] = {}
        self._servers: list[asyncio.base_events.Server] = []
        self._listener: ListenerContext | None = None
        self._jobs: list[asyncio.Task[None]] = []
        self._learner: LearnFolders | None = None
        # The server certificates (None: no TLS); swapped for new connections by a reload
        # or a new ACME_FILE (pymta/servertls.py)
        self.tls: ServerTLS | None = None

    async def __aenter__(self) -> MTA:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        config = self.config
        os.makedirs(config.state_dir, mode=0o700, exist_ok=True)
        if self.srs is not None:
            self.srs.load()  # <state dir>/srs/secret, generated at first start
        if self.dkim_keys is not None:  # DKIM keys and their TXT records, made at first start
            await asyncio.to_thread(self.dkim_keys.ensure, config.mail_domain if config.dkim_sign
                                    else (config.first_domain,))
        self.tls = await asyncio.to_thread(ServerTLS.from_config, config)
        ssl_ctx = self.tls.context if self.tls is not None else None
        self.store.open()
        await self.store.start()
        policy = RetryPolicy(first=config.queue_retry_first, maximum=config.queue_retry_max,
                             lifetime=config.queue_lifetime)
        self.manager = QueueManager(
            self.store, self.router, policy=policy, hostname=config.hostname,
            postmaster=config.postmaster, resolve=self.resolve,
            concurrency=config.delivery_concurrency, scan_interval=config.queue_scan_interval,
            stop_grace=DELIVERY_STOP_GRACE, delay_warning=config.delay_warning_time,
            signer=wiring.notice_signer(config, self.services))   # DKIM on our DSNs
        await self.manager.start()
        intake = Intake(self.store, self.manager.submit, hold_incoming=config.hold_incoming,
                        size_limit=config.message_size_limit, minfree=config.queue_minfree,
                        notify=self.manager.notify_blocked)
        receive = ReceiveContext(
            hostname=config.hostname,
            local_domains=self.local_domains, first_domain=config.first_domain,
            lookup=self.lookup, intake=intake, header_size_limit=config.header_size_limit,
            max_received=config.max_received_headers,
            relay_allowed=network_matcher(config.mynetworks), auth=self.auth,
            pipeline=self.pipeline or None, lookup_timeout=lookup_deadline(config))
        engine_cfg = EngineConfig(
            hostname=config.hostname, size_limit=config.message_size_limit,
            max_line_length=config.max_line_length, max_recipients=config.max_recipients,
            max_errors=config.max_errors, tls_available=ssl_ctx is not None)
        self._listener = ListenerContext(
            receive=receive, engine_config=engine_cfg, ssl_context=ssl_ctx,
            idle_timeout=config.idle_timeout, max_connections=config.max_connections,
            max_per_ip=config.max_connections_per_ip, peer_names=self.peer_names,
            proxy_from=(network_matcher(config.proxy_protocol_from)
                        if config.proxy_protocol_from else None),
            rate_limit=(ConnectionRateLimit(config.connection_rate_limit)
                        if config.connection_rate_limit else None))
        self._start_housekeeping()
        try:
            await self._listen("smtp", config.smtp_listen, engine_cfg, implicit_tls=False)
            if self.auth is not None:
                if ssl_ctx is None:
                    log.warning("SASL is configured but TLS is not: submission ports disabled")
                else:
                    submission_cfg = dataclasses.replace(
                        engine_cfg, auth_mechanisms=self.auth.mechanisms)
                    await self._listen("submission", config.submission_listen, submission_cfg,
                                       implicit_tls=False)
                    smtps_cfg = dataclasses.replace(submission_cfg, tls_active=True)
                    if config.proxy_protocol_from and config.submissions_listen:
                        # the TLS handshake runs before the protocol could read a header
                        log.warning("PYMTA_PROXY_PROTOCOL_FROM does not apply to the "
                                    "submissions port (implicit TLS): no PROXY header there")
                    await self._listen("submissions", config.submissions_listen, smtps_cfg,
                                       implicit_tls=True)
        except BaseException:
            await self.stop()
            raise

    async def _listen(self, kind: str, where: Sequence[ListenAddress], cfg: EngineConfig,
                      *, implicit_tls: bool) -> None:
        loop = asyncio.get_running_loop()
        ctx = self._listener
        assert ctx is not None
        bound: list[tuple[str, int]] = []
        tls: ssl.SSLContext | None = ctx.ssl_context if implicit_tls else None
        handshake = ctx.tls_handshake_timeout if implicit_tls else None

        def factory() -> SMTPServerProtocol:
            return SMTPServerProtocol(ctx, cfg, implicit_tls, kind)

        servers = []
        if self._sockets is not None:
            for sock in self._sockets.get(kind, []):
                servers.append(await loop.create_server(
                    factory, sock=sock, backlog=1024, ssl=tls, ssl_handshake_timeout=handshake))
        else:
            for addr in where:
                servers.append(await loop.create_server(
                    factory, host=addr.host or None, port=addr.port, reuse_address=True,
                    backlog=1024, ssl=tls, ssl_handshake_timeout=handshake))
        for server in servers:
            self._servers.append(server)
            for sock in server.sockets:
                name = sock.getsockname()
                bound.append((str(name[0]), int(name[1])))
            log.log(25, "listening for %s on %s", kind, ", ".join(f"{h}:{p}" for h, p in bound))
        self.addresses[kind] = bound

    def _start_housekeeping(self) -> None:
        """The server's periodic jobs: quarantine expiry (``PYMTA_QUARANTINE_LIFETIME``, each
        worker in turn: a message is removed under its claim), the learning folders
        (``KOPANO_SPAMD_LIB``, when the directory exists and a spam engine is set) and the
        look at ``ACME_FILE`` every few seconds (new certificates from Traefik)."""
        config = self.config
        if self.tls is not None:     # cheap: one stat every few seconds, when ACME applies
            self._jobs.append(asyncio.create_task(self.tls.watch_acme()))
        if config.quarantine_lifetime > 0:
            self._jobs.append(asyncio.create_task(
                _expire_quarantine_every(self.store, config.quarantine_lifetime,
                                         QUARANTINE_EXPIRY_INTERVAL)))
        from pymta.content.learn import LearnFolders, spam_client

        client = spam_client(config)
        if client is not None and os.path.isdir(config.kopano_spamd_lib):
            self._learner = LearnFolders(client, config.kopano_spamd_lib,
                                         config.learn_interval, config.message_size_limit)
            self._learner.start()

    async def stop(self, drain: float = 0.0) -> None:
        """Stop the server: nothing more is accepted; with ``drain`` > 0 the mail
        transactions under way have that many seconds to finish (``PYMTA_SHUTDOWN_TIMEOUT``),
        then every session is closed with ``421 4.3.2``; the delivery attempts running get
        what is left of ``drain`` (at least ``DELIVERY_STOP_GRACE``) to finish."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain
        for server in self._servers:
            server.close()
        if self._listener is not None and drain > 0:
            await drain_sessions(self._listener, drain)
        for job in self._jobs:
            job.cancel()
        for job in self._jobs:
            with contextlib.suppress(BaseException):
                await job
        self._jobs.clear()
        if self._learner is not None:
            await self._learner.aclose()
            self._learner = None
        for server in self._servers:
            server.close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self._servers.clear()
        if self._listener is not None:
            # answers being made (a message being committed) are sent before the 421
            await close_sessions(self._listener)
        if isinstance(self.router, StoppableAgent):
            # before the manager's grace: deliveries waiting for a mailbox lock end now with
            # a temporary failure and every outcome, instead of being cancelled unrecorded
            with contextlib.suppress(Exception):
                self.router.begin_stop()
        if self.manager is not None:
            left = deadline - loop.time()
            await self.manager.stop(max(left, DELIVERY_STOP_GRACE))
            self.manager = None
        await _aclose(self.router, "the router")   # cached outbound connections
        await self.store.aclose()
        await _aclose(self.authenticator, "the authenticator")     # LDAP threads, MySQL pool
        await _aclose(self.lookup, "the recipient lookup")  # its sources' pools and threads
        retired, self._retired = self._retired, []
        for thing in retired:
            await _aclose(thing, "a part replaced by a reload")

    async def reload(self, config: Config) -> ReloadPlan:
        """Take over what ``config`` changes that a running server can change (see
        :mod:`pymta.reload`): the new parts are all built first and swapped in together, so a
        session sees the old set or the new one. Raises ConfigError (naming the variable)
        when the new configuration is not usable; the running one then stays, whole."""
        step = plan(self.config, config, tls_running=self.tls is not None)
        new = step.config
        await asyncio.to_thread(wiring.check, new)   # reads files (a passwd file, keys)
        listener = self._listener
        receive = listener.receive if listener is not None else None
        built: list[object] = []
        try:
            lookup = self.lookup
            # built in a thread: they read files (tables, a passwd file of any size) and
            # the sessions go on meanwhile
            if not self._given_lookups:
                lookup = await asyncio.to_thread(wiring.recipient_lookup, new,
                                                 services=self.services)
                built.append(lookup)
            authenticator = self.authenticator
            if not self._given_authenticator and self.auth is not None:
                authenticator = await asyncio.to_thread(wiring.build_authenticator, new)
                built.append(authenticator)
            tls_changes = await self._reload_tls(new)
        except BaseException:
            for thing in built:
                await _aclose(thing, "a part built for a reload")
            raise
        # Every part is built: swap them in, in one step of the event loop.
        if lookup is not self.lookup:
            self._retire(self.lookup)
            self.lookup = lookup
        if authenticator is not self.authenticator and authenticator is not None:
            self._retire(self.authenticator)
            self.authenticator = authenticator
            if self.auth is not None:
                self.auth.authenticator = authenticator
        if receive is not None:
            receive.lookup = self.lookup
            receive.lookup_timeout = lookup_deadline(new)
            receive.relay_allowed = network_matcher(new.mynetworks)
        logging.getLogger().setLevel(python_level(new.syslog_level))
        self.config = new
        for line in tls_changes:
            log.log(25, "reload: %s", line)
        return step

    async def _reload_tls(self, config: Config) -> list[str]:
        """New server certificates from ``config``'s files (read again even when the
        settings did not change: the files may have); what changed, for the log. New
        connections get them, open ones keep theirs; ConfigError keeps the old ones."""
        if self.tls is None:
            return []
        return await asyncio.to_thread(self.tls.reload, config)

    def _retire(self, thing: object) -> None:
        """Close ``thing`` once the lookups and AUTH checks that may still use it are over
        (each is bounded by its deadline), or at ``stop``."""
        if not isinstance(thing, Closeable):
            return
        self._retired.append(thing)
        delay = lookup_deadline(self.config) + self.config.pipeline_timeout

        async def close_later() -> None:
            await asyncio.sleep(delay)
            if thing in self._retired:
                self._retired.remove(thing)
                await _aclose(thing, "a part replaced by a reload")

        job = asyncio.create_task(close_later())
        self._jobs.append(job)
        job.add_done_callback(self._forget_job)

    def _forget_job(self, job: asyncio.Task[None]) -> None:
        if job in self._jobs:
            self._jobs.remove(job)

    async def resolve(self, address: str) -> Recipient | None:
        """Route a notice (DSN) recipient: a local address through the server's recipient
        lookup (the one RCPT asks), others remote."""
        addr = Address(address)
        if addr.domain not in self.local_domains:
            return Recipient(address=address, original=address, local=False)
        try:
            dest = await self.lookup.lookup(addr)
        except SMTPError as exc:
            if isinstance(exc, TemporaryFailure) or not exc.reply.is_permanent:
                raise
            return None  # e.g. an expired SRS address: nobody to notify
        if dest is None:
            return None
        target = dest.targets[0]
        return Recipient(address=target.address, original=address, local=target.local,
                         mailbox=target.mailbox)


async def _aclose(thing: object, what: str) -> None:
    """Close ``thing`` if it holds resources (:class:`~pymta.contracts.Closeable`); stopping
    goes on whatever it raises."""
    if isinstance(thing, Closeable):
        try:
            await thing.aclose()
        except Exception:
            log.exception("closing %s failed", what)


def lookup_deadline(config: Config) -> float:
    """The framework's limit on one RCPT's whole lookup (every source, alias expansion):
    three times ``PYMTA_LOOKUP_TIMEOUT``, the limit of each connect and query, which is how
    long one directory lookup (connect, bind, search) may legitimately take."""
    return 3 * config.lookup_timeout


def install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def serve_async(config: Config, *, sockets: dict[str, list[socket.socket]] | None = None,
                      pid_file: bool = True,
                      reload_config: Callable[[], Config] | None = None) -> int:
    """Run one server process until SIGTERM/SIGINT. A worker under the supervisor gets its
    listening sockets from it and leaves the pid file to the supervisor.

    SIGTERM drains (``PYMTA_SHUTDOWN_TIMEOUT``, see ``MTA.stop``); SIGINT, an operator's
    Ctrl-C, stops at once. SIGHUP reloads: ``reload_config`` (default: the environment, as at
    start) gives the new configuration, and a bad one is logged and changes nothing."""
    mta = MTA(config, sockets=sockets)
    try:
        await mta.start()
    except OSError as exc:
        log.error("cannot listen: %s", exc)
        return 1
    except ConfigError as exc:    # a file that changed since the check (a certificate)
        log.error("cannot start: %s", exc)
        return 2
    pid_path = os.path.join(config.state_dir, "pymta.pid")
    if pid_file:
        with open(pid_path, "w") as f:
            f.write(f"{os.getpid()}\n")
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    drain = [config.shutdown_timeout]

    def interrupt() -> None:
        drain[0] = 0.0
        stopping.set()

    reloads = _Reloader(mta, reload_config)
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    loop.add_signal_handler(signal.SIGINT, interrupt)
    loop.add_signal_handler(signal.SIGUSR1, lambda: _wake(mta))
    loop.add_signal_handler(signal.SIGHUP, reloads.request)
    # MYHOSTNAME: the name the greeting, Received: and DSNs use
    log.log(25, "pymta started on %s (pid %d)", config.hostname, os.getpid())
    try:
        await stopping.wait()
    finally:
        log.log(25, "pymta stopping" + (f" (draining for up to {drain[0]:g}s)" if drain[0]
                                        else ""))
        # no reload may start on a server being stopped (and SIGHUP must not kill it)
        loop.add_signal_handler(signal.SIGHUP, lambda: log.warning(
            "reload ignored: the server is stopping"))
        await reloads.aclose()
        await mta.stop(drain=drain[0])
        if pid_file:
            with contextlib.suppress(OSError):
                os.unlink(pid_path)
    return 0


async def _expire_quarantine_every(store: QueueStore, lifetime: float,
                                   interval: float) -> None:
    """Remove expired quarantined messages now and then, for as long as the server runs;
    a fault is logged and the next run tries again."""
    await asyncio.sleep(min(60.0, interval))
    while True:
        try:
            gone = await expire_quarantine(store, lifetime, time.time())
            if gone:
                log.info("quarantine: %d message(s) expired", len(gone))
        except Exception:
            log.exception("quarantine expiry failed; trying again later")
        await asyncio.sleep(interval)


class _Reloader:
    """SIGHUP → one reload at a time; a signal during a reload runs one more after it (the
    files may have changed again meanwhile), never a pile of them."""

    def __init__(self, mta: MTA, load: Callable[[], Config] | None) -> None:
        self.mta = mta
        self.load = load if load is not None else load_from_environment
        self.task: asyncio.Task[None] | None = None
        self.again = False

    def request(self) -> None:
        if self.task is not None and not self.task.done():
            self.again = True
            return
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            self.again = False
            await reload_logged(self.mta, self.load)
            if not self.again:
                return

    async def aclose(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task


def load_from_environment() -> Config:
    """The configuration a SIGHUP loads when the caller gave no loader (the supervisor and a
    server process alike): the environment, as at start."""
    from pymta.config.load import load_config

    return load_config()


async def reload_logged(mta: MTA, load: Callable[[], Config]) -> None:
    """One reload with its log lines: what changed, what waits for a restart, or why the
    new configuration was refused (the running one stays)."""
    try:
        config = await asyncio.to_thread(load)
        step = await mta.reload(config)
    except ConfigError as exc:
        log.error("reload refused, the running configuration stays: %s", exc)
        return
    except Exception as exc:
        log.exception("reload failed, the running configuration stays: %s", exc)
        return
    if step.restart:
        log.warning("reload: changed, but applied only by a restart: %s",
                    ", ".join(step.restart))
    log.log(25, "reloaded: %s", ", ".join(step.changed) if step.changed
            else "no setting changed (tables, users and certificates read again)")


def _wake(mta: MTA) -> None:
    if mta.manager is not None:
        mta.manager.wake()
