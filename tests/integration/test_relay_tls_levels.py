"""Outbound TLS levels ``verify`` and ``secure`` and the per-destination policy (issue 15,
item 1) against aiosmtpd peers with certificates of a test CA, the MX records served by the
test DNS server: a trusted certificate naming the right host delivers; an untrusted chain, a
certificate for another name, or a peer without STARTTLS defers with the reason and nothing
is sent in cleartext."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from pymta.app import MTA
from pymta.config.model import RelayHost
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

# far.test's MX is a host of another domain (as with a hosted provider): verify wants the
# MX name, secure wants far.test; near.test's MX is under near.test.
ZONE = """\
$TTL 300
$ORIGIN test.
far     IN MX 10 mx.provider.test.
near    IN MX 10 mx.near.test.
mx.near IN A  127.0.0.1
mx.provider IN A 127.0.0.1
relay   IN A  127.0.0.1
"""


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def dns() -> Iterator[DNSTestServer]:
    server = DNSTestServer(ZONE).start()
    yield server
    server.stop()


class Peer:
    """aiosmtpd on 127.0.0.1 offering STARTTLS with ``cert``/``key`` (or no TLS at all)."""

    def __init__(self, cert: Path | None, key: Path | None) -> None:
        self.recorder = RecordingHandler()
        self.port = free_port()
        context = None
        if cert is not None and key is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(str(cert), str(key))
        self.controller = Controller(self.recorder, hostname="127.0.0.1", port=self.port,
                                     tls_context=context, ready_timeout=5)


@pytest.fixture
async def peer_for(tmp_path: Path) -> AsyncIterator:
    started: list[Peer] = []

    def start(cert: Path | None = None, key: Path | None = None) -> Peer:
        peer = Peer(cert, key)
        peer.controller.start()
        started.append(peer)
        return peer

    yield start
    for peer in started:
        peer.controller.stop()


def _config(tmp_path: Path, dns: DNSTestServer, ca: TestCA, port: int, **kw: object):
    return make_config(tmp_path, dns_resolver=(dns.resolver_spec,), mx_port=port,
                       smtp_connect_timeout=5.0, smtp_timeout=20.0,
                       smtp_tls_ca_file=str(ca.root_file), queue_retry_first=30.0,
                       queue_retry_max=60.0, **kw)


async def _deferred(mta: MTA, rcpt: str) -> str:
    qid = await inject(mta, "alice@example.com", [rcpt], message("alice@example.com", rcpt,
                                                                   "tls level"))
    env = await wait_attempted(mta, qid)
    assert env.recipients[0].state is RcptState.PENDING
    return env.recipients[0].last_reply


async def _delivered(mta: MTA, rcpt: str) -> None:
    qid = await inject(mta, "alice@example.com", [rcpt], message("alice@example.com", rcpt,
                                                                   "tls level"))
    await wait_gone(mta, qid)


@pytest.mark.parametrize("level, names, rcpt", [
    ("verify", ("mx.provider.test",), "bob@far.test"),      # the MX host's own name
    ("secure", ("mx.near.test",), "carol@near.test"),       # a host under the next hop
])
async def test_a_trusted_certificate_the_level_accepts_delivers(
        tmp_path: Path, dns: DNSTestServer, ca: TestCA, peer_for, level: str,
        names: tuple[str, ...], rcpt: str) -> None:
    peer = peer_for(*ca.write("peer", names))
    async with MTA(_config(tmp_path, dns, ca, peer.port,
                           smtp_tls_security_level=level)) as mta:
        await _delivered(mta, rcpt)
    assert peer.recorder.received == [[rcpt]]


async def test_secure_refuses_the_mx_hosts_certificate_when_it_does_not_name_the_domain(
        tmp_path: Path, dns: DNSTestServer, ca: TestCA, peer_for) -> None:
    peer = peer_for(*ca.write("mx-provider", ("mx.provider.test",)))
    async with MTA(_config(tmp_path, dns, ca, peer.port,
                           smtp_tls_security_level="secure")) as mta:
        reply = await _deferred(mta, "bob@far.test")
    assert "4.7.5 Server certificate not verified" in reply
    assert "do not match far.test or *.far.test" in reply
    assert peer.recorder.received == []


async def test_verify_defers_an_untrusted_chain_and_another_hosts_name(
        tmp_path: Path, dns: DNSTestServer, ca: TestCA, peer_for) -> None:
    untrusted = peer_for(*make_self_signed(tmp_path / "self", "mx.provider.test"))
    async with MTA(_config(tmp_path / "a", dns, ca, untrusted.port,
                           smtp_tls_security_level="verify")) as mta:
        reply = await _deferred(mta, "bob@far.test")
    assert "4.7.5 Server certificate not trusted" in reply, reply
    assert untrusted.recorder.received == []
    other = peer_for(*ca.write("www", ("www.provider.test",)))
    async with MTA(_config(tmp_path / "b", dns, ca, other.port,
                           smtp_tls_security_level="verify")) as mta:
        reply = await _deferred(mta, "bob@far.test")
    assert "do not match mx.provider.test" in reply, reply
    assert other.recorder.received == []


async def test_verify_never_falls_back_to_cleartext(
        tmp_path: Path, dns: DNSTestServer, ca: TestCA, peer_for) -> None:
    plain = peer_for()          # no STARTTLS at all
    async with MTA(_config(tmp_path, dns, ca, plain.port,
                           smtp_tls_security_level="verify")) as mta:
        reply = await _deferred(mta, "bob@far.test")
    assert "4.7.4 TLS is required, but was not offered" in reply, reply
    assert plain.recorder.received == []


async def test_policy_table_sets_the_level_per_destination(
        tmp_path: Path, dns: DNSTestServer, ca: TestCA, peer_for) -> None:
    """Default ``may``, ``near.test=verify``: the same untrusted peer gets far.test's mail
    (opportunistic) and defers near.test's."""
    untrusted = peer_for(*make_self_signed(tmp_path / "self", "mx.near.test"))
    async with MTA(_config(tmp_path, dns, ca, untrusted.port, smtp_tls_security_level="may",
                           tls_policy=("near.test=verify",))) as mta:
        await _delivered(mta, "bob@far.test")
        reply = await _deferred(mta, "carol@near.test")
    assert "Server certificate not trusted" in reply, reply
    assert untrusted.recorder.received == [["bob@far.test"]]


async def test_review_wrapper_mode_at_verify_names_the_host_in_the_handshake(
        tmp_path: Path, dns: DNSTestServer, ca: TestCA) -> None:
    """Implicit TLS to a smart host at ``verify``: the handshake carries the host's name
    (SNI), so a server that picks its certificate by name shows the right one."""
    cert, key = ca.write("relay", ("relay.test",))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(cert), str(key))
    names: list[str | None] = []
    context.sni_callback = lambda sslobj, name, ctx: names.append(name)
    recorder = RecordingHandler()
    port = free_port()
    controller = Controller(recorder, hostname="127.0.0.1", port=port, ssl_context=context,
                            ready_timeout=5)
    controller.start()
    try:
        config = _config(tmp_path, dns, ca, 25, smtp_relay=RelayHost("relay.test", port),
                         smtp_tls_wrappermode=True, smtp_tls_security_level="verify")
        async with MTA(config) as mta:
            await _delivered(mta, "bob@far.test")
    finally:
        controller.stop()
    assert recorder.received == [["bob@far.test"]]
    assert "relay.test" in names      # (None: the controller's own readiness check)


async def test_the_tls_session_is_logged_as_postfix_logs_it(
        tmp_path: Path, dns: DNSTestServer, ca: TestCA, peer_for,
        caplog: pytest.LogCaptureFixture) -> None:
    """``Verified TLS connection established to host[ip]:port: TLSv1.3 with cipher …`` at
    verify, ``Untrusted …`` at may (the certificate not checked), as Postfix's smtp logs."""
    caplog.set_level("INFO", logger="pymta.delivery.relay")
    peer = peer_for(*ca.write("mx-provider", ("mx.provider.test",)))
    async with MTA(_config(tmp_path / "verify", dns, ca, peer.port,
                           smtp_tls_security_level="verify")) as mta:
        await _delivered(mta, "bob@far.test")
    async with MTA(_config(tmp_path / "may", dns, ca, peer.port,
                           smtp_tls_security_level="may")) as mta:
        await _delivered(mta, "bob@far.test")
    lines = [r.getMessage() for r in caplog.records
             if "TLS connection established" in r.getMessage()]
    relay = f"mx.provider.test[127.0.0.1]:{peer.port}"
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"Verified TLS connection established to {relay}: TLSv1.")
    assert lines[1].startswith(f"Untrusted TLS connection established to {relay}: TLSv1.")
    assert " with cipher " in lines[0] and lines[0].endswith(" bits)")
