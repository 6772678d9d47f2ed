"""Smoke tests of the real-service harness (tests/services): each service runs and answers."""

from __future__ import annotations

import hashlib
import imaplib
import smtplib
import ssl
import time

import aiomysql
import dns.asyncresolver
import dns.resolver
import pytest
from aiosmtpd.controller import Controller
from ldap3 import Connection, Server

from tests.services import free_port

MESSAGE = b"From: a@example.com\r\nTo: x\r\nSubject: harness smoke\r\n\r\nhello\r\n"


def _tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _until(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)
    return value


class _Sink:
    def __init__(self) -> None:
        self.envelopes: list = []

    async def handle_DATA(self, server, session, envelope):  # aiosmtpd's hook name
        self.envelopes.append(envelope)
        return "250 2.0.0 Ok: sunk"


@pytest.fixture
def smtp_sink():
    handler = _Sink()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    yield controller.port, handler
    controller.stop()


# --------------------------------------------------------------------------------- LDAP


def test_slapd_search_and_binds(slapd):
    server = Server(slapd.url, connect_timeout=2)
    admin = Connection(server, slapd.admin_dn, slapd.admin_password, auto_bind=True)
    admin.search(slapd.base_dn,
                 "(|(mail=alice.alias@example.com)(mailLocalAddress=alice.alias@example.com))",
                 attributes=["uid", "mail", "mailLocalAddress"])
    assert len(admin.entries) == 1 and admin.entries[0].uid == "alice"
    admin.search(slapd.groups_dn, "(cn=list)", attributes=["member"])
    assert slapd.user_dn("bob") in admin.entries[0].member.values
    admin.unbind()
    assert Connection(server, slapd.user_dn("alice"), "alicepw").bind() is True  # {SSHA}
    assert Connection(server, slapd.user_dn("bob"), "bobpw").bind() is True  # cleartext
    assert Connection(server, slapd.user_dn("alice"), "bad").bind() is False


# -------------------------------------------------------------------------------- MySQL


async def test_mariadb_query(mariadb):
    conn = await aiomysql.connect(**mariadb.connect_kwargs())
    try:
        async with conn.cursor() as cur:
            await cur.execute("SELECT password FROM users WHERE email=%s AND active=1",
                              ("alice@example.com",))
            (stored,) = await cur.fetchone()
            await cur.execute("SELECT goto FROM aliases WHERE alias=%s", ("list@example.com",))
            (goto,) = await cur.fetchone()
    finally:
        conn.close()
    scheme, digest = stored[1:].split("}", 1)
    assert scheme == "PLAIN-MD5" and digest == hashlib.md5(b"alicepw").hexdigest()
    assert goto == "alice@example.com,bob@example.com"
    with pytest.raises(aiomysql.OperationalError) as err:
        await aiomysql.connect(host=mariadb.host, port=mariadb.port, user=mariadb.user,
                               password="wrong", db=mariadb.database)
    assert err.value.args[0] == 1045
    assert mariadb.execute("SELECT COUNT(*) FROM mailtest.users") == [("2",)]


# ------------------------------------------------------------------------------ Dovecot


def test_dovecot_imap_login(dovecot):
    for user, password in (("alice@example.com", "alicepw"), ("bob@example.com", "bobpw")):
        imap = imaplib.IMAP4(dovecot.host, dovecot.imap_port, timeout=5)
        imap.login(user, password)
        imap.logout()
    imap = imaplib.IMAP4(dovecot.host, dovecot.imap_port, timeout=5)
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        imap.login("bob@example.com", "wrong")
    imap.logout()
    imap = imaplib.IMAP4(dovecot.host, dovecot.imap_port, timeout=5)  # no penalty delay
    imap.starttls(_tls())
    imap.login("alice@example.com", "alicepw")
    imap.logout()


def test_dovecot_lmtp_delivers(dovecot):
    before = len(dovecot.delivered_files("alice@example.com"))
    lmtp = smtplib.LMTP(dovecot.host, dovecot.lmtp_port, timeout=5)
    assert lmtp.sendmail("a@example.org", ["alice@example.com"], MESSAGE) == {}
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        lmtp.sendmail("a@example.org", ["nobody@example.com"], MESSAGE)
    lmtp.quit()
    lmtp = smtplib.LMTP(dovecot.lmtp_socket, timeout=5)  # the unix socket
    assert lmtp.sendmail("a@example.org", ["alice@example.com"], MESSAGE) == {}
    lmtp.quit()
    assert len(dovecot.delivered_files("alice@example.com")) == before + 2
    assert b"Subject: harness smoke" in dovecot.messages("alice@example.com")[-1]


# ---------------------------------------------------------------------------------- DNS


async def test_dns_mx_and_changes(dns_zone):
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [dns_zone.host]
    resolver.port = dns_zone.port
    resolver.lifetime = 10     # a loaded CI machine; nothing here waits for a timeout
    assert dns_zone.resolver_spec == f"127.0.0.1:{dns_zone.port}"
    mx = await resolver.resolve("example.com", "MX")
    assert sorted((r.preference, str(r.exchange)) for r in mx) == [
        (10, "mx1.example.com."), (20, "mx2.example.com.")]
    assert [str(r) for r in await resolver.resolve("mx2.example.com", "AAAA")] == ["::1"]
    with pytest.raises(dns.resolver.NoAnswer):  # exists, but has no MX: NOERROR/NODATA
        await resolver.resolve("nomx.example.com", "MX")
    with pytest.raises(dns.resolver.NXDOMAIN):
        await resolver.resolve("nothing.example.com", "A")
    dns_zone.add("new.example.com. 60 IN MX 5 mx1.example.com.")
    mx = await resolver.resolve("new.example.com", "MX", tcp=True)
    assert [str(r) for r in mx] == ["5 mx1.example.com."]
    dns_zone.fail("broken.example.com")
    with pytest.raises(dns.resolver.NoNameservers):  # SERVFAIL
        await resolver.resolve("broken.example.com", "MX")


# ------------------------------------------------------------------------------ Postfix


def test_postfix_peer_delivers_and_relays(postfix_peer, smtp_sink):
    sink_port, sink = smtp_sink
    before = postfix_peer.count_delivered("rcpt@example.net")
    with smtplib.SMTP(postfix_peer.host, postfix_peer.port, timeout=10) as smtp:
        assert smtp.sendmail("a@example.com", ["rcpt@example.net"], MESSAGE) == {}
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            smtp.sendmail("a@example.com", ["unknown@example.net"], MESSAGE)
    _until(lambda: postfix_peer.count_delivered("rcpt@example.net") == before + 1)
    assert b"Subject: harness smoke" in postfix_peer.messages("rcpt@example.net")[-1]

    postfix_peer.set_relayhost("127.0.0.1", sink_port)
    with smtplib.SMTP(postfix_peer.host, postfix_peer.port, timeout=10) as smtp:
        smtp.starttls(context=_tls())
        assert smtp.sendmail("a@example.com", ["bob@example.org"], MESSAGE) == {}
    _until(lambda: sink.envelopes)
    assert sink.envelopes[0].rcpt_tos == ["bob@example.org"]
    postfix_peer.wait_log(r"to=<bob@example.org>.*status=sent")


def test_postfix_smarthost_requires_auth_over_starttls(postfix_smarthost, smtp_sink):
    sink_port, sink = smtp_sink
    postfix_smarthost.set_relayhost("127.0.0.1", sink_port)
    host, port = postfix_smarthost.host, postfix_smarthost.port
    with smtplib.SMTP(host, port, timeout=10) as smtp:
        smtp.ehlo()
        assert not smtp.has_extn("auth")  # smtpd_tls_auth_only
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            smtp.sendmail("alice@example.com", ["x@example.org"], MESSAGE)
        assert refused.value.recipients["x@example.org"][0] == 554  # Relay access denied
    with smtplib.SMTP(host, port, timeout=10) as smtp:
        smtp.starttls(context=_tls())
        smtp.ehlo()
        assert "PLAIN" in smtp.esmtp_features["auth"]
        with pytest.raises(smtplib.SMTPAuthenticationError) as bad:
            smtp.login("alice@example.com", "wrong")
        assert bad.value.smtp_code == 535
    with smtplib.SMTP(host, port, timeout=10) as smtp:
        smtp.starttls(context=_tls())
        smtp.login("alice@example.com", postfix_smarthost.sasl_users["alice@example.com"])
        assert smtp.sendmail("alice@example.com", ["x@example.org"], MESSAGE) == {}
    _until(lambda: sink.envelopes)
    assert sink.envelopes[0].rcpt_tos == ["x@example.org"]
    assert sink.envelopes[0].mail_from == "alice@example.com"
