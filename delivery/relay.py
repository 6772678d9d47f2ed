"""The SMTP relay agent: remote recipients to the smart host or to their domain's MX hosts.

This is Postfix's ``smtp`` client (with ``relayhost``, ``smtp_sasl_*`` and ``smtp_tls_*``)
on aiosmtplib. A recipient's *destination* is the smart host (``SMTP_RELAY_HOSTAUTH``) when one
is set, else its domain; the router groups recipients by :meth:`SMTPRelayAgent.destination`,
so one call of :meth:`deliver` carries every recipient of a message for one destination
(RCPT batching, at most ``rcpt_limit`` per transaction).

Implementation summary:

- **Next hops.** ``[host]:port`` is that host; ``host:port`` (smart host without brackets)
  and a recipient domain are looked up as MX (through the server's
  :class:`pymta.dns.DNSResolver`, ``PYMTA_DNS_RESOLVER``: preference order, equal
  preferences shuffled, implicit MX, null MX → permanent). Each exchange's A/AAAA addresses
  are tried in turn; a connection failure, a timeout, a non-220 greeting, a failed STARTTLS
  under ``encrypt``, or a failed AUTH moves on to the next address. Only when every address
  failed are the recipients deferred, with the last error as the reply.
- **Dead hosts.** An address that refused or timed out is remembered for ``dead_host_time``
  seconds; while remembered it is skipped without a connection attempt ("delivery
  temporarily suspended"), so a dead MX is not hammered by every queued message.
- **TLS.** The level of a destination (``delivery.tlspolicy``: ``PYMTA_TLS_POLICY``, else
  ``SMTP_TLS_SECURITY_LEVEL``). ``none``: never STARTTLS. ``may``: STARTTLS when offered, and
  if the handshake fails, the same address again in plaintext (Postfix's fallback).
  ``encrypt``: STARTTLS is required; a server that does not offer it (or fails the
  handshake) is a failed host, and the message is never sent in cleartext. ``verify`` and
  ``secure``: as ``encrypt``, and the certificate chain must be trusted
  (``PYMTA_SMTP_TLS_CA_FILE`` or the system's roots) and name the MX host (``verify``) or
  the next-hop domain (``secure``); a failed check is a failed host with the reason. At
  ``may`` and ``encrypt`` certificates are not verified, as in Postfix.
  ``SMTP_TLS_WRAPPERMODE`` (smart host only): TLS from the first byte.
- **Connection cache and concurrency.** After a transaction the connection goes to a
  per-destination cache for ``cache_time`` seconds of idleness, at most ``reuse_limit``
  messages; a cached connection is checked with RSET before reuse. At most
  ``destination_concurrency`` connections per destination are in use at once (a semaphore).
- **Outcomes** per recipient: RCPT and end-of-DATA replies decide (2xx delivered, 4xx
  temporary, 5xx permanent, the remote reply quoted); MAIL refusal applies to all; a
  connection lost mid-transaction is temporary for everything still undecided. ``relay`` is
  ``host[ip]:port``. Hygiene (SMTPUTF8, 8BITMIME conversion, SIZE, DSN parameters) is
  ``delivery._client.prepare``; an envelope that can never be sent (``_client.screen``) is
  refused before any connection is made.
- **Every connection is closed on every error path**: an unexpected exception in a
  transaction (a bug, an encoding error) is a temporary failure of the recipients still
  undecided and the connection is closed, never cached; a cancellation (server stop) closes
  it at once. A connection nobody holds must not stay ESTABLISHED at the next hop.
- **Flush** (``flush()``, from ``pymta queue flush``) forgets every dead host, as Postfix's
  flush does: the operator says the destination is back.
- **Progress** (``reports_progress``): the outcomes of each transaction go to ``report`` as
  soon as it ends, so when a call of more than ``rcpt_limit`` recipients is cancelled by a
  stop, the transactions already made are recorded and not repeated after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiosmtplib
import dns.inet
from aiosmtplib.errors import (
    SMTPAuthenticationError,
    SMTPConnectResponseError,
    SMTPException,
    SMTPHeloError,
    SMTPResponseException,
)

from pymta.config.model import RelayHost
from pymta.dns import DNSFailure, DNSResolver
from pymta.tls import client_ssl_context
from pymta.types import Outcome, OutcomeKind, QueuedMessage, Recipient, Reply

from ._client import kind_of, outcomes, parse_reply, prepare, rcpt_options, read_body, screen
from .dane import Tlsa, matches, tlsa_name, usable
from .tlspolicy import LEVELS as TLS_LEVELS
from .tlspolicy import (
    REQUIRED,
    VERIFIED,
    certificate_problem,
    level_for,
    normalized_table,
    verifying_context,
)

log = logging.getLogger(__name__)

RCPT_LIMIT = 50          # Postfix smtp_destination_recipient_limit
REUSE_TIME_LIMIT = 300.0  # Postfix smtp_connection_reuse_time_limit


class HostFailure(Exception):
    """One address could not be used; ``reply`` says why (always temporary for the host)."""

    def __init__(self, reply: Reply, *, relay: str = "", dead: bool = False,
                 tls_failed: bool = False) -> None:
        super().__init__(str(reply))
        self.reply = reply
        self.relay = relay
        self.dead = dead
        self.tls_failed = tls_failed


@dataclass(eq=False, slots=True)
class Connection:
    """An open, greeted (and, where needed, encrypted and authenticated) SMTP session."""

    smtp: aiosmtplib.SMTP
    relay: str           # host[ip]:port
    host: str
    created: float
    uses: int = 0
    idle_since: float = 0.0
    expiry: asyncio.TimerHandle | None = field(default=None, repr=False)

    @property
    def extensions(self) -> dict[str, str]:
        return self.smtp.esmtp_extensions


class SMTPRelayAgent:
    """A :class:`~pymta.contracts.DeliveryAgent` for remote recipients (module docstring)."""

    reports_progress = True     # deliver() takes report=

    def __init__(self, *, hostname: str, smart_host: RelayHost | None = None,
                 tls_level: str = "may", wrappermode: bool = False, mx_port: int = 25,
                 destination_concurrency: int = 20, connect_timeout: float = 30.0,
                 timeout: float = 300.0, cache_time: float = 2.0, reuse_limit: int = 100,
                 dead_host_time: float = 60.0, rcpt_limit: int = RCPT_LIMIT,
                 clock: Callable[[], float] = time.monotonic,
                 resolver: DNSResolver | None = None,
                 tls_policy: Mapping[str, str] | None = None, ca_file: str = "") -> None:
        """``resolver``: the server's DNS (the wiring passes it); None: a system resolver
        of this agent's own. ``tls_policy``: levels by next-hop domain (``.parent`` covers
        the hosts under it); ``ca_file``: the roots of ``verify``/``secure`` (empty: the
        system's)."""
        policy = dict(tls_policy or {})
        for level in (tls_level, *policy.values()):
            if level not in TLS_LEVELS:
                raise ValueError(f"unknown TLS security level {level!r}")
        self.hostname = hostname
        self.smart_host = smart_host
        self.tls_level = tls_level
        self.tls_policy = normalized_table(policy)
        self.ca_file = ca_file
        self._verifying: ssl.SSLContext | None = None   # made when a level first needs it
        self.wrappermode = wrappermode and smart_host is not None
        self.mx_port = mx_port
        self.destination_concurrency = destination_concurrency
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.cache_time = cache_time
        self.reuse_limit = reuse_limit
        self.dead_host_time = dead_host_time
        self.rcpt_limit = max(1, rcpt_limit)
        self._clock = clock
        self.resolver = resolver if resolver is not None else DNSResolver()
        self._tls = client_ssl_context()   # Postfix may/encrypt: no certificate checks
        self._sems: dict[str, asyncio.Semaphore] = {}
        self._idle: dict[str, list[Connection]] = {}
        self._dead: dict[tuple[str, int], tuple[float, Reply]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self.connections_opened = 0   # counters for tests and metrics

    @classmethod
    def from_config(cls, config: Any, *, resolver: DNSResolver | None = None
                    ) -> SMTPRelayAgent:
        """The relay of a server: ``SMTP_RELAY_HOSTAUTH`` (or MX), ``SMTP_TLS_*``,
        ``PYMTA_MX_PORT`` and the connection settings (all checked by ``load_config``)."""
        return cls(
            hostname=config.hostname, smart_host=config.smtp_relay,
            tls_level=config.smtp_tls_security_level, wrappermode=config.smtp_tls_wrappermode,
            mx_port=config.mx_port, destination_concurrency=config.destination_concurrency,
            connect_timeout=config.smtp_connect_timeout, timeout=config.smtp_timeout,
            cache_time=config.connection_cache_time, reuse_limit=config.connection_reuse_limit,
            dead_host_time=config.dead_host_time, resolver=resolver,
            tls_policy=dict(entry.split("=", 1) for entry in config.tls_policy),
            ca_file=config.smtp_tls_ca_file)

    # ------------------------------------------------------------------ routing

    def destination(self, rcpt: Recipient) -> str:
        """The router key: one per smart host, else one per recipient domain."""
        if self.smart_host is not None:
            return f"relay:{self._smart_name()}"
        domain = rcpt.address.rpartition("@")[2].lower()
        return f"smtp:{domain}"

    def _smart_name(self) -> str:
        sh = self.smart_host
        assert sh is not None
        return f"{sh.host if sh.mx_lookup else '[' + sh.host + ']'}:{sh.port}"

    # ------------------------------------------------------------------ delivery

    def flush(self) -> None:
        """Forget every dead host (``pymta queue flush``: the operator says they are back)."""
        self._dead.clear()

    async def deliver(self, msg: QueuedMessage, rcpts: Sequence[Recipient],
                      report: Callable[[Outcome], None] | None = None) -> list[Outcome]:
        """One outcome per recipient; a transaction's also go to ``report`` when it ends."""
        results, sendable = screen(msg, rcpts, "none")
        if not sendable:
            return results
        groups: dict[str, list[Recipient]] = {}
        for r in sendable:
            groups.setdefault(self.destination(r), []).append(r)
        data = await asyncio.to_thread(read_body, msg)
        for dest, group in groups.items():
            results.extend(await self._deliver_destination(dest, msg, group, data, report))
        return results

    async def _deliver_destination(self, dest: str, msg: QueuedMessage,
                                   rcpts: list[Recipient], data: bytes,
                                   report: Callable[[Outcome], None] | None = None,
                                   ) -> list[Outcome]:
        sem = self._sems.setdefault(dest, asyncio.Semaphore(self.destination_concurrency))
        async with sem:
            try:
                conn = await self._get_connection(dest, rcpts[0])
            except HostFailure as failure:
                relay = failure.relay or dest.partition(":")[2]
                return outcomes(rcpts, failure.reply, relay,
                                OutcomeKind.PERMANENT if failure.reply.is_permanent
                                else OutcomeKind.TEMPORARY)
            results: list[Outcome] = []
            reusable = True
            try:
                for i in range(0, len(rcpts), self.rcpt_limit):
                    batch = rcpts[i:i + self.rcpt_limit]
                    if not reusable:
                        results.extend(outcomes(batch, Reply(451, "4.4.2", f"lost connection "
                                                             f"with {conn.relay}"),
                                                conn.relay, OutcomeKind.TEMPORARY))
                        continue
                    batch_out, reusable = await self._transaction(conn, msg, batch, data)
                    results.extend(batch_out)
                    if report is not None:
                        for outcome in batch_out:
                            report(outcome)
            except BaseException:
                _close_now(conn)    # cancelled (server stop) or a bug: never leave it open
                raise
            if reusable:
                self._release(dest, conn)
            else:
                self._discard(conn)
            return results

    async def _transaction(self, conn: Connection, msg: QueuedMessage,
                           rcpts: list[Recipient], data: bytes,
                           ) -> tuple[list[Outcome], bool]:
        """One MAIL/RCPT.../DATA exchange; (outcomes, connection still usable)."""
        smtp, relay = conn.smtp, conn.relay
        ext = conn.extensions
        prepared = prepare(msg, rcpts, data, ext, conn.host)
        if prepared.refusal is not None:
            return outcomes(rcpts, prepared.refusal, relay), True
        encoding = "utf-8" if prepared.smtputf8 else "ascii"
        decided: dict[int, Outcome] = {}
        accepted: list[int] = []
        stage = "MAIL FROM"
        try:
            conn.uses += 1
            try:
                await smtp.mail(msg.envelope.sender, options=prepared.mail_options,
                                encoding=encoding)
            except SMTPResponseException as exc:
                reply = parse_reply(exc.code, exc.message)
                with contextlib.suppress(SMTPException, OSError):
                    await smtp.rset()
                return outcomes(rcpts, reply, relay), smtp.is_connected
            stage = "RCPT TO"
            notified: set[int] = set()      # NOTIFY given to the peer: its notices now
            for i, r in enumerate(rcpts):
                options = rcpt_options(r, ext, prepared.smtputf8)
                if any(o.startswith("NOTIFY=") for o in options):
                    notified.add(i)
                try:
                    await smtp.rcpt(r.address, options=options, encoding=encoding)
                    accepted.append(i)
                except SMTPResponseException as exc:
                    reply = parse_reply(exc.code, exc.message)
                    decided[i] = Outcome(r.address, kind_of(reply), reply, relay)
            if not accepted:
                await smtp.rset()
                return [decided[i] for i in range(len(rcpts))], True
            stage = "end of DATA"
            try:
                response = await smtp.data(prepared.data)
                reply = parse_reply(response.code, response.message)
            except SMTPResponseException as exc:
                reply = parse_reply(exc.code, exc.message)
            for i in accepted:
                decided[i] = Outcome(rcpts[i].address, kind_of(reply), reply, relay,
                                     dsn_passed=i in notified and 200 <= reply.code < 300)
            return [decided[i] for i in range(len(rcpts))], smtp.is_connected
        except (SMTPException, OSError, TimeoutError) as exc:
            what = "timeout" if isinstance(exc, TimeoutError) else "lost connection"
            reply = Reply(451, "4.4.2", f"{what} with {relay} while sending {stage}")
            log.info("%s: %s (%s)", msg.qid, reply.text, exc)
        except Exception:
            # Our bug, or a value the client library cannot encode: the session is in an
            # unknown state, so it is closed; what is still undecided is tried again later.
            log.exception("%s: error while sending %s to %s", msg.qid, stage, relay)
            reply = Reply(451, "4.3.0", f"local error while sending {stage} to {relay}")
        for i, r in enumerate(rcpts):
            decided.setdefault(i, Outcome(r.address, OutcomeKind.TEMPORARY, reply, relay))
        return [decided[i] for i in range(len(rcpts))], False

    # ------------------------------------------------------------------ connections

    async def _get_connection(self, dest: str, sample: Recipient) -> Connection:
        """A cached connection for ``dest`` if one is alive, else a new one (HostFailure)."""
        idle = self._idle.get(dest)
        now = self._clock()
        while idle:
            conn = idle.pop()
            if conn.expiry is not None:
                conn.expiry.cancel()
            if (conn.smtp.is_connected and conn.uses < self.reuse_limit
                    and now - conn.created < REUSE_TIME_LIMIT):
                try:  # the peer may have closed an idle session: check before use
                    await conn.smtp.rset()
                    return conn
                except (SMTPException, OSError, TimeoutError):
                    pass
                except BaseException:
                    _close_now(conn)
                    raise
            self._discard(conn)
        return await self._connect_destination(dest, sample)

    def _release(self, dest: str, conn: Connection) -> None:
        if (self.cache_time <= 0 or conn.uses >= self.reuse_limit
                or not conn.smtp.is_connected):
            self._discard(conn)
            return
        conn.idle_since = self._clock()
        self._idle.setdefault(dest, []).append(conn)
        loop = asyncio.get_running_loop()
        conn.expiry = loop.call_later(self.cache_time, self._expire, dest, conn)

    def _expire(self, dest: str, conn: Connection) -> None:
        idle = self._idle.get(dest)
        if idle and conn in idle:
            idle.remove(conn)
            self._discard(conn)

    def _discard(self, conn: Connection) -> None:
        """QUIT politely in the background; close for sure."""
        if conn.expiry is not None:
            conn.expiry.cancel()
            conn.expiry = None

        async def quit_() -> None:
            try:
                if conn.smtp.is_connected:
                    await asyncio.wait_for(conn.smtp.quit(), 5.0)
            except (SMTPException, OSError, TimeoutError):
                pass
            finally:
                conn.smtp.close()

        task = asyncio.get_running_loop().create_task(quit_())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def aclose(self) -> None:
        """Close every cached connection (on server stop)."""
        for idle in self._idle.values():
            for conn in idle:
                self._discard(conn)
        self._idle.clear()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    def _hops(self, dest: str, sample: Recipient) -> tuple[str, int, bool]:
        """(name, port, look up MX?) of the destination."""
        if self.smart_host is not None:
            sh = self.smart_host
            return sh.host, sh.port, sh.mx_lookup
        return sample.address.rpartition("@")[2].lower(), self.mx_port, True

    async def _connect_destination(self, dest: str, sample: Recipient) -> Connection:
        name, port, mx = self._hops(dest, sample)
        try:
            found = await self.resolver.mx_hosts(name) if mx else None
        except DNSFailure as failure:
            raise _dns_failure(failure, name) from None
        hosts = list(found.hosts) if found is not None else [name]
        names_trusted = found.secure if found is not None else True
        level = level_for(name, self.tls_level, self.tls_policy)
        last: HostFailure | None = None
        for host in hosts:
            try:
                ips = await self.resolver.addresses(host)
                host_level, tlsa = ((await self._dane(host, port, names_trusted))
                                    if level == "dane" else (level, ()))
            except DNSFailure as failure:
                last = HostFailure(Reply(451, "4.4.3", failure.text), relay=host)
                continue
            except HostFailure as failure:
                last = failure
                log.info("%s: %s", host, failure.reply.text)
                continue
            for ip in ips:
                relay = f"{host}[{ip}]:{port}"
                remembered = self._is_dead(ip, port)
                if remembered is not None:
                    last = HostFailure(Reply(451, remembered.enhanced,
                                             f"delivery temporarily suspended: "
                                             f"{remembered.text}"), relay=relay)
                    continue
                try:
                    return await self._open(host, ip, port, relay, host_level, name, tlsa)
                except HostFailure as failure:
                    if failure.tls_failed and host_level == "may":
                        try:
                            return await self._open(host, ip, port, relay, "none", name)
                        except HostFailure as again:
                            failure = again
                    if failure.dead:
                        self._mark_dead(ip, port, failure.reply)
                    failure.relay = relay
                    last = failure
                    log.info("%s: %s", relay, failure.reply.text)
        if last is None:
            last = HostFailure(Reply(451, "4.4.4", f"no usable address for {name}"))
        raise last

    async def _dane(self, host: str, port: int, name_trusted: bool,
                    ) -> tuple[str, tuple[Tlsa, ...]]:
        """The level of ``host`` at ``dane`` (``delivery.dane``): ``dane`` with its usable
        TLSA records, ``encrypt`` for a secure set none of which is usable, ``may`` without
        secure records (or when the host's name came from an unauthenticated MX answer).
        A TLSA lookup that fails is a failed host (HostFailure), never a downgrade."""
        if (not name_trusted or dns.inet.is_address(host)
                or not await self._address_secure(host)):
            return "may", ()
        qname = tlsa_name(host, port)
        try:
            rdata, secure = await self.resolver.authenticated(qname, "TLSA")
        except DNSFailure as failure:
            if failure.permanent:       # NXDOMAIN: no TLSA records there
                return "may", ()
            raise HostFailure(Reply(451, "4.7.5", f"TLSA lookup error for {host}:{port}: "
                                    f"{failure.text}"), relay=host) from None
        if not secure or not rdata:
            return "may", ()
        records = tuple(Tlsa(int(r.usage), int(r.selector), int(r.mtype), bytes(r.cert))
                        for r in rdata)
        if not usable(records):
            return "encrypt", ()
        return "dane", records

    async def _address_secure(self, host: str) -> bool:
        """Are ``host``'s address records authenticated (DNSSEC)? Only then is its TLSA
        answer worth asking for (RFC 7672 §2.2.2; Postfix does the same)."""
        for rdtype in ("A", "AAAA"):
            try:
                rdata, secure = await self.resolver.authenticated(host, rdtype)
            except DNSFailure:
                return False
            if rdata:
                return secure
        return False

    def _is_dead(self, ip: str, port: int) -> Reply | None:
        entry = self._dead.get((ip, port))
        if entry is None:
            return None
        until, reply = entry
        if until <= self._clock():
            del self._dead[(ip, port)]
            return None
        return reply

    def _mark_dead(self, ip: str, port: int, reply: Reply) -> None:
        if self.dead_host_time > 0:
            self._dead[(ip, port)] = (self._clock() + self.dead_host_time, reply)

    def _context(self, level: str, relay: str) -> ssl.SSLContext:
        """The client TLS context of ``level``: verifying at ``verify``/``secure``. A CA
        file that cannot be loaded (changed since the start) fails the host, with why."""
        if level not in VERIFIED:
            return self._tls
        if self._verifying is None:
            try:
                self._verifying = verifying_context(self.ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise HostFailure(Reply(451, "4.7.5", f"cannot verify {relay}: trusted "
                                        f"roots not loaded from {self.ca_file or 'system'}: "
                                        f"{exc}"), relay=relay) from None
        return self._verifying

    async def _tcp(self, ip: str, port: int) -> socket.socket:
        """A connected socket to ``ip``: wrapper mode connects by itself so that the TLS
        handshake can name the host (SNI), which aiosmtplib would set to the address."""
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (ip, port)),
                                   self.connect_timeout)
        except BaseException:
            sock.close()
            raise
        return sock

    async def _open(self, host: str, ip: str, port: int, relay: str, level: str,
                    nexthop: str, tlsa: Sequence[Tlsa] = ()) -> Connection:
        """A greeted session with ``host`` at ``ip``, at TLS ``level`` (HostFailure)."""
        context = self._context(level, relay)
        sock: socket.socket | None = None
        smtp: aiosmtplib.SMTP | None = None
        try:
            if self.wrappermode:
                sock = await self._tcp(ip, port)
            smtp = aiosmtplib.SMTP(hostname=host if sock is not None else ip,
                                   port=None if sock is not None else port, sock=sock,
                                   local_hostname=self.hostname, timeout=self.timeout,
                                   use_tls=self.wrappermode, start_tls=False,
                                   validate_certs=False, tls_context=context)
            await smtp.connect(timeout=self.connect_timeout)
        except BaseException as exc:
            # whatever happened, no half-open socket stays behind
            if smtp is not None:
                smtp.close()
            if sock is not None:
                sock.close()
            if not isinstance(exc, Exception):
                raise
            if isinstance(exc.__cause__, ssl.SSLCertVerificationError):
                raise _untrusted(exc.__cause__, relay) from None
            if isinstance(exc, ssl.SSLCertVerificationError):
                raise _untrusted(exc, relay) from None
            raise self._connect_failure(exc, relay) from None
        self.connections_opened += 1
        try:
            await self._ehlo(smtp)
            await self._secure(smtp, level, context, host, relay, nexthop, tlsa)
            sh = self.smart_host
            if sh is not None and sh.username:
                await self._auth(smtp, sh, relay)
        except HostFailure:
            smtp.close()
            raise
        except (SMTPException, OSError, TimeoutError) as exc:
            smtp.close()
            raise HostFailure(Reply(451, "4.4.2", f"lost connection with {relay} during "
                                    f"session set-up: {exc}")) from None
        except Exception as exc:
            smtp.close()
            log.exception("error during session set-up with %s", relay)
            raise HostFailure(Reply(451, "4.3.0", f"local error during session set-up "
                                    f"with {relay}: {type(exc).__name__}")) from None
        except BaseException:
            smtp.close()
            raise
        now = self._clock()
        return Connection(smtp, relay, host, created=now, idle_since=now)

    async def _secure(self, smtp: aiosmtplib.SMTP, level: str, context: ssl.SSLContext,
                      host: str, relay: str, nexthop: str, tlsa: Sequence[Tlsa] = ()) -> None:
        """STARTTLS as ``level`` asks, then the certificate check of ``verify``/``secure``
        (HostFailure; ``tls_failed`` when a ``may`` session may go on in cleartext)."""
        if self.wrappermode:
            pass  # TLS from the first byte already
        elif level != "none" and smtp.supports_extension("starttls"):
            try:
                await smtp.starttls(tls_context=context, server_hostname=host)
            except ssl.SSLCertVerificationError as exc:
                raise _untrusted(exc, relay) from None
            except SMTPResponseException as exc:
                raise HostFailure(Reply(451, "4.7.5", f"STARTTLS refused by {relay}: "
                                        f"{parse_reply(exc.code, exc.message)}"),
                                  tls_failed=True) from None
            except (SMTPException, OSError, ssl.SSLError, TimeoutError) as exc:
                raise HostFailure(Reply(451, "4.7.5", f"Cannot start TLS: handshake "
                                        f"failure with {relay}: {exc}"),
                                  tls_failed=True) from None
            await self._ehlo(smtp)
        elif level in REQUIRED:
            raise HostFailure(Reply(451, "4.7.4", f"TLS is required, but was not "
                                    f"offered by host {relay}"))
        if level in VERIFIED:
            problem = certificate_problem(smtp.get_transport_info("peercert"), level,
                                          host, nexthop)
            if problem:
                raise HostFailure(Reply(451, "4.7.5", f"Server certificate not verified: "
                                        f"{relay}: {problem}"))
        elif level == "dane":
            ssl_object = smtp.get_transport_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            if not matches(tlsa, der):
                raise HostFailure(Reply(451, "4.7.5", f"Server certificate not trusted: "
                                        f"{relay}: no TLSA record matches its certificate"))
        _log_tls(smtp, relay, verified=level in VERIFIED or level == "dane")

    @staticmethod
    def _connect_failure(exc: Exception, relay: str) -> HostFailure:
        """The HostFailure for a connect (or greeting) that went wrong."""
        if isinstance(exc, SMTPConnectResponseError):
            reply = parse_reply(exc.code, exc.message)
            # 4xx and 5xx greetings alike: try the next host (Postfix smtp_skip_5xx_greeting)
            return HostFailure(Reply(451, "4.4.2" if reply.code < 500 else "4.3.0",
                                     f"host {relay} refused to talk to me: {reply}"))
        if not isinstance(exc, SMTPException | OSError | TimeoutError):
            log.error("connect to %s: %r", relay, exc)
            return HostFailure(Reply(451, "4.3.0", f"connect to {relay}: local error "
                                     f"({type(exc).__name__})"))
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        text = (cause.strerror if isinstance(cause, OSError) and cause.strerror
                else str(cause).strip() or type(exc).__name__)
        if isinstance(exc, TimeoutError):
            text = "Connection timed out"
        return HostFailure(Reply(451, "4.4.1", f"connect to {relay}: {text}"), dead=True)

    async def _ehlo(self, smtp: aiosmtplib.SMTP) -> None:
        try:
            await smtp.ehlo()
        except SMTPHeloError:
            await smtp.helo()

    async def _auth(self, smtp: aiosmtplib.SMTP, sh: RelayHost, relay: str) -> None:
        """AUTH PLAIN, else LOGIN. A refusal is a failed host (deferred), never a bounce: a
        wrong password is the sender's administrator's problem, not the recipient's."""
        offered = [m.lower() for m in smtp.server_auth_methods]
        methods = [m for m in ("plain", "login") if m in offered]
        if not methods:
            raise HostFailure(Reply(451, "4.7.0", f"SASL authentication failed: server "
                                    f"{relay} offered no compatible authentication "
                                    f"mechanisms for this type of connection security"))
        last: SMTPAuthenticationError | None = None
        for method in methods:
            try:
                await getattr(smtp, f"auth_{method}")(sh.username, sh.password)
                return
            except SMTPAuthenticationError as exc:
                last = exc
        assert last is not None
        reply = parse_reply(last.code, last.message)
        raise HostFailure(Reply(451, "4.7.0", f"SASL authentication failed; server "
                                f"{relay} said: {reply}"))


def _log_tls(smtp: aiosmtplib.SMTP, relay: str, *, verified: bool) -> None:
    """Postfix's line for an encrypted session, which operators and log tools look for:
    ``Verified TLS connection established to mx[ip]:25: TLSv1.3 with cipher
    TLS_AES_256_GCM_SHA384 (256/256 bits)``; ``Untrusted`` when the certificate was not
    checked (``may``, ``encrypt``). Nothing for a cleartext session."""
    ssl_object = smtp.get_transport_info("ssl_object") if smtp.is_connected else None
    if ssl_object is None:
        return
    cipher = ssl_object.cipher()
    what = (f"{ssl_object.version()} with cipher {cipher[0]} ({cipher[2]}/{cipher[2]} bits)"
            if cipher else str(ssl_object.version()))
    log.info("%s TLS connection established to %s: %s",
             "Verified" if verified else "Untrusted", relay, what)


def _close_now(conn: Connection) -> None:
    """Close at once, without QUIT: the session is in an unknown state (or we are stopping)."""
    if conn.expiry is not None:
        conn.expiry.cancel()
        conn.expiry = None
    with contextlib.suppress(Exception):
        conn.smtp.close()


def _untrusted(exc: ssl.SSLCertVerificationError, relay: str) -> HostFailure:
    """A chain that does not verify at ``verify``/``secure``: the host failed (no cleartext
    fallback at these levels)."""
    why = exc.verify_message or str(exc)
    return HostFailure(Reply(451, "4.7.5", f"Server certificate not trusted: {relay}: {why}"))


def _dns_failure(failure: DNSFailure, name: str) -> HostFailure:
    if failure.permanent:
        code, enhanced = (556, "5.1.10") if "nullMX" in failure.text else (550, "5.4.4")
        return HostFailure(Reply(code, enhanced, failure.text), relay=name)
    return HostFailure(Reply(451, "4.4.3", failure.text), relay=name)
