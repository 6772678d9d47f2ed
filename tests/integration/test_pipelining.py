"""Command pipelining (RFC 2920) over a real socket: replies in order and in one batch, DATA
ends a group (message text sent before the 354 is a synchronisation error: 554 5.5.0 and
disconnect, nothing queued), RSET inside a pipelined group."""

from __future__ import annotations

import asyncio

from tests.conftest import maildir_messages
from tests.integration._defences import (
    Collector,
    assert_nothing_accepted,
    codes,
    content_after_received,
    greet,
    parse_replies,
    queue_drained,
    start_mail,
    wait_delivered,
)

GROUP = (b"EHLO client.example.net\r\n"
         b"MAIL FROM:<a@sender.test>\r\n"
         b"RCPT TO:<alice@example.com>\r\n"
         b"RCPT TO:<nobody@example.com>\r\n"
         b"RCPT TO:<postmaster@example.com>\r\n"
         b"DATA\r\n")
GROUP_CODES = [(250, ""), (250, "2.1.0"), (250, "2.1.5"), (550, "5.1.1"), (250, "2.1.5"),
               (354, "")]


async def test_pipelined_group_replies_in_order(client_factory, config) -> None:
    client = await client_factory()
    assert (await client.reply())[0] == 220
    await client.send(GROUP)
    replies = [await client.reply() for _ in range(6)]
    assert [r[0] for r in replies] == [c for c, _ in GROUP_CODES]
    assert "PIPELINING" in replies[0][1]
    assert replies[1][1].startswith("250 2.1.0")
    assert replies[2][1].startswith("250 2.1.5")
    assert replies[3][1].startswith("550 5.1.1") and "nobody@example.com" in replies[3][1]
    assert replies[4][1].startswith("250 2.1.5")
    code, text = await client.cmd(b"Subject: piped\r\n\r\nhello\r\n.\r\n")
    assert (code, text[4:9]) == (250, "2.0.0"), text
    alice = await wait_delivered(config, "alice")
    post = await wait_delivered(config, "postmaster")
    assert len(alice) == len(post) == 1
    assert content_after_received(alice[0]) == b"Subject: piped\n\nhello\n"


async def test_replies_to_a_group_arrive_together(client_factory) -> None:
    client = await client_factory()
    assert (await client.reply())[0] == 220
    await client.send(GROUP)
    await asyncio.sleep(0.3)
    data = await asyncio.wait_for(client.reader.read(65536), 1.0)
    assert codes(parse_replies(data)) == GROUP_CODES, data
    assert data.endswith(b"\r\n")


async def test_all_of_a_long_group_answered_in_one_batch(client_factory) -> None:
    client = await client_factory()
    await greet(client)
    group = b"MAIL FROM:<a@sender.test>\r\n" + b"RCPT TO:<alice@example.com>\r\n" * 40 \
        + b"NOOP\r\n" * 20 + b"RSET\r\n"
    await client.send(group)
    await asyncio.sleep(0.3)
    data = await asyncio.wait_for(client.reader.read(65536), 1.0)
    assert codes(parse_replies(data)) == ([(250, "2.1.0")] + [(250, "2.1.5")] * 40
                                          + [(250, "2.0.0")] * 21)


async def test_message_text_in_same_write_as_data_is_rejected(client_factory, config) -> None:
    client = await client_factory()
    await greet(client)
    await start_mail(client)
    collector = Collector(client)
    await collector.send(b"DATA\r\nSubject: early\r\n\r\nbody\r\n.\r\n")
    assert await collector.eof(), bytes(collector.data)
    replies = codes(collector.replies())
    assert replies[-1] == (554, "5.5.0"), replies
    assert all(code != 250 for code, _ in replies), replies
    assert_nothing_accepted(config)


async def test_whole_transaction_in_one_write_is_rejected(client_factory, config) -> None:
    """The classic spam-bot burst: everything, message included, without waiting."""
    client = await client_factory()
    assert (await client.reply())[0] == 220
    collector = Collector(client)
    await collector.send(GROUP + b"Subject: burst\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    assert await collector.eof(), bytes(collector.data)
    replies = codes(collector.replies())
    assert replies[:5] == GROUP_CODES[:5]
    assert replies[-1] == (554, "5.5.0"), replies
    assert (250, "2.0.0") not in replies and (221, "2.0.0") not in replies
    assert_nothing_accepted(config)


async def test_message_text_after_354_in_next_write_is_fine(client_factory, config) -> None:
    """The counterpart: the same bytes, sent after the 354, are a normal message."""
    client = await client_factory()
    assert (await client.reply())[0] == 220
    await client.send(GROUP)
    for _ in range(6):
        await client.reply()
    code, text = await client.cmd(b"Subject: later\r\n\r\nbody\r\n.\r\n")
    assert (code, text[4:9]) == (250, "2.0.0")
    await wait_delivered(config, "alice")


async def test_rset_mid_transaction_pipelined(client_factory, config) -> None:
    client = await client_factory()
    await greet(client)
    await client.send(b"MAIL FROM:<first@sender.test>\r\n"
                      b"RCPT TO:<alice@example.com>\r\n"
                      b"RSET\r\n"
                      b"RCPT TO:<alice@example.com>\r\n"
                      b"MAIL FROM:<second@sender.test>\r\n"
                      b"RCPT TO:<postmaster@example.com>\r\n"
                      b"DATA\r\n")
    replies = [await client.reply() for _ in range(7)]
    assert [(c, t[4:9]) for c, t in replies] == [
        (250, "2.1.0"), (250, "2.1.5"), (250, "2.0.0"), (503, "5.5.1"), (250, "2.1.0"),
        (250, "2.1.5"), (354, "End d")]
    code, text = await client.cmd(b"Subject: after rset\r\n\r\nx\r\n.\r\n")
    assert code == 250, text
    msgs = await wait_delivered(config, "postmaster")
    assert len(msgs) == 1
    assert msgs[0].startswith(b"Return-Path: <second@sender.test>\n")
    await queue_drained(config)
    assert maildir_messages(config.mail_dir, "alice") == []


async def test_rset_after_data_rejection_starts_clean(client_factory, config) -> None:
    """DATA with no accepted recipient fails; RSET then a new transaction works."""
    client = await client_factory()
    await greet(client)
    await client.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<nobody@example.com>\r\n"
                      b"DATA\r\nRSET\r\n")
    replies = [await client.reply() for _ in range(4)]
    assert [(c, t[4:9]) for c, t in replies] == [
        (250, "2.1.0"), (550, "5.1.1"), (554, "5.5.1"), (250, "2.0.0")]
    # the DATA refusal must not have put the session into data mode
    code, text = await client.cmd("NOOP")
    assert code == 250, text
    await start_mail(client)
    assert (await client.cmd("DATA"))[0] == 354
    assert (await client.cmd(b"Subject: ok\r\n\r\nok\r\n.\r\n"))[0] == 250
    assert len(await wait_delivered(config, "alice")) == 1
