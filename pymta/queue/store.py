"""The durable on-disk queue: message bodies, envelopes, and per-message locks.

Layout under the store root (all directories 0700, one filesystem):

``tmp/``
    files being created: envelopes waiting for their commit, atomic rewrites, and (only on
    file systems without ``O_TMPFILE``) bodies for the instant between creation and getting a
    name in ``data/`` or ``ready/``.
``data/<qid>``
    the body, written in place while DATA/BDAT arrives and never renamed or replaced after
    the commit, so a lock on it stays meaningful for the life of the message.
``env/<qid>``
    the envelope (``codec`` JSON). Its presence is THE commit point: a message exists iff its
    envelope is in ``env/``; everything else is scaffolding.
``corrupt/``
    envelopes (and their bodies) the store could not use, and files that do not belong in
    ``env/`` or ``data/`` (bad names, directories); kept for a human, never deleted. Each
    is logged once, when it is moved; nothing in ``corrupt/`` is ever read again, so a bad
    file costs one log line, never a crash loop or a retry every scan.
``ready/<qid>``
    empty bodies made ahead of time (``prealloc``) by a spool thread, each locked by its
    process; ``new_spool`` hands one out and the commit links it into ``data/``.

Implementation summary. ``new_spool`` creates the body without a name (``O_TMPFILE``; on file
systems without it, in ``tmp/``), takes an exclusive ``flock`` on it, then hard-links it into
``data/`` (or ``ready/``), and hands it out in a :class:`~pymta.queue.spool.SpoolWriter`:
every body is locked from the moment it has a name there until its commit has finished or
failed. That lock is what makes start-up clean-up safe with several processes on one spool:
``open()`` deletes a ``tmp/`` file or a body without an envelope only if it can take the
lock, i.e. no live process is writing it.
``commit`` flushes the body, writes the envelope to ``tmp/<qid>`` and hands both to the
``GroupCommitter``, which makes them durable and renames the envelope into ``env/``. Delivery
takes the same body lock (``try_lock``) so that exactly one process works on a message at a
time; ``flock`` locks die with their process, so a crashed worker never strands a message.
Envelope updates (``save``) are write-temp, fsync, rename, fsync-directory: a reader sees the
old or the new envelope, never a torn one.

Faults. Every local fault while queueing is temporary for the client: ``452 4.3.1
Insufficient system storage`` when the disk or a quota is full (``ENOSPC``/``EDQUOT``), ``451
4.3.0`` otherwise (a read-only or failing file system), and the message's files are removed
(best effort: a file that cannot even be unlinked is left to the next start's clean-up, never
to a traceback). ``admission`` lets the session refuse ``MAIL FROM`` early, as Postfix does
(``space``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import fcntl
import functools
import itertools
import logging
import os
import stat
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import BinaryIO

from pymta import contracts
from pymta.files import create_locked, open_dir, write_all
from pymta.queue import codec
from pymta.queue.committer import CommitItem, GroupCommitter, RemoveItem
from pymta.queue.ids import is_valid, new_qid
from pymta.queue.space import FreeSpace, is_no_space, shortage
from pymta.queue.spool import BUFFER_SIZE, SpoolWriter, open_body
from pymta.types import Envelope, QueuedMessage, QueueId, SpoolClosedError, TemporaryFailure

log = logging.getLogger("pymta.queue")

_FILE_MODE = 0o600
_DIR_MODE = 0o700
_tmp_serial = itertools.count()
PREALLOC_MAX_AGE = 10.0     # seconds a prepared body may wait before its qid looks stale
# Largest envelope ``load`` reads: a few hundred bytes per recipient, so this is far above
# any real one, and a garbage file of gigabytes is refused without being read into memory.
MAX_ENVELOPE_BYTES = 64 * 1024 * 1024


def insufficient_storage() -> TemporaryFailure:
    """The reply when the queue's disk (or quota) is full: RFC 3463 4.3.1, as Postfix says."""
    return TemporaryFailure("Insufficient system storage", "4.3.1", 452)


def queue_write_error(err: BaseException | None = None) -> TemporaryFailure:
    """The reply for a local fault while queueing: the client keeps the message and retries.
    ``err`` the fault, if known: a full disk is ``452 4.3.1``, anything else Postfix's ``451
    4.3.0 Error: queue file write error``."""
    if is_no_space(err):
        return insufficient_storage()
    return TemporaryFailure("Error: queue file write error", "4.3.0", 451)


class MessageLock:
    """Exclusive right to work on one message, held as an ``flock`` on its body.

    Released by ``release()``, by leaving the ``with`` block, or by the process dying.
    """

    __slots__ = ("qid", "_fd", "_owner")

    def __init__(self, qid: QueueId, fd: int, owner: dict[QueueId, MessageLock] | None = None
                 ) -> None:
        self.qid = qid
        self._fd = fd
        self._owner = owner
        if owner is not None:
            owner[qid] = self

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def release(self) -> None:
        fd, self._fd = self._fd, -1
        owner, self._owner = self._owner, None
        if owner is not None and owner.get(self.qid) is self:
            del owner[self.qid]
        if fd >= 0:
            # Unlock explicitly: a forked child sharing the descriptor must not keep it held.
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def detach(self) -> int:
        """Give up the descriptor (still locked) to a caller that will close it; -1 if none."""
        fd, self._fd = self._fd, -1
        owner, self._owner = self._owner, None
        if owner is not None and owner.get(self.qid) is self:
            del owner[self.qid]
        return fd

    def attach(self, fd: int, owner: dict[QueueId, MessageLock] | None) -> None:
        """Take back a descriptor given up by ``detach`` that is still locked (a removal
        that failed): the holder keeps the lock it never stopped having."""
        self._fd = fd
        self._owner = owner
        if owner is not None:
            owner[self.qid] = self

    def __enter__(self) -> MessageLock:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):   # modules may be gone at interpreter exit
            self.release()

    def __repr__(self) -> str:
        return f"<MessageLock {self.qid} {'held' if self.held else 'released'}>"


class QueueStore:
    """The queue directory: the local :class:`pymta.contracts.QueueStore`. ``open()`` first;
    ``await start()`` before committing; ``await aclose()`` at the end.

    Besides the contract's coroutines it offers their synchronous forms (``ids``, ``load``,
    ``try_lock``, ``body_path``, ``save_sync``, ``remove_sync``), for the CLI, which runs
    without an event loop, and for callers that know they hold a local directory.

    ``fsync=False`` skips every flush (renames still happen): only for benchmarks that want to
    measure everything but the disk. ``committer_class`` exists so tests can inject faults.
    """

    committer_class: type[GroupCommitter] = GroupCommitter

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True,
                 hand_over_locks: bool = False, prealloc: int = 0,
                 space_ttl: float = 1.0) -> None:
        """``hand_over_locks``: a committed writer keeps its message locked in ``writer.lock``
        for the caller to pass to the delivery (the server does); else the lock is released.
        ``prealloc``: after ``start()``, keep up to this many empty bodies ready for
        ``new_spool`` (a server's hot path); each is locked, so clean-up leaves them alone,
        and ``close()`` (or, after a crash, the next ``open()``) removes the unused ones.
        ``space_ttl``: how long ``admission`` trusts one ``statvfs`` of the queue."""
        self.root = os.path.abspath(os.fspath(root))
        self.space = FreeSpace(self.root, space_ttl)
        self._warned: object = None     # the space sample last warned about
        self.fsync = fsync
        self.hand_over_locks = hand_over_locks
        self.prealloc = prealloc
        self._ready: collections.deque[tuple[QueueId, BinaryIO, float]] = collections.deque()
        self._filling = False
        self._fill_fault: int | None = None     # errno of the last failed _fill, if any
        self._spool_executor: ThreadPoolExecutor | None = None
        self._held: dict[QueueId, MessageLock] = {}   # locks this process holds, by qid
        self._tmpfile_ok = hasattr(os, "O_TMPFILE")   # False once the file system says no
        self.tmp_dir = os.path.join(self.root, "tmp")
        self.ready_dir = os.path.join(self.root, "ready")
        self.data_dir = os.path.join(self.root, "data")
        self.env_dir = os.path.join(self.root, "env")
        self.corrupt_dir = os.path.join(self.root, "corrupt")
        self.committer: GroupCommitter | None = None
        self._root_fd = self._data_fd = self._env_fd = -1

    # ------------------------------------------------------------------ lifecycle

    def open(self) -> None:
        """Create the layout and clean up after any crash; safe while other processes run."""
        if self._root_fd >= 0:
            return
        for path in (self.root, self.tmp_dir, self.data_dir, self.env_dir, self.corrupt_dir,
                     self.ready_dir):
            try:
                os.mkdir(path, _DIR_MODE)
            except FileExistsError:
                continue
            os.chmod(path, _DIR_MODE)   # mkdir's mode is filtered by the umask
        self._root_fd = open_dir(self.root)
        self._data_fd = open_dir(self.data_dir)
        self._env_fd = open_dir(self.env_dir)
        self._recover()

    async def start(self) -> None:
        self.open()
        if self.committer is None or not self.committer.running:   # first start, or restart
            self.committer = self.committer_class(
                fs_fd=self._root_fd, data_dir_fd=self._data_fd, env_dir_fd=self._env_fd,
                fsync=self.fsync)
        await self.committer.start()
        if self.prealloc and self._spool_executor is None:
            self._spool_executor = ThreadPoolExecutor(1, thread_name_prefix="pymta-spool")
            self._refill()

    async def aclose(self) -> None:
        """Finish queued commits, stop the committer thread, close the directories."""
        executor, self._spool_executor = self._spool_executor, None
        if executor is not None:
            await asyncio.get_running_loop().run_in_executor(None, executor.shutdown, True)
        while self._ready:
            qid, f, _ = self._ready.popleft()
            self._discard_body(qid, f)
        if self.committer is not None:
            await self.committer.close()
        for fd in (self._root_fd, self._data_fd, self._env_fd):
            if fd >= 0:
                os.close(fd)
        self._root_fd = self._data_fd = self._env_fd = -1

    def _recover(self) -> None:
        removed = 0
        for name in self._listing(self.tmp_dir, qids=False):
            removed += self._unlink_if_unused(os.path.join(self.tmp_dir, name), None)
        for name in self._listing(self.ready_dir, qids=False):
            removed += self._unlink_if_unused(os.path.join(self.ready_dir, name), None)
        # env/ is listed before data/: a commit creates the body before the envelope, so any
        # envelope seen here already has its body in the later data/ listing (unless removed).
        envs = set(self._listing(self.env_dir, qids=True))
        bodies = set(self._listing(self.data_dir, qids=True))
        for qid in sorted(bodies - envs):
            removed += self._unlink_if_unused(self.body_path(qid), qid)
        for qid in sorted(envs - bodies):
            if os.path.exists(self.body_path(qid)):
                continue
            self._quarantine(qid, "envelope without message body")
        if removed:
            log.info("queue %s: removed %d unfinished file(s)", self.root, removed)

    def _listing(self, directory: str, *, qids: bool) -> list[str]:
        """The regular files of ``directory`` (with queue-id names if ``qids``); anything else
        there is not ours to interpret: moved to ``corrupt/`` (one log line each)."""
        names = []
        with os.scandir(directory) as it:
            for entry in it:
                try:
                    regular = entry.is_file(follow_symlinks=False)
                except OSError:
                    regular = False
                if regular and (not qids or is_valid(entry.name)):
                    names.append(entry.name)
                    continue
                why = "not a queue file name" if regular else "not a regular file"
                # (the name shortened: the prefix must not push it past NAME_MAX)
                self._set_aside(entry.path,
                                f"stray-{os.path.basename(directory)}-{entry.name[:200]}", why)
        return names

    def _set_aside(self, path: str, name: str, why: str) -> bool:
        """Move ``path`` into ``corrupt/`` as ``name`` (never replacing anything there) and log
        one line; False if it is gone (another process moved or removed it first)."""
        dst = os.path.join(self.corrupt_dir, name)
        if os.path.lexists(dst):
            dst = f"{dst}.{time.time_ns()}"
        try:
            os.rename(path, dst)
        except FileNotFoundError:
            return False
        except OSError as e:
            log.error("queue: %s: %s, and it cannot be moved to %s: %s", _shown(path), why,
                      self.corrupt_dir, e)
            return False
        log.error("queue: %s: %s; moved to %s", _shown(path), why, _shown(dst))
        return True

    def _unlink_if_unused(self, path: str, qid: QueueId | None) -> int:
        """Delete ``path`` if no process holds its lock (and, for a body, it has no envelope)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return 0
        except OSError as e:
            log.warning("queue clean-up: cannot open %s: %s", path, e)
            return 0
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if qid is not None and os.path.exists(os.path.join(self.env_dir, qid)):
                return 0            # committed between our listings
            os.unlink(path)
            return 1
        except BlockingIOError:
            return 0                # being written by a live process
        except OSError as e:
            log.warning("queue clean-up: cannot remove %s: %s", path, e)
            return 0
        finally:
            os.close(fd)

    def _quarantine(self, qid: QueueId, why: str) -> bool:
        """Move an unusable envelope (and its body, if any) to ``corrupt/`` and log one line
        saying why; False if it is gone (removed, or moved by another process)."""
        dst = os.path.join(self.corrupt_dir, qid)
        if os.path.lexists(dst):
            dst = f"{dst}.{time.time_ns()}"
        try:
            os.rename(os.path.join(self.env_dir, qid), dst)
        except FileNotFoundError:
            return False
        except OSError as e:
            log.error("%s: %s, and it cannot be moved to %s: %s", qid, why, self.corrupt_dir, e)
            return False
        try:
            os.rename(self.body_path(qid), dst + ".body")
        except FileNotFoundError:
            pass
        except OSError as e:    # the body alone is a leftover: clean-up removes it
            log.warning("%s: cannot move the message body to %s: %s", qid, self.corrupt_dir, e)
        log.error("%s: %s; moved to %s", qid, why, self.corrupt_dir)
        return True

    # ------------------------------------------------------------------ receiving

    def new_spool(self) -> SpoolWriter:
        """A new, locked, empty body in ``data/``. Raises OSError (disk full...) like ``write``.

        With ``prealloc``, a body made ahead of time by the spool thread (creating a file
        waits for the file system's journal, which is busy flushing the last batch); made
        here when none is ready.
        """
        ready = self._ready
        if ready:
            qid, f, made = ready.popleft()
            if time.monotonic() - made <= PREALLOC_MAX_AGE:
                self._refill()
                return SpoolWriter(self, qid, f, os.path.join(self.ready_dir, qid))
            # After a quiet spell: ids should stay close to arrival times, so the spool thread
            # replaces the whole stale lot while this one message makes its own body.
            stale = [(qid, f, made)]
            while ready:
                stale.append(ready.popleft())
            if self._spool_executor is not None:
                self._spool_executor.submit(self._discard_bodies, stale)
            else:
                self._discard_bodies(stale)
        self._refill()
        qid, fd = self._create_body()
        return SpoolWriter(self, qid, open_body(fd), self.body_path(qid))

    def _refill(self) -> None:
        if (self.prealloc and not self._filling and self._spool_executor is not None
                and len(self._ready) <= self.prealloc // 2):
            self._filling = True
            self._spool_executor.submit(self._fill)

    def _fill(self) -> None:
        """Spool thread: top up the ready bodies. On a fault, stop: ``new_spool`` then makes
        its own body and reports the fault to its client."""
        try:
            while len(self._ready) < self.prealloc and self._spool_executor is not None:
                qid = new_qid()
                fd = self._create_linked(qid, os.path.join(self.ready_dir, qid), ".ready")
                if fd >= 0:
                    self._ready.append((qid, open_body(fd), time.monotonic()))
        except OSError as e:
            # Once per fault, not once per message while the disk stays full or read-only.
            if self._fill_fault != e.errno:
                log.warning("queue: cannot prepare spool files: %s", e)
            self._fill_fault = e.errno
        else:
            if self._fill_fault is not None:
                log.info("queue: spool files are prepared again")
            self._fill_fault = None
        finally:
            self._filling = False

    def _discard_bodies(self, bodies: list[tuple[QueueId, BinaryIO, float]]) -> None:
        for qid, f, _ in bodies:
            self._discard_body(qid, f)

    def _discard_body(self, qid: QueueId, f: BinaryIO) -> None:
        _unlink_quietly(os.path.join(self.ready_dir, _checked(qid)), qid)
        with contextlib.suppress(OSError):
            f.close()       # nothing written: closing flushes nothing

    def _create_body(self) -> tuple[QueueId, int]:
        """Create and lock an empty ``data/<qid>`` (``_create_linked``: clean-up never sees
        an unlocked body of a live process)."""
        for _ in range(10):
            qid = new_qid()
            fd = self._create_linked(qid, self.body_path(qid), ".body")
            if fd >= 0:
                return qid, fd
        raise FileExistsError(errno.EEXIST, "no unused queue id after 10 attempts")

    def _create_linked(self, qid: QueueId, dst: str, suffix: str) -> int:
        """Create ``dst`` already locked. Created in place, a file would be unlocked for an
        instant, and another process starting up could take it for a crash's leftover and
        delete it. So it is made nameless (``O_TMPFILE``), locked, then linked as ``dst``: one
        directory entry, no scaffolding, and a crash in between leaves nothing. Where the
        file system has no ``O_TMPFILE``: made and locked as ``tmp/<qid><suffix>``, linked to
        ``dst``, then the ``tmp/`` name removed. -1 on an id collision or when such a
        clean-up took the ``tmp/`` file first."""
        if self._tmpfile_ok:
            fd = self._create_nameless(os.path.dirname(dst))
            if fd >= 0:
                try:
                    # linkat(AT_SYMLINK_FOLLOW): CPython uses it (not link(2), which would
                    # link the /proc symlink itself) only when given a directory descriptor;
                    # the absolute source path makes the descriptor itself irrelevant.
                    os.link(f"/proc/self/fd/{fd}", dst, src_dir_fd=self._root_fd,
                            follow_symlinks=True)           # never replaces a file
                except FileExistsError:
                    os.close(fd)
                    return -1
                except OSError as e:
                    os.close(fd)
                    if e.errno not in (errno.ENOENT, errno.EXDEV, errno.EPERM, errno.EACCES):
                        raise
                    self._tmpfile_ok = False    # no usable /proc: the tmp/ way from now on
                except BaseException:
                    os.close(fd)
                    raise
                else:
                    return fd
        tmp = os.path.join(self.tmp_dir, qid + suffix)
        try:
            fd = self._create_locked(tmp)
        except (FileExistsError, BlockingIOError):
            return -1       # id collision, or another process's clean-up is deleting it
        try:
            os.link(tmp, dst)       # unlike rename, never replaces a file
        except (FileExistsError, FileNotFoundError):
            # id collision, or another process's clean-up took tmp before we locked it
            self._drop(tmp, fd)
            return -1
        except BaseException:
            self._drop(tmp, fd)
            raise
        try:
            os.unlink(tmp)
        except OSError as e:    # a stray second name is harmless; clean-up removes it
            log.warning("%s: %s", qid, e)
        return fd

    def _create_nameless(self, directory: str) -> int:
        """A locked ``O_TMPFILE`` in ``directory``; -1 (and no more tries) if unsupported."""
        try:
            fd = os.open(directory, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, _FILE_MODE)
        except (AttributeError, IsADirectoryError, NotADirectoryError):
            self._tmpfile_ok = False
            return -1
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOENT):
                self._tmpfile_ok = False
                return -1
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def rewrite_spool_sync(self, writer: contracts.Spool,
                           transform: Callable[[BinaryIO, BinaryIO], None]) -> None:
        """Replace a not yet committed body by ``transform(old, new)``'s output, same qid.

        For the rare pre-queue edit of the message as received (dropping a forged header
        field). The new body is built in ``tmp/`` under its own lock and renamed over
        ``data/<qid>``; the writer then holds the new file (and its lock). A crash at any
        point leaves an uncommitted body or a ``tmp/`` file, both removed by clean-up; the
        committer's flush of ``data/`` makes the rename durable with the commit. Raises
        OSError; the writer is unchanged (still the old body) if the rename did not happen.
        Raises SpoolClosedError if the writer is not open (aborted, committed).
        """
        writer = self._begin_rewrite(writer)
        try:
            self._rewrite(writer, transform)
        finally:
            self._end_rewrite(writer)

    async def rewrite_spool(self, writer: contracts.Spool,
                            transform: Callable[[BinaryIO, BinaryIO], None]) -> None:
        """``rewrite_spool_sync`` in a thread, safe against the writer's abort meanwhile.

        A client that disconnects while the thread copies makes its session call
        ``writer.abort()``: the thread still uses both files, so the abort waits for the
        thread and is then carried out here, on the event loop (the new and the old file
        removed and closed), and this raises SpoolClosedError. A cancelled caller leaves the
        thread to finish; the writer is then aborted the same way.
        """
        writer = self._begin_rewrite(writer)
        work = asyncio.get_running_loop().run_in_executor(None, self._rewrite, writer,
                                                          transform)
        try:
            await asyncio.shield(work)
        except asyncio.CancelledError:
            writer._abort_asked = True
            work.add_done_callback(functools.partial(self._rewrite_done, writer))
            raise
        except BaseException:
            self._end_rewrite(writer)
            raise
        if self._end_rewrite(writer):
            raise SpoolClosedError(f"{writer.qid}: spool writer aborted during the rewrite")

    def _begin_rewrite(self, spool: contracts.Spool) -> SpoolWriter:
        writer = self._own(spool)
        if writer._state != writer._OPEN:
            raise SpoolClosedError(f"{writer.qid}: spool writer is not open")
        writer._state = writer._REWRITING
        return writer

    def _own(self, spool: contracts.Spool) -> SpoolWriter:
        """``spool`` as this store's writer; SpoolClosedError for anything else (it cannot
        be committed here)."""
        if not isinstance(spool, SpoolWriter) or spool._store is not self:
            raise SpoolClosedError(f"{spool.qid}: not a spool of this queue store")
        return spool

    def _end_rewrite(self, writer: SpoolWriter) -> bool:
        """Back to open, or carry out an abort asked for meanwhile (True then)."""
        if writer._state == writer._REWRITING:
            writer._state = writer._OPEN
        if not writer._abort_asked:
            return False
        writer._abort_asked = False
        if writer._state == writer._OPEN:
            writer._discard()
        return True

    def _rewrite_done(self, writer: SpoolWriter, work: asyncio.Future[None]) -> None:
        if not work.cancelled():
            work.exception()    # retrieved: the caller is gone, the abort says it all
        self._end_rewrite(writer)

    def _rewrite(self, writer: SpoolWriter,
                 transform: Callable[[BinaryIO, BinaryIO], None]) -> None:
        """The copy itself (any thread); the writer is in ``_REWRITING``, so nobody else
        touches its file until ``_end_rewrite``."""
        writer._file.flush()
        tmp = os.path.join(self.tmp_dir, f"{writer.qid}.{os.getpid()}-{next(_tmp_serial)}.edit")
        fd = self._create_locked(tmp)
        new = open(fd, "wb", buffering=BUFFER_SIZE, closefd=True)  # noqa: SIM115
        try:
            with open(writer.path, "rb") as old:
                transform(old, new)
            new.flush()
            size = new.tell()
            os.rename(tmp, writer.path)
        except BaseException:
            _unlink_quietly(tmp, writer.qid)
            with contextlib.suppress(OSError):
                new.close()
            raise
        old_file, writer._file = writer._file, new
        writer.size = size
        with contextlib.suppress(OSError):
            old_file.close()    # the replaced inode: its lock goes with it

    async def commit(self, writer: contracts.Spool, envelope: Envelope) -> QueueId:
        """Make the message durable; on return it may be acknowledged with 250.

        Sets ``envelope.size``. Any local fault removes the message's files and raises
        TemporaryFailure (``452 4.3.1`` for a full disk, else ``451 4.3.0``), so a client
        never gets 250 for something not on disk. SpoolClosedError if the writer was aborted.
        """
        writer = self._own(writer)
        if writer.closed:
            raise SpoolClosedError(f"{writer.qid}: spool writer is not open")
        qid = writer.qid
        committer = self.committer
        if committer is None or not committer.running:
            log.error("%s: queue is not accepting commits", qid)
            writer.abort()
            raise queue_write_error()
        env_tmp = os.path.join(self.tmp_dir, qid)
        try:
            envelope.size = writer.size     # counts bytes still in the writer's buffer too
            data = codec.encode(envelope)
        except Exception as e:
            log.exception("%s: cannot write envelope", qid)
            writer._discard()
            raise queue_write_error(e) from e
        writer._state = writer._COMMITTING
        # The body's last write and the envelope's creation run on the commit thread
        # (``_prepare_commit``): file creation waits for the journal while another batch is
        # being flushed, and the event loop must not wait with it.
        item = CommitItem(qid, (), env_tmp, os.path.join(self.env_dir, qid),
                          functools.partial(self._finish_commit, writer),
                          prepare=functools.partial(self._prepare_commit, writer, data))
        fut = committer.submit(item)
        try:
            # Shielded: a session cancelled mid-commit must not close files the commit thread
            # is flushing. The commit completes (or is cleaned up) either way.
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            raise self.write_fault(e) from e
        return qid

    def write_fault(self, err: BaseException) -> TemporaryFailure:
        """The client's reply for a write fault (``queue_write_error``); a full disk is
        re-measured at once, so the next ``MAIL FROM`` is refused early (``admission``)."""
        if is_no_space(err):
            self.space.invalidate()
        return queue_write_error(err)

    def admission(self, size: int = 0, reserve: int = 0) -> TemporaryFailure | None:
        """Why no new message can be taken now, or None: checked at ``MAIL FROM``.

        ``452 4.3.1`` when fewer than ``reserve`` bytes would stay free (plus ``size``, a
        declared SIZE: Postfix's ``queue_minfree`` rule, see ``space``), ``451 4.3.0`` when
        the queue's file system is read-only. Costs one ``statvfs`` per ``space_ttl``."""
        sample = self.space.sample()
        if sample is None:
            return None
        # One warning per measurement (at most one per ``space_ttl``), not one per command.
        warn, self._warned = sample is not self._warned, sample
        if sample.read_only:
            if warn:
                log.warning("queue %s: file system is read-only; refusing mail", self.root)
            return queue_write_error()
        if shortage(sample, size, reserve):
            if warn:
                log.warning("not enough free space in mail queue: %d bytes free, %d needed "
                            "(+ %d declared)", sample.free, reserve, size)
            return insufficient_storage()
        return None

    def _prepare_commit(self, writer: SpoolWriter, data: bytes, item: CommitItem) -> None:
        """Commit thread: flush the body, give a prepared body its name in ``data/``, write the
        envelope to ``tmp/`` (``item.fds``)."""
        writer._file.flush()
        data_path = self.body_path(writer.qid)
        if writer.path != data_path:
            os.link(writer.path, data_path)     # locked under both names: clean-up skips it
            old, writer.path = writer.path, data_path
            try:
                os.unlink(old)
            except OSError as e:    # a stray second name is harmless; clean-up removes it
                log.warning("%s: %s", writer.qid, e)
        env_fd = self._create_locked(item.src)
        item.fds = (writer._file.fileno(), env_fd)
        write_all(env_fd, data)

    def _finish_commit(self, writer: SpoolWriter, item: CommitItem,
                       err: BaseException | None) -> None:
        env_fd = item.fds[1] if len(item.fds) > 1 else -1
        if err is None:
            with contextlib.suppress(OSError):
                os.close(env_fd)    # the envelope is durable already; nothing left to lose
            writer._state = writer._COMMITTED
            if self.hand_over_locks:
                # Keep the message locked for the delivery that follows at once: the queue
                # manager takes ``writer.lock`` and need not reopen, relock or reload anything.
                try:
                    writer.lock = MessageLock(item.qid, os.dup(writer._file.fileno()),
                                              self._held)
                except OSError:
                    writer.lock = None
            writer._close()                     # releases the body lock unless handed over
            return
        log.error("%s: queue file write error: %s", item.qid, err)
        if item.renamed:
            # Renamed but not durable (the env/ fsync failed): withdraw it. Should the file
            # system refuse even that, the body's removal below makes it an envelope without
            # a body, which the next start moves aside instead of delivering it.
            try:
                os.unlink(item.dst)
            except FileNotFoundError:
                pass
            except OSError as e:
                log.error("%s: cannot withdraw the envelope of a failed commit: %s", item.qid,
                          e)
        if env_fd >= 0:
            self._drop(item.src, env_fd)
        writer._discard()

    async def enqueue_bytes(self, envelope: Envelope, data: bytes) -> QueueId:
        """Queue a message held in memory (generated DSNs); as durable as ``commit``.

        Every local fault becomes TemporaryFailure, as for ``commit``.
        """
        try:
            writer = self.new_spool()
        except OSError as e:
            log.error("queue file create error: %s", e)
            raise self.write_fault(e) from e
        try:
            writer.write(data)
        except OSError as e:
            log.error("%s: queue file write error: %s", writer.qid, e)
            writer.abort()
            raise self.write_fault(e) from e
        qid = await self.commit(writer, envelope)
        lock = writer.lock
        if lock is not None:        # nobody takes a hand-over here: the next attempt locks
            writer.lock = None
            lock.release()
        return qid

    # ------------------------------------------------------------------ queued messages

    def ids(self) -> list[QueueId]:
        """Committed messages, oldest first."""
        return sorted(n for n in os.listdir(self.env_dir) if is_valid(n))

    def body_path(self, qid: QueueId) -> str:
        return os.path.join(self.data_dir, _checked(qid))

    def load(self, qid: QueueId) -> Envelope | None:
        """The envelope, or None if the message is gone or unusable (then it is quarantined).

        Unusable: not a regular file, larger than ``MAX_ENVELOPE_BYTES``, not an envelope
        this code reads (corrupt, truncated, or a newer format version), or its body is
        missing or not the size the envelope recorded at the commit (a truncated or emptied
        body is not delivered as if it were the message). Each is moved to ``corrupt/`` with
        one log line, so it is reported once and never retried. An I/O error other than "not
        found" propagates: that is not a verdict on the message.
        """
        path = os.path.join(self.env_dir, _checked(qid))
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            self._quarantine(qid, "envelope is a symbolic link")
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                self._quarantine(qid, "envelope is not a regular file")
                return None
            data = _read_at_most(fd, MAX_ENVELOPE_BYTES + 1)
        finally:
            os.close(fd)
        if len(data) > MAX_ENVELOPE_BYTES:
            self._quarantine(qid, f"envelope larger than {MAX_ENVELOPE_BYTES} bytes")
            return None
        try:
            env = codec.decode(data)
        except codec.UnsupportedVersion as e:
            self._quarantine(qid, f"{e} (a newer pymta can deliver it from there)")
            return None
        except codec.CodecError as e:
            self._quarantine(qid, f"unreadable envelope ({e})")
            return None
        why = self._body_fault(qid, env)
        if why:
            self._quarantine(qid, why)
            return None
        return env

    def _body_fault(self, qid: QueueId, env: Envelope) -> str:
        """What is wrong with a committed message's body ("" if nothing)."""
        try:
            st = os.stat(self.body_path(qid), follow_symlinks=False)
        except FileNotFoundError:
            if not os.path.lexists(os.path.join(self.env_dir, qid)):
                return ""           # removed meanwhile (envelope first, then body)
            return "envelope without message body"
        if not stat.S_ISREG(st.st_mode):
            return "message body is not a regular file"
        if env.size and st.st_size != env.size:
            return f"message body is {st.st_size} bytes, the envelope says {env.size}"
        return ""

    def save_sync(self, qid: QueueId, envelope: Envelope) -> None:
        """Replace the envelope atomically and durably. Call with the message's lock held.

        Raises FileNotFoundError if the body is gone (never recreate a half message) and
        OSError on a write fault, in which case the old envelope is still in place.
        """
        data = codec.encode(envelope)
        if not os.path.exists(self.body_path(qid)):
            raise FileNotFoundError(errno.ENOENT, "message body is gone", self.body_path(qid))
        tmp = os.path.join(self.tmp_dir, f"{qid}.{os.getpid()}-{next(_tmp_serial)}.save")
        fd = self._create_locked(tmp)
        try:
            write_all(fd, data)
            if self.fsync:
                os.fdatasync(fd)
            os.rename(tmp, os.path.join(self.env_dir, qid))
            if self.fsync:
                os.fsync(self._dir_fd())
        except BaseException:
            _unlink_quietly(tmp, qid)
            raise
        finally:
            os.close(fd)

    async def save(self, qid: QueueId, envelope: Envelope) -> None:
        await asyncio.to_thread(self.save_sync, qid, envelope)

    def remove_sync(self, qid: QueueId) -> None:
        """Delete a message: envelope first (the message ends there), then its body."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.env_dir, _checked(qid)))
        if self.fsync:
            os.fsync(self._dir_fd())
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.body_path(qid))

    async def remove(self, qid: QueueId) -> None:
        """``remove_sync`` on the commit thread, sharing the batch's ``env/`` fsync. A lock on
        ``qid`` this process holds goes with it (closed after the unlinks; ``release`` is
        then a no-op), so the inode's release never waits for the journal on the loop. If
        the removal fails, the lock is given back to its holder, still held."""
        committer = self.committer
        if committer is None or not committer.running:
            await asyncio.to_thread(self.remove_sync, qid)
            return
        env = os.path.join(self.env_dir, _checked(qid))
        lock = self._held.get(qid)
        item = RemoveItem(env, self.body_path(qid), lock.detach() if lock is not None else -1)
        done = committer.submit_removal(item)
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:
            # Nobody is left to take the lock back if the removal fails: close it then.
            done.add_done_callback(lambda _f: _close_kept(item))
            raise
        except BaseException:
            # Still queued and still locked: the lock goes back to its holder, so no other
            # worker can take the message in between (and deliver it again).
            if item.lock_fd >= 0:
                if lock is not None:
                    lock.attach(item.lock_fd, self._held)
                else:
                    os.close(item.lock_fd)
                item.lock_fd = -1
            raise

    # ------------------------------------------------------------------ the contract's
    # delivery side (pymta.contracts.QueueStore). A local directory answers at once: these
    # run the synchronous forms on the loop, as the queue manager has always done (one
    # small read or lock per call; a thread hop would cost more than the work).

    async def list_queued(self) -> list[QueueId]:
        return self.ids()

    async def claim(self, qid: QueueId) -> MessageLock | None:
        return self.try_lock(qid)

    async def load_envelope(self, qid: QueueId) -> Envelope | None:
        return self.load(qid)

    async def open_body(self, qid: QueueId) -> str:
        """``data/<qid>`` itself: it is never renamed or replaced after the commit."""
        return self.body_path(qid)

    async def open_message(self, qid: QueueId, envelope: Envelope) -> QueuedMessage:
        return QueuedMessage(qid, envelope, self.body_path(qid))

    async def exists(self, qid: QueueId) -> bool:
        return os.path.exists(self.body_path(qid))

    # ------------------------------------------------------------------ locking

    def try_lock(self, qid: QueueId) -> MessageLock | None:
        """The message's lock, or None if another holder has it or the message is gone."""
        try:
            fd = os.open(self.body_path(qid), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            # Removal unlinks the envelope first: an envelope still here has lost its body.
            if os.path.lexists(os.path.join(self.env_dir, qid)):
                self._quarantine(qid, "envelope without message body")
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # The holder we waited out may have delivered and removed the message.
            if (os.fstat(fd).st_nlink == 0
                    or not os.path.exists(os.path.join(self.env_dir, qid))):
                os.close(fd)
                return None
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        return MessageLock(qid, fd, self._held)

    def lock(self, qid: QueueId, timeout: float) -> MessageLock | None:
        """Like ``try_lock`` but waits up to ``timeout`` seconds for the holder (CLI use)."""
        deadline = time.monotonic() + timeout
        while True:
            lk = self.try_lock(qid)
            if lk is not None:
                return lk
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not os.path.exists(os.path.join(self.env_dir, qid)):
                return None
            time.sleep(min(0.05, remaining))

    # ------------------------------------------------------------------ helpers

    def _dir_fd(self) -> int:
        if self._env_fd < 0:
            raise RuntimeError("queue store is not open")
        return self._env_fd

    @staticmethod
    def _create_locked(path: str) -> int:
        """Create ``path`` exclusively and lock it, so start-up clean-up leaves it alone."""
        return create_locked(path, os.O_WRONLY, _FILE_MODE)

    @staticmethod
    def _drop(path: str, fd: int) -> None:
        """Remove a file we created and close it; the descriptor is closed whatever happens."""
        _unlink_quietly(path, "queue")
        with contextlib.suppress(OSError):
            os.close(fd)


def _close_kept(item: RemoveItem) -> None:
    """The lock a failed removal left open, when its caller is gone."""
    if item.lock_fd >= 0:
        with contextlib.suppress(OSError):
            os.close(item.lock_fd)
        item.lock_fd = -1


def _unlink_quietly(path: str, who: str) -> None:
    """Clean-up on an error path: a file already gone is fine, and one the file system will
    not let us remove (read-only, failing) is logged and left to the next start's clean-up,
    rather than replacing the error being handled."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("%s: cannot remove %s: %s", who, path, e)


def _shown(text: str) -> str:
    """A file name as it may appear in a log line: non-ASCII and control bytes escaped."""
    return ascii(text)[1:-1]


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks = []
    while limit > 0:
        chunk = os.read(fd, min(limit, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        limit -= len(chunk)
    return b"".join(chunks)


def _checked(qid: QueueId) -> QueueId:
    if not is_valid(qid):
        raise ValueError(f"not a queue id: {qid!r}")
    return qid
