"""Group commit on SQLite: every write of one process's queue in one transaction per batch.

The rule is the file store's (``pymta.queue.committer``): one asyncio task takes *everything*
pending as one batch and runs it on one dedicated thread, with its own database connection
(``synchronous=FULL``: ``COMMIT`` returns once the WAL is on disk). A job submitted while
nothing is in flight starts a batch at once, so a commit alone never waits for a timer or for
other commits; batches grow only while a flush is already running (issue 14, item 2).

One batch, in this order (the crash-safety argument):

1. each job's ``prepare`` (files: a large body renamed into ``data/`` and ``fdatasync``-ed,
   a small one read back); then ``data/`` fsynced once if a job asked for it, so a row never
   points at a body whose name could vanish in a power cut;
2. ``BEGIN IMMEDIATE``, each job's ``apply`` (its rows), ``COMMIT``: the commit point of
   every job of the batch at once;
3. each job's ``after`` (files that may go now: a removed message's body), then, on the
   event loop, each job's ``done`` and its future.

Which batches are flushed: every batch with a commit or an envelope save runs with
``synchronous=FULL`` (its ``COMMIT`` returns once the WAL is on disk); a batch of only
removals and claim releases (``Job.durable`` False) with ``NORMAL``: written to the WAL, not
flushed, made durable by the next flushed batch. A power cut can then bring back a message
that was delivered (a duplicate, as with Postfix, which does not flush a queue file's
removal either); a process crash cannot (the WAL is in the page cache).

An error is charged to the job that raised it (its statement alone is undone, SQLite's
statement rollback); an error that undoes the whole transaction (a full disk, an I/O error,
the ``COMMIT`` itself) fails every job of the batch. A crash before ``COMMIT`` returns loses
only jobs that were never acknowledged: SQLite's WAL ignores a transaction without its
commit frame. Errors reach callers as ``OSError`` (:func:`os_error`), so the replies for a
full disk and a failing one are the file store's.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import functools
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pymta import metrics
from pymta.types import QueueId

log = logging.getLogger("pymta.queue")

# SQLite's primary result codes -> errno: a full disk must read as one (452 4.3.1).
_ERRNO = {13: errno.ENOSPC, 8: errno.EROFS, 5: errno.EAGAIN, 6: errno.EAGAIN,
          10: errno.EIO, 11: errno.EIO, 14: errno.EIO, 26: errno.EIO}


BUSY_TIMEOUT = 30.0     # seconds a writer waits for another process's transaction


def os_error(err: BaseException) -> OSError:
    """``err`` as the OSError callers handle: sqlite3 errors mapped by their result code."""
    if isinstance(err, OSError):
        return err
    code = getattr(err, "sqlite_errorcode", None)
    number = _ERRNO.get(code & 0xFF, errno.EIO) if isinstance(code, int) else errno.EIO
    if "full" in str(err):
        number = errno.ENOSPC
    return OSError(number, f"queue database: {err}")


class WriteTurn:
    """This connection's turn at writing the database, between the processes sharing it: an
    ``flock`` on ``<db>-turn`` held from ``BEGIN IMMEDIATE`` to ``COMMIT``.

    Why: SQLite lets a writer that finds the database locked wait in sleeps of 1, 2, 5, 10 ...
    ms (its busy handler polls), so with two workers committing every few milliseconds each
    batch waited for whole sleeps behind the other's (idle cores, slower commits and a long
    tail). The turn is asked for every 50 µs, growing to 1 ms: taken within a millisecond
    of the holder letting go (``python -m benchmarks.write_turn``). Each
    connection has its own open file (``flock`` locks belong to it), and threads of one
    process sharing a connection already take turns under its Python lock. Writers that do
    not take a turn (the commands, rare clean-ups) still meet SQLite's busy timeout."""

    def __init__(self, db_path: str, timeout: float = BUSY_TIMEOUT) -> None:
        self._fd = os.open(db_path + "-turn", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.timeout = timeout
        self._held = False

    def __enter__(self) -> WriteTurn:
        """Wait for the turn, polling every 50 µs growing to 1 ms (no timed ``flock`` in
        POSIX); after ``timeout`` (a holder stopped or hung) go on without it, as before:
        SQLite still orders the writes, and its busy timeout turns a stuck holder into a
        4xx instead of a wait without end."""
        pause = 50e-6
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    log.warning("queue database: no write turn after %gs; writing without",
                                self.timeout)
                    return self
                time.sleep(pause)
                pause = min(pause * 2, 1e-3)
                continue
            self._held = True
            return self

    def __exit__(self, *exc: object) -> None:
        if self._held:
            self._held = False
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


def connect(path: str, *, synchronous: str = "FULL",
            checkpoints: bool = True) -> sqlite3.Connection:
    """A connection to the queue database: autocommit mode (transactions are explicit),
    WAL, ``synchronous`` as asked, a busy timeout for the other processes' batches.
    ``checkpoints`` False: this connection never copies the WAL into the database itself
    (those used on the event loop: a checkpoint is many writes and an fsync; the
    committer's thread does them)."""
    con = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                          timeout=BUSY_TIMEOUT)
    try:
        mode = con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise OSError(errno.EIO, f"queue database {path}: journal mode {mode}, not wal")
        con.execute(f"PRAGMA synchronous={synchronous}")
        if not checkpoints:
            con.execute("PRAGMA wal_autocheckpoint=0")
    except BaseException:
        con.close()
        raise
    return con


@dataclass(eq=False)
class Job:
    """One write handed to the committer (see the module docstring for when each part runs).

    ``take`` runs on the event loop when a batch picks the job up; False drops it (a claim's
    release that was taken back meanwhile; its future resolves at once). ``sync_dir``:
    ``prepare`` created a name in ``data/`` that must be durable before the transaction.
    ``done`` runs on the event loop before the future resolves, with the job's error or None.
    """

    qid: QueueId
    apply: Callable[[sqlite3.Connection], None]
    prepare: Callable[[Job], None] | None = None
    after: Callable[[], None] | None = None
    done: Callable[[BaseException | None], None] | None = None
    take: Callable[[], bool] | None = None
    sync_dir: bool = False
    # False: a write whose loss in a power cut costs at most a duplicate (a removal, a claim's
    # release); a batch of only such writes is not flushed: the next flushed batch makes it
    # durable with itself (the WAL is one sequence). Postfix does not flush a removal either.
    durable: bool = True
    new_message: bool = False   # a commit: what pymta_commit_batch_size counts
    future: asyncio.Future[None] | None = field(default=None, repr=False)


class SqlCommitter:
    """Batches jobs into shared transactions on one thread and one connection."""

    def __init__(self, db_path: str, data_dir_fd: int, *, fsync: bool = True) -> None:
        self.db_path = db_path
        self.fsync = fsync
        self._data_dir_fd = data_dir_fd
        self._con: sqlite3.Connection | None = None
        self._turn: WriteTurn | None = None
        self._flushing = True       # the connection's synchronous: FULL (True) or NORMAL
        self._pending: list[Job] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closing = False
        self.loop: asyncio.AbstractEventLoop | None = None    # the loop it runs in
        self.batches = 0        # transactions committed (or tried)
        self.commits = 0        # jobs that waited for a future (commits, saves, removals)
        self.max_batch = 0

    @property
    def running(self) -> bool:
        return self._task is not None and not self._closing

    async def start(self) -> None:
        if self._task is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pymta-commit")
        loop = asyncio.get_running_loop()
        self._con = await loop.run_in_executor(
            self._executor, functools.partial(connect, self.db_path,
                                              synchronous="FULL" if self.fsync else "OFF"))
        self._turn = WriteTurn(self.db_path)
        self._task = loop.create_task(self._run(), name="pymta-commit")
        self.loop = loop

    def submit(self, job: Job, *, wait: bool = True) -> asyncio.Future[None] | None:
        """Queue ``job``; with ``wait`` a future that resolves once it is durable, or fails
        with its OSError. RuntimeError when the committer is not running."""
        if not self.running:
            raise RuntimeError("queue committer is not running")
        if wait:
            job.future = asyncio.get_running_loop().create_future()
        self._pending.append(job)
        self._wakeup.set()
        return job.future

    async def close(self) -> None:
        """Stop taking jobs, finish every one already queued, close the connection."""
        if self._task is None:
            return
        self._closing = True
        self._wakeup.set()
        await self._task
        executor, self._executor = self._executor, None
        if executor is not None:
            con, self._con = self._con, None
            if con is not None:
                await asyncio.get_running_loop().run_in_executor(executor, con.close)
            executor.shutdown(wait=True)
        if self._turn is not None:
            self._turn.close()
            self._turn = None

    # ------------------------------------------------------------------ event loop side

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            taken, self._pending = self._pending, []
            batch = []
            for job in taken:
                if job.take is None or job.take():
                    batch.append(job)
                elif job.future is not None and not job.future.done():
                    job.future.set_result(None)     # dropped: nothing left to wait for
            if not batch:
                continue
            work = loop.run_in_executor(self._executor, self._flush, batch)
            try:
                errors = await asyncio.shield(work)
            except asyncio.CancelledError:
                work.add_done_callback(functools.partial(self._finish_late, batch))
                raise
            except Exception as e:      # a bug in _flush: every job is in doubt
                log.exception("queue group commit failed")
                errors = [e] * len(batch)
            self._finish(batch, errors)
            # messages made durable by this flush, as the file store counts (not the saves,
            # removals and claim releases that share the transaction)
            committed = sum(1 for job in batch if job.new_message)
            if committed:
                metrics.commit_batch(committed)

    def _finish_late(self, batch: list[Job],
                     work: asyncio.Future[list[BaseException | None]]) -> None:
        if work.cancelled():
            errors: list[BaseException | None] = [RuntimeError("commit cancelled")] * len(batch)
        elif work.exception() is not None:
            errors = [work.exception()] * len(batch)
        else:
            errors = work.result()
        self._finish(batch, errors)

    @staticmethod
    def _finish(batch: list[Job], errors: list[BaseException | None]) -> None:
        for job, err in zip(batch, errors, strict=True):
            if job.done is not None:
                try:
                    job.done(err)
                except Exception:
                    log.exception("%s: commit clean-up failed", job.qid)
            fut = job.future
            if fut is not None and not fut.done():
                if err is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(err)

    # ------------------------------------------------------------------ commit thread side

    def _flush(self, batch: list[Job]) -> list[BaseException | None]:
        """One transaction for ``batch``: the error (or None) of each job."""
        con = self._con
        assert con is not None
        errors: list[BaseException | None] = [None] * len(batch)
        for i, job in enumerate(batch):
            if job.prepare is not None:
                try:
                    job.prepare(job)
                except OSError as e:
                    errors[i] = e
        self._sync_data_dir(batch, errors)
        if any(e is None for e in errors):
            assert self._turn is not None
            flushed = self.fsync and any(job.durable for job, e in zip(batch, errors,
                                                                        strict=True)
                                         if e is None)
            if self.fsync and not self._synchronous(con, flushed):
                # still NORMAL, and this batch must be durable at its COMMIT: not written
                _fail_remaining(errors, OSError(errno.EIO, "queue database: cannot flush"))
            else:
                with self._turn:
                    self._transaction(con, batch, errors)
        for job, err in zip(batch, errors, strict=True):
            if err is None and job.after is not None:
                try:
                    job.after()
                except OSError as e:    # the job is done; a leftover file is clean-up's
                    log.warning("%s: %s", job.qid, e)
        self.batches += 1
        waited = sum(1 for job in batch if job.future is not None)
        self.commits += waited
        self.max_batch = max(self.max_batch, waited)
        return errors

    def _synchronous(self, con: sqlite3.Connection, flushed: bool) -> bool:
        """``synchronous=FULL`` for a batch that must be durable at its COMMIT, else NORMAL
        (WAL: written, not flushed; the next FULL commit flushes it too). False when FULL
        was needed and could not be set: the batch must not be written then."""
        if flushed != self._flushing:
            try:
                con.execute(f"PRAGMA synchronous={'FULL' if flushed else 'NORMAL'}")
            except sqlite3.Error as e:      # stays as it was
                log.warning("queue database: cannot set synchronous: %s", e)
                return not flushed
            self._flushing = flushed
        return True

    def _sync_data_dir(self, batch: list[Job], errors: list[BaseException | None]) -> None:
        if not self.fsync:
            return
        wanting = [i for i, job in enumerate(batch) if job.sync_dir and errors[i] is None]
        if wanting:
            try:
                os.fsync(self._data_dir_fd)
            except OSError as e:
                for i in wanting:
                    errors[i] = e

    @staticmethod
    def _transaction(con: sqlite3.Connection, batch: list[Job],
                     errors: list[BaseException | None]) -> None:
        try:
            con.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            _fail_remaining(errors, os_error(e))
            return
        for i, job in enumerate(batch):
            if errors[i] is not None:
                continue
            try:
                job.apply(con)
            except (sqlite3.Error, OSError) as e:
                err = errors[i] = os_error(e)
                if not con.in_transaction:      # SQLite undid the whole transaction
                    _fail_remaining(errors, err)
                    return
        try:
            con.execute("COMMIT")
        except sqlite3.Error as e:
            err = os_error(e)
            if con.in_transaction:
                try:
                    con.execute("ROLLBACK")
                except sqlite3.Error as e2:
                    log.error("queue database: rollback failed: %s", e2)
            _fail_remaining(errors, err)


def _fail_remaining(errors: list[BaseException | None], err: BaseException) -> None:
    for i, e in enumerate(errors):
        if e is None:
            errors[i] = err
