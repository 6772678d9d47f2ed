"""The outbound client's pieces that need no peer: the streamed body, DATA transparency across
pieces, and the host state the worker processes share (issue 15, items 5 and 6)."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pymta.delivery import body as body_module
from pymta.delivery.body import PIECE, STREAM_OVER, load_body
from pymta.delivery.hoststate import HostState
from pymta.delivery.smtpclient import DotStuffer
from pymta.queue.ids import QueueIdGenerator
from pymta.types import Envelope, QueuedMessage, Recipient, Reply


def _message(tmp_path: Path, data: bytes, prepend: str = "") -> QueuedMessage:
    path = tmp_path / "body"
    path.write_bytes(data)
    env = Envelope(sender="a@example.org", recipients=[Recipient("b@example.net", "b@example.net")],
                   received_at=0.0, next_attempt=0.0, prepend=prepend)
    return QueuedMessage(QueueIdGenerator()(), env, str(path))


def _collect(body: body_module.OutgoingBody) -> list[bytes]:
    async def run() -> list[bytes]:
        return [piece async for piece in body.pieces()]
    return asyncio.run(run())


def test_issue15_a_large_body_is_streamed_in_pieces_with_its_prepended_fields(
        tmp_path: Path) -> None:
    data = b"Subject: big\r\n\r\n" + b"x" * 76 + b"\r\n"
    data = data * (3 * STREAM_OVER // len(data))
    body = load_body(_message(tmp_path, data, "X-Pre: 1\r\n"))
    assert body.streamed and body.size == len(data) + len(b"X-Pre: 1\r\n")
    assert not body.eight_bit
    pieces = _collect(body)
    assert b"".join(pieces) == b"X-Pre: 1\r\n" + data
    assert max(len(p) for p in pieces) <= PIECE + len(b"X-Pre: 1\r\n")


def test_issue15_an_8bit_byte_far_into_a_streamed_body_is_found(tmp_path: Path) -> None:
    data = b"Subject: big\r\n\r\n" + b"y" * (2 * STREAM_OVER) + "é\r\n".encode()
    body = load_body(_message(tmp_path, data))
    assert body.streamed and body.eight_bit
    assert body.converted_to_7bit().whole().isascii()


def test_issue15_a_small_body_stays_in_memory(tmp_path: Path) -> None:
    body = load_body(_message(tmp_path, b"Subject: s\r\n\r\nhi\r\n"))
    assert not body.streamed and _collect(body) == [b"Subject: s\r\n\r\nhi\r\n"]


@given(st.lists(st.sampled_from([b".", b"\r\n", b"a", b"..", b"\r", b"\n"]), max_size=30),
       st.data())
def test_issue15_dot_stuffing_is_the_same_whatever_the_pieces(parts: list[bytes],
                                                               data: st.DataObject) -> None:
    whole = b"".join(parts)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(whole)), max_size=5)))
    stuffer = DotStuffer()
    out = b""
    start = 0
    for cut in [*cuts, len(whole)]:
        out += stuffer.feed(whole[start:cut])
        start = cut
    out += stuffer.end()
    whole_stuffer = DotStuffer()
    assert out == whole_stuffer.feed(whole) + whole_stuffer.end()
    # and what a peer that ends lines at LF reads back is the message (last line closed)
    payload = out[:-3]
    lines = payload.split(b"\n")
    unstuffed = b"\n".join(line[1:] if line.startswith(b".") else line for line in lines)
    expected = whole if not whole or whole.endswith(b"\r\n") else whole + b"\r\n"
    assert unstuffed == expected


def test_issue15_dead_hosts_are_seen_by_another_worker_and_flushed_for_all(
        tmp_path: Path) -> None:
    one, two = HostState(tmp_path), HostState(tmp_path)
    one.mark_dead("192.0.2.1", 25, Reply(451, "4.4.1", "connect to x: refused"), 60)
    seen = two.dead("192.0.2.1", 25)
    assert seen is not None and seen.enhanced == "4.4.1" and "refused" in seen.text
    assert two.dead("192.0.2.1", 26) is None
    two.forget_all()
    assert HostState(tmp_path).dead("192.0.2.1", 25) is None


def test_issue15_a_dead_host_is_forgotten_when_its_time_is_over(tmp_path: Path) -> None:
    now = [1000.0]
    state = HostState(tmp_path, clock=lambda: now[0])
    state.mark_dead("2001:db8::1", 25, Reply(451, "4.4.1", "timeout"), 10)
    assert state.dead("2001:db8::1", 25) is not None
    now[0] += 11
    assert state.dead("2001:db8::1", 25) is None
    assert not any(tmp_path.joinpath("dead").iterdir())


def _hold_slot(directory: str, held: multiprocessing.synchronize.Event,
               release: multiprocessing.synchronize.Event) -> None:
    async def run() -> None:
        async with HostState(directory).slot("smtp:example.net", 1):
            held.set()
            await asyncio.to_thread(release.wait, 30)
    asyncio.run(run())


def test_issue15_the_connection_limit_holds_across_processes(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    held, release = ctx.Event(), ctx.Event()
    other = ctx.Process(target=_hold_slot, args=(str(tmp_path), held, release))
    other.start()
    try:
        assert held.wait(30)

        async def take() -> float:
            started = time.monotonic()
            async with HostState(tmp_path).slot("smtp:example.net", 1):
                return time.monotonic() - started

        async def scenario() -> tuple[float, bool]:
            waiting = asyncio.ensure_future(take())
            await asyncio.sleep(0.5)
            blocked = not waiting.done()
            release.set()
            return await asyncio.wait_for(waiting, 30), blocked

        waited, blocked = asyncio.run(scenario())
        assert blocked and waited >= 0.5
    finally:
        release.set()
        other.join(30)


def test_issue15_a_slot_of_a_killed_worker_is_free_again(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    held, release = ctx.Event(), ctx.Event()
    other = ctx.Process(target=_hold_slot, args=(str(tmp_path), held, release))
    other.start()
    assert held.wait(30)
    os.kill(other.pid or 0, 9)
    other.join(30)

    async def take() -> None:
        async with HostState(tmp_path).slot("smtp:example.net", 1):
            pass

    asyncio.run(asyncio.wait_for(take(), 5))


@pytest.mark.parametrize("text", ["", "x", "12 abc", "nan"])
def test_issue15_a_damaged_dead_host_file_counts_as_not_dead(tmp_path: Path,
                                                             text: str) -> None:
    state = HostState(tmp_path)
    assert state.shared and not any(tmp_path.joinpath("dead").iterdir())
    (tmp_path / "dead" / "192.0.2.9@25").write_text(text)
    assert state.dead("192.0.2.9", 25) is None


def test_issue15_building_the_shared_state_writes_nothing(tmp_path: Path) -> None:
    HostState(tmp_path / "relay")
    assert not (tmp_path / "relay").exists()


def test_issue15_stale_files_are_swept_at_first_use(tmp_path: Path) -> None:
    """Expired dead hosts and slot files unused for a day are removed; a fresh slot file
    and a host still dead stay."""
    now = time.time()
    HostState(tmp_path).mark_dead("192.0.2.1", 25, Reply(451, "4.4.1", "x"), 60)
    HostState(tmp_path).mark_dead("192.0.2.2", 25, Reply(451, "4.4.1", "x"), 60)
    (tmp_path / "dead" / "192.0.2.2@25").write_text(f"{now - 1} 451 4.4.1 gone\n")
    old, fresh = tmp_path / "slots" / "aaaa.0", tmp_path / "slots" / "bbbb.0"
    old.touch()
    fresh.touch()
    os.utime(old, (now - 2 * 86400, now - 2 * 86400))
    assert HostState(tmp_path).shared
    assert sorted(p.name for p in (tmp_path / "dead").iterdir()) == ["192.0.2.1@25"]
    assert sorted(p.name for p in (tmp_path / "slots").iterdir()) == ["bbbb.0"]


def test_review_slot_files_stay_few_whatever_the_number_of_destinations(
        tmp_path: Path) -> None:
    """One open file per destination, a bounded number of them: a worker relaying to many
    domains must not run out of file descriptors."""
    state = HostState(tmp_path)

    async def run() -> None:
        for n in range(200):
            async with state.slot(f"smtp:d{n}.example", 20):
                pass

    before = len(os.listdir(f"/proc/{os.getpid()}/fd"))
    asyncio.run(run())
    assert len(os.listdir(f"/proc/{os.getpid()}/fd")) - before <= 64


def test_review_a_slot_file_swept_by_another_worker_is_opened_again(tmp_path: Path) -> None:
    state = HostState(tmp_path)

    async def take() -> None:
        async with state.slot("smtp:example.net", 2):
            pass

    asyncio.run(take())
    [path] = (tmp_path / "slots").iterdir()
    path.unlink()                 # what a later worker's sweep does to an idle file
    asyncio.run(take())
    assert path.exists()          # this worker uses the file the others now use


def test_review_a_waiting_taker_keeps_its_file_while_others_are_evicted(
        tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    held, release = ctx.Event(), ctx.Event()
    other = ctx.Process(target=_hold_slot, args=(str(tmp_path), held, release))
    other.start()
    try:
        assert held.wait(30)
        state = HostState(tmp_path)

        async def scenario() -> None:
            async def wait_for_slot() -> None:
                async with state.slot("smtp:example.net", 1):
                    pass

            waiter = asyncio.ensure_future(wait_for_slot())
            await asyncio.sleep(0.1)
            for n in range(100):          # more destinations than files kept open
                async with state.slot(f"smtp:d{n}.example", 1):
                    pass
            assert not waiter.done()
            release.set()
            await asyncio.wait_for(waiter, 30)

        asyncio.run(scenario())
    finally:
        release.set()
        other.join(30)
