"""The benchmark load generator counts what the server answered, message by message.

These run the generator against the in-process sink over loopback. No timings are asserted:
on a shared machine they would only make the suite flaky; numbers belong in benchmarks/.
"""

from __future__ import annotations

import asyncio
import email
import socket

import pytest

from benchmarks.loadgen import make_message, run_load
from benchmarks.sink import SinkReplies, start_sink


@pytest.mark.parametrize("size", [1, 200, 4096, 65536 + 17])
def test_make_message_is_valid_and_exact(size: int) -> None:
    msg = make_message(size, "a@x.test", "box@example.com")
    header_len = msg.index(b"\r\n\r\n") + 4
    assert len(msg) == max(size, header_len)
    assert msg.endswith(b"\r\n")
    lines = msg.split(b"\r\n")[:-1]
    assert b"\n" not in b"".join(lines) and b"\r" not in b"".join(lines)
    assert all(len(line) <= 76 for line in lines[lines.index(b"") + 1:])
    assert not any(line.startswith(b".") for line in lines)
    parsed = email.message_from_bytes(msg)
    assert parsed["To"] == "<box@example.com>"
    assert parsed["Message-ID"]


@pytest.mark.parametrize("pipelining", [True, False])
async def test_counts_every_accepted_message(pipelining: bool) -> None:
    server, stats, port = await start_sink()
    async with server:
        result = await run_load(
            "127.0.0.1", port, sessions=4, messages=22, per_session=3, size=4096,
            pipelining=pipelining,
        )
    assert (result.messages, result.accepted, result.failed, result.errors) == (22, 22, 0, 0)
    assert stats.messages == 22
    assert stats.connections == 8  # ceil(22 / 3) sessions of up to 3 messages
    assert result.pipelining_used is pipelining
    assert result.p50_ms <= result.p99_ms
    assert result.msgs_per_s > 0


async def test_rcpt_rejection_is_counted_as_permanent_failure() -> None:
    replies = SinkReplies(rcpt=b"550 5.1.1 No such user\r\n")
    server, stats, port = await start_sink(replies=replies)
    async with server:
        result = await run_load("127.0.0.1", port, sessions=3, messages=9, per_session=2)
    assert (result.accepted, result.perm_failed, result.temp_failed) == (0, 9, 0)
    assert stats.messages == 0


async def test_end_of_data_deferral_is_counted_as_temporary_failure() -> None:
    replies = SinkReplies(data_end=b"451 4.3.0 Try later\r\n")
    server, _, port = await start_sink(replies=replies)
    async with server:
        result = await run_load(
            "127.0.0.1", port, sessions=2, messages=5, pipelining=False
        )
    assert (result.accepted, result.temp_failed, result.perm_failed) == (0, 5, 0)


async def test_refused_connections_are_errors_and_the_run_ends() -> None:
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = await asyncio.wait_for(
        run_load("127.0.0.1", port, sessions=3, messages=7, timeout=2.0), 10.0
    )
    assert (result.accepted, result.errors) == (0, 7)
