"""An application embedding pymta (issue 11, item 5): an ``MTA`` in the application's own
event loop on 127.0.0.1, its recipients in a dict or behind a coroutine, each message handed
to a coroutine of its own, over real SMTP (aiosmtplib). Also: two servers in one process each
resolve through their own DNS server (the real loopback test DNS), and the host name a server
without ``MYHOSTNAME`` uses in its greeting, ``Received:`` and log (the issue's defect)."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from pymta.app import MTA
from pymta.callbacks import message_bytes
from pymta.config.load import load_config
from pymta.types import (
    QueuedMessage,
    Recipient,
    Reply,
    SMTPError,
    Target,
    TemporaryFailure,
)
from tests.conftest import make_config, wait_for
from tests.integration import serverproc
from tests.integration._support import maildir_bytes, queued_id, smtp_address
from tests.integration.serverproc import ServerProc, smtp_send, wait_until
from tests.services.dns import DNSTestServer

server_factory = serverproc.server_factory  # the fixture

BODY = b"Subject: embedded\r\nFrom: app@example.net\r\n\r\nhello application\r\n"


@dataclass
class Delivered:
    qid: str
    sender: str
    recipients: list[str]
    data: bytes


@dataclass
class Inbox:
    """The application's delivery callback: keeps what it is given; ``refuse`` maps an
    address to what to raise for it, ``fail_first`` raises on the first n calls."""

    messages: list[Delivered] = field(default_factory=list)
    calls: int = 0
    fail_first: list[BaseException] = field(default_factory=list)
    refuse: dict[str, BaseException] = field(default_factory=dict)

    async def __call__(self, msg: QueuedMessage, rcpts: Sequence[Recipient]) -> None:
        self.calls += 1
        await asyncio.sleep(0)      # a real coroutine of the application
        if self.fail_first:
            raise self.fail_first.pop(0)
        for r in rcpts:
            if r.address in self.refuse:
                raise self.refuse[r.address]
        self.messages.append(Delivered(msg.qid, msg.envelope.sender,
                                       [r.address for r in rcpts], message_bytes(msg)))

    def for_(self, address: str) -> list[Delivered]:
        return [m for m in self.messages if address in m.recipients]


@pytest.fixture
def inbox() -> Inbox:
    return Inbox()


async def send(mta: MTA, rcpts: Sequence[str], data: bytes = BODY,
               sender: str = "app@example.net") -> str:
    host, port = smtp_address(mta)
    async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=10) as smtp:
        errors, text = await smtp.sendmail(sender, list(rcpts), data)
    assert errors == {}
    return text


async def rcpt_reply(mta: MTA, rcpt: str) -> tuple[int, str]:
    """The server's reply to ``RCPT TO:<rcpt>`` (a refusal is an answer, not an error)."""
    host, port = smtp_address(mta)
    async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=10) as smtp:
        await smtp.ehlo()
        await smtp.mail("app@example.net")
        try:
            response = await smtp.rcpt(rcpt)
        except aiosmtplib.SMTPRecipientRefused as exc:
            return exc.code, exc.message
        return response.code, response.message


def received_of(data: bytes) -> str:
    """Our ``Received:`` field (the first in the spooled message), unfolded."""
    head = data.split(b"\r\n\r\n", 1)[0].decode()
    m = re.search(r"^Received: [^\r\n]*(?:\r\n[ \t][^\r\n]*)*", head, re.M)
    assert m, head
    return re.sub(r"\r\n[ \t]+", " ", m.group(0))


# --------------------------------------------------------------------------- embedding


async def test_issue11_dict_lookup_and_async_callback(tmp_path: Path, inbox: Inbox) -> None:
    users = {"alice@example.com": True, "bob@example.com": "bob/",
             "team@example.com": [Target("alice@example.com", True, None),
                                  Target("bob@example.com", True, None)]}
    async with MTA(make_config(tmp_path), lookups=users, agent=inbox) as mta:
        qid = queued_id(await send(mta, ["Alice@Example.com"]))
        await wait_for(lambda: inbox.for_("Alice@Example.com"))
        qid2 = queued_id(await send(mta, ["team@example.com"]))
        await wait_for(lambda: len(inbox.messages) >= 2
                       and sorted(r for m in inbox.messages[1:] for r in m.recipients)
                       == ["alice@example.com", "bob@example.com"])
        assert await rcpt_reply(mta, "nobody@example.com") == (
            550, "5.1.1 <nobody@example.com>: Recipient address rejected: User unknown in "
                 "virtual mailbox table")
    [first] = inbox.for_("Alice@Example.com")
    assert first.qid == qid and first.sender == "app@example.net"
    received = received_of(first.data)
    assert received.startswith("Received: from ")
    assert f"by mx.example.com (pymta) with ESMTP id {qid} for <Alice@Example.com>;" in received
    assert first.data.endswith(b"\r\n\r\nhello application\r\n")
    assert b"Subject: embedded\r\n" in first.data
    assert all(m.qid == qid2 for m in inbox.messages[1:])
    assert maildir_bytes(str(tmp_path / "mail"), "alice/") == []    # not the maildir


async def test_issue11_async_def_lookup(tmp_path: Path, inbox: Inbox) -> None:
    asked: list[str] = []

    async def directory(address: str) -> Any:
        asked.append(address)
        await asyncio.sleep(0.01)   # the application asks its database
        return "x/" if address.lower().startswith("user") else None

    async with MTA(make_config(tmp_path), lookups=directory, agent=inbox) as mta:
        qid = queued_id(await send(mta, ["User.One@example.org"]))
        await wait_for(lambda: inbox.messages)
        assert (await rcpt_reply(mta, "other@example.org"))[0] == 550
    assert asked == ["User.One@example.org", "other@example.org"]
    assert inbox.messages[0].qid == qid
    assert inbox.messages[0].recipients == ["User.One@example.org"]


async def test_issue11_lookup_failures_are_451_never_550(
        tmp_path: Path, inbox: Inbox, caplog: pytest.LogCaptureFixture) -> None:
    state = {"mode": "down"}

    def lookup(address: str) -> Any:
        if state["mode"] == "down":
            raise TemporaryFailure("directory down")
        if state["mode"] == "bug":
            raise ZeroDivisionError("application bug")
        return True

    caplog.set_level(logging.INFO, logger="pymta")
    async with MTA(make_config(tmp_path), lookups=[lookup], agent=inbox) as mta:
        assert await rcpt_reply(mta, "a@example.com") == (451, "4.3.0 directory down")
        state["mode"] = "bug"
        assert await rcpt_reply(mta, "a@example.com") == (451,
                                                          "4.3.0 Temporary lookup failure")
        logged = [r for r in caplog.records if "lookup of <a@example.com> failed" in
                  r.getMessage()]
        assert [r.levelno for r in logged] == [logging.WARNING, logging.ERROR]
        assert "ZeroDivisionError('application bug')" in logged[-1].getMessage()
        state["mode"] = "up"        # failures were not cached: accepted at once
        assert await rcpt_reply(mta, "a@example.com") == (250, "2.1.5 Ok")


async def test_issue11_callback_temporary_failure_is_retried(tmp_path: Path,
                                                             inbox: Inbox) -> None:
    inbox.fail_first = [TemporaryFailure("mailbox busy", "4.2.0"), RuntimeError("app bug")]
    async with MTA(make_config(tmp_path), lookups={"alice@example.com": True},
                   agent=inbox) as mta:
        qid = queued_id(await send(mta, ["alice@example.com"]))
        await wait_for(lambda: inbox.messages)
        await wait_for(lambda: not mta.store.ids())
    # a TemporaryFailure, then another exception: both retried, then delivered once
    assert inbox.calls == 3
    assert [m.qid for m in inbox.messages] == [qid]


async def test_issue11_callback_550_bounces(tmp_path: Path, inbox: Inbox) -> None:
    """The sender is an address of the application too: the bounce comes back to the
    callback, for the sender, from the null sender."""
    inbox.refuse = {"gone@example.com": SMTPError(Reply(550, "5.1.1", "no such user here"))}
    users = {"owner@example.com": True, "gone@example.com": True}
    async with MTA(make_config(tmp_path), lookups=users, agent=inbox) as mta:
        qid = queued_id(await send(mta, ["gone@example.com"], sender="owner@example.com"))
        await wait_for(lambda: inbox.for_("owner@example.com"))
        await wait_for(lambda: not mta.store.ids())
    [bounce] = inbox.for_("owner@example.com")
    assert bounce.sender == ""
    text = bounce.data.decode()
    assert "Final-Recipient: rfc822; gone@example.com" in text
    assert "Status: 5.1.1" in text and "Action: failed" in text
    assert "no such user here" in text and qid in text
    assert inbox.for_("gone@example.com") == []
    assert inbox.calls == 2     # never retried


# --------------------------------------------------------------------------- own DNS each


ZONE_A = """\
$TTL 300
$ORIGIN shared.test.
@      IN MX  10 mx-a.shared.test.
mx-a   IN A   127.0.0.1
@      IN TXT "v=spf1 ip4:127.0.0.0/8 -all"
"""
ZONE_B = """\
$TTL 300
$ORIGIN shared.test.
@      IN MX  10 mx-b.shared.test.
mx-b   IN A   127.0.0.2
@      IN TXT "v=spf1 ip4:192.0.2.0/24 -all"
"""


@pytest.fixture
def other_dns() -> Iterator[DNSTestServer]:
    """A second test DNS server of this test's own, on a free port."""
    server = DNSTestServer(ZONE_B, port=0).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def two_servers(tmp_path: Path, dns_zone: DNSTestServer, other_dns: DNSTestServer,
                      ) -> AsyncIterator[tuple[MTA, Inbox, MTA, Inbox]]:
    dns_zone.set_zone(ZONE_A)
    inbox_a, inbox_b = Inbox(), Inbox()
    users = {"alice@example.com": True}
    a = MTA(make_config(tmp_path / "a", dns_resolver=(dns_zone.resolver_spec,),
                        dns_timeout=2.0), lookups=users, agent=inbox_a)
    b = MTA(make_config(tmp_path / "b", dns_resolver=(other_dns.resolver_spec,),
                        dns_timeout=2.0), lookups=users, agent=inbox_b)
    async with a, b:
        yield a, inbox_a, b, inbox_b


async def test_issue11_two_servers_resolve_through_their_own_dns(two_servers) -> None:
    a, _, b, _ = two_servers
    mx_a, mx_b = await asyncio.gather(a.dns.mx_hosts("shared.test"),
                                      b.dns.mx_hosts("shared.test"))
    assert mx_a.hosts == ("mx-a.shared.test",)
    assert mx_b.hosts == ("mx-b.shared.test",)
    assert await a.dns.addresses("mx-a.shared.test") == ["127.0.0.1"]
    with pytest.raises(Exception, match="not found"):   # zone B knows no mx-a
        await b.dns.addresses("mx-a.shared.test")


async def test_issue11_two_servers_spf_checks_see_their_own_dns(two_servers) -> None:
    """The same message from 127.0.0.1, at the same time: SPF passes where the server's DNS
    allows 127.0.0.0/8 and fails where it does not (pyspf's DNS is per check, not
    process-wide)."""
    a, inbox_a, b, inbox_b = two_servers
    sender = "someone@shared.test"
    for _ in range(3):
        await asyncio.gather(send(a, ["alice@example.com"], sender=sender),
                             send(b, ["alice@example.com"], sender=sender))
    await wait_for(lambda: len(inbox_a.messages) == 3 and len(inbox_b.messages) == 3)
    for m in inbox_a.messages:
        assert m.data.startswith(b"Authentication-Results: mx.example.com; spf=pass")
        assert b"\r\nReceived-SPF: pass " in m.data
    for m in inbox_b.messages:
        assert m.data.startswith(b"Authentication-Results: mx.example.com; spf=fail")
        assert b"\r\nReceived-SPF: fail " in m.data


# --------------------------------------------------------------------------- the host name


def test_issue11_myhostname_defaults_to_the_host_name(
        server_factory, tmp_path: Path) -> None:
    """``pymta serve`` without MYHOSTNAME: the greeting, the log and ``Received:`` all give
    the machine's name (the defect: the log said ``vm``, ``Received:`` said ``localhost``)."""
    expected = load_config({"MAIL_DOMAIN": "example.com"}).hostname
    srv: ServerProc = server_factory(MYHOSTNAME="", PYMTA_WORKERS="1")
    srv.start()
    try:
        client = serverproc.SMTPClient(srv.port)
        try:
            code, greeting = client.greeting
        finally:
            client.close()
        assert code == 220 and greeting.startswith(f"220 {expected} ESMTP")
        code, text = smtp_send(srv.port, "app@example.net", ["alice@example.com"], BODY)
        assert code == 250, text
        stored = wait_until(lambda: maildir_bytes(str(srv.mail_dir), "alice/"), 10,
                            what="delivery")[0]
        assert wait_until(lambda: f"pymta started on {expected} (pid " in srv.stderr, 10,
                          what="the start-up log line")
    finally:
        assert srv.stop() == 0
    unfolded = re.sub(rb"\n[ \t]+", b" ", stored).decode()
    assert f"by {expected} (pymta) with ESMTP id {queued_id(text)}" in unfolded
    assert "by localhost " not in unfolded or expected == "localhost"
