"""CHUNKING (RFC 3030) over a real socket: BDAT chunks are counted bytes, never commands and
never dot-terminated text, so ``<CRLF>.<CRLF>`` and ``MAIL FROM`` inside a chunk are message
content and are delivered byte for byte. A BDAT the server refuses still has its chunk read
and thrown away, so nothing in it is ever executed."""

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
    content_after_received,
    greet,
    parse_replies,
    queue_drained,
    send_message,
    start_mail,
    wait_delivered,
)

EVIL_CHUNK = (b"Subject: chunked\r\n"
              b"\r\n"
              b"first line\r\n"
              b".\r\n"
              b"MAIL FROM:<attacker@evil.test>\r\n"
              b"RCPT TO:<postmaster@example.com>\r\n"
              b"DATA\r\n"
              b"..dot-stuffed looking\r\n")
SECOND_CHUNK = b".\r\nQUIT\r\nlast line\r\n"


def bdat(data: bytes, last: bool = False) -> bytes:
    return b"BDAT %d%s\r\n" % (len(data), b" LAST" if last else b"") + data


def lf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n")


async def replies(client: RawClient, n: int) -> list[tuple[int, str]]:
    out = []
    for _ in range(n):
        code, text = await client.reply()
        out.append((code, text[4:9] if code != 354 else ""))
    return out


async def test_chunks_with_dot_line_and_commands_are_content(client_factory, config) -> None:
    client = await client_factory()
    await greet(client)
    await start_mail(client)
    code, text = await client.cmd(bdat(EVIL_CHUNK))
    assert (code, text[4:9]) == (250, "2.0.0"), text
    assert f"{len(EVIL_CHUNK)} octets" in text
    code, text = await client.cmd(bdat(SECOND_CHUNK, last=True))
    assert (code, text[4:9]) == (250, "2.0.0") and "queued as" in text, text
    assert (await client.cmd("NOOP"))[0] == 250
    msgs = await wait_delivered(config, "alice")
    assert len(msgs) == 1
    assert content_after_received(msgs[0]) == lf(EVIL_CHUNK + SECOND_CHUNK)   # no unstuffing
    await queue_drained(config)
    assert maildir_messages(config.mail_dir, "postmaster") == []


async def test_pipelined_chunks_in_one_write(client_factory, config) -> None:
    client = await client_factory()
    await greet(client)
    await client.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<alice@example.com>\r\n"
                      + bdat(EVIL_CHUNK) + bdat(SECOND_CHUNK) + bdat(b"", last=True))
    got = await replies(client, 5)
    assert got == [(250, "2.1.0"), (250, "2.1.5"), (250, "2.0.0"), (250, "2.0.0"),
                   (250, "2.0.0")]
    msgs = await wait_delivered(config, "alice")
    assert len(msgs) == 1
    assert content_after_received(msgs[0]) == lf(EVIL_CHUNK + SECOND_CHUNK)


async def test_single_bdat_last(client_factory, config) -> None:
    client = await client_factory()
    await greet(client)
    await start_mail(client)
    body = b"Subject: one\r\n\r\nonly chunk\r\n"
    code, text = await client.cmd(bdat(body, last=True))
    assert (code, text[4:9]) == (250, "2.0.0") and "queued as" in text, text
    msgs = await wait_delivered(config, "alice")
    assert content_after_received(msgs[0]) == lf(body)


async def test_chunk_sent_byte_by_byte_with_split_crlf(client_factory, config) -> None:
    """A chunk cut at every byte, and a CRLF split across two chunks, is still one clean
    message (no bare CR/LF is invented at a read or chunk boundary)."""
    client = await client_factory()
    await greet(client)
    await start_mail(client)
    first = b"Subject: split\r\n\r\nline one\r"
    second = b"\nline two\r\n"
    await client.send(b"BDAT %d\r\n" % len(first))
    for byte in first:
        await client.send(bytes([byte]))
        await asyncio.sleep(0.0005)
    assert (await client.reply())[0] == 250
    code, text = await client.cmd(bdat(second, last=True))
    assert (code, text[4:9]) == (250, "2.0.0"), text
    msgs = await wait_delivered(config, "alice")
    assert content_after_received(msgs[0]) == lf(first + second)


async def test_bdat_without_mail_consumes_chunk(client_factory, config) -> None:
    client = await client_factory()
    await greet(client)
    chunk = (b"MAIL FROM:<attacker@evil.test>\r\nRCPT TO:<postmaster@example.com>\r\n"
             b"DATA\r\nSubject: x\r\n\r\nSMUGGLED-PAYLOAD\r\n.\r\n")
    await client.send(bdat(chunk, last=True) + b"NOOP\r\n")
    await asyncio.sleep(0.3)
    data = await asyncio.wait_for(client.reader.read(65536), 1.0)
    got = [(c, e) for c, e, _ in parse_replies(data)]
    assert got == [(503, "5.5.1"), (250, "2.0.0")], data     # the chunk ran nothing
    assert_nothing_accepted(config)


async def test_bdat_without_valid_recipient_consumes_chunk(client_factory, config) -> None:
    client = await client_factory()
    await greet(client)
    await client.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<nobody@example.com>\r\n"
                      + bdat(b"RSET\r\nMAIL FROM:<x@evil.test>\r\n", last=True)
                      + b"NOOP\r\n")
    got = await replies(client, 4)
    assert got == [(250, "2.1.0"), (550, "5.1.1"), (554, "5.5.1"), (250, "2.0.0")]
    assert_nothing_accepted(config)


async def test_new_transaction_after_refused_bdat(client_factory, config) -> None:
    """A refused, non-LAST BDAT (no MAIL yet) must not poison the next transaction."""
    client = await client_factory()
    await greet(client)
    code, text = await client.cmd(bdat(b"orphan chunk\r\n"))
    assert (code, text[4:9]) == (503, "5.5.1"), text
    await start_mail(client)
    body = b"Subject: after\r\n\r\nafter a refused chunk\r\n"
    code, text = await client.cmd(bdat(body, last=True))
    assert (code, text[4:9]) == (250, "2.0.0") and "queued as" in text, text
    msgs = await wait_delivered(config, "alice")
    assert content_after_received(msgs[0]) == lf(body)


async def test_bdat_bare_lf_in_chunk_rejected(client_factory, config) -> None:
    client = await client_factory()
    await greet(client)
    await start_mail(client)
    code, text = await client.cmd(bdat(b"Subject: x\r\n\r\nbody\n.\nMAIL FROM:<a@b.test>\r\n",
                                       last=True))
    assert (code, text[4:9]) == (554, "5.6.0"), text
    assert_nothing_accepted(config)
    assert (await client.cmd("NOOP"))[0] == 250


async def test_bdat_trailing_cr_in_last_chunk_rejected(client_factory, config) -> None:
    client = await client_factory()
    await greet(client)
    await start_mail(client)
    assert (await client.cmd(bdat(b"Subject: x\r\n\r\nbody\r")))[0] == 250
    code, text = await client.cmd(bdat(b"", last=True))
    assert (code, text[4:9]) == (554, "5.6.0"), text
    assert_nothing_accepted(config)


@contextlib.asynccontextmanager
async def small_server(tmp_path: Path) -> AsyncIterator[MTA]:
    async with MTA(make_config(tmp_path, message_size_limit=1000)) as mta:
        yield mta


async def test_bdat_over_size_limit(tmp_path) -> None:
    async with small_server(tmp_path) as mta:
        client = await RawClient.connect(*mta.addresses["smtp"][0])
        try:
            await greet(client)
            await start_mail(client)
            big = b"Subject: big\r\n\r\n" + (b"q" * 98 + b"\r\n") * 8
            assert (await client.cmd(bdat(big)))[0] == 250
            code, text = await client.cmd(bdat(big, last=True))
            assert (code, text[4:9]) == (552, "5.3.4"), text
            assert_nothing_accepted(mta.config)
            # the connection is still in sync and usable
            await start_mail(client)
            small = b"Subject: small\r\n\r\nfits\r\n"
            code, text = await client.cmd(bdat(small, last=True))
            assert (code, text[4:9]) == (250, "2.0.0"), text
            msgs = await wait_delivered(mta.config, "alice")
            assert len(msgs) == 1
            assert content_after_received(msgs[0]) == lf(small)
        finally:
            await client.close()


async def test_data_after_bdat_refused_and_bdat_continues(client_factory, config) -> None:
    client = await client_factory()
    await greet(client)
    await start_mail(client)
    first = b"Subject: mixed\r\n\r\npart one\r\n"
    assert (await client.cmd(bdat(first)))[0] == 250
    code, text = await client.cmd("DATA")
    assert (code, text[4:9]) == (503, "5.5.1"), text
    second = b"part two\r\n"
    code, text = await client.cmd(bdat(second, last=True))
    assert (code, text[4:9]) == (250, "2.0.0") and "queued as" in text, text
    msgs = await wait_delivered(config, "alice")
    assert len(msgs) == 1
    assert content_after_received(msgs[0]) == lf(first + second)


async def test_data_then_bdat_transactions_on_one_connection(client_factory, config) -> None:
    client = await client_factory()
    await greet(client)
    await send_message(client, b"Subject: by data\r\n\r\none\r\n")
    # a BDAT right after the DATA transaction belongs to no transaction
    code, text = await client.cmd(bdat(b"stray\r\n", last=True))
    assert (code, text[4:9]) == (503, "5.5.1"), text
    await start_mail(client)
    code, text = await client.cmd(bdat(b"Subject: by bdat\r\n\r\ntwo\r\n", last=True))
    assert (code, text[4:9]) == (250, "2.0.0"), text
    await send_message(client, b"Subject: data again\r\n\r\nthree\r\n")
    msgs = await wait_delivered(config, "alice", 3)
    bodies = sorted(content_after_received(m) for m in msgs)
    assert bodies == sorted([b"Subject: by data\n\none\n", b"Subject: by bdat\n\ntwo\n",
                             b"Subject: data again\n\nthree\n"])


async def test_bad_bdat_syntax_closes(client_factory, config) -> None:
    """Without a valid size the server cannot find the chunk's end: it must stop reading."""
    client = await client_factory()
    await greet(client)
    await start_mail(client)
    collector = Collector(client)
    await collector.send(b"BDAT ten LAST\r\nMAIL FROM:<x@evil.test>\r\n")
    assert await collector.eof(), bytes(collector.data)
    assert [(c, e) for c, e, _ in collector.replies()] == [(501, "5.5.4")]
    assert_nothing_accepted(config)
