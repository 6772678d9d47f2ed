"""The SMTP relay agent: remote recipients to the smart host or to their domain's MX hosts.

This is Postfix's ``smtp`` client (with ``relayhost``, ``smtp_sasl_*`` and ``smtp_tls_*``) on
the client session of ``delivery.smtpclient`` (the envelope pipelined, the body streamed from
the spool, BDAT where the peer offers CHUNKING). A recipient's *destination* is the smart host
(``SMTP_RELAY_HOSTAUTH``) when one is set, else its domain; the router groups recipients by
:meth:`SMTPRelayAgent.destination`, so one call of :meth:`deliver` carries every recipient of a
message for one destination (RCPT batching, at most ``rcpt_limit`` per transaction).

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
  temporarily suspended"), so a dead MX is not hammered by every queued message. The
  memory is the server's, shared by its worker processes (``delivery.hoststate``).
- **TLS.** The level of a destination (``delivery.tlspolicy``: ``PYMTA_TLS_POLICY``, else
  ``SMTP_TLS_SECURITY_LEVEL``). ``none``: never STARTTLS. ``may``: STARTTLS when offered, and
  if the handshake fails, the same address again in plaintext (Postfix's fallback).
  ``encrypt``: STARTTLS is required; a server that does not offer it (or fails the
  handshake) is a failed host, and the message is never sent in cleartext. ``verify`` and
  ``secure``: as ``encrypt``, and the certificate chain must be trusted
  (``PYMTA_SMTP_TLS_CA_FILE`` or the system's roots) and name the MX host (``verify``) or
  the next-hop domain (``secure``); a failed check is a failed host with the reason. At
  ``may`` and ``encrypt`` certificates are not verified, as in Postfix. ``dane``: RFC 7672
  (``delivery.dane``). MTA-STS (RFC 8461, ``delivery.mtasts``) narrows the MX hosts and
  raises the level to ``verify`` for a domain with an ``enforce`` policy.
  ``SMTP_TLS_WRAPPERMODE`` (smart host only): TLS from the first byte.
- **REQUIRETLS** (RFC 8689): a message sent with it goes only over a session whose
  certificate was verified (``verify``, or DANE) to a host that offers REQUIRETLS, reached
  through an authenticated MX answer or an ``enforce`` MTA-STS policy (or a configured
  smart host); when no host qualifies it is returned with ``5.7.30``. A message with
  ``TLS-Required: No`` (and no REQUIRETLS) is sent at ``may`` whatever the policy says.
- **Connection cache and concurrency.** After a transaction the connection goes to a
  per-destination cache for ``cache_time`` seconds of idleness, at most ``reuse_limit``
  messages; a cached connection is checked with RSET before reuse (never one that failed,
  and a REQUIRETLS message only one that qualifies). At most ``destination_concurrency``
  connections per destination are in use at once, across the server's worker processes.
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
import base64
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dns.inet

from pymta.config.model import RelayHost
from pymta.dns import DNSFailure, DNSResolver
from pymta.tls import client_ssl_context
from pymta.types import Outcome, OutcomeKind, QueuedMessage, Recipient, Reply

from ._client import kind_of, outcomes, parse_reply, prepare, rcpt_options, screen
from .body import OutgoingBody, SpoolUnreadable, load_body
from .dane import Tlsa, TlsaSet, authenticate, presented_chain, tlsa_name, usable
from .hoststate import HostState
from .mtasts import MTASTSPolicies, Plan
from .smtpclient import ClientSession, Response, SessionLost, Transaction
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


class StaleSession(Exception):
    """A cached session failed the RSET that led its next group: it had gone while idle,
    before anything of the transaction was taken. The caller opens a new one."""


@dataclass(frozen=True, slots=True)
class Demand:
    """What a message asks of the session beyond the destination's policy: ``requiretls``
    (RFC 8689: verified TLS to a host that offers REQUIRETLS, or no delivery) or
    ``relaxed`` (``TLS-Required: No``: the TLS policy is not applied, TLS stays
    opportunistic). A report about a REQUIRETLS message (null sender) asks for nothing:
    REQUIRETLS is passed on where offered, and it is never returned (RFC 8689 §5)."""

    requiretls: bool = False
    relaxed: bool = False

    @classmethod
    def of(cls, msg: QueuedMessage) -> Demand:
        env = msg.envelope
        return cls(requiretls=env.requiretls and env.sender != "",
                   relaxed=env.tls_optional and not env.requiretls)

    def accepts(self, conn: Connection) -> bool:
        """May a cached ``conn`` carry this message?"""
        if self.requiretls and not (conn.authenticated and conn.route_trusted
                                    and conn.session.supports("requiretls")):
            return False
        return self.relaxed or not conn.relaxed


@dataclass(eq=False, slots=True)
class Connection:
    """An open, greeted (and, where needed, encrypted and authenticated) SMTP session.
    ``authenticated``: the server's certificate was verified (``verify``/``secure``/DANE);
    ``relaxed``: opened for a ``TLS-Required: No`` message, below the destination's policy;
    ``route_trusted``: the host came from an authenticated MX answer, an ``enforce`` MTA-STS
    policy or the configuration (what REQUIRETLS asks of the route, RFC 8689 §4.2.1)."""

    session: ClientSession
    relay: str           # host[ip]:port
    host: str
    created: float
    uses: int = 0
    idle_since: float = 0.0
    expiry: asyncio.TimerHandle | None = field(default=None, repr=False)
    authenticated: bool = False
    relaxed: bool = False
    route_trusted: bool = False
    unchecked: bool = False     # taken from the cache: RSET still to be sent

    @property
    def extensions(self) -> dict[str, str]:
        return self.session.extensions


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
                 tls_policy: Mapping[str, str] | None = None, ca_file: str = "",
                 mta_sts: MTASTSPolicies | None = None,
                 state_dir: str | os.PathLike[str] | None = None) -> None:
        """``resolver``: the server's DNS (the wiring passes it); None: a system resolver
        of this agent's own. ``tls_policy``: levels by next-hop domain (``.parent`` covers
        the hosts under it); ``ca_file``: the roots of ``verify``/``secure`` (empty: the
        system's). ``mta_sts``: the MTA-STS policies of MX deliveries (None: not used).
        ``state_dir``: where the worker processes share dead hosts and connection slots
        (None: this process only)."""
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
        self._web: ssl.SSLContext | None = None         # MTA-STS's: system roots + CA file
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
        self.mta_sts = mta_sts
        self._tls = client_ssl_context()   # Postfix may/encrypt: no certificate checks
        self.hosts = HostState(state_dir) if state_dir is not None else HostState(clock=clock)
        self._idle: dict[str, list[Connection]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self.connections_opened = 0   # counters for tests and metrics

    @classmethod
    def from_config(cls, config: Any, *, resolver: DNSResolver | None = None
                    ) -> SMTPRelayAgent:
        """The relay of a server: ``SMTP_RELAY_HOSTAUTH`` (or MX), ``SMTP_TLS_*``,
        ``PYMTA_MX_PORT``, ``PYMTA_MTA_STS`` (its cache in ``<state_dir>/mta-sts.json``)
        and the connection settings (all checked by ``load_config``)."""
        resolver = resolver if resolver is not None else DNSResolver()   # as __init__'s
        sts = (MTASTSPolicies(resolver, ca_file=config.smtp_tls_ca_file,
                              cache_path=os.path.join(config.state_dir, "mta-sts.json"))
               if config.mta_sts else None)
        return cls(
            hostname=config.hostname, smart_host=config.smtp_relay,
            tls_level=config.smtp_tls_security_level, wrappermode=config.smtp_tls_wrappermode,
            mx_port=config.mx_port, destination_concurrency=config.destination_concurrency,
            connect_timeout=config.smtp_connect_timeout, timeout=config.smtp_timeout,
            cache_time=config.connection_cache_time, reuse_limit=config.connection_reuse_limit,
            dead_host_time=config.dead_host_time, resolver=resolver,
            tls_policy=dict(entry.split("=", 1) for entry in config.tls_policy),
            ca_file=config.smtp_tls_ca_file, mta_sts=sts,
            state_dir=os.path.join(config.state_dir, "relay"))

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
        self.hosts.forget_all()

    async def deliver(self, msg: QueuedMessage, rcpts: Sequence[Recipient],
                      report: Callable[[Outcome], None] | None = None) -> list[Outcome]:
        """One outcome per recipient; a transaction's also go to ``report`` when it ends."""
        results, sendable = screen(msg, rcpts, "none")
        if not sendable:
            return results
        groups: dict[str, list[Recipient]] = {}
        for r in sendable:
            groups.setdefault(self.destination(r), []).append(r)
        # a body in memory needs no thread; a spool file is opened (and scanned) in one
        body = load_body(msg) if msg.body is not None else await asyncio.to_thread(load_body,
                                                                                    msg)
        demand = Demand.of(msg)
        for dest, group in groups.items():
            results.extend(await self._deliver_destination(dest, msg, group, body, demand,
                                                           report))
        return results

    async def _deliver_destination(self, dest: str, msg: QueuedMessage,
                                   rcpts: list[Recipient], body: OutgoingBody,
                                   demand: Demand = Demand(),
                                   report: Callable[[Outcome], None] | None = None,
                                   ) -> list[Outcome]:
        async with self.hosts.slot(dest, self.destination_concurrency):
            try:
                conn = await self._get_connection(dest, rcpts[0], demand)
            except HostFailure as failure:
                return self._failed(failure, dest, rcpts)
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
                    try:
                        batch_out, reusable = await self._transaction(conn, msg, batch, body)
                    except StaleSession:    # the cached session had gone: a new one
                        try:
                            conn = await self._connect_destination(dest, batch[0], demand)
                        except HostFailure as failure:
                            rest = self._failed(failure, dest, rcpts[i:])
                            if report is not None:
                                for outcome in rest:
                                    report(outcome)
                            return results + rest
                        batch_out, reusable = await self._transaction(conn, msg, batch, body)
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

    @staticmethod
    def _failed(failure: HostFailure, dest: str, rcpts: list[Recipient]) -> list[Outcome]:
        """Every recipient's outcome when no host of ``dest`` took the session."""
        relay = failure.relay or dest.partition(":")[2]
        return outcomes(rcpts, failure.reply, relay,
                        OutcomeKind.PERMANENT if failure.reply.is_permanent
                        else OutcomeKind.TEMPORARY)

    async def _transaction(self, conn: Connection, msg: QueuedMessage,
                           rcpts: list[Recipient], body: OutgoingBody,
                           ) -> tuple[list[Outcome], bool]:
        """One MAIL/RCPT.../DATA (or BDAT) exchange; (outcomes, connection still usable).

        The envelope is one pipelined group when the peer pipelines (with DATA at its end
        unless the body goes as BDAT); every reply is read in order, so a refused MAIL or
        RCPT leaves the session in step and reusable after RSET."""
        session, relay = conn.session, conn.relay
        ext = session.extensions
        env = msg.envelope
        requiretls = (env.requiretls and conn.authenticated
                      and session.supports("requiretls"))
        prepared = prepare(msg, rcpts, body, ext, conn.host, requiretls=requiretls)
        if prepared.refusal is not None:
            return outcomes(rcpts, prepared.refusal, relay), True
        encoding = "utf-8" if prepared.smtputf8 else "ascii"
        decided: dict[int, Outcome] = {}
        notified: set[int] = set()      # NOTIFY given to the peer: its notices now
        tx = Transaction()
        bdat = session.supports("chunking")
        conn.uses += 1
        try:
            mail = " ".join([f"MAIL FROM:<{env.sender}>", *prepared.mail_options])
            lines = _rcpt_lines(rcpts, ext, prepared.smtputf8, encoding, notified)
            unchecked, conn.unchecked = conn.unchecked, False
            await session.send_envelope(mail.encode(encoding), lines, tx, with_data=not bdat,
                                        rset=unchecked)
            assert tx.mail is not None
            if not tx.mail.ok:
                await session.abandon_data(tx)
                reply = parse_reply(tx.mail.code, tx.mail.text)
                return outcomes(rcpts, reply, relay), await session.rset()
            for i, response in enumerate(tx.rcpts):
                if response is not None and not response.ok:
                    reply = parse_reply(response.code, response.text)
                    decided[i] = Outcome(rcpts[i].address, kind_of(reply), reply, relay)
            accepted = tx.accepted()
            if not accepted:
                await session.abandon_data(tx)
                return [decided[i] for i in range(len(rcpts))], await session.rset()
            if bdat:
                await session.send_bdat(prepared.body, tx)
            elif tx.data_start is not None and tx.data_start.code == 354:
                await session.send_data(prepared.body, tx)
            if tx.body_sent:
                await session.read_data_replies(tx, 1)
            reply = _end_of_data_reply(tx, relay)
            for i in accepted:
                decided[i] = Outcome(rcpts[i].address, kind_of(reply), reply, relay,
                                     dsn_passed=i in notified and 200 <= reply.code < 300)
            # after a refused body (RFC 3030 §2: the state is then indeterminate) or a
            # DATA that never began, RSET brings the session back in step
            usable = session.is_connected and ((tx.body_sent and 200 <= reply.code < 300)
                                               or await session.rset())
            return [decided[i] for i in range(len(rcpts))], usable
        except (SessionLost, OSError, TimeoutError) as exc:
            if tx.stage == "RSET":      # a cached session that had gone: nothing was sent
                session.close()
                raise StaleSession(str(exc)) from None
            what = "timeout" if str(exc) == "timeout" or isinstance(exc, TimeoutError) \
                else "lost connection"
            reply = Reply(451, "4.4.2", f"{what} with {relay} while sending {tx.stage}")
            log.info("%s: %s (%s)", msg.qid, reply.text, exc)
        except SpoolUnreadable as exc:
            log.error("%s: %s", msg.qid, exc)
            reply = Reply(451, "4.3.0", f"local error while sending {tx.stage} to {relay}: "
                                        f"{exc}")
        except Exception:
            # Our bug, or a value that cannot be encoded: the session is in an unknown
            # state, so it is closed; what is still undecided is tried again later.
            log.exception("%s: error while sending %s to %s", msg.qid, tx.stage, relay)
            reply = Reply(451, "4.3.0", f"local error while sending {tx.stage} to {relay}")
        session.close()     # never QUIT into a half-sent transaction
        for i, r in enumerate(rcpts):
            decided.setdefault(i, Outcome(r.address, OutcomeKind.TEMPORARY, reply, relay))
        return [decided[i] for i in range(len(rcpts))], False

    # ------------------------------------------------------------------ connections

    async def _get_connection(self, dest: str, sample: Recipient,
                              demand: Demand = Demand()) -> Connection:
        """A cached connection for ``dest`` that suits ``demand`` and answers RSET, else a
        new one (HostFailure)."""
        idle = self._idle.get(dest)
        now = self._clock()
        while idle:
            suitable = [c for c in idle if demand.accepts(c)]
            if not suitable:
                break
            conn = suitable[-1]
            idle.remove(conn)
            if conn.expiry is not None:
                conn.expiry.cancel()
                conn.expiry = None
            if (conn.session.is_connected and conn.uses < self.reuse_limit
                    and now - conn.created < REUSE_TIME_LIMIT):
                if conn.session.supports("pipelining"):
                    conn.unchecked = True   # RSET leads the next pipelined group
                    return conn
                try:  # the peer may have closed an idle session: check before use
                    if await conn.session.rset():
                        return conn
                except BaseException:
                    _close_now(conn)
                    raise
            self._discard(conn)
        return await self._connect_destination(dest, sample, demand)

    def _release(self, dest: str, conn: Connection) -> None:
        if (self.cache_time <= 0 or conn.uses >= self.reuse_limit
                or not conn.session.is_connected):
            self._discard(conn)
            return
        conn.idle_since = self._clock()
        idle = self._idle.setdefault(dest, [])
        idle.append(conn)
        if len(idle) > self.destination_concurrency:    # bounded: the oldest goes
            self._discard(idle.pop(0))
        loop = asyncio.get_running_loop()
        conn.expiry = loop.call_later(self.cache_time, self._expire, dest, conn)

    def _expire(self, dest: str, conn: Connection) -> None:
        idle = self._idle.get(dest)
        if idle and conn in idle:
            idle.remove(conn)
            self._discard(conn)

    def _discard(self, conn: Connection) -> None:
        """QUIT politely in the background (a session in step); close for sure."""
        if conn.expiry is not None:
            conn.expiry.cancel()
            conn.expiry = None
        if not conn.session.is_connected:
            conn.session.close()
            return
        task = asyncio.get_running_loop().create_task(conn.session.quit())
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

    async def _connect_destination(self, dest: str, sample: Recipient,
                                   demand: Demand = Demand()) -> Connection:
        name, port, mx = self._hops(dest, sample)
        try:
            found = await self.resolver.mx_hosts(name) if mx else None
        except DNSFailure as failure:
            raise _dns_failure(failure, name) from None
        hosts = list(found.hosts) if found is not None else [name]
        names_trusted = found.secure if found is not None else True
        level = level_for(name, self.tls_level, self.tls_policy)
        sts: Plan | None = None
        if demand.relaxed and self._may_relax(name):
            # TLS-Required: No (RFC 8689 §5): the domain's own policies (DANE, MTA-STS) and
            # the default level give way to opportunistic TLS; never the operator's level
            # for a smart host (its password) or a PYMTA_TLS_POLICY entry
            level = "none" if level == "none" else "may"
        elif found is not None:
            sts = await self._mta_sts(name, hosts)
            hosts = sts.hosts if sts is not None else hosts
        route_trusted = names_trusted or (sts is not None and sts.enforced)
        if demand.requiretls and not route_trusted:
            if self.mta_sts is not None and self.mta_sts.unsettled(name):
                raise HostFailure(Reply(451, "4.7.5", f"REQUIRETLS: the MX hosts of {name} "
                                        f"are not DNSSEC-authenticated and its MTA-STS "
                                        f"policy could not be looked up"), relay=name)
            raise HostFailure(Reply(550, "5.7.30", f"REQUIRETLS support required: the MX "
                                    f"hosts of {name} are neither DNSSEC-authenticated nor "
                                    f"named by an enforced MTA-STS policy"), relay=name)
        failures: list[HostFailure] = []
        for host in hosts:
            try:
                ips = await self.resolver.addresses(host)
                host_level, tlsa = ((await self._dane(host, port, names_trusted))
                                    if level == "dane" else (level, ()))
            except DNSFailure as failure:
                failures.append(HostFailure(Reply(451, "4.4.3", failure.text), relay=host))
                continue
            except HostFailure as failure:
                failures.append(failure)
                log.info("%s: %s", host, failure.reply.text)
                continue
            probe = sts is not None and sts.probes(host_level)
            host_level = sts.level(host_level) if sts is not None else host_level
            if demand.requiretls and host_level not in VERIFIED and host_level != "dane":
                host_level, probe = "verify", False
            for ip in ips:
                relay = f"{host}[{ip}]:{port}"
                try:
                    self._check_alive(ip, port, relay)
                    if probe and (conn := await self._sts_probe(sts, host, ip, port, relay,
                                                                name)) is not None:
                        return self._fit(conn, demand, route_trusted)
                    return self._fit(await self._open(host, ip, port, relay, host_level,
                                                      name, tlsa, web=sts is not None),
                                     demand, route_trusted)
                except HostFailure as failure:
                    if failure.tls_failed and host_level == "may":
                        try:
                            return self._fit(await self._open(host, ip, port, relay, "none",
                                                              name), demand, route_trusted)
                        except HostFailure as again:
                            failure = again
                    failures.append(self._host_failed(failure, sts, host, ip, port, relay,
                                                      host_level))
        raise _final_failure(failures, name)

    def _may_relax(self, name: str) -> bool:
        """May ``TLS-Required: No`` lower the level for the next hop ``name``? Only for MX
        delivery that no ``PYMTA_TLS_POLICY`` entry covers."""
        return self.smart_host is None and not level_for(name, "", self.tls_policy)

    def _check_alive(self, ip: str, port: int, relay: str) -> None:
        """HostFailure ("delivery temporarily suspended") for a host remembered dead."""
        remembered = self._is_dead(ip, port)
        if remembered is not None:
            raise HostFailure(Reply(451, remembered.enhanced, f"delivery temporarily "
                                    f"suspended: {remembered.text}"), relay=relay)

    def _host_failed(self, failure: HostFailure, sts: Plan | None, host: str, ip: str,
                     port: int, relay: str, level: str) -> HostFailure:
        """Record a failed host (MTA-STS report line, dead-host memory); the failure."""
        if (sts is not None and not failure.reply.text.startswith("delivery temporarily")
                and failure.reply.enhanced != "5.7.30"):
            sts.failed(host, ip, failure.reply.text, level)
        if failure.dead:
            self._mark_dead(ip, port, failure.reply)
        failure.relay = relay
        log.info("%s: %s", relay, failure.reply.text)
        return failure

    def _fit(self, conn: Connection, demand: Demand, route_trusted: bool) -> Connection:
        """``conn`` marked for what it may carry; for a REQUIRETLS message, a host that does
        not offer REQUIRETLS is a failed host (5.7.30 when none does, RFC 8689 §4.2.1)."""
        conn.relaxed = demand.relaxed
        conn.route_trusted = route_trusted or self.smart_host is not None
        if demand.requiretls and not (conn.authenticated
                                      and conn.session.supports("requiretls")):
            self._discard(conn)
            raise HostFailure(Reply(550, "5.7.30", f"REQUIRETLS support required: host "
                                    f"{conn.relay} does not offer REQUIRETLS"))
        return conn

    # ------------------------------------------------------------------ MTA-STS hook

    async def _mta_sts(self, name: str, hosts: list[str]) -> Plan | None:
        """The MTA-STS plan (``delivery.mtasts``) of MX delivery to the domain ``name``:
        None without a policy, for a smart host or an address literal, and when
        ``PYMTA_TLS_POLICY`` has an entry for the domain (the operator's word wins, as
        with Postfix's policy table before postfix-mta-sts-resolver). HostFailure when an
        ``enforce`` policy allows none of the ``hosts``."""
        if (self.mta_sts is None or self.smart_host is not None or name.startswith("[")
                or level_for(name, "", self.tls_policy)):
            return None
        sts = await self.mta_sts.plan(name, hosts)
        if sts is not None and not sts.hosts:
            raise HostFailure(Reply(451, "4.7.5", sts.refusal()), relay=name)
        return sts

    async def _sts_probe(self, sts: Plan | None, host: str, ip: str, port: int, relay: str,
                         nexthop: str) -> Connection | None:
        """MTA-STS ``testing``: a session with the host as ``enforce`` would open it
        (``verify``); None when TLS failed that way (logged), and the host is then tried
        as before. Any other failure (HostFailure) is the host's."""
        assert sts is not None
        try:
            return await self._open(host, ip, port, relay, "verify", nexthop, web=True)
        except HostFailure as failure:
            if failure.dead or not sts.observe(host, ip, failure.reply.text):
                raise
            return None

    async def _dane(self, host: str, port: int, name_trusted: bool,
                    ) -> tuple[str, tuple[Tlsa, ...] | TlsaSet]:
        """The level of ``host`` at ``dane`` (``delivery.dane``): ``dane`` with its usable
        TLSA records, ``encrypt`` for a secure set none of which is usable, ``may`` without
        secure records (or when the host's name came from an unauthenticated MX answer).
        A CNAME'd host is asked at its target first, then at its own name (RFC 7672
        §2.2.2): the first secure set decides. A TLSA lookup that fails is a failed host
        (HostFailure), never a downgrade."""
        if not name_trusted or dns.inet.is_address(host):
            return "may", ()
        target = await self._address_secure(host)
        if target is None:
            return "may", ()
        host = host.rstrip(".").lower()
        bases = (target, host) if target != host else (host,)
        for base in bases:
            try:
                rdata, secure = await self.resolver.authenticated(tlsa_name(base, port),
                                                                  "TLSA")
            except DNSFailure as failure:
                if failure.permanent:       # NXDOMAIN: no TLSA records there
                    continue
                raise HostFailure(Reply(451, "4.7.5", f"TLSA lookup error for {base}:{port}: "
                                        f"{failure.text}"), relay=host) from None
            if not secure or not rdata:
                continue
            records = tuple(Tlsa(int(r.usage), int(r.selector), int(r.mtype), bytes(r.cert))
                            for r in rdata)
            if not usable(records):
                return "encrypt", ()
            # DANE-TA's reference identifiers: the base domain, and both ends of a CNAME
            return "dane", TlsaSet(records, base, tuple(dict.fromkeys((base, *bases))))
        return "may", ()

    async def _address_secure(self, host: str) -> str | None:
        """The name ``host``'s address records were found at (its CNAME chain's target, or
        ``host`` itself) when the answer is authenticated (DNSSEC), the chain included;
        else None. Only then is its TLSA answer worth asking for (RFC 7672 §2.2.2; Postfix
        does the same): a CNAME with an insecure link is an unsigned host."""
        for rdtype in ("A", "AAAA"):
            try:
                rdata, secure, target = await self.resolver.authenticated_canonical(host,
                                                                                    rdtype)
            except DNSFailure:
                return None
            if rdata:
                return target if secure else None
        return None

    def _is_dead(self, ip: str, port: int) -> Reply | None:
        return self.hosts.dead(ip, port)

    def _mark_dead(self, ip: str, port: int, reply: Reply) -> None:
        self.hosts.mark_dead(ip, port, reply, self.dead_host_time)

    def _context(self, level: str, relay: str, web: bool = False) -> ssl.SSLContext:
        """The client TLS context of ``level``: verifying at ``verify``/``secure``. A CA
        file that cannot be loaded (changed since the start) fails the host, with why.
        ``web``: a level MTA-STS set, whose certificates are the web PKI's (RFC 8461 §4.2):
        the system's roots, and ``PYMTA_SMTP_TLS_CA_FILE``'s beside them (alone, a CA file
        for one private relay would fail every public MX that has a policy)."""
        if level not in VERIFIED:
            return self._tls
        if web and self.ca_file:
            if self._web is None:
                try:
                    context = verifying_context()
                    context.load_verify_locations(cafile=self.ca_file)
                except (OSError, ssl.SSLError) as exc:
                    raise HostFailure(Reply(451, "4.7.5", f"cannot verify {relay}: trusted "
                                            f"roots not loaded: {exc}"), relay=relay) from None
                self._web = context
            return self._web
        if self._verifying is None:
            try:
                self._verifying = verifying_context(self.ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise HostFailure(Reply(451, "4.7.5", f"cannot verify {relay}: trusted "
                                        f"roots not loaded from {self.ca_file or 'system'}: "
                                        f"{exc}"), relay=relay) from None
        return self._verifying

    async def _tcp(self, ip: str, port: int) -> socket.socket:
        """A connected socket to ``ip`` (wrapper mode: the TLS handshake then names the
        host, SNI, not the address connected to)."""
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
                    nexthop: str, tlsa: Sequence[Tlsa] = (), *, web: bool = False,
                    ) -> Connection:
        """A greeted session with ``host`` at ``ip``, at TLS ``level`` (HostFailure);
        ``web``: the level is MTA-STS's (``_context``)."""
        context = self._context(level, relay, web)
        sock: socket.socket | None = None
        try:
            if self.wrappermode:
                sock = await self._tcp(ip, port)
            session = await ClientSession.connect(
                ip, port, sock=sock, timeout=self.timeout, connect_timeout=self.connect_timeout,
                ssl_context=context if self.wrappermode else None, server_hostname=host)
        except BaseException as exc:
            if sock is not None:    # whatever happened, no half-open socket stays behind
                sock.close()
            if not isinstance(exc, Exception):
                raise
            if isinstance(exc, ssl.SSLCertVerificationError):
                raise _untrusted(exc, relay) from None
            raise self._connect_failure(exc, relay) from None
        self.connections_opened += 1
        try:
            await self._greet(session, relay)
            await self._secure(session, level, context, host, relay, nexthop, tlsa)
            sh = self.smart_host
            if sh is not None and sh.username:
                await self._auth(session, sh, relay)
        except HostFailure:
            session.close()
            raise
        except (SessionLost, OSError, TimeoutError) as exc:
            session.close()
            raise HostFailure(Reply(451, "4.4.2", f"lost connection with {relay} during "
                                    f"session set-up: {exc}")) from None
        except Exception as exc:
            session.close()
            log.exception("error during session set-up with %s", relay)
            raise HostFailure(Reply(451, "4.3.0", f"local error during session set-up "
                                    f"with {relay}: {type(exc).__name__}")) from None
        except BaseException:
            session.close()
            raise
        now = self._clock()
        return Connection(session, relay, host, created=now, idle_since=now,
                          authenticated=level in VERIFIED or level == "dane")

    async def _greet(self, session: ClientSession, relay: str) -> None:
        """The 220 greeting and EHLO (HELO when EHLO is refused); any other greeting is a
        failed host, 4xx and 5xx alike (Postfix's ``smtp_skip_5xx_greeting``)."""
        try:
            response = await session.greeting(self.connect_timeout)
        except SessionLost as exc:
            text = "Connection timed out" if str(exc) == "timeout" else str(exc)
            raise HostFailure(Reply(451, "4.4.1", f"connect to {relay}: no greeting: {text}"),
                              dead=True) from None
        if response.code != 220:
            reply = parse_reply(response.code, response.text)
            raise HostFailure(Reply(451, "4.4.2" if reply.code < 500 else "4.3.0",
                                    f"host {relay} refused to talk to me: {reply}"))
        response = await session.hello(self.hostname)
        if not response.ok:
            reply = parse_reply(response.code, response.text)
            raise HostFailure(Reply(451, "4.4.2" if reply.code < 500 else "4.3.0",
                                    f"host {relay} refused to talk to me: {reply}"))

    async def _secure(self, session: ClientSession, level: str, context: ssl.SSLContext,
                      host: str, relay: str, nexthop: str, tlsa: Sequence[Tlsa] = ()) -> None:
        """STARTTLS as ``level`` asks, then the certificate check of ``verify``/``secure``
        (HostFailure; ``tls_failed`` when a ``may`` session may go on in cleartext)."""
        if self.wrappermode:
            pass  # TLS from the first byte already
        elif level != "none" and session.supports("starttls"):
            # at dane, the name the TLSA records were found under (RFC 7672 §8.1)
            sni = tlsa.base if isinstance(tlsa, TlsaSet) else host
            try:
                response = await session.starttls(context, sni, self.connect_timeout)
            except ssl.SSLCertVerificationError as exc:
                raise _untrusted(exc, relay) from None
            except (SessionLost, OSError, ssl.SSLError, TimeoutError) as exc:
                raise HostFailure(Reply(451, "4.7.5", f"Cannot start TLS: handshake "
                                        f"failure with {relay}: {exc}"),
                                  tls_failed=True) from None
            if response.code != 220:
                raise HostFailure(Reply(451, "4.7.5", f"STARTTLS refused by {relay}: "
                                        f"{parse_reply(response.code, response.text)}"),
                                  tls_failed=True)
            response = await session.hello(self.hostname)
            if not response.ok:
                raise HostFailure(Reply(451, "4.4.2", f"EHLO after STARTTLS refused by "
                                        f"{relay}: {parse_reply(response.code, response.text)}"))
        elif level in REQUIRED:
            raise HostFailure(Reply(451, "4.7.4", f"TLS is required, but was not "
                                    f"offered by host {relay}"))
        ssl_object = session.ssl_object
        if level in VERIFIED:
            peercert = ssl_object.getpeercert() if ssl_object is not None else None
            problem = certificate_problem(peercert, level, host, nexthop)
            if problem:
                raise HostFailure(Reply(451, "4.7.5", f"Server certificate not verified: "
                                        f"{relay}: {problem}"))
        elif level == "dane":
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            chain = presented_chain(ssl_object) if ssl_object is not None else None
            names = tlsa.names if isinstance(tlsa, TlsaSet) else (host,)
            # signature checks over a chain the peer chose: off the event loop
            problem = await asyncio.to_thread(authenticate, tlsa, der, chain, names)
            if problem:
                raise HostFailure(Reply(451, "4.7.5", f"Server certificate not trusted: "
                                        f"{relay}: {problem}"))
        _log_tls(ssl_object, relay, verified=level in VERIFIED or level == "dane")

    @staticmethod
    def _connect_failure(exc: Exception, relay: str) -> HostFailure:
        """The HostFailure for a connect (or TLS handshake in wrapper mode) that failed."""
        if not isinstance(exc, OSError | TimeoutError):
            log.error("connect to %s: %r", relay, exc)
            return HostFailure(Reply(451, "4.3.0", f"connect to {relay}: local error "
                                     f"({type(exc).__name__})"))
        text = (exc.strerror if isinstance(exc, OSError) and exc.strerror
                else str(exc).strip() or type(exc).__name__)
        if isinstance(exc, TimeoutError):
            text = "Connection timed out"
        return HostFailure(Reply(451, "4.4.1", f"connect to {relay}: {text}"), dead=True)

    async def _auth(self, session: ClientSession, sh: RelayHost, relay: str) -> None:
        """AUTH PLAIN, else LOGIN. A refusal is a failed host (deferred), never a bounce: a
        wrong password is the sender's administrator's problem, not the recipient's."""
        ext = session.extensions
        offered = ext.get("auth", "").lower().split()
        for keyword, params in ext.items():     # the old "AUTH=PLAIN LOGIN" form
            if keyword.startswith("auth="):
                offered += [keyword[5:], *params.lower().split()]
        methods = [m for m in ("plain", "login") if m in offered]
        if not methods:
            raise HostFailure(Reply(451, "4.7.0", f"SASL authentication failed: server "
                                    f"{relay} offered no compatible authentication "
                                    f"mechanisms for this type of connection security"))
        last = None
        for method in methods:
            response = await _sasl(session, method, sh.username, sh.password)
            if response.ok:
                return
            last = response
        assert last is not None
        reply = parse_reply(last.code, last.text)
        raise HostFailure(Reply(451, "4.7.0", f"SASL authentication failed; server "
                                f"{relay} said: {reply}"))


async def _sasl(session: ClientSession, method: str, username: str,
                password: str) -> Response:
    """One AUTH exchange (RFC 4954): PLAIN with an initial response, or LOGIN's two
    challenges; the final reply. A server that asks for more is answered ``*`` (cancel)."""
    def b64(text: str) -> bytes:
        return base64.b64encode(text.encode("utf-8"))

    if method == "plain":
        response = await session.command(b"AUTH PLAIN " + b64(f"\0{username}\0{password}"))
    else:
        response = await session.command(b"AUTH LOGIN")
        for answer in (username, password):
            if response.code != 334:
                break
            response = await session.command(b64(answer))
    if response.code == 334:
        response = await session.command(b"*")
    return response


def _rcpt_lines(rcpts: list[Recipient], ext: dict[str, str], smtputf8: bool, encoding: str,
                notified: set[int]) -> list[bytes]:
    """The RCPT commands; the indexes of those that carry NOTIFY go into ``notified``."""
    lines: list[bytes] = []
    for i, r in enumerate(rcpts):
        options = rcpt_options(r, ext, smtputf8)
        if any(o.startswith("NOTIFY=") for o in options):
            notified.add(i)
        lines.append(" ".join([f"RCPT TO:<{r.address}>", *options]).encode(encoding))
    return lines


def _end_of_data_reply(tx: Transaction, relay: str) -> Reply:
    """The reply that decides the accepted recipients: the end of data's (or a refused
    chunk's); a DATA answered with anything but 354 is that answer, and a 2xx there (no
    message was sent) is a protocol error, never a delivery."""
    final = tx.end_of_data() if tx.body_sent or tx.chunk_refusal else tx.data_start
    if final is None:
        return Reply(451, "4.4.2", f"no reply to DATA from {relay}")
    if not tx.body_sent and tx.chunk_refusal is None and final.code < 400:
        return Reply(451, "4.5.0", f"unexpected reply to DATA from {relay}: "
                                   f"{parse_reply(final.code, final.text)}")
    return parse_reply(final.code, final.text)


def _log_tls(ssl_object: ssl.SSLObject | None, relay: str, *, verified: bool) -> None:
    """Postfix's line for an encrypted session, which operators and log tools look for:
    ``Verified TLS connection established to mx[ip]:25: TLSv1.3 with cipher
    TLS_AES_256_GCM_SHA384 (256/256 bits)``; ``Untrusted`` when the certificate was not
    checked (``may``, ``encrypt``). Nothing for a cleartext session."""
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
    conn.session.close()


def _untrusted(exc: ssl.SSLCertVerificationError, relay: str) -> HostFailure:
    """A chain that does not verify at ``verify``/``secure``: the host failed (no cleartext
    fallback at these levels)."""
    why = exc.verify_message or str(exc)
    return HostFailure(Reply(451, "4.7.5", f"Server certificate not trusted: {relay}: {why}"))


def _final_failure(failures: list[HostFailure], name: str) -> HostFailure:
    """What the destination's recipients get when no host took the session: the last
    failure, except that REQUIRETLS's permanent ``5.7.30`` stands only when every host was
    reached and lacked it; with one down, the message waits for it."""
    if not failures:
        return HostFailure(Reply(451, "4.4.4", f"no usable address for {name}"))
    temporary = [f for f in failures if not f.reply.is_permanent]
    return temporary[-1] if temporary else failures[-1]


def _dns_failure(failure: DNSFailure, name: str) -> HostFailure:
    if failure.permanent:
        code, enhanced = (556, "5.1.10") if "nullMX" in failure.text else (550, "5.4.4")
        return HostFailure(Reply(code, enhanced, failure.text), relay=name)
    return HostFailure(Reply(451, "4.4.3", failure.text), relay=name)
