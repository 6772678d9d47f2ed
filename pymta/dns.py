"""DNS for pymta: the resolver one MTA owns, and the MX lookup of RFC 5321 §5.

Every lookup a server makes (MX and address records for delivery, SPF, DKIM, ARC and DMARC)
goes through its :class:`DNSResolver`, built from its configuration
(``PYMTA_DNS_RESOLVER=host:port``, default: the system's ``/etc/resolv.conf``;
``PYMTA_DNS_TIMEOUT``) and handed by the wiring to every adapter that needs DNS. There is no
process-wide resolver: two ``MTA`` objects in one program each resolve through their own
servers (issue 11), and a component built without one (a test, a library user's own relay
agent) gets its own system resolver.

Implementation summary:

- :class:`DNSResolver` wraps one ``dns.asyncresolver.Resolver`` (built on first use) with a
  cache of its own; :meth:`DNSResolver.blocking` is a blocking twin sharing servers,
  timeouts and cache, for libraries that do their own DNS in a worker thread (pyspf).
  In front of dnspython's cache, a dictionary of positive answers by the name and type as
  asked (:meth:`DNSResolver.cached`, at most :data:`FRONT_CACHE_ENTRIES`, each until its
  TTL ends): dnspython answers even a cached lookup by building a ``Name`` and a
  resolution state, ~60 µs, which every message paid several times over (the SPF record,
  the DKIM key, the DMARC policy of the same few senders; issue 14's checks-on rate).
- :meth:`DNSResolver.mx_hosts` returns the exchanges of a domain in the order delivery tries
  them: ascending preference, equal preferences shuffled (RFC 5321 §5.1). A domain without
  MX records but with an address record is its own exchange (the "implicit MX"). A null MX
  (RFC 7505: a single ``0 .`` record) means the domain accepts no mail: permanent.
- Failures are classified once, here, as :class:`DNSFailure` with ``permanent`` set:
  NXDOMAIN and null MX are permanent (bounce); SERVFAIL, timeouts and unreachable servers
  are temporary (defer). Callers never see dnspython's exception zoo.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.inet
import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.resolver

DEFAULT_TIMEOUT = 5.0
#: Positive answers kept in front of dnspython's cache per resolver (each ~1 KB).
FRONT_CACHE_ENTRIES = 4096


class DNSFailure(Exception):
    """A lookup that failed; ``permanent`` says whether retrying later can help."""

    def __init__(self, text: str, *, permanent: bool) -> None:
        super().__init__(text)
        self.text = text
        self.permanent = permanent


def parse_nameserver(spec: str) -> tuple[str, int]:
    """``127.0.0.1:5353`` → ``("127.0.0.1", 5353)``; ``[::1]:53``, ``::1`` and a bare address
    (port 53) work too. Raises ValueError for anything else."""
    text = spec.strip()
    host, port = text, 53
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ValueError(f"not [address]:port: {spec!r}")
        host, rest = text[1:close], text[close + 1:]
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                raise ValueError(f"not [address]:port: {spec!r}")
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, port_text = text.split(":")
        if not port_text.isdigit():
            raise ValueError(f"not address:port: {spec!r}")
        port = int(port_text)
    if not dns.inet.is_address(host):
        raise ValueError(f"not an IP address: {host!r}")
    if not 0 < port < 65536:
        raise ValueError(f"not a port number: {spec!r}")
    return host, port


def make_resolver(nameservers: Sequence[str] = (), timeout: float = DEFAULT_TIMEOUT,
                  ) -> dns.asyncresolver.Resolver:
    """A resolver for ``nameservers`` (``host:port`` strings; all must share one port, a
    dnspython limit), or the system's resolv.conf when empty. ``timeout`` bounds a whole
    lookup, retries included."""
    if nameservers:
        parsed = [parse_nameserver(s) for s in nameservers]
        ports = {port for _, port in parsed}
        if len(ports) > 1:
            raise ValueError("all DNS resolvers must use the same port")
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [host for host, _ in parsed]
        resolver.port = ports.pop()
    else:
        resolver = dns.asyncresolver.Resolver(configure=True)
    resolver.lifetime = timeout
    resolver.timeout = min(timeout, 2.0)
    # AD asks a validating resolver to say which answers it authenticated (RFC 6840 §5.7)
    resolver.flags = dns.flags.RD | dns.flags.AD
    resolver.cache = dns.resolver.Cache()
    return resolver


# ------------------------------------------------------------------------------ lookups


@dataclass(frozen=True, slots=True)
class MXResult:
    """The exchanges of a domain in delivery order; ``implicit`` when there was no MX."""

    hosts: tuple[str, ...]
    implicit: bool = False
    # the names can be trusted: an MX answer the resolver authenticated (AD), or no MX
    # lookup behind them (an address literal, the domain itself): DANE may use them
    secure: bool = False


def order_mx(records: Sequence[tuple[int, str]], rng: random.Random | None = None,
             ) -> list[str]:
    """Exchange names by ascending preference, equal preferences in random order
    (RFC 5321 §5.1), duplicates removed. Names are lower-case, without the final dot."""
    shuffle = rng.shuffle if rng is not None else random.shuffle
    by_pref: dict[int, list[str]] = {}
    for pref, host in records:
        by_pref.setdefault(pref, []).append(host.rstrip(".").lower())
    out: list[str] = []
    for pref in sorted(by_pref):
        group = by_pref[pref]
        shuffle(group)
        for host in group:
            if host not in out:
                out.append(host)
    return out


def is_null_mx(records: Sequence[tuple[int, str]]) -> bool:
    """RFC 7505: exactly one MX record whose exchange is the root (``0 .``)."""
    return len(records) == 1 and records[0][1].rstrip(".") == ""


def _classify(exc: BaseException, name: str, rdtype: str) -> DNSFailure:
    if isinstance(exc, dns.resolver.NXDOMAIN):
        return DNSFailure(f"Host or domain name not found. Name service error for "
                          f"name={name} type={rdtype}: Host not found", permanent=True)
    if isinstance(exc, dns.resolver.LifetimeTimeout | dns.exception.Timeout):
        return DNSFailure(f"Host or domain name not found. Name service error for "
                          f"name={name} type={rdtype}: Host not found, try again",
                          permanent=False)
    if isinstance(exc, dns.resolver.NoNameservers):
        return DNSFailure(f"Name service error for name={name} type={rdtype}: "
                          f"server failure (SERVFAIL)", permanent=False)
    if isinstance(exc, dns.name.EmptyLabel | dns.name.LabelTooLong | dns.name.NameTooLong):
        return DNSFailure(f"malformed domain name {name!r}", permanent=True)
    return DNSFailure(f"Name service error for name={name} type={rdtype}: "
                      f"{type(exc).__name__}", permanent=False)


class AsyncResolverLike(Protocol):
    """What :class:`DNSResolver` asks of the resolver it wraps (``dns.asyncresolver.Resolver``
    or a test's fake): ``resolve`` raising dnspython's exceptions."""

    async def resolve(self, qname: str, rdtype: str, *, search: bool = False) -> Any: ...


class DNSResolver:
    """The DNS of one server (module docstring): servers and timeouts from its configuration,
    a cache of its own, classified failures. Built without I/O; the underlying
    ``dns.asyncresolver.Resolver`` is made on first use (the system's reads resolv.conf).

    ``resolver`` wraps an existing resolver instead (tests pass a fake answering from a dict).
    """

    def __init__(self, nameservers: Sequence[str] = (), timeout: float = DEFAULT_TIMEOUT, *,
                 resolver: AsyncResolverLike | None = None) -> None:
        if nameservers:   # ValueError now for a bad server, not at the first lookup
            for spec in nameservers:
                parse_nameserver(spec)
        self.nameservers = tuple(nameservers)
        self.timeout = timeout
        self._resolver: AsyncResolverLike | None = resolver
        self._front: dict[tuple[str, str], Any] = {}

    @classmethod
    def from_config(cls, config: Any) -> DNSResolver:
        """``PYMTA_DNS_RESOLVER`` and ``PYMTA_DNS_TIMEOUT`` (checked by ``load_config``)."""
        return cls(config.dns_resolver, config.dns_timeout)

    def __repr__(self) -> str:
        return f"DNSResolver({' '.join(self.nameservers) or 'system'})"

    @property
    def resolver(self) -> AsyncResolverLike:
        """The asynchronous resolver every lookup goes through."""
        if self._resolver is None:
            self._resolver = make_resolver(self.nameservers, self.timeout)
        return self._resolver

    async def resolve(self, name: str, rdtype: str) -> Any:
        """The raw dnspython answer (``search=False``); raises dnspython's exceptions, for
        callers with a classification of their own (DKIM, DMARC)."""
        answer = self.cached(name, rdtype)
        if answer is None:
            answer = await self.resolver.resolve(name, rdtype, search=False)
            self.remember(name, rdtype, answer)
        return answer

    def cached(self, name: str, rdtype: str) -> Any:
        """A positive answer to ``name``/``rdtype`` still within its TTL, without a lookup:
        from the front dictionary, else from dnspython's cache (a blocking twin's lookups
        land there); None when neither has one."""
        key = (name, rdtype)
        answer = self._front.get(key)
        if answer is not None:
            if answer.expiration > time.time():
                return answer
            self._front.pop(key, None)
        cache = getattr(self._resolver, "cache", None)
        if not isinstance(cache, dns.resolver.Cache):
            return None
        try:
            qname = dns.name.from_text(name)
            qtype = dns.rdatatype.from_text(rdtype)
        except (dns.exception.DNSException, ValueError):
            return None
        answer = cache.get((qname, qtype, dns.rdataclass.IN))
        if answer is not None and self.remember(name, rdtype, answer):
            return answer
        return None

    def remember(self, name: str, rdtype: str, answer: Any) -> bool:
        """Keep a positive dnspython answer in the front dictionary (the oldest entry goes
        when it is full); anything else (a test's fake answer, a negative one) is not kept."""
        if not isinstance(answer, dns.resolver.Answer) or answer.rrset is None:
            return False
        if len(self._front) >= FRONT_CACHE_ENTRIES:
            self._front.pop(next(iter(self._front)), None)
        self._front[(name, rdtype)] = answer
        return True

    def blocking(self) -> dns.resolver.Resolver:
        """A blocking ``dns.resolver.Resolver`` with this resolver's servers, port and
        timeouts, sharing its cache: for libraries that do their own blocking DNS in a worker
        thread (pyspf). Cheap; made per use."""
        source = self.resolver
        if not isinstance(source, dns.resolver.BaseResolver):
            raise TypeError(f"{source!r} has no blocking twin")
        twin = dns.resolver.Resolver(configure=False)
        twin.nameservers = list(source.nameservers)
        twin.port = source.port
        twin.lifetime = source.lifetime
        twin.timeout = source.timeout
        twin.search = []
        twin.flags = source.flags   # AD asked for too: its answers share the cache DANE reads
        twin.cache = source.cache
        return twin

    async def query(self, name: str, rdtype: str) -> list[Any] | None:
        """The answer's rdata, or None for NOERROR without records of this type (NODATA).
        Raises :class:`DNSFailure` for anything else."""
        rdata, _secure = await self.authenticated(name, rdtype)
        return rdata

    async def addresses(self, host: str) -> list[str]:
        """A and AAAA addresses of ``host`` (IPv4 first). An IP literal is returned as is.

        Raises DNSFailure (permanent for NXDOMAIN or no address at all, else temporary).
        """
        if dns.inet.is_address(host):
            return [host]
        out: list[str] = []
        temporary: DNSFailure | None = None
        nxdomain: DNSFailure | None = None
        for rdtype in ("A", "AAAA"):
            try:
                rdata = await self.query(host, rdtype)
            except DNSFailure as failure:
                if failure.permanent:
                    nxdomain = failure
                    break
                temporary = failure
                continue
            out.extend(r.address for r in rdata or ())
        if out:
            return out
        if nxdomain is not None:
            raise nxdomain
        if temporary is not None:
            raise temporary
        raise DNSFailure(f"Host or domain name not found. Name service error for "
                         f"name={host} type=A: Host found but no data record of requested "
                         "type", permanent=True)

    async def mx_hosts(self, domain: str, rng: random.Random | None = None) -> MXResult:
        """The exchanges for ``domain`` in delivery order (see the module docstring)."""
        domain = domain.rstrip(".").lower()
        if domain.startswith("[") and domain.endswith("]"):  # address literal
            literal = domain[1:-1]
            literal = literal[5:] if literal.lower().startswith("ipv6:") else literal
            return MXResult((literal,), implicit=True, secure=True)
        rdata, secure = await self.authenticated(domain, "MX")
        if not rdata:
            await self.addresses(domain)  # raises permanent for NXDOMAIN / no address either
            return MXResult((domain,), implicit=True, secure=True)
        records = [(int(r.preference), r.exchange.to_text()) for r in rdata]
        if any(host.rstrip(".") == "" for _, host in records):
            if is_null_mx(records):
                raise DNSFailure(f"Domain {domain} does not accept mail (nullMX)",
                                 permanent=True)
            records = [(p, h) for p, h in records if h.rstrip(".")]
        return MXResult(tuple(order_mx(records, rng)), secure=secure)

    async def authenticated(self, name: str, rdtype: str) -> tuple[list[Any] | None, bool]:
        """The answer's rdata (None for no records of this type: NODATA), and whether the
        resolver marked it authenticated (the AD bit: pymta trusts ``PYMTA_DNS_RESOLVER`` to
        validate DNSSEC, as Postfix trusts its local resolver). NXDOMAIN and failures raise
        :class:`DNSFailure`."""
        try:
            answer = await self.resolve(name, rdtype)
        except dns.resolver.NoAnswer:
            return None, False
        except Exception as exc:  # every dnspython failure is classified, none escapes
            raise _classify(exc, name, rdtype) from exc
        response = getattr(answer, "response", None)
        secure = response is not None and bool(response.flags & dns.flags.AD)
        return list(answer), secure

    async def authenticated_canonical(self, name: str, rdtype: str,
                                      ) -> tuple[list[Any] | None, bool, str]:
        """As :meth:`authenticated`, and the name the records were found at once CNAMEs are
        followed (``name`` itself when it is no alias, and for NODATA), lower-case and
        without the final dot: DANE looks for a CNAME'd MX host's TLSA records at that
        target first (RFC 7672 §2.2.2). The AD bit covers the whole chain, as a validating
        resolver sets it only when every link is authenticated."""
        plain = name.rstrip(".").lower()
        try:
            answer = await self.resolve(name, rdtype)
        except dns.resolver.NoAnswer:
            return None, False, plain
        except Exception as exc:  # every dnspython failure is classified, none escapes
            raise _classify(exc, name, rdtype) from exc
        response = getattr(answer, "response", None)
        secure = response is not None and bool(response.flags & dns.flags.AD)
        canonical = getattr(answer, "canonical_name", None)     # a test's fake may lack it
        target = str(canonical).rstrip(".").lower() if canonical is not None else plain
        return list(answer), secure, target or plain
