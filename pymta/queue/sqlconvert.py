"""Files of the SQLite queue's directory that are not rows: the conversion of a queue
directory in the file store's layout (``pymta.queue.store``: ``env/<qid>`` + ``data/<qid>``)
into rows, and the clean-up helpers of start-up.

Conversion runs in ``SqliteQueueStore.open``, under the store's start-up lock, so one process
does it while the others wait. Messages are imported in batches, one durable transaction
each (``INSERT OR IGNORE``: the qid is the primary key); only after its transaction are a
batch's files removed, envelope first. A crash midway leaves envelopes whose rows exist: the
next start imports them again, which changes nothing, and removes them. A body left without
its envelope is an orphan that start-up removes. A large body stays where it is: ``data/<qid>``
is where the SQLite store keeps large bodies too. An old message that cannot be imported (an
unreadable envelope, a missing or truncated body) goes to ``corrupt/`` with one log line, as
the file store would have moved it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import time
from collections.abc import Callable

from pymta.queue import codec
from pymta.queue.ids import is_valid
from pymta.queue.store import MAX_ENVELOPE_BYTES

log = logging.getLogger("pymta.queue")

IMPORT_BATCH = 256          # old-layout messages per transaction


def convert(con: sqlite3.Connection, root: str, *, inline_max: int) -> int:
    """Import ``<root>/env/`` + ``<root>/data/`` into ``messages`` (bodies up to
    ``inline_max`` inline), remove the old layout's files and directories; how many
    messages were imported."""
    env_dir = os.path.join(root, "env")
    names = sorted(n for n in os.listdir(env_dir) if is_valid(n))
    imported = 0
    for start in range(0, len(names), IMPORT_BATCH):
        imported += _import_batch(con, root, names[start:start + IMPORT_BATCH], inline_max)
    for old in ("tmp", "ready"):
        path = os.path.join(root, old)
        if os.path.isdir(path):
            remove_unlocked(path, lambda _name: True)
            with contextlib.suppress(OSError):
                os.rmdir(path)
    for name in os.listdir(env_dir):        # not queue ids: kept for a human
        move_aside(os.path.join(env_dir, name), os.path.join(root, "corrupt"),
                   f"stray-env-{name[:200]}", "not a queue file name")
    with contextlib.suppress(OSError):
        os.rmdir(env_dir)
    return imported


def _import_batch(con: sqlite3.Connection, root: str, names: list[str],
                  inline_max: int) -> int:
    env_dir = os.path.join(root, "env")
    data_dir = os.path.join(root, "data")
    rows = []
    inline: list[str] = []
    for qid in names:
        env_path = os.path.join(env_dir, qid)
        body_path = os.path.join(data_dir, qid)
        try:
            with open(env_path, "rb") as f:
                data = f.read(MAX_ENVELOPE_BYTES + 1)
            env = codec.decode(data)
            size = os.stat(body_path).st_size
        except FileNotFoundError as e:
            if e.filename == env_path:
                continue
            _move_old(root, qid, "envelope without message body")
            continue
        except (codec.CodecError, OSError) as e:
            _move_old(root, qid, f"unusable envelope ({e})")
            continue
        if len(data) > MAX_ENVELOPE_BYTES or (env.size and size != env.size):
            _move_old(root, qid, "envelope or body of a wrong size")
            continue
        body = None
        if size <= inline_max:
            with open(body_path, "rb") as f:
                body = f.read()
            inline.append(qid)
        rows.append((qid, data, body, env.received_at))
    if rows:
        con.execute("BEGIN IMMEDIATE")
        try:
            con.executemany("INSERT OR IGNORE INTO messages (qid, envelope, body, received) "
                            "VALUES (?, ?, ?, ?)", rows)
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")
    for qid, *_ in rows:    # envelope first: a body left alone is an orphan, removed
        os.unlink(os.path.join(env_dir, qid))
    for qid in inline:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(data_dir, qid))
    return len(rows)


def _move_old(root: str, qid: str, why: str) -> None:
    """An old-layout message that cannot be imported: to ``corrupt/`` with one line."""
    corrupt = os.path.join(root, "corrupt")
    dst = os.path.join(corrupt, qid)
    if os.path.lexists(dst):
        dst = f"{dst}.{time.time_ns()}"
    with contextlib.suppress(FileNotFoundError):
        os.rename(os.path.join(root, "env", qid), dst)
    with contextlib.suppress(FileNotFoundError):
        os.rename(os.path.join(root, "data", qid), dst + ".body")
    log.error("%s: %s; moved to %s", qid, why, corrupt)


def move_aside(path: str, corrupt_dir: str, name: str, why: str) -> None:
    """A file that does not belong where it is: into ``corrupt_dir`` as ``name`` (never
    replacing anything there), one log line; kept for a human, never read again."""
    dst = os.path.join(corrupt_dir, name)
    if os.path.lexists(dst):
        dst = f"{dst}.{time.time_ns()}"
    try:
        os.rename(path, dst)
    except FileNotFoundError:
        return
    except OSError as e:
        log.error("queue: %s: %s, and it cannot be moved to %s: %s", ascii(path), why,
                  corrupt_dir, e)
        return
    log.error("queue: %s: %s; moved to %s", ascii(path), why, ascii(dst))


def remove_unlocked(directory: str, wanted: Callable[[str], bool]) -> int:
    """Delete the files of ``directory`` that ``wanted`` names and no process holds locked
    (a live process's spool file, a body being committed); how many."""
    removed = 0
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            continue
        except OSError as e:
            log.warning("queue clean-up: cannot open %s: %s", path, e)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if wanted(name):        # asked under the lock: a commit may just have finished
                os.unlink(path)
                removed += 1
        except BlockingIOError:
            pass
        except OSError as e:
            log.warning("queue clean-up: cannot remove %s: %s", path, e)
        finally:
            os.close(fd)
    return removed
