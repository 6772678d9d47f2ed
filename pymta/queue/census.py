"""How many messages the queue holds in each state, cheaply enough to ask at every scrape.

The queue has one directory of envelopes (``env/``); whether a message is held, quarantined
or waiting for a retry is written inside its envelope, as ``pymta queue list`` shows. Reading
every envelope at every scrape would cost a file read per queued message each time, so a
:class:`QueueCensus` remembers each envelope's state under its inode and change time: a
scrape lists the directory and stats each entry (metadata only), and reads only envelopes
that are new or were rewritten since the last scrape (a save replaces the file by a rename:
new inode, new change time). At most ``max_reads`` envelopes are read per count; the rest are
reported as ``unread`` and read by the next counts, so a scrape of a queue of a million
messages stays bounded while the numbers catch up.

The states, as Postfix names its queues where they match:

- ``active``: not yet tried (new, or being delivered for the first time);
- ``deferred``: tried at least once and still queued (a retry is due later);
- ``hold``: held (``pymta queue hold``, ``PYMTA_HOLD_INCOMING``, a check's hold);
- ``quarantine``: blocked content kept by the content filter (``pymta quarantine list``);
  ``pymta queue list`` shows these as held too.

Reading never changes the queue (``QueueStore.load`` would set aside a corrupt envelope; this
only skips it) and never locks anything: the counts are a snapshot, exact when the queue is
quiet.

A queue in one SQLite database (``queue.db``, :mod:`pymta.queue.sqlstore`, issue 14) is
counted from its rows instead, decided at each count (:func:`pymta.queue.choice.detect`: the
server converts the file layout at its first start, possibly after the exporter started).
The rows are read through a read-only connection (``mode=ro``: it never writes, and a WAL
reader never waits for the server's commits nor makes them wait). The table has no change
marker of its own, so two stand in: ``PRAGMA data_version``, which moves whenever another
connection commits (nothing committed since the last count: the last counts, nothing read),
and a hash of each envelope's bytes, so only envelopes new or changed since the last count
are decoded, at most ``max_reads`` of them per count as above.
"""

from __future__ import annotations

import os
import sqlite3
import urllib.parse
from collections.abc import Iterable

from pymta.queue import codec, quarantine
from pymta.queue.choice import DATABASE, detect
from pymta.queue.ids import is_valid
from pymta.queue.store import MAX_ENVELOPE_BYTES
from pymta.types import Envelope

STATES = ("active", "deferred", "hold", "quarantine")
UNREAD = "unread"
MAX_READS = 10_000


def state_of(env: Envelope) -> str:
    """The queue state of one envelope (see the module docstring)."""
    if quarantine.is_quarantined(env):
        return "quarantine"
    if env.held:
        return "hold"
    if any(r.attempts for r in env.recipients):
        return "deferred"
    return "active"


class QueueCensus:
    """Counts the messages of the queue directory ``root`` by state (module docstring). Not
    thread-safe: one caller at a time (the exporter serialises scrapes)."""

    def __init__(self, root: str, max_reads: int = MAX_READS) -> None:
        self.root = root
        self.env_dir = os.path.join(root, "env")
        self.db_path = os.path.join(root, DATABASE)
        self.max_reads = max_reads
        # qid -> (inode, change time in ns, state)
        self._known: dict[str, tuple[int, int, str]] = {}
        self.reads = 0      # envelopes read so far (for tests: a second count reads none)
        # the SQLite queue: the connection, the database file it reads (device, inode),
        # the data_version of the last count, its counts when it read every row, and
        # qid -> (hash of the envelope bytes, state)
        self._db: sqlite3.Connection | None = None
        self._db_file: tuple[int, int] | None = None
        self._version: int | None = None
        self._complete: dict[str, int] | None = None
        self._rows: dict[str, tuple[int, str]] = {}

    def count(self) -> dict[str, int]:
        """Messages per state (every state of STATES, and ``unread``), summing to the
        number of envelopes listed (or rows). A queue directory not made yet is empty."""
        if detect(self.root) == "sqlite":
            return self._count_rows()
        self._forget_rows()
        return self._count_files()

    def close(self) -> None:
        """Close the database connection (the next count opens it again)."""
        self._forget_rows()

    # ------------------------------------------------------------------ the file layout

    def _count_files(self) -> dict[str, int]:
        counts = dict.fromkeys((*STATES, UNREAD), 0)
        known = self._known
        seen: dict[str, tuple[int, int, str]] = {}
        budget = self.max_reads
        try:
            entries = os.scandir(self.env_dir)
        except FileNotFoundError:
            self._known = {}
            return counts
        with entries:
            for entry in entries:
                name = entry.name
                if not is_valid(name):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue        # removed meanwhile: delivered
                old = known.get(name)
                if old is not None and old[0] == st.st_ino and old[1] == st.st_ctime_ns:
                    state = old[2]
                elif budget > 0:
                    budget -= 1
                    found = self._read(entry.path, st.st_size)
                    if found is None:
                        continue    # gone, or not an envelope we can read: not counted
                    state = found
                else:
                    counts[UNREAD] += 1
                    continue
                seen[name] = (st.st_ino, st.st_ctime_ns, state)
                counts[state] += 1
        self._known = seen      # forgets the messages that left the queue
        return counts

    # ------------------------------------------------------------------ the SQLite queue

    def _count_rows(self) -> dict[str, int]:
        self._known = {}
        empty = dict.fromkeys((*STATES, UNREAD), 0)
        try:
            db = self._connection()
            if db is None:
                return empty
            version = int(db.execute("PRAGMA data_version").fetchone()[0])
            if version == self._version and self._complete is not None:
                return dict(self._complete)     # nothing committed since: nothing read
            rows = db.execute("SELECT qid, envelope FROM messages")
            try:
                counts = self._tally(rows)
            finally:
                rows.close()    # ends the read: an open one would hold back checkpoints
        except sqlite3.Error as e:
            if "no such table" in str(e):       # created, its schema not written yet
                return empty
            self._forget_rows()
            raise OSError(f"queue database {self.db_path}: {e}") from e
        self._version = version
        self._complete = None if counts[UNREAD] else dict(counts)
        return counts

    def _tally(self, rows: Iterable[tuple[object, object]]) -> dict[str, int]:
        """Counts of ``rows`` (qid, envelope bytes), read one at a time (a large queue is
        never held in memory at once); decodes only new or changed envelopes."""
        counts = dict.fromkeys((*STATES, UNREAD), 0)
        known = self._rows
        seen: dict[str, tuple[int, str]] = {}
        budget = self.max_reads
        for qid, data in rows:
            if not isinstance(qid, str) or not isinstance(data, bytes):
                continue
            marker = hash(data)
            old = known.get(qid)
            if old is not None and old[0] == marker:
                state = old[1]
            elif budget > 0:
                budget -= 1
                found = self._decode(data)
                if found is None:
                    continue        # not an envelope we can read: not counted
                state = found
            else:
                counts[UNREAD] += 1
                continue
            seen[qid] = (marker, state)
            counts[state] += 1
        self._rows = seen       # forgets the messages that left the queue
        return counts

    def _connection(self) -> sqlite3.Connection | None:
        """The read-only connection to the database file there now (a new file, e.g. a
        state directory made again, gets a new connection); None when there is none."""
        try:
            st = os.stat(self.db_path)
        except FileNotFoundError:
            self._forget_rows()
            return None
        here = (st.st_dev, st.st_ino)
        if self._db is not None and self._db_file == here:
            return self._db
        self._forget_rows()
        uri = f"file:{urllib.parse.quote(self.db_path)}?mode=ro"
        self._db = sqlite3.connect(uri, uri=True, timeout=5.0, isolation_level=None,
                                   check_same_thread=False)     # scrapes come from threads
        self._db_file = here
        return self._db

    def _forget_rows(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            db.close()
        self._db_file = self._version = self._complete = None
        self._rows = {}

    def _decode(self, data: bytes) -> str | None:
        """The state of one envelope row's bytes, None when it is not one this code reads."""
        if len(data) > MAX_ENVELOPE_BYTES:
            return None
        self.reads += 1
        try:
            return state_of(codec.decode(data))
        except codec.CodecError:
            return None

    # ------------------------------------------------------------------ reading files

    def _read(self, path: str, size: int) -> str | None:
        """The state of the envelope at ``path`` (``size`` bytes as listed), or None when it
        is gone or not an envelope this code reads."""
        if size > MAX_ENVELOPE_BYTES:
            return None
        self.reads += 1
        try:
            with open(path, "rb", buffering=0, opener=_no_follow) as f:
                data = f.readall()      # sized by fstat (a save replaces, never grows)
        except OSError:
            return None
        try:
            return state_of(codec.decode(data))
        except codec.CodecError:
            return None


def _no_follow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC)
