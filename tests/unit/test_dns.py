"""pymta.dns: MX ordering, null MX, failure classification, resolver configuration (issue 4)."""

from __future__ import annotations

import random

import dns.rdata
import dns.resolver
import pytest

from pymta import dns as pdns


def test_order_mx_by_preference_and_dedup() -> None:
    records = [(20, "mx2.example.com."), (10, "MX1.example.com."), (30, "mx1.example.com.")]
    assert pdns.order_mx(records) == ["mx1.example.com", "mx2.example.com"]


def test_equal_preferences_are_shuffled() -> None:
    records = [(10, "a.example."), (10, "b.example."), (10, "c.example."), (20, "z.example.")]
    seen = set()
    for seed in range(50):
        order = pdns.order_mx(records, random.Random(seed))
        assert order[-1] == "z.example"
        seen.add(tuple(order[:3]))
    assert len(seen) > 1  # not always the same order


def test_null_mx() -> None:
    assert pdns.is_null_mx([(0, ".")])
    assert not pdns.is_null_mx([(0, "."), (10, "mx.example.")])
    assert not pdns.is_null_mx([(10, "mx.example.")])


@pytest.mark.parametrize("spec,want", [
    ("127.0.0.1:5353", ("127.0.0.1", 5353)),
    ("127.0.0.1", ("127.0.0.1", 53)),
    ("[::1]:5353", ("::1", 5353)),
    ("::1", ("::1", 53)),
])
def test_parse_nameserver(spec: str, want: tuple[str, int]) -> None:
    assert pdns.parse_nameserver(spec) == want


@pytest.mark.parametrize("spec", ["dns.example:53", "127.0.0.1:x", "127.0.0.1:0", "[::1"])
def test_parse_nameserver_rejects(spec: str) -> None:
    with pytest.raises(ValueError):
        pdns.parse_nameserver(spec)


def test_make_resolver_points_at_host_port() -> None:
    r = pdns.make_resolver(["127.0.0.1:5353"], timeout=1.5)
    assert r.nameservers == ["127.0.0.1"] and r.port == 5353 and r.lifetime == 1.5
    with pytest.raises(ValueError):
        pdns.make_resolver(["127.0.0.1:5353", "127.0.0.2:53"])


class FakeResolver:
    """Answers from a dict {(name, type): list of rdata text | exception}."""

    def __init__(self, data: dict[tuple[str, str], object]) -> None:
        self.data = data

    async def resolve(self, name: str, rdtype: str, search: bool = False):
        value = self.data.get((name, rdtype))
        if value is None:
            if any(n == name for n, _ in self.data):
                raise dns.resolver.NoAnswer()
            raise dns.resolver.NXDOMAIN()
        if isinstance(value, BaseException):
            raise value
        return [dns.rdata.from_text("IN", rdtype, text) for text in value]


@pytest.fixture
def fake():
    """Issue 11: no process-wide resolver to replace; a DNSResolver over the fake."""
    def install(data):
        return pdns.DNSResolver(resolver=FakeResolver(data))
    yield install


async def test_mx_lookup(fake) -> None:
    r = fake({("example.com", "MX"): ["20 mx2.example.com.", "10 mx1.example.com."]})
    result = await r.mx_hosts("Example.COM.")
    assert result.hosts == ("mx1.example.com", "mx2.example.com") and not result.implicit


async def test_no_mx_falls_back_to_address(fake) -> None:
    r = fake({("nomx.example.com", "A"): ["127.0.0.3"]})
    result = await r.mx_hosts("nomx.example.com")
    assert result.hosts == ("nomx.example.com",) and result.implicit
    assert await r.addresses("nomx.example.com") == ["127.0.0.3"]


async def test_null_mx_is_permanent(fake) -> None:
    r = fake({("nullmx.example", "MX"): ["0 ."]})
    with pytest.raises(pdns.DNSFailure) as info:
        await r.mx_hosts("nullmx.example")
    assert info.value.permanent and "nullMX" in info.value.text


async def test_nxdomain_is_permanent(fake) -> None:
    r = fake({})
    with pytest.raises(pdns.DNSFailure) as info:
        await r.mx_hosts("nowhere.example")
    assert info.value.permanent


@pytest.mark.parametrize("exc", [dns.resolver.NoNameservers(), dns.resolver.LifetimeTimeout(
    timeout=1.0, errors=[])])
async def test_servfail_and_timeout_are_temporary(fake, exc) -> None:
    r = fake({("flaky.example", "MX"): exc})
    with pytest.raises(pdns.DNSFailure) as info:
        await r.mx_hosts("flaky.example")
    assert not info.value.permanent


async def test_address_literal_and_ip() -> None:
    assert (await pdns.DNSResolver().mx_hosts("[192.0.2.1]")).hosts == ("192.0.2.1",)
    assert await pdns.DNSResolver().addresses("192.0.2.1") == ["192.0.2.1"]


async def test_a_and_aaaa(fake) -> None:
    r = fake({("mx2.example.com", "A"): ["127.0.0.2"], ("mx2.example.com", "AAAA"): ["::1"]})
    assert await r.addresses("mx2.example.com") == ["127.0.0.2", "::1"]


async def test_host_without_addresses_is_permanent(fake) -> None:
    r = fake({("noaddr.example", "TXT"): ['"x"']})
    with pytest.raises(pdns.DNSFailure) as info:
        await r.addresses("noaddr.example")
    assert info.value.permanent
