"""The durable on-disk queue: message bodies, envelopes, and per-message locks.

Layout under the store root (all directories 0700, one filesystem):

``tmp/``
    files being created: envelopes waiting for their commit, atomic rewrites, and bodies for
    the instant between creation and getting a name in ``data/``.
``data/<qid>``
    the body, written in place while DATA/BDAT arrives and never renamed or replaced after
    the commit, so a lock on it stays meaningful for the life of the message.
``env/<qid>``
    the envelope (``codec`` JSON). Its presence is THE commit point: a message exists iff its
    envelope is in ``env/``; everything else is scaffolding.
``corrupt/``
    envelopes (and their bodies) the store could not use; kept for a human, never deleted.

Implementation summary. ``new_spool`` creates the body in ``tmp/``, takes an exclusive
``flock`` on it, then hard-links it into ``data/``: every body is locked from the moment it has
a name in ``data/`` until its commit has finished or failed. That lock is what makes start-up
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
import contextlib
import errno
import fcntl
import functools
import itertools
import logging
import os
import time
from types import TracebackType

from pymta.queue import codec
from pymta.queue.committer import CommitItem, GroupCommitter
from pymta.queue.ids import is_valid, new_qid
from pymta.types import Envelope, QueueId, TemporaryFailure

log = logging.getLogger("pymta.queue")

BUFFER_SIZE = 64 * 1024
_FILE_MODE = 0o600
_DIR_MODE = 0o700
_tmp_serial = itertools.count()


def queue_write_error() -> TemporaryFailure:
    """The reply for any local fault while queueing: the client keeps the message and retries."""
    return TemporaryFailure("Local error in processing: queue file write error", "4.3.0", 451)


class MessageLock:
    """Exclusive right to work on one message, held as an ``flock`` on its body.

    Released by ``release()``, by leaving the ``with`` block, or by the process dying.
    """

    __slots__ = ("qid", "_fd")

    def __init__(self, qid: QueueId, fd: int) -> None:
        self.qid = qid
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def release(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            # Unlock explicitly: a forked child sharing the descriptor must not keep it held.
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

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

    def __init__(self, store: QueueStore, qid: QueueId, fd: int) -> None:
        self.qid = qid
        self.path = store.body_path(qid)
        self.size = 0
        self._store = store
        self._file = open(fd, "wb", buffering=BUFFER_SIZE, closefd=True)  # noqa: SIM115
        self._state = self._OPEN

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

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self.fsync = fsync
        self.tmp_dir = os.path.join(self.root, "tmp")
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
        for path in (self.root, self.tmp_dir, self.data_dir, self.env_dir, self.corrupt_dir):
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

    async def close(self) -> None:
        """Finish queued commits, stop the committer thread, close the directories."""
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
        """A new, locked, empty body in ``data/``. Raises OSError (disk full...) like ``write``."""
        for _ in range(10):
            qid = new_qid()
            tmp = os.path.join(self.tmp_dir, qid + ".body")
            try:
                fd = self._create_locked(tmp)
            except (FileExistsError, BlockingIOError):
                continue    # id collision, or another process's clean-up is deleting it
            try:
                os.link(tmp, self.body_path(qid))   # unlike rename, never replaces a file
            except (FileExistsError, FileNotFoundError):
                # id collision, or another process's clean-up took tmp before we locked it
                self._drop(tmp, fd)
                continue
            except BaseException:
                self._drop(tmp, fd)
                raise
            try:
                os.unlink(tmp)
            except OSError as e:    # a stray second name is harmless; clean-up removes it
                log.warning("%s: %s", qid, e)
            return SpoolWriter(self, qid, fd)
        raise FileExistsError(errno.EEXIST, "no unused queue id after 10 attempts")

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
        env_fd = -1
        try:
            writer._file.flush()
            envelope.size = writer.size
            data = codec.encode(envelope)
            env_fd = self._create_locked(env_tmp)
            _write_all(env_fd, data)
        except Exception as e:
            if isinstance(e, OSError):
                log.error("%s: queue file write error: %s", qid, e)
            else:
                log.exception("%s: cannot write envelope", qid)
            if env_fd >= 0:
                self._drop(env_tmp, env_fd)
            writer._discard()
            raise queue_write_error() from e
        writer._state = writer._COMMITTING
        item = CommitItem(qid, (writer._file.fileno(), env_fd), env_tmp,
                          os.path.join(self.env_dir, qid),
                          functools.partial(self._finish_commit, writer, env_fd))
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

    def _finish_commit(self, writer: SpoolWriter, env_fd: int, item: CommitItem,
                       err: BaseException | None) -> None:
        if err is None:
            with contextlib.suppress(OSError):
                os.close(env_fd)    # the envelope is durable already; nothing left to lose
            writer._state = writer._COMMITTED
            writer._close()                     # releases the body lock for delivery
            return
        log.error("%s: queue file write error: %s", item.qid, err)
        if item.renamed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(item.dst)
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
        return await self.commit(writer, envelope)

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
        await asyncio.to_thread(self.remove_sync, qid)

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
        return MessageLock(qid, fd)

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


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _checked(qid: QueueId) -> QueueId:
    if not is_valid(qid):
        raise ValueError(f"not a queue id: {qid!r}")
    return qid
