"""The framework's time limit on a call into an adapter, at no cost when the call does not wait.

Every call the core makes into an adapter (a recipient lookup, a check) runs under a time
limit (architecture rule 5). ``asyncio.timeout`` arms a timer for each call, about 4 µs with
uvloop: on the accept path, where most recipient lookups are answered from a table or a
cache without ever waiting, that was the largest cost issue 11 added per message. So
:func:`bounded` first runs the coroutine up to its first suspension; one that finishes without
suspending needs no timer (it cannot hang: it never gave the event loop a chance to make it
wait). Only one that suspends is finished under ``asyncio.timeout``, exactly as if it had
been awaited under it from the start (its first step took no time the limit could see).

:func:`step` is that first step on its own, for a caller that wants to know whether a
coroutine needs a task at all (the lookup chain shares a resolution between concurrent
callers only when it has to wait).
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import Awaitable, Coroutine, Generator
from typing import Any, TypeVar, cast

T = TypeVar("T")


async def bounded(coro: Awaitable[T], timeout: float) -> T:
    """``await coro``, raising TimeoutError if it takes longer than ``timeout`` seconds (the
    coroutine is then cancelled, as with ``asyncio.timeout``). Exceptions of ``coro`` pass
    through unchanged. Any awaitable works; only a native coroutine gets the fast path (an
    adapter may return a future or a compiled coroutine from a plain ``def``)."""
    if type(coro) is not types.CoroutineType:
        async with asyncio.timeout(timeout):
            return await coro
    native = cast("Coroutine[Any, Any, T]", coro)
    try:
        first = native.send(None)
    except StopIteration as done:
        return done.value       # answered at once: nothing could hang
    async with asyncio.timeout(timeout):
        return await _resume(native, first)


def step(coro: Coroutine[Any, Any, T]) -> tuple[bool, Any]:
    """Run a native coroutine up to its first suspension: ``(True, result)`` when it finished
    without suspending, else ``(False, rest)``, ``rest`` a coroutine that finishes it when
    awaited (or run as a task). Exceptions of ``coro``'s first step propagate."""
    try:
        first = coro.send(None)
    except StopIteration as done:
        return True, done.value
    return False, _finish(coro, first)


async def _finish(coro: Coroutine[Any, Any, T], pending: Any) -> T:
    return await _resume(coro, pending)


@types.coroutine
def _resume(coro: Coroutine[Any, Any, T], pending: Any) -> Generator[Any, Any, T]:
    """Finish ``coro``, suspended on ``pending`` (what it yielded to the task), as ``await``
    would: what the task sends or throws (a cancellation) goes into the coroutine."""
    while True:
        try:
            received = yield pending
        except BaseException as exc:  # noqa: BLE001 - not caught: thrown into the coroutine
            try:
                pending = coro.throw(exc)
            except StopIteration as done:
                return done.value
            continue
        try:
            pending = coro.send(received)
        except StopIteration as done:
            return done.value
