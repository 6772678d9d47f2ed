"""An in-process authoritative DNS server for tests (dnslib; UDP + TCP on 127.0.0.1).

Not dnslib's ``ZoneResolver``: that answers NXDOMAIN for a name that exists with another type.
Here NXDOMAIN is only for a name with no record of any type (NOERROR/NODATA otherwise), answers
are authoritative, CNAMEs inside the zone are followed, and tests can change records at any time
(``set_zone`` / ``add`` / ``remove`` / ``clear`` / ``reset``) or make a name fail
(``fail(name, "SERVFAIL")``, ``drop(name)`` = never answer, for timeouts; ``sign(suffix)``
sets AD for names under it, a CNAME chain only when every name in it is). ``queries`` lists
the questions asked since the last ``clear``/``reset``, so a test can see a lookup was not made.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import deque

from dnslib import QTYPE, RCODE, RR, DNSLabel, DNSRecord
from dnslib.dns import DNSError
from dnslib.server import BaseResolver, DNSLogger, DNSServer

from .base import ServiceError

PORT_ENV = "PYMTA_TEST_DNS_PORT"
DEFAULT_PORT = 5353
QUERIES_KEPT = 10_000    # a session-long server (benchmarks) must not grow without bound

DEFAULT_ZONE = """\
$TTL 300
$ORIGIN example.com.
@           IN SOA  ns1.example.com. hostmaster.example.com. ( 1 3600 600 86400 300 )
@           IN NS   ns1.example.com.
@           IN MX   10 mx1.example.com.
@           IN MX   20 mx2.example.com.
@           IN A    127.0.0.1
ns1         IN A    127.0.0.1
mx1         IN A    127.0.0.1
mx2         IN A    127.0.0.2
mx2         IN AAAA ::1
mail        IN A    127.0.0.1
@           IN TXT  "v=spf1 ip4:127.0.0.0/8 ip4:192.0.2.0/24 -all"
_dmarc      IN TXT  "v=DMARC1; p=reject; rua=mailto:dmarc@example.com"
nomx        IN A    127.0.0.3
alias       IN CNAME mail.example.com.
$ORIGIN example.net.
@           IN SOA  ns1.example.net. hostmaster.example.net. ( 1 3600 600 86400 300 )
@           IN MX   10 mx.example.net.
mx          IN A    127.0.0.1
@           IN TXT  "v=spf1 ip4:127.0.0.0/8 -all"
$ORIGIN example.org.
@           IN SOA  ns1.example.org. hostmaster.example.org. ( 1 3600 600 86400 300 )
@           IN MX   10 mx1.example.org.
@           IN MX   10 mx2.example.org.
@           IN MX   30 backup.example.org.
mx1         IN A    127.0.0.1
mx2         IN A    127.0.0.1
backup      IN A    127.0.0.1
$ORIGIN test.
nullmx      IN MX   0 .
"""


class _Resolver(BaseResolver):
    def __init__(self, owner: DNSTestServer) -> None:
        self.owner = owner

    def resolve(self, request: DNSRecord, handler: object) -> DNSRecord:
        reply = request.reply()
        reply.header.aa = 1
        qname = request.q.qname
        qtype = QTYPE[request.q.qtype]
        records, failures, drops = self.owner._snapshot()
        key = _norm(qname)
        self.owner._asked(key, qtype)
        if key in drops:
            raise DNSError("dropped by test")  # dnslib then sends nothing: the client times out
        # AD as a validating resolver sets it: only for what it authenticated, and only
        # when the query asked with AD (RFC 6840 §5.7; dnslib's reply() echoes the bit)
        reply.header.ad = int(bool(request.header.ad) and self.owner._is_signed(key))
        if key in failures:
            reply.header.rcode = getattr(RCODE, failures[key])
            return reply
        name = qname
        seen: set[str] = set()
        while True:
            found = [rr for rr in records if rr.rname == name]
            if not found:
                if not seen:  # the queried name itself has no record of any type
                    reply.header.rcode = RCODE.NXDOMAIN
                break
            match = [rr for rr in found if qtype == "ANY" or QTYPE[rr.rtype] == qtype]
            if match:
                for rr in match:
                    reply.add_answer(rr)
                break
            cname = [rr for rr in found if rr.rtype == QTYPE.CNAME]
            if not cname or str(name) in seen:
                break
            seen.add(str(name))
            reply.add_answer(cname[0])
            name = cname[0].rdata.label
            # a validating resolver authenticates a CNAME chain only when every link is
            if reply.header.ad and not self.owner._is_signed(_norm(name)):
                reply.header.ad = 0
        if not reply.rr:
            soa = self.owner._soa_for(qname, records)
            if soa is not None:
                reply.add_auth(soa)
        return reply


def _norm(name: str | DNSLabel) -> str:
    return str(name).lower().rstrip(".") + "."


class _QuietLogger(DNSLogger):
    def __init__(self) -> None:
        super().__init__(log="-request,-reply,-truncated,-error,-recv,-send,-data", prefix=False)


class DNSTestServer:
    """Authoritative test DNS on ``host:port`` (UDP and TCP; default 5353, env
    ``PYMTA_TEST_DNS_PORT``; a free port when the default is busy). ``resolver_spec`` is
    ``"127.0.0.1:PORT"`` (the ``PYMTA_DNS_RESOLVER`` format)."""

    host = "127.0.0.1"

    def __init__(self, zone: str = DEFAULT_ZONE, port: int | None = None) -> None:
        self.default_zone = zone
        self._want_port = port
        self.port = 0
        self._lock = threading.Lock()
        self._records: list[RR] = []
        self._failures: dict[str, str] = {}
        self._drops: set[str] = set()
        self._signed: set[str] = set()
        self._queries: deque[tuple[str, str]] = deque(maxlen=QUERIES_KEPT)
        self._servers: list[DNSServer] = []
        self.set_zone(zone)

    @property
    def resolver_spec(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return bool(self._servers)

    # records --------------------------------------------------------------------------------
    def set_zone(self, text: str) -> None:
        """Replace every record by the zone-file text (``$ORIGIN``/``$TTL`` allowed; names
        without ``$ORIGIN`` must be absolute, ending in ``.``)."""
        records = RR.fromZone(text)
        with self._lock:
            self._records = list(records)

    def add(self, rr_text: str) -> None:
        """Add records given in zone-file syntax, e.g. ``"x.example.com. 300 IN A 127.0.0.9"``
        (names absolute, or put ``$ORIGIN example.com.`` first)."""
        records = RR.fromZone(rr_text)
        with self._lock:
            self._records = [*self._records, *records]

    def remove(self, name: str, rtype: str | None = None) -> None:
        """Drop every record of ``name`` (of one type when ``rtype`` is given)."""
        key = _norm(name)
        with self._lock:
            self._records = [
                rr for rr in self._records
                if not (_norm(rr.rname) == key and (rtype is None or QTYPE[rr.rtype] == rtype))
            ]

    def clear(self) -> None:
        """No records at all (every name NXDOMAIN), no failures."""
        with self._lock:
            self._records = []
            self._failures = {}
            self._drops = set()
            self._signed = set()
            self._queries = deque(maxlen=QUERIES_KEPT)

    def reset(self) -> None:
        """Back to the default zone, no failures."""
        self.clear()
        self.set_zone(self.default_zone)

    def fail(self, name: str, rcode: str = "SERVFAIL") -> None:
        """Answer every query for ``name`` with ``rcode`` (SERVFAIL, REFUSED, NXDOMAIN ...)."""
        if not hasattr(RCODE, rcode):
            raise ValueError(f"unknown rcode {rcode!r}")
        with self._lock:
            self._failures = {**self._failures, _norm(name): rcode}

    def sign(self, suffix: str) -> None:
        """Answer for ``suffix`` and every name under it with the AD bit set, as a
        validating resolver does for DNSSEC-signed zones (the DANE tests)."""
        with self._lock:
            self._signed = {*self._signed, _norm(suffix)}

    def _is_signed(self, key: str) -> bool:
        with self._lock:
            signed = self._signed
        return any(key == s or key.endswith("." + s) for s in signed)

    def drop(self, name: str) -> None:
        """Never answer queries for ``name`` (the client's timeout path)."""
        with self._lock:
            self._drops = {*self._drops, _norm(name)}

    def records(self) -> list[str]:
        with self._lock:
            return [rr.toZone() for rr in self._records]

    @property
    def queries(self) -> list[tuple[str, str]]:
        """The questions asked since the last ``clear``/``reset`` (the last
        :data:`QUERIES_KEPT`): (name, type), in order, names lower-case and absolute
        (``"7.0.0.127.in-addr.arpa."``, ``"PTR"``)."""
        with self._lock:
            return list(self._queries)

    def _asked(self, name: str, qtype: str) -> None:
        with self._lock:
            self._queries.append((name, qtype))

    def _snapshot(self) -> tuple[list[RR], dict[str, str], set[str]]:
        with self._lock:
            return self._records, self._failures, self._drops

    @staticmethod
    def _soa_for(qname: DNSLabel, records: list[RR]) -> RR | None:
        best = None
        for rr in records:
            if rr.rtype == QTYPE.SOA and qname.matchSuffix(rr.rname) and (
                    best is None or len(rr.rname.label) > len(best.rname.label)):
                best = rr
        return best

    # server ---------------------------------------------------------------------------------
    def start(self) -> DNSTestServer:
        if self._servers:
            return self
        port = self._want_port
        fixed = port is not None
        if port is None and os.environ.get(PORT_ENV, "").strip():
            port, fixed = int(os.environ[PORT_ENV]), True
        if port == 0:   # any free port: a UDP port whose TCP twin is taken is retried
            fixed = False
        candidates = [port] if fixed else [DEFAULT_PORT if port is None else 0, 0, 0, 0, 0]
        last: Exception | None = None
        for cand in candidates:
            try:
                self._bind(int(cand))
                return self
            except OSError as e:
                last = e
                self.stop()
        raise ServiceError(f"test DNS: cannot bind UDP+TCP on {self.host}:{candidates}: {last}")

    def _bind(self, port: int) -> None:
        resolver = _Resolver(self)
        udp = DNSServer(resolver, port=port, address=self.host, logger=_QuietLogger())
        self._servers.append(udp)
        port = udp.server.server_address[1]
        tcp = DNSServer(resolver, port=port, address=self.host, tcp=True, logger=_QuietLogger())
        self._servers.append(tcp)
        for s in self._servers:
            s.start_thread()
        self.port = port

    def stop(self) -> None:
        servers, self._servers = self._servers, []
        for s in servers:
            with contextlib.suppress(Exception):
                if s.thread is not None and s.isAlive():
                    s.server.shutdown()
                s.server.server_close()

    # the Service-like interface used by stop_all()
    def terminate(self) -> None:
        self.stop()

    def wait_stopped(self) -> None:
        pass

    def __enter__(self) -> DNSTestServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def query(name: str, rtype: str, host: str, port: int, tcp: bool = False) -> DNSRecord:
    """A one-shot raw query (handy in tests that do not want dnspython)."""
    q = DNSRecord.question(name, rtype)
    data = q.send(host, port, tcp=tcp, timeout=2)
    return DNSRecord.parse(data)


__all__ = ["DEFAULT_ZONE", "DNSTestServer", "query"]
