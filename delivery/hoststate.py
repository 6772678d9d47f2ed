"""What the worker processes of one server share about next hops: dead hosts and the
per-destination connection limit (issue 15, item 6).

Postfix keeps both in its one queue manager. pymta's workers are peers with no coordinator,
so the shared state lives in small files under ``<state>/relay/`` that every worker reads:

- **Dead hosts**: ``dead/<ip>@<port>`` holds until when (wall clock) and the reply that killed
  it. A worker that finds a host dead skips it without a connection attempt, whichever worker
  saw it fail. Written by rename (a reader never sees half a file), never fsynced: it is a
  hint, and after a crash forgetting it is harmless. ``forget_all`` (``pymta queue flush``)
  removes them for every worker at once.
- **Connection slots**: ``slots/<hash of the destination>``, one file, whose byte i is the
  slot i; a connection in use holds a POSIX record lock on its byte. The kernel drops the
  lock when the holder dies, so a crashed worker never leaks a slot; each worker keeps the
  file open (one fd per destination, a few dozen at most). A worker that finds every
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
_OPEN_DESTINATIONS = 64    # destinations whose slot files stay open (one fd each)


class HostState:
    """Dead-host memory and connection slots, shared through ``directory`` when given."""

    def __init__(self, directory: str | os.PathLike[str] | None = None, *,
                 clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._dead: dict[tuple[str, int], tuple[float, Reply]] = {}
        self._local: dict[str, asyncio.Semaphore] = {}
        self._files: dict[str, tuple[int, float]] = {}   # destination → (slot file, touched)
        self._held: dict[str, set[int]] = {}               # destination → slots we hold
        self._waiting: dict[str, int] = {}                 # destination → takers waiting
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
                    try:    # no byte locked by anyone: no worker is using it now
                        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 0, 0)
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
            self._waiting[destination] = self._waiting.get(destination, 0) + 1
            try:
                index = await self._take(destination, limit)
            finally:
                self._waiting[destination] -= 1
            try:
                yield
            finally:
                if index is not None:
                    self._give_back(destination, index)

    async def _take(self, destination: str, limit: int) -> int | None:
        """The index of a slot of ``destination`` this process now holds (a POSIX lock on
        that byte of the destination's slot file); None when the file cannot be used (then
        only this process's limit applies, and the reason is logged). Each process starts
        its search at its own place, so two workers rarely try the same byte."""
        delay = _POLL_FIRST
        start = os.getpid() % limit
        while True:
            fd = self._slot_file(destination)   # again each round: never a stale fd
            if fd is None:
                return None
            held = self._held.setdefault(destination, set())
            for k in range(limit):
                index = (start + k) % limit
                if index in held:
                    continue    # ours already: a POSIX lock would be granted to us again
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, index)
                except OSError as exc:
                    if exc.errno in (errno.EACCES, errno.EAGAIN):
                        continue
                    log.warning("connection slots for %s not shared: %s", destination, exc)
                    return None
                held.add(index)
                return index
            await asyncio.sleep(delay)
            delay = min(delay * 2, _POLL_MAX)

    def _give_back(self, destination: str, index: int) -> None:
        held = self._held.get(destination)
        if held is not None:
            held.discard(index)
        entry = self._files.get(destination)
        if entry is not None:
            with contextlib.suppress(OSError):
                fcntl.lockf(entry[0], fcntl.LOCK_UN, 1, index)

    def _slot_file(self, destination: str) -> int | None:
        """The open slot file of ``destination``: one fd, its byte i the slot i (POSIX
        record locks: the kernel drops them when the process dies). Reopened when the
        file was swept away by a worker that started later (and none is held); touched at
        most hourly so that no sweep takes it; at most ``_OPEN_DESTINATIONS`` files open,
        the least recently used one closed when none of its slots is held or awaited
        (closing releases every lock this process has on the file)."""
        now = time.monotonic()
        entry = self._files.pop(destination, None)
        if entry is not None and not self._held.get(destination):
            with contextlib.suppress(OSError):
                if os.fstat(entry[0]).st_nlink == 0:    # unlinked: others use a new file
                    os.close(entry[0])
                    entry = None
        if entry is None:
            entry = self._open_slot_file(destination, now)
            if entry is None:
                return None
        elif now - entry[1] > 3600:
            with contextlib.suppress(OSError):
                os.utime(entry[0])
            entry = (entry[0], now)
        self._files[destination] = entry          # most recently used last
        if len(self._files) > _OPEN_DESTINATIONS:
            for name, (fd, _) in list(self._files.items()):
                if (name != destination and not self._held.get(name)
                        and not self._waiting.get(name)):
                    del self._files[name]
                    with contextlib.suppress(OSError):
                        os.close(fd)
                    break
        return entry[0]

    def _open_slot_file(self, destination: str, now: float) -> tuple[int, float] | None:
        assert self._slot_dir is not None
        stem = hashlib.sha256(destination.encode("utf-8", "surrogateescape")).hexdigest()[:24]
        try:
            fd = os.open(os.path.join(self._slot_dir, stem),
                         os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            log.warning("connection slots for %s not shared: %s", destination, exc)
            return None
        with contextlib.suppress(OSError):
            os.utime(fd)        # in use: not swept
        return fd, now


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
