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
"""

from __future__ import annotations

import os

from pymta.queue import codec, quarantine
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
        self.env_dir = os.path.join(root, "env")
        self.max_reads = max_reads
        # qid -> (inode, change time in ns, state)
        self._known: dict[str, tuple[int, int, str]] = {}
        self.reads = 0      # envelopes read so far (for tests: a second count reads none)

    def count(self) -> dict[str, int]:
        """Messages per state (every state of STATES, and ``unread``), summing to the
        number of envelopes listed. A queue directory not made yet is empty."""
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
