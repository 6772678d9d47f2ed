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
    envelopes (and their bodies) the store could not use; kept for a human, never deleted.
``ready/<qid>``
    empty bodies made ahead of time (``prealloc``) by a spool thread, each locked by its
    process; ``new_spool`` hands one out and the commit links it into ``data/``.

Implementation summary. ``new_spool`` creates the body without a name (``O_TMPFILE``; on file
systems without it, in ``tmp/``), takes an exclusive ``flock`` on it, then hard-links it into
``data/`` (or ``ready/``): every body is locked from the moment it has a name there until its
commit has finished or failed. That lock is what makes start-up
clean-up safe with several processes on one spool: ``open()`` deletes a ``tmp/`` file or a
body without an envelope only if it can take the lock, i.e. no live process is writing it.
``commit`` flushes the body, writes the envelope to ``tmp/<qid>`` and hands both to the
``GroupCommitter``, which makes them durable and renames the envelope into ``env/``. Delivery
takes the same body lock (``try_lock``) so that exactly one process works on a message at a
time; ``flock`` locks die with their process, so a crashed worker never strands a message.
Envelope updates (``save``) are write-temp, fsync, rename, fsync-directory: a reader sees the
old or the new envelope, never a torn one.
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
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import BinaryIO

from pymta.queue import codec
from pymta.queue.committer import CommitItem, GroupCommitter, RemoveItem
from pymta.queue.ids import is_valid, new_qid
from pymta.types import Envelope, QueueId, TemporaryFailure

log = logging.getLogger("pymta.queue")

BUFFER_SIZE = 64 * 1024
_FILE_MODE = 0o600
_DIR_MODE = 0o700
_tmp_serial = itertools.count()
PREALLOC_MAX_AGE = 10.0     # seconds a prepared body may wait before its qid looks stale


def queue_write_error() -> TemporaryFailure:
    """The reply for any local fault while queueing: the client keeps the message and retries."""
    return TemporaryFailure("Local error in processing: queue file write error", "4.3.0", 451)


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


class SpoolWriter:
    """A message body being received; pass it to ``QueueStore.commit`` or call ``abort``.

    ``write`` goes through a 64 KiB buffer straight into ``data/<qid>`` on the caller's
    thread: page-cache writes are fast, and the one slow step (the flush to disk) is shared
    with other messages in the committer. ``write`` may raise OSError (disk full); the caller
    answers 451 and calls ``abort``.
    """

    _OPEN, _COMMITTING, _COMMITTED, _ABORTED = range(4)

    def __init__(self, store: QueueStore, qid: QueueId, fd: int | BinaryIO,
                 path: str | None = None) -> None:
        self.qid = qid
        # data/<qid>, or ready/<qid> for a prepared body: the commit links it into data/
        self.path = path or store.body_path(qid)
        self.size = 0
        self._store = store
        # A prepared body comes with its buffered file already built by the spool thread
        # (``_open_body``): its fstat and lseek each release the GIL, and getting it back
        # can wait for the spool and commit threads, so the event loop should not do them.
        self._file = fd if not isinstance(fd, int) else _open_body(fd)
        self._state = self._OPEN
        # After a commit with ``QueueStore.hand_over_locks``: the message's lock, still held.
        self.lock: MessageLock | None = None

    @property
    def closed(self) -> bool:
        return self._state != self._OPEN

    def write(self, data: bytes) -> None:
        if self._state != self._OPEN:
            raise ValueError(f"{self.qid}: spool file is not open for writing")
        self._file.write(data)
        self.size += len(data)

    def flush(self) -> None:
        """Hand buffered bytes to the kernel so readers of ``path`` (pipeline stages) see the
        whole message; durability is still the committer's job."""
        if self._state == self._OPEN:
            self._file.flush()

    def abort(self) -> None:
        """Forget the message. Idempotent; a no-op once ``commit`` has taken the writer."""
        if self._state == self._OPEN:
            self._discard()

    def _discard(self) -> None:
        self._state = self._ABORTED
        # Unlink before closing: the lock is held until the name is gone.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._close()

    def _close(self) -> None:
        try:
            self._file.close()      # closes the descriptor even when the final flush fails
        except OSError as e:
            # Only an aborted writer can still have buffered bytes; they are garbage anyway.
            log.warning("%s: closing spool file: %s", self.qid, e)


class QueueStore:
    """The queue directory. ``open()`` first; ``await start()`` before committing.

    ``fsync=False`` skips every flush (renames still happen): only for benchmarks that want to
    measure everything but the disk. ``committer_class`` exists so tests can inject faults.
    """

    committer_class: type[GroupCommitter] = GroupCommitter

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True,
                 hand_over_locks: bool = False, prealloc: int = 0) -> None:
        """``hand_over_locks``: a committed writer keeps its message locked in ``writer.lock``
        for the caller to pass to the delivery (the server does); else the lock is released.
        ``prealloc``: after ``start()``, keep up to this many empty bodies ready for
        ``new_spool`` (a server's hot path); each is locked, so clean-up leaves them alone,
        and ``close()`` (or, after a crash, the next ``open()``) removes the unused ones."""
        self.root = os.path.abspath(os.fspath(root))
        self.fsync = fsync
        self.hand_over_locks = hand_over_locks
        self.prealloc = prealloc
        self._ready: collections.deque[tuple[QueueId, BinaryIO, float]] = collections.deque()
        self._filling = False
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
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
        self._root_fd = os.open(self.root, flags)
        self._data_fd = os.open(self.data_dir, flags)
        self._env_fd = os.open(self.env_dir, flags)
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

    async def close(self) -> None:
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
        for name in os.listdir(self.tmp_dir):
            removed += self._unlink_if_unused(os.path.join(self.tmp_dir, name), None)
        for name in os.listdir(self.ready_dir):
            removed += self._unlink_if_unused(os.path.join(self.ready_dir, name), None)
        # env/ is listed before data/: a commit creates the body before the envelope, so any
        # envelope seen here already has its body in the later data/ listing (unless removed).
        envs = {n for n in os.listdir(self.env_dir) if is_valid(n)}
        bodies = {n for n in os.listdir(self.data_dir) if is_valid(n)}
        for qid in sorted(bodies - envs):
            removed += self._unlink_if_unused(self.body_path(qid), qid)
        for qid in sorted(envs - bodies):
            if os.path.exists(self.body_path(qid)):
                continue
            if self._quarantine(qid):
                log.error("%s: envelope without message body; moved to %s", qid,
                          self.corrupt_dir)
        if removed:
            log.info("queue %s: removed %d unfinished file(s)", self.root, removed)

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

    def _quarantine(self, qid: QueueId) -> bool:
        """Move an unusable envelope (and its body, if any) to ``corrupt/``; False if gone."""
        dst = os.path.join(self.corrupt_dir, qid)
        if os.path.lexists(dst):
            dst = f"{dst}.{time.time_ns()}"
        try:
            os.rename(os.path.join(self.env_dir, qid), dst)
        except FileNotFoundError:
            return False
        with contextlib.suppress(FileNotFoundError):
            os.rename(self.body_path(qid), dst + ".body")
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
        return SpoolWriter(self, qid, fd)

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
                    self._ready.append((qid, _open_body(fd), time.monotonic()))
        except OSError as e:
            log.warning("queue: cannot prepare spool files: %s", e)
        finally:
            self._filling = False

    def _discard_bodies(self, bodies: list[tuple[QueueId, BinaryIO, float]]) -> None:
        for qid, f, _ in bodies:
            self._discard_body(qid, f)

    def _discard_body(self, qid: QueueId, f: BinaryIO) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.ready_dir, _checked(qid)))
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

    def rewrite_spool_sync(self, writer: SpoolWriter,
                           transform: Callable[[BinaryIO, BinaryIO], None]) -> None:
        """Replace a not yet committed body by ``transform(old, new)``'s output, same qid.

        For the rare pre-queue edit of the message as received (dropping a forged header
        field). The new body is built in ``tmp/`` under its own lock and renamed over
        ``data/<qid>``; the writer then holds the new file (and its lock). A crash at any
        point leaves an uncommitted body or a ``tmp/`` file, both removed by clean-up; the
        committer's flush of ``data/`` makes the rename durable with the commit. Raises
        OSError; the writer is unchanged (still the old body) if the rename did not happen.
        """
        if writer._store is not self or writer.closed:
            raise ValueError(f"{writer.qid}: spool writer is not open")
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
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            with contextlib.suppress(OSError):
                new.close()
            raise
        old_file, writer._file = writer._file, new
        writer.size = size
        with contextlib.suppress(OSError):
            old_file.close()    # the replaced inode: its lock goes with it

    async def rewrite_spool(self, writer: SpoolWriter,
                            transform: Callable[[BinaryIO, BinaryIO], None]) -> None:
        await asyncio.to_thread(self.rewrite_spool_sync, writer, transform)

    async def commit(self, writer: SpoolWriter, envelope: Envelope) -> QueueId:
        """Make the message durable; on return it may be acknowledged with 250.

        Sets ``envelope.size``. Any local fault removes the message's files and raises
        TemporaryFailure (451 4.3.0), so a client never gets 250 for something not on disk.
        """
        if writer._store is not self or writer.closed:
            raise ValueError(f"{writer.qid}: spool writer is not open")
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
            raise queue_write_error() from e
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
            raise queue_write_error() from e
        return qid

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
        _write_all(env_fd, data)

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
            with contextlib.suppress(FileNotFoundError):
                os.unlink(item.dst)
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
            raise queue_write_error() from e
        try:
            writer.write(data)
        except OSError as e:
            log.error("%s: queue file write error: %s", writer.qid, e)
            writer.abort()
            raise queue_write_error() from e
        qid = await self.commit(writer, envelope)
        lock = getattr(writer, "lock", None)
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
        """The envelope, or None if the message is gone or unreadable (then it is quarantined).

        An I/O error other than "not found" propagates: that is not a verdict on the message.
        """
        try:
            with open(os.path.join(self.env_dir, _checked(qid)), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        try:
            return codec.decode(data)
        except codec.UnsupportedVersion as e:
            log.error("%s: %s; leaving it for a newer pymta", qid, e)
            return None
        except codec.CodecError as e:
            if self._quarantine(qid):
                log.error("%s: unreadable envelope (%s); moved to %s", qid, e, self.corrupt_dir)
            return None

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
            _write_all(fd, data)
            if self.fsync:
                os.fdatasync(fd)
            os.rename(tmp, os.path.join(self.env_dir, qid))
            if self.fsync:
                os.fsync(self._dir_fd())
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
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
        then a no-op), so the inode's release never waits for the journal on the loop."""
        committer = self.committer
        if committer is None or not committer.running:
            await asyncio.to_thread(self.remove_sync, qid)
            return
        env = os.path.join(self.env_dir, _checked(qid))
        lock = self._held.get(qid)
        item = RemoveItem(env, self.body_path(qid), lock.detach() if lock is not None else -1)
        await asyncio.shield(committer.submit_removal(item))

    # ------------------------------------------------------------------ locking

    def try_lock(self, qid: QueueId) -> MessageLock | None:
        """The message's lock, or None if another holder has it or the message is gone."""
        try:
            fd = os.open(self.body_path(qid), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
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
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        return fd

    @staticmethod
    def _drop(path: str, fd: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        with contextlib.suppress(OSError):
            os.close(fd)


def _open_body(fd: int) -> BinaryIO:
    """The buffered file a ``SpoolWriter`` writes through; owns (and closes) ``fd``."""
    try:
        return open(fd, "wb", buffering=BUFFER_SIZE, closefd=True)  # noqa: SIM115
    except BaseException:
        os.close(fd)
        raise


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _checked(qid: QueueId) -> QueueId:
    if not is_valid(qid):
        raise ValueError(f"not a queue id: {qid!r}")
    return qid
