"""Real SMTP clients against a real listener: Python's smtplib, aiosmtplib and swaks, with and
without STARTTLS; every message must arrive in the mailbox it was addressed to."""

from __future__ import annotations

import asyncio
import shutil
import ssl
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import pytest

from pymta.app import MTA
from tests.conftest import make_config
from tests.integration._support import (
    client_name,
    client_tls_context,
    lf,
    our_received,
    queued_id,
    run_subprocess,
    smtp_address,
    smtplib_send,
    split_delivered,
    wait_maildir,
    wait_mbox,
)

SWAKS = shutil.which("swaks")


@pytest.fixture
def require_swaks() -> None:
    """A missing tool must fail the run, not skip it: scripts/test.sh installs it."""
    if SWAKS is None:
        pytest.fail("swaks is not installed (scripts/test.sh installs it)")


needs_swaks = pytest.mark.usefixtures("require_swaks")


def sample(subject: str) -> bytes:
    return (f"From: Sender <sender@example.net>\r\n"
            f"To: Alice <alice@example.com>\r\n"
            f"Subject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@example.net>\r\n"
            f"\r\n"
            f"Hello Alice,\r\n"
            f"this is {subject}.\r\n").encode()


@pytest.fixture
async def tls_mta(tmp_path: Path):
    async with MTA(make_config(tmp_path, smtpd_use_tls=True)) as server:
        yield server


# ---------------------------------------------------------------------- smtplib


async def test_smtplib_plain(mta: MTA, config) -> None:
    host, port = smtp_address(mta)
    data = sample("smtplib plain")
    result = await asyncio.to_thread(smtplib_send, host, port, "sender@example.net",
                                     ["alice@example.com"], data)
    code, text = result["data_reply"]
    assert code == 250 and text.startswith("2.0.0 Ok: queued as ")
    qid = queued_id(text)
    [stored] = await wait_maildir(config.mail_dir, "alice/")
    _, rest = split_delivered(stored)
    assert rest == lf(data)
    received = our_received(stored)
    assert f"with ESMTP id {qid}" in received
    assert "version=" not in received


async def test_smtplib_starttls(tls_mta: MTA) -> None:
    host, port = smtp_address(tls_mta)
    data = sample("smtplib starttls")
    result = await asyncio.to_thread(smtplib_send, host, port, "sender@example.net",
                                     ["alice@example.com"], data, starttls=True)
    qid = queued_id(result["data_reply"][1])
    [stored] = await wait_maildir(tls_mta.config.mail_dir, "alice/")
    assert split_delivered(stored)[1] == lf(data)
    received = our_received(stored)
    cipher = result["tls_cipher"]
    assert f"with ESMTPS id {qid}" in received
    assert (f"(version={result['tls_version']} cipher={cipher[0]} bits={cipher[2]})"
            in received), received


async def test_smtplib_send_message_to_maildir_and_mbox(mta: MTA, config) -> None:
    msg = EmailMessage()
    msg["From"] = "sender@example.net"
    msg["To"] = "alice@example.com, bob@example.com"
    msg["Subject"] = "two recipients"
    msg.set_content("One copy each, please.\n")
    host, port = smtp_address(mta)

    def send() -> dict:
        import smtplib
        with smtplib.SMTP(host, port, local_hostname="client.example.net", timeout=10) as s:
            return s.send_message(msg)

    refused = await asyncio.to_thread(send)
    assert refused == {}
    [in_maildir] = await wait_maildir(config.mail_dir, "alice/")
    [in_mbox] = await wait_mbox(config.mail_dir, "bob")
    for stored, rcpt in ((in_maildir, "alice@example.com"), (in_mbox, "bob@example.com")):
        added, rest = split_delivered(stored)
        assert added[:2] == [b"Return-Path: <sender@example.net>",
                             f"Delivered-To: {rcpt}".encode()]
        assert b"Subject: two recipients\n" in rest
        assert rest.endswith(b"\n\nOne copy each, please.\n")
        assert " for <" not in our_received(stored)  # two recipients: no "for" clause
    assert our_received(in_maildir) == our_received(in_mbox)  # one queued message


# ---------------------------------------------------------------------- aiosmtplib


@pytest.mark.parametrize("starttls", [False, True], ids=["plain", "starttls"])
async def test_aiosmtplib(tmp_path: Path, starttls: bool) -> None:
    config = make_config(tmp_path, smtpd_use_tls=starttls)
    async with MTA(config) as mta:
        host, port = smtp_address(mta)
        smtp = aiosmtplib.SMTP(hostname=host, port=port, local_hostname="aio.example.net",
                               start_tls=starttls, tls_context=client_tls_context()
                               if starttls else None, timeout=5)
        await smtp.connect()
        try:
            assert smtp.is_ehlo_or_helo_needed or smtp.supports_extension("pipelining")
            tls_obj = smtp.transport.get_extra_info("ssl_object")
            assert (tls_obj is not None) == starttls
            data = sample(f"aiosmtplib {'tls' if starttls else 'plain'}")
            errors, text = await smtp.sendmail("sender@example.net", ["alice@example.com"],
                                               data)
        finally:
            await smtp.quit()
        assert errors == {}
        qid = queued_id(text)
        [stored] = await wait_maildir(config.mail_dir, "alice/")
        assert split_delivered(stored)[1] == lf(data)
        received = our_received(stored)
        assert received.startswith(
            f"Received: from aio.example.net ({client_name()} [127.0.0.1])"), received
        if starttls:
            assert isinstance(tls_obj, ssl.SSLObject)
            cipher = tls_obj.cipher()
            assert f"with ESMTPS id {qid}" in received
            assert f"(version={tls_obj.version()} cipher={cipher[0]} bits={cipher[2]})" \
                in received
        else:
            assert f"with ESMTP id {qid}" in received


async def test_asyncio_streams_starttls_then_ehlo_at_once(tls_mta: MTA) -> None:
    """A client that writes EHLO the moment its side of the TLS handshake is done (what
    aiosmtplib and any asyncio client do): with TLS 1.3 the EHLO reaches the server together
    with the client's Finished message, before the server's start_tls() has returned."""
    host, port = smtp_address(tls_mta)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        assert (await reader.readline()).startswith(b"220 ")
        writer.write(b"EHLO streams.example.net\r\n")
        while not (line := await reader.readline()).startswith(b"250 "):
            assert line.startswith(b"250-")
        writer.write(b"STARTTLS\r\n")
        assert (await reader.readline()).startswith(b"220 ")
        await writer.start_tls(client_tls_context())
        writer.write(b"EHLO streams.example.net\r\n")
        await writer.drain()
        first = await asyncio.wait_for(reader.readline(), 3)
        assert first.startswith(b"250-mx.example.com"), first
    finally:
        writer.close()


async def test_aiosmtplib_send_helper_many_messages_one_connection(mta: MTA, config) -> None:
    host, port = smtp_address(mta)
    async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=10) as smtp:
        qids = []
        for i in range(5):
            _, text = await smtp.sendmail("sender@example.net", ["alice@example.com"],
                                          sample(f"message {i}"))
            qids.append(queued_id(text))
    assert len(set(qids)) == 5
    stored = await wait_maildir(config.mail_dir, "alice/", 5)
    subjects = sorted(next(line for line in m.split(b"\n") if line.startswith(b"Subject:"))
                      for m in stored)
    assert subjects == [f"Subject: message {i}".encode() for i in range(5)]


# ---------------------------------------------------------------------- swaks


async def _swaks(mta: MTA, *extra: str) -> str:
    host, port = smtp_address(mta)
    assert SWAKS is not None
    rc, out, err = await run_subprocess(
        SWAKS, "--server", f"{host}:{port}", "--helo", "swaks.example.net",
        "--from", "sender@example.net", "--to", "alice@example.com",
        "--header", "Subject: from swaks", "--body", "swaks body line\n.dot line\n",
        "--timeout", "20", *extra)
    assert rc == 0, out + err
    return out


@needs_swaks
async def test_swaks_plain(mta: MTA, config) -> None:
    out = await _swaks(mta)
    qid = queued_id(out)
    [stored] = await wait_maildir(config.mail_dir, "alice/")
    received = our_received(stored)
    assert received.startswith(
        f"Received: from swaks.example.net ({client_name()} [127.0.0.1])"), received
    assert f"with ESMTP id {qid}" in received
    _, rest = split_delivered(stored)
    assert b"Subject: from swaks\n" in rest
    # swaks ends the body with its own extra line break; the dot line arrives un-stuffed
    assert b"\n\nswaks body line\n.dot line\n" in rest, rest


@needs_swaks
async def test_swaks_starttls(tls_mta: MTA) -> None:
    out = await _swaks(tls_mta, "--tls")
    assert "STARTTLS" in out
    qid = queued_id(out)
    [stored] = await wait_maildir(tls_mta.config.mail_dir, "alice/")
    received = our_received(stored)
    assert f"with ESMTPS id {qid}" in received
    assert "(version=TLSv1." in received and " cipher=" in received


@needs_swaks
async def test_swaks_pipelining(mta: MTA, config) -> None:
    out = await _swaks(mta, "--pipeline")
    qid = queued_id(out)
    [stored] = await wait_maildir(config.mail_dir, "alice/")
    assert f"id {qid}" in our_received(stored)
