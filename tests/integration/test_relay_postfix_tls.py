"""Outbound TLS levels against a real Postfix (issue 15, "Done when"): its certificate is
self-signed for ``peer.test``; trusting it (``PYMTA_SMTP_TLS_CA_FILE``) makes ``verify``
deliver, a CA that did not sign it makes ``verify`` defer, and at ``dane`` a DANE-EE record of
its key (in a signed zone of the test DNS server) delivers where a wrong one defers. Postfix's
own log shows the encrypted session."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pymta.app import MTA
from pymta.types import RcptState
from tests.conftest import make_config, wait_for
from tests.integration._outbound import inject, message, wait_attempted, wait_gone
from tests.services.dns import DNSTestServer
from tests.services.postfix_peer import PostfixPeer
from tests.tlsca import TestCA

ZONE = """\
$TTL 300
$ORIGIN test.
peer IN A 127.0.0.1
"""


@pytest.fixture(scope="module")
def dns(postfix_peer: PostfixPeer) -> Iterator[DNSTestServer]:
    server = DNSTestServer(ZONE).start()
    server.add("example.net. 300 IN MX 10 peer.test.")
    server.sign("example.net")
    server.sign("peer.test")
    yield server
    server.stop()


def _spki_sha256(cert_file: Path) -> str:
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def _config(tmp_path: Path, dns: DNSTestServer, peer: PostfixPeer, level: str, ca_file: str):
    return make_config(tmp_path, dns_resolver=(dns.resolver_spec,), mx_port=peer.port,
                       smtp_tls_security_level=level, smtp_tls_ca_file=ca_file,
                       smtp_connect_timeout=5.0, smtp_timeout=20.0, queue_retry_first=30.0,
                       queue_retry_max=60.0, connection_cache_time=0.0)


async def _delivered_at_postfix(mta: MTA, peer: PostfixPeer, subject: str) -> None:
    qid = await inject(mta, "alice@example.com", ["rcpt@example.net"],
                       message("alice@example.com", "rcpt@example.net", subject))
    await wait_gone(mta, qid, timeout=20)
    await wait_for(lambda: any(subject.encode() in m for m in peer.messages("rcpt/")))


async def _deferred(mta: MTA) -> str:
    qid = await inject(mta, "alice@example.com", ["rcpt@example.net"],
                       message("alice@example.com", "rcpt@example.net", "deferred"))
    env = await wait_attempted(mta, qid)
    assert env.recipients[0].state is RcptState.PENDING
    return env.recipients[0].last_reply


async def test_issue15_verify_delivers_to_postfix_whose_certificate_is_trusted(
        tmp_path: Path, dns: DNSTestServer, postfix_peer: PostfixPeer,
        caplog: pytest.LogCaptureFixture) -> None:
    assert postfix_peer.cert_file is not None
    caplog.set_level("INFO", logger="pymta.delivery.relay")
    subject = f"verify at postfix {tmp_path.name}"
    async with MTA(_config(tmp_path, dns, postfix_peer, "verify",
                           str(postfix_peer.cert_file))) as mta:
        await _delivered_at_postfix(mta, postfix_peer, subject)
    assert any(r.getMessage().startswith("Verified TLS connection established to "
                                         f"peer.test[127.0.0.1]:{postfix_peer.port}: TLSv1.")
               for r in caplog.records)
    postfix_peer.wait_log(r"TLS connection established from localhost\[127\.0\.0\.1\]")


async def test_issue15_verify_defers_postfix_whose_certificate_is_not_trusted(
        tmp_path: Path, dns: DNSTestServer, postfix_peer: PostfixPeer) -> None:
    other = TestCA(tmp_path / "ca")
    async with MTA(_config(tmp_path, dns, postfix_peer, "verify",
                           str(other.root_file))) as mta:
        reply = await _deferred(mta)
    assert "4.7.5 Server certificate not trusted: peer.test[127.0.0.1]" in reply, reply


async def test_issue15_dane_ee_of_postfixs_key_delivers_and_a_wrong_record_defers(
        tmp_path: Path, dns: DNSTestServer, postfix_peer: PostfixPeer) -> None:
    assert postfix_peer.cert_file is not None
    name = f"_{postfix_peer.port}._tcp.peer.test."
    dns.add(f"{name} 300 IN TLSA 3 1 1 {_spki_sha256(postfix_peer.cert_file)}")
    try:
        subject = f"dane at postfix {tmp_path.name}"
        async with MTA(_config(tmp_path / "good", dns, postfix_peer, "dane", "")) as mta:
            await _delivered_at_postfix(mta, postfix_peer, subject)
    finally:
        dns.remove(name.rstrip("."), "TLSA")
    dns.add(f"{name} 300 IN TLSA 3 1 1 {'00' * 32}")
    try:
        async with MTA(_config(tmp_path / "bad", dns, postfix_peer, "dane", "")) as mta:
            reply = await _deferred(mta)
        assert "no TLSA record matches its certificate" in reply, reply
    finally:
        dns.remove(name.rstrip("."), "TLSA")
