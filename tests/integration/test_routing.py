"""Recipient routing as a real client sees it: aliases, de-duplication, case, the bare
postmaster, unknown users, relay denial and the null sender."""

from __future__ import annotations

import asyncio

import aiosmtplib
import pytest

from pymta.app import MTA
from tests.integration._support import (
    maildir_bytes,
    mbox_bytes,
    our_received,
    queued_id,
    smtp_address,
    smtplib_send,
    split_delivered,
    wait_maildir,
    wait_mbox,
    wait_queue_empty,
)

BODY = b"Subject: routing\r\n\r\nrouted\r\n"


async def _client(mta: MTA) -> aiosmtplib.SMTP:
    host, port = smtp_address(mta)
    smtp = aiosmtplib.SMTP(hostname=host, port=port, start_tls=False,
                           local_hostname="client.example.net", timeout=10)
    await smtp.connect()
    await smtp.ehlo()
    return smtp


async def _transaction(mta: MTA, rcpts: list[str], sender: str = "sender@example.net",
                       data: bytes = BODY) -> tuple[list[tuple[int, str]], str | None]:
    """MAIL, one RCPT per address (all replies kept), DATA when any was accepted."""
    smtp = await _client(mta)
    try:
        code = (await smtp.mail(sender)).code
        assert code == 250
        replies = []
        for r in rcpts:
            try:
                resp = await smtp.rcpt(r)
            except aiosmtplib.SMTPRecipientRefused as exc:
                replies.append((exc.code, exc.message))
            else:
                replies.append((resp.code, resp.message))
        text = None
        if any(c == 250 for c, _ in replies):
            resp = await smtp.data(data)
            assert resp.code == 250
            text = resp.message
    finally:
        await smtp.quit()
    return replies, text


async def test_alias_fans_out_to_maildir_and_mbox(mta: MTA, config) -> None:
    replies, text = await _transaction(mta, ["team@example.com"])
    assert replies == [(250, "2.1.5 Ok")]
    qid = queued_id(text)
    [a] = await wait_maildir(config.mail_dir, "alice/")
    [b] = await wait_mbox(config.mail_dir, "bob")
    assert split_delivered(a)[0][1] == b"Delivered-To: alice@example.com"
    assert split_delivered(b)[0][1] == b"Delivered-To: bob@example.com"
    for stored in (a, b):
        received = our_received(stored)
        assert f" id {qid} for <team@example.com>; " in received
        assert split_delivered(stored)[1] == b"Subject: routing\n\nrouted\n"


async def test_same_mailbox_reached_twice_gets_one_copy(mta: MTA, config) -> None:
    replies, text = await _transaction(mta, ["alice@example.com", "team@example.com",
                                             "Alice@Example.com"])
    assert [c for c, _ in replies] == [250, 250, 250]
    await wait_maildir(config.mail_dir, "alice/")
    await wait_mbox(config.mail_dir, "bob")
    await wait_queue_empty(mta)
    await asyncio.sleep(0.3)  # anything still on its way would show up now
    assert len(maildir_bytes(config.mail_dir, "alice/")) == 1
    assert len(mbox_bytes(config.mail_dir, "bob")) == 1
    # two different RCPT addresses reached the message: no single "for" clause
    assert " for <" not in our_received(maildir_bytes(config.mail_dir, "alice/")[0])


async def test_recipient_case_is_ignored(mta: MTA, config) -> None:
    replies, text = await _transaction(mta, ["ALICE@Example.COM"])
    assert replies[0][0] == 250
    [stored] = await wait_maildir(config.mail_dir, "alice/")
    added, _ = split_delivered(stored)
    assert added[1] == b"Delivered-To: alice@example.com"
    assert " for <ALICE@Example.COM>; " in our_received(stored)


async def test_second_domain_alias_case(mta: MTA, config) -> None:
    """TEAM@EXAMPLE.COM is the same alias; unknown users of the second domain are refused."""
    replies, _ = await _transaction(mta, ["TEAM@EXAMPLE.COM", "alice@example.org"])
    assert replies[0][0] == 250
    assert replies[1][0] == 550 and replies[1][1].startswith("5.1.1 ")
    await wait_maildir(config.mail_dir, "alice/")
    await wait_mbox(config.mail_dir, "bob")


async def test_bare_postmaster_is_accepted_and_delivered(mta: MTA, config) -> None:
    replies, text = await _transaction(mta, ["postmaster"])
    assert replies == [(250, "2.1.5 Ok")]
    [stored] = await wait_maildir(config.mail_dir, "postmaster/")
    assert split_delivered(stored)[0][1] == b"Delivered-To: postmaster@example.com"
    assert f"id {queued_id(text)} for <postmaster@example.com>" in our_received(stored)


async def test_bare_postmaster_any_case_with_smtplib(mta: MTA, config) -> None:
    host, port = smtp_address(mta)
    await asyncio.to_thread(smtplib_send, host, port, "sender@example.net", ["PostMaster"],
                            b"Subject: pm\r\n\r\nx\r\n")
    await wait_maildir(config.mail_dir, "postmaster/")


async def test_unknown_user_is_550_511(mta: MTA, config) -> None:
    replies, text = await _transaction(mta, ["nobody@example.com"])
    [(code, message)] = replies
    assert code == 550
    assert message.startswith("5.1.1 <nobody@example.com>: Recipient address rejected")
    assert text is None


async def test_foreign_domain_is_554_571(mta: MTA, config) -> None:
    replies, _ = await _transaction(mta, ["someone@elsewhere.example"])
    [(code, message)] = replies
    assert code == 554
    assert message == "5.7.1 <someone@elsewhere.example>: Relay access denied"


async def test_mixed_recipients_only_good_ones_delivered(mta: MTA, config) -> None:
    replies, text = await _transaction(mta, ["nobody@example.com", "alice@example.com",
                                             "x@elsewhere.example"])
    assert [c for c, _ in replies] == [550, 250, 554]
    [stored] = await wait_maildir(config.mail_dir, "alice/")
    assert f"id {queued_id(text)} for <alice@example.com>" in our_received(stored)
    await wait_queue_empty(mta)


@pytest.mark.parametrize("rcpt", ["alice@example.com", "bob@example.com"])
async def test_null_sender_is_accepted(mta: MTA, config, rcpt: str) -> None:
    replies, text = await _transaction(mta, [rcpt], sender="")
    assert replies[0][0] == 250
    if rcpt.startswith("alice"):
        [stored] = await wait_maildir(config.mail_dir, "alice/")
    else:
        [stored] = await wait_mbox(config.mail_dir, "bob")
    assert stored.startswith(b"Return-Path: <>\n")


async def test_null_sender_with_smtplib(mta: MTA, config) -> None:
    host, port = smtp_address(mta)
    await asyncio.to_thread(smtplib_send, host, port, "", ["alice@example.com"],
                            b"Subject: bounce-ish\r\n\r\nx\r\n")
    [stored] = await wait_maildir(config.mail_dir, "alice/")
    assert stored.startswith(b"Return-Path: <>\nDelivered-To: alice@example.com\n")


async def test_no_valid_recipient_data_is_refused(mta: MTA) -> None:
    smtp = await _client(mta)
    try:
        await smtp.mail("sender@example.net")
        with pytest.raises(aiosmtplib.SMTPRecipientRefused):
            await smtp.rcpt("nobody@example.com")
        with pytest.raises(aiosmtplib.SMTPResponseException) as info:
            await smtp.data(BODY)
        assert info.value.code in (503, 554)
    finally:
        await smtp.quit()
