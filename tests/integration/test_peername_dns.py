"""The client's name through PYMTA_DNS_RESOLVER, against the real test DNS server (issue 11:
``Received: from HELO (unknown [IP])`` for every client): a PTR counts only when its name
forward-confirms and is a valid host name; failures and timeouts are ``unknown``.

Records are added with TTL 0, and each test builds its own resolver, so dnspython's cache
never answers for the server.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import dns.reversename
import pytest

from pymta.dns import DNSResolver, make_resolver
from pymta.peername import UNKNOWN, PeerNameResolver, client_name
from tests.conftest import make_config
from tests.services.dns import DNSTestServer

CLIENT = "192.0.2.25"
CLIENT6 = "2001:db8::25"


def ptr(ip: str, *names: str) -> str:
    """Zone lines: PTR records of ``ip`` (in the order given), TTL 0."""
    owner = dns.reversename.from_address(ip).to_text()
    return "\n".join(f"{owner} 0 IN PTR {name}" for name in names)


def resolver(zone: DNSTestServer, timeout: float = 3.0) -> DNSResolver:
    return DNSResolver([zone.resolver_spec], timeout)


def uncached(zone: DNSTestServer) -> DNSResolver:
    """A resolver without dnspython's cache (which keeps NXDOMAIN answers whatever their
    TTL): what these tests see cached is :class:`PeerNameResolver`'s own cache."""
    inner = make_resolver([zone.resolver_spec], 3.0)
    inner.cache = None
    return DNSResolver(resolver=inner)


async def test_issue11_ptr_that_forward_confirms_gives_the_name(dns_zone: DNSTestServer,
                                                                caplog) -> None:
    dns_zone.add(ptr(CLIENT, "Client.Example.COM."))
    dns_zone.add(f"client.example.com. 0 IN A {CLIENT}")
    with caplog.at_level(logging.WARNING, logger="pymta"):
        assert await client_name(CLIENT, resolver(dns_zone), timeout=3.0) == "client.example.com"
    assert not caplog.records


async def test_ptr_whose_name_resolves_elsewhere_is_unknown(dns_zone: DNSTestServer,
                                                            caplog) -> None:
    dns_zone.add(ptr(CLIENT, "liar.example.com."))
    dns_zone.add("liar.example.com. 0 IN A 192.0.2.99")
    with caplog.at_level(logging.WARNING, logger="pymta"):
        assert await client_name(CLIENT, resolver(dns_zone), timeout=3.0) == UNKNOWN
    assert [r.getMessage() for r in caplog.records] == [
        f"hostname liar.example.com does not resolve to address {CLIENT}"]


async def test_ptr_whose_name_does_not_exist_is_unknown(dns_zone: DNSTestServer) -> None:
    dns_zone.add(ptr(CLIENT, "gone.example.com."))   # NXDOMAIN for the forward lookup
    assert await client_name(CLIENT, resolver(dns_zone), timeout=3.0) == UNKNOWN


@pytest.mark.parametrize("name", [
    r"evil\059dkim\061pass.example.com.",   # evil;dkim=pass
    r"evil\032x.example.com.",              # a space
    r"crlf\013\010x.example.com.",          # CR LF
    "under_score.example.com.",
    "192.0.2.25.",                          # numeric: an address, not a name
])
async def test_ptr_with_a_bad_name_is_unknown(dns_zone: DNSTestServer, name: str) -> None:
    """The name would forward-confirm (its A record is there): only its syntax refuses it,
    since it would go into a header field and log lines as it is."""
    dns_zone.add(ptr(CLIENT, name))
    dns_zone.add(f"{name} 0 IN A {CLIENT}")
    assert await client_name(CLIENT, resolver(dns_zone), timeout=3.0) == UNKNOWN


async def test_no_ptr_is_unknown_without_a_warning(dns_zone: DNSTestServer, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="pymta"):
        assert await client_name(CLIENT, resolver(dns_zone), timeout=3.0) == UNKNOWN
    assert not caplog.records


async def test_servfail_is_unknown(dns_zone: DNSTestServer) -> None:
    dns_zone.fail(dns.reversename.from_address(CLIENT).to_text(), "SERVFAIL")
    assert await client_name(CLIENT, resolver(dns_zone), timeout=3.0) == UNKNOWN


async def test_server_that_never_answers_the_ptr_is_unknown_within_the_timeout(
        dns_zone: DNSTestServer) -> None:
    dns_zone.drop(dns.reversename.from_address(CLIENT).to_text())
    start = time.monotonic()
    assert await client_name(CLIENT, resolver(dns_zone, 10.0), timeout=1.0) == UNKNOWN
    assert time.monotonic() - start < 1.0 + 1.5


async def test_timeout_bounds_the_forward_lookup_too(dns_zone: DNSTestServer) -> None:
    """One limit for the whole lookup, PTR and forward confirmation together."""
    dns_zone.add(ptr(CLIENT, "slow.example.com."))
    dns_zone.drop("slow.example.com.")
    start = time.monotonic()
    assert await client_name(CLIENT, resolver(dns_zone, 10.0), timeout=1.0) == UNKNOWN
    assert time.monotonic() - start < 1.0 + 1.5


async def test_ipv6_client_confirms_by_aaaa(dns_zone: DNSTestServer) -> None:
    dns_zone.add(ptr(CLIENT6, "v6.example.com."))
    dns_zone.add(f"v6.example.com. 0 IN AAAA {CLIENT6}")
    assert await client_name(CLIENT6, resolver(dns_zone), timeout=3.0) == "v6.example.com"


async def test_ipv6_client_is_not_confirmed_by_an_a_record(dns_zone: DNSTestServer) -> None:
    dns_zone.add(ptr(CLIENT6, "v4only.example.com."))
    dns_zone.add(f"v4only.example.com. 0 IN A {CLIENT}")
    assert await client_name(CLIENT6, resolver(dns_zone), timeout=3.0) == UNKNOWN


async def test_ipv4_mapped_client_is_looked_up_as_ipv4(dns_zone: DNSTestServer) -> None:
    dns_zone.add(ptr(CLIENT, "client.example.com."))
    dns_zone.add(f"client.example.com. 0 IN A {CLIENT}")
    got = await client_name(f"::ffff:{CLIENT}", resolver(dns_zone), timeout=3.0)
    assert got == "client.example.com"


async def test_first_confirming_ptr_name_wins(dns_zone: DNSTestServer) -> None:
    dns_zone.add(ptr(CLIENT, "other.example.com.", "bad\\032name.example.com.",
                     "second.example.com.", "third.example.com."))
    dns_zone.add("other.example.com. 0 IN A 192.0.2.99")
    for name in ("second", "third"):
        dns_zone.add(f"{name}.example.com. 0 IN A {CLIENT}")
    assert await client_name(CLIENT, resolver(dns_zone), timeout=3.0) == "second.example.com"


async def test_at_most_five_ptr_names_are_checked(dns_zone: DNSTestServer) -> None:
    names = [f"n{i}.example.com." for i in range(1, 7)]
    dns_zone.add(ptr(CLIENT, *names))
    dns_zone.add(f"n6.example.com. 0 IN A {CLIENT}")   # only the sixth would confirm
    assert await client_name(CLIENT, resolver(dns_zone), timeout=3.0) == UNKNOWN
    dns_zone.add(f"n5.example.com. 0 IN A {CLIENT}")
    assert await client_name(CLIENT, resolver(dns_zone), timeout=3.0) == "n5.example.com"


# ------------------------------------------------------------------ one resolver per server


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_names_and_unknown_are_cached_for_a_while(dns_zone: DNSTestServer) -> None:
    clock = Clock()
    peers = PeerNameResolver(uncached(dns_zone), timeout=3.0, cache_ttl=60.0, clock=clock)
    assert await peers.name(CLIENT) == UNKNOWN            # no PTR yet
    dns_zone.add(ptr(CLIENT, "client.example.com."))
    dns_zone.add(f"client.example.com. 0 IN A {CLIENT}")
    assert await peers.name(CLIENT) == UNKNOWN            # still cached
    clock.now += 61
    assert await peers.name(CLIENT) == "client.example.com"
    dns_zone.remove("client.example.com.")
    clock.now += 30
    assert await peers.name(CLIENT) == "client.example.com"   # cached
    clock.now += 31
    assert await peers.name(CLIENT) == UNKNOWN


async def test_cache_is_bounded(dns_zone: DNSTestServer) -> None:
    peers = PeerNameResolver(uncached(dns_zone), timeout=3.0, cache_size=2)
    first, second, third = "192.0.2.31", "192.0.2.32", "192.0.2.33"
    for ip in (first, second, third):
        assert await peers.name(ip) == UNKNOWN
    for ip, name in ((first, "first"), (second, "second")):
        dns_zone.add(ptr(ip, f"{name}.example.com."))
        dns_zone.add(f"{name}.example.com. 0 IN A {ip}")
    assert await peers.name(second) == UNKNOWN              # still cached
    assert await peers.name(first) == "first.example.com"   # the oldest was dropped


async def test_from_config_looks_up_through_the_configured_dns(tmp_path: Path,
                                                               dns_zone: DNSTestServer) -> None:
    dns_zone.add(ptr(CLIENT, "client.example.com."))
    dns_zone.add(f"client.example.com. 0 IN A {CLIENT}")
    config = make_config(tmp_path, dns_resolver=(dns_zone.resolver_spec,), dns_timeout=3.0)
    assert await PeerNameResolver.from_config(config).name(CLIENT) == "client.example.com"
    off = make_config(tmp_path, dns_resolver=(dns_zone.resolver_spec,), peername_lookup=False)
    assert await PeerNameResolver.from_config(off).name(CLIENT) == UNKNOWN


async def test_issue11_client_name_burst_from_one_address_is_one_query_each(
        dns_zone: DNSTestServer) -> None:
    """A hundred connections of one client in the same moment: one PTR query and one
    forward query, not a hundred of each (the DNS server is the whole MTA's)."""
    dns_zone.add(ptr(CLIENT, "client.example.com."))
    dns_zone.add(f"client.example.com. 0 IN A {CLIENT}")
    peers = PeerNameResolver(uncached(dns_zone), timeout=3.0)
    names = await asyncio.gather(*(peers.name(CLIENT) for _ in range(100)))
    assert names == ["client.example.com"] * 100
    owner = dns.reversename.from_address(CLIENT).to_text().lower()
    asked = [q for q in dns_zone.queries if q[0] in (owner, "client.example.com.")]
    assert asked == [(owner, "PTR"), ("client.example.com.", "A")], asked
