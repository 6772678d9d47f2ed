"""DKIM-signed DSNs (issue 15, item 7), end to end with real parts: a client submits through
pymta, an aiosmtpd peer (the smart host) refuses the recipient, pymta bounces, and the bounce
that arrives in the sender's maildir is verified by dkimpy against the public key the test
DNS server (``dns_zone``) publishes -- the record file pymta wrote at first start, as an
administrator would publish it. The server's host name is ``mx.example.com``; it signs for
``example.com``, so its notices (``From: MAILER-DAEMON@mx.example.com``) carry
``d=example.com``. A host name outside the signed domains, or signing turned off, leaves the
notice unsigned, as before.
"""

from __future__ import annotations

import asyncio
import email
import re
import socket
from collections.abc import Iterator
from email import policy
from pathlib import Path

import dkim
import dns.resolver
import pytest
from aiosmtpd.controller import Controller

from pymta.app import MTA
from pymta.config.model import RelayHost
from tests.conftest import make_config
from tests.integration._support import smtp_address, smtplib_send, wait_maildir
from tests.services.dns import DNSTestServer

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SELECTOR = "dsn15"
REFUSED = "nobody@remote.test"


class RefusingPeer:
    """aiosmtpd handler: ``550 5.1.1`` for :data:`REFUSED`, everyone else accepted."""

    def __init__(self) -> None:
        self.received: list[bytes] = []

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.lower() == REFUSED:
            return "550 5.1.1 <nobody@remote.test>: Recipient address rejected: unknown"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server, session, envelope):
        self.received.append(envelope.original_content)
        return "250 2.0.0 Ok"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def peer() -> Iterator[int]:
    port = _free_port()
    controller = Controller(RefusingPeer(), hostname="127.0.0.1", port=port, ready_timeout=5)
    controller.start()
    try:
        yield port
    finally:
        controller.stop()


def _config(tmp_path: Path, dns_server: DNSTestServer, port: int, **kw: object):
    """Keys made at first start (no DKIM_PRIVATEKEY), the smart host the aiosmtpd peer,
    the client in MYNETWORKS (so it may relay)."""
    kw.setdefault("dkim_private_key", "")
    return make_config(tmp_path, dns_resolver=(dns_server.resolver_spec,), dns_timeout=2.0,
                       dkim_selector=SELECTOR, mynetworks=("127.0.0.1/32",),
                       smtp_relay=RelayHost("127.0.0.1", port, mx_lookup=False),
                       smtp_connect_timeout=5.0, smtp_timeout=20.0, **kw)


def _publish(dns_server: DNSTestServer, state_dir: str, domain: str) -> None:
    record = Path(state_dir, "dkim", f"{domain}.{SELECTOR}._domainkey.txt").read_text()
    dns_server.add(record.replace("( ", "").replace(" )", ""))


def _dnsfunc(dns_server: DNSTestServer):
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [dns_server.host]
    resolver.port = dns_server.port

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        try:
            answer = resolver.resolve(name.decode(), "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        return b"".join(answer[0].strings)

    return dnsfunc


def _crlf(stored: bytes) -> bytes:
    """A delivered message with the CRLF line ends it was signed with."""
    return stored.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _header(message: bytes) -> bytes:
    return _crlf(message).split(b"\r\n\r\n", 1)[0]


def _signatures(message: bytes) -> list[dict[str, str]]:
    """The tags of each top-level DKIM-Signature field, unfolded, whitespace removed."""
    out = []
    field = rb"^DKIM-Signature:([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)"
    for m in re.finditer(field, _header(message), re.M | re.I):
        value = b"".join(m.group(1).split()).decode()
        out.append(dict(t.split("=", 1) for t in value.split(";") if t))
    return out


async def _bounce(mta: MTA, data: bytes, *, rcpt_options: tuple[str, ...] = ()) -> bytes:
    """Submit ``data`` from alice@example.com to the refused address; the bounce delivered
    to alice's maildir."""
    host, port = smtp_address(mta)
    out = await asyncio.to_thread(smtplib_send, host, port, "alice@example.com", [REFUSED],
                                  data, rcpt_options=rcpt_options)
    assert out["data_reply"][0] == 250  # type: ignore[index]
    (stored,) = await wait_maildir(mta.config.mail_dir, "alice/", 1, timeout=30.0)
    return stored


def _original(subject: str) -> bytes:
    return (f"From: Alice <alice@example.com>\r\nTo: <{REFUSED}>\r\nSubject: {subject}\r\n"
            f"Date: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@example.com>\r\n\r\n"
            "Hello over there.\r\n").encode()


async def test_issue15_dsn_dkim_bounce_from_a_refusing_peer_verifies_with_dkimpy(
        tmp_path: Path, dns_zone: DNSTestServer, peer: int) -> None:
    config = _config(tmp_path, dns_zone, peer)
    async with MTA(config) as mta:
        _publish(dns_zone, config.state_dir, "example.com")
        stored = await _bounce(mta, _original("bounce me signed"))
    bounce = _crlf(stored)
    dsn = email.message_from_bytes(bounce, policy=policy.default)
    assert dsn["From"].startswith("MAILER-DAEMON@mx.example.com")
    assert dsn["Subject"] == "Undelivered Mail Returned to Sender"
    assert "550 5.1.1" in bounce.decode("utf-8", "replace")
    [tags] = _signatures(bounce)       # the notice's own; the returned original's is inside
    assert (tags["d"], tags["s"], tags["c"], tags["a"]) == (
        "example.com", SELECTOR, "relaxed/relaxed", "rsa-sha256")
    signed = tags["h"].lower().split(":")
    assert {"from", "to", "subject", "date", "message-id", "mime-version",
            "content-type"} <= set(signed)
    assert dkim.verify(bounce, dnsfunc=_dnsfunc(dns_zone))
    # the verifier really checks: a changed notice fails
    assert not dkim.verify(bounce.replace(b"Undelivered Mail", b"Undelivered Mall"),
                           dnsfunc=_dnsfunc(dns_zone))


async def test_issue15_dsn_dkim_success_notice_signed_with_ed25519(
        tmp_path: Path, dns_zone: DNSTestServer, peer: int) -> None:
    """A success report (NOTIFY=SUCCESS, delivered to a local mailbox) is signed too, with
    the configured algorithm."""
    config = _config(tmp_path, dns_zone, peer, dkim_algorithm="ed25519")
    async with MTA(config) as mta:
        _publish(dns_zone, config.state_dir, "example.com")
        host, port = smtp_address(mta)
        data = (b"From: Alice <alice@example.com>\r\nTo: <bob@example.com>\r\n"
                b"Subject: tell me when\r\nMessage-ID: <tell.me@example.com>\r\n\r\nHi.\r\n")
        await asyncio.to_thread(smtplib_send, host, port, "alice@example.com",
                                ["alice@example.com"], data, rcpt_options=["NOTIFY=SUCCESS"])
        stored = await wait_maildir(config.mail_dir, "alice/", 2, timeout=30.0)
    [notice] = [m for m in stored if b"Successful Mail Delivery Report" in m]
    notice = _crlf(notice)
    [tags] = _signatures(notice)
    assert (tags["d"], tags["a"]) == ("example.com", "ed25519-sha256")
    assert dkim.verify(notice, dnsfunc=_dnsfunc(dns_zone))


@pytest.mark.parametrize("change", [{"hostname": "mx.other.test"}, {"dkim_sign": False}],
                         ids=["hostname-outside-mail-domain", "signing-off"])
async def test_issue15_dsn_dkim_bounce_unsigned_when_not_our_domain_or_signing_off(
        tmp_path: Path, dns_zone: DNSTestServer, peer: int, change: dict[str, object]) -> None:
    config = _config(tmp_path, dns_zone, peer, **change)
    async with MTA(config) as mta:
        stored = await _bounce(mta, _original("bounce me plain"))
    bounce = _crlf(stored)
    dsn = email.message_from_bytes(bounce, policy=policy.default)
    assert dsn["From"].startswith(f"MAILER-DAEMON@{config.hostname}")
    assert _signatures(bounce) == []
    # no key was made for the host name's domain
    assert not Path(config.state_dir, "dkim", f"other.test.{SELECTOR}.key").exists()
    assert not Path(config.state_dir, "dkim", f"{config.hostname}.{SELECTOR}.key").exists()
