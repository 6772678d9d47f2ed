"""Delivery Status Notifications end to end: a real client sends, a scripted delivery agent
fails one recipient, and the report arrives in a real local mailbox."""

from __future__ import annotations

import asyncio
import email
import email.message
from collections.abc import AsyncIterator
from email import policy
from pathlib import Path

import aiosmtplib
import pytest

from pymta.app import MTA
from pymta.delivery.local import LocalDeliveryAgent
from pymta.delivery.router import StaticRouter
from pymta.types import OutcomeKind, RcptState, Reply
from tests.conftest import make_config, wait_for
from tests.integration._support import (
    OneAgentRouter,
    ScriptedAgent,
    maildir_bytes,
    queued_id,
    smtp_address,
    smtplib_send,
    split_delivered,
    wait_maildir,
    wait_mbox,
    wait_queue_empty,
)

BOXES = ("alice@example.com:alice/ bob@example.com:bob postmaster@example.com:postmaster/ "
         "carol@example.com:carol/")
UNAVAILABLE = Reply(550, "5.1.1", "mailbox unavailable")
BUSY = Reply(451, "4.3.0", "mailbox busy, try later")

ORIGINAL = (b"From: Alice <alice@example.com>\r\n"
            b"To: carol@example.com, bob@example.com\r\n"
            b"Subject: will bounce\r\n"
            b"Message-ID: <bounce-me@example.com>\r\n"
            b"\r\n"
            b"The body of the original message.\r\n"
            b".a dotted line\r\n")


def _config(tmp_path: Path, **overrides: object):
    return make_config(tmp_path, mail_boxes=BOXES, **overrides)


async def _start(tmp_path: Path, kind: OutcomeKind = OutcomeKind.PERMANENT,
                 reply: Reply = UNAVAILABLE, **overrides: object) -> tuple[MTA, ScriptedAgent]:
    config = _config(tmp_path, **overrides)
    agent = ScriptedAgent(LocalDeliveryAgent(config.mail_dir, config.hostname),
                          {"carol@example.com": (kind, reply)})
    mta = MTA(config, router=OneAgentRouter(agent))
    await mta.start()
    return mta, agent


@pytest.fixture
async def failing(tmp_path: Path) -> AsyncIterator[tuple[MTA, ScriptedAgent]]:
    mta, agent = await _start(tmp_path)
    try:
        yield mta, agent
    finally:
        await mta.stop()


async def _aio_send(mta: MTA, sender: str, rcpts: list[str], data: bytes = ORIGINAL, *,
                    mail_options: list[str] | None = None,
                    rcpt_options: list[str] | None = None) -> str:
    host, port = smtp_address(mta)
    async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False,
                               local_hostname="client.example.net", timeout=10) as smtp:
        errors, text = await smtp.sendmail(sender, rcpts, data, mail_options=mail_options or [],
                                           rcpt_options=rcpt_options or [])
    assert errors == {}
    return text


def _parse(stored: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(stored, policy=policy.default)  # type: ignore[return-value]


def _report(dsn: email.message.EmailMessage) -> tuple[email.message.Message,
                                                       list[email.message.Message]]:
    """(per-message fields, per-recipient field blocks) of the delivery-status part."""
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    parts = list(dsn.iter_parts())
    assert parts[0].get_content_type() == "text/plain"
    assert parts[1].get_content_type() == "message/delivery-status"
    blocks = parts[1].get_payload()
    assert isinstance(blocks, list) and len(blocks) >= 2
    return blocks[0], blocks[1:]


async def test_permanent_failure_dsn_to_local_sender_ret_full(failing) -> None:
    mta, agent = failing
    mail_dir = mta.config.mail_dir
    text = await _aio_send(mta, "alice@example.com", ["carol@example.com", "bob@example.com"],
                           mail_options=["RET=FULL", "ENVID=QQ+2Benv-42"],
                           rcpt_options=["NOTIFY=FAILURE",
                                         "ORCPT=rfc822;carol@example.com"])
    qid = queued_id(text)
    [for_bob] = await wait_mbox(mail_dir, "bob")  # the good recipient is not held up
    assert b"Subject: will bounce" in for_bob
    [stored] = await wait_maildir(mail_dir, "alice/")
    assert agent.calls["carol@example.com"] == 1  # permanent: not retried

    added, _ = split_delivered(stored)
    assert added[0] == b"Return-Path: <>"  # a DSN has the null sender
    assert added[1] == b"Delivered-To: alice@example.com"
    dsn = _parse(stored)
    assert dsn["Subject"] == "Undelivered Mail Returned to Sender"
    assert dsn["To"] == "alice@example.com"
    assert dsn["From"].startswith("MAILER-DAEMON@mx.example.com")
    assert dsn["Auto-Submitted"] == "auto-replied"
    per_message, [carol] = _report(dsn)
    assert per_message["Reporting-MTA"] == "dns; mx.example.com"
    assert per_message["Original-Envelope-Id"] == "QQ+env-42"  # xtext-decoded
    assert per_message["X-Pymta-Queue-ID"] == qid
    assert carol["Final-Recipient"] == "rfc822; carol@example.com"
    assert carol["Original-Recipient"] == "rfc822; carol@example.com"
    assert carol["Action"] == "failed"
    assert carol["Status"] == "5.1.1"
    assert carol["Diagnostic-Code"] == "smtp; 550 5.1.1 mailbox unavailable"

    human = list(dsn.iter_parts())[0].get_content()
    assert "<carol@example.com>: 550 5.1.1 mailbox unavailable" in human

    returned = list(dsn.iter_parts())[2]
    assert returned.get_content_type() == "message/rfc822"
    inner = returned.get_payload()[0]
    assert inner["Subject"] == "will bounce"
    assert inner["Message-ID"] == "<bounce-me@example.com>"
    assert inner.get_payload() == "The body of the original message.\n.a dotted line\n"
    assert f"id {qid}".encode() in inner.as_bytes()  # the original with our Received header

    await wait_queue_empty(mta)
    assert len(maildir_bytes(mail_dir, "alice/")) == 1  # exactly one notice


async def test_default_notify_and_ret_with_smtplib(failing) -> None:
    """No DSN parameters at all: a failure report with the full original (RET default)."""
    mta, _ = failing
    host, port = smtp_address(mta)
    await asyncio.to_thread(smtplib_send, host, port, "alice@example.com",
                            ["carol@example.com"], ORIGINAL)
    [stored] = await wait_maildir(mta.config.mail_dir, "alice/")
    dsn = _parse(stored)
    per_message, [carol] = _report(dsn)
    assert "Original-Envelope-Id" not in per_message
    assert "Original-Recipient" not in carol
    assert carol["Status"] == "5.1.1" and carol["Action"] == "failed"
    assert list(dsn.iter_parts())[2].get_content_type() == "message/rfc822"


async def test_ret_hdrs_returns_only_the_header(failing) -> None:
    mta, _ = failing
    await _aio_send(mta, "alice@example.com", ["carol@example.com"],
                    mail_options=["RET=HDRS"])
    [stored] = await wait_maildir(mta.config.mail_dir, "alice/")
    dsn = _parse(stored)
    _, [carol] = _report(dsn)
    assert carol["Status"] == "5.1.1"
    returned = list(dsn.iter_parts())[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    content = returned.get_content()
    assert "Subject: will bounce" in content
    assert "Message-ID: <bounce-me@example.com>" in content
    assert b"The body of the original message" not in stored


async def test_notify_never_sends_nothing(failing) -> None:
    mta, agent = failing
    mail_dir = mta.config.mail_dir
    host, port = smtp_address(mta)
    await asyncio.to_thread(smtplib_send, host, port, "alice@example.com",
                            ["carol@example.com"], ORIGINAL, rcpt_options=["NOTIFY=NEVER"])
    await wait_queue_empty(mta)
    assert agent.calls.get("carol@example.com") == 1
    await asyncio.sleep(0.3)
    assert maildir_bytes(mail_dir, "alice/") == []
    assert maildir_bytes(mail_dir, "postmaster/") == []


async def test_notify_success_sends_a_delivered_report(failing) -> None:
    mta, _ = failing
    mail_dir = mta.config.mail_dir
    await _aio_send(mta, "alice@example.com", ["bob@example.com"],
                    mail_options=["ENVID=ok-1"],
                    rcpt_options=["NOTIFY=SUCCESS", "ORCPT=rfc822;bob@example.com"])
    await wait_mbox(mail_dir, "bob")
    [stored] = await wait_maildir(mail_dir, "alice/")
    dsn = _parse(stored)
    assert dsn["Subject"] == "Successful Mail Delivery Report"
    assert split_delivered(stored)[0][0] == b"Return-Path: <>"
    per_message, [bob] = _report(dsn)
    assert per_message["Original-Envelope-Id"] == "ok-1"
    assert bob["Final-Recipient"] == "rfc822; bob@example.com"
    assert bob["Original-Recipient"] == "rfc822; bob@example.com"
    assert bob["Action"] == "delivered"
    assert bob["Status"].startswith("2.")
    await wait_queue_empty(mta)
    assert len(maildir_bytes(mail_dir, "alice/")) == 1


async def test_notify_success_failure_mixed(failing) -> None:
    """One report per kind: carol's failure and bob's success arrive as two notices."""
    mta, _ = failing
    mail_dir = mta.config.mail_dir
    await _aio_send(mta, "alice@example.com", ["carol@example.com", "bob@example.com"],
                    rcpt_options=["NOTIFY=SUCCESS,FAILURE"])
    stored = await wait_maildir(mail_dir, "alice/", 2)
    await wait_queue_empty(mta)
    actions = {}
    for s in stored:
        _, blocks = _report(_parse(s))
        for b in blocks:
            actions[b["Final-Recipient"]] = b["Action"]
    assert actions == {"rfc822; carol@example.com": "failed",
                       "rfc822; bob@example.com": "delivered"}


async def test_failure_from_null_sender_goes_to_postmaster(failing) -> None:
    mta, _ = failing
    mail_dir = mta.config.mail_dir
    await _aio_send(mta, "", ["carol@example.com"])
    [stored] = await wait_maildir(mail_dir, "postmaster/")
    dsn = _parse(stored)
    assert split_delivered(stored)[0][:2] == [b"Return-Path: <>",
                                              b"Delivered-To: postmaster@example.com"]
    assert dsn["To"] == "postmaster@example.com"
    _, [carol] = _report(dsn)
    assert carol["Final-Recipient"] == "rfc822; carol@example.com"
    assert carol["Status"] == "5.1.1"
    await wait_queue_empty(mta)
    assert maildir_bytes(mail_dir, "alice/") == []  # never to the (null) sender


async def test_failure_from_remote_sender_dsn_waits_for_a_relay(tmp_path: Path) -> None:
    """With the standard router and no relay, the DSN to a foreign sender stays queued
    (deferred, not bounced again) and nothing lands in a local mailbox."""
    config = _config(tmp_path)
    agent = ScriptedAgent(LocalDeliveryAgent(config.mail_dir, config.hostname),
                          {"carol@example.com": (OutcomeKind.PERMANENT, UNAVAILABLE)})
    async with MTA(config, router=StaticRouter(agent)) as mta:
        text = await _aio_send(mta, "someone@elsewhere.example", ["carol@example.com"])
        qid = queued_id(text)

        def dsn_envelopes():
            envs = [mta.store.load(q) for q in mta.store.ids() if q != qid]
            return [e for e in envs if e is not None and e.is_bounce
                    and e.recipients[0].attempts >= 1]

        [env] = await wait_for(dsn_envelopes)
        assert env.sender == ""
        assert [r.address for r in env.recipients] == ["someone@elsewhere.example"]
        assert env.recipients[0].state is RcptState.PENDING
        assert "4.4.0" in env.recipients[0].last_reply
        assert qid not in mta.store.ids()  # the original is done
        assert maildir_bytes(config.mail_dir, "alice/") == []
        assert maildir_bytes(config.mail_dir, "postmaster/") == []


async def test_temporary_failure_expires_with_4_4_7(tmp_path: Path) -> None:
    mta, agent = await _start(tmp_path, OutcomeKind.TEMPORARY, BUSY, queue_lifetime=1.0,
                              queue_retry_first=0.2, queue_retry_max=0.3)
    try:
        mail_dir = mta.config.mail_dir
        text = await _aio_send(mta, "alice@example.com", ["carol@example.com"],
                               rcpt_options=["NOTIFY=FAILURE,DELAY"])
        qid = queued_id(text)
        [stored] = await wait_maildir(mail_dir, "alice/", timeout=8)
        assert agent.calls["carol@example.com"] >= 2  # retried before giving up
        dsn = _parse(stored)
        assert dsn["Subject"] == "Undelivered Mail Returned to Sender"
        per_message, [carol] = _report(dsn)
        assert per_message["X-Pymta-Queue-ID"] == qid
        assert carol["Action"] == "failed"
        assert carol["Status"] == "4.4.7"
        assert carol["Diagnostic-Code"] == "smtp; 451 4.3.0 mailbox busy, try later"
        human = list(dsn.iter_parts())[0].get_content()
        assert "message expired" in human
        await wait_queue_empty(mta)
        calls = agent.calls["carol@example.com"]
        await asyncio.sleep(0.5)
        assert agent.calls["carol@example.com"] == calls  # gone: no more attempts
        assert len(maildir_bytes(mail_dir, "alice/")) == 1
    finally:
        await mta.stop()
