"""Queue designs side by side: what a durable commit and its later removal cost (issue 14).

Before the queue loses its file per message, the candidates are measured here on this
machine's file system, with nothing else in the way (no SMTP, no pipeline): per message an
envelope of ~300 bytes and a 4 KiB body are committed, each commit acknowledged only once it is
durable, and removed again (delivered) afterwards. Designs:

``files``
    today's design as cheaply as it can be reproduced: the body written to ``data/<qid>`` by
    the committer (as the session does while DATA arrives), the envelope to ``tmp/<qid>`` on
    the flush thread, the batch made durable (``syncfs`` for more than one commit, else
    ``fdatasync`` of each file and an fsync of ``data/``), the envelopes renamed into
    ``env/``, ``env/`` fsynced once for those renames and the batch's removals (unlink of the
    envelope), then the removed bodies unlinked. No ``O_TMPFILE``, no lock: cheaper than the
    real store, never dearer.
``sqlite``
    one database shared by every process, WAL mode, ``synchronous=FULL``; one ``BEGIN
    IMMEDIATE`` ... ``COMMIT`` per batch holding its inserts (envelope and body as BLOBs) and
    its deletes. Writers of several processes take turns on SQLite's write lock, waiting in
    its busy handler (which polls, sleeping 1, 2, 5, 10 ... ms).
``sqlite-flock``
    the same, each batch's transaction taken under an ``flock`` on a lock file beside the
    database: a writer waiting for another sleeps in the kernel and wakes when it is free.
``lmdb``
    the same rows in one LMDB environment shared by every process (``sync`` and ``metasync``
    on: a commit returns once data and meta page are flushed). Only if ``lmdb`` imports.
``log``
    an append-only log of our own: a segment file per process; per batch one write of
    length-prefixed, CRC-checked records (a commit record with envelope and body, a done
    record per removal) and one ``fdatasync``; a new segment's name is made durable (directory
    fsync) before anything in it is acknowledged; segments are deleted whole, oldest first,
    once every message in them is done (oldest first, so a done record is never lost before
    the commit record it cancels).
``log-recycled``
    the same log, but a segment whose messages are all done is kept and overwritten as a
    later segment instead of deleted (as SQLite reuses its WAL): appends then go into blocks
    that already exist, so ``fdatasync`` writes data without the file's size or extents
    changing. Every record's CRC is seeded with its segment's sequence number, so the
    previous use's records left behind the end fail their check. Segments are pre-zeroed at
    start (outside the measurement; a server would do it once).
``none``
    the harness alone (batches handed to a thread that stores nothing): what every row pays
    for asyncio, futures and bookkeeping; subtract it to see a design's own price.

The batching rule is the same for all, today's ``GroupCommitter``'s: each process has C
committers on an asyncio loop and one flush thread; a flush takes everything that piled up
while the previous one ran (commits and removals together), so a commit made alone is flushed
at once. A committer, once acknowledged, queues its message's removal and starts the next
commit. Each process first commits and removes a warm-up of messages (files, WAL and pages
exist), then all processes start together; the run ends when every message is committed and
removed, and the store is then checked to be empty (a design that forgets work is not measured
honestly; the log is replayed from its segments, CRCs checked).

Measured per run: commits/s (messages / wall time); CPU per message three ways: the
processes' (``getrusage`` of every process over the measured part, all threads), *own* (that
plus every kernel thread, jbd2 and the writeback workers, plus irq and softirq time: the work
the design causes, which unrelated processes on a shared machine do not inflate; the figure
the verdict compares) and the machine's (``/proc/stat``, everything); p50/p99 of the commit
latency (submit -> durable); and a second run with one process and one committer (a commit
made alone). The committer's clock starts after the files design has written its body (the
session writes it while DATA arrives), which favours today's design, never the others.
Rounds interleave the designs (the order turns every round); the table shows medians of
rounds. Results are appended to ``results/store-designs.md``.

    python -m benchmarks.store_designs [--messages N] [--committers C] [--processes P]
        [--size S] [--rounds R] [--alone-messages N] [--designs files,sqlite,...]
        [--dir DIR] [--output FILE] [--server-ms MS]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import os
import platform
import resource
import shutil
import sqlite3
import statistics
import struct
import sys
import tempfile
import time
import traceback
import zlib
from array import array
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from benchmarks.floor import CpuSample
from pymta.queue.committer import SYNCFS

RESULTS = Path(__file__).parent / "results" / "store-designs.md"
ENVELOPE_SIZE = 300
SEGMENT_SIZE = 4 * 1024 * 1024
LMDB_MAP_SIZE = 1 << 30
_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
_MODE = 0o600


@dataclass(eq=False, slots=True)
class Message:
    """One message of the benchmark; ``fds`` are the files the files design keeps open."""

    qid: str
    envelope: bytes
    body: bytes
    fds: list[int] = field(default_factory=list)


def make_envelope(qid: str) -> bytes:
    """An envelope of about ``ENVELOPE_SIZE`` bytes, the shape of ``pymta.queue.codec``'s."""
    head = (b'{"attempts":0,"helo":"client.example.net","mail_from":"sender@example.org",'
            b'"qid":"' + qid.encode() + b'","rcpts":[{"addr":"box@example.com","state":'
            b'"pending"}],"received":1765000000.0,"v":1,"pad":"')
    return head + b"x" * max(0, ENVELOPE_SIZE - len(head) - 2) + b'"}'


# ---------------------------------------------------------------------------- designs

class Design:
    """A queue design. ``prepare`` runs once in the parent (shared files); every process then
    makes its own instance, whose ``open`` and ``flush`` run on its flush thread and whose
    ``write_body`` runs on the committer's event loop. ``check`` runs in the parent after
    the run and raises ``AssertionError`` when a message is left in the store."""

    name = ""

    def __init__(self, root: Path, proc: int) -> None:
        self.root = root
        self.proc = proc

    @classmethod
    def prepare(cls, root: Path) -> None:
        """Create what all processes share."""

    def open(self) -> None:
        """Open this process's handles (on the flush thread)."""

    def write_body(self, msg: Message) -> None:
        """Runs on the event loop before the commit is submitted."""

    def flush(self, commits: list[Message], removals: list[Message]) -> None:
        """Make ``commits`` durable and ``removals`` gone, durably, before returning."""

    def close(self) -> None:
        """Release this process's handles."""

    @classmethod
    def check(cls, root: Path) -> str:
        """Raise AssertionError unless the store is empty; a note of what was checked."""
        return "not checked"


class NoStore(Design):
    name = "none"

    @classmethod
    def check(cls, root: Path) -> str:
        return "stores nothing"


class Files(Design):
    name = "files"

    @classmethod
    def prepare(cls, root: Path) -> None:
        for d in ("tmp", "data", "env"):
            (root / d).mkdir(mode=0o700)

    def open(self) -> None:
        self.root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        self.tmp_fd, self.data_fd, self.env_fd = (
            os.open(self.root / d, os.O_RDONLY | os.O_DIRECTORY) for d in ("tmp", "data", "env"))

    def write_body(self, msg: Message) -> None:
        fd = os.open(msg.qid, _FLAGS, _MODE, dir_fd=self.data_fd)
        msg.fds.append(fd)
        os.write(fd, msg.body)

    def flush(self, commits: list[Message], removals: list[Message]) -> None:
        for msg in commits:
            fd = os.open(msg.qid, _FLAGS, _MODE, dir_fd=self.tmp_fd)
            msg.fds.append(fd)
            os.write(fd, msg.envelope)
        if len(commits) > 1 and SYNCFS is not None:
            SYNCFS(self.root_fd)
        elif commits:
            for msg in commits:
                for fd in msg.fds:
                    os.fdatasync(fd)
            os.fsync(self.data_fd)
        for msg in removals:
            os.unlink(msg.qid, dir_fd=self.env_fd)
        for msg in commits:
            os.rename(msg.qid, msg.qid, src_dir_fd=self.tmp_fd, dst_dir_fd=self.env_fd)
        if commits or removals:
            os.fsync(self.env_fd)
        for msg in removals:
            os.unlink(msg.qid, dir_fd=self.data_fd)
        for msg in commits:
            for fd in msg.fds:
                os.close(fd)
            msg.fds.clear()

    def close(self) -> None:
        for fd in (self.root_fd, self.tmp_fd, self.data_fd, self.env_fd):
            os.close(fd)

    @classmethod
    def check(cls, root: Path) -> str:
        left = [p.name for d in ("tmp", "data", "env") for p in (root / d).iterdir()]
        assert not left, f"files: {len(left)} files left, e.g. {left[:3]}"
        return "tmp/, data/, env/ empty"


class Sqlite(Design):
    name = "sqlite"

    @classmethod
    def prepare(cls, root: Path) -> None:
        con = sqlite3.connect(root / "queue.db", isolation_level=None)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("CREATE TABLE queue (qid TEXT PRIMARY KEY, envelope BLOB NOT NULL, "
                    "body BLOB NOT NULL)")
        con.close()

    def open(self) -> None:
        self.con = sqlite3.connect(self.root / "queue.db", isolation_level=None,
                                   check_same_thread=False, timeout=60.0)
        self.con.execute("PRAGMA synchronous=FULL")
        assert self.con.execute("PRAGMA synchronous").fetchone()[0] == 2, "not FULL"
        mode = self.con.execute("PRAGMA journal_mode").fetchone()[0]
        assert mode == "wal", mode

    def flush(self, commits: list[Message], removals: list[Message]) -> None:
        con = self.con
        con.execute("BEGIN IMMEDIATE")
        try:
            if commits:
                con.executemany("INSERT INTO queue VALUES (?, ?, ?)",
                                [(m.qid, m.envelope, m.body) for m in commits])
            if removals:
                con.executemany("DELETE FROM queue WHERE qid = ?", [(m.qid,) for m in removals])
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")

    def close(self) -> None:
        self.con.close()

    @classmethod
    def check(cls, root: Path) -> str:
        con = sqlite3.connect(root / "queue.db")
        try:
            (rows,) = con.execute("SELECT count(*) FROM queue").fetchone()
        finally:
            con.close()
        assert rows == 0, f"sqlite: {rows} rows left"
        return "0 rows"


class SqliteFlock(Sqlite):
    """SQLite whose writers queue on an ``flock`` (one lock file beside the database) before
    ``BEGIN IMMEDIATE``: a writer that finds the lock taken sleeps in the kernel until it is
    free, instead of SQLite's busy handler polling with sleeps of 1, 2, 5, 10 ... ms."""

    name = "sqlite-flock"

    def open(self) -> None:
        super().open()
        self.lock_fd = os.open(self.root / "queue.db.lock", os.O_RDWR | os.O_CREAT
                               | os.O_CLOEXEC, _MODE)

    def flush(self, commits: list[Message], removals: list[Message]) -> None:
        fcntl.flock(self.lock_fd, fcntl.LOCK_EX)
        try:
            super().flush(commits, removals)
        finally:
            fcntl.flock(self.lock_fd, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self.lock_fd)
        super().close()


def lmdb_available() -> bool:
    try:
        import lmdb  # noqa: F401
    except ImportError:
        return False
    return True


class Lmdb(Design):
    name = "lmdb"
    _LEN = struct.Struct("<H")

    @classmethod
    def prepare(cls, root: Path) -> None:
        import lmdb
        lmdb.open(str(root / "lmdb"), map_size=LMDB_MAP_SIZE).close()

    def open(self) -> None:
        import lmdb
        # Opened after the fork, in this process: an LMDB environment must not cross a fork.
        self.env = lmdb.open(str(self.root / "lmdb"), map_size=LMDB_MAP_SIZE, sync=True,
                             metasync=True, lock=True, readahead=False)

    def flush(self, commits: list[Message], removals: list[Message]) -> None:
        with self.env.begin(write=True) as txn:
            for m in commits:
                txn.put(m.qid.encode(), self._LEN.pack(len(m.envelope)) + m.envelope + m.body)
            for m in removals:
                txn.delete(m.qid.encode())

    def close(self) -> None:
        self.env.close()

    @classmethod
    def check(cls, root: Path) -> str:
        import lmdb
        env = lmdb.open(str(root / "lmdb"), map_size=LMDB_MAP_SIZE, readonly=True)
        try:
            entries = env.stat()["entries"]
        finally:
            env.close()
        assert entries == 0, f"lmdb: {entries} entries left"
        return "0 entries"


# ---------------------------------------------------------------------------- the log

SEGMENT_MAGIC = b"PQLOG001"
_SEG_HEADER = struct.Struct("<8sQ")        # magic, segment sequence number
_REC_HEADER = struct.Struct("<IIB")        # payload length, CRC32, kind
_COMMIT_HEAD = struct.Struct("<BH")        # qid length, envelope length
COMMIT, DONE = 1, 2


def encode_commit(seq: int, qid: bytes, envelope: bytes, body: bytes) -> list[bytes]:
    """A commit record as pieces to join: header, qid and envelope lengths, qid, envelope,
    body. The CRC covers kind and payload and is seeded with the segment's sequence number."""
    head = _COMMIT_HEAD.pack(len(qid), len(envelope))
    crc = zlib.crc32(body, zlib.crc32(envelope, zlib.crc32(qid, zlib.crc32(
        head, zlib.crc32(b"\x01", seq & 0xFFFFFFFF)))))
    length = len(head) + len(qid) + len(envelope) + len(body)
    return [_REC_HEADER.pack(length, crc, COMMIT), head, qid, envelope, body]


def encode_done(seq: int, qid: bytes) -> bytes:
    """A done record (the message was delivered and leaves the queue)."""
    crc = zlib.crc32(qid, zlib.crc32(b"\x02", seq & 0xFFFFFFFF))
    return _REC_HEADER.pack(len(qid), crc, DONE) + qid


@dataclass(frozen=True, slots=True)
class Record:
    kind: int
    qid: bytes
    envelope: bytes = b""
    body: bytes = b""


def read_segment(data: bytes) -> tuple[int, list[Record]]:
    """The sequence number and the valid records of one segment's bytes. Reading stops at
    the first record that is short, zero-length or fails its CRC: a torn write at the end,
    or the previous use's records behind the end of a recycled segment. A segment whose
    header is still zeros (made ahead, never used) is empty."""
    if len(data) < _SEG_HEADER.size or not any(data[:_SEG_HEADER.size]):
        return 0, []        # a spare, pre-zeroed segment never used yet
    magic, seq = _SEG_HEADER.unpack_from(data, 0)
    if magic != SEGMENT_MAGIC:
        raise ValueError("not a queue log segment")
    records: list[Record] = []
    pos = _SEG_HEADER.size
    view = memoryview(data)
    while pos + _REC_HEADER.size <= len(data):
        length, crc, kind = _REC_HEADER.unpack_from(data, pos)
        start, end = pos + _REC_HEADER.size, pos + _REC_HEADER.size + length
        if length == 0 or end > len(data) or kind not in (COMMIT, DONE):
            break
        payload = view[start:end]
        if zlib.crc32(payload, zlib.crc32(bytes([kind]), seq & 0xFFFFFFFF)) != crc:
            break
        if kind == COMMIT:
            qlen, elen = _COMMIT_HEAD.unpack_from(payload, 0)
            q0 = _COMMIT_HEAD.size
            records.append(Record(COMMIT, bytes(payload[q0:q0 + qlen]),
                                  bytes(payload[q0 + qlen:q0 + qlen + elen]),
                                  bytes(payload[q0 + qlen + elen:])))
        else:
            records.append(Record(DONE, bytes(payload)))
        pos = end
    return seq, records


def replay(directory: Path) -> dict[bytes, Record]:
    """The messages still queued according to the segments in ``directory``: the in-memory
    index a server rebuilds at start (segments in sequence order, commits minus dones)."""
    segments = []
    for path in directory.glob("*.seg"):
        segments.append(read_segment(path.read_bytes()))
    live: dict[bytes, Record] = {}
    for _seq, records in sorted(segments, key=lambda s: s[0]):
        for rec in records:
            if rec.kind == COMMIT:
                live[rec.qid] = rec
            else:
                live.pop(rec.qid, None)
    return live


class Log(Design):
    """An append-only log, one writer (and one segment file at a time) per process."""

    name = "log"
    recycle = False
    spare_segments = 0

    @classmethod
    def prepare(cls, root: Path) -> None:
        (root / "log").mkdir(mode=0o700)

    def open(self) -> None:
        self.dir = self.root / "log"
        self.dir_fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        self.next_seq = (self.proc << 40) + 1   # distinct per process, ordered within one
        self.segments: dict[int, tuple[int, str]] = {}   # seq -> (fd, name), oldest first
        self.live: dict[int, int] = {}                   # seq -> messages not yet done
        self.where: dict[str, int] = {}                  # qid -> seq of its commit record
        self.spare: list[tuple[int, str]] = [self._new_file(zero=True)
                                             for _ in range(self.spare_segments)]
        self.offset = 0
        self.seq = 0
        self._start_segment()

    def _new_file(self, zero: bool) -> tuple[int, str]:
        name = f"{self.proc:03d}-{self.next_seq:016x}-{len(self.segments)}-{time.time_ns()}.seg"
        fd = os.open(name, _FLAGS, _MODE, dir_fd=self.dir_fd)
        if zero:
            os.write(fd, bytes(SEGMENT_SIZE))
            os.fdatasync(fd)
        os.fsync(self.dir_fd)        # the name is durable before any record in it counts
        return fd, name

    def _start_segment(self) -> None:
        self.seq = self.next_seq
        self.next_seq += 1
        if self.spare:
            fd, name = self.spare.pop()
        else:
            fd, name = self._new_file(zero=self.recycle)
        self.segments[self.seq] = (fd, name)
        self.live[self.seq] = 0
        # The header goes out with the first batch's write (same fdatasync).
        self.pending_header: bytes | None = _SEG_HEADER.pack(SEGMENT_MAGIC, self.seq)
        self.offset = 0

    def flush(self, commits: list[Message], removals: list[Message]) -> None:
        size = sum(_REC_HEADER.size + _COMMIT_HEAD.size + len(m.qid) + len(m.envelope)
                   + len(m.body) for m in commits)
        size += sum(_REC_HEADER.size + len(m.qid) for m in removals)
        if self.offset > _SEG_HEADER.size and self.offset + size > SEGMENT_SIZE:
            self._start_segment()
        pieces: list[bytes] = []
        if self.pending_header is not None:
            pieces.append(self.pending_header)
            self.pending_header = None
        seq = self.seq
        for m in commits:
            pieces += encode_commit(seq, m.qid.encode(), m.envelope, m.body)
            self.where[m.qid] = seq
        for m in removals:
            pieces.append(encode_done(seq, m.qid.encode()))
        data = b"".join(pieces)
        fd = self.segments[seq][0]
        written = os.pwrite(fd, data, self.offset)
        assert written == len(data), "short write"
        self.offset += written
        os.fdatasync(fd)
        self.live[seq] += len(commits)
        for m in removals:
            self.live[self.where.pop(m.qid)] -= 1
        self._release_done()

    def _release_done(self) -> None:
        """Let go of the oldest segments whose messages are all done (not the current one)."""
        for seq in list(self.segments):
            if seq == self.seq or self.live[seq]:
                return
            fd, name = self.segments.pop(seq)
            del self.live[seq]
            if self.recycle:
                self.spare.insert(0, (fd, name))
            else:
                os.unlink(name, dir_fd=self.dir_fd)
                os.close(fd)

    def close(self) -> None:
        for fd, _name in [*self.segments.values(), *self.spare]:
            os.close(fd)
        os.close(self.dir_fd)

    @classmethod
    def check(cls, root: Path) -> str:
        live = replay(root / "log")
        assert not live, f"{cls.name}: {len(live)} messages still queued after replay"
        return "replayed: 0 queued"


class RecycledLog(Log):
    name = "log-recycled"
    recycle = True
    spare_segments = 2


DESIGNS: dict[str, type[Design]] = {
    d.name: d for d in (Files, Sqlite, SqliteFlock, Lmdb, Log, RecycledLog, NoStore)}


# ---------------------------------------------------------------------------- one process

class Batcher:
    """Today's group-commit rule: one flush thread; each flush takes all that is pending."""

    def __init__(self, design: Design, executor: ThreadPoolExecutor) -> None:
        self.design = design
        self.executor = executor
        self.commits: list[tuple[Message, asyncio.Future[None]]] = []
        self.removals: list[Message] = []
        self.wakeup = asyncio.Event()
        self.idle = asyncio.Event()
        self.batches = 0
        self.committed = 0
        self.max_batch = 0
        self.task = asyncio.get_running_loop().create_task(self._run())

    def commit(self, msg: Message) -> asyncio.Future[None]:
        fut = asyncio.get_running_loop().create_future()
        self.commits.append((msg, fut))
        self.wakeup.set()
        return fut

    def remove(self, msg: Message) -> None:
        self.removals.append(msg)
        self.wakeup.set()

    async def drain(self) -> None:
        """Until every removal queued so far has been flushed."""
        while self.commits or self.removals or not self.idle.is_set():
            self.idle.clear()
            self.wakeup.set()
            await self.idle.wait()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.commits and not self.removals:
                self.idle.set()
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            self.idle.clear()
            batch, self.commits = self.commits, []
            removals, self.removals = self.removals, []
            try:
                await loop.run_in_executor(self.executor, self.design.flush,
                                           [m for m, _ in batch], removals)
            except BaseException as e:
                for _, fut in batch:
                    fut.set_exception(e)
                raise
            for _, fut in batch:
                fut.set_result(None)
            self.batches += 1
            self.committed += len(batch)
            self.max_batch = max(self.max_batch, len(batch))


async def _commit_messages(batcher: Batcher, prefix: str, count: int, committers: int,
                           body: bytes) -> array[float]:
    """Commit ``count`` messages from ``committers`` concurrent committers, each removal
    queued as soon as its commit is durable; the commit latencies in seconds."""
    latencies = array("d")
    counter = iter(range(count))
    design = batcher.design

    async def committer() -> None:
        for i in counter:
            qid = f"{prefix}{i:08d}"
            msg = Message(qid, make_envelope(qid), body)
            design.write_body(msg)
            t0 = time.perf_counter()
            await batcher.commit(msg)
            latencies.append(time.perf_counter() - t0)
            batcher.remove(msg)

    await asyncio.gather(*(committer() for _ in range(committers)))
    await batcher.drain()
    return latencies


@dataclass(frozen=True, slots=True)
class Job:
    design: str
    root: str
    proc: int
    messages: int
    committers: int
    size: int
    warmup: int


def _process_main(job: Job, ready: Any, go: Any, results: Any) -> None:
    """A worker process: set up, warm up, wait for the start, run, report."""
    try:
        results.put(asyncio.run(_process_run(job, ready, go)))
    except BaseException:  # noqa: BLE001 - any failure goes to the parent, which raises it
        results.put(("error", job.proc, traceback.format_exc()))


async def _process_run(job: Job, ready: Any, go: Any) -> tuple[Any, ...]:
    loop = asyncio.get_running_loop()
    design = DESIGNS[job.design](Path(job.root), job.proc)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flush")
    await loop.run_in_executor(executor, design.open)
    body = (os.urandom(64) * (job.size // 64 + 1))[:job.size]
    try:
        batcher = Batcher(design, executor)
        await _commit_messages(batcher, f"w{job.proc:03d}", job.warmup, job.committers, body)
        batches0, committed0 = batcher.batches, batcher.committed
        batcher.max_batch = 0
        ready.wait(timeout=300)
        go.wait(timeout=300)
        before = resource.getrusage(resource.RUSAGE_SELF)
        latencies = await _commit_messages(batcher, f"m{job.proc:03d}", job.messages,
                                           job.committers, body)
        after = resource.getrusage(resource.RUSAGE_SELF)
        batcher.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await batcher.task
        return ("ok", job.proc, after.ru_utime - before.ru_utime,
                after.ru_stime - before.ru_stime, latencies.tobytes(),
                batcher.batches - batches0, batcher.committed - committed0, batcher.max_batch)
    finally:
        await loop.run_in_executor(executor, design.close)
        executor.shutdown()


# ---------------------------------------------------------------------------- one run

def kernel_seconds() -> float:
    """CPU seconds spent so far by every kernel thread (jbd2, writeback kworkers, ...; the
    children of kthreadd) plus interrupt and soft-interrupt time (``/proc/stat``).

    With the benchmark's own processes' ``getrusage`` this counts all the work a design
    causes, without the unrelated user processes that ``/proc/stat``'s totals include on a
    shared machine. A kernel thread that exits during the run takes its share with it."""
    hz = os.sysconf("SC_CLK_TCK")
    ticks = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue            # gone meanwhile
        fields = stat[stat.rindex(b")") + 2:].split()
        pid, ppid = int(entry.name), int(fields[1])
        if pid == 2 or ppid == 2:
            ticks += int(fields[11]) + int(fields[12])      # utime, stime
    cpu = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    ticks += int(cpu[5]) + int(cpu[6])                        # irq, softirq
    return ticks / hz


@dataclass(frozen=True, slots=True)
class RunResult:
    design: str
    messages: int
    seconds: float
    proc_user_ms: float      # per message, summed over the processes
    proc_sys_ms: float
    machine_user_ms: float   # per message, /proc/stat
    machine_sys_ms: float
    machine_idle_ms: float
    kernel_ms: float         # per message: kernel threads, irq and softirq (kernel_seconds)
    p50_ms: float
    p99_ms: float
    mean_batch: float
    max_batch: int
    checked: str

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    @property
    def proc_ms(self) -> float:
        return self.proc_user_ms + self.proc_sys_ms

    @property
    def machine_ms(self) -> float:
        return self.machine_user_ms + self.machine_sys_ms

    @property
    def own_ms(self) -> float:
        """The benchmark's processes plus the kernel's threads: the work the design causes."""
        return self.proc_ms + self.kernel_ms


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1) of ``values`` by nearest rank; 0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def run_once(design: str, directory: Path, messages: int, processes: int, committers: int,
             size: int, warmup: int) -> RunResult:
    """One measured run of ``design`` in a fresh directory under ``directory``."""
    root = Path(tempfile.mkdtemp(prefix=f"store-{design}-", dir=directory))
    ctx = get_context("fork")
    try:
        cls = DESIGNS[design]
        cls.prepare(root)
        ready, go, results = ctx.Barrier(processes + 1), ctx.Event(), ctx.Queue()
        share = [messages // processes + (1 if i < messages % processes else 0)
                 for i in range(processes)]
        procs = [ctx.Process(target=_process_main, args=(
                     Job(design, str(root), i, share[i], committers, size, warmup),
                     ready, go, results), daemon=True)
                 for i in range(processes)]
        for p in procs:
            p.start()
        try:
            ready.wait(timeout=300)
        except Exception as e:      # a worker failed before the start: say why
            raise RuntimeError(_first_error(results) or f"{design}: workers never got ready"
                               ) from e
        k0, cpu0, t0 = kernel_seconds(), CpuSample.now(), time.perf_counter()
        go.set()
        reports = [results.get(timeout=600) for _ in procs]
        t1, cpu1, k1 = time.perf_counter(), CpuSample.now(), kernel_seconds()
        for p in procs:
            p.join(timeout=60)
        errors = [r[2] for r in reports if r[0] == "error"]
        if errors:
            raise RuntimeError(f"{design}: a worker failed:\n{errors[0]}")
        checked = cls.check(root)
        lat: list[float] = []
        for r in reports:
            lat.extend(array("d", r[4]))
        n = max(1, messages)
        batches = sum(r[5] for r in reports)
        return RunResult(
            design, messages, t1 - t0,
            1000 * sum(r[2] for r in reports) / n, 1000 * sum(r[3] for r in reports) / n,
            1000 * (cpu1.user - cpu0.user) / n, 1000 * (cpu1.system - cpu0.system) / n,
            1000 * (cpu1.idle - cpu0.idle) / n, 1000 * (k1 - k0) / n,
            1000 * percentile(lat, 0.50), 1000 * percentile(lat, 0.99),
            sum(r[6] for r in reports) / max(1, batches), max(r[7] for r in reports), checked)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _first_error(results: Any) -> str | None:
    with contextlib.suppress(Exception):
        report = results.get(timeout=1)
        if report[0] == "error":
            return str(report[2])
    return None


# ---------------------------------------------------------------------------- report

@dataclass(frozen=True, slots=True)
class Summary:
    """Medians over rounds of one design: the loaded run and the run alone."""

    design: str
    loaded: RunResult
    alone: RunResult


def median_result(runs: list[RunResult]) -> RunResult:
    """A result whose every figure is the median of ``runs``'s."""
    def med(get: Callable[[RunResult], float]) -> float:
        return statistics.median(get(r) for r in runs)
    first = runs[0]
    rate = med(lambda r: r.rate)
    return RunResult(
        first.design, first.messages, first.messages / rate if rate else 0.0,
        med(lambda r: r.proc_user_ms), med(lambda r: r.proc_sys_ms),
        med(lambda r: r.machine_user_ms), med(lambda r: r.machine_sys_ms),
        med(lambda r: r.machine_idle_ms), med(lambda r: r.kernel_ms),
        med(lambda r: r.p50_ms), med(lambda r: r.p99_ms),
        med(lambda r: r.mean_batch), max(r.max_batch for r in runs), first.checked)


def verdict(summaries: list[Summary], server_ms: float | None = None) -> list[str]:
    """The issue's rule: keep SQLite unless a log of our own spends more than 15 % less CPU
    per message end to end (loaded runs of one sitting, medians).

    The CPU compared is ``own_ms`` (the benchmark's processes plus the kernel's threads, jbd2
    included), which unrelated processes on a shared machine do not inflate; ``/proc/stat``'s
    machine figure is shown beside it. Measured here, a saving is of the store alone. With
    ``server_ms`` (the whole server's machine CPU per message end to end today, e.g. the
    ``end-to-end`` busy ms of ``results/latest.md``, which includes today's files design) the
    rule is applied end to end: the server with the ``files`` row's cost replaced by each
    design's."""
    by = {s.design: s.loaded for s in summaries}
    if "sqlite" not in by or by["sqlite"].own_ms <= 0:
        return []
    base = by["sqlite"]
    lines = []
    for name in ("log", "log-recycled", "sqlite-flock", "lmdb", "files"):
        if name in by:
            r = by[name]
            saving = 100 * (base.own_ms - r.own_ms) / base.own_ms
            word = "less" if saving >= 0 else "more"
            lines.append(f"- {name} spends {abs(saving):.1f} % {word} CPU per message than "
                         f"sqlite in the store: {r.own_ms:.3f} vs {base.own_ms:.3f} ms "
                         f"(/proc/stat: {r.machine_ms:.3f} vs {base.machine_ms:.3f}).")
    logs = [n for n in ("log", "log-recycled") if n in by]
    if not logs:
        return lines
    best = min(logs, key=lambda n: by[n].own_ms)
    saving = 100 * (base.own_ms - by[best].own_ms) / base.own_ms
    lines.append(f"- Store alone: the cheaper log ({best}) spends {saving:.1f} % less than "
                 f"sqlite.")
    if server_ms is not None and "files" in by:
        rest = server_ms - by["files"].own_ms
        e2e_sqlite, e2e_log = rest + base.own_ms, rest + by[best].own_ms
        saving = 100 * (e2e_sqlite - e2e_log) / e2e_sqlite
        lines.append(
            f"- End to end (server {server_ms:.3f} ms/msg today, its files-design share "
            f"{by['files'].own_ms:.3f} ms replaced): sqlite {e2e_sqlite:.3f}, {best} "
            f"{e2e_log:.3f} ms/msg, {saving:.1f} % less.")
    else:
        lines.append("- Rule (a log of our own must spend > 15 % less CPU per message end to "
                     "end): not applied: it needs --server-ms and the files row.")
        return lines
    keep = "build the log" if saving > 15 else "keep SQLite (the existing engine)"
    lines.append(f"- Rule (a log of our own must spend > 15 % less CPU per message end to "
                 f"end): {saving:.1f} % -> {keep}.")
    return lines


def machine_lines() -> list[str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    lmdb_version = "not installed"
    if lmdb_available():
        import lmdb
        lmdb_version = f"py-lmdb {lmdb.__version__}, LMDB {'.'.join(map(str, lmdb.version()))}"
    return [f"- cores: {os.cpu_count()} ({cpu}); kernel: {platform.system()} "
            f"{platform.release()}; python {platform.python_version()}",
            f"- SQLite {sqlite3.sqlite_version}; {lmdb_version}; syncfs: "
            f"{'yes' if SYNCFS is not None else 'no'}"]


def render(summaries: list[Summary], args: argparse.Namespace, fs: str, took: float) -> str:
    none = next((s.loaded for s in summaries if s.design == "none"), None)
    lines = [
        f"## {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}",
        "",
        f"Load: {args.processes} processes × {args.committers} committers, {args.messages} "
        f"messages of {ENVELOPE_SIZE} B envelope + {args.size} B body, committed then "
        f"removed; alone: 1 process × 1 committer, {args.alone_messages} messages; medians of "
        f"{args.rounds} rounds, designs interleaved; warm-up {args.warmup} messages per "
        f"process; took {took:.0f} s.",
        "",
        f"- file system: {fs}",
        *machine_lines(),
        "",
        "CPU per message, ms: *process* = the benchmark's processes (getrusage, user + sys); "
        "*own* = process + kernel threads (jbd2, kworkers) + irq/softirq, the figure compared; "
        "*machine* = /proc/stat, everything on the machine (user + sys); *over harness* = "
        "own minus the `none` row's.",
        "",
        "| design | commits/s | process | own | machine | over harness | idle | p50 ms "
        "| p99 ms | mean batch | alone commits/s | alone p50 ms | alone p99 ms | alone own "
        "| check |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for s in summaries:
        r, a = s.loaded, s.alone
        over = f"{r.own_ms - none.own_ms:.3f}" if none is not None else "-"
        lines.append(
            f"| {s.design} | {r.rate:,.0f} | {r.proc_ms:.3f} ({r.proc_user_ms:.3f} + "
            f"{r.proc_sys_ms:.3f}) | {r.own_ms:.3f} | {r.machine_ms:.3f} ({r.machine_user_ms:.3f}"
            f" + {r.machine_sys_ms:.3f}) | {over} | {r.machine_idle_ms:.3f} | {r.p50_ms:.2f} | "
            f"{r.p99_ms:.2f} | {r.mean_batch:.1f} | {a.rate:,.0f} | {a.p50_ms:.2f} | "
            f"{a.p99_ms:.2f} | {a.own_ms:.3f} | {r.checked} |")
    lines += ["", *verdict(summaries, args.server_ms), ""]
    return "\n".join(lines)


def file_system(directory: Path) -> str:
    """The type and device of the file system holding ``directory`` (from /proc/mounts)."""
    best = ("", "?", "?")
    with contextlib.suppress(OSError):
        real = str(directory.resolve())
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, typ, *_ = line.split()
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best[0]):
                best = (mnt, typ, dev)
    return f"{best[1]} on {best[2]} (mounted at {best[0]}), runs in {directory}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.store_designs",
                                 description=__doc__.split("\n", 1)[0])
    ap.add_argument("--messages", type=int, default=4000, help="messages per loaded run")
    ap.add_argument("--committers", type=int, default=10, help="concurrent commits per process")
    ap.add_argument("--processes", type=int, default=2, help="worker processes sharing a store")
    ap.add_argument("--size", type=int, default=4096, help="body bytes")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--alone-messages", type=int, default=None,
                    help="messages of the 1-committer run (default: messages / 4)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="messages each process commits before the clock starts "
                         "(default: 10 × committers)")
    default = ",".join(n for n in DESIGNS if n != "lmdb" or lmdb_available())
    ap.add_argument("--designs", default=default, help=f"comma-separated (default {default})")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()),
                    help="where the stores are made (the file system measured)")
    ap.add_argument("--output", type=Path, default=RESULTS, help="markdown file appended to")
    ap.add_argument("--server-ms", type=float, default=None,
                    help="the whole server's machine CPU ms per message end to end today "
                         "(results/latest.md, end-to-end busy ms): to apply the 15 %% rule "
                         "end to end, not to the store alone")
    args = ap.parse_args(argv)
    args.designs = [d.strip() for d in args.designs.split(",") if d.strip()]
    unknown = [d for d in args.designs if d not in DESIGNS]
    if unknown:
        ap.error(f"--designs: unknown {', '.join(unknown)} (known: {', '.join(DESIGNS)})")
    if "lmdb" in args.designs and not lmdb_available():
        ap.error("--designs: lmdb needs the lmdb package (pip install lmdb)")
    for name in ("messages", "committers", "processes", "size", "rounds"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1")
    if args.alone_messages is None:
        args.alone_messages = max(1, args.messages // 4)
    if args.warmup is None:
        args.warmup = 10 * args.committers
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    loaded: dict[str, list[RunResult]] = {d: [] for d in args.designs}
    alone: dict[str, list[RunResult]] = {d: [] for d in args.designs}
    for rnd in range(args.rounds):
        k = rnd % len(args.designs)
        for design in args.designs[k:] + args.designs[:k]:
            r = run_once(design, args.dir, args.messages, args.processes, args.committers,
                         args.size, args.warmup)
            loaded[design].append(r)
            a = run_once(design, args.dir, args.alone_messages, 1, 1, args.size,
                         min(args.warmup, 20))
            alone[design].append(a)
            print(f"round {rnd + 1}/{args.rounds} {design}: {r.rate:,.0f} commits/s, CPU own "
                  f"{r.own_ms:.3f}, machine {r.machine_ms:.3f} ms/msg, p50 {r.p50_ms:.2f} ms; "
                  f"alone p50 {a.p50_ms:.2f} ms", file=sys.stderr, flush=True)
    summaries = [Summary(d, median_result(loaded[d]), median_result(alone[d]))
                 for d in args.designs]
    text = render(summaries, args, file_system(args.dir), time.monotonic() - started)
    print(text)
    new = not args.output.exists()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with args.output.open("a") as f:
        if new:
            f.write("# Queue designs side by side (benchmarks/store_designs.py, issue 14)\n\n")
        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
