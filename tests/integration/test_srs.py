"""SRS (issue 6, item 8) end to end: mail from a foreign sender to a local alias that forwards
to a foreign address leaves with an ``SRS0=…@example.com`` envelope sender; a bounce sent back
to that address over SMTP is accepted, reversed and delivered to the original sender; forged
and expired SRS addresses are refused at RCPT; local senders keep their address.

The remote side is aiosmtpd (an independent SMTP implementation) on 127.0.0.2, reached by MX
lookups against the real test DNS server (``dns_zone``) with ``PYMTA_MX_PORT``.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from pymta.app import MTA
from pymta.srs import SRS
from tests.conftest import RawClient, maildir_messages, make_config, wait_for
from tests.integration._support import smtplib_send
from tests.services.dns import DNSTestServer

REMOTE = "127.0.0.2"
ALIASES = ("team:alice,bob@example.com fwd:friend@remote.test "
           "mixed:alice,friend@remote.test gone:nobody@remote.test")


class Recorder:
    """aiosmtpd handler: what arrived (MAIL FROM, RCPT TOs, content); ``nobody@`` refused."""

    def __init__(self) -> None:
        self.received: list[tuple[str, list[str], bytes]] = []

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.lower().startswith("nobody@"):
            return "550 5.1.1 <nobody@remote.test>: no such user"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server, session, envelope):
        self.received.append((envelope.mail_from, list(envelope.rcpt_tos),
                              envelope.original_content))
        return "250 2.0.0 Ok: queued as AIOSMTPD"

    def to(self, rcpt: str) -> list[tuple[str, list[str], bytes]]:
        return [r for r in self.received if rcpt in r[1]]


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@pytest.fixture
def remote(dns_zone: DNSTestServer) -> Iterator[tuple[Recorder, int]]:
    for domain in ("remote.test", "origin.test", "hop1.test"):
        dns_zone.add(f"{domain}. 60 IN MX 10 mx.{domain}.")
        dns_zone.add(f"mx.{domain}. 60 IN A {REMOTE}")
    port = _free_port(REMOTE)
    handler = Recorder()
    controller = Controller(handler, hostname=REMOTE, port=port, ready_timeout=5)
    controller.start()
    try:
        yield handler, port
    finally:
        controller.stop()


def srs_config(tmp_path: Path, dns: DNSTestServer, port: int, **kw: object):
    return make_config(tmp_path, mail_aliases=ALIASES, dns_resolver=(dns.resolver_spec,),
                       mx_port=port, smtp_tls_security_level="none", smtp_connect_timeout=3.0,
                       smtp_timeout=10.0, dns_timeout=3.0, **kw)


@pytest.fixture
async def srs_mta(tmp_path: Path, dns_zone: DNSTestServer,
                  remote: tuple[Recorder, int]) -> AsyncIterator[MTA]:
    async with MTA(srs_config(tmp_path, dns_zone, remote[1])) as mta:
        yield mta


def msg(sender: str, to: str, subject: str) -> bytes:
    return (f"From: <{sender}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n"
            f"Message-ID: <{time.time_ns()}@client.test>\r\n\r\nHello.\r\n").encode()


async def send(mta: MTA, sender: str, rcpts: list[str], data: bytes) -> dict[str, object]:
    host, port = mta.addresses["smtp"][0]
    return await asyncio.to_thread(smtplib_send, host, port, sender, rcpts, data)


def bounce(to: str, subject: str) -> bytes:
    """A minimal DSN as a remote MTA would send it to the envelope sender it saw."""
    return (f"From: MAILER-DAEMON@remote.test\r\nTo: <{to}>\r\nSubject: {subject}\r\n"
            "Auto-Submitted: auto-replied\r\nContent-Type: text/plain\r\n\r\n"
            "Your message could not be delivered.\r\n").encode()


async def test_forward_rewrites_and_bounce_is_reversed(
        srs_mta: MTA, remote: tuple[Recorder, int]) -> None:
    handler, _ = remote
    srs = srs_mta.srs
    assert srs is not None
    # 1. foreign sender -> fwd@example.com -> friend@remote.test: SRS0 at our first domain
    await send(srs_mta, "sender@origin.test", ["fwd@example.com"],
               msg("sender@origin.test", "fwd@example.com", "forward me"))
    (mail_from, rcpts, content), = await wait_for(lambda: handler.to("friend@remote.test"))
    assert rcpts == ["friend@remote.test"]
    assert mail_from.startswith("SRS0=") and mail_from.endswith("@example.com")
    assert "=origin.test=sender@" in mail_from
    assert b"Subject: forward me" in content
    assert srs.reverse(mail_from) == "sender@origin.test"

    # 2. the remote bounces to that address (null sender): accepted, reversed, delivered
    reply = await send(srs_mta, "", [mail_from], bounce(mail_from, "Undelivered: forward me"))
    assert reply["data_reply"][0] == 250
    (b_from, b_rcpts, b_content), = await wait_for(lambda: handler.to("sender@origin.test"))
    assert b_from in ("", "<>") and b_rcpts == ["sender@origin.test"]
    assert b"Undelivered: forward me" in b_content

    # 3. the hash is checked case-insensitively, as PostSRSd does (case-smashing relays)
    local, _, domain = mail_from.rpartition("@")
    await send(srs_mta, "", [local.upper() + "@" + domain.upper()], bounce(mail_from, "upper"))
    await wait_for(lambda: any(b"Subject: upper" in r[2] for r in handler.received))
    assert [r[1] for r in handler.received if b"Subject: upper" in r[2]] == [
        ["SENDER@ORIGIN.TEST"]]


async def test_remote_failure_dsn_goes_to_the_original_sender(
        srs_mta: MTA, remote: tuple[Recorder, int]) -> None:
    """Our own bounce of a forwarded message: the DSN to the SRS sender is reversed too."""
    handler, _ = remote
    await send(srs_mta, "sender@origin.test", ["gone@example.com"],
               msg("sender@origin.test", "gone@example.com", "to a gone address"))
    (d_from, d_rcpts, d_content), = await wait_for(lambda: handler.to("sender@origin.test"))
    assert d_from in ("", "<>") and d_rcpts == ["sender@origin.test"]
    assert b"nobody@remote.test" in d_content and b"5.1.1" in d_content


async def test_mixed_local_and_forwarded_recipients_rewrite_for_all(
        srs_mta: MTA, remote: tuple[Recorder, int]) -> None:
    handler, _ = remote
    await send(srs_mta, "sender@origin.test", ["mixed@example.com"],
               msg("sender@origin.test", "mixed@example.com", "mixed"))
    (mail_from, _, _), = await wait_for(lambda: handler.to("friend@remote.test"))
    assert mail_from.startswith("SRS0=")
    local_copy = await wait_for(lambda: maildir_messages(srs_mta.config.mail_dir, "alice"))
    assert local_copy[0].startswith(f"Return-Path: <{mail_from}>".encode())


async def test_srs_sender_becomes_srs1_and_bounces_to_the_first_hop(
        srs_mta: MTA, remote: tuple[Recorder, int]) -> None:
    handler, _ = remote
    first_hop = SRS(["hop1 secret"], "hop1.test").forward("sender@origin.test")
    await send(srs_mta, first_hop, ["fwd@example.com"], msg(first_hop, "fwd@example.com", "2nd"))
    (mail_from, _, _), = await wait_for(lambda: handler.to("friend@remote.test"))
    assert mail_from.startswith("SRS1=") and "=hop1.test==" in mail_from
    await send(srs_mta, "", [mail_from], bounce(mail_from, "back to hop1"))
    (_, rcpts, _), = await wait_for(lambda: handler.to(first_hop))
    assert rcpts == [first_hop]


async def test_local_sender_is_not_rewritten(srs_mta: MTA, remote: tuple[Recorder, int]) -> None:
    handler, _ = remote
    await send(srs_mta, "alice@example.com", ["fwd@example.com"],
               msg("alice@example.com", "fwd@example.com", "from a local user"))
    (mail_from, _, _), = await wait_for(lambda: handler.to("friend@remote.test"))
    assert mail_from == "alice@example.com"


async def test_sender_to_local_mailbox_only_is_not_rewritten(srs_mta: MTA) -> None:
    await send(srs_mta, "sender@origin.test", ["alice@example.com"],
               msg("sender@origin.test", "alice@example.com", "just local"))
    stored = await wait_for(lambda: maildir_messages(srs_mta.config.mail_dir, "alice"))
    assert stored[0].startswith(b"Return-Path: <sender@origin.test>")


async def rcpt_reply(mta: MTA, rcpt: str, sender: str = "") -> tuple[int, str]:
    host, port = mta.addresses["smtp"][0]
    client = await RawClient.connect(host, port)
    try:
        await client.reply()
        await client.cmd("EHLO remote.test")
        await client.cmd(f"MAIL FROM:<{sender}>")
        return await client.cmd(f"RCPT TO:<{rcpt}>")
    finally:
        await client.close()


async def test_forged_and_expired_srs_addresses_are_refused(srs_mta: MTA) -> None:
    srs = srs_mta.srs
    assert srs is not None
    good = srs.forward("victim@origin.test")
    local, _, domain = good.rpartition("@")
    forged_hash = "SRS0=AAAA" + local[9:] + "@" + domain
    code, text = await rcpt_reply(srs_mta, forged_hash)
    assert code == 550 and "5.1.1" in text and "invalid SRS signature" in text
    tampered = good.replace("victim@", "other@")
    code, text = await rcpt_reply(srs_mta, tampered)
    assert code == 550 and "invalid SRS signature" in text
    # made with our secret 30 days ago: genuine, but past SRS_MAX_AGE (21 days)
    old = SRS(srs.load(), srs.domain, clock=lambda: time.time() - 30 * 86400)
    code, text = await rcpt_reply(srs_mta, old.forward("victim@origin.test"))
    assert code == 550 and "5.1.1" in text and "SRS address expired" in text
    # a fresh one is fine; what only starts like SRS is an ordinary (here unknown) address
    assert (await rcpt_reply(srs_mta, good))[0] == 250
    for unknown in ("SRS0=xx@example.com", "srs0-nobody@example.com"):
        code, text = await rcpt_reply(srs_mta, unknown)
        assert code == 550 and "User unknown" in text


async def test_secret_persists_in_the_state_dir(tmp_path: Path, dns_zone: DNSTestServer,
                                                remote: tuple[Recorder, int]) -> None:
    config = srs_config(tmp_path, dns_zone, remote[1])
    async with MTA(config) as mta:
        assert mta.srs is not None
        made = mta.srs.forward("sender@origin.test")
    secret = tmp_path / "state" / "srs" / "secret"
    assert secret.stat().st_mode & 0o777 == 0o600
    async with MTA(config) as mta:  # restart: the same secret, old addresses still reverse
        assert (await rcpt_reply(mta, made))[0] == 250


async def test_separate_srs_domain_and_given_secret(tmp_path: Path, dns_zone: DNSTestServer,
                                                    remote: tuple[Recorder, int]) -> None:
    handler, port = remote
    config = srs_config(tmp_path, dns_zone, port, srs_domain="srs.example.net",
                        srs_secret="configured-secret")
    async with MTA(config) as mta:
        await send(mta, "sender@origin.test", ["fwd@example.com"],
                   msg("sender@origin.test", "fwd@example.com", "srs domain"))
        (mail_from, _, _), = await wait_for(lambda: handler.to("friend@remote.test"))
        assert mail_from.endswith("@srs.example.net")
        assert SRS(["configured-secret"], "srs.example.net").reverse(mail_from) == (
            "sender@origin.test")
        await send(mta, "", [mail_from], bounce(mail_from, "via srs domain"))
        await wait_for(lambda: handler.to("sender@origin.test"))
        # the SRS domain takes nothing but SRS addresses
        code, _ = await rcpt_reply(mta, "postmaster@srs.example.net")
        assert code == 550
    assert not (tmp_path / "state" / "srs").exists()  # SRS_SECRET given: no file


async def test_srs_disabled(tmp_path: Path, dns_zone: DNSTestServer,
                            remote: tuple[Recorder, int]) -> None:
    handler, port = remote
    async with MTA(srs_config(tmp_path, dns_zone, port, srs_enable=False)) as mta:
        assert mta.srs is None
        await send(mta, "sender@origin.test", ["fwd@example.com"],
                   msg("sender@origin.test", "fwd@example.com", "plain forward"))
        (mail_from, _, _), = await wait_for(lambda: handler.to("friend@remote.test"))
        assert mail_from == "sender@origin.test"
        code, _ = await rcpt_reply(mta, "SRS0=AAAA=AA=origin.test=x@example.com")
        assert code == 550
