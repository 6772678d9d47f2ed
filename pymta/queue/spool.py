"""The writer of a message body being received (``QueueStore.new_spool``): the local
:class:`~pymta.contracts.Spool`.

It writes through a buffer straight into the body's file in ``data/`` (or ``ready/``) and
keeps the writer's state (open, committing, committed, aborted, being rewritten). The store
(:mod:`pymta.queue.store`) makes writers and moves them through that state when it commits
or rewrites a body (its ``commit``, ``rewrite_spool``); the two are one unit, split so that
each file has one job, and the store is the only code that touches a writer's underscored
members.
"""

from __future__ import annotations

import logging
import os
from typing import BinaryIO

from pymta import contracts
from pymta.types import QueueId, SpoolClosedError

log = logging.getLogger("pymta.queue")

BUFFER_SIZE = 64 * 1024


class SpoolWriter:
    """A message body being received; pass it to ``QueueStore.commit`` or call ``abort``.

    ``write`` goes through a 64 KiB buffer straight into ``data/<qid>`` on the caller's
    thread: page-cache writes are fast, and the one slow step (the flush to disk) is shared
    with other messages in the committer. ``write`` may raise OSError (disk full); the caller
    answers 451 and calls ``abort``.
    """

    # _REWRITING: ``QueueStore.rewrite_spool`` is replacing the file in a thread; an
    # ``abort`` then only asks (``_abort_asked``), and the rewrite's end carries it out.
    _OPEN, _COMMITTING, _COMMITTED, _ABORTED, _REWRITING = range(5)

    def __init__(self, store: object, qid: QueueId, file: BinaryIO, path: str) -> None:
        """``store``: the store that made it (it commits and rewrites only its own writers).
        ``file``: the buffered file (:func:`open_body`) of the body at ``path``, which is
        ``data/<qid>``, or ``ready/<qid>`` for a prepared body (the commit links it into
        ``data/``). A prepared body's file is built by the spool thread: its fstat and lseek
        each release the GIL, and getting it back can wait for the spool and commit threads,
        so the event loop should not do them."""
        self.qid = qid
        self.path = path
        self.size = 0
        self._store = store
        self._file = file
        self._state = self._OPEN
        self._abort_asked = False
        # After a commit with ``QueueStore.hand_over_locks``: the message's lock, still held.
        self.lock: contracts.MessageLock | None = None

    @property
    def closed(self) -> bool:
        return self._state != self._OPEN

    def write(self, data: bytes) -> None:
        if self._state != self._OPEN:
            raise SpoolClosedError(f"{self.qid}: spool file is not open for writing")
        self._file.write(data)
        self.size += len(data)

    def flush(self) -> None:
        """Hand buffered bytes to the kernel so readers of ``path`` (pipeline stages) see the
        whole message; durability is still the committer's job."""
        if self._state == self._OPEN:
            self._file.flush()

    def in_memory(self) -> bytes | None:
        """None: this spool writes its file as the body arrives (see ``Spool.in_memory``)."""
        return None

    def abort(self) -> None:
        """Forget the message. Idempotent; a no-op once ``commit`` has taken the writer.

        During a ``rewrite_spool`` the thread still uses the files: the abort is carried out
        when the rewrite ends (on the event loop), so neither a half-renamed file nor an
        open descriptor is left behind."""
        if self._state == self._OPEN:
            self._discard()
        elif self._state == self._REWRITING:
            self._abort_asked = True

    def _discard(self) -> None:
        self._state = self._ABORTED
        # Unlink before closing: the lock is held until the name is gone. A file system that
        # refuses even the unlink (read-only, failing) leaves the file to the clean-up at the
        # next start; the descriptor is closed either way.
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("%s: cannot remove spool file: %s", self.qid, e)
        self._close()

    def _close(self) -> None:
        try:
            self._file.close()      # closes the descriptor even when the final flush fails
        except OSError as e:
            # Only an aborted writer can still have buffered bytes; they are garbage anyway.
            log.warning("%s: closing spool file: %s", self.qid, e)


def open_body(fd: int) -> BinaryIO:
    """The buffered file a ``SpoolWriter`` writes through; owns (and closes) ``fd``."""
    try:
        return open(fd, "wb", buffering=BUFFER_SIZE, closefd=True)
    except BaseException:
        os.close(fd)
        raise
