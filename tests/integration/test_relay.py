"""Smart-host relay (issue 4): SMTP_RELAY_HOSTAUTH through a real Postfix that requires AUTH
over STARTTLS (tests/services/postfix_peer.py, SASL by Dovecot), plus aiosmtpd for implicit TLS
(SMTP_TLS_WRAPPERMODE), the MX lookup of an unbracketed relay host, and the scripted peer for
``SMTP_TLS_SECURITY_LEVEL=encrypt`` against a server without STARTTLS.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from pymta.app import MTA
from pymta.config.model import RelayHost
from pymta.types import RcptState
from tests.conftest import make_config, wait_for
from tests.integration._outbound import ScriptedPeer, inject, message, wait_attempted, wait_gone
from tests.services.base import ServiceError
from tests.services.dns import DNSTestServer
from tests.services.postfix_peer import PostfixPeer
from tests.services.tls import make_self_signed


@pytest.fixture(scope="module")
def smarthost() -> Iterator[PostfixPeer]:
    peer = PostfixPeer(smart_host=True)
    try:
        peer.start()
    except ServiceError as exc:
        pytest.fail(f"postfix smart host unavailable: {exc}")
    try:
        yield peer
    finally:
        peer.stop()


def relay_config(tmp_path: Path, host: RelayHost, **kw: object):
    return make_config(tmp_path, smtp_relay=host, smtp_connect_timeout=5.0,
                       smtp_timeout=20.0, **kw)


async def test_postfix_smarthost_wrong_password_defers_right_password_delivers(
        tmp_path: Path, smarthost: PostfixPeer) -> None:
    bad = RelayHost("127.0.0.1", smarthost.port, mx_lookup=False,
                    username="alice@example.com", password="wrong")
    good = RelayHost("127.0.0.1", smarthost.port, mx_lookup=False,
                     username="alice@example.com", password="alicepw")
    subject = f"via smarthost {tmp_path.name}"
    async with MTA(relay_config(tmp_path, bad, queue_retry_first=30.0,
                                queue_retry_max=60.0)) as mta:
        qid = await inject(mta, "alice@example.com", ["rcpt@example.net"],
                           message("alice@example.com", "rcpt@example.net", subject))
        env = await wait_attempted(mta, qid)
        rcpt = env.recipients[0]
        assert rcpt.state is RcptState.PENDING  # deferred, not lost, not bounced
        assert rcpt.last_reply.startswith("451 4.7.0 SASL authentication failed")
        assert "535" in rcpt.last_reply
        assert rcpt.next_hop == f"127.0.0.1[127.0.0.1]:{smarthost.port}"
        assert "wrong" not in rcpt.last_reply
    smarthost.wait_log(r"authentication failed")
    # the administrator fixes the password; the queued message goes out at the next attempt
    async with MTA(relay_config(tmp_path, good)) as mta:
        assert mta.manager is not None
        mta.manager.submit(qid, mta.store.load(qid))  # what `queue flush` does
        await wait_gone(mta, qid, timeout=20)
    match = smarthost.wait_log(r"sasl_method=PLAIN, sasl_username=alice@example.com")
    assert match
    smarthost.wait_log(r"to=<rcpt@example.net>.*status=sent \(delivered to maildir\)")
    await wait_for(lambda: any(subject.encode() in m for m in smarthost.messages("rcpt/")))
    log = smarthost.log_text()
    assert "TLS connection established from" in log  # AUTH went over STARTTLS


async def test_encrypt_without_starttls_is_deferred_never_cleartext(tmp_path: Path) -> None:
    peer = await ScriptedPeer(ehlo=("8BITMIME", "AUTH PLAIN LOGIN")).start()
    try:
        host = RelayHost("127.0.0.1", peer.port, username="u", password="p")
        async with MTA(relay_config(tmp_path, host, smtp_tls_security_level="encrypt",
                                    queue_retry_first=30.0, queue_retry_max=60.0)) as mta:
            qid = await inject(mta, "alice@example.com", ["x@example.net"],
                               message("alice@example.com", "x@example.net", "secret"))
            env = await wait_attempted(mta, qid)
            assert env.recipients[0].state is RcptState.PENDING
            assert "TLS is required, but was not offered" in env.recipients[0].last_reply
        assert not any(line.upper().startswith(("AUTH", "MAIL", "DATA")) for line in peer.lines)
    finally:
        await peer.stop()


class AuthRecorder:
    def __init__(self) -> None:
        self.received: list[tuple[str, list[str], bytes]] = []

    async def handle_DATA(self, server, session, envelope):
        self.received.append((envelope.mail_from, list(envelope.rcpt_tos),
                              envelope.original_content))
        return "250 2.0.0 Ok"


def _authenticator(server, session, envelope, mechanism, auth_data):
    ok = (isinstance(auth_data, LoginPassword) and auth_data.login == b"relayuser"
          and auth_data.password == b"relaypw")
    return AuthResult(success=ok)


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


async def test_wrappermode_implicit_tls_with_auth(tmp_path: Path) -> None:
    cert, key = make_self_signed(tmp_path / "tls", "relay.test")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(cert), str(key))
    handler = AuthRecorder()
    port = _free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port, ssl_context=ctx,
                            authenticator=_authenticator, auth_require_tls=False,
                            ready_timeout=5)
    controller.start()
    try:
        host = RelayHost("127.0.0.1", port, username="relayuser", password="relaypw")
        async with MTA(relay_config(tmp_path, host, smtp_tls_wrappermode=True,
                                    smtp_tls_security_level="encrypt")) as mta:
            qid = await inject(mta, "alice@example.com", ["a@one.test", "b@two.test"],
                               message("alice@example.com", "a@one.test", "wrapped"))
            await wait_gone(mta, qid)
        # both domains in one transaction: one smart host, one destination
        assert handler.received == [("alice@example.com", ["a@one.test", "b@two.test"],
                                     handler.received[0][2])]
    finally:
        controller.stop()


async def test_unbracketed_relay_host_is_looked_up_as_mx(tmp_path: Path) -> None:
    port = _free_port("127.0.0.2")
    dns_server = DNSTestServer("""\
$TTL 300
$ORIGIN relay.test.
@    IN SOA ns.relay.test. hm.relay.test. ( 1 3600 600 86400 300 )
@    IN MX 10 mx.relay.test.
mx   IN A  127.0.0.2
""").start()
    handler = AuthRecorder()
    controller = Controller(handler, hostname="127.0.0.2", port=port, ready_timeout=5)
    controller.start()
    try:
        host = RelayHost("relay.test", port, mx_lookup=True)
        async with MTA(relay_config(tmp_path, host,
                                    dns_resolver=(dns_server.resolver_spec,))) as mta:
            qid = await inject(mta, "alice@example.com", ["z@far.test"],
                               message("alice@example.com", "z@far.test", "mx relay"))
            await wait_gone(mta, qid)
        assert handler.received[0][1] == ["z@far.test"]
    finally:
        controller.stop()
        dns_server.stop()
