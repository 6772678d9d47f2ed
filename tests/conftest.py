"""Shared fixtures: an in-process pymta server on ephemeral loopback ports, and a raw client.

Servers run in the test's own event loop (``pymta.MTA`` is a library first); tests that need
a separate process (SIGKILL, CLI) start ``python -m pymta serve`` themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pymta.app import MTA
from pymta.config.model import Config, ListenAddress

DOMAIN = "example.com"


@functools.cache
def _test_dkim_key() -> str:
    """One RSA DKIM key per test session, given as DKIM_PRIVATEKEY to every test server: a
    server without one generates a 2048-bit key per domain at start (~65 ms each). Tests of
    key generation pass ``dkim_private_key=""``."""
    from pymta.pipeline.dkimkeys import generate_key, private_pem

    return private_pem(generate_key("rsa", 2048)).decode("ascii")


def make_config(tmp_path: Path, **overrides: object) -> Config:
    base = Config(
        hostname="mx.example.com",
        mail_domain=(DOMAIN, "example.org"),
        mail_boxes=("alice@example.com:alice/ bob@example.com:bob "
                    "postmaster@example.com:postmaster/"),
        mail_aliases="team:alice,bob@example.com",
        smtp_listen=(ListenAddress("127.0.0.1", 0),),
        submission_listen=(ListenAddress("127.0.0.1", 0),),
        submissions_listen=(ListenAddress("127.0.0.1", 0),),
        state_dir=str(tmp_path / "state"),
        mail_dir=str(tmp_path / "mail"),
        queue_retry_first=0.2,
        queue_retry_max=0.5,
        syslog_level=7,
        dkim_private_key=_test_dkim_key(),
    )
    return dataclasses.replace(base, **overrides)


def load_checked(environ: dict[str, str]) -> Config:
    """``load_config`` and then the adapters' own checks (``pymta.wiring.check``): what
    ``pymta check-config`` and ``pymta serve`` do with the environment."""
    from pymta import wiring
    from pymta.config.load import load_config

    config = load_config(environ)
    wiring.check(config)
    return config


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return make_config(tmp_path)


@pytest.fixture
async def mta(config: Config) -> AsyncIterator[MTA]:
    async with MTA(config) as server:
        yield server


class RawClient:
    """A byte-level SMTP client for attack tests: sends exactly what it is given."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, host: str, port: int) -> RawClient:
        reader, writer = await asyncio.open_connection(host, port)
        client = cls(reader, writer)
        return client

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def reply(self, timeout: float = 5.0) -> tuple[int, str]:
        """Read one (possibly multi-line) reply: (code, full text)."""
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout)
            if not line:
                raise ConnectionError("connection closed; got " + repr(lines))
            lines.append(line.decode("utf-8", "replace"))
            if len(line) < 4 or line[3:4] != b"-":
                break
        return int(lines[-1][:3]), "".join(lines)

    async def cmd(self, line: str | bytes) -> tuple[int, str]:
        data = line if isinstance(line, bytes) else line.encode() + b"\r\n"
        await self.send(data)
        return await self.reply()

    async def closed(self, timeout: float = 5.0) -> bool:
        """True when the server closed the connection (EOF) within the timeout."""
        try:
            rest = await asyncio.wait_for(self.reader.read(), timeout)
        except (TimeoutError, ConnectionError):
            return False
        return rest == b"" or self.reader.at_eof()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


@pytest.fixture
async def client_factory(mta: MTA):
    clients: list[RawClient] = []

    async def factory(kind: str = "smtp") -> RawClient:
        host, port = mta.addresses[kind][0]
        client = await RawClient.connect(host, port)
        clients.append(client)
        return client

    yield factory
    for c in clients:
        await c.close()


def maildir_messages(mail_dir: str, mailbox: str) -> list[bytes]:
    new = os.path.join(mail_dir, mailbox, "new")
    if not os.path.isdir(new):
        return []
    out = []
    for name in sorted(os.listdir(new)):
        with open(os.path.join(new, name), "rb") as f:
            out.append(f.read())
    return out


async def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05):
    """Poll until predicate() is truthy; returns its value or fails the test."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)
