"""REQUIRETLS (RFC 8689) and ``TLS-Required: No`` on the sending side (issue 15, item 4).

The next hops are real: another pymta (which offers REQUIRETLS once under TLS) and aiosmtpd
(which does not), both with certificates of a test CA, and the MX records come from the test
DNS server, signed for ``signed.test`` only. A REQUIRETLS message goes only to a host reached
through an authenticated MX answer, over verified TLS, that offers REQUIRETLS, and the flag
travels with it; otherwise it comes back to its sender with ``5.7.30``, or waits when the
fault may pass (an untrusted certificate). ``TLS-Required: No`` lets a message through a
policy it would fail; a report about a REQUIRETLS message is never returned for want of it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from pymta.app import MTA
from pymta.config.model import ListenAddress, RelayHost
from pymta.types import RcptState
from tests.conftest import make_config, wait_for
from tests.integration._outbound import (
    ScriptedPeer,
    inject,
    message,
    wait_attempted,
    wait_gone,
)
from tests.integration.test_relay_tls_levels import Peer
from tests.services.base import free_port
from tests.services.dns import DNSTestServer
from tests.services.tls import make_self_signed
from tests.tlsca import TestCA

ZONE = """\
$TTL 300
$ORIGIN test.
signed    IN MX 10 mx.signed.test.
mx.signed IN A  127.0.0.1
plain     IN MX 10 mx.plain.test.
mx.plain  IN A  127.0.0.1
two       IN MX 10 mx1.two.test.
two       IN MX 20 mx2.two.test.
mx1.two   IN A  127.0.0.3
mx2.two   IN A  127.0.0.1
"""


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def dns() -> Iterator[DNSTestServer]:
    server = DNSTestServer(ZONE).start()
    server.sign("signed.test")
    server.sign("two.test")
    yield server
    server.stop()


@pytest.fixture
async def pymta_peer(tmp_path: Path, ca: TestCA) -> AsyncIterator[MTA]:
    """A pymta for signed.test and plain.test with a trusted certificate; what it accepts
    stays in its queue (local delivery to an LMTP port nobody listens on)."""
    cert, key = ca.write("peer", ("mx.signed.test", "mx.plain.test"))
    config = make_config(tmp_path / "peer", hostname="mx.signed.test",
                         mail_domain=("signed.test", "plain.test"),
                         mail_boxes="bob@signed.test:bob/ bob@plain.test:bob/",
                         mail_aliases="",
                         smtp_listen=(ListenAddress("127.0.0.1", free_port()),),
                         smtpd_tls_cert_file=str(cert), smtpd_tls_key_file=str(key),
                         virtual_transport=f"lmtp:127.0.0.1:{free_port()}",
                         queue_retry_first=60.0, queue_retry_max=120.0)
    async with MTA(config) as mta:
        yield mta


@pytest.fixture
def aiosmtpd_peer(ca: TestCA) -> Iterator[Peer]:
    peer = Peer(*ca.write("aiosmtpd", ("mx.signed.test", "mx.plain.test")))
    peer.controller.start()
    yield peer
    peer.controller.stop()


def _sender_config(tmp_path: Path, dns: DNSTestServer, ca: TestCA, port: int, **kw: object):
    return make_config(tmp_path / "sender", dns_resolver=(dns.resolver_spec,), mx_port=port,
                       smtp_connect_timeout=5.0, smtp_timeout=20.0,
                       smtp_tls_ca_file=str(ca.root_file), queue_retry_first=30.0,
                       queue_retry_max=60.0, **kw)


def _peer_port(mta: MTA) -> int:
    return mta.config.smtp_listen[0].port


async def _returned(mta: MTA, subject: str) -> bytes:
    """The non-delivery report alice got about ``subject``."""
    inbox = Path(mta.config.mail_dir) / "alice" / "new"
    found = await wait_for(lambda: [p.read_bytes() for p in inbox.glob("*")
                                    if subject.encode() in p.read_bytes()], 20)
    return found[0]


async def test_issue15_requiretls_delivered_over_verified_tls_with_the_flag_passed_on(
        tmp_path: Path, dns: DNSTestServer, ca: TestCA, pymta_peer: MTA) -> None:
    subject = f"requiretls ok {tmp_path.name}"
    async with MTA(_sender_config(tmp_path, dns, ca, _peer_port(pymta_peer))) as mta:
        qid = await inject(mta, "alice@example.com", ["bob@signed.test"],
                           message("alice@example.com", "bob@signed.test", subject),
                           requiretls=True)
        await wait_gone(mta, qid, timeout=20)
    queued = await wait_for(lambda: [e for q in pymta_peer.store.ids()
                                     if (e := pymta_peer.store.load(q)) is not None])
    assert [e.requiretls for e in queued] == [True]


async def test_issue15_requiretls_returned_when_the_mx_answer_is_not_authenticated(
        tmp_path: Path, dns: DNSTestServer, ca: TestCA, pymta_peer: MTA) -> None:
    subject = f"requiretls unsigned {tmp_path.name}"
    async with MTA(_sender_config(tmp_path, dns, ca, _peer_port(pymta_peer))) as mta:
        qid = await inject(mta, "alice@example.com", ["bob@plain.test"],
                           message("alice@example.com", "bob@plain.test", subject),
                           requiretls=True)
        await wait_gone(mta, qid, timeout=20)
        report = await _returned(mta, subject)
    assert b"Status: 5.7.30" in report and b"DNSSEC" in report
    assert not list(pymta_peer.store.ids())


async def test_issue15_requiretls_returned_by_a_host_that_does_not_offer_it(
        tmp_path: Path, dns: DNSTestServer, ca: TestCA, aiosmtpd_peer: Peer) -> None:
    subject = f"requiretls not offered {tmp_path.name}"
    async with MTA(_sender_config(tmp_path, dns, ca, aiosmtpd_peer.port)) as mta:
        qid = await inject(mta, "alice@example.com", ["bob@signed.test"],
                           message("alice@example.com", "bob@signed.test", subject),
                           requiretls=True)
        await wait_gone(mta, qid, timeout=20)
        report = await _returned(mta, subject)
    assert b"Status: 5.7.30" in report and b"does not offer REQUIRETLS" in report
    assert aiosmtpd_peer.recorder.received == []


async def test_issue15_requiretls_waits_on_an_untrusted_certificate(
        tmp_path: Path, dns: DNSTestServer, ca: TestCA, pymta_peer: MTA) -> None:
    cert, key = make_self_signed(tmp_path / "self", "mx.signed.test")
    untrusted = dataclasses.replace(pymta_peer.config, smtpd_tls_cert_file=str(cert),
                                    smtpd_tls_key_file=str(key),
                                    smtp_listen=(ListenAddress("127.0.0.1", free_port()),),
                                    state_dir=str(tmp_path / "untrusted"))
    async with MTA(untrusted) as peer, MTA(_sender_config(tmp_path, dns, ca,
                                                          _peer_port(peer))) as mta:
        qid = await inject(mta, "alice@example.com", ["bob@signed.test"],
                           message("alice@example.com", "bob@signed.test", "untrusted"),
                           requiretls=True)
        env = await wait_attempted(mta, qid)
        assert env.recipients[0].state is RcptState.PENDING
        assert "4.7.5 Server certificate not trusted" in env.recipients[0].last_reply
        assert not list(peer.store.ids())


async def test_issue15_tls_required_no_passes_a_policy_the_host_fails(
        tmp_path: Path, dns: DNSTestServer, ca: TestCA) -> None:
    peer = Peer(*make_self_signed(tmp_path / "self", "mx.plain.test"))
    peer.controller.start()
    try:
        config = _sender_config(tmp_path, dns, ca, peer.port, smtp_tls_security_level="verify")
        async with MTA(config) as mta:
            held = await inject(mta, "alice@example.com", ["bob@plain.test"],
                                message("alice@example.com", "bob@plain.test", "held"))
            env = await wait_attempted(mta, held)
            assert env.recipients[0].state is RcptState.PENDING
            relaxed = await inject(mta, "alice@example.com", ["carol@plain.test"],
                                   message("alice@example.com", "carol@plain.test", "no"),
                                   tls_optional=True)
            await wait_gone(mta, relaxed)
        assert peer.recorder.received == [["carol@plain.test"]]
    finally:
        peer.controller.stop()


async def test_issue15_a_report_about_a_requiretls_message_is_not_returned_for_want_of_it(
        tmp_path: Path, dns: DNSTestServer, ca: TestCA, aiosmtpd_peer: Peer) -> None:
    async with MTA(_sender_config(tmp_path, dns, ca, aiosmtpd_peer.port)) as mta:
        qid = await inject(mta, "", ["bob@signed.test"],
                           message("MAILER-DAEMON@example.com", "bob@signed.test", "report"),
                           requiretls=True, is_bounce=True)
        await wait_gone(mta, qid)
    assert aiosmtpd_peer.recorder.received == [["bob@signed.test"]]


async def test_review_requiretls_never_reuses_a_connection_of_an_untrusted_route(
        tmp_path: Path, dns: DNSTestServer, ca: TestCA, pymta_peer: MTA) -> None:
    """plain.test's MX answer is not authenticated; the operator's policy says verify. An
    ordinary message leaves a verified connection in the cache: a REQUIRETLS message to the
    same domain must still be returned, not ride on it."""
    config = _sender_config(tmp_path, dns, ca, _peer_port(pymta_peer),
                            tls_policy=("plain.test=verify",), connection_cache_time=10.0)
    async with MTA(config) as mta:
        first = await inject(mta, "alice@example.com", ["bob@plain.test"],
                             message("alice@example.com", "bob@plain.test", "ordinary"))
        await wait_gone(mta, first)
        subject = f"requiretls after reuse {tmp_path.name}"
        second = await inject(mta, "alice@example.com", ["bob@plain.test"],
                              message("alice@example.com", "bob@plain.test", subject),
                              requiretls=True)
        await wait_gone(mta, second, timeout=20)
        report = await _returned(mta, subject)
    assert b"Status: 5.7.30" in report
    queued = [e for q in pymta_peer.store.ids() if (e := pymta_peer.store.load(q))]
    assert [e.requiretls for e in queued] == [False]


async def test_review_requiretls_waits_when_a_host_that_may_offer_it_is_down(
        tmp_path: Path, dns: DNSTestServer, ca: TestCA) -> None:
    """two.test: the first MX does not answer, the second does not offer REQUIRETLS. The
    first may come back: the message waits instead of being returned."""
    peer = Peer(*ca.write("mx2", ("mx2.two.test",)))
    peer.controller.start()
    try:
        async with MTA(_sender_config(tmp_path, dns, ca, peer.port)) as mta:
            qid = await inject(mta, "alice@example.com", ["bob@two.test"],
                               message("alice@example.com", "bob@two.test", "two"),
                               requiretls=True)
            env = await wait_attempted(mta, qid)
        assert env.recipients[0].state is RcptState.PENDING
        assert env.recipients[0].last_reply.startswith("451 4.4.1")
        assert peer.recorder.received == []
    finally:
        peer.controller.stop()


async def test_review_tls_required_no_does_not_lower_the_smart_hosts_level(
        tmp_path: Path, dns: DNSTestServer, ca: TestCA) -> None:
    """A sender's ``TLS-Required: No`` must not send the relay password (or the message) in
    cleartext to a smart host the operator set at ``encrypt``."""
    peer = await ScriptedPeer(ehlo=("8BITMIME", "AUTH PLAIN LOGIN")).start()
    try:
        host = RelayHost("127.0.0.1", peer.port, username="u", password="p")
        config = _sender_config(tmp_path, dns, ca, peer.port, smtp_relay=host,
                                smtp_tls_security_level="encrypt")
        async with MTA(config) as mta:
            qid = await inject(mta, "alice@example.com", ["x@example.net"],
                               message("alice@example.com", "x@example.net", "no tls"),
                               tls_optional=True)
            env = await wait_attempted(mta, qid)
        assert "TLS is required, but was not offered" in env.recipients[0].last_reply
        assert not any(line.upper().startswith(("AUTH", "MAIL")) for line in peer.lines)
    finally:
        await peer.stop()
