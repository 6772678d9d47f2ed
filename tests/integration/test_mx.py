"""Direct MX delivery (issue 4) against a real DNS server (dnslib, tests/services/dns.py) and
aiosmtpd as the independent remote MX, on loopback addresses 127.0.0.2 / 127.0.0.3 sharing one
port (``PYMTA_MX_PORT``): the zone decides which address a domain's mail goes to.
"""

from __future__ import annotations

import asyncio
import io
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from pymta.app import MTA
from pymta.cli.queue import cmd_list, cmd_show
from pymta.types import RcptState
from tests.conftest import maildir_messages, make_config, wait_for
from tests.integration._outbound import ScriptedPeer, inject, message, wait_attempted, wait_gone
from tests.services.dns import DNSTestServer

LIVE, DEAD = "127.0.0.2", "127.0.0.3"

ZONE = """\
$TTL 300
$ORIGIN dest.test.
@           IN SOA  ns1.dest.test. hostmaster.dest.test. ( 1 3600 600 86400 300 )
@           IN MX   10 mx1.dest.test.
@           IN MX   20 mx2.dest.test.
mx1         IN A    127.0.0.3
mx2         IN A    127.0.0.2
$ORIGIN nomx.test.
@           IN A    127.0.0.2
$ORIGIN nullmx.test.
@           IN MX   0 .
$ORIGIN up.test.
@           IN MX   10 mx.up.test.
mx          IN A    127.0.0.2
"""


def free_port_on(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class Recorder:
    """aiosmtpd handler: records what arrived; ``refuse`` maps an address to a RCPT reply."""

    def __init__(self, refuse: dict[str, str] | None = None) -> None:
        self.refuse = refuse or {}
        self.received: list[tuple[str, list[str], bytes]] = []
        self.sessions: set[int] = set()

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.lower() in self.refuse:
            return self.refuse[address.lower()]
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server, session, envelope):
        self.sessions.add(id(session))
        self.received.append((envelope.mail_from, list(envelope.rcpt_tos),
                              envelope.original_content))
        return "250 2.0.0 Ok: queued as AIOSMTPD"


@pytest.fixture
def dns_server() -> Iterator[DNSTestServer]:
    server = DNSTestServer(ZONE).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def mx_port() -> int:
    return free_port_on(LIVE)


def start_peer(port: int, handler: Recorder, host: str = LIVE) -> Controller:
    controller = Controller(handler, hostname=host, port=port, ready_timeout=5)
    controller.start()
    return controller


@pytest.fixture
async def mta(tmp_path: Path, dns_server: DNSTestServer, mx_port: int) -> AsyncIterator[MTA]:
    config = make_config(tmp_path, dns_resolver=(dns_server.resolver_spec,), mx_port=mx_port,
                         smtp_connect_timeout=3.0, smtp_timeout=10.0, dead_host_time=30.0,
                         dns_timeout=3.0)
    async with MTA(config) as server:
        yield server


def dsns(mta: MTA) -> list[bytes]:
    return maildir_messages(mta.config.mail_dir, "alice")


async def test_dead_primary_mx_falls_back_and_is_remembered(mta: MTA, mx_port: int,
                                                            caplog) -> None:
    handler = Recorder()
    peer = start_peer(mx_port, handler)
    caplog.set_level(logging.INFO, logger="pymta")
    try:
        qid = await inject(mta, "alice@example.com", ["a@dest.test", "b@dest.test"],
                           message("alice@example.com", "a@dest.test", "fallback"))
        await wait_gone(mta, qid)
        assert len(handler.received) == 1  # both recipients in one transaction (batching)
        sender, rcpts, data = handler.received[0]
        assert sender == "alice@example.com" and rcpts == ["a@dest.test", "b@dest.test"]
        assert b"Subject: fallback" in data
        relay = f"relay=mx2.dest.test[{LIVE}]:{mx_port}"
        assert any(relay in r.getMessage() and "status=sent" in r.getMessage()
                   for r in caplog.records), [r.getMessage() for r in caplog.records]
        # the dead primary is remembered: the next message skips it without a connection
        agent = mta.router.remote  # type: ignore[attr-defined]
        assert agent._is_dead(DEAD, mx_port) is not None
        qid2 = await inject(mta, "alice@example.com", ["c@dest.test"],
                            message("alice@example.com", "c@dest.test", "second"))
        await wait_gone(mta, qid2)
        assert len(handler.received) == 2
        # ... and the cached connection to the fallback carried the second message too
        assert len(handler.sessions) == 1
        assert agent.connections_opened == 1
    finally:
        peer.stop()


async def test_4xx_greeting_tries_next_mx(tmp_path: Path, dns_server: DNSTestServer,
                                          mx_port: int) -> None:
    busy = await ScriptedPeer(DEAD, mx_port, greeting="421 4.3.2 busy, try later").start()
    handler = Recorder()
    peer = start_peer(mx_port, handler)
    config = make_config(tmp_path, dns_resolver=(dns_server.resolver_spec,), mx_port=mx_port)
    try:
        async with MTA(config) as mta:
            qid = await inject(mta, "alice@example.com", ["x@dest.test"],
                               message("alice@example.com", "x@dest.test", "greeting"))
            await wait_gone(mta, qid)
        assert busy.connections >= 1 and len(handler.received) == 1
    finally:
        peer.stop()
        await busy.stop()


async def test_domain_without_mx_uses_its_address(mta: MTA, mx_port: int) -> None:
    handler = Recorder()
    peer = start_peer(mx_port, handler)
    try:
        qid = await inject(mta, "alice@example.com", ["x@nomx.test"],
                           message("alice@example.com", "x@nomx.test", "implicit mx"))
        await wait_gone(mta, qid)
        assert handler.received[0][1] == ["x@nomx.test"]
    finally:
        peer.stop()


@pytest.mark.parametrize("domain,status", [("nullmx.test", "5.1.10"),
                                           ("nxdomain.test", "5.4.4")])
async def test_null_mx_and_nxdomain_bounce(mta: MTA, domain: str, status: str) -> None:
    qid = await inject(mta, "alice@example.com", [f"x@{domain}"],
                       message("alice@example.com", f"x@{domain}", "nowhere"))
    await wait_gone(mta, qid)
    [dsn] = await wait_for(lambda: dsns(mta))
    assert f"Status: {status}".encode() in dsn
    assert f"x@{domain}".encode() in dsn


async def test_remote_5xx_gives_dsn_quoting_the_remote_reply(mta: MTA, mx_port: int) -> None:
    handler = Recorder(refuse={"bad@up.test": "550 5.1.1 <bad@up.test>: no such user here"})
    peer = start_peer(mx_port, handler)
    try:
        qid = await inject(mta, "alice@example.com", ["good@up.test", "bad@up.test"],
                           message("alice@example.com", "good@up.test", "partly"))
        await wait_gone(mta, qid)
        assert handler.received[0][1] == ["good@up.test"]
        [dsn] = await wait_for(lambda: dsns(mta))
        assert b"Final-Recipient: rfc822; bad@up.test" in dsn
        assert b"Status: 5.1.1" in dsn
        assert b"Remote-MTA: dns; mx.up.test" in dsn
        assert b"no such user here" in dsn
        assert b"Final-Recipient: rfc822; good@up.test" not in dsn
    finally:
        peer.stop()


async def test_remote_down_stays_deferred_then_delivered(tmp_path: Path,
                                                         dns_server: DNSTestServer,
                                                         mx_port: int) -> None:
    config = make_config(tmp_path, dns_resolver=(dns_server.resolver_spec,), mx_port=mx_port,
                         queue_retry_first=0.3, queue_retry_max=0.5, dead_host_time=0.2,
                         smtp_connect_timeout=2.0)
    async with MTA(config) as mta:
        qid = await inject(mta, "alice@example.com", ["x@up.test"],
                           message("alice@example.com", "x@up.test", "patience"))
        env = await wait_attempted(mta, qid, attempts=2)
        rcpt = env.recipients[0]
        assert rcpt.state is RcptState.PENDING
        assert rcpt.next_hop == f"mx.up.test[{LIVE}]:{mx_port}"
        assert rcpt.last_reply.startswith("451 4.4.1") or "suspended" in rcpt.last_reply
        # the CLI shows next hop, attempts and last reply per recipient
        listing, shown = io.StringIO(), io.StringIO()
        cmd_list(mta.store, False, listing)
        cmd_show(mta.store, qid, shown)
        assert f"via mx.up.test[{LIVE}]:{mx_port}" in listing.getvalue()
        assert "attempts, via" in listing.getvalue() and "451 4." in listing.getvalue()
        assert f"next hop:   mx.up.test[{LIVE}]:{mx_port}" in shown.getvalue()
        assert "last reply: 451 4." in shown.getvalue()
        handler = Recorder()
        peer = start_peer(mx_port, handler)
        try:
            await wait_gone(mta, qid)
            assert handler.received[0][1] == ["x@up.test"]
        finally:
            peer.stop()
        assert dsns(mta) == []  # no bounce, no delay notice


async def test_per_destination_concurrency_limit(tmp_path: Path, dns_server: DNSTestServer,
                                                 mx_port: int) -> None:
    """With a limit of 1, five messages to one domain never use two connections at once."""
    config = make_config(tmp_path, dns_resolver=(dns_server.resolver_spec,), mx_port=mx_port,
                         destination_concurrency=1, connection_cache_time=0.0)
    active = 0
    most = 0

    class Slow(Recorder):
        async def handle_DATA(self, server, session, envelope):
            nonlocal active, most
            active += 1
            most = max(most, active)
            await asyncio.sleep(0.05)
            active -= 1
            return await super().handle_DATA(server, session, envelope)

    handler = Slow()
    peer = start_peer(mx_port, handler)
    try:
        async with MTA(config) as mta:
            qids = [await inject(mta, "alice@example.com", [f"u{i}@up.test"],
                                 message("alice@example.com", f"u{i}@up.test", f"c{i}"))
                    for i in range(5)]
            for qid in qids:
                await wait_gone(mta, qid)
        assert len(handler.received) == 5 and most == 1
    finally:
        peer.stop()
