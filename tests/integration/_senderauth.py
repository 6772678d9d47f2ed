"""Shared helpers for the sender-authentication tests (SPF, DMARC, Authentication-Results):
an in-process MTA whose every DNS lookup goes to the test DNS server, and a raw SMTP
conversation from 127.0.0.1 that returns the final reply."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from pymta.app import MTA
from tests.conftest import RawClient, make_config
from tests.integration._support import maildir_bytes, wait_maildir
from tests.services.dns import DNSTestServer

HOSTNAME = "mx.example.com"


@contextlib.asynccontextmanager
async def auth_mta(tmp_path: Path, dns: DNSTestServer, **overrides: object,
                   ) -> AsyncIterator[MTA]:
    config = make_config(tmp_path, hostname=HOSTNAME, dns_resolver=(dns.resolver_spec,),
                         dns_timeout=1.0, **overrides)
    async with MTA(config) as mta:
        yield mta


def message(from_addr: str, subject: str = "test", extra: bytes = b"") -> bytes:
    return (f"From: {from_addr}\r\nTo: alice@example.com\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@client.test>\r\n").encode() + extra + (
        b"\r\nHello.\r\n")


async def send(mta: MTA, sender: str, data: bytes, *, rcpt: str = "alice@example.com",
               helo: str = "client.example.net") -> tuple[int, str]:
    """One message over SMTP; the reply to the end of data (or to the first refused step)."""
    host, port = mta.addresses["smtp"][0]
    client = await RawClient.connect(host, port)
    try:
        code, text = await client.reply()
        assert code == 220, text
        for line in (f"EHLO {helo}", f"MAIL FROM:<{sender}>", f"RCPT TO:<{rcpt}>", "DATA"):
            code, text = await client.cmd(line)
            if code >= 400:
                return code, text
        return await client.cmd(data + b".\r\n")
    finally:
        await client.close()


async def delivered(mta: MTA, box: str = "alice/") -> bytes:
    """The one message delivered to ``box``, CRLF as stored (maildir keeps LF: normalised)."""
    await wait_maildir(mta.config.mail_dir, box, 1)
    return maildir_bytes(mta.config.mail_dir, box)[0]


def header_block(stored: bytes) -> str:
    """The header section of a stored message, unfolded into one field per line."""
    text = stored.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0].decode()
    return text.replace("\n\t", " ").replace("\n ", " ")
