"""``pymta.MTA``: one mail server, usable inside any asyncio program, and ``serve`` for the CLI.

This is the only place that wires adapters into the core: it builds the recipient lookups,
the delivery router, the queue store and manager, the TLS context and the listeners from a
``Config``. The core modules never import ``pymta.backends`` or ``pymta.delivery`` by name.

Library use::

    async with pymta.MTA(config) as mta:
        print(mta.addresses["smtp"])      # [(host, port), ...], real ports when 0 was asked
        await asyncio.Event().wait()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pymta.auth import AuthPolicy, AuthThrottle
from pymta.config.model import Config, ListenAddress
from pymta.contracts import (
    Authenticator,
    Closeable,
    DeliveryAgent,
    RecipientLookup,
    Router,
    StoppableAgent,
)
from pymta.pipeline import Check, Modifier, Pipeline
from pymta.queue.intake import Intake
from pymta.queue.manager import QueueManager
from pymta.queue.retry import RetryPolicy
from pymta.queue.store import QueueStore
from pymta.session import ReceiveContext, network_matcher
from pymta.smtp.engine import EngineConfig
from pymta.smtp.server import (
    ConnectionRateLimit,
    ListenerContext,
    SMTPServerProtocol,
    close_sessions,
)
from pymta.srs import SRS
from pymta.srs import from_config as srs_from_config
from pymta.tls import server_ssl_context
from pymta.types import Address, Recipient, SMTPError, TemporaryFailure

if TYPE_CHECKING:
    from pymta.pipeline.dkimkeys import KeyStore

log = logging.getLogger("pymta")


def _default_lookups(config: Config) -> list[RecipientLookup]:
    """The table from ``MAIL_BOXES``/``MAIL_ALIASES``, then LDAP and MySQL when configured,
    behind one caching :class:`LookupChain` (aliases resolve across sources); ``REGEX_ALIAS``
    rewrites in front of it. The table alone needs no chain (it is a precomputed dict)."""
    from pymta.backends.table import TableLookup

    others: list[RecipientLookup] = []
    if config.ldap_host:
        from pymta.backends.ldap import LdapLookup

        others.append(LdapLookup.from_config(config))
    if config.mysql_host:
        from pymta.backends.mysql import MysqlLookup

        others.append(MysqlLookup.from_config(config))
    table = TableLookup.from_config(config.mail_domain, config.mail_boxes, config.mail_aliases,
                                    other_sources=bool(others))
    if not others and not config.regex_alias:
        return [table]
    from pymta.backends.chain import LookupChain

    lookup: RecipientLookup = LookupChain(
        [table, *others], config.mail_domain, ttl=config.lookup_cache_ttl,
        negative_ttl=config.lookup_negative_ttl)
    if config.regex_alias:
        from pymta.backends.regex import RegexRewrite

        lookup = RegexRewrite.from_config(config.regex_alias, lookup, config.mail_domain)
    return [lookup]


def _default_authenticator(config: Config) -> Authenticator | None:
    """The SASL methods the variables activate, tried in order; None when there are none."""
    if not config.sasl_methods:
        return None
    from pymta.backends.authchain import build_authenticator

    return build_authenticator(config)


def _default_router(config: Config) -> Router:
    """Local recipients to maildir/mbox, or to LMTP when ``VIRTUAL_TRANSPORT`` is set; remote
    recipients to the smart host (``SMTP_RELAY_HOSTAUTH``) or else their domain's MX."""
    from pymta.delivery.local import LocalDeliveryAgent
    from pymta.delivery.relay import SMTPRelayAgent
    from pymta.delivery.router import StaticRouter

    local: DeliveryAgent
    if config.virtual_transport:
        from pymta.delivery.lmtp import LMTPDeliveryAgent

        local = LMTPDeliveryAgent(config.virtual_transport, config.hostname,
                                  connect_timeout=config.smtp_connect_timeout,
                                  timeout=config.smtp_timeout)
        local_key = "lmtp"
    else:
        local = LocalDeliveryAgent(config.mail_dir, config.hostname)
        local_key = "local"
    relay = SMTPRelayAgent(
        hostname=config.hostname, smart_host=config.smtp_relay,
        tls_level=config.smtp_tls_security_level, wrappermode=config.smtp_tls_wrappermode,
        mx_port=config.mx_port, destination_concurrency=config.destination_concurrency,
        connect_timeout=config.smtp_connect_timeout, timeout=config.smtp_timeout,
        cache_time=config.connection_cache_time, reuse_limit=config.connection_reuse_limit,
        dead_host_time=config.dead_host_time)
    return StaticRouter(local, relay, local_key=local_key, remote_key=relay.destination)


def _dkim_keys(config: Config) -> KeyStore | None:
    """The DKIM/ARC signing keys (DKIM_PRIVATEKEY or the state dir's key files), when
    signing or sealing is on."""
    if not (config.dkim_sign or config.arc):
        return None
    from pymta.pipeline.dkimkeys import KeyStore

    return KeyStore.from_config(config)


def _default_pipeline(config: Config, srs: SRS | None = None,
                      dkim_keys: KeyStore | None = None) -> Pipeline:
    """The pre-queue checks and modifiers configured; stages are added in their order of
    dependence (SPF and DKIM before DMARC; Authentication-Results after the checks; signing
    last, over the final header block; SRS after all, so they see the sender as given).
    ``srs`` is the server's codec (shared with its reverse lookup); None: from ``config``."""
    checks: list[Check] = []
    modifiers: list[Modifier] = []
    # 1. SPF (inbound, untrusted clients): records spf_result for DMARC
    if config.spf_check:
        from pymta.pipeline.spf import SPFCheck

        checks.append(SPFCheck(receiver=config.hostname, reject_fail=config.spf_reject_fail,
                               timeout=max(1.0, min(20.0, config.pipeline_timeout - 1.0))))
    # 2. DKIM verify (between SPF and DMARC): fills txn.results["dkim_signatures"] (list of
    #    pymta.pipeline.dmarc.DkimSignatureResult); ARC chain validation after it
    if config.dkim_verify:
        from pymta.pipeline.dkimverify import DkimVerify

        checks.append(DkimVerify())
    if config.arc:
        from pymta.pipeline.arc import ArcVerify

        checks.append(ArcVerify())
    # 3. DMARC: reads spf_result and dkim_signatures
    if config.dmarc_check:
        from pymta.pipeline.dmarc import DMARCCheck

        checks.append(DMARCCheck(enforce=config.dmarc_enforce))
    # Authentication-Results: after every check, before any signing/sealing modifier
    from pymta.pipeline.authresults import AuthResultsModifier

    modifiers.append(AuthResultsModifier(config.authserv_id or config.hostname))
    # ARC seal (forwarded mail) above the A-R it attests, then DKIM signing: top-most field,
    # over the final header block (pymta/pipeline/arc.py explains the order)
    keys = dkim_keys if dkim_keys is not None else _dkim_keys(config)
    if config.arc and keys is not None:
        from pymta.pipeline.arc import ArcSeal

        modifiers.append(ArcSeal(keys, config.first_domain,
                                 config.authserv_id or config.hostname))
    if config.dkim_sign and keys is not None:
        from pymta.pipeline.dkimsign import DkimSign

        modifiers.append(DkimSign(keys, config.first_domain))
    srs = srs if srs is not None else srs_from_config(config)
    if srs is not None:  # keep last: it changes the envelope sender
        from pymta.pipeline.srs import SRSRewrite

        modifiers.append(SRSRewrite(srs))
    return Pipeline(checks, modifiers, timeout=config.pipeline_timeout)


class MTA:
    """A running mail server: listeners, queue, delivery. Start and stop it with
    ``async with`` (or ``await start()`` / ``await stop()``)."""

    def __init__(self, config: Config, *, lookups: Sequence[RecipientLookup] | None = None,
                 router: Router | None = None,
                 sockets: dict[str, list[socket.socket]] | None = None,
                 authenticator: Authenticator | None = None,
                 pipeline: Pipeline | None = None) -> None:
        """``sockets`` are listening sockets bound by a supervisor (worker processes share
        them); without them the MTA binds ``config``'s listen addresses itself."""
        self.config = config
        self._sockets = sockets
        # SRS (SRS_ENABLE): the forward rewrite is a pipeline stage, the reverse a lookup in
        # front of the others; the SRS domain is one we accept mail for
        self.srs = srs_from_config(config)
        self.local_domains = frozenset(d.lower() for d in config.mail_domain) | (
            {self.srs.domain} if self.srs is not None else frozenset())
        self.lookups = list(lookups) if lookups is not None else _default_lookups(config)
        if self.srs is not None:
            from pymta.backends.srs import SRSLookup

            self.lookups.insert(0, SRSLookup(self.srs, self.local_domains, list(self.lookups)))
        self.router = router if router is not None else _default_router(config)
        # AUTH on the submission ports; None (no SASL method configured): no ports 587/465
        self.authenticator = (authenticator if authenticator is not None
                              else _default_authenticator(config))
        # The AUTH policy: one check under PYMTA_PIPELINE_TIMEOUT, 535s delayed per address
        self.auth = (AuthPolicy(self.authenticator,
                                throttle=AuthThrottle(config.auth_fail_delay,
                                                      config.auth_fail_delay_max),
                                timeout=config.pipeline_timeout)
                     if self.authenticator is not None else None)
        self.dkim_keys = _dkim_keys(config)
        self.pipeline = (pipeline if pipeline is not None
                         else _default_pipeline(config, srs=self.srs,
                                                dkim_keys=self.dkim_keys))
        # The server's hot path: delivery takes over the lock of a message just queued, and
        # empty spool files are made ahead of time off the event loop.
        self.store = QueueStore(os.path.join(config.state_dir, "queue"), hand_over_locks=True,
                                prealloc=32)
        self.manager: QueueManager | None = None
        self.addresses: dict[str, list[tuple[str, int]]] = {}
        self._servers: list[asyncio.base_events.Server] = []
        self._listener: ListenerContext | None = None

    async def __aenter__(self) -> MTA:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        config = self.config
        os.makedirs(config.state_dir, mode=0o700, exist_ok=True)
        from pymta import dns

        dns.configure(config.dns_resolver, config.dns_timeout)  # every lookup pymta makes
        if self.srs is not None:
            self.srs.load()  # <state dir>/srs/secret, generated at first start
        if self.dkim_keys is not None:  # DKIM keys and their TXT records, made at first start
            await asyncio.to_thread(self.dkim_keys.ensure, config.mail_domain if config.dkim_sign
                                    else (config.first_domain,))
        ssl_ctx = server_ssl_context(config)
        self.store.open()
        await self.store.start()
        policy = RetryPolicy(first=config.queue_retry_first, maximum=config.queue_retry_max,
                             lifetime=config.queue_lifetime)
        self.manager = QueueManager(
            self.store, self.router, policy=policy, hostname=config.hostname,
            postmaster=config.postmaster, resolve=self.resolve,
            concurrency=config.delivery_concurrency, scan_interval=config.queue_scan_interval,
            stop_grace=3.0, delay_warning=config.delay_warning_time)
        await self.manager.start()
        intake = Intake(self.store, self.manager.submit, hold_incoming=config.hold_incoming,
                        size_limit=config.message_size_limit, minfree=config.queue_minfree)
        receive = ReceiveContext(
            hostname=config.hostname,
            local_domains=self.local_domains, first_domain=config.first_domain,
            lookups=self.lookups, intake=intake, header_size_limit=config.header_size_limit,
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
            max_per_ip=config.max_connections_per_ip,
            rate_limit=(ConnectionRateLimit(config.connection_rate_limit)
                        if config.connection_rate_limit else None))
        try:
            await self._listen("smtp", config.smtp_listen, engine_cfg, implicit_tls=False)
            if self.auth is not None:
                if ssl_ctx is None:
                    log.warning("SASL is configured but TLS is not: submission ports disabled")
                else:
                    submission_cfg = EngineConfig(**{
                        **_fields(engine_cfg), "auth_mechanisms": self.auth.mechanisms})
                    await self._listen("submission", config.submission_listen, submission_cfg,
                                       implicit_tls=False)
                    smtps_cfg = EngineConfig(**{**_fields(submission_cfg), "tls_active": True})
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
        ssl_args: dict[str, object] = {}
        if implicit_tls:
            ssl_args = {"ssl": ctx.ssl_context,
                        "ssl_handshake_timeout": ctx.tls_handshake_timeout}

        def factory() -> SMTPServerProtocol:
            return SMTPServerProtocol(ctx, cfg, implicit_tls)

        servers = []
        if self._sockets is not None:
            for sock in self._sockets.get(kind, []):
                servers.append(await loop.create_server(factory, sock=sock, backlog=1024,
                                                        **ssl_args))
        else:
            for addr in where:
                servers.append(await loop.create_server(
                    factory, host=addr.host or None, port=addr.port, reuse_address=True,
                    backlog=1024, **ssl_args))
        for server in servers:
            self._servers.append(server)
            for sock in server.sockets:
                name = sock.getsockname()
                bound.append((str(name[0]), int(name[1])))
            log.log(25, "listening for %s on %s", kind, ", ".join(f"{h}:{p}" for h, p in bound))
        self.addresses[kind] = bound

    async def stop(self) -> None:
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
            await self.manager.stop()
            self.manager = None
        await _aclose(self.router, "the router")   # cached outbound connections
        await self.store.aclose()
        await _aclose(self.authenticator, "the authenticator")     # LDAP threads, MySQL pool
        for source in self.lookups:  # pools and threads of directory lookups
            await _aclose(source, f"lookup {source!r}")

    async def resolve(self, address: str) -> Recipient | None:
        """Route a notice (DSN) recipient: local addresses through the lookups, others remote."""
        addr = Address(address)
        if addr.domain in self.local_domains:
            for source in self.lookups:
                try:
                    dest = await source.lookup(addr)
                except SMTPError as exc:
                    if isinstance(exc, TemporaryFailure) or not exc.reply.is_permanent:
                        raise
                    return None  # e.g. an expired SRS address: nobody to notify
                if dest is not None:
                    target = dest.targets[0]
                    return Recipient(address=target.address, original=address,
                                     local=target.local, mailbox=target.mailbox)
            return None
        return Recipient(address=address, original=address, local=False)


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


def _fields(cfg: EngineConfig) -> dict[str, object]:
    return {name: getattr(cfg, name) for name in cfg.__dataclass_fields__}


def install_uvloop() -> None:
    try:
        import uvloop  # type: ignore[import-not-found]
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def serve_async(config: Config, *, sockets: dict[str, list[socket.socket]] | None = None,
                      pid_file: bool = True) -> int:
    """Run one server process until SIGTERM/SIGINT. A worker under the supervisor gets its
    listening sockets from it and leaves the pid file to the supervisor."""
    mta = MTA(config, sockets=sockets)
    try:
        await mta.start()
    except OSError as exc:
        log.error("cannot listen: %s", exc)
        return 1
    pid_path = os.path.join(config.state_dir, "pymta.pid")
    if pid_file:
        with open(pid_path, "w") as f:
            f.write(f"{os.getpid()}\n")
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    loop.add_signal_handler(signal.SIGINT, stopping.set)
    loop.add_signal_handler(signal.SIGUSR1, lambda: mta.manager and mta.manager.wake())
    log.log(25, "pymta started on %s (pid %d)", socket.gethostname(), os.getpid())
    try:
        await stopping.wait()
    finally:
        log.log(25, "pymta stopping")
        await mta.stop()
        if pid_file:
            with contextlib.suppress(OSError):
                os.unlink(pid_path)
    return 0


def serve(config: Config) -> int:
    """Run a server until SIGTERM/SIGINT; the exit status for the CLI."""
    from pymta.log import setup_logging

    setup_logging(config)
    if config.workers > 1:
        from pymta.workers import Supervisor

        return Supervisor(config).run()
    install_uvloop()
    return asyncio.run(serve_async(config))
