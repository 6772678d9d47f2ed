"""What real clients send is what lands in the mailbox, byte for byte (CRLF → LF), plus exactly
the trace headers Postfix would add; read back with the stdlib ``mailbox`` module."""

from __future__ import annotations

import asyncio
import email
import email.utils
import re
import time
from datetime import UTC, datetime
from pathlib import Path

import aiosmtplib
import pytest

from pymta.app import MTA
from tests.conftest import make_config
from tests.integration._support import (
    client_name,
    lf,
    mbox_from_lines,
    our_received,
    queued_id,
    smtp_address,
    smtplib_send,
    split_delivered,
    wait_maildir,
    wait_mbox,
)

LINE_998 = b"x" * 990 + b"12345678"
assert len(LINE_998) == 998

TRICKY = (
    b"From: Sender <sender@example.net>\r\n"
    b"To: alice@example.com, bob@example.com\r\n"
    b"Subject: =?utf-8?q?caf=C3=A9?= byte exact\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b".leading dot\r\n"
    b"..two leading dots\r\n"
    b".\r\n"
    b"...\r\n"
    b". dot space\r\n"
    b"latin-1: caf\xe9 na\xefve \xa9\r\n"
    b"utf-8: caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x93\xa7\r\n"
    + LINE_998 + b"\r\n"
    b"From me\r\n"
    b" From indented\r\n"
    b">From already quoted\r\n"
    b"Fromage\r\n"
    b"\r\n"
    b"trailing spaces   \r\n"
    b"tab\there\r\n"
    b"last line\r\n"
)


async def _send_aiosmtplib(host: str, port: int, sender: str, rcpts: list[str], data: bytes,
                           mail_options: list[str]) -> str:
    async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False,
                               local_hostname="client.example.net", timeout=10) as smtp:
        errors, text = await smtp.sendmail(sender, rcpts, data, mail_options=mail_options)
    assert errors == {}
    return text


async def _send(client: str, mta: MTA, rcpts: list[str], data: bytes,
                mail_options: list[str] | None = None, sender: str = "sender@example.net",
                ) -> str:
    """Send with the named real client; the text of the final 250 reply."""
    host, port = smtp_address(mta)
    opts = mail_options or []
    if client == "smtplib":
        result = await asyncio.to_thread(smtplib_send, host, port, sender, rcpts, data,
                                         mail_options=opts)
        code, text = result["data_reply"]
        assert code == 250, text
        return text
    return await _send_aiosmtplib(host, port, sender, rcpts, data, opts)


CLIENTS = ["smtplib", "aiosmtplib"]


@pytest.mark.parametrize("client", CLIENTS)
async def test_tricky_body_is_byte_exact_in_maildir_and_mbox(mta: MTA, config,
                                                             client: str) -> None:
    await _send(client, mta, ["alice@example.com", "bob@example.com"], TRICKY,
                ["BODY=8BITMIME"])
    [maildir_copy] = await wait_maildir(config.mail_dir, "alice/")
    [mbox_copy] = await wait_mbox(config.mail_dir, "bob")

    _, in_maildir = split_delivered(maildir_copy)
    assert in_maildir == lf(TRICKY)  # maildir keeps "From me" as it is
    assert b"\nFrom me\n" in in_maildir

    _, in_mbox = split_delivered(mbox_copy)
    expected_mbox = lf(TRICKY).replace(b"\nFrom me\n", b"\n>From me\n")
    assert in_mbox == expected_mbox  # mboxo: only "From " at line start is quoted
    assert b"\n>From me\n" in in_mbox and b"\n From indented\n" in in_mbox
    assert b"\n>From already quoted\n" in in_mbox and b"\nFromage\n" in in_mbox

    # the pieces most likely to be mangled, checked one by one for a readable failure
    body = in_maildir.split(b"\n\n", 1)[1]
    lines = body.split(b"\n")
    assert lines[:5] == [b".leading dot", b"..two leading dots", b".", b"...", b". dot space"]
    assert b"latin-1: caf\xe9 na\xefve \xa9" in lines
    assert "utf-8: café € 📧".encode() in lines
    assert LINE_998 in lines


@pytest.mark.parametrize("client", CLIENTS)
async def test_body_without_final_line_break(mta: MTA, config, client: str) -> None:
    """Clients end an unterminated last line with CRLF before the final dot (RFC 5321
    §4.1.1.4); the mailbox shows the line ending it was sent with."""
    data = b"Subject: no final newline\r\n\r\nfirst line\r\nno newline at the end"
    await _send(client, mta, ["alice@example.com"], data)
    [stored] = await wait_maildir(config.mail_dir, "alice/")
    _, rest = split_delivered(stored)
    assert rest == lf(data) + b"\n"


async def test_unterminated_998_octet_last_line_and_dot_at_end(mta: MTA, config) -> None:
    data = b"Subject: long tail\r\n\r\n.\r\n" + LINE_998
    await _send("smtplib", mta, ["alice@example.com"], data)
    [stored] = await wait_maildir(config.mail_dir, "alice/")
    assert split_delivered(stored)[1] == lf(data) + b"\n"


async def test_message_ending_in_dot_lines(mta: MTA, config) -> None:
    data = b"Subject: dots at the end\r\n\r\nbody\r\n.\r\n..\r\n"
    await _send("aiosmtplib", mta, ["bob@example.com"], data)
    [stored] = await wait_mbox(config.mail_dir, "bob")
    assert split_delivered(stored)[1] == lf(data)


async def test_latin1_body_without_8bitmime_is_kept(mta: MTA, config) -> None:
    """A 7BIT-declared message with stray 8-bit bytes (common in the wild) is not rewritten."""
    data = b"Subject: sloppy\r\n\r\nna\xefve \xff\xfe bytes\r\n"
    await _send("smtplib", mta, ["alice@example.com"], data)
    [stored] = await wait_maildir(config.mail_dir, "alice/")
    assert split_delivered(stored)[1] == lf(data)


# ---------------------------------------------------------------------- trace headers


# the client's name: the loopback address's forward-confirmed name (or unknown)
RECEIVED_RE = re.compile(
    rb"Received: from (?P<helo>\S+) \(" + re.escape(client_name().encode())
    + rb" \[127\.0\.0\.1\]\)\n"
    rb"\tby mx\.example\.com \(pymta\) with (?P<proto>E?SMTPS?) id (?P<qid>[0-9A-Z]+)"
    rb"(?:\n\t\((?P<tls>version=\S+ cipher=\S+ bits=\d+)\))?"
    rb"(?:\n\tfor <(?P<rcpt>[^>]+)>)?"
    rb"; (?P<date>[^\n]+)\n")


def _check_received(stored: bytes) -> re.Match[bytes]:
    m = RECEIVED_RE.match(stored, stored.index(b"\nReceived: ") + 1)
    assert m, stored[:400]
    when = email.utils.parsedate_to_datetime(m.group("date").decode())
    assert when.tzinfo is not None  # RFC 5322 date with a zone
    assert abs((datetime.now(UTC) - when).total_seconds()) < 120
    assert email.utils.format_datetime(when) == m.group("date").decode()
    return m


async def test_trace_headers_single_recipient(mta: MTA, config) -> None:
    data = b"From: sender@example.net\r\nSubject: trace\r\n\r\nbody\r\n"
    reply = await _send("smtplib", mta, ["alice@example.com"], data)
    qid = queued_id(reply)
    [stored] = await wait_maildir(config.mail_dir, "alice/")
    assert stored.startswith(b"Return-Path: <sender@example.net>\nDelivered-To: "
                             b"alice@example.com\nAuthentication-Results: mx.example.com; ")
    m = _check_received(stored)
    assert m.group("helo") == b"client.example.net"
    assert m.group("proto") == b"ESMTP"
    assert m.group("qid").decode() == qid
    assert m.group("tls") is None
    assert m.group("rcpt") == b"alice@example.com"
    # our Received comes right before the client's own header, which is untouched
    assert stored[m.end():] == lf(data)
    parsed = email.message_from_bytes(stored)
    # the pipeline's results (RFC 8601, RFC 7208 §9.1) stand between delivery's and ours
    assert parsed.keys()[:5] == ["Return-Path", "Delivered-To", "Authentication-Results",
                                 "Received-SPF", "Received"]


async def test_trace_headers_in_mbox_and_from_line(mta: MTA, config) -> None:
    before = time.time()
    reply = await _send("aiosmtplib", mta, ["bob@example.com"], b"Subject: mbox\r\n\r\nx\r\n")
    [stored] = await wait_mbox(config.mail_dir, "bob")
    assert stored.startswith(b"Return-Path: <sender@example.net>\n"
                             b"Delivered-To: bob@example.com\nAuthentication-Results: ")
    m = _check_received(stored)
    assert m.group("qid").decode() == queued_id(reply)
    assert m.group("rcpt") == b"bob@example.com"
    [from_line] = mbox_from_lines(config.mail_dir, "bob")
    who, _, when = from_line.partition(" ")
    assert who == "sender@example.net"
    stamp = time.mktime(time.strptime(when.strip(), "%a %b %d %H:%M:%S %Y"))
    assert before - 2 <= stamp <= time.time() + 2


async def test_trace_headers_two_recipients_have_no_for_clause(mta: MTA, config) -> None:
    reply = await _send("smtplib", mta, ["alice@example.com", "postmaster@example.com"],
                        b"Subject: two\r\n\r\nx\r\n")
    qid = queued_id(reply)
    [a] = await wait_maildir(config.mail_dir, "alice/")
    [p] = await wait_maildir(config.mail_dir, "postmaster/")
    for stored, rcpt in ((a, b"alice@example.com"), (p, b"postmaster@example.com")):
        assert stored.split(b"\n", 2)[1] == b"Delivered-To: " + rcpt
        m = _check_received(stored)
        assert m.group("rcpt") is None
        assert m.group("qid").decode() == qid
    assert our_received(a) == our_received(p)


async def test_trace_headers_helo_is_smtp(mta: MTA, config) -> None:
    host, port = smtp_address(mta)
    result = await asyncio.to_thread(smtplib_send, host, port, "sender@example.net",
                                     ["alice@example.com"], b"Subject: helo\r\n\r\nx\r\n",
                                     helo="old.example.net", use_helo=True)
    [stored] = await wait_maildir(config.mail_dir, "alice/")
    m = _check_received(stored)
    assert m.group("proto") == b"SMTP"
    assert m.group("helo") == b"old.example.net"
    assert m.group("qid").decode() == queued_id(result["data_reply"][1])


async def test_trace_headers_tls(tmp_path: Path) -> None:
    config = make_config(tmp_path, smtpd_use_tls=True)
    async with MTA(config) as mta:
        host, port = smtp_address(mta)
        result = await asyncio.to_thread(smtplib_send, host, port, "sender@example.net",
                                         ["alice@example.com"], b"Subject: tls\r\n\r\nx\r\n",
                                         starttls=True)
        [stored] = await wait_maildir(config.mail_dir, "alice/")
    m = _check_received(stored)
    assert m.group("proto") == b"ESMTPS"
    cipher = result["tls_cipher"]
    assert m.group("tls").decode() == (f"version={result['tls_version']} cipher={cipher[0]} "
                                       f"bits={cipher[2]}")
    assert m.group("rcpt") == b"alice@example.com"
    assert m.group("qid").decode() == queued_id(result["data_reply"][1])


async def test_helo_name_with_comment_characters_is_cleaned(mta: MTA, config) -> None:
    """An EHLO argument cannot break out of the Received header's structure."""
    host, port = smtp_address(mta)
    await asyncio.to_thread(smtplib_send, host, port, "sender@example.net",
                            ["alice@example.com"], b"Subject: x\r\n\r\nx\r\n",
                            helo="evil(by.x)\\name")
    [stored] = await wait_maildir(config.mail_dir, "alice/")
    received = our_received(stored)
    # The HELO name is cleaned (how is pymta/receiving/received.py's business: dropped or
    # replaced), so the comment that follows it is the only one and nothing else opens or
    # closes one.
    m = re.match(rf"Received: from (\S+) \({re.escape(client_name())} \[127\.0\.0\.1\]\) by ",
                 received)
    assert m is not None, received
    assert "evil" in m.group(1) and not set(m.group(1)) & set("()\\"), received
