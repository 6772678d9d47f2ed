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

from pymta.config.model import Config, ListenAddress
from pymta.queue.manager import QueueManager
from pymta.queue.retry import RetryPolicy
from pymta.queue.store import QueueStore
from pymta.session import ReceiveContext
from pymta.smtp.engine import EngineConfig
from pymta.smtp.server import ListenerContext, SMTPServerProtocol
from pymta.tls import server_ssl_context
from pymta.types import Address, Recipient, RecipientLookup, Router

log = logging.getLogger("pymta")


def _default_lookups(config: Config) -> list[RecipientLookup]:
    from pymta.backends.table import TableLookup

    return [TableLookup.from_config(config.mail_domain, config.mail_boxes, config.mail_aliases)]


def _default_router(config: Config) -> Router:
    from pymta.delivery.local import LocalDeliveryAgent
    from pymta.delivery.router import StaticRouter

    return StaticRouter(LocalDeliveryAgent(config.mail_dir, config.hostname))


class MTA:
    """A running mail server: listeners, queue, delivery. Start and stop it with
    ``async with`` (or ``await start()`` / ``await stop()``)."""

    def __init__(self, config: Config, *, lookups: Sequence[RecipientLookup] | None = None,
                 router: Router | None = None,
                 sockets: dict[str, list[socket.socket]] | None = None) -> None:
        """``sockets`` are listening sockets bound by a supervisor (worker processes share
        them); without them the MTA binds ``config``'s listen addresses itself."""
        self.config = config
        self._sockets = sockets
        self.lookups = list(lookups) if lookups is not None else _default_lookups(config)
        self.router = router if router is not None else _default_router(config)
        self.store = QueueStore(os.path.join(config.state_dir, "queue"))
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
        ssl_ctx = server_ssl_context(config)
        self.store.open()
        await self.store.start()
        policy = RetryPolicy(first=config.queue_retry_first, maximum=config.queue_retry_max,
                             lifetime=config.queue_lifetime)
        self.manager = QueueManager(
            self.store, self.router, policy=policy, hostname=config.hostname,
            postmaster=config.postmaster, resolve=self.resolve,
            concurrency=config.delivery_concurrency, scan_interval=config.queue_scan_interval)
        await self.manager.start()
        receive = ReceiveContext(
            hostname=config.hostname,
            local_domains=frozenset(d.lower() for d in config.mail_domain),
            first_domain=config.first_domain, lookups=self.lookups, store=self.store,
            submit=self.manager.submit, header_size_limit=config.header_size_limit,
            max_received=config.max_received_headers)
        engine_cfg = EngineConfig(
            hostname=config.hostname, size_limit=config.message_size_limit,
            max_line_length=config.max_line_length, max_recipients=config.max_recipients,
            max_errors=config.max_errors, tls_available=ssl_ctx is not None)
        self._listener = ListenerContext(
            receive=receive, engine_config=engine_cfg, ssl_context=ssl_ctx,
            idle_timeout=config.idle_timeout, max_connections=config.max_connections,
            max_per_ip=config.max_connections_per_ip)
        try:
            await self._listen("smtp", config.smtp_listen, engine_cfg, implicit_tls=False)
            if config.sasl_methods:
                if ssl_ctx is None:
                    log.warning("SASL is configured but TLS is not: submission ports disabled")
                else:
                    submission_cfg = EngineConfig(**{
                        **_fields(engine_cfg), "auth_mechanisms": ("PLAIN", "LOGIN")})
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
            for proto in list(self._listener.active):
                if proto.transport is not None:
                    proto.transport.abort()
        if self.manager is not None:
            await self.manager.stop()
            self.manager = None
        await self.store.close()

    async def resolve(self, address: str) -> Recipient | None:
        """Route a notice (DSN) recipient: local addresses through the lookups, others remote."""
        addr = Address(address)
        if addr.domain in {d.lower() for d in self.config.mail_domain}:
            for source in self.lookups:
                dest = await source.lookup(addr)
                if dest is not None:
                    target = dest.targets[0]
                    return Recipient(address=target.address, original=address,
                                     local=target.local, mailbox=target.mailbox)
            return None
        return Recipient(address=address, original=address, local=False)


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
