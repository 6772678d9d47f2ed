"""Issue 10: SIGUSR1 (``pymta queue flush``/``release``) reaching a worker process while it
starts must neither kill it (SIGUSR1's default action) nor be lost; issue 13: the same for
SIGHUP (reload), whose default action kills too.

A real fork through ``Supervisor._spawn``, with ``serve_async`` replaced by a stand-in whose
start-up waits until the test has sent the signal; pipes sequence the two processes, so no
timing is assumed.
"""

from __future__ import annotations

import asyncio
import os
import signal
from types import SimpleNamespace

import pytest

import pymta.app
from pymta.workers import Supervisor


def _read_byte(fd: int, timeout: float = 20.0) -> bytes:
    import select

    ready, _, _ = select.select([fd], [], [], timeout)
    return os.read(fd, 1) if ready else b""


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGHUP])
def test_issue10_sigusr1_during_worker_start_up_does_not_kill_it(monkeypatch,
                                                                 signum: int) -> None:
    started_r, started_w = os.pipe()
    go_r, go_w = os.pipe()
    flushed_r, flushed_w = os.pipe()

    async def serve_async(config: object, *, sockets: object, pid_file: bool,
                          reload_config: object = None) -> int:
        """Start-up that blocks (as loading lookups or keys does) until the test says go,
        then installs the real handler the way ``pymta.app.serve_async`` does."""
        os.write(started_w, b"s")
        os.read(go_r, 1)                    # SIGUSR1 arrives while we are in here
        loop = asyncio.get_running_loop()
        woken = asyncio.Event()
        loop.add_signal_handler(signum, woken.set)
        await asyncio.wait_for(woken.wait(), 10)    # the request made during start-up
        os.write(flushed_w, b"f")
        return 0

    monkeypatch.setattr(pymta.app, "serve_async", serve_async)
    monkeypatch.setattr(pymta.app, "install_uvloop", lambda: None)
    sup = Supervisor(SimpleNamespace())  # type: ignore[arg-type]
    sup.sockets = [{}]
    sup._spawn(0)
    [pid] = sup.children
    for fd in (started_w, go_r, flushed_w):   # the child's ends: EOF here if it dies
        os.close(fd)
    try:
        assert _read_byte(started_r) == b"s", "the worker did not start"
        os.kill(pid, signum)        # pymta queue flush or a reload, via the supervisor
        os.write(go_w, b"g")
        flushed = _read_byte(flushed_r)
        _, status = os.waitpid(pid, 0)
        pid = 0
        code = os.waitstatus_to_exitcode(status)
        assert code != -signum, "the signal killed the starting worker"
        assert code == 0
        assert flushed == b"f", "the flush requested during start-up was lost"
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        for fd in (started_r, go_w, flushed_r):
            os.close(fd)


def test_worker_start_up_still_stops_on_sigterm(monkeypatch) -> None:
    """The early SIGUSR1 handling leaves SIGTERM alone: a worker told to stop while it
    starts stops (the supervisor is shutting down)."""
    started_r, started_w = os.pipe()

    async def serve_async(config: object, *, sockets: object, pid_file: bool,
                          reload_config: object = None) -> int:
        os.write(started_w, b"s")
        await asyncio.sleep(30)
        return 0

    monkeypatch.setattr(pymta.app, "serve_async", serve_async)
    monkeypatch.setattr(pymta.app, "install_uvloop", lambda: None)
    sup = Supervisor(SimpleNamespace())  # type: ignore[arg-type]
    sup.sockets = [{}]
    sup._spawn(0)
    [pid] = sup.children
    try:
        assert _read_byte(started_r) == b"s"
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
        pid = 0
        assert os.waitstatus_to_exitcode(status) == -signal.SIGTERM
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(started_r)
        os.close(started_w)
