"""Helpers for the protocol-defence integration tests (smuggling, pipelining, limits, BDAT,
STARTTLS): a byte collector that survives the server closing mid-send, reply parsing, and
checks on what reached the queue and the mailboxes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sqlite3

from pymta.config.model import Config
from tests.conftest import RawClient, maildir_messages, wait_for

REPLY_RE = re.compile(rb"^(\d{3})([ -])(?:(\d\.\d{1,3}\.\d{1,3}) )?(.*)$")

# A complete second transaction an attacker hopes the server reads as commands.
SMUGGLED = (b"MAIL FROM:<attacker@evil.test>\r\n"
            b"RCPT TO:<postmaster@example.com>\r\n"
            b"DATA\r\n"
            b"From: <ceo@example.com>\r\n"
            b"Subject: smuggled\r\n"
            b"\r\n"
            b"SMUGGLED-PAYLOAD\r\n"
            b".\r\n")

OUTER = b"From: <a@sender.test>\r\nSubject: outer\r\n\r\nouter body"


class Collector:
    """Reads everything the server sends until EOF, in the background.

    ``RawClient.reply`` cannot be used once the server may reset the connection (an
    ``asyncio.StreamReader`` with an exception set hides the bytes it has buffered), so attack
    steps that can make the server close collect its output as it arrives.
    """

    def __init__(self, client: RawClient) -> None:
        self.client = client
        self.data = bytearray()
        self.error: BaseException | None = None
        self.done = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            while True:
                chunk = await self.client.reader.read(65536)
                if not chunk:
                    break
                self.data += chunk
        except (ConnectionError, OSError) as exc:
            self.error = exc
        finally:
            self.done.set()

    async def send(self, data: bytes) -> bool:
        """Send, ignoring a connection the server already closed; False when it was."""
        if self.done.is_set():
            return False
        try:
            self.client.writer.write(data)
            await self.client.writer.drain()
        except (ConnectionError, OSError):
            return False
        return True

    async def eof(self, timeout: float = 3.0) -> bool:
        """True when the server closed the connection within ``timeout``."""
        try:
            await asyncio.wait_for(self.done.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def replies(self) -> list[tuple[int, str, str]]:
        return parse_replies(bytes(self.data))

    async def wait_replies(self, count: int, timeout: float = 3.0) -> list[tuple[int, str, str]]:
        await wait_for(lambda: len(self.replies()) >= count or self.done.is_set(), timeout)
        return self.replies()

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


def parse_replies(data: bytes) -> list[tuple[int, str, str]]:
    """Complete replies in ``data`` as (code, enhanced code or "", text of the last line)."""
    out = []
    for line in data.split(b"\r\n")[:-1]:
        m = REPLY_RE.match(line)
        assert m, f"malformed reply line {line!r} in {data!r}"
        if m.group(2) == b" ":
            out.append((int(m.group(1)), (m.group(3) or b"").decode(), m.group(4).decode()))
    return out


def codes(replies: list[tuple[int, str, str]]) -> list[tuple[int, str]]:
    return [(code, enh) for code, enh, _ in replies]


async def open_session(host: str, port: int, helo: str = "client.example.net") -> RawClient:
    """Connect, read the greeting and say EHLO."""
    client = await RawClient.connect(host, port)
    code, text = await client.reply()
    assert code == 220, text
    code, text = await client.cmd(f"EHLO {helo}")
    assert code == 250, text
    return client


async def greet(client: RawClient, helo: str = "client.example.net") -> str:
    code, text = await client.reply()
    assert code == 220, text
    code, text = await client.cmd(f"EHLO {helo}")
    assert code == 250, text
    return text


async def start_mail(client: RawClient, sender: str = "a@sender.test",
                     rcpts: tuple[str, ...] = ("alice@example.com",)) -> None:
    code, text = await client.cmd(f"MAIL FROM:<{sender}>")
    assert (code, text[4:9]) == (250, "2.1.0"), text
    for rcpt in rcpts:
        code, text = await client.cmd(f"RCPT TO:<{rcpt}>")
        assert (code, text[4:9]) == (250, "2.1.5"), text


async def send_message(client: RawClient, body: bytes = b"Subject: ok\r\n\r\nfine\r\n",
                       sender: str = "a@sender.test",
                       rcpts: tuple[str, ...] = ("alice@example.com",)) -> str:
    """A complete, well-formed DATA transaction on an EHLO'd session; the 250 text."""
    await start_mail(client, sender, rcpts)
    code, text = await client.cmd("DATA")
    assert code == 354, text
    code, text = await client.cmd(body + b".\r\n")
    assert (code, text[4:9]) == (250, "2.0.0"), text
    return text


def queue_listing(config: Config) -> dict[str, list[str]]:
    """The queue as files, whichever store holds it: ``env`` the queued messages, ``data``
    the stored bodies, ``tmp`` what a message being received left behind. For the SQLite
    store: the rows of ``queue.db`` (read-only), ``data/`` (large bodies) and the rows with
    an inline body, and the reused spool files that are not empty."""
    root = os.path.join(config.state_dir, "queue")
    database = os.path.join(root, "queue.db")
    if not os.path.exists(database):
        out = {}
        for sub in ("env", "data", "tmp"):
            path = os.path.join(root, sub)
            out[sub] = sorted(os.listdir(path)) if os.path.isdir(path) else []
        return out
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        rows = db.execute("SELECT qid, body IS NOT NULL FROM messages").fetchall()
    data_dir, spool_dir = os.path.join(root, "data"), os.path.join(root, "spool")
    files = os.listdir(data_dir) if os.path.isdir(data_dir) else []
    spools = os.listdir(spool_dir) if os.path.isdir(spool_dir) else []
    return {"env": sorted(qid for qid, _ in rows),
            "data": sorted(files + [qid for qid, inline in rows if inline]),
            "tmp": sorted(name for name in spools
                          if os.path.getsize(os.path.join(spool_dir, name)) > 0)}


def mail_files(config: Config) -> list[str]:
    """Every file under the mail directory (maildir tmp/new/cur, mbox files)."""
    found = []
    for dirpath, _dirs, files in os.walk(config.mail_dir):
        found += [os.path.join(dirpath, f) for f in files]
    return sorted(found)


def assert_nothing_accepted(config: Config) -> None:
    """No message was committed: none in the queue, no spool file left, none delivered.

    A committed message is always either in ``env/`` or already in a mailbox (the envelope
    goes only after delivery), so checking both at one instant is conclusive.
    """
    listing = queue_listing(config)
    assert listing == {"env": [], "data": [], "tmp": []}, listing
    assert mail_files(config) == []


def all_delivered_text(config: Config) -> bytes:
    out = b""
    for path in mail_files(config):
        with open(path, "rb") as f:
            out += f.read()
    return out


async def wait_delivered(config: Config, box: str, count: int = 1) -> list[bytes]:
    await wait_for(lambda: len(maildir_messages(config.mail_dir, box)) >= count
                   and maildir_messages(config.mail_dir, box), timeout=5.0)
    await asyncio.sleep(0.1)  # let a surplus delivery show up before the caller counts
    return maildir_messages(config.mail_dir, box)


def content_after_received(stored: bytes) -> bytes:
    """What the client sent, as stored (LF line ends): everything after our Received field."""
    start = stored.index(b"Received: from ")
    lines = stored[start:].split(b"\n")
    i = 1
    while i < len(lines) and lines[i][:1] in (b"\t", b" "):
        i += 1
    return b"\n".join(lines[i:])


def our_received(stored: bytes) -> str:
    start = stored.index(b"Received: from ")
    lines = stored[start:].split(b"\n")
    field = [lines[0]]
    for line in lines[1:]:
        if line[:1] not in (b"\t", b" "):
            break
        field.append(line)
    return " ".join(part.strip().decode() for part in field)


async def queue_drained(config: Config) -> None:
    await wait_for(lambda: queue_listing(config)["env"] == [], timeout=5.0)
