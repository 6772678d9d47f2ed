"""The SQLite queue's own promises (``pymta.queue.sqlstore``, issue 14): several processes on
one database, claims of dead processes taken over, recovery at start, conversion of a queue
directory in the file store's layout, faults of the database, and no file per message. The
contract both stores keep is in ``test_queue_store_contract.py``."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sqlite3
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from pymta.queue.sqlcommit import SqlCommitter
from pymta.queue.sqlstore import INLINE_MAX, SqliteQueueStore, owner_alive, owner_token
from pymta.queue.store import QueueStore
from pymta.types import Envelope, TemporaryFailure
from tests.unit.test_queue_store_contract import (
    crash_body,
    envelope,
    kill_mid_commits,
    run_child,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteQueueStore]:
    s = SqliteQueueStore(tmp_path / "queue")
    s.open()
    await s.start()
    yield s
    await s.aclose()


async def commit_bytes(store: Any, data: bytes, env: Envelope | None = None) -> str:
    w = store.new_spool()
    w.write(data)
    qid: str = await store.commit(w, env or envelope())
    return qid


def rows(root: Path, sql: str = "SELECT qid FROM messages ORDER BY qid") -> list[Any]:
    con = sqlite3.connect(root / "queue.db")
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


# ------------------------------------------------------------------ no file per message


async def test_spool_files_are_reused_and_small_bodies_live_in_rows(
        store: SqliteQueueStore) -> None:
    paths = set()
    for i in range(30):                 # one at a time: each commit alone is its own batch
        w = store.new_spool()
        paths.add(w.path)
        w.write(b"Subject: %d\r\n\r\nbody\r\n" % i)
        await store.commit(w, envelope(i))
    assert len(paths) == 1              # one file, reused for every message
    inode = os.stat(paths.pop()).st_ino
    assert os.stat(store.new_spool().path).st_ino == inode
    assert os.listdir(store.data_dir) == []
    assert len(store.ids()) == 30
    c = store.committer
    assert c is not None and c.batches == c.commits == 30
    assert rows(Path(store.root), "SELECT count(*) FROM messages WHERE body IS NULL") == [(0,)]


async def test_large_body_is_a_file_and_goes_with_its_row(store: SqliteQueueStore) -> None:
    data = b"Subject: big\r\n\r\n" + b"y" * INLINE_MAX
    qid = await commit_bytes(store, data)
    assert os.listdir(store.data_dir) == [qid]
    assert await store.open_body(qid) == os.path.join(store.data_dir, qid)
    assert rows(Path(store.root), "SELECT body IS NULL FROM messages") == [(1,)]
    await store.remove(qid)
    assert os.listdir(store.data_dir) == [] and store.ids() == []


async def test_inline_body_copy_for_an_agent_lives_as_long_as_the_claim(
        store: SqliteQueueStore) -> None:
    qid = await commit_bytes(store, b"Subject: s\r\n\r\nsmall\r\n")
    lk = await store.claim(qid)
    assert lk is not None
    path = await store.open_body(qid)
    with open(path, "rb") as f:
        assert f.read() == b"Subject: s\r\n\r\nsmall\r\n"
    lk.release()
    assert os.path.getsize(path) == 0           # back in the pool, emptied


async def test_small_body_never_touches_its_spool_file(store: SqliteQueueStore) -> None:
    w = store.new_spool()
    data = b"Subject: s\r\n\r\n" + b"m" * 5000
    w.write(data)
    assert os.path.getsize(w.path) == 0         # in memory while it arrives
    path = w.path
    qid = await store.commit(w, envelope())
    assert os.path.getsize(path) == 0           # into its row from memory
    assert store.read_body(qid) == data


async def test_spool_file_holds_the_body_once_a_stage_asks_for_it(
        store: SqliteQueueStore) -> None:
    w = store.new_spool()
    w.write(b"Subject: s\r\n\r\n")
    w.flush()                                   # a stage reads the file by its path
    with open(w.path, "rb") as f:
        assert f.read() == b"Subject: s\r\n\r\n"
    w.write(b"more\r\n")                       # the rest after the stage, still one body
    qid = await store.commit(w, envelope())
    assert store.read_body(qid) == b"Subject: s\r\n\r\nmore\r\n"
    w2 = store.new_spool()
    big = b"B" * (200 * 1024)                   # past the spill threshold: on disk as it comes
    w2.write(big)
    assert os.path.getsize(w2.path) == len(big)
    qid2 = await store.commit(w2, envelope())
    assert store.read_body(qid2) == big


async def test_first_attempt_gets_the_committed_body_from_memory(tmp_path: Path) -> None:
    s = SqliteQueueStore(tmp_path / "queue", hand_over_locks=True)
    await s.start()
    try:
        data = b"Subject: s\r\n\r\nsmall\r\n"
        w = s.new_spool()
        w.write(data)
        env = envelope()
        qid = await s.commit(w, env)
        lock = w.lock
        assert lock is not None
        msg = await s.open_message(qid, env)
        assert msg.body == data
        assert os.listdir(s.spool_dir) == [os.path.basename(w.path)]   # no copy made
        with msg.open() as f:
            assert f.read() == data
        with open(msg.body_path, "rb") as f:    # a path only when an agent asks for one
            assert f.read() == data
        again = await s.open_message(qid, env)  # once: later attempts read the row
        assert again.body is None
        with again.open() as f:
            assert f.read() == data
        lock.release()
        assert os.path.getsize(msg.body_path) == 0     # the copy went back with the claim
        w2 = s.new_spool()                      # a message never attempted (held) ...
        w2.write(data)
        qid2 = await s.commit(w2, env)
        assert w2.lock is not None
        w2.lock.release()                       # ... lets go of its memory with its claim
        assert qid2 not in s._resident and s._resident_bytes == 0
    finally:
        await s.aclose()


async def test_commits_wait_for_the_write_turn_of_another_process(
        store: SqliteQueueStore) -> None:
    """Processes take turns by an flock, which wakes the next writer at once (SQLite's own
    busy handler sleeps 1, 2, 5 ... ms between tries)."""
    import fcntl
    fd = os.open(store.db_path + "-turn", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)          # another process's turn
        w = store.new_spool()
        w.write(b"Subject: t\r\n\r\n")
        commit = asyncio.ensure_future(store.commit(w, envelope()))
        await asyncio.sleep(0.2)
        assert not commit.done()
        fcntl.flock(fd, fcntl.LOCK_UN)
        qid = await asyncio.wait_for(commit, 5)
        assert store.read_body(qid) == b"Subject: t\r\n\r\n"
    finally:
        os.close(fd)


# ------------------------------------------------------------------ several processes


WORKER = r"""
import asyncio, sys, os, time
from pymta.queue.sqlstore import SqliteQueueStore
from pymta.types import Envelope, Recipient

async def main(root, n, go):
    s = SqliteQueueStore(root, hand_over_locks=True)
    await s.start()
    async def one(i):
        env = Envelope("a@example.com", [Recipient("b@example.com", "b@example.com")],
                       time.time(), time.time(), extra={"pid": str(os.getpid())})
        qid = await s.enqueue_bytes(env, b"Subject: %d\r\n\r\n" % i + b"z" * (i * 37))
        print("committed", qid, i, flush=True)
    await asyncio.gather(*(one(i) for i in range(n)))
    print("done", flush=True)
    while not os.path.exists(go):
        await asyncio.sleep(0.01)
    held = []
    for qid in s.ids():
        lk = await s.claim(qid)
        if lk is not None:
            held.append(lk)
            print("claimed", qid, flush=True)
    print("end", flush=True)
    sys.stdin.read()            # hold the claims until the parent is done
    await s.aclose()

asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
"""


@pytest.mark.slow
def test_processes_commit_and_claim_at_once(tmp_path: Path) -> None:
    root = tmp_path / "queue"
    go = tmp_path / "go"
    workers = [run_child(WORKER, str(root), "80", str(go), stdin=subprocess.PIPE)
               for _ in range(3)]
    committed: dict[str, int] = {}
    claimed: dict[str, int] = {}
    try:
        for w in workers:
            assert w.stdout is not None
            while (line := w.stdout.readline()) != "done\n":
                assert line, f"worker exited with {w.poll()}"
                _, qid, _ = line.split()
                committed[qid] = 1
        assert len(committed) == 240
        go.touch()
        for k, w in enumerate(workers):
            assert w.stdout is not None
            while (line := w.stdout.readline()) != "end\n":
                assert line, f"worker exited with {w.poll()}"
                qid = line.split()[1]
                assert qid not in claimed, f"{qid} claimed by workers {claimed[qid]} and {k}"
                claimed[qid] = k
    finally:
        for w in workers:
            assert w.stdin is not None
            w.stdin.close()
            w.wait(60)
            if w.stdout is not None:
                w.stdout.close()
    assert set(claimed) == set(committed)       # every message claimed, each by one worker
    assert [w.returncode for w in workers] == [0, 0, 0]
    assert len(rows(root)) == 240
    assert rows(root, "PRAGMA integrity_check") == [("ok",)]


HOLDER = r"""
import asyncio, sys, time
from pymta.queue.sqlstore import SqliteQueueStore
from pymta.types import Envelope, Recipient

async def main():
    s = SqliteQueueStore(sys.argv[1], hand_over_locks=True)
    await s.start()
    w = s.new_spool()
    w.write(b"Subject: held\r\n\r\n")
    env = Envelope("a@example.com", [Recipient("b@example.com", "b@example.com")],
                   time.time(), time.time())
    qid = await s.commit(w, env)
    assert w.lock is not None and w.lock.held
    print(qid, flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


async def test_claims_of_a_dead_worker_are_taken_over(store: SqliteQueueStore) -> None:
    holder = run_child(HOLDER, store.root)
    assert holder.stdout is not None
    qid = holder.stdout.readline().strip()
    assert qid and store.ids() == [qid]
    assert await store.claim(qid) is None           # a live worker's fresh message
    (owner,) = rows(Path(store.root), "SELECT owner FROM messages")[0]
    assert owner.startswith(f"{holder.pid}:") and owner_alive(owner)
    holder.send_signal(signal.SIGKILL)
    holder.wait(30)
    holder.stdout.close()
    assert not owner_alive(owner)
    lk = await store.claim(qid)
    assert lk is not None and lk.held
    (now,) = rows(Path(store.root), "SELECT owner FROM messages")[0]
    assert now.startswith(owner_token() + ":")


def test_owner_tokens_tell_a_reused_pid_from_its_process() -> None:
    me = owner_token()
    pid, _, start = me.partition(":")
    assert pid == str(os.getpid()) and start.isdigit() and owner_alive(me)
    assert not owner_alive(f"{pid}:{int(start) + 1}")    # same pid, another process
    assert not owner_alive("garbage")


# ------------------------------------------------------------------ crashes and recovery


@pytest.mark.slow
async def test_sigkill_mid_batch_leaves_whole_rows_and_no_stale_files(tmp_path: Path) -> None:
    root = tmp_path / "queue"
    acked = kill_mid_commits("sqlite", root, 200)
    s = SqliteQueueStore(root)
    s.open()
    try:
        assert rows(root, "PRAGMA integrity_check") == [("ok",)]
        present = set(s.ids())
        assert set(acked) <= present and len(present - set(acked)) <= 16
        for qid in present:
            env = s.load(qid)
            assert env is not None and s.read_body(qid) == crash_body(int(env.extra["i"]))
        assert os.listdir(s.spool_dir) == []        # the dead process's spool files
        large = {q for (q,) in rows(root, "SELECT qid FROM messages WHERE body IS NULL")}
        assert set(os.listdir(s.data_dir)) == large  # no orphan body files
        assert s.set_aside_ids() == []
    finally:
        await s.aclose()


@pytest.mark.slow
async def test_a_torn_write_at_the_end_of_the_log_is_ignored(tmp_path: Path) -> None:
    """What a power cut in the middle of a batch's write leaves: frames at the end of the
    WAL that are not a whole committed transaction (here: garbage after the last one)."""
    root = tmp_path / "queue"
    acked = kill_mid_commits("sqlite", root, 100)
    wal = root / "queue.db-wal"
    assert wal.exists()
    with open(wal, "ab") as f:
        f.write(os.urandom(3 * 4096 + 123))
    s = SqliteQueueStore(root)
    s.open()
    try:
        assert rows(root, "PRAGMA integrity_check") == [("ok",)]
        assert set(acked) <= set(s.ids())
        for qid, i in acked.items():
            assert s.read_body(qid) == crash_body(i)
    finally:
        await s.aclose()


async def test_open_cleans_up_and_sets_aside_with_one_line(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "queue"
    s = SqliteQueueStore(root)
    await s.start()
    kept = await commit_bytes(s, b"small")
    big = await commit_bytes(s, b"B" * (INLINE_MAX + 1))
    lost = await commit_bytes(s, b"L" * (INLINE_MAX + 1))
    receiving = s.new_spool()                       # a live writer: must survive
    receiving.write(b"in progress")
    receiving.flush()
    os.unlink(os.path.join(s.data_dir, lost))       # a large body lost (a bad disk)
    (root / "data" / "1K13ORPHAN00001").write_bytes(b"never committed")
    (root / "data" / "not-a-qid").write_bytes(b"?")
    (root / "spool" / "999999999.0").write_bytes(b"a dead process's spool file")

    with caplog.at_level(logging.INFO, logger="pymta.queue"):
        child = run_child("import sys; from pymta.queue.sqlstore import SqliteQueueStore;"
                          "SqliteQueueStore(sys.argv[1]).open()", str(root))
        assert child.wait(30) == 0
    assert sorted(os.listdir(root / "data")) == [big]
    assert sorted(os.listdir(root / "spool")) == [os.path.basename(receiving.path)]
    assert os.listdir(root / "corrupt") == ["stray-data-not-a-qid"]
    assert s.ids() == sorted([kept, big])
    assert s.set_aside_ids() == [lost]
    receiving.write(b" and done")
    qid = await s.commit(receiving, envelope())
    assert s.read_body(qid) == b"in progress and done"
    await s.aclose()


class FullDatabase(SqlCommitter):
    """The database file may not grow: SQLite's own "database or disk is full"."""

    async def start(self) -> None:
        await super().start()
        con = self._con
        assert con is not None
        pages = con.execute("PRAGMA page_count").fetchone()[0]
        con.execute(f"PRAGMA max_page_count = {pages + 2}")


async def test_full_database_is_452_and_queues_nothing(tmp_path: Path) -> None:
    s = SqliteQueueStore(tmp_path / "queue")
    s.committer_class = FullDatabase
    await s.start()
    try:
        small = await commit_bytes(s, b"fits")
        w = s.new_spool()
        w.write(b"x" * 100_000)                     # inline, does not fit
        with pytest.raises(TemporaryFailure) as exc:
            await s.commit(w, envelope())
        assert (exc.value.reply.code, exc.value.reply.enhanced) == (452, "4.3.1")
        assert s.ids() == [small]
        assert sorted(os.listdir(s.spool_dir)) == [os.path.basename(w.path)]  # back, reusable
    finally:
        await s.aclose()


async def test_save_of_a_removed_message_in_a_batch_fails_alone(store: SqliteQueueStore) -> None:
    a = await commit_bytes(store, b"a")
    b = await commit_bytes(store, b"b")
    env_b = store.load(b)
    assert env_b is not None
    env_b.extra["saved"] = "yes"
    await store.remove(a)
    results = await asyncio.gather(store.save(a, envelope()), store.save(b, env_b),
                                   return_exceptions=True)
    assert isinstance(results[0], FileNotFoundError) and results[1] is None
    assert store.load(b) == env_b


# ------------------------------------------------------------------ conversion


async def old_queue(root: Path) -> dict[str, tuple[Envelope, bytes]]:
    """A queue directory written by the file store: small and large bodies."""
    old = QueueStore(root)
    await old.start()
    made = {}
    for i in range(40):
        data = b"Subject: %d\r\n\r\n" % i + b"o" * (i * 997 if i % 10 else INLINE_MAX + i)
        env = envelope(i)
        qid = await commit_bytes(old, data, env)
        made[qid] = (env, data)
    await old.aclose()
    return made


async def test_old_queue_directory_is_converted_with_nothing_lost(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "queue"
    made = await old_queue(root)
    bad = next(iter(made))
    (root / "env" / bad).write_bytes(b'{"v": 1, "sender": ')    # one unusable envelope
    s = SqliteQueueStore(root)
    with caplog.at_level(logging.INFO, logger="pymta.queue"):
        s.open()
    try:
        assert s.ids() == sorted(set(made) - {bad})
        for qid in s.ids():
            env, data = made[qid]
            assert s.load(qid) == env and s.read_body(qid) == data
        assert not (root / "env").exists() and not (root / "tmp").exists()
        large = sorted(q for q, (_, d) in made.items() if len(d) > INLINE_MAX and q != bad)
        assert sorted(os.listdir(root / "data")) == large     # kept in place as files
        assert sorted(os.listdir(root / "corrupt")) == [bad, bad + ".body"]
        lines = [r.getMessage() for r in caplog.records]
        assert sum(bad in m for m in lines) == 1
        assert any("39 message(s) converted" in m for m in lines), lines
    finally:
        await s.aclose()


CONVERT_CRASH = r"""
import os, sys
from pymta.queue import sqlconvert
from pymta.queue.sqlstore import SqliteQueueStore
real_unlink, count = os.unlink, [0]
def dying_unlink(path, *a, **kw):
    if "/env/" in str(path):
        count[0] += 1
        if count[0] > int(sys.argv[2]):
            os._exit(9)            # dies midway through removing the imported files
    real_unlink(path, *a, **kw)
sqlconvert.os.unlink = dying_unlink
sqlconvert.IMPORT_BATCH = 16
SqliteQueueStore(sys.argv[1]).open()
"""


async def test_conversion_killed_midway_imports_again_without_duplicates(
        tmp_path: Path) -> None:
    root = tmp_path / "queue"
    made = await old_queue(root)
    child = run_child(CONVERT_CRASH, str(root), "20")
    assert child.wait(60) == 9
    assert child.stdout is not None
    child.stdout.close()
    assert 0 < len(rows(root)) < 40 and len(os.listdir(root / "env")) > 0
    s = SqliteQueueStore(root)
    s.open()
    try:
        assert s.ids() == sorted(made)
        assert rows(root, "SELECT count(*), count(DISTINCT qid) FROM messages") == [(40, 40)]
        for qid, (env, data) in made.items():
            assert s.load(qid) == env and s.read_body(qid) == data
        assert not (root / "env").exists()
    finally:
        await s.aclose()



async def test_closing_a_store_lets_go_of_its_claims(tmp_path: Path) -> None:
    a = SqliteQueueStore(tmp_path / "queue", hand_over_locks=True)
    b = SqliteQueueStore(tmp_path / "queue")
    await a.start()
    b.open()
    try:
        w = a.new_spool()
        w.write(b"x")
        qid = await a.commit(w, envelope())
        assert w.lock is not None and b.try_lock(qid) is None
        await a.aclose()                            # the process lives on
        assert not w.lock.held
        lk = b.try_lock(qid)
        assert lk is not None
        lk.release()
    finally:
        await a.aclose()
        await b.aclose()


async def test_commit_batch_metric_counts_new_messages_only(store: SqliteQueueStore) -> None:
    """pymta_commit_batch_size is "messages made durable by one flush", as the file store
    counts: the saves, removals and claim releases that share a SQLite transaction are not
    messages (the two-worker metrics test saw 15 for 6 messages)."""
    from prometheus_client import CollectorRegistry

    from pymta import metrics

    registry = metrics.enable(CollectorRegistry())
    try:
        qids = await asyncio.gather(*(commit_bytes(store, b"Subject: m\r\n\r\nx\r\n",
                                                   envelope(i)) for i in range(3)))
        for qid in qids:
            await store.remove(qid)
        total = registry.get_sample_value("pymta_commit_batch_size_sum")
    finally:
        metrics.disable()
    assert total == 3


async def test_removals_are_not_flushed_alone_and_commits_always_are(tmp_path: Path) -> None:
    """A batch of only removals skips the flush (a power cut could cost a duplicate, as with
    Postfix); the next commit is flushed again (synchronous=FULL), which makes the removal
    durable with it."""
    s = SqliteQueueStore(tmp_path / "queue", hand_over_locks=True)
    await s.start()
    try:
        c = s.committer
        assert c is not None and c._con is not None

        def synchronous() -> int:
            return int(c._con.execute("PRAGMA synchronous").fetchone()[0])

        qid = await commit_bytes(s, b"Subject: r\r\n\r\n")
        assert synchronous() == 2                   # FULL
        await s.remove(qid)
        assert synchronous() == 1                   # NORMAL: a removal alone
        qid2 = await commit_bytes(s, b"Subject: c\r\n\r\n")
        assert synchronous() == 2                   # a commit is flushed, always
        assert s.ids() == [qid2]
    finally:
        await s.aclose()


async def test_review_a_scratch_file_is_not_made_after_the_claim_is_released(
        tmp_path: Path) -> None:
    """A late agent thread asking for ``body_path`` after the attempt let go of the claim
    gets FileNotFoundError: a file made then would never go back to the pool."""
    s = SqliteQueueStore(tmp_path / "queue", hand_over_locks=True)
    await s.start()
    try:
        w = s.new_spool()
        w.write(b"Subject: late\r\n\r\n")
        env = envelope()
        qid = await s.commit(w, env)
        assert w.lock is not None
        msg = await s.open_message(qid, env)
        w.lock.release()
        with pytest.raises(FileNotFoundError):
            _ = msg.body_path
        assert s._scratch == {}
        with msg.open() as f:                   # the bytes it was given still read
            assert f.read() == b"Subject: late\r\n\r\n"
    finally:
        await s.aclose()


async def test_review_a_commit_that_cannot_be_flushed_is_not_acknowledged(
        store: SqliteQueueStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a batch of removals (synchronous=NORMAL), a commit whose switch back to FULL
    fails must fail (4xx), never be acknowledged unflushed."""
    qid = await commit_bytes(store, b"Subject: r\r\n\r\n")
    await store.remove(qid)
    c = store.committer
    assert c is not None and c._flushing is False
    monkeypatch.setattr(c, "_synchronous", lambda con, flushed: not flushed)
    with pytest.raises(TemporaryFailure):
        await commit_bytes(store, b"Subject: c\r\n\r\n")
    assert store.ids() == []


async def test_review_the_write_turn_is_given_up_after_its_timeout(
        store: SqliteQueueStore) -> None:
    """A process holding the turn and then stopped (SIGSTOP) must not stop the others'
    commits for ever: after the timeout they write without the turn."""
    import fcntl
    c = store.committer
    assert c is not None and c._turn is not None
    c._turn.timeout = 0.3
    fd = os.open(store.db_path + "-turn", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        qid = await asyncio.wait_for(commit_bytes(store, b"Subject: t\r\n\r\n"), 10)
        assert store.ids() == [qid]
    finally:
        os.close(fd)


async def test_review_removing_a_large_message_is_flushed(store: SqliteQueueStore) -> None:
    """A body in data/ is unlinked right after its row's removal: that removal is flushed,
    so a power cut never brings the row back without its body."""
    qid = await commit_bytes(store, b"Subject: big\r\n\r\n" + b"y" * INLINE_MAX)
    await store.remove(qid)
    c = store.committer
    assert c is not None and c._flushing is True
    assert os.listdir(store.data_dir) == []
