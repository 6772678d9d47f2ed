"""The durable queue in one SQLite database: a row per message, no file per message.

Why: the file store (``pymta.queue.store``) creates three inodes per message and frees two,
and that, not Python, was the floor of the server's rate (issue 14; ``benchmarks/README.md``,
"Queue designs side by side"). SQLite in WAL mode measured within 1 % end to end of the
cheapest design of our own, so the existing engine is kept: its crash safety is tested far
beyond anything we would write.

Layout under the store root (directories 0700, one file system):

``queue.db`` (+ ``-wal``, ``-shm``)
    table ``messages``: ``qid`` (primary key), ``envelope`` (the bytes of
    :mod:`pymta.queue.codec`), ``body`` (the body inline, or NULL when it is the file
    ``data/<qid>``), ``received``, ``owner`` (the process working on it, see Claims). The
    row is THE commit point: a message exists iff its row does. Table ``set_aside``: rows
    the store could not use (an unreadable envelope, a missing or truncated body), each
    logged once when moved there and never read again.
``data/<qid>``
    bodies above ``INLINE_MAX`` (256 KiB): the spool file renamed here and ``fdatasync``-ed
    in the batch, before the transaction that inserts the row.
``spool/<pid>.<n>``
    each process's reused spool files (:mod:`pymta.queue.sqlspool`), locked while it lives.
``corrupt/``
    large bodies of set-aside rows, and files that do not belong in ``data/``.

Writes are batched (:mod:`pymta.queue.sqlcommit`): one ``BEGIN IMMEDIATE … COMMIT`` per
batch on the committer's own connection (``synchronous=FULL``), a commit alone at once.
Commits, envelope saves, removals and claim releases ride on the same batches.

Claims. ``owner`` holds a token of the process (pid and its start time, field 22 of
``/proc/<pid>/stat``, so a reused pid is not mistaken for the old process). A committed
message is owned by the committing process from its insert (``hand_over_locks``): the first
delivery attempt costs no extra write. Claiming another message is one ``UPDATE … WHERE
owner`` is what was read: NULL, or a process that is gone (checked through ``/proc``), so a
crashed worker's claims are taken over by the others; it never waits for a live holder.
``release`` clears the owner in the next batch. A claim needs no durability (after a power
cut every owner is dead), so that connection runs with ``synchronous=NORMAL``.

Start-up (``open``): stale spool files of dead processes and orphan bodies in ``data/`` are
removed, rows whose body file is missing are set aside, and a queue directory in the file
store's layout (``env/`` + ``data/``) is imported in batches, durably, then its files removed
(:mod:`pymta.queue.sqlconvert`); a crash midway imports again without duplicates.

Bodies in memory. A spool keeps a small body in memory (``sqlspool``), the commit puts it
in the row from there, and the committing process keeps it (``RESIDENT_MAX`` in all) for the
first delivery attempt, which gets it as ``QueuedMessage.body`` (``open_message``): a message
that fits is written once to the WAL and once to its mailbox, never to a file of ours. A
scratch file is made only when an agent asks for ``body_path``. The commands and the
metrics' census pick this store by what the directory holds (``pymta.queue.choice``).
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
import sqlite3
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import BinaryIO

from pymta import contracts
from pymta.queue import codec
from pymta.queue.ids import is_valid, new_qid
from pymta.queue.space import FreeSpace, shortage
from pymta.queue.sqlcommit import Job, SqlCommitter, WriteTurn, connect, os_error
from pymta.queue.sqlconvert import convert, move_aside, remove_unlocked
from pymta.queue.sqlspool import BUFFER_SIZE, PooledSpool, PoolFile, SpoolPool, read_file
from pymta.queue.store import (
    MAX_ENVELOPE_BYTES,
    insufficient_storage,
    queue_write_error,
)
from pymta.types import Envelope, QueuedMessage, QueueId, SpoolClosedError, TemporaryFailure

log = logging.getLogger("pymta.queue")

INLINE_MAX = 256 * 1024     # larger bodies stay files in data/
RESIDENT_MAX = 32 << 20     # bodies a process keeps after their commit, for the first attempt
_DIR_MODE = 0o700
_stores = itertools.count()     # numbers the stores of this process (owner tokens)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    qid TEXT PRIMARY KEY NOT NULL,
    envelope BLOB NOT NULL,
    body BLOB,
    received REAL NOT NULL,
    owner TEXT
);
CREATE TABLE IF NOT EXISTS set_aside (
    qid TEXT NOT NULL,
    envelope BLOB,
    body BLOB,
    why TEXT NOT NULL,
    at REAL NOT NULL
);
"""


# ---------------------------------------------------------------------------- owners

def _start_time(pid: int) -> str | None:
    """Field 22 of ``/proc/<pid>/stat`` (start time in clock ticks), None if no such
    process (or no ``/proc``)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2:].split()     # after "pid (comm) ": field 3 on
    return fields[19].decode() if len(fields) > 19 else None


@functools.cache
def _token_of(pid: int) -> str:
    return f"{pid}:{_start_time(pid) or 0}"


def owner_token() -> str:
    """This process's owner token, ``pid:start`` (a forked child gets its own). A store
    appends ``:n``, its own number in the process, so two stores of one process (a test's
    "other worker") exclude each other too."""
    return _token_of(os.getpid())


def owner_alive(token: str) -> bool:
    """Whether the process of ``token`` still runs. Without ``/proc`` nobody can tell: then
    every owner counts as alive (claims are never taken over, never stolen)."""
    pid, _, rest = token.partition(":")
    start = rest.partition(":")[0]
    if not pid.isdigit():
        return False
    now = _start_time(int(pid))
    if now is None:
        return not os.path.isdir("/proc/self")
    return now == start


class SqlLock:
    """The claim on one message (``owner`` in its row): see the module docstring."""

    __slots__ = ("qid", "_store")

    def __init__(self, qid: QueueId, store: SqliteQueueStore) -> None:
        self.qid = qid
        self._store: SqliteQueueStore | None = store
        store._held[qid] = self

    @property
    def held(self) -> bool:
        return self._store is not None

    def release(self) -> None:
        store, self._store = self._store, None
        if store is not None:
            store._release(self)

    def __enter__(self) -> SqlLock:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<SqlLock {self.qid} {'held' if self.held else 'released'}>"


# ---------------------------------------------------------------------------- the store

class SqliteQueueStore:
    """The queue in ``<root>/queue.db``, shared by the worker processes of one state
    directory; the same public surface as :class:`pymta.queue.store.QueueStore`. ``open()``
    first; ``await start()`` before committing; ``await aclose()`` at the end."""

    committer_class: type[SqlCommitter] = SqlCommitter

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True,
                 hand_over_locks: bool = False, prealloc: int = 0,
                 space_ttl: float = 1.0) -> None:
        """As the file store's; ``prealloc`` is accepted and unused (spool files are
        reused, there is nothing to make ahead)."""
        self.root = os.path.abspath(os.fspath(root))
        self.space = FreeSpace(self.root, space_ttl)
        self._warned: object = None
        self.fsync = fsync
        self.hand_over_locks = hand_over_locks
        self.prealloc = prealloc
        self.db_path = os.path.join(self.root, "queue.db")
        self.data_dir = os.path.join(self.root, "data")
        self.spool_dir = os.path.join(self.root, "spool")
        self.corrupt_dir = os.path.join(self.root, "corrupt")
        self.committer: SqlCommitter | None = None
        self._con: sqlite3.Connection | None = None       # reads, durable synchronous writes
        self._claims: sqlite3.Connection | None = None    # claims and their releases
        self._db_lock = threading.RLock()                 # both connections, any thread
        self._data_fd = -1
        self._pool = SpoolPool(self.spool_dir)
        self._held: dict[QueueId, SqlLock] = {}
        self._scratch: dict[QueueId, PoolFile] = {}       # inline bodies handed to agents
        self._scratch_lock = threading.Lock()             # agents make them in threads
        self._resident: dict[QueueId, bytes] = {}         # just committed, claim held
        self._resident_bytes = 0
        self._releases: set[QueueId] = set()              # claims to clear in the next batch
        self._releasing: set[QueueId] = set()             # ... in the batch being written
        self._claiming: set[QueueId] = set()              # claims being written (thread)
        self._claims_lock = threading.Lock()              # the claims connection
        self._claims_writer: WriteTurn | None = None      # its turn at writing
        self._release_waits: dict[QueueId, asyncio.Future[None]] = {}
        self._number = next(_stores)

    # ------------------------------------------------------------------ lifecycle

    def open(self) -> None:
        """Create the layout, recover after a crash, convert an old queue directory; safe
        while other processes run (one process at a time does this, under a lock)."""
        if self._con is not None:
            return
        for path in (self.root, self.data_dir, self.spool_dir, self.corrupt_dir):
            try:
                os.mkdir(path, _DIR_MODE)
            except FileExistsError:
                continue
            os.chmod(path, _DIR_MODE)
        lock_fd = os.open(os.path.join(self.root, "queue.lock"),
                          os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            self._con = connect(self.db_path, synchronous="FULL" if self.fsync else "OFF",
                                checkpoints=False)
            self._con.executescript(_SCHEMA)
            self._claims = connect(self.db_path, synchronous="NORMAL", checkpoints=False)
            self._data_fd = os.open(self.data_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            self._recover()
        except sqlite3.Error as e:
            self._close_db()
            raise os_error(e) from e
        except BaseException:
            self._close_db()
            raise
        finally:
            os.close(lock_fd)

    async def start(self) -> None:
        self.open()
        if self.committer is None or not self.committer.running:
            self.committer = self.committer_class(self.db_path, self._data_fd, fsync=self.fsync)
        await self.committer.start()

    async def aclose(self) -> None:
        """Finish queued commits and releases, stop the committer, let go of every claim
        still held (a store closed in a running process would otherwise keep its messages
        from the other workers until the process ends), close everything."""
        if self.committer is not None:
            await self.committer.close()
        for lock in list(self._held.values()):
            lock._store = None
        self._held.clear()
        self._releases.clear()
        if self._claims is not None:
            with self._claims_lock:
                try:
                    self._claims.execute("UPDATE messages SET owner = NULL WHERE owner = ?",
                                         (self._me(),))
                except sqlite3.Error as e:
                    log.warning("queue: cannot release the claims of this process: %s", e)
        with self._scratch_lock:
            for pf in self._scratch.values():
                pf.close(unlink=True)
            self._scratch.clear()
        self._resident.clear()
        self._resident_bytes = 0
        self._pool.close()
        self._close_db()

    def _close_db(self) -> None:
        with self._db_lock, self._claims_lock:
            for con in (self._con, self._claims):
                if con is not None:
                    con.close()
            self._con = self._claims = None
            if self._claims_writer is not None:
                self._claims_writer.close()
                self._claims_writer = None
        if self._data_fd >= 0:
            os.close(self._data_fd)
            self._data_fd = -1

    def _me(self) -> str:
        """This store's owner token (see ``owner_token``)."""
        return f"{owner_token()}:{self._number}"

    def _db(self) -> sqlite3.Connection:
        if self._con is None:
            raise RuntimeError("queue store is not open")
        return self._con

    # ------------------------------------------------------------------ recovery

    def _recover(self) -> None:
        removed = remove_unlocked(self.spool_dir, lambda _name: True)
        con = self._db()
        if os.path.isdir(os.path.join(self.root, "env")):
            with self._db_lock:
                imported = convert(con, self.root, inline_max=INLINE_MAX)
            if imported:
                log.info("queue %s: %d message(s) converted into %s", self.root, imported,
                         self.db_path)
        for name in os.listdir(self.data_dir):
            if not is_valid(name):
                move_aside(os.path.join(self.data_dir, name), self.corrupt_dir,
                           f"stray-data-{name[:200]}", "not a queue file name")

        def orphan(qid: str) -> bool:
            row = con.execute("SELECT body IS NULL FROM messages WHERE qid = ?",
                              (qid,)).fetchone()
            return row is None or not row[0]

        removed += remove_unlocked(self.data_dir, lambda n: is_valid(n) and orphan(n))
        for (qid,) in con.execute("SELECT qid FROM messages WHERE body IS NULL").fetchall():
            if not os.path.exists(os.path.join(self.data_dir, qid)):
                self._set_aside(qid, "envelope without message body")
        if removed:
            log.info("queue %s: removed %d unfinished file(s)", self.root, removed)

    def _set_aside(self, qid: QueueId, why: str) -> bool:
        """Move the row of an unusable message to ``set_aside`` (a large body to
        ``corrupt/<qid>.body``) and log one line; False if it is gone already."""
        con = self._db()
        with self._db_lock:
            con.execute("BEGIN IMMEDIATE")
            try:
                cur = con.execute("INSERT INTO set_aside (qid, envelope, body, why, at) "
                                  "SELECT qid, envelope, body, ?, ? FROM messages "
                                  "WHERE qid = ?", (why, time.time(), qid))
                moved = cur.rowcount == 1
                con.execute("DELETE FROM messages WHERE qid = ?", (qid,))
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")
        if not moved:
            return False
        with contextlib.suppress(FileNotFoundError):
            os.rename(os.path.join(self.data_dir, qid),
                      os.path.join(self.corrupt_dir, qid + ".body"))
        self._forget(qid)
        log.error("%s: %s; set aside in %s (table set_aside)", qid, why, self.db_path)
        return True

    def set_aside_ids(self) -> list[QueueId]:
        """The messages set aside so far (for the CLI and tests)."""
        with self._db_lock:
            return [r[0] for r in self._db().execute("SELECT qid FROM set_aside ORDER BY at")]

    # ------------------------------------------------------------------ receiving

    def new_spool(self) -> PooledSpool:
        """A new, empty spool in a reused file. Raises OSError on a local fault."""
        return PooledSpool(self, self._pool, new_qid(), self._pool.take())

    def _own(self, spool: contracts.Spool) -> PooledSpool:
        if not isinstance(spool, PooledSpool) or spool._store is not self:
            raise SpoolClosedError(f"{spool.qid}: not a spool of this queue store")
        return spool

    async def commit(self, spool: contracts.Spool, envelope: Envelope) -> QueueId:
        """Make the message durable; on return it may be acknowledged with 250. Sets
        ``envelope.size``. A local fault raises TemporaryFailure (the spool is gone);
        SpoolClosedError if the spool was aborted."""
        writer = self._own(spool)
        if writer.closed:
            raise SpoolClosedError(f"{writer.qid}: spool writer is not open")
        qid = writer.qid
        committer = self.committer
        if committer is None or not committer.running:
            log.error("%s: queue is not accepting commits", qid)
            writer.abort()
            raise queue_write_error()
        try:
            envelope.size = writer.size
            data = codec.encode(envelope)
        except Exception as e:
            log.exception("%s: cannot write envelope", qid)
            writer._discard()
            raise queue_write_error(e) from e
        writer._state = writer._COMMITTING
        owner = self._me() if self.hand_over_locks else None
        job = Job(qid, functools.partial(self._insert, writer, data, envelope.received_at,
                                         owner),
                  prepare=functools.partial(self._prepare_body, writer),
                  after=functools.partial(_empty_spool, writer),
                  done=functools.partial(self._finish_commit, writer), new_message=True)
        fut = committer.submit(job)
        assert fut is not None
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            # committed or not, nobody takes its claim (and body in memory) from the spool
            # now: let go of them, and a queue scan delivers the message if it was committed
            fut.add_done_callback(functools.partial(_drop_handed_claim, writer))
            raise
        except Exception as e:
            raise self.write_fault(e) from e
        return qid

    def _prepare_body(self, writer: PooledSpool, job: Job) -> None:
        """Commit thread: the body's last bytes; a small one read back for its row, a large
        one renamed into ``data/`` and flushed (``data/`` itself once for the batch)."""
        if writer.size <= INLINE_MAX:
            body = writer.in_memory()
            if body is None:            # a stage had the file written: read it back
                writer._spill()
                body = read_file(writer._pf.fd, writer.size)
            if len(body) != writer.size:
                raise OSError(errno.EIO, "spool file shorter than written")
            writer._body = body
            return
        writer._spill()
        fd = writer._pf.fd
        dst = os.path.join(self.data_dir, writer.qid)
        os.rename(writer.path, dst)     # still locked: another start-up leaves it alone
        writer._renamed = dst
        if self.fsync:
            os.fdatasync(fd)
        job.sync_dir = True

    @staticmethod
    def _insert(writer: PooledSpool, data: bytes, received: float, owner: str | None,
                con: sqlite3.Connection) -> None:
        con.execute("INSERT INTO messages (qid, envelope, body, received, owner) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (writer.qid, data, writer._body, received, owner))

    def _finish_commit(self, writer: PooledSpool, err: BaseException | None) -> None:
        body, writer._body = writer._body, None
        if err is None:
            writer._state = writer._COMMITTED
            if self.hand_over_locks:
                writer.lock = SqlLock(writer.qid, self)
                if body is not None and self._resident_bytes + len(body) <= RESIDENT_MAX:
                    self._resident[writer.qid] = body       # for open_message, once
                    self._resident_bytes += len(body)
            writer._release_file()
            return
        log.error("%s: queue file write error: %s", writer.qid, err)
        if writer._renamed:
            try:
                os.unlink(writer._renamed)
            except FileNotFoundError:
                pass
            except OSError as e:    # no row points at it: the next start removes it
                log.warning("%s: cannot remove %s: %s", writer.qid, writer._renamed, e)
        writer._discard()

    async def enqueue_bytes(self, envelope: Envelope, data: bytes) -> QueueId:
        """Queue a message held in memory (generated DSNs); as durable as ``commit``."""
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
        if lock is not None:
            writer.lock = None
            lock.release()
        return qid

    def rewrite_spool_sync(self, spool: contracts.Spool,
                           transform: Callable[[BinaryIO, BinaryIO], None]) -> None:
        """Replace a not yet committed body by ``transform(old, new)``'s output, same qid,
        in another pool file (the old one goes back). Raises OSError (unchanged), or
        SpoolClosedError if the spool is not open."""
        writer = self._begin_rewrite(spool)
        try:
            self._rewrite(writer, transform)
        finally:
            self._end_rewrite(writer)

    async def rewrite_spool(self, spool: contracts.Spool,
                            transform: Callable[[BinaryIO, BinaryIO], None]) -> None:
        """``rewrite_spool_sync`` in a thread, safe against the spool's abort meanwhile (as
        the file store's)."""
        writer = self._begin_rewrite(spool)
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

    def _begin_rewrite(self, spool: contracts.Spool) -> PooledSpool:
        writer = self._own(spool)
        if writer._state != writer._OPEN:
            raise SpoolClosedError(f"{writer.qid}: spool writer is not open")
        writer._state = writer._REWRITING
        return writer

    def _end_rewrite(self, writer: PooledSpool) -> bool:
        if writer._state == writer._REWRITING:
            writer._state = writer._OPEN
        if not writer._abort_asked:
            return False
        writer._abort_asked = False
        if writer._state == writer._OPEN:
            writer._discard()
        return True

    def _rewrite_done(self, writer: PooledSpool, work: asyncio.Future[None]) -> None:
        if not work.cancelled():
            work.exception()
        self._end_rewrite(writer)

    def _rewrite(self, writer: PooledSpool,
                 transform: Callable[[BinaryIO, BinaryIO], None]) -> None:
        writer._spill()
        pf = self._pool.take()
        os.lseek(pf.fd, 0, os.SEEK_SET)
        new = open(pf.fd, "wb", buffering=BUFFER_SIZE, closefd=False)  # noqa: SIM115
        try:
            with open(writer.path, "rb") as old:
                transform(old, new)
            new.flush()
            size = new.tell()
        except BaseException:
            with contextlib.suppress(OSError, ValueError):
                new.close()     # before the file goes back: nothing written into it later
            self._pool.give_back(pf)
            raise
        new.close()             # closefd=False: the descriptor stays the pool file's
        writer._swap(pf, size)

    def write_fault(self, err: BaseException) -> TemporaryFailure:
        """The client's reply for a write fault; a full disk is re-measured at once."""
        if getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
            self.space.invalidate()
        return queue_write_error(err)

    def admission(self, size: int = 0, reserve: int = 0) -> TemporaryFailure | None:
        """As the file store's: ``452 4.3.1`` below the reserve, ``451 4.3.0`` on a
        read-only file system; one ``statvfs`` per ``space_ttl``."""
        sample = self.space.sample()
        if sample is None:
            return None
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

    # ------------------------------------------------------------------ queued messages

    def ids(self) -> list[QueueId]:
        """Committed messages, oldest first."""
        with self._db_lock:
            return [r[0] for r in self._db().execute("SELECT qid FROM messages ORDER BY qid")]

    def body_path(self, qid: QueueId) -> str:
        """A file holding the body: ``data/<qid>`` for a large one, else a copy in a pooled
        file kept until the claim (or the store) is released. FileNotFoundError if gone."""
        _checked(qid)
        with self._db_lock:
            row = self._db().execute("SELECT body FROM messages WHERE qid = ?",
                                     (qid,)).fetchone()
        if row is None:
            raise FileNotFoundError(errno.ENOENT, "no such message", qid)
        if row[0] is None:
            return os.path.join(self.data_dir, qid)
        return self._materialize(qid, row[0])

    def read_body(self, qid: QueueId) -> bytes | None:
        """The whole body, or None if the message is gone (CLI use; no scratch copy)."""
        with self._db_lock:
            row = self._db().execute("SELECT body FROM messages WHERE qid = ?",
                                     (_checked(qid),)).fetchone()
        if row is None:
            return None
        if row[0] is not None:
            return bytes(row[0])
        try:
            with open(os.path.join(self.data_dir, qid), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def load(self, qid: QueueId) -> Envelope | None:
        """The envelope, or None if gone or unusable (then set aside, one log line)."""
        _checked(qid)
        with self._db_lock:
            row = self._db().execute(
                "SELECT envelope, body IS NULL, length(body) FROM messages WHERE qid = ?",
                (qid,)).fetchone()
        if row is None:
            return None
        data, in_file, length = row
        if len(data) > MAX_ENVELOPE_BYTES:
            self._set_aside(qid, f"envelope larger than {MAX_ENVELOPE_BYTES} bytes")
            return None
        try:
            env = codec.decode(bytes(data))
        except codec.UnsupportedVersion as e:
            self._set_aside(qid, f"{e} (a newer pymta can deliver it from there)")
            return None
        except codec.CodecError as e:
            self._set_aside(qid, f"unreadable envelope ({e})")
            return None
        if in_file:
            try:
                length = os.stat(os.path.join(self.data_dir, qid)).st_size
            except FileNotFoundError:
                if not self._exists(qid):
                    return None         # removed meanwhile (row first, then the file)
                self._set_aside(qid, "envelope without message body")
                return None
        if env.size and length != env.size:
            self._set_aside(qid, f"message body is {length} bytes, the envelope says "
                                 f"{env.size}")
            return None
        return env

    def save_sync(self, qid: QueueId, envelope: Envelope) -> None:
        """Replace the envelope durably; FileNotFoundError if the message is gone, OSError
        on a write fault (the old envelope stays)."""
        data = codec.encode(envelope)
        with self._db_lock:
            try:
                cur = self._db().execute("UPDATE messages SET envelope = ? WHERE qid = ?",
                                         (data, _checked(qid)))
            except sqlite3.Error as e:
                raise os_error(e) from e
        if cur.rowcount != 1:
            raise FileNotFoundError(errno.ENOENT, "message is gone", qid)

    async def save(self, qid: QueueId, envelope: Envelope) -> None:
        """``save_sync`` in the committer's next batch."""
        committer = self.committer
        if committer is None or not committer.running:
            await asyncio.to_thread(self.save_sync, qid, envelope)
            return
        job = Job(_checked(qid), functools.partial(_update, qid, codec.encode(envelope)))
        fut = committer.submit(job)
        assert fut is not None
        await asyncio.shield(fut)

    def remove_sync(self, qid: QueueId) -> None:
        """Delete a message: its row (the message ends there), then a body file."""
        with self._db_lock:
            try:
                self._db().execute("DELETE FROM messages WHERE qid = ?", (_checked(qid),))
            except sqlite3.Error as e:
                raise os_error(e) from e
        self._after_remove(qid)
        self._forget(qid)

    async def remove(self, qid: QueueId) -> None:
        """The row deleted in the committer's next batch, the body file after it; a claim
        on it goes with it. If the removal fails, the claim is still held."""
        committer = self.committer
        if committer is None or not committer.running:
            await asyncio.to_thread(self.remove_sync, qid)
            return
        # Not flushed alone (a power cut costs at most a duplicate), unless its body is a
        # file in data/: that is unlinked right after, and a row must never come back
        # without its body.
        large = os.path.exists(os.path.join(self.data_dir, _checked(qid)))
        job = Job(qid, functools.partial(_delete, qid),
                  after=functools.partial(self._after_remove, qid), durable=large)
        fut = committer.submit(job)
        assert fut is not None
        await asyncio.shield(fut)
        self._forget(qid)

    def _after_remove(self, qid: QueueId) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.data_dir, qid))

    def _forget(self, qid: QueueId) -> None:
        """A message that is gone: its claim and its scratch copy go with it."""
        lock = self._held.pop(qid, None)
        if lock is not None:
            lock._store = None
        self._drop_scratch(qid)

    def _drop_scratch(self, qid: QueueId) -> None:
        """What this process kept of a body for its claim: the copy in memory, the file."""
        body = self._resident.pop(qid, None)
        if body is not None:
            self._resident_bytes -= len(body)
        with self._scratch_lock:
            pf = self._scratch.pop(qid, None)
            if pf is not None:
                self._pool.give_back(pf)

    def _exists(self, qid: QueueId) -> bool:
        with self._db_lock:
            return self._db().execute("SELECT 1 FROM messages WHERE qid = ?",
                                      (qid,)).fetchone() is not None

    # ------------------------------------------------------------------ the contract's
    # delivery side: reads answer at once from the database (WAL readers never wait).

    async def list_queued(self) -> list[QueueId]:
        return self.ids()

    async def claim(self, qid: QueueId) -> SqlLock | None:
        """``try_lock``, with the write (when one is needed) in a thread: it may wait for
        another process's batch to let go of the database, and the event loop must not. A
        claim this process let go whose release is being written right now is waited for
        (one batch), not refused."""
        fut = self._release_waits.get(qid) if qid in self._releasing else None
        if fut is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(fut)
        lock, write, owner = self._look(qid)
        if not write:
            return lock
        self._claiming.add(qid)
        try:
            won = await asyncio.to_thread(self._write_claim, qid, owner)
        finally:
            self._claiming.discard(qid)
        return SqlLock(qid, self) if won else None

    async def load_envelope(self, qid: QueueId) -> Envelope | None:
        return self.load(qid)

    async def open_body(self, qid: QueueId) -> str:
        return self.body_path(qid)

    async def open_message(self, qid: QueueId, envelope: Envelope) -> QueuedMessage:
        """The body kept since its commit, in memory (once: a later attempt reads the
        row), else as ``open_body``."""
        body = self._resident.pop(qid, None)
        if body is None:
            return QueuedMessage(qid, envelope, self.body_path(qid))
        self._resident_bytes -= len(body)
        return QueuedMessage(qid, envelope, body=body,
                             materialize=functools.partial(self._materialize, qid, body,
                                                           claimed=True))

    def _materialize(self, qid: QueueId, body: bytes, *, claimed: bool = False) -> str:
        """A pooled scratch file holding ``body`` (any thread), kept as ``body_path``'s
        until the claim (or the store) goes. ``claimed``: for an agent's message, whose
        claim must still be held (FileNotFoundError for a late agent thread: a file made
        then would never be given back)."""
        with self._scratch_lock:
            if claimed and qid not in self._held:
                raise FileNotFoundError(errno.ENOENT, "the message's claim is released", qid)
            pf = self._scratch.get(qid)
            if pf is None:
                pf = self._scratch[qid] = self._pool.take()
            _write_copy(pf, body)
            return pf.path

    async def exists(self, qid: QueueId) -> bool:
        return self._exists(_checked(qid))

    # ------------------------------------------------------------------ claims

    def try_lock(self, qid: QueueId) -> SqlLock | None:
        """The message's claim, or None if a live holder has it or the message is gone."""
        lock, write, owner = self._look(qid)
        if not write:
            return lock
        return SqlLock(qid, self) if self._write_claim(qid, owner) else None

    def _look(self, qid: QueueId) -> tuple[SqlLock | None, bool, str | None]:
        """What a claim of ``qid`` takes: (the claim or None, False) when no write is
        needed, else (None, True, the owner read, which the write must still find)."""
        _checked(qid)
        if qid in self._held or qid in self._releasing or qid in self._claiming:
            return None, False, None
        if qid in self._releases:       # released here, not yet written: take it back
            self._releases.discard(qid)
            return SqlLock(qid, self), False, None
        with self._db_lock:
            row = self._db().execute("SELECT owner FROM messages WHERE qid = ?",
                                     (qid,)).fetchone()
        if row is None:
            return None, False, None
        owner = row[0]
        if owner == self._me():         # ours already (a hand-over not taken up)
            return SqlLock(qid, self), False, None
        if owner is not None and owner_alive(owner):
            return None, False, None
        return None, True, owner

    def _write_claim(self, qid: QueueId, owner: str | None) -> bool:
        """Set ourselves as the owner if it is still ``owner`` (any thread); whether it
        was. Another process may have been first; then it is theirs."""
        with self._claims_lock:
            claims = self._claims
            if claims is None:
                raise RuntimeError("queue store is not open")
            try:
                with self._claims_turn():
                    cur = claims.execute("UPDATE messages SET owner = ? WHERE qid = ? AND "
                                         "owner IS ?", (self._me(), qid, owner))
            except sqlite3.Error as e:
                raise os_error(e) from e
            return cur.rowcount == 1

    def _claims_turn(self) -> WriteTurn:
        """The claims connection's turn at writing (under ``_claims_lock``)."""
        if self._claims_writer is None:
            self._claims_writer = WriteTurn(self.db_path)
        return self._claims_writer

    def lock(self, qid: QueueId, timeout: float) -> SqlLock | None:
        """Like ``try_lock`` but waits up to ``timeout`` seconds for the holder (CLI use)."""
        deadline = time.monotonic() + timeout
        while True:
            lk = self.try_lock(qid)
            if lk is not None:
                return lk
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._exists(qid):
                return None
            time.sleep(min(0.05, remaining))

    def _release(self, lock: SqlLock) -> None:
        """A claim let go (never raises, any thread): its owner cleared in the next batch,
        or at once when no committer runs (the CLI)."""
        qid = lock.qid
        if self._held.get(qid) is lock:
            del self._held[qid]
        committer = self.committer
        loop = committer.loop if committer is not None and committer.running else None
        if loop is None:
            self._drop_scratch(qid)
            self._releases.add(qid)
            self._flush_releases()
            return
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            self._release_later(qid)
        else:
            with contextlib.suppress(RuntimeError):     # the loop closed meanwhile
                loop.call_soon_threadsafe(self._release_later, qid)

    def _release_later(self, qid: QueueId) -> None:
        """Event loop: the owner cleared by the committer's next batch."""
        self._drop_scratch(qid)
        committer = self.committer
        if committer is None or not committer.running:
            self._releases.add(qid)
            self._flush_releases()
            return
        self._releases.add(qid)
        fut = committer.submit(Job(qid, functools.partial(_clear_owner, qid, self._me()),
                                   take=functools.partial(self._take_release, qid),
                                   done=functools.partial(self._released, qid),
                                   durable=False))     # after a power cut no owner lives
        assert fut is not None
        fut.add_done_callback(_retrieved)
        self._release_waits[qid] = fut

    def _take_release(self, qid: QueueId) -> bool:
        if qid not in self._releases:
            return False            # claimed again meanwhile
        self._releases.discard(qid)
        self._releasing.add(qid)
        return True

    def _released(self, qid: QueueId, err: BaseException | None) -> None:
        self._releasing.discard(qid)
        self._release_waits.pop(qid, None)
        if err is not None:         # the owner stays; it is ours, so we can claim it again
            log.warning("%s: cannot release the claim: %s", qid, err)

    def _flush_releases(self) -> None:
        releases, self._releases = self._releases, set()
        if not releases or self._claims is None:
            return
        me = self._me()
        with self._claims_lock:
            try:
                with self._claims_turn():
                    self._claims.executemany(
                        "UPDATE messages SET owner = NULL WHERE qid = ? AND owner = ?",
                        [(qid, me) for qid in releases])
            except sqlite3.Error as e:
                log.warning("queue: cannot release %d claim(s): %s", len(releases), e)


# ---------------------------------------------------------------------------- batch jobs

def _retrieved(fut: asyncio.Future[None]) -> None:
    """A release's future: its error is logged by ``_released``, not by asyncio."""
    if not fut.cancelled():
        fut.exception()


def _update(qid: QueueId, data: bytes, con: sqlite3.Connection) -> None:
    cur = con.execute("UPDATE messages SET envelope = ? WHERE qid = ?", (data, qid))
    if cur.rowcount != 1:
        raise FileNotFoundError(errno.ENOENT, "message is gone", qid)


def _delete(qid: QueueId, con: sqlite3.Connection) -> None:
    con.execute("DELETE FROM messages WHERE qid = ?", (qid,))


def _clear_owner(qid: QueueId, owner: str, con: sqlite3.Connection) -> None:
    con.execute("UPDATE messages SET owner = NULL WHERE qid = ? AND owner = ?", (qid, owner))


def _drop_handed_claim(writer: PooledSpool, _fut: asyncio.Future[None]) -> None:
    lock, writer.lock = writer.lock, None
    if lock is not None:
        lock.release()


def _write_copy(pf: PoolFile, body: bytes) -> None:
    """``pf`` holding exactly ``body``."""
    os.ftruncate(pf.fd, 0)
    view = memoryview(body)
    offset = 0
    while offset < len(body):
        offset += os.pwrite(pf.fd, view[offset:], offset)


def _empty_spool(writer: PooledSpool) -> None:
    """Commit thread, after the row is durable: truncate a small body's spool file for its
    next message (a large one's is in ``data/`` now)."""
    if not writer._renamed and writer._in_file:
        os.ftruncate(writer._pf.fd, 0)
        writer._emptied = True


def _checked(qid: QueueId) -> QueueId:
    if not is_valid(qid):
        raise ValueError(f"not a queue id: {qid!r}")
    return qid
