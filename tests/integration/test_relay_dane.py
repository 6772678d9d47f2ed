"""DANE for outbound SMTP (issue 15, item 2; RFC 7672) against aiosmtpd peers and the test
DNS server, which sets the AD bit for the names a test signs (as a validating resolver
marks what it authenticated): a DANE-EE record matching the peer's key delivers, one that
does not defers with nothing sent, an insecure answer or an MX answer that is not
authenticated is opportunistic TLS, a secure set with no usable record needs TLS without
authentication, and a failed TLSA lookup defers. DANE-TA: a record of the test CA's
intermediate (or of its root, when the peer sends it) delivers to a peer whose certificate
chain it anchors and that names the MX host; a wrong name, or an anchor the peer does not
send, defers. A CNAME'd MX host: TLSA records at the CNAME's target are used first, and an
insecure chain is opportunistic TLS."""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

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
from tests.tlsca import TestCA

ZONE = """\
$TTL 300
$ORIGIN test.
signed     IN MX 10 mx.signed.test.
mx.signed  IN A  127.0.0.1
hosted     IN MX 10 mx.provider.test.
mx.provider IN A 127.0.0.1
aliased    IN MX 10 mx.aliased.test.
mx.aliased IN CNAME mail.hoster.test.
mail.hoster IN A 127.0.0.1
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


async def _send(mta: MTA, rcpt: str = "bob@signed.test") -> str:
    qid = await inject(mta, "alice@example.com", [rcpt],
                       message("alice@example.com", rcpt, "dane"))
    return qid


async def _deferred(mta: MTA, rcpt: str = "bob@signed.test") -> str:
    env = await wait_attempted(mta, await _send(mta, rcpt))
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
    """Only a PKIX-EE record (not for SMTP, RFC 7672 §3.1.3) and one of an unknown matching
    type: TLS is required, the certificate is not checked; the same peer delivers, one
    without STARTTLS is deferred."""
    controller, recorder, _digest = peer
    _tlsa(dns, controller.port, f"1 0 1 {bytes(32).hex()}")
    _tlsa(dns, controller.port, f"2 1 7 {bytes(32).hex()}")
    dns.sign("signed.test")
    async with _mta(tmp_path / "tls", dns, controller.port) as mta:
        await wait_gone(mta, await _send(mta))
    assert recorder.received == [["bob@signed.test"]]
    plain = RecordingHandler()
    port = free_port()
    bare = Controller(plain, hostname="127.0.0.1", port=port, ready_timeout=5)
    bare.start()
    try:
        _tlsa(dns, port, f"1 0 1 {bytes(32).hex()}")
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
    assert not any(rdtype == "TLSA" for _name, rdtype in dns.queries), dns.queries


async def test_review_an_answer_cached_by_a_blocking_lookup_keeps_its_ad_bit(dns) -> None:
    """SPF's lookups (the blocking twin, sharing the cache) ask with AD too: an MX it
    cached first must not turn DANE off for that domain."""
    dns.sign("signed.test")
    resolver = DNSResolver([dns.resolver_spec], 2.0)
    resolver.blocking().resolve("signed.test", "MX")
    rdata, secure = await resolver.authenticated("signed.test", "MX")
    assert rdata and secure


# --------------------------------------------------------------------------------- DANE-TA


class CAPeers:
    """aiosmtpd peers with STARTTLS whose certificates the test CA issues; each serves its
    whole chain (the server certificate, the intermediate, and the root when asked)."""

    def __init__(self, directory: Path) -> None:
        self.ca = TestCA(directory)
        self._running: list[Controller] = []

    def start(self, names: tuple[str, ...], *, send_root: bool = False,
              ca: TestCA | None = None) -> tuple[Controller, RecordingHandler]:
        issuer = ca if ca is not None else self.ca
        cert, key = issuer.write(f"peer{len(self._running)}", names, "ec")
        if send_root:
            cert.write_bytes(cert.read_bytes() + issuer.root.public_bytes(
                serialization.Encoding.PEM))
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(cert), str(key))
        recorder = RecordingHandler()
        controller = Controller(recorder, hostname="127.0.0.1", port=free_port(),
                                tls_context=context, ready_timeout=5)
        controller.start()
        self._running.append(controller)
        return controller, recorder

    def stop(self) -> None:
        for controller in self._running:
            controller.stop()


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[CAPeers]:
    made = CAPeers(tmp_path / "ca")
    yield made
    made.stop()


def _ta(cert: x509.Certificate, selector: int = 1) -> str:
    """The ``2 <selector> 1`` record of a CA certificate."""
    selected = (cert.public_bytes(serialization.Encoding.DER) if selector == 0 else
                cert.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo))
    return f"2 {selector} 1 {hashlib.sha256(selected).hexdigest()}"


async def test_issue15_dane_ta_of_the_intermediate_delivers(tmp_path: Path, dns,
                                                            peers: CAPeers) -> None:
    controller, recorder = peers.start(("mx.signed.test",))
    _tlsa(dns, controller.port, _ta(peers.ca.inter))
    dns.sign("signed.test")
    async with _mta(tmp_path, dns, controller.port) as mta:
        await wait_gone(mta, await _send(mta))
    assert recorder.received == [["bob@signed.test"]]


async def test_issue15_dane_ta_of_the_root_delivers_when_the_peer_sends_it(
        tmp_path: Path, dns, peers: CAPeers) -> None:
    """The anchor at the root: two links to check (server → intermediate → root); the
    record names the whole root certificate, and then its key, beside a stale DANE-EE."""
    controller, recorder = peers.start(("mx.signed.test",), send_root=True)
    _tlsa(dns, controller.port, _ta(peers.ca.root, selector=0))
    dns.sign("signed.test")
    async with _mta(tmp_path / "cert", dns, controller.port) as mta:
        await wait_gone(mta, await _send(mta))
    dns.remove(f"_{controller.port}._tcp.mx.signed.test", "TLSA")
    _tlsa(dns, controller.port, f"3 1 1 {bytes(32).hex()}")
    _tlsa(dns, controller.port, _ta(peers.ca.root))
    async with _mta(tmp_path / "spki", dns, controller.port) as mta:
        await wait_gone(mta, await _send(mta))
    assert recorder.received == [["bob@signed.test"], ["bob@signed.test"]]


async def test_issue15_dane_ta_wrong_name_defers(tmp_path: Path, dns, peers: CAPeers) -> None:
    """The anchor matches, but the certificate is for another host: any host with a
    certificate of the same CA could otherwise stand in for this one (RFC 7672 §3.2.2)."""
    controller, recorder = peers.start(("mx.elsewhere.test",))
    _tlsa(dns, controller.port, _ta(peers.ca.inter))
    dns.sign("signed.test")
    async with _mta(tmp_path, dns, controller.port) as mta:
        reply = await _deferred(mta)
    assert "4.7.5 Server certificate not trusted: mx.signed.test[127.0.0.1]" in reply, reply
    assert "certificate names (mx.elsewhere.test) do not match mx.signed.test" in reply, reply
    assert recorder.received == []


async def test_issue15_dane_ta_that_does_not_match_defers(tmp_path: Path, dns,
                                                          peers: CAPeers) -> None:
    """Another CA's intermediate; and the root's key, which the peer does not send (a bare
    key is not supported, and the reason says so)."""
    controller, recorder = peers.start(("mx.signed.test",))
    other = TestCA(tmp_path / "other")
    _tlsa(dns, controller.port, _ta(other.inter))
    dns.sign("signed.test")
    async with _mta(tmp_path / "other-ca", dns, controller.port) as mta:
        reply = await _deferred(mta)
    assert "4.7.5 Server certificate not trusted" in reply and "no TLSA record" in reply, reply
    assert "not supported" in reply, reply
    dns.remove(f"_{controller.port}._tcp.mx.signed.test", "TLSA")
    _tlsa(dns, controller.port, _ta(peers.ca.root))
    async with _mta(tmp_path / "root-not-sent", dns, controller.port) as mta:
        reply = await _deferred(mta)
    assert "no TLSA record matches" in reply and "not supported" in reply, reply
    assert recorder.received == []


async def test_issue15_dane_ta_chain_from_another_ca_defers(tmp_path: Path, dns,
                                                            peers: CAPeers) -> None:
    """The peer's certificate comes from another CA; it appends our anchor's certificate
    to its chain: the anchor matches, the path to it does not exist."""
    other = TestCA(tmp_path / "other")
    cert, key = other.write("stranger", ("mx.signed.test",), "ec")
    cert.write_bytes(cert.read_bytes() + peers.ca.inter.public_bytes(
        serialization.Encoding.PEM))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(cert), str(key))
    recorder = RecordingHandler()
    controller = Controller(recorder, hostname="127.0.0.1", port=free_port(),
                            tls_context=context, ready_timeout=5)
    controller.start()
    try:
        _tlsa(dns, controller.port, _ta(peers.ca.inter))
        dns.sign("signed.test")
        async with _mta(tmp_path, dns, controller.port) as mta:
            reply = await _deferred(mta)
    finally:
        controller.stop()
    assert "does not chain to the DANE-TA trust anchor CN=pymta test intermediate" in reply
    assert recorder.received == []


# ------------------------------------------------------------------ CNAME'd MX hosts


async def test_issue15_dane_cname_tlsa_at_the_target(tmp_path: Path, dns,
                                                     peers: CAPeers) -> None:
    """``aliased.test``'s MX ``mx.aliased.test`` is a CNAME of ``mail.hoster.test``, both
    signed: the TLSA records at the target are used (a hosting provider's), and its
    certificate, which names the target, passes DANE-TA."""
    controller, recorder = peers.start(("mail.hoster.test",))
    dns.add(f"_{controller.port}._tcp.mail.hoster.test. 300 IN TLSA {_ta(peers.ca.inter)}")
    dns.sign("aliased.test")
    dns.sign("hoster.test")
    async with _mta(tmp_path, dns, controller.port) as mta:
        await wait_gone(mta, await _send(mta, "carol@aliased.test"))
    assert recorder.received == [["carol@aliased.test"]]
    asked = [name for name, rdtype in dns.queries if rdtype == "TLSA"]
    assert asked == [f"_{controller.port}._tcp.mail.hoster.test."], asked


async def test_issue15_dane_cname_target_first_then_the_original_name(
        tmp_path: Path, dns, peers: CAPeers) -> None:
    """A wrong record at the target decides (deferred, although the MX host's own name has
    a right one); without records at the target, the original name's are used, and a
    certificate naming the MX host passes."""
    controller, recorder = peers.start(("mx.aliased.test",))
    port = controller.port
    dns.add(f"_{port}._tcp.mail.hoster.test. 300 IN TLSA 3 1 1 {bytes(32).hex()}")
    dns.add(f"_{port}._tcp.mx.aliased.test. 300 IN TLSA {_ta(peers.ca.inter)}")
    dns.sign("aliased.test")
    dns.sign("hoster.test")
    async with _mta(tmp_path / "target", dns, port) as mta:
        reply = await _deferred(mta, "carol@aliased.test")
    assert "4.7.5 Server certificate not trusted: mx.aliased.test[127.0.0.1]" in reply, reply
    dns.remove(f"_{port}._tcp.mail.hoster.test", "TLSA")
    async with _mta(tmp_path / "original", dns, port) as mta:
        await wait_gone(mta, await _send(mta, "carol@aliased.test"))
    assert recorder.received == [["carol@aliased.test"]]


async def test_issue15_dane_cname_insecure_chain_is_opportunistic(
        tmp_path: Path, dns, peers: CAPeers) -> None:
    """The MX host's zone is signed, its CNAME target's is not: the address answer is not
    authenticated, the host is an unsigned one (``may``), and no TLSA is asked for, so a
    wrong record at the target does not stop the mail."""
    controller, recorder = peers.start(("mail.hoster.test",))
    dns.add(f"_{controller.port}._tcp.mail.hoster.test. 300 IN TLSA "
            f"3 1 1 {bytes(32).hex()}")
    dns.sign("aliased.test")
    async with _mta(tmp_path, dns, controller.port) as mta:
        await wait_gone(mta, await _send(mta, "carol@aliased.test"))
    assert recorder.received == [["carol@aliased.test"]]
    assert not any(rdtype == "TLSA" for _name, rdtype in dns.queries), dns.queries


def test_issue15_dane_ta_peer_chain_is_what_the_test_ca_issued(peers: CAPeers) -> None:
    """The fixture itself: the server certificate is issued by the intermediate (a
    DANE-TA test that passed on a self-signed peer would prove nothing)."""
    cert, _key = peers.ca.issue(("mx.signed.test",), "ec")
    leaf, inter = x509.load_pem_x509_certificates(cert)
    leaf.verify_directly_issued_by(peers.ca.inter)
    assert inter.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
        "pymta test intermediate")
