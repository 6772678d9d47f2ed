"""What the worker processes of one server share about next hops: dead hosts and the
per-destination connection limit (issue 15, item 6).

Postfix keeps both in its one queue manager. pymta's workers are peers with no coordinator,
so the shared state lives in small files under ``<state>/relay/`` that every worker reads:

- **Dead hosts**: ``dead/<ip>@<port>`` holds until when (wall clock) and the reply that killed
  it. A worker that finds a host dead skips it without a connection attempt, whichever worker
  saw it fail. Written by rename (a reader never sees half a file), never fsynced: it is a
  hint, and after a crash forgetting it is harmless. ``forget_all`` (``pymta queue flush``)
  removes them for every worker at once.
- **Connection slots**: ``slots/<hash of the destination>.<i>`` for i below the limit; a
  connection in use holds an ``flock`` on one of them. The kernel drops the lock when the
  holder closes it or dies, so a crashed worker never leaks a slot. A worker that finds every
  slot taken waits (polling, up to a quarter second apart): the limit is the server's, not
  each worker's.

Without a directory (a library user, a test) both live in this process only, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from pymta.types import Reply

log = logging.getLogger(__name__)

_POLL_FIRST = 0.01
_POLL_MAX = 0.25
_MAX_TEXT = 400
_SLOT_FILE_AGE = 86400.0   # seconds: a slot file untouched this long is swept at start


class HostState:
    """Dead-host memory and connection slots, shared through ``directory`` when given."""

    def __init__(self, directory: str | os.PathLike[str] | None = None, *,
                 clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._dead: dict[tuple[str, int], tuple[float, Reply]] = {}
        self._local: dict[str, asyncio.Semaphore] = {}
        self._dead_dir: Path | None = None
        self._slot_dir: Path | None = None
        self._root = Path(directory) if directory is not None else None
        self._prepared = directory is None

    def _ready(self) -> bool:
        """The shared directories exist (made, and swept, at first use: building an agent
        writes nothing); False when they cannot be used: this process's memory only."""
        if not self._prepared:
            self._prepared = True
            assert self._root is not None
            try:
                for d in (self._root / "dead", self._root / "slots"):
                    d.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                log.warning("dead hosts and connection slots not shared between workers: "
                            "%s", exc)
            else:
                self._dead_dir, self._slot_dir = self._root / "dead", self._root / "slots"
                self._sweep()
        return self._dead_dir is not None

    def _sweep(self) -> None:
        """Remove what no one needs: expired dead-host files, and slot files unused for
        a day (one per destination ever delivered to would otherwise pile up). A slot file
        in use is locked and stays; removal is best effort."""
        assert self._dead_dir is not None and self._slot_dir is not None
        now = self._clock()
        with contextlib.suppress(OSError):
            for path in self._dead_dir.iterdir():
                with contextlib.suppress(OSError, UnicodeDecodeError):
                    parsed = _parse(path.read_text("utf-8"))
                    if parsed is None or parsed[0] <= now:
                        path.unlink()
        with contextlib.suppress(OSError):
            for path in self._slot_dir.iterdir():
                with contextlib.suppress(OSError):
                    if time.time() - path.stat().st_mtime < _SLOT_FILE_AGE:
                        continue
                    fd = os.open(path, os.O_RDWR)
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        path.unlink()
                    finally:
                        os.close(fd)

    @property
    def shared(self) -> bool:
        return self._ready()

    # ------------------------------------------------------------------ dead hosts

    def dead(self, ip: str, port: int) -> Reply | None:
        """The reply that made ``ip:port`` dead, while it is remembered; else None."""
        now = self._clock()
        entry = self._dead.get((ip, port))
        if entry is not None and entry[0] > now:
            return entry[1]
        self._dead.pop((ip, port), None)
        if not self._ready():
            return None
        assert self._dead_dir is not None
        path = self._dead_dir / _host_file(ip, port)
        try:
            text = path.read_text("utf-8")
        except (OSError, UnicodeDecodeError):
            return None
        parsed = _parse(text)
        if parsed is None or parsed[0] <= now:
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        self._dead[(ip, port)] = parsed
        return parsed[1]

    def mark_dead(self, ip: str, port: int, reply: Reply, seconds: float) -> None:
        if seconds <= 0:
            return
        until = self._clock() + seconds
        self._dead[(ip, port)] = (until, reply)
        if not self._ready():
            return
        assert self._dead_dir is not None
        path = self._dead_dir / _host_file(ip, port)
        temp = path.with_name(f".{path.name}.{os.getpid()}")
        text = " ".join(reply.text.split())[:_MAX_TEXT]
        try:
            temp.write_text(f"{until:.3f} {reply.code} {reply.enhanced} {text}\n", "utf-8")
            os.replace(temp, path)
        except OSError as exc:
            log.warning("cannot record dead host %s:%s in %s: %s", ip, port,
                        self._dead_dir, exc)

    def forget_all(self) -> None:
        """Every dead host, for every worker (``pymta queue flush``)."""
        self._dead.clear()
        if not self._ready():
            return
        assert self._dead_dir is not None
        for path in self._dead_dir.iterdir():
            with contextlib.suppress(OSError):
                path.unlink()

    # ------------------------------------------------------------------ slots

    @contextlib.asynccontextmanager
    async def slot(self, destination: str, limit: int) -> AsyncIterator[None]:
        """Hold one of ``limit`` connection slots of ``destination`` while inside."""
        sem = self._local.get(destination)
        if sem is None:
            sem = self._local[destination] = asyncio.Semaphore(limit)
        async with sem:
            if not self._ready():
                yield
                return
            fd = await self._take(destination, limit)
            try:
                yield
            finally:
                if fd is not None:
                    os.close(fd)

    async def _take(self, destination: str, limit: int) -> int | None:
        """An fd holding a slot file's lock; None when the files cannot be used (then
        only this process's limit applies, and the reason is logged)."""
        assert self._slot_dir is not None
        stem = hashlib.sha256(destination.encode("utf-8", "surrogateescape")).hexdigest()[:24]
        delay = _POLL_FIRST
        while True:
            for i in range(limit):
                try:
                    fd = os.open(self._slot_dir / f"{stem}.{i}", os.O_RDWR | os.O_CREAT, 0o600)
                except OSError as exc:
                    log.warning("connection slots for %s not shared: %s", destination, exc)
                    return None
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    with contextlib.suppress(OSError):
                        os.utime(fd)        # in use: not swept
                    return fd
                except OSError as exc:
                    os.close(fd)
                    if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                        log.warning("connection slots for %s not shared: %s", destination,
                                    exc)
                        return None
            await asyncio.sleep(delay)
            delay = min(delay * 2, _POLL_MAX)


def _host_file(ip: str, port: int) -> str:
    return f"{ip}@{port}"


def _parse(text: str) -> tuple[float, Reply] | None:
    """``until code enhanced text`` → (until, Reply); None when it is not that."""
    parts = text.strip().split(" ", 3)
    if len(parts) < 3:
        return None
    try:
        until, code = float(parts[0]), int(parts[1])
    except ValueError:
        return None
    return until, Reply(code, parts[2], parts[3] if len(parts) > 3 else "")
