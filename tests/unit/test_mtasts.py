"""MTA-STS (issue 15, item 3; ``delivery/mtasts.py``) without the network: the TXT record and
policy grammar of RFC 8461, MX pattern matching, the HTTP answer checks (over an in-memory
stream), and the cache (expiry, id change, failed fetches, the file) under a test clock with
a resolver answering from a dict."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import dns.exception
import dns.resolver
import pytest

from pymta.delivery import mtasts
from pymta.delivery.mtasts import (
    CachedPolicy,
    FetchError,
    MTASTSPolicies,
    Policy,
    PolicyError,
    make_plan,
    mx_matches,
    parse_policy,
    record_id,
    tls_result_type,
)
from pymta.dns import DNSResolver

POLICY = ("version: STSv1\r\nmode: enforce\r\nmx: mx1.example.com\r\nmx: *.example.net\r\n"
          "max_age: 86400\r\n")


# ------------------------------------------------------------------------------ the policy


def test_issue15_mta_sts_policy_parses_with_crlf_or_lf() -> None:
    want = Policy("enforce", ("mx1.example.com", "*.example.net"), 86400)
    assert parse_policy(POLICY) == want
    assert parse_policy(POLICY.replace("\r\n", "\n")) == want


def test_issue15_mta_sts_policy_ignores_unknown_keys_and_repeats() -> None:
    text = ("version: STSv1\nmode: testing\nmx: MX.Example.COM.\nfuture_key: whatever 1 2\n"
            "max_age: 600\nmode: enforce\nmx: mx.example.com\n\n")
    assert parse_policy(text) == Policy("testing", ("mx.example.com",), 600)


def test_issue15_mta_sts_policy_max_age_is_capped_at_a_year_and_none_needs_no_mx() -> None:
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 9999999999\n") == Policy(
        "none", (), 31557600)


@pytest.mark.parametrize("text, why", [
    ("mode: enforce\nmx: a.example\nmax_age: 1\n", "no version"),
    ("version: STSv2\nmode: enforce\nmx: a.example\nmax_age: 1\n", "is not STSv1"),
    ("version: STSv1\nmode: strict\nmx: a.example\nmax_age: 1\n", "is not enforce"),
    ("version: STSv1\nmode: enforce\nmx: a.example\nmax_age: -1\n", "not a number"),
    ("version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 12345678901\n", "not a number"),
    ("version: STSv1\nmode: enforce\nmx: a.example\n", "no max_age"),
    ("version: STSv1\nmode: enforce\nmax_age: 1\n", "no mx"),
    ("version: STSv1\nmode: enforce\nmx: *.*.example\nmax_age: 1\n", "not an MX pattern"),
    ("version: STSv1\nmode: enforce\nmx: mx.*.example\nmax_age: 1\n", "not an MX pattern"),
    ("version: STSv1\nmode: enforce\nmx: localhost\nmax_age: 1\n", "not an MX pattern"),
    ("version: STSv1\nmode enforce\nmx: a.example\nmax_age: 1\n", "not key: value"),
    ("<html>version: STSv1</html>\n", "not key: value"),
])
def test_issue15_mta_sts_bad_policies_are_refused(text: str, why: str) -> None:
    with pytest.raises(PolicyError, match=why):
        parse_policy(text)


@pytest.mark.parametrize("pattern, host, matches", [
    ("mx1.example.com", "mx1.example.com", True),
    ("mx1.example.com", "MX1.Example.Com.", True),
    ("mx1.example.com", "mx2.example.com", False),
    ("*.example.net", "mx.example.net", True),
    ("*.example.net", "example.net", False),        # one label, not none
    ("*.example.net", "a.b.example.net", False),    # one label, not two
    ("*.example.net", "mx.example.net.evil", False),
    ("*.xn--bcher-kva.example", "mx.bücher.example", True),   # compared as A-labels
])
def test_issue15_mta_sts_mx_patterns(pattern: str, host: str, matches: bool) -> None:
    assert mx_matches(pattern, host) is matches


# ------------------------------------------------------------------------------ the record


@pytest.mark.parametrize("texts, ident", [
    (["v=STSv1; id=20160831085700Z;"], "20160831085700Z"),
    (["v=STSv1;id=abc"], "abc"),
    (["v=STSv1 ; id=abc ; ext=va:lue ;"], "abc"),
    (["v=spf1 -all", "v=STSv1; id=1"], "1"),                 # other records ignored
    (["v=STSv1; id=1", "v=STSv1; id=2"], None),              # two: no policy
    ([], None),
    (["v=STSv1; id=a-b"], None),                             # id is letters and digits
    (["v=STSv1; id=" + "a" * 33], None),                     # at most 32 of them
    (["v=STSv1; ext=1"], None),                              # no id
    (["v=STSv1; id=1;; x=y"], None),                         # an empty field
    (["v=STSv1; id 1"], None),
    (["v=STSv2; id=1"], None),
    (["V=stsv1; id=1"], None),
])
def test_issue15_mta_sts_record_id(texts: list[str], ident: str | None) -> None:
    assert record_id(texts) == ident


# ------------------------------------------------------------------------------ HTTP answers


class _Writer:
    def __init__(self) -> None:
        self.sent = b""

    def write(self, data: bytes) -> None:
        self.sent += data

    async def drain(self) -> None:
        pass


async def _answer(response: bytes) -> tuple[str, bytes]:
    reader = asyncio.StreamReader(limit=mtasts.MAX_HEAD_BYTES)
    reader.feed_data(response)
    reader.feed_eof()
    writer = _Writer()
    text = await mtasts._get(reader, writer, "mta-sts.example.com", "here")  # type: ignore[arg-type]
    return text, writer.sent


async def test_issue15_mta_sts_http_request_and_the_three_body_framings() -> None:
    body = POLICY.encode()
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n"
    text, sent = await _answer(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
    assert text == POLICY
    assert sent.startswith(b"GET /.well-known/mta-sts.txt HTTP/1.1\r\n"
                           b"Host: mta-sts.example.com\r\n")
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:10], body[10:]))
    text, _ = await _answer(head + b"Transfer-Encoding: chunked\r\n\r\n" + chunked
                            + b"0\r\nX-Trailer: 1\r\n\r\n")
    assert text == POLICY
    text, _ = await _answer(head.replace(b"1.1", b"1.0") + b"\r\n" + body)   # to the end
    assert text == POLICY


@pytest.mark.parametrize("response, why, result", [
    (b"HTTP/1.1 301 Moved\r\nLocation: https://elsewhere/\r\nContent-Length: 0\r\n\r\n",
     "HTTP status 301 (redirects are not followed)", "sts-policy-fetch-error"),
    (b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", "HTTP status 404",
     "sts-policy-fetch-error"),
    (b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 1\r\n\r\nx",
     "media type 'text/html', not text/plain", "sts-policy-fetch-error"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx", "media type 'none'",
     "sts-policy-fetch-error"),
    (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 70000\r\n\r\n",
     "larger than 65536 bytes", "sts-policy-invalid"),
    (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + b"x" * 70000,
     "larger than 65536 bytes", "sts-policy-invalid"),
    (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"10000\r\n" + b"x" * 65536 + b"\r\n1\r\nx\r\n0\r\n\r\n",
     "larger than 65536 bytes", "sts-policy-invalid"),
    (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 10\r\n\r\nshort",
     "connection closed early", "sts-policy-fetch-error"),
    (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\n\xff\xfe",
     "not UTF-8", "sts-policy-invalid"),
    (b"SSH-2.0-OpenSSH\r\n", "not an HTTP/1.x response", "sts-policy-fetch-error"),
    (b"HTTP/1.1 200 OK\r\nX-Big: " + b"y" * 20000 + b"\r\n\r\n", "malformed response",
     "sts-policy-fetch-error"),
    (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Encoding: gzip\r\n\r\n",
     "content encoding 'gzip'", "sts-policy-fetch-error"),
])
async def test_issue15_mta_sts_http_answers_that_are_no_policy(response: bytes, why: str,
                                                              result: str) -> None:
    with pytest.raises(FetchError, match=why.replace("(", r"\(").replace(")", r"\)")) as info:
        await _answer(response)
    assert info.value.result_type == result


# ------------------------------------------------------------------------------ the cache


class FakeDNS:
    """Answers TXT lookups from ``records`` (name → texts); others NXDOMAIN; ``fail`` makes
    every lookup a timeout."""

    def __init__(self) -> None:
        self.records: dict[str, list[str]] = {}
        self.fail = False
        self.asked = 0

    async def resolve(self, qname: str, rdtype: str, *, search: bool = False) -> Any:
        self.asked += 1
        if self.fail:
            raise dns.exception.Timeout()
        texts = self.records.get(qname)
        if texts is None:
            raise dns.resolver.NXDOMAIN()
        return [SimpleNamespace(strings=(t.encode(),)) for t in texts]


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def world(tmp_path: Path) -> SimpleNamespace:
    """A cache over a fake DNS, a test clock and a fake fetch serving ``served`` (a
    FetchError instance: that fails), counting fetches."""
    fake, clock = FakeDNS(), Clock()
    policies = MTASTSPolicies(DNSResolver(resolver=fake), clock=clock,
                              cache_path=str(tmp_path / "mta-sts.json"))
    w = SimpleNamespace(dns=fake, clock=clock, policies=policies, served=POLICY, fetched=[])

    async def fetch(domain: str) -> str:
        w.fetched.append(domain)
        if isinstance(w.served, FetchError):
            raise w.served
        return w.served

    policies._fetch = fetch  # type: ignore[method-assign]
    fake.records["_mta-sts.example.com"] = ["v=STSv1; id=1"]
    return w


async def test_issue15_mta_sts_cache_keeps_a_policy_for_its_max_age(world) -> None:
    first = await world.policies.policy("Example.COM")
    assert first is not None and first.policy.mode == "enforce" and first.id == "1"
    world.clock.now += 86000
    assert await world.policies.policy("example.com") is first
    assert world.fetched == ["example.com"]
    world.clock.now += 401                       # max_age over: fetched again
    again = await world.policies.policy("example.com")
    assert again is not None and again is not first
    assert world.fetched == ["example.com"] * 2


async def test_issue15_mta_sts_cache_refetches_when_the_id_changes(world) -> None:
    await world.policies.policy("example.com")
    world.served = POLICY.replace("enforce", "testing")
    assert (await world.policies.policy("example.com")).policy.mode == "enforce"
    world.dns.records["_mta-sts.example.com"] = ["v=STSv1; id=2"]
    cached = await world.policies.policy("example.com")
    assert (cached.policy.mode, cached.id) == ("testing", "2")
    assert len(world.fetched) == 2


async def test_issue15_mta_sts_failed_fetch_keeps_the_cached_policy(world, caplog) -> None:
    caplog.set_level(logging.INFO, logger="pymta.delivery.relay.mtasts")
    first = await world.policies.policy("example.com")
    world.served = FetchError("cannot connect to mta-sts.example.com: refused")
    world.dns.records["_mta-sts.example.com"] = ["v=STSv1; id=2"]
    assert await world.policies.policy("example.com") is first
    assert await world.policies.policy("example.com") is first
    assert len(world.fetched) == 2               # not again for id 2 within five minutes
    world.clock.now += mtasts.RETRY_AFTER_FAILURE
    assert await world.policies.policy("example.com") is first
    assert len(world.fetched) == 3
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("tlsrpt ")]
    assert lines[0] == ("tlsrpt policy-type=sts policy-domain=example.com policy-mode=enforce "
                        "result-type=sts-policy-fetch-error: cannot connect to "
                        "mta-sts.example.com: refused; the cached policy stays in force")
    # the record gone or DNS failing: the cached policy still applies until it expires
    del world.dns.records["_mta-sts.example.com"]
    assert await world.policies.policy("example.com") is first
    world.dns.fail = True
    assert await world.policies.policy("example.com") is first
    world.clock.now += 86400
    assert await world.policies.policy("example.com") is None


async def test_issue15_mta_sts_failed_fetch_or_bad_policy_without_cache_is_no_policy(
        world) -> None:
    world.served = "<html>not a policy</html>"
    assert await world.policies.policy("example.com") is None
    world.served = FetchError("certificate not trusted", "sts-webpki-invalid")
    world.dns.records["_mta-sts.example.com"] = ["v=STSv1; id=2"]
    assert await world.policies.policy("example.com") is None
    assert len(world.fetched) == 2


async def test_issue15_mta_sts_no_record_is_remembered_briefly(world) -> None:
    assert await world.policies.policy("other.example") is None
    assert await world.policies.policy("other.example") is None
    assert world.dns.asked == 1
    world.clock.now += mtasts.ABSENT_TTL
    assert await world.policies.policy("other.example") is None
    assert world.dns.asked == 2 and world.fetched == []


async def test_issue15_mta_sts_concurrent_deliveries_share_one_fetch(world) -> None:
    gate = asyncio.Event()
    calls = []

    async def slow(domain: str) -> str:
        calls.append(domain)
        await gate.wait()
        return POLICY

    world.policies._fetch = slow
    tasks = [asyncio.create_task(world.policies.policy("example.com")) for _ in range(5)]
    await asyncio.sleep(0.05)
    gate.set()
    results = await asyncio.gather(*tasks)
    assert calls == ["example.com"] and all(r is results[0] for r in results)


async def test_issue15_mta_sts_cache_survives_a_restart(world, tmp_path: Path) -> None:
    await world.policies.policy("example.com")
    data = json.loads((tmp_path / "mta-sts.json").read_text())
    assert data["policies"]["example.com"]["mode"] == "enforce"
    assert (tmp_path / "mta-sts.json").stat().st_mode & 0o777 == 0o600
    # a new process: the HTTPS server is unreachable, the record unchanged
    fake = FakeDNS()
    fake.records["_mta-sts.example.com"] = ["v=STSv1; id=1"]
    later = MTASTSPolicies(DNSResolver(resolver=fake), clock=world.clock,
                           cache_path=str(tmp_path / "mta-sts.json"))

    async def unreachable(domain: str) -> str:
        raise FetchError("unreachable")

    later._fetch = unreachable  # type: ignore[method-assign]
    cached = await later.policy("example.com")
    assert cached is not None and cached.policy.mx == ("mx1.example.com", "*.example.net")


async def test_issue15_mta_sts_damaged_cache_file_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "mta-sts.json"
    good = CachedPolicy("ok.example", "1", Policy("enforce", ("mx.ok.example",), 600),
                        1_000_000.0).to_json()
    path.write_text(json.dumps({"version": 1, "policies": {
        "ok.example": good,
        "bad.example": {**good, "mode": "enforce\nmx: evil.example"},
        "worse.example": {**good, "mx": ["*"]},
        "odd.example": "text"}}))
    assert set(mtasts._read_cache(str(path))) == {"ok.example"}
    path.write_text("{not json")
    assert mtasts._read_cache(str(path)) == {}


# ------------------------------------------------------------------------------ the plan


def _cached(mode: str) -> CachedPolicy:
    return CachedPolicy("example.com", "1", Policy(mode, ("mx1.example.com",), 600), 0.0)


def test_issue15_mta_sts_plan_enforce_drops_mx_hosts_and_raises_tls(caplog) -> None:
    caplog.set_level(logging.INFO, logger="pymta.delivery.relay.mtasts")
    plan = make_plan(_cached("enforce"), ["mx1.example.com", "evil.example.org"])
    assert plan.hosts == ["mx1.example.com"] and plan.refused == ["evil.example.org"]
    assert [plan.level(lv) for lv in ("none", "may", "encrypt", "verify", "secure", "dane")
            ] == ["verify", "verify", "verify", "verify", "secure", "dane"]
    assert not plan.probes("may")
    assert caplog.records[-1].getMessage() == (
        "tlsrpt policy-type=sts policy-domain=example.com policy-mode=enforce "
        "result-type=validation-failure receiving-mx-hostname=evil.example.org: MX host "
        "evil.example.org is not in the policy's mx list (mx1.example.com; not tried)")
    assert "allows none of its MX hosts (evil.example.org)" in make_plan(
        _cached("enforce"), ["evil.example.org"]).refusal()


def test_issue15_mta_sts_plan_testing_changes_nothing_but_probes() -> None:
    plan = make_plan(_cached("testing"), ["evil.example.org", "mx1.example.com"])
    assert plan.hosts == ["evil.example.org", "mx1.example.com"]
    assert plan.level("may") == "may" and plan.probes("may") and not plan.probes("verify")


@pytest.mark.parametrize("text, result", [
    ("TLS is required, but was not offered by host mx[1.2.3.4]:25", "starttls-not-supported"),
    ("Server certificate not trusted: mx[1.2.3.4]:25: self-signed certificate",
     "certificate-not-trusted"),
    ("Server certificate not trusted: mx[1.2.3.4]:25: certificate has expired",
     "certificate-expired"),
    ("Server certificate not verified: mx: certificate names (a.example) do not match mx",
     "certificate-host-mismatch"),
    ("Cannot start TLS: handshake failure with mx[1.2.3.4]:25: EOF", "validation-failure"),
    ("connect to mx[1.2.3.4]:25: Connection refused", None),
])
def test_issue15_mta_sts_tls_failures_get_their_tlsrpt_result_type(text: str,
                                                                   result: str | None) -> None:
    assert tls_result_type(text) == result


async def test_issue15_mta_sts_no_lookup_for_what_is_not_a_domain_name(world) -> None:
    for odd in ("localhost", "*.example.com", "a b.example", "x\r\nHost: y.example"):
        assert await world.policies.policy(odd) is None
    assert world.dns.asked == 0
