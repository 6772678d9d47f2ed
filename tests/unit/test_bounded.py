"""``pymta.bounded``: a call into an adapter under the framework's time limit behaves exactly
like ``await`` under ``asyncio.timeout``, and arms no timer when it never waits."""

from __future__ import annotations

import asyncio

import pytest

from pymta.bounded import bounded


async def answer(value: int, waits: int = 0) -> int:
    for _ in range(waits):
        await asyncio.sleep(0)
    return value


async def fail(waits: int) -> int:
    for _ in range(waits):
        await asyncio.sleep(0.001)
    raise LookupError("from the adapter")


async def test_results_and_exceptions_pass_through() -> None:
    assert await bounded(answer(1), 1.0) == 1
    assert await bounded(answer(2, waits=3), 1.0) == 2
    for waits in (0, 2):
        with pytest.raises(LookupError, match="from the adapter"):
            await bounded(fail(waits), 1.0)


async def test_an_answer_without_waiting_arms_no_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_timer(delay: float | None) -> None:
        raise AssertionError("a timer was armed")

    monkeypatch.setattr(asyncio, "timeout", no_timer)
    assert await bounded(answer(3), 0.0) == 3       # even a zero limit: it never waited


async def test_a_hanging_call_is_cancelled_at_the_limit() -> None:
    seen: list[str] = []

    async def hang() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise
        finally:
            seen.append("cleaned up")

    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(TimeoutError):
        await bounded(hang(), 0.05)
    assert 0.04 <= loop.time() - start < 2
    assert seen == ["cancelled", "cleaned up"]


async def test_a_cancelled_caller_cancels_the_call() -> None:
    entered, seen = asyncio.Event(), []

    async def hang() -> None:
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    task = asyncio.create_task(bounded(hang(), 10.0))
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == ["cancelled"]


async def test_a_call_that_handles_the_cancellation_gives_its_answer() -> None:
    """As under ``asyncio.timeout``: a coroutine that catches the cancellation and returns
    gives its answer; one that lets it through is a time-out."""

    async def stubborn(swallow: bool) -> int:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            await asyncio.sleep(0)
            if not swallow:
                raise
            return 7
        return 0

    assert await bounded(stubborn(True), 0.02) == 7
    with pytest.raises(TimeoutError):
        await bounded(stubborn(False), 0.02)


async def test_any_awaitable_works() -> None:
    """A lookup written as a plain ``def`` returning a future is bounded too."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[int] = loop.create_future()
    loop.call_soon(done.set_result, 5)
    assert await bounded(done, 1.0) == 5
    with pytest.raises(TimeoutError):
        await bounded(loop.create_future(), 0.02)
