"""A session's input memory is bounded per read (issue 14, memory while 50 clients stream
25 MB each): the event loop's own reads hand a protocol up to 256 KiB at a time, so the
listener reads into a buffer of ``READ_SIZE`` instead. A client that sends a whole message in
one go is still read in pieces no larger than that, and the message arrives intact."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pymta.app import MTA
from pymta.receiving import listener
from tests.conftest import RawClient, make_config
from tests.integration._support import maildir_bytes, wait_maildir


async def test_issue14_a_large_send_is_read_in_pieces_of_at_most_read_size(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sizes: list[int] = []
    feed = listener.SMTPServerProtocol.data_received

    def counted(self: listener.SMTPServerProtocol, data: bytes) -> None:
        sizes.append(len(data))
        feed(self, data)

    monkeypatch.setattr(listener.SMTPServerProtocol, "data_received", counted)
    body = b"".join(b"%07d " % i + b"x" * 70 + b"\r\n" for i in range(40_000))   # 3.2 MB
    message = b"Subject: one write\r\n\r\n" + body
    async with MTA(make_config(tmp_path)) as mta:
        host, port = mta.addresses["smtp"][0]
        client = await RawClient.connect(host, port)
        try:
            assert (await client.reply())[0] == 220
            for line in ("EHLO client.test", "MAIL FROM:<a@client.test>",
                         "RCPT TO:<alice@example.com>", "DATA"):
                code, text = await client.cmd(line)
                assert code < 400, text
            code, text = await asyncio.wait_for(client.cmd(message + b".\r\n"), 60)
            assert code == 250, text
        finally:
            await client.close()
        await wait_maildir(mta.config.mail_dir, "alice/", 1)
        stored = maildir_bytes(mta.config.mail_dir, "alice/")[0]
    assert stored.replace(b"\r\n", b"\n").endswith(body.replace(b"\r\n", b"\n"))
    assert sum(sizes) >= len(message)
    assert max(sizes) <= listener.READ_SIZE
