"""Which queue store a state directory uses: the file layout (``store.py``: a body and an
envelope file per message) or the SQLite database (``sqlstore.py``), issue 14.

The server takes ``PYMTA_QUEUE_STORE``; the commands (``pymta queue``, ``pymta quarantine``,
the metrics' census) look at what the directory holds, since they must read the queue the
server writes whatever their own environment says. Moving to SQLite is automatic (the
database converts the file layout at its first open); going back is refused while the
database still holds messages: a server on the file layout would not see them.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from typing import Any

from pymta.config.errors import ConfigError

__all__ = ["DATABASE", "KINDS", "detect", "make_store", "resolve"]

DATABASE = "queue.db"
KINDS = ("files", "sqlite")


def detect(root: str) -> str:
    """The store a queue directory holds: ``sqlite`` once its database exists."""
    return "sqlite" if os.path.exists(os.path.join(root, DATABASE)) else "files"


def _messages_in_database(root: str) -> int:
    path = os.path.join(root, DATABASE)
    if not os.path.exists(path):
        return 0
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True,
                                            timeout=5)) as db:
        try:
            return int(db.execute("SELECT count(*) FROM messages").fetchone()[0])
        except sqlite3.Error:
            return 0


def resolve(root: str, configured: str) -> str:
    """The store the server opens for ``PYMTA_QUEUE_STORE=configured``; ConfigError when the
    file layout is asked for while the database still holds messages."""
    if configured == "files":
        held = _messages_in_database(root)
        if held:
            raise ConfigError(
                f"PYMTA_QUEUE_STORE: 'files', but {os.path.join(root, DATABASE)} holds "
                f"{held} message(s) a server on the file layout would not see; keep "
                "'sqlite' until the queue is empty")
    return configured


def make_store(root: str, kind: str, **options: Any) -> Any:
    """A new (not yet opened) store of ``kind`` at ``root``; ``options`` are the stores'
    common keyword arguments (``hand_over_locks``, ``prealloc``, ``fsync``)."""
    if kind == "sqlite":
        from pymta.queue.sqlstore import SqliteQueueStore

        return SqliteQueueStore(root, **options)
    from pymta.queue.store import QueueStore

    return QueueStore(root, **options)
