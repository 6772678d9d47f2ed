"""pymta.peername through the host's resolver (no PYMTA_DNS_RESOLVER), the host-name check, and
PYMTA_PEERNAME_LOOKUP (issue 11: the client's name in ``Received:`` was always ``unknown``).
The DNS path against a real DNS server is in tests/integration/test_peername_dns.py."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from pymta.config.errors import ConfigError
from pymta.config.load import load_config
from pymta.peername import (
    UNKNOWN,
    PeerNameResolver,
    SystemLookups,
    client_name,
    valid_hostname,
)

ENV = {"MYHOSTNAME": "mx.example.com", "MAIL_DOMAIN": "example.com"}


def host_name_of(ip: str) -> str:
    """What the host's resolver says 127.0.0.1 is called (``/etc/hosts``: ``localhost`` on
    nearly every machine), as Postfix would find it."""
    try:
        return socket.getnameinfo((ip, 0), socket.NI_NAMEREQD)[0].lower()
    except OSError:
        return UNKNOWN


async def test_issue11_loopback_client_gets_its_name_from_the_host_resolver() -> None:
    want = host_name_of("127.0.0.1")
    assert want != UNKNOWN, "this host's resolver has no name for 127.0.0.1"
    assert await client_name("127.0.0.1", timeout=5.0) == want


async def test_ipv4_mapped_address_is_looked_up_as_ipv4() -> None:
    assert await client_name("::ffff:127.0.0.1", timeout=5.0) == host_name_of("127.0.0.1")


async def test_address_without_ptr_is_unknown_within_the_timeout() -> None:
    start = time.monotonic()
    assert await client_name("192.0.2.1", timeout=2.0) == UNKNOWN   # TEST-NET-1: no PTR
    assert time.monotonic() - start < 2.0 + 1.5


@pytest.mark.parametrize("ip", ["", "not-an-address", "127.0.0.1; rm", "300.1.1.1"])
async def test_not_an_address_is_unknown(ip: str) -> None:
    assert await client_name(ip, timeout=1.0) == UNKNOWN


async def test_no_free_lookup_slot_gives_unknown_at_once() -> None:
    """All host-resolver slots taken: ``unknown`` now, never a queue of waiting threads."""
    start = time.monotonic()
    assert await client_name("127.0.0.1", timeout=5.0, system=SystemLookups(limit=0)) == UNKNOWN
    assert time.monotonic() - start < 0.5


async def test_lookup_slots_are_given_back() -> None:
    system = SystemLookups(limit=3)
    names = await asyncio.gather(*(client_name("127.0.0.1", timeout=5.0, system=system)
                                   for _ in range(20)))
    assert set(names) <= {host_name_of("127.0.0.1"), UNKNOWN}
    assert system.in_flight == 0
    assert await client_name("127.0.0.1", timeout=5.0, system=system) != UNKNOWN


async def test_busy_unknown_is_not_cached() -> None:
    """A client refused for lack of a slot gets its name on its next connection."""
    busy = SystemLookups(limit=0)
    peers = PeerNameResolver(system=busy, timeout=5.0)
    assert await peers.name("127.0.0.1") == UNKNOWN
    busy.limit = 1
    assert await peers.name("127.0.0.1") == host_name_of("127.0.0.1")


@pytest.mark.parametrize("text,want", [
    ("mail.example.com", "mail.example.com"),
    ("Mail.Example.COM.", "mail.example.com"),
    ("localhost", "localhost"),
    ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ("a-b.example.com", "a-b.example.com"),
    ("1host.example", "1host.example"),
])
def test_valid_hostnames(text: str, want: str) -> None:
    assert valid_hostname(text) == want


@pytest.mark.parametrize("text", [
    "evil;dkim=pass", "evil;dkim=pass.example.com", "evil\\;dkim\\=pass.example.com.",
    "a b.example.com", "a\nb.example.com", "a\rX-Injected: 1", "a\x00b.example",
    "under_score.example.com", "-lead.example.com", "trail-.example.com", "a..b.example",
    ".", "", "1.2.3.4", "192.0.2.1.", "\u212aelvin.example", "bücher.example",
    "x" * 64 + ".example.com", ("a" * 63 + ".") * 4 + "example",
])
def test_invalid_hostnames(text: str) -> None:
    assert valid_hostname(text) is None


# ------------------------------------------------------------------------------ configuration


def test_peername_lookup_setting() -> None:
    assert load_config(ENV).peername_lookup is True
    assert load_config({**ENV, "PYMTA_PEERNAME_LOOKUP": "no"}).peername_lookup is False
    with pytest.raises(ConfigError, match=r"^PYMTA_PEERNAME_LOOKUP: not yes or no: 'maybe'"):
        load_config({**ENV, "PYMTA_PEERNAME_LOOKUP": "maybe"})


async def test_peername_lookup_no_makes_every_client_unknown() -> None:
    config = load_config({**ENV, "PYMTA_PEERNAME_LOOKUP": "no"})
    assert await PeerNameResolver.from_config(config).name("127.0.0.1") == UNKNOWN


async def test_without_dns_resolver_setting_the_host_resolver_is_used() -> None:
    peers = PeerNameResolver.from_config(load_config(ENV))
    assert peers.resolver is None
    assert await peers.name("127.0.0.1") == host_name_of("127.0.0.1")


async def test_issue11_client_name_burst_from_one_address_shares_one_lookup() -> None:
    """Twenty clients of one address at once, one host-resolver slot: they wait for the one
    lookup and all get the name (each looking up on its own, nineteen found no free slot
    and were ``unknown``)."""
    system = SystemLookups(limit=1)
    peers = PeerNameResolver(system=system, timeout=5.0)
    names = await asyncio.gather(*(peers.name("127.0.0.1") for _ in range(20)))
    assert names == [host_name_of("127.0.0.1")] * 20
    assert system.in_flight == 0


async def test_issue11_client_name_lookup_outlives_a_client_that_left() -> None:
    """The first client of an address goes away (its wait is cancelled) while its name is
    looked up: the lookup goes on for the others, and its answer is cached."""
    system = SystemLookups(limit=1)
    peers = PeerNameResolver(system=system, timeout=5.0)
    first = asyncio.ensure_future(peers.name("127.0.0.1"))
    second = asyncio.ensure_future(peers.name("127.0.0.1"))
    await asyncio.sleep(0)
    first.cancel()
    assert await second == host_name_of("127.0.0.1")
    assert first.cancelled()
    system.limit = 0          # no slot left: only the cache can answer now
    assert await peers.name("127.0.0.1") == host_name_of("127.0.0.1")
