"""The client's name on the receiving side (issue 11: ``Received: from HELO (unknown [IP])``
for every client, and ``unknown[IP]`` in every log line): a ``pymta serve`` looks the name
up before its greeting and uses it in ``Received:`` and the log lines, as Postfix does.

The server asks the test DNS server (``PYMTA_DNS_RESOLVER``); the client connects from a
127.0.0.x address of its own whose PTR record the test writes (Linux routes all of
127.0.0.0/8 to loopback). Records have TTL 0; each test uses another address, so neither
pymta's cache nor dnspython's carries anything over.

The in-process tests at the end are about the wait itself: the lookup is the server's
turn, not the client's (no idle timeout while it runs), a client that leaves meanwhile is
forgotten at once, and a stop meanwhile answers ``421`` without a greeting.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
from pathlib import Path

import dns.reversename

from pymta.app import MTA
from tests.conftest import make_config
from tests.integration import serverproc
from tests.integration._support import our_received, smtp_address
from tests.integration.serverproc import ServerProc, SMTPClient, make_message, queued_id, wait_until
from tests.services.dns import DNSTestServer

server_factory = serverproc.server_factory  # the fixture

SENDER = "sender@example.net"
ALICE = "alice@example.com"


def ptr_name(ip: str) -> str:
    return dns.reversename.from_address(ip).to_text()


def confirmed(zone: DNSTestServer, ip: str, name: str) -> None:
    """A PTR of ``ip`` to ``name`` and the A record that confirms it."""
    zone.add(f"{ptr_name(ip)} 0 IN PTR {name}.")
    zone.add(f"{name}. 0 IN A {ip}")


def serve(factory, zone: DNSTestServer, name: str, **env: str) -> ServerProc:
    """A server asking the test DNS server; only the stages that need no DNS for the
    message itself, so what the log shows is the name lookup's."""
    srv: ServerProc = factory(name, PYMTA_DNS_RESOLVER=zone.resolver_spec,
                              PYMTA_SPF="no", PYMTA_DKIM_VERIFY="no", PYMTA_ARC="no",
                              PYMTA_DMARC="no", **env)
    return srv.start()


def send_from(srv: ServerProc, source: str, helo: str = "client.test") -> str:
    """One message to alice from ``source``; the Received field it was delivered with."""
    with SMTPClient(srv.port, source=source) as client:
        assert client.greeting[0] == 220, client.greeting
        assert client.cmd(f"EHLO {helo}")[0] == 250
        code, text = client.send(SENDER, [ALICE], make_message(SENDER, ALICE, f"from {source}"))
        assert code == 250, text
    qid = queued_id(text)
    new = srv.mail_dir / "alice" / "new"
    files = wait_until(lambda: sorted(new.iterdir()) if new.is_dir() else [], 20,
                       what="the delivered message")
    assert len(files) == 1
    wait_disconnect(srv, source)
    assert f"{qid}: client=" in srv.stderr
    return our_received(files[0].read_bytes())


def log_lines(srv: ServerProc, ip: str) -> list[str]:
    """The text of the server's log lines about the client at ``ip``."""
    return [line.split(": ", 1)[1] for line in srv.stderr.splitlines()
            if ": " in line and (f"[{ip}]" in line or line.endswith(f" {ip}"))]


def wait_disconnect(srv: ServerProc, ip: str) -> None:
    wait_until(lambda: any(line.startswith("disconnect from ") for line in log_lines(srv, ip)),
               10, what=f"the disconnect line of {ip}")


def test_issue11_client_name_that_forward_confirms_is_in_received_and_log(
        server_factory, dns_zone: DNSTestServer) -> None:
    ip = "127.0.0.21"
    confirmed(dns_zone, ip, "Client21.Example.COM")
    srv = serve(server_factory, dns_zone, "named")
    received = send_from(srv, ip)
    assert received.startswith(f"Received: from client.test (client21.example.com [{ip}]) "
                               "by mx.example.com"), received
    lines = log_lines(srv, ip)
    assert lines[0] == f"connect from client21.example.com[{ip}]", lines
    assert lines[-1] == (f"disconnect from client21.example.com[{ip}] ehlo=1 mail=1 rcpt=1 "
                         "data=1 quit=1 commands=5"), lines
    assert any(re.fullmatch(rf"\w+: client=client21\.example\.com\[{re.escape(ip)}\]", line)
               for line in lines), lines
    assert (ptr_name(ip).lower(), "PTR") in dns_zone.queries


def test_issue11_client_name_that_does_not_forward_confirm_is_unknown(
        server_factory, dns_zone: DNSTestServer) -> None:
    ip = "127.0.0.22"
    dns_zone.add(f"{ptr_name(ip)} 0 IN PTR liar.example.com.")
    dns_zone.add("liar.example.com. 0 IN A 192.0.2.99")
    srv = serve(server_factory, dns_zone, "liar")
    received = send_from(srv, ip)
    assert received.startswith(f"Received: from client.test (unknown [{ip}]) by "), received
    assert "liar" not in received
    lines = log_lines(srv, ip)
    assert lines[0] == f"warning: hostname liar.example.com does not resolve to address {ip}"
    assert lines[1] == f"connect from unknown[{ip}]", lines
    assert lines[-1] == (f"disconnect from unknown[{ip}] ehlo=1 mail=1 rcpt=1 data=1 quit=1 "
                         "commands=5"), lines


def test_issue11_client_name_lookup_off_is_unknown_without_a_query(
        server_factory, dns_zone: DNSTestServer) -> None:
    ip = "127.0.0.23"
    confirmed(dns_zone, ip, "client23.example.com")
    srv = serve(server_factory, dns_zone, "off", PYMTA_PEERNAME_LOOKUP="no")
    received = send_from(srv, ip)
    assert received.startswith(f"Received: from client.test (unknown [{ip}]) by "), received
    assert log_lines(srv, ip)[0] == f"connect from unknown[{ip}]"
    asked = dns_zone.queries
    assert not [q for q in asked if q[1] == "PTR" or q[0] == "client23.example.com."], asked


def test_issue11_client_name_lookup_that_gets_no_answer_delays_the_greeting_at_most_the_dns_timeout(
        server_factory, dns_zone: DNSTestServer) -> None:
    ip = "127.0.0.24"
    dns_zone.drop(ptr_name(ip))
    srv = serve(server_factory, dns_zone, "silent", PYMTA_DNS_TIMEOUT="2")
    start = time.monotonic()
    with SMTPClient(srv.port, source=ip, timeout=10) as client:
        waited = time.monotonic() - start
        assert client.greeting[0] == 220, client.greeting
        assert client.cmd("EHLO client.test")[0] == 250
    assert waited < 2 + 1, waited
    assert waited > 1.5, waited          # it did wait for the lookup (so the test can fail)
    wait_disconnect(srv, ip)
    lines = log_lines(srv, ip)
    assert lines == [f"connect from unknown[{ip}]",
                     f"disconnect from unknown[{ip}] ehlo=1 quit=1 commands=2"], lines


# ------------------------------------------------------------------ while the lookup runs


async def _slow_lookup_mta(tmp_path: Path, zone: DNSTestServer, **overrides: object) -> MTA:
    """A server whose name lookup of 127.0.0.1 takes its whole DNS timeout (3 s)."""
    zone.drop(ptr_name("127.0.0.1"))
    config = make_config(tmp_path, dns_resolver=(zone.resolver_spec,), dns_timeout=3.0,
                         spf_check=False, dkim_verify=False, arc=False, dmarc_check=False,
                         **overrides)
    mta = MTA(config)
    await mta.start()
    return mta


async def test_issue11_client_name_lookup_is_not_the_clients_idle_time(
        tmp_path: Path, dns_zone: DNSTestServer) -> None:
    """Idle timeout 1 s, lookup 3 s: the client gets its greeting, not a ``421`` timeout,
    and has its own full second after it."""
    mta = await _slow_lookup_mta(tmp_path, dns_zone, idle_timeout=1.0)
    try:
        reader, writer = await asyncio.open_connection(*smtp_address(mta))
        start = time.monotonic()
        greeting = await asyncio.wait_for(reader.readline(), 10)
        assert greeting.startswith(b"220 mx.example.com"), greeting
        assert time.monotonic() - start > 2.5
        await asyncio.sleep(0.5)
        writer.write(b"NOOP\r\n")
        assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"250")
        writer.close()
    finally:
        await mta.stop()


async def test_issue11_client_name_early_talker_is_answered_after_the_greeting(
        tmp_path: Path, dns_zone: DNSTestServer) -> None:
    """What a client sends before the greeting waits; nothing is answered before it."""
    mta = await _slow_lookup_mta(tmp_path, dns_zone)
    try:
        reader, writer = await asyncio.open_connection(*smtp_address(mta))
        writer.write(b"NOOP\r\n")
        first = await asyncio.wait_for(reader.readline(), 10)
        assert first.startswith(b"220 "), first
        assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"250")
        writer.close()
    finally:
        await mta.stop()


async def test_issue11_client_name_client_gone_during_lookup_is_forgotten(
        tmp_path: Path, dns_zone: DNSTestServer, caplog) -> None:
    mta = await _slow_lookup_mta(tmp_path, dns_zone)
    try:
        with caplog.at_level(logging.INFO, logger="pymta"):
            sock = socket.create_connection(smtp_address(mta))
            listener = mta._listener
            assert listener is not None
            await asyncio.sleep(0.3)
            assert len(listener.active) == 1 and listener.per_ip["127.0.0.1"] == 1
            sock.close()
            start = time.monotonic()
            while listener.active and time.monotonic() - start < 2:
                await asyncio.sleep(0.02)
            assert not listener.active and not listener.per_ip   # long before the 3 s
            assert time.monotonic() - start < 1
            await asyncio.sleep(0.1)
        messages = [r.getMessage() for r in caplog.records if "127.0.0.1]" in r.getMessage()]
        assert messages == ["lost connection after CONNECT from unknown[127.0.0.1]"], messages
    finally:
        await mta.stop()


async def test_issue11_client_name_stop_during_lookup_answers_421_at_once(
        tmp_path: Path, dns_zone: DNSTestServer) -> None:
    mta = await _slow_lookup_mta(tmp_path, dns_zone)
    stopped = False
    try:
        reader, writer = await asyncio.open_connection(*smtp_address(mta))
        await asyncio.sleep(0.3)
        start = time.monotonic()
        stop = asyncio.create_task(mta.stop())
        reply = await asyncio.wait_for(reader.read(), 5)
        assert reply.startswith(b"421 4.3.2 mx.example.com "), reply
        assert b"220" not in reply
        assert time.monotonic() - start < 1.5
        await stop
        stopped = True
        writer.close()
    finally:
        if not stopped:
            await mta.stop()
