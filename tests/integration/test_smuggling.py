"""SMTP smuggling (CVE-2023-51764, CVE-2024-27305) over a real socket.

An attacker ends a message with a sequence that some server in the path reads as
``<CRLF>.<CRLF>`` and another does not, and follows it with a second transaction. pymta must
accept only ``<CRLF>.<CRLF>`` as the end of data: a bare CR or LF anywhere in DATA ends the
session with ``521 5.5.2`` and nothing is queued. A NUL next to the dot does not end the data
either; without BINARYMIME a NUL is not message content at all (issue 10), so that message is
refused with ``554 5.6.0`` at its real end, the session still in step. The smuggled message
(to postmaster, marked SMUGGLED-PAYLOAD) must never be delivered as a message.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import maildir_messages
from tests.integration._defences import (
    OUTER,
    SMUGGLED,
    Collector,
    all_delivered_text,
    assert_nothing_accepted,
    codes,
    content_after_received,
    greet,
    queue_drained,
    send_message,
    start_mail,
    wait_delivered,
)

BARE_ENDINGS = [
    b"\n.\n",
    b"\r.\r",
    b"\r.\n",
    b"\n.\r",
    b"\n.\r\n",
    b"\r\n.\n",
    b"\r.\r\n",
    b"\r\n.\r",
]
NUL_ENDINGS = [b"\r\n\x00.\r\n", b"\r\n.\x00\r\n"]


async def _open_data(client_factory):
    client = await client_factory()
    await greet(client)
    await start_mail(client)
    code, text = await client.cmd("DATA")
    assert code == 354, text
    return client


async def _expect_521_close(collector: Collector) -> None:
    assert await collector.eof(), f"connection left open; got {bytes(collector.data)!r}"
    assert codes(collector.replies()) == [(521, "5.5.2")], bytes(collector.data)


@pytest.mark.parametrize("ending", BARE_ENDINGS, ids=repr)
async def test_bare_end_of_data_is_rejected_and_smuggled_message_dropped(
        client_factory, config, ending: bytes) -> None:
    client = await _open_data(client_factory)
    collector = Collector(client)
    await collector.send(OUTER + ending + SMUGGLED)
    await _expect_521_close(collector)
    assert_nothing_accepted(config)


@pytest.mark.parametrize("ending", BARE_ENDINGS, ids=repr)
async def test_bare_end_split_from_smuggled_part(client_factory, config, ending: bytes) -> None:
    """The malformed ending arrives in its own write, the smuggled commands in the next."""
    client = await _open_data(client_factory)
    collector = Collector(client)
    await collector.send(OUTER + ending)
    await asyncio.sleep(0.05)
    await collector.send(SMUGGLED)
    await _expect_521_close(collector)
    assert_nothing_accepted(config)


@pytest.mark.parametrize("cut", range(1, 4))
async def test_bare_end_split_inside_the_ending(client_factory, config, cut: int) -> None:
    ending = b"\r\n.\n"
    client = await _open_data(client_factory)
    collector = Collector(client)
    await collector.send(OUTER + ending[:cut])
    await asyncio.sleep(0.05)
    await collector.send(ending[cut:] + SMUGGLED)
    await _expect_521_close(collector)
    assert_nothing_accepted(config)


async def test_bare_lf_end_sent_byte_by_byte(client_factory, config) -> None:
    client = await _open_data(client_factory)
    collector = Collector(client)
    for byte in OUTER + b"\n.\n" + SMUGGLED:
        if not await collector.send(bytes([byte])):
            break
        await asyncio.sleep(0.001)
    await _expect_521_close(collector)
    assert_nothing_accepted(config)


@pytest.mark.parametrize("ending", NUL_ENDINGS, ids=repr)
async def test_issue10_nul_around_dot_stays_inside_one_message_which_is_refused(
        client_factory, config, ending: bytes) -> None:
    client = await _open_data(client_factory)
    code, text = await client.cmd(OUTER + ending + SMUGGLED)
    # one message (the smuggled commands are its text), refused at its real end for the NUL
    assert (code, text[4:9]) == (554, "5.6.0"), text
    # the session is still in sync: the next command gets its own reply, and no
    # transaction (neither the outer one nor a smuggled one) is open
    assert (await client.cmd("NOOP"))[0] == 250
    code, text = await client.cmd("DATA")
    assert (code, text[4:9]) == (503, "5.5.1"), text
    await asyncio.sleep(0.3)
    assert_nothing_accepted(config)
    assert maildir_messages(config.mail_dir, "postmaster") == []


async def test_issue10_nul_anywhere_in_data_refused_and_session_goes_on(
        client_factory, config) -> None:
    client = await _open_data(client_factory)
    code, text = await client.cmd(b"Subject: nul\r\n\r\nbinary \x00 inside\r\n.\r\n")
    assert (code, text[4:9]) == (554, "5.6.0"), text
    await send_message(client)                 # the next transaction is accepted
    msgs = await wait_delivered(config, "alice")
    assert len(msgs) == 1 and b"\x00" not in msgs[0]


async def test_proper_message_byte_by_byte_keeps_smuggled_text_as_content(
        client_factory, config) -> None:
    """Every byte in its own write: the end-of-data detection must not depend on how the
    stream is cut. Dot-stuffed lines and a CRLF split from its dot are content."""
    client = await _open_data(client_factory)
    stuffed = SMUGGLED.replace(b"\r\n.\r\n", b"\r\n..\r\n")  # what a real client sends
    payload = OUTER + b"\r\n" + stuffed + b"tail\r\n.\r\n"
    for byte in payload:
        client.writer.write(bytes([byte]))
        await client.writer.drain()
        await asyncio.sleep(0.0005)
    code, text = await client.reply()
    assert (code, text[4:9]) == (250, "2.0.0"), text
    msgs = await wait_delivered(config, "alice")
    assert len(msgs) == 1
    content = content_after_received(msgs[0])
    expected = (OUTER + b"\r\n" + SMUGGLED + b"tail\r\n").replace(b"\r\n", b"\n")
    assert content == expected
    assert maildir_messages(config.mail_dir, "postmaster") == []


async def test_connection_usable_after_a_good_message_with_crlf_dot_text(
        client_factory, config) -> None:
    """``.`` inside a line or ``..`` at a line start never ends the message."""
    client = await client_factory()
    await greet(client)
    body = b"Subject: dots\r\n\r\na.b\r\n..\r\n..MAIL FROM:<x@evil.test>\r\n . \r\n"
    await send_message(client, body)
    msgs = await wait_delivered(config, "alice")
    assert len(msgs) == 1
    assert content_after_received(msgs[0]) == (
        b"Subject: dots\n\na.b\n.\n.MAIL FROM:<x@evil.test>\n . \n")


@pytest.mark.parametrize("line", [
    b"NOOP\nMAIL FROM:<attacker@evil.test>\r\n",
    b"NOOP\rMAIL FROM:<attacker@evil.test>\r\n",
    b"MAIL FROM:<attacker@evil.test>\n",
    b"\nMAIL FROM:<attacker@evil.test>\r\n",
], ids=repr)
async def test_bare_cr_or_lf_in_command_closes_and_nothing_after_runs(
        client_factory, config, line: bytes) -> None:
    client = await client_factory()
    await greet(client)
    collector = Collector(client)
    await collector.send(line + b"RCPT TO:<postmaster@example.com>\r\nDATA\r\n"
                                b"Subject: smuggled\r\n\r\nSMUGGLED-PAYLOAD\r\n.\r\nQUIT\r\n")
    await _expect_521_close(collector)
    assert_nothing_accepted(config)


async def test_bare_lf_mid_transaction_command_drops_transaction(client_factory, config) -> None:
    client = await client_factory()
    await greet(client)
    await start_mail(client)
    collector = Collector(client)
    await collector.send(b"DATA\nSubject: x\r\n\r\nbody\r\n.\r\n")
    await _expect_521_close(collector)
    assert_nothing_accepted(config)


async def test_smuggled_text_never_delivered_anywhere(client_factory, config) -> None:
    """After all the above kinds of attempts on one server, a legitimate message still goes
    through and the payload is nowhere on disk."""
    for ending in (b"\n.\n", b"\r.\r\n"):
        client = await _open_data(client_factory)
        collector = Collector(client)
        await collector.send(OUTER + ending + SMUGGLED)
        await _expect_521_close(collector)
    client = await client_factory()
    await greet(client)
    await send_message(client)
    await wait_delivered(config, "alice")
    await queue_drained(config)
    assert b"SMUGGLED-PAYLOAD" not in all_delivered_text(config)
    assert maildir_messages(config.mail_dir, "postmaster") == []
