"""The resolver's front cache and SPF's evaluation from cached DNS (issue 14: the checks-on
rate), against the real test DNS server: answers are reused within their TTL and not after,
and an SPF evaluation that would need DNS is never answered from a partial cache."""

from __future__ import annotations

import time

import pytest

from pymta import dns as pymta_dns
from pymta.dns import DNSResolver
from pymta.pipeline.spf import SPFCheck, evaluate

ZONE = """\
$TTL 300
$ORIGIN pass.test.
@   IN TXT "v=spf1 ip4:127.0.0.0/8 -all"
$ORIGIN short.test.
@   1 IN TXT "v=spf1 ip4:127.0.0.0/8 -all"
$ORIGIN explained.test.
@   IN TXT "v=spf1 ip4:192.0.2.0/24 -all exp=why.explained.test"
why IN TXT "%{s} may not send from %{i}"
$ORIGIN chain.test.
@   IN TXT "v=spf1 include:inner.chain.test -all"
inner IN TXT "v=spf1 ip4:127.0.0.0/8 -all"
"""


@pytest.fixture
def zone(dns_zone):
    dns_zone.set_zone(ZONE)
    return dns_zone


def _asked(zone, name: str) -> int:
    return sum(1 for qname, _qtype in zone.queries if qname.rstrip(".") == name)


async def test_an_answer_is_reused_within_its_ttl(zone) -> None:
    resolver = DNSResolver([zone.resolver_spec], 2.0)
    first = await resolver.resolve("pass.test", "TXT")
    zone.remove("pass.test")                       # the cache, not the server, answers now
    again = await resolver.resolve("pass.test", "TXT")
    assert [r.to_text() for r in again] == [r.to_text() for r in first]
    assert _asked(zone, "pass.test") == 1


async def test_the_front_cache_answers_without_dnspythons_and_is_bounded(
        zone, monkeypatch: pytest.MonkeyPatch) -> None:
    """The front dictionary itself (dnspython's cache emptied) answers within the TTL; it
    keeps at most FRONT_CACHE_ENTRIES, the oldest going first."""
    monkeypatch.setattr(pymta_dns, "FRONT_CACHE_ENTRIES", 2)
    resolver = DNSResolver([zone.resolver_spec], 2.0)
    for name in ("pass.test", "chain.test"):
        await resolver.resolve(name, "TXT")
    resolver.resolver.cache.flush()
    assert resolver.cached("pass.test", "TXT") is not None
    await resolver.resolve("inner.chain.test", "TXT")       # a third: pass.test goes
    resolver.resolver.cache.flush()
    assert resolver.cached("pass.test", "TXT") is None
    assert resolver.cached("chain.test", "TXT") is not None
    assert resolver.cached("inner.chain.test", "TXT") is not None


async def test_an_answer_is_asked_again_after_its_ttl(zone) -> None:
    resolver = DNSResolver([zone.resolver_spec], 2.0)
    await resolver.resolve("short.test", "TXT")
    assert resolver.cached("short.test", "TXT") is not None
    time.sleep(1.1)
    assert resolver.cached("short.test", "TXT") is None
    await resolver.resolve("short.test", "TXT")
    assert _asked(zone, "short.test") == 2


async def test_spf_from_cache_only_when_every_lookup_is_cached(zone) -> None:
    resolver = DNSResolver([zone.resolver_spec], 2.0)
    check = SPFCheck(receiver="mx.example.com", resolver=resolver)
    assert check._from_cache("127.0.0.1", "a@chain.test", "client.test") is None
    await resolver.resolve("chain.test", "TXT")
    # the include's record is not cached: the attempt must give up, not guess
    assert check._from_cache("127.0.0.1", "a@chain.test", "client.test") is None
    await resolver.resolve("inner.chain.test", "TXT")
    cached = check._from_cache("127.0.0.1", "a@chain.test", "client.test")
    looked_up = evaluate("127.0.0.1", "a@chain.test", "client.test", "mx.example.com",
                         resolver.blocking())
    assert cached is not None and cached[0] == "pass"
    assert cached == looked_up


async def test_spf_explanation_is_never_lost_to_the_cache(zone) -> None:
    # pyspf swallows a failed exp= lookup; the attempt from the cache must notice it and
    # leave the evaluation to the thread, which fetches the explanation
    resolver = DNSResolver([zone.resolver_spec], 2.0)
    check = SPFCheck(receiver="mx.example.com", resolver=resolver)
    await resolver.resolve("explained.test", "TXT")
    assert check._from_cache("127.0.0.1", "a@explained.test", "client.test") is None
    await resolver.resolve("why.explained.test", "TXT")
    cached = check._from_cache("127.0.0.1", "a@explained.test", "client.test")
    assert cached is not None
    result, explanation, _comment, _mechanism = cached
    assert result == "fail" and explanation == "a@explained.test may not send from 127.0.0.1"


async def test_spf_outcome_is_kept_until_its_first_answer_expires(zone) -> None:
    resolver = DNSResolver([zone.resolver_spec], 2.0)
    check = SPFCheck(receiver="mx.example.com", resolver=resolver)
    await resolver.resolve("short.test", "TXT")           # TTL 1 s
    first = check._from_cache("127.0.0.1", "a@short.test", "client.test")
    assert first is not None and first[0] == "pass"
    # the records change: within the 1 s TTL the kept outcome stands, after it the new
    # record decides (a lookup, so not from the cache)
    zone.remove("short.test", "TXT")
    zone.add('short.test. 300 IN TXT "v=spf1 -all"')
    assert check._from_cache("127.0.0.1", "a@short.test", "client.test") == first
    time.sleep(1.1)
    assert check._from_cache("127.0.0.1", "a@short.test", "client.test") is None
    await resolver.resolve("short.test", "TXT")
    again = check._from_cache("127.0.0.1", "a@short.test", "client.test")
    assert again is not None and again[0] == "fail"
