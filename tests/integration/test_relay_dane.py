"""DANE for outbound SMTP (issue 15, item 2; RFC 7672) against aiosmtpd peers and the test
DNS server, which sets the AD bit for the names a test signs (as a validating resolver
marks what it authenticated): a DANE-EE record matching the peer's key delivers, one that
does not defers with nothing sent, an insecure answer or an MX answer that is not
authenticated is opportunistic TLS, a secure set with no usable record needs TLS without
authentication, and a failed TLSA lookup defers."""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pymta.app import MTA
from pymta.dns import DNSResolver
from pymta.types import RcptState
from tests.conftest import make_config
from tests.integration._outbound import (
    RecordingHandler,
    inject,
    message,
    wait_attempted,
    wait_gone,
)
from tests.services.base import free_port
from tests.services.dns import DNSTestServer
from tests.services.tls import make_self_signed

ZONE = """\
$TTL 300
$ORIGIN test.
signed     IN MX 10 mx.signed.test.
mx.signed  IN A  127.0.0.1
hosted     IN MX 10 mx.provider.test.
mx.provider IN A 127.0.0.1
"""


@pytest.fixture
def dns() -> Iterator[DNSTestServer]:
    server = DNSTestServer(ZONE).start()
    yield server
    server.stop()


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[tuple[Controller, RecordingHandler, bytes]]:
    """An aiosmtpd peer with STARTTLS and a self-signed certificate (DANE-EE needs no CA);
    yields it, its recorder and the SHA-256 of its public key (a ``3 1 1`` record)."""
    cert, key = make_self_signed(tmp_path / "tls", "mx.signed.test")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(cert), str(key))
    spki = x509.load_pem_x509_certificate(cert.read_bytes()).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    recorder = RecordingHandler()
    controller = Controller(recorder, hostname="127.0.0.1", port=free_port(),
                            tls_context=context, ready_timeout=5)
    controller.start()
    yield controller, recorder, hashlib.sha256(spki).digest()
    controller.stop()


def _tlsa(dns: DNSTestServer, port: int, record: str) -> None:
    dns.add(f"_{port}._tcp.mx.signed.test. 300 IN TLSA {record}")


def _mta(tmp_path: Path, dns: DNSTestServer, port: int) -> MTA:
    return MTA(make_config(tmp_path, dns_resolver=(dns.resolver_spec,), mx_port=port,
                           smtp_connect_timeout=5.0, smtp_timeout=20.0,
                           smtp_tls_security_level="dane", queue_retry_first=30.0,
                           queue_retry_max=60.0))


async def _send(mta: MTA) -> str:
    qid = await inject(mta, "alice@example.com", ["bob@signed.test"],
                       message("alice@example.com", "bob@signed.test", "dane"))
    return qid


async def _deferred(mta: MTA) -> str:
    env = await wait_attempted(mta, await _send(mta))
    assert env.recipients[0].state is RcptState.PENDING
    return env.recipients[0].last_reply


async def test_a_matching_dane_ee_record_delivers(tmp_path: Path, dns, peer) -> None:
    controller, recorder, digest = peer
    _tlsa(dns, controller.port, f"3 1 1 {digest.hex()}")
    dns.sign("signed.test")
    async with _mta(tmp_path, dns, controller.port) as mta:
        await wait_gone(mta, await _send(mta))
    assert recorder.received == [["bob@signed.test"]]


async def test_a_dane_ee_record_that_does_not_match_defers(tmp_path: Path, dns, peer) -> None:
    controller, recorder, digest = peer
    _tlsa(dns, controller.port, f"3 1 1 {bytes(32).hex()}")
    dns.sign("signed.test")
    async with _mta(tmp_path, dns, controller.port) as mta:
        reply = await _deferred(mta)
    assert "4.7.5 Server certificate not trusted" in reply and "no TLSA record" in reply
    assert recorder.received == []


async def test_insecure_answers_are_opportunistic_tls(tmp_path: Path, dns, peer) -> None:
    """The same wrong record, not authenticated (zone unsigned), and then authenticated
    but found through an MX answer that is not: both delivered as at ``may``."""
    controller, recorder, _digest = peer
    _tlsa(dns, controller.port, f"3 1 1 {bytes(32).hex()}")
    async with _mta(tmp_path / "unsigned", dns, controller.port) as mta:
        await wait_gone(mta, await _send(mta))
    dns.sign("mx.signed.test")          # the host's records, not signed.test's MX
    async with _mta(tmp_path / "mx", dns, controller.port) as mta:
        await wait_gone(mta, await _send(mta))
    assert recorder.received == [["bob@signed.test"], ["bob@signed.test"]]


async def test_no_usable_record_means_tls_without_authentication(
        tmp_path: Path, dns, peer) -> None:
    """Only a DANE-TA record (not evaluated yet): TLS is required, the certificate is not
    checked; the same peer delivers, one without STARTTLS is deferred."""
    controller, recorder, _digest = peer
    _tlsa(dns, controller.port, f"2 0 1 {bytes(32).hex()}")
    dns.sign("signed.test")
    async with _mta(tmp_path / "tls", dns, controller.port) as mta:
        await wait_gone(mta, await _send(mta))
    assert recorder.received == [["bob@signed.test"]]
    plain = RecordingHandler()
    port = free_port()
    bare = Controller(plain, hostname="127.0.0.1", port=port, ready_timeout=5)
    bare.start()
    try:
        _tlsa(dns, port, f"2 0 1 {bytes(32).hex()}")
        async with _mta(tmp_path / "plain", dns, port) as mta:
            reply = await _deferred(mta)
    finally:
        bare.stop()
    assert "4.7.4 TLS is required, but was not offered" in reply, reply
    assert plain.received == []


async def test_a_failed_tlsa_lookup_defers(tmp_path: Path, dns, peer) -> None:
    controller, recorder, _digest = peer
    dns.sign("signed.test")
    dns.fail(f"_{controller.port}._tcp.mx.signed.test", "SERVFAIL")
    async with _mta(tmp_path, dns, controller.port) as mta:
        reply = await _deferred(mta)
    assert "4.7.5 TLSA lookup error for mx.signed.test" in reply, reply
    assert recorder.received == []


async def test_review_a_host_in_an_unsigned_zone_gets_no_tlsa_lookup(
        tmp_path: Path, dns, peer) -> None:
    """A signed domain whose MX is in a provider's unsigned zone: the host's address is not
    authenticated, so its TLSA records are not asked for (a broken server failing them
    would otherwise defer the mail) and the mail goes as at ``may``."""
    controller, recorder, _digest = peer
    dns.sign("hosted.test")
    dns.fail(f"_{controller.port}._tcp.mx.provider.test", "SERVFAIL")
    async with _mta(tmp_path, dns, controller.port) as mta:
        qid = await inject(mta, "alice@example.com", ["carol@hosted.test"],
                           message("alice@example.com", "carol@hosted.test", "hosted"))
        await wait_gone(mta, qid)
    assert recorder.received == [["carol@hosted.test"]]
    assert not any(q[0].startswith("_") for q in dns.queries), dns.queries


async def test_review_an_answer_cached_by_a_blocking_lookup_keeps_its_ad_bit(dns) -> None:
    """SPF's lookups (the blocking twin, sharing the cache) ask with AD too: an MX it
    cached first must not turn DANE off for that domain."""
    dns.sign("signed.test")
    resolver = DNSResolver([dns.resolver_spec], 2.0)
    resolver.blocking().resolve("signed.test", "MX")
    rdata, secure = await resolver.authenticated("signed.test", "MX")
    assert rdata and secure
