"""Spool files of the SQLite queue (``pymta.queue.sqlstore``): a small pool of reused files per
process, and the writer of a body being received.

The file store creates an inode for every message and frees it again, and the file system's
inode allocation was a quarter of the server's time (issue 14). Here each process keeps a
few files, ``<root>/spool/<pid>.<n>``, created once and locked (``flock``) for the life of the
process. A body being received stays in memory until 64 KiB of it are pending or a stage asks
for the file (``flush``, then the stage reads it by its path); the commit takes a small body
from memory (or reads it back if it went to the file) into the database row, and the file goes
back to the pool, truncated only if it was written; a large body's file is renamed into
``data/`` and the pool makes a new one later. The lock is what lets another process's
start-up clean-up tell a live process's files from a dead one's. The same files hold the
copies of inline bodies an agent asks for by path (``body_path``), for as long as the claim.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os

from pymta import contracts
from pymta.files import create_locked
from pymta.types import QueueId, SpoolClosedError

log = logging.getLogger("pymta.queue")

BUFFER_SIZE = 64 * 1024
SPILL = 64 * 1024      # pending bytes of a spool written out to its file at once
POOL_MAX = 64           # free files a process keeps; more are removed when handed back
_FILE_MODE = 0o600


class PoolFile:
    """One reusable spool file: its path and its (locked, read-write) descriptor."""

    __slots__ = ("path", "fd")

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self.fd = fd

    def close(self, *, unlink: bool) -> None:
        if unlink:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        fd, self.fd = self.fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)


class SpoolPool:
    """The free spool files of this process, in ``directory``."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._free: list[PoolFile] = []
        self._serial = itertools.count()
        self._pid = os.getpid()

    def take(self) -> PoolFile:
        """A free, empty file (made when none is free). Raises OSError."""
        if self._pid != os.getpid():        # a forked child: the parent's files are not ours
            self._free = []
            self._pid = os.getpid()
        try:    # writers give offsets (pwrite), or seek themselves; list.pop is atomic,
            return self._free.pop()     # and scratch copies are made in agents' threads
        except IndexError:
            pass
        while True:
            path = os.path.join(self.directory, f"{self._pid}.{next(self._serial)}")
            try:
                fd = create_locked(path, os.O_RDWR, _FILE_MODE)
            except FileExistsError:
                continue        # a file of an earlier process with our pid, still locked
            return PoolFile(path, fd)

    def give_back(self, pf: PoolFile, *, emptied: bool = False) -> None:
        """Return ``pf`` emptied (``emptied``: already, by the commit thread, where the
        truncation may wait for the file system's journal without holding up the event
        loop); a file that cannot be truncated is removed instead."""
        if pf.fd < 0:
            return
        if len(self._free) >= POOL_MAX or self._pid != os.getpid():
            pf.close(unlink=True)
            return
        try:
            if not emptied:
                os.ftruncate(pf.fd, 0)
        except OSError as e:
            log.warning("queue: cannot truncate spool file %s: %s", pf.path, e)
            pf.close(unlink=True)
            return
        self._free.append(pf)

    def close(self) -> None:
        free, self._free = self._free, []
        for pf in free:
            pf.close(unlink=True)


class PooledSpool:
    """A message body being received; the local Spool of the SQLite store. The store commits
    it (``SqliteQueueStore.commit``) or it is aborted; either way its file goes back to the
    pool. Only the store touches the underscored members.

    The bytes stay in memory until ``SPILL`` of them are pending, a stage asks for the file
    (``flush``), or a rewrite needs it: a message that fits never touches its file, and the
    commit puts the bytes in the row straight from memory (no write, read back and truncate
    per message). The file is still taken at once, so that ``path`` always names it."""

    _OPEN, _COMMITTING, _COMMITTED, _ABORTED, _REWRITING = range(5)

    def __init__(self, store: object, pool: SpoolPool, qid: QueueId, pf: PoolFile) -> None:
        self.qid = qid
        self.path = pf.path
        self.size = 0
        self.lock: contracts.MessageLock | None = None
        self._store = store
        self._pool = pool
        self._pf = pf
        self._pending = bytearray()         # written, not yet in the file
        self._in_file = 0                   # bytes in the file (its next write offset)
        self._state = self._OPEN
        self._abort_asked = False
        self._body: bytes | None = None     # a small body, for its row at the commit
        self._renamed = ""                  # a large body's name in data/, once renamed
        self._emptied = False               # truncated after its commit (commit thread)

    @property
    def closed(self) -> bool:
        return self._state != self._OPEN

    def write(self, data: bytes) -> None:
        if self._state != self._OPEN:
            raise SpoolClosedError(f"{self.qid}: spool file is not open for writing")
        self._pending += data
        self.size += len(data)
        if len(self._pending) >= SPILL:
            self._spill()

    def flush(self) -> None:
        """Hand pending bytes to the kernel, so readers of ``path`` see the whole message."""
        if self._state == self._OPEN:
            self._spill()

    def in_memory(self) -> bytes | None:
        """The whole body when none of it went to the file yet, else None."""
        return bytes(self._pending) if self._in_file == 0 else None

    def _spill(self) -> None:
        """Write the pending bytes at the end of the file (OSError: nothing is lost from
        memory that the file does not have)."""
        pending = self._pending
        if not pending:
            return
        view = memoryview(pending)
        done = 0
        try:
            while done < len(pending):
                done += os.pwrite(self._pf.fd, view[done:], self._in_file + done)
        finally:
            view.release()
            self._in_file += done
            del pending[:done]

    def abort(self) -> None:
        """Forget the message; idempotent, a no-op once a commit has taken the spool. During
        a rewrite only asked for: the rewrite's end carries it out."""
        if self._state == self._OPEN:
            self._discard()
        elif self._state == self._REWRITING:
            self._abort_asked = True

    def _discard(self) -> None:
        self._state = self._ABORTED
        self._release_file()

    def _release_file(self) -> None:
        """The file back to the pool (or, once renamed into ``data/``, closed)."""
        self._pending = bytearray()
        pf, self._pf = self._pf, PoolFile("", -1)
        if self._renamed:
            pf.close(unlink=False)
        else:
            self._pool.give_back(pf, emptied=self._emptied or self._in_file == 0)

    def _swap(self, pf: PoolFile, size: int) -> None:
        """Take ``pf`` (``size`` bytes, written by a rewrite) as the body; the old file goes
        back."""
        old, self._pf = self._pf, pf
        self._pending = bytearray()
        self._in_file = size
        self.path = pf.path
        self.size = size
        self._pool.give_back(old)


def read_file(fd: int, size: int) -> bytes:
    """The first ``size`` bytes of ``fd`` (fewer if it is shorter)."""
    chunks = []
    offset = 0
    while offset < size:
        chunk = os.pread(fd, min(size - offset, 1 << 20), offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)
