"""The programs in ``examples/`` run as a user runs them (issue 11, item 5): with the project's
Python, from a directory of their own, over real SMTP. The test command runs these, so an
example that stops working fails the tests instead of misleading its next reader."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiosmtplib
import pytest

EMBED = Path(__file__).resolve().parents[2] / "examples" / "embed.py"
TIMEOUT = 30.0
TICKET = (b"From: alice@example.net\r\nTo: 42@tickets.example.com\r\n"
          b"Subject: printer on fire\r\n\r\nIt is the one on the second floor.\r\n")


class Example:
    """``examples/embed.py`` as a subprocess; its stdout read line by line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []

    async def line(self) -> str:
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), TIMEOUT)
        assert raw, f"the example exited early: {await self.stderr()}"
        self.lines.append(raw.decode().rstrip("\n"))
        return self.lines[-1]

    async def port(self) -> int:
        m = re.fullmatch(r"help desk listening on 127\.0\.0\.1:(\d+)", await self.line())
        assert m, self.lines
        return int(m.group(1))

    async def stderr(self) -> str:
        assert self.proc.stderr is not None
        return (await self.proc.stderr.read()).decode(errors="replace")

    async def exit_status(self) -> int:
        return await asyncio.wait_for(self.proc.wait(), TIMEOUT)


Start = Callable[..., Awaitable[Example]]


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Start]:
    procs: list[asyncio.subprocess.Process] = []

    async def run(*args: str) -> Example:
        env = {k: v for k, v in os.environ.items() if k != "PORT"}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(EMBED), *args, cwd=tmp_path, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        procs.append(proc)
        return Example(proc)

    yield run
    for proc in procs:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def send(port: int, rcpt: str, data: bytes = TICKET) -> None:
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False,
                               timeout=10) as smtp:
        errors, _ = await smtp.sendmail("alice@example.net", [rcpt], data)
    assert errors == {}


async def rcpt_code(port: int, rcpt: str) -> int:
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False,
                               timeout=10) as smtp:
        await smtp.ehlo()
        await smtp.mail("alice@example.net")
        try:
            return (await smtp.rcpt(rcpt)).code
        except aiosmtplib.SMTPRecipientRefused as exc:
            return exc.code


async def test_issue11_embed_example_hands_a_ticket_to_the_application(start: Start,
                                                                       tmp_path: Path) -> None:
    example = await start("--port", "0", "--once")
    port = await example.port()
    assert await rcpt_code(port, "nobody@example.com") == 550      # not staff, not a ticket
    assert await rcpt_code(port, "someone@example.net") == 554     # no relaying for anyone
    assert await rcpt_code(port, "help@example.com") == 250        # the dict
    await send(port, "42@tickets.example.com")                       # the coroutine
    assert await example.line() == "ticket from alice@example.net: printer on fire"
    assert await example.line() == "help desk stopped"
    assert await example.exit_status() == 0
    assert "Traceback" not in await example.stderr()
    assert list(tmp_path.iterdir()) == []       # nothing written where it was started


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_issue11_embed_example_stops_cleanly_on_a_signal(start: Start,
                                                               sig: signal.Signals) -> None:
    example = await start("--port", "0")
    port = await example.port()
    await send(port, "help@example.com")
    assert await example.line() == "ticket from alice@example.net: printer on fire"
    example.proc.send_signal(sig)
    assert await example.line() == "help desk stopped"
    assert await example.exit_status() == 0
    assert "Traceback" not in await example.stderr()


async def test_embed_example_names_a_bad_port_without_a_traceback(start: Start) -> None:
    example = await start("--port", "70000")
    assert await example.exit_status() == 1
    err = await example.stderr()
    assert "PYMTA_SMTP_LISTEN: not a port number" in err and "Traceback" not in err
