"""The client's name: its PTR, trusted only when it forward-confirms, as Postfix's smtpd does.

The name goes into ``Received: from HELO (NAME [IP])`` and into log lines (``connect from
NAME[IP]``), where readers and filters take it for a fact, so it is given only when the
reverse lookup of the client's address finds a name AND a forward lookup of that name gives
back that address ("forward-confirmed reverse DNS"); everything else is ``unknown``: no PTR, a
name that resolves elsewhere (logged as Postfix logs it: ``hostname X does not resolve to
address IP``), a temporary DNS failure, a timeout. A PTR is text anyone with a reverse zone
writes, so a name that is not a syntactically valid host name (``evil;dkim=pass``, spaces,
control characters, all-numeric) is ``unknown`` too and never reaches a header field.

Two ways to look, as configured:

- ``PYMTA_DNS_RESOLVER`` set: the server's :class:`~pymta.dns.DNSResolver` (PTR, then A for
  an IPv4 client or AAAA for IPv6), the same servers every other lookup uses.
- unset: the host's own resolver (``getnameinfo``/``getaddrinfo``), as Postfix does, so
  ``/etc/hosts`` answers first: 127.0.0.1 is ``localhost`` at once on a machine without a
  reachable DNS server. These calls block, so they run in threads of their own; at most
  :data:`SYSTEM_LOOKUPS` per process at a time, and a client arriving when all are busy is
  ``unknown`` at once: a dead DNS server must never stall connections or pile up threads.
  The threads are daemons outside any executor, so a lookup hanging in the C library delays
  neither ``asyncio.run``'s shutdown nor the interpreter's exit.

Everything is bounded by the DNS timeout (``PYMTA_DNS_TIMEOUT``) and nothing raises.
:class:`PeerNameResolver` (one per server) adds ``PYMTA_PEERNAME_LOOKUP``, a small cache,
since a client often reconnects at once, and one lookup per address at a time: a burst of
connections from one client (hundreds arrive in the same millisecond) waits for one lookup
instead of sending the DNS server as many identical queries.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

import dns.reversename

from pymta.dns import DEFAULT_TIMEOUT, DNSFailure, DNSResolver
from pymta.headervalue import is_domain

__all__ = ["UNKNOWN", "PeerNameResolver", "SystemLookups", "client_name", "valid_hostname"]

log = logging.getLogger("pymta.smtpd")

UNKNOWN = "unknown"
MAX_PTR_NAMES = 5           # PTR names checked per client (a reverse zone may list many)
SYSTEM_LOOKUPS = 16         # host-resolver lookups in flight per process
CACHE_TTL = 60.0            # seconds a name (or "unknown") is remembered per address
CACHE_SIZE = 4096           # addresses remembered

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

def valid_hostname(text: str) -> str | None:
    """``text`` as a host name fit for a header field and a log line (lower-case, no final
    dot), or None: an RFC 5321 domain as :func:`pymta.headervalue.is_domain` reads it
    (labels of at most 63 octets without a hyphen at either end, at most 253 octets, not
    all-numeric: ``1.2.3.4`` is an address, not a name, as Postfix's "numeric hostname"),
    and without the ``_`` that function tolerates in HELO names."""
    if not text.isascii():   # before lower(): "\u212a".lower() is an ASCII "k"
        return None
    name = text.lower()
    name = name[:-1] if name.endswith(".") else name
    return name if "_" not in name and is_domain(name) else None


def parse_address(ip: str) -> Address | None:
    """The client address to look up, or None for anything that is not one. A zone id
    (``fe80::1%eth0``) is dropped; an IPv4-mapped IPv6 address (``::ffff:192.0.2.1``, what a
    dual-stack listener reports for an IPv4 client) is the IPv4 address."""
    try:
        addr = ipaddress.ip_address(str(ip).strip().partition("%")[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


class _Busy(Exception):
    """Every host-resolver slot of this process is taken: ``unknown`` now, not cached."""


# ------------------------------------------------------------------------------ DNS path


class _Querier(Protocol):
    """What the DNS path asks of :class:`~pymta.dns.DNSResolver`."""

    async def query(self, name: str, rdtype: str) -> list[Any] | None: ...


async def _dns_name(addr: Address, resolver: _Querier) -> str:
    try:
        ptr = await resolver.query(dns.reversename.from_address(str(addr)).to_text(), "PTR")
    except DNSFailure:
        return UNKNOWN      # NXDOMAIN (no PTR) is not worth a warning; SERVFAIL is the zone's
    rdtype = "A" if addr.version == 4 else "AAAA"
    for rdata in (ptr or [])[:MAX_PTR_NAMES]:
        text = rdata.target.to_text()      # dnspython escapes odd octets: "evil\;x", "a\010b"
        name = valid_hostname(text)
        if name is None:
            log.warning("malformed hostname %s for address %s", text[:300], addr)
            continue
        try:
            forward = await resolver.query(name, rdtype)
        except DNSFailure as failure:
            if not failure.permanent:
                log.warning("hostname %s verification failed: %s", name, failure.text)
                continue
            forward = None
        if any(ipaddress.ip_address(r.address) == addr for r in forward or ()):
            return name
        log.warning("hostname %s does not resolve to address %s", name, addr)
    return UNKNOWN


# ------------------------------------------------------------------------------ host resolver


def _system_lookup(addr: Address) -> tuple[str, str]:
    """Blocking: (name or ``unknown``, a warning to log or ""). Runs in a thread."""
    sockaddr = (str(addr), 0) if addr.version == 4 else (str(addr), 0, 0, 0)
    try:
        text, _ = socket.getnameinfo(sockaddr, socket.NI_NAMEREQD)
    except (OSError, UnicodeError):
        return UNKNOWN, ""
    name = valid_hostname(text)
    if name is None:
        return UNKNOWN, f"malformed hostname {text[:300]!r} for address {addr}"
    family = socket.AF_INET if addr.version == 4 else socket.AF_INET6
    try:
        infos = socket.getaddrinfo(name, None, family=family, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        if exc.errno == socket.EAI_AGAIN:
            return UNKNOWN, f"hostname {name} verification failed: {exc.strerror}"
        return UNKNOWN, f"hostname {name} does not resolve to address {addr}"
    except (OSError, UnicodeError) as exc:
        return UNKNOWN, f"hostname {name} verification failed: {exc}"
    for info in infos:
        if parse_address(str(info[4][0])) == addr:
            return name, ""
    return UNKNOWN, f"hostname {name} does not resolve to address {addr}"


class SystemLookups:
    """The host resolver's lookups of one process, at most ``limit`` in flight, each in a
    daemon thread of its own (module docstring); ``limit`` may be changed at any time. The
    count restarts after a fork: a child inherits the parent's count but none of its threads."""

    def __init__(self, limit: int = SYSTEM_LOOKUPS) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        """Lookups of this process whose thread has not finished (cancelled waits included)."""
        with self._lock:
            return self._in_flight if self._pid == os.getpid() else 0

    def _take_slot(self) -> None:
        with self._lock:
            if self._pid != os.getpid():
                self._pid, self._in_flight = os.getpid(), 0
            if self._in_flight >= self.limit:
                raise _Busy
            self._in_flight += 1

    def _free_slot(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                self._in_flight -= 1

    async def name(self, addr: Address) -> str:
        """The forward-confirmed name of ``addr`` or ``unknown``; raises _Busy when every
        slot is taken. Cancelling the wait leaves the thread to finish on its own (a C
        library call cannot be interrupted); its slot is freed only then."""
        self._take_slot()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[str, str]] = loop.create_future()

        def deliver(result: tuple[str, str]) -> None:
            if not future.done():
                future.set_result(result)

        def run() -> None:
            try:
                result = _system_lookup(addr)
            except Exception as exc:   # noqa: BLE001 - a thread must hand back, not die
                result = UNKNOWN, f"lookup of address {addr} failed: {exc!r}"
            finally:
                self._free_slot()
            with contextlib.suppress(RuntimeError):   # the loop has closed meanwhile
                loop.call_soon_threadsafe(deliver, result)

        try:
            threading.Thread(target=run, name="pymta-peername", daemon=True).start()
        except RuntimeError:   # no thread to be had: the same as no slot
            self._free_slot()
            raise _Busy from None
        name, warning = await future
        if warning:
            log.warning("%s", warning)
        return name


_SYSTEM = SystemLookups()


# ------------------------------------------------------------------------------ entry points


async def _lookup(addr: Address, resolver: _Querier | None, timeout: float,
                  system: SystemLookups) -> str:
    """The name, ``unknown`` for every failure and timeout; raises _Busy only."""
    try:
        async with asyncio.timeout(timeout):
            if resolver is None:
                return await system.name(addr)
            return await _dns_name(addr, resolver)
    except _Busy:
        raise
    except TimeoutError:
        return UNKNOWN
    except Exception as exc:   # noqa: BLE001 - a name lookup never fails a connection
        log.warning("lookup of the name of %s failed: %r", addr, exc)
        return UNKNOWN


async def client_name(ip: str, resolver: _Querier | None = None, *,
                      timeout: float = DEFAULT_TIMEOUT,
                      system: SystemLookups | None = None) -> str:
    """The forward-confirmed name of the client at ``ip``, lower-case, or ``unknown``;
    never raises, never takes (much) longer than ``timeout`` seconds.

    ``resolver`` (the server's :class:`~pymta.dns.DNSResolver`) looks up through DNS; None
    uses the host's resolver (``system``: this process's :class:`SystemLookups` unless
    given). No cache: see :class:`PeerNameResolver`."""
    addr = parse_address(ip)
    if addr is None:
        return UNKNOWN
    try:
        return await _lookup(addr, resolver, timeout, system or _SYSTEM)
    except _Busy:
        return UNKNOWN


class PeerNameResolver:
    """The client-name lookup of one server: :func:`client_name` with its configuration,
    and a cache of names and of ``unknown`` (``cache_ttl`` seconds, at most ``cache_size``
    addresses, the least recently used dropped first; ``cache_ttl=0``: none). A client
    refused for lack of a host-resolver slot is not cached: that says nothing of its name.

    ``enabled=False`` (``PYMTA_PEERNAME_LOOKUP=no``) makes every client ``unknown`` without
    a lookup, as Postfix's ``smtpd_peername_lookup = no`` does.

    Clients of one address that arrive while its lookup runs wait for that lookup (a task of
    its own: a waiter that goes away, its client gone, stops neither it nor the others).
    """

    def __init__(self, resolver: _Querier | None = None, *, timeout: float = DEFAULT_TIMEOUT,
                 enabled: bool = True, cache_ttl: float = CACHE_TTL,
                 cache_size: int = CACHE_SIZE, system: SystemLookups | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.resolver = resolver
        self.timeout = timeout
        self.enabled = enabled
        self.cache_ttl = cache_ttl
        self.cache_size = cache_size
        self._system = system or _SYSTEM
        self._clock = clock
        self._cache: OrderedDict[Address, tuple[float, str]] = OrderedDict()
        self._running: dict[Address, asyncio.Task[str]] = {}

    @classmethod
    def from_config(cls, config: Any, resolver: DNSResolver | None = None,
                    ) -> PeerNameResolver:
        """``PYMTA_PEERNAME_LOOKUP`` and ``PYMTA_DNS_TIMEOUT``; DNS through ``resolver`` (the
        server's, else one built from ``config``) only when ``PYMTA_DNS_RESOLVER`` is set,
        else the host's resolver."""
        dns_path: DNSResolver | None = None
        if config.dns_resolver:
            dns_path = resolver if resolver is not None else DNSResolver.from_config(config)
        return cls(dns_path, timeout=config.dns_timeout, enabled=config.peername_lookup)

    async def name(self, ip: str) -> str:
        """The client's name for ``Received:`` and the logs, or ``unknown``; never raises."""
        if not self.enabled:
            return UNKNOWN
        addr = parse_address(ip)
        if addr is None:
            return UNKNOWN
        now = self._clock()
        hit = self._cache.get(addr)
        if hit is not None:
            if hit[0] > now:
                self._cache.move_to_end(addr)
                return hit[1]
            del self._cache[addr]
        task = self._running.get(addr)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._look_up(addr))
            self._running[addr] = task
            task.add_done_callback(lambda done: self._forget(addr, done))
        return await asyncio.shield(task)

    def _forget(self, addr: Address, task: asyncio.Task[str]) -> None:
        if self._running.get(addr) is task:
            del self._running[addr]

    async def _look_up(self, addr: Address) -> str:
        """One lookup of ``addr``, shared by every client of that address meanwhile; the
        answer cached."""
        try:
            name = await _lookup(addr, self.resolver, self.timeout, self._system)
        except _Busy:
            return UNKNOWN
        if self.cache_ttl > 0 and self.cache_size > 0:
            self._cache[addr] = (self._clock() + self.cache_ttl, name)
            self._cache.move_to_end(addr)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return name
