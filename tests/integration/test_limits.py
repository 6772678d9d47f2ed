"""Resource and policy limits over a real socket, each on a server started with a small
limit: line length, recipients, errors, idle time, connections (per client and total),
message size (declared and streamed), hop count, relaying and recipient/sender checks."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from pymta.app import MTA
from tests.conftest import RawClient, maildir_messages, make_config
from tests.integration._defences import (
    Collector,
    assert_nothing_accepted,
    codes,
    content_after_received,
    greet,
    queue_drained,
    queue_listing,
    send_message,
    start_mail,
    wait_delivered,
)


class Server:
    def __init__(self, mta: MTA) -> None:
        self.mta = mta
        self.config = mta.config
        self.clients: list[RawClient] = []

    async def connect(self, local_host: str | None = None) -> RawClient:
        host, port = self.mta.addresses["smtp"][0]
        if local_host is None:
            client = await RawClient.connect(host, port)
        else:
            reader, writer = await asyncio.open_connection(host, port,
                                                           local_addr=(local_host, 0))
            client = RawClient(reader, writer)
        self.clients.append(client)
        return client

    async def session(self) -> RawClient:
        client = await self.connect()
        await greet(client)
        return client


@contextlib.asynccontextmanager
async def server(tmp_path: Path, **overrides: object) -> AsyncIterator[Server]:
    cfg = make_config(tmp_path, **overrides)
    async with MTA(cfg) as mta:
        srv = Server(mta)
        try:
            yield srv
        finally:
            for c in srv.clients:
                await c.close()


# ---------------------------------------------------------------------- command line length


async def test_command_line_too_long(tmp_path) -> None:
    async with server(tmp_path, max_line_length=512) as srv:
        client = await srv.session()
        code, text = await client.cmd("NOOP " + "x" * 600)
        assert (code, text[4:9]) == (500, "5.5.2"), text
        assert (await client.cmd("NOOP"))[0] == 250


async def test_command_line_at_limit_is_accepted(tmp_path) -> None:
    async with server(tmp_path, max_line_length=512) as srv:
        client = await srv.session()
        line = "NOOP " + "x" * (512 - 7)          # 512 octets with the CRLF (RFC 5321)
        assert (await client.cmd(line))[0] == 250
        code, text = await client.cmd(line + "x")
        assert (code, text[4:9]) == (500, "5.5.2"), text


async def test_rest_of_overlong_line_is_not_a_command(tmp_path) -> None:
    """The tail of an overlong line, arriving in a later write, must be skipped, not run."""
    async with server(tmp_path, max_line_length=512) as srv:
        client = await srv.session()
        await client.send(b"NOOP " + b"x" * 700)
        code, text = await client.reply()
        assert (code, text[4:9]) == (500, "5.5.2"), text
        await client.send(b"QUIT\r\n")
        await client.send(b"MAIL FROM:<a@sender.test>\r\n")
        code, text = await client.reply()
        assert (code, text[4:9]) == (250, "2.1.0"), text   # QUIT was part of the long line


# ---------------------------------------------------------------------- recipients and errors


async def test_too_many_recipients(tmp_path) -> None:
    async with server(tmp_path, max_recipients=3) as srv:
        client = await srv.session()
        await start_mail(client, rcpts=("alice@example.com", "bob@example.com",
                                        "postmaster@example.com"))
        code, text = await client.cmd("RCPT TO:<team@example.com>")
        assert (code, text[4:9]) == (452, "4.5.3"), text
        assert (await client.cmd("DATA"))[0] == 354
        assert (await client.cmd(b"Subject: three\r\n\r\nx\r\n.\r\n"))[0] == 250
        assert len(await wait_delivered(srv.config, "alice")) == 1
        assert len(await wait_delivered(srv.config, "postmaster")) == 1


async def test_max_errors_closes_connection(tmp_path) -> None:
    async with server(tmp_path, max_errors=3) as srv:
        client = await srv.session()
        assert (await client.cmd("FOO"))[0] == 500
        assert (await client.cmd("BAR"))[0] == 500
        collector = Collector(client)
        await collector.send(b"BAZ\r\n")
        assert await collector.eof(), bytes(collector.data)
        assert codes(collector.replies()) == [(500, "5.5.2"), (421, "4.7.0")]


async def test_max_errors_pipelined_stops_executing(tmp_path) -> None:
    async with server(tmp_path, max_errors=3) as srv:
        client = await srv.session()
        collector = Collector(client)
        await collector.send(b"FOO\r\nFOO\r\nRCPT TO:<alice@example.com>\r\n"
                             b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<alice@example.com>\r\n"
                             b"DATA\r\n")
        assert await collector.eof(), bytes(collector.data)
        assert codes(collector.replies()) == [(500, "5.5.2"), (500, "5.5.2"), (503, "5.5.1"),
                                              (421, "4.7.0")]


async def test_rejected_recipients_count_as_errors(tmp_path) -> None:
    async with server(tmp_path, max_errors=2) as srv:
        client = await srv.session()
        await start_mail(client)
        assert (await client.cmd("RCPT TO:<nobody@example.com>"))[0] == 550
        collector = Collector(client)
        await collector.send(b"RCPT TO:<nobody2@example.com>\r\n")
        assert await collector.eof(), bytes(collector.data)
        assert codes(collector.replies()) == [(550, "5.1.1"), (421, "4.7.0")]


# ---------------------------------------------------------------------- idle timeout


async def test_idle_timeout(tmp_path) -> None:
    async with server(tmp_path, idle_timeout=0.5) as srv:
        client = await srv.session()
        collector = Collector(client)
        assert await collector.eof(timeout=2.0), bytes(collector.data)
        assert codes(collector.replies()) == [(421, "4.4.2")]


async def test_idle_timeout_in_data_drops_partial_message(tmp_path) -> None:
    async with server(tmp_path, idle_timeout=0.6) as srv:
        client = await srv.session()
        await start_mail(client)
        assert (await client.cmd("DATA"))[0] == 354
        collector = Collector(client)
        await collector.send(b"Subject: partial\r\n\r\nsome text\r\n")
        await asyncio.sleep(0.3)
        await collector.send(b"more text\r\n")      # activity restarts the clock
        assert not await collector.eof(timeout=0.25)
        assert await collector.eof(timeout=2.0), bytes(collector.data)
        assert codes(collector.replies()) == [(421, "4.4.2")]
        assert_nothing_accepted(srv.config)


# ---------------------------------------------------------------------- connection limits


async def test_max_connections_per_ip(tmp_path) -> None:
    async with server(tmp_path, max_connections_per_ip=2) as srv:
        first = await srv.connect()
        second = await srv.connect()
        assert (await first.reply())[0] == 220
        assert (await second.reply())[0] == 220
        third = await srv.connect()
        code, text = await third.reply()
        assert (code, text[4:9]) == (421, "4.7.0"), text
        assert await third.closed()
        # another client address is not affected
        other = await srv.connect(local_host="127.0.0.2")
        assert (await other.reply())[0] == 220
        # a slot is given back when a connection ends
        assert (await first.cmd("QUIT"))[0] == 221
        assert await first.closed()
        for _ in range(40):
            again = await srv.connect()
            code, _ = await again.reply()
            if code == 220:
                break
            await asyncio.sleep(0.05)
        assert code == 220


async def test_max_connections_total(tmp_path) -> None:
    async with server(tmp_path, max_connections=2) as srv:
        first = await srv.connect()
        second = await srv.connect(local_host="127.0.0.2")
        assert (await first.reply())[0] == 220
        assert (await second.reply())[0] == 220
        third = await srv.connect(local_host="127.0.0.3")
        code, text = await third.reply()
        assert (code, text[4:9]) == (421, "4.7.0"), text
        assert await third.closed()
        # the refused connection did not take a slot
        await second.close()
        for _ in range(40):
            again = await srv.connect(local_host="127.0.0.4")
            code, _ = await again.reply()
            if code == 220:
                break
            await asyncio.sleep(0.05)
        assert code == 220


# ---------------------------------------------------------------------- message size


async def test_declared_size_over_limit(tmp_path) -> None:
    async with server(tmp_path, message_size_limit=1000) as srv:
        client = await srv.session()
        code, text = await client.cmd("MAIL FROM:<a@sender.test> SIZE=1001")
        assert (code, text[4:9]) == (552, "5.3.4"), text
        code, text = await client.cmd("MAIL FROM:<a@sender.test> SIZE=1000")
        assert (code, text[4:9]) == (250, "2.1.0"), text


async def test_streamed_body_over_limit(tmp_path) -> None:
    async with server(tmp_path, message_size_limit=1000) as srv:
        client = await srv.session()
        await start_mail(client)
        assert (await client.cmd("DATA"))[0] == 354
        body = b"Subject: big\r\n\r\n" + (b"y" * 78 + b"\r\n") * 40   # ~3.2 kB
        await client.send(body[:1500])
        await asyncio.sleep(0.05)
        code, text = await client.cmd(body[1500:] + b".\r\n")
        assert (code, text[4:9]) == (552, "5.3.4"), text
        assert_nothing_accepted(srv.config)
        # the session is still usable and in sync
        await send_message(client, b"Subject: small\r\n\r\nsmall\r\n")
        msgs = await wait_delivered(srv.config, "alice")
        assert len(msgs) == 1
        assert content_after_received(msgs[0]) == b"Subject: small\n\nsmall\n"


async def test_body_exactly_at_limit_is_accepted(tmp_path) -> None:
    async with server(tmp_path, message_size_limit=1000) as srv:
        client = await srv.session()
        head = b"Subject: exact\r\n\r\n"
        body = head + b"z" * (1000 - len(head) - 2) + b"\r\n"
        assert len(body) == 1000
        await send_message(client, body)
        await start_mail(client)
        assert (await client.cmd("DATA"))[0] == 354
        code, text = await client.cmd(head + b"z" * (1000 - len(head) - 1) + b"\r\n.\r\n")
        assert (code, text[4:9]) == (552, "5.3.4"), text
        assert len(await wait_delivered(srv.config, "alice")) == 1


async def test_header_section_over_limit(tmp_path) -> None:
    async with server(tmp_path, header_size_limit=1024) as srv:
        client = await srv.session()
        await start_mail(client)
        assert (await client.cmd("DATA"))[0] == 354
        header = b"X-Filler: " + b"h" * 70 + b"\r\n"
        code, text = await client.cmd(header * 20 + b"Subject: fat\r\n\r\nx\r\n.\r\n")
        assert (code, text[4:9]) == (552, "5.3.4"), text
        assert_nothing_accepted(srv.config)
        await send_message(client, header * 5 + b"Subject: slim\r\n\r\n" + b"b" * 3000 + b"\r\n")
        assert len(await wait_delivered(srv.config, "alice")) == 1


# ---------------------------------------------------------------------- hop count


def _hops(n: int) -> bytes:
    return b"".join(b"Received: from hop%d.example.net by relay%d.example.net; "
                    b"Mon, 1 Jan 2024 00:00:00 +0000\r\n" % (i, i) for i in range(n))


async def test_too_many_received_headers(tmp_path) -> None:
    async with server(tmp_path) as srv:
        client = await srv.session()
        await start_mail(client)
        assert (await client.cmd("DATA"))[0] == 354
        code, text = await client.cmd(_hops(51) + b"Subject: loop\r\n\r\nx\r\n.\r\n")
        assert (code, text[4:9]) == (554, "5.4.6"), text
        assert_nothing_accepted(srv.config)
        assert (await client.cmd("NOOP"))[0] == 250


async def test_exactly_50_received_headers_accepted(tmp_path) -> None:
    async with server(tmp_path) as srv:
        client = await srv.session()
        await send_message(client, _hops(50) + b"Subject: far\r\n\r\nx\r\n")
        msgs = await wait_delivered(srv.config, "alice")
        assert len(msgs) == 1
        assert msgs[0].count(b"Received: ") == 51     # theirs plus ours


async def test_received_lines_in_body_do_not_count(tmp_path) -> None:
    async with server(tmp_path) as srv:
        client = await srv.session()
        await send_message(client, b"Subject: quoted\r\n\r\n" + _hops(60))
        assert len(await wait_delivered(srv.config, "alice")) == 1


# ---------------------------------------------------------------------- envelope policy


async def test_relay_denied(tmp_path) -> None:
    async with server(tmp_path) as srv:
        client = await srv.session()
        assert (await client.cmd("MAIL FROM:<a@sender.test>"))[0] == 250
        code, text = await client.cmd("RCPT TO:<victim@foreign.test>")
        assert (code, text[4:9]) == (554, "5.7.1"), text
        code, text = await client.cmd("RCPT TO:<victim@example.com@foreign.test>")
        assert code >= 500, text
        code, text = await client.cmd("DATA")
        assert (code, text[4:9]) == (554, "5.5.1"), text
        assert_nothing_accepted(srv.config)


async def test_unknown_local_user(tmp_path) -> None:
    async with server(tmp_path) as srv:
        client = await srv.session()
        assert (await client.cmd("MAIL FROM:<a@sender.test>"))[0] == 250
        code, text = await client.cmd("RCPT TO:<nobody@example.com>")
        assert (code, text[4:9]) == (550, "5.1.1"), text
        code, text = await client.cmd("RCPT TO:<nobody@example.org>")
        assert (code, text[4:9]) == (550, "5.1.1"), text


async def test_bad_sender_syntax(tmp_path) -> None:
    async with server(tmp_path) as srv:
        client = await srv.session()
        for bad in ("<a b@sender.test>", "<@>", "<a@>", "<a@sender..test>"):
            code, text = await client.cmd(f"MAIL FROM:{bad}")
            assert (code, text[4:9]) == (501, "5.1.7"), (bad, text)
        assert (await client.cmd("MAIL FROM:<ok@sender.test>"))[0] == 250


async def test_limits_leave_queue_clean(tmp_path) -> None:
    """Several refused transactions in a row leave no spool files behind."""
    async with server(tmp_path, message_size_limit=500) as srv:
        client = await srv.session()
        for _ in range(3):
            await start_mail(client)
            assert (await client.cmd("DATA"))[0] == 354
            assert (await client.cmd(b"x" * 600 + b"\r\n.\r\n"))[0] == 552
        assert queue_listing(srv.config) == {"env": [], "data": [], "tmp": []}
        await send_message(client)
        await queue_drained(srv.config)
        assert len(maildir_messages(srv.config.mail_dir, "alice")) == 1


async def test_issue10_queue_minfree_refuses_mail_from_with_452(tmp_path) -> None:
    """PYMTA_QUEUE_MINFREE (Postfix's queue_minfree) reaches the session: with more free
    space asked for than any disk has, MAIL FROM is a temporary 452 4.3.1, nothing else."""
    async with server(tmp_path, queue_minfree=1 << 60) as srv:
        client = await srv.session()
        code, text = await client.cmd("MAIL FROM:<sender@example.net>")
        assert (code, text[4:9]) == (452, "4.3.1"), text
    async with server(tmp_path, queue_minfree=0) as srv:
        client = await srv.session()
        assert (await client.cmd("MAIL FROM:<sender@example.net>"))[0] == 250
