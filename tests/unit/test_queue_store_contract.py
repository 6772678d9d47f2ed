"""The QueueStore contract, run against both stores: the file store (``pymta.queue.store``)
and the SQLite one (``pymta.queue.sqlstore``, issue 14). Only the shared public surface is
used here; each store's own layout is tested in its own module (``test_queue_store.py``,
``test_queue_sqlstore.py``)."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from pymta import contracts
from pymta.queue.sqlstore import SqliteQueueStore
from pymta.queue.store import QueueStore
from pymta.types import Envelope, RcptState, Recipient, SpoolClosedError, TemporaryFailure

REPO = Path(__file__).resolve().parents[2]
STORES = {"files": QueueStore, "sqlite": SqliteQueueStore}
AnyStore = Any      # QueueStore | SqliteQueueStore: the same public surface


def envelope(n: int = 0) -> Envelope:
    now = time.time()
    return Envelope(sender="sender@example.com",
                    recipients=[Recipient(f"rcpt{n}@example.com", f"rcpt{n}@example.com"),
                                Recipient("ext@remote.example", "ext@remote.example",
                                          local=False)],
                    received_at=now, next_attempt=now, client_ip="192.0.2.1",
                    extra={"n": str(n)})


def body_of(store: AnyStore, qid: str) -> bytes:
    with open(store.body_path(qid), "rb") as f:
        return f.read()


def run_child(code: str, *args: str, **kw: object) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, text=True,
                            stdout=subprocess.PIPE, **kw)  # type: ignore[call-overload]


def corrupt_envelope(store: AnyStore, qid: str, data: bytes) -> None:
    """What a bad disk or an older bug leaves: the stored envelope replaced by ``data``."""
    if isinstance(store, SqliteQueueStore):
        con = sqlite3.connect(store.db_path)
        with con:
            con.execute("UPDATE messages SET envelope = ? WHERE qid = ?", (data, qid))
        con.close()
    else:
        with open(os.path.join(store.env_dir, qid), "wb") as f:
            f.write(data)


@pytest.fixture(params=sorted(STORES))
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def make(kind: str, tmp_path: Path) -> AsyncIterator[Callable[..., AnyStore]]:
    """A maker of stores of this kind on one root; every store made is closed at the end."""
    made: list[AnyStore] = []

    def new(**kw: Any) -> AnyStore:
        s = STORES[kind](tmp_path / "queue", **kw)
        made.append(s)
        return s

    yield new
    for s in made:
        await s.aclose()


@pytest.fixture
async def store(make: Callable[..., AnyStore]) -> AsyncIterator[AnyStore]:
    s = make()
    s.open()
    await s.start()
    yield s
    await s.aclose()


async def commit_bytes(store: AnyStore, data: bytes, env: Envelope | None = None) -> str:
    w = store.new_spool()
    for i in range(0, len(data), 1000):
        w.write(data[i:i + 1000])
    qid: str = await store.commit(w, env or envelope())
    return qid


# ------------------------------------------------------------------ basics


def test_both_follow_the_protocol(store: AnyStore) -> None:
    assert isinstance(store, contracts.QueueStore)
    w = store.new_spool()
    assert isinstance(w, contracts.Spool)
    w.abort()


@pytest.mark.parametrize("size", [15, 200_000, 300_000], ids=["tiny", "inline", "file"])
async def test_commit_roundtrip(store: AnyStore, size: int) -> None:
    data = (b"Subject: hi\r\n\r\n" + b"x" * size)[:size]
    env = envelope(1)
    w = store.new_spool()
    for i in range(0, len(data), 3000):
        w.write(data[i:i + 3000])
    w.flush()
    with open(w.path, "rb") as f:                   # the pipeline's stages read the path
        assert f.read() == data
    assert w.size == len(data)
    qid = await store.commit(w, env)
    assert qid == w.qid and w.closed
    assert env.size == len(data)
    assert store.load(qid) == env
    assert await store.load_envelope(qid) == env
    assert body_of(store, qid) == data
    with open(await store.open_body(qid), "rb") as f:
        assert f.read() == data
    assert store.ids() == [qid] and await store.list_queued() == [qid]
    assert await store.exists(qid)
    w.abort()                                       # no-op after commit
    assert body_of(store, qid) == data


async def test_enqueue_bytes(store: AnyStore) -> None:
    qid = await store.enqueue_bytes(envelope(), b"generated DSN\r\n")
    assert body_of(store, qid) == b"generated DSN\r\n"
    assert store.load(qid).size == 15
    lk = store.try_lock(qid)                        # no claim left behind
    assert lk is not None
    lk.release()


async def test_200_concurrent_commits_share_batches(store: AnyStore) -> None:
    async def one(i: int) -> tuple[str, bytes]:
        data = f"message {i}\r\n".encode() * (i + 1)
        await asyncio.sleep(0.0005 * (i % 20))
        return await commit_bytes(store, data, envelope(i)), data

    results = await asyncio.gather(*(one(i) for i in range(200)))
    assert len({q for q, _ in results}) == 200
    assert sorted(store.ids()) == sorted(q for q, _ in results)
    for qid, data in results:
        assert body_of(store, qid) == data
    c = store.committer
    assert c is not None and c.commits == 200
    assert 1 <= c.batches < 200
    assert c.max_batch > 1


async def test_abort_leaves_nothing(store: AnyStore) -> None:
    w = store.new_spool()
    w.write(b"partial")
    w.abort()
    w.abort()
    assert w.closed and store.ids() == []
    with pytest.raises(SpoolClosedError):
        w.write(b"more")
    with pytest.raises(SpoolClosedError):
        await store.commit(w, envelope())


async def test_commit_after_close_is_temporary(make: Callable[..., AnyStore]) -> None:
    s = make()
    await s.start()
    w = s.new_spool()
    w.write(b"x")
    await s.aclose()
    with pytest.raises(TemporaryFailure):
        await s.commit(w, envelope())
    s.open()
    assert s.ids() == []


async def test_cancelled_commit_still_completes(store: AnyStore) -> None:
    w = store.new_spool()
    w.write(b"body")
    task = asyncio.ensure_future(store.commit(w, envelope()))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await store.aclose()                            # drains the committer
    store.open()
    assert store.ids() == [w.qid]
    assert body_of(store, w.qid) == b"body"
    assert w.closed
    lk = store.try_lock(w.qid)
    assert lk is not None
    lk.release()


async def test_rewrite_spool_replaces_the_body(store: AnyStore) -> None:
    w = store.new_spool()
    w.write(b"X-Forged: yes\r\nSubject: s\r\n\r\nbody\r\n")

    def drop_first_line(old: BinaryIO, new: BinaryIO) -> None:
        old.readline()
        new.write(old.read())

    await store.rewrite_spool(w, drop_first_line)
    assert w.size == len(b"Subject: s\r\n\r\nbody\r\n")
    w.write(b"more\r\n")
    qid = await store.commit(w, envelope())
    assert body_of(store, qid) == b"Subject: s\r\n\r\nbody\r\nmore\r\n"
    assert store.load(qid).size == w.size
    closed = store.new_spool()
    closed.abort()
    with pytest.raises(SpoolClosedError):
        await store.rewrite_spool(closed, drop_first_line)


# ------------------------------------------------------------------ updates


async def test_save_and_load_recipient_state(store: AnyStore) -> None:
    qid = await commit_bytes(store, b"body")
    env = store.load(qid)
    assert env is not None and [r.state for r in env.pending()] == [RcptState.PENDING] * 2
    r0, r1 = env.recipients
    r0.state, r0.attempts, r0.last_reply = RcptState.DELIVERED, 1, "250 2.0.0 Ok"
    r1.attempts, r1.last_reply, r1.last_attempt = 1, "451 4.4.1 timeout", 1700000000.5
    env.next_attempt += 300
    await store.save(qid, env)
    again = store.load(qid)
    assert again == env and again.pending() == [r1]
    store.save_sync(qid, again)
    assert store.load(qid) == env

    await store.remove(qid)
    assert store.load(qid) is None and store.ids() == []
    assert not await store.exists(qid)
    with pytest.raises(FileNotFoundError):          # never resurrect half a message
        await store.save(qid, env)
    with pytest.raises(FileNotFoundError):
        store.save_sync(qid, env)
    store.remove_sync(qid)                          # idempotent


async def test_remove_sync_and_bad_ids(store: AnyStore) -> None:
    qid = await commit_bytes(store, b"x" * 300_000)
    store.remove_sync(qid)
    assert store.ids() == [] and store.load(qid) is None
    for bad in ("../env/x", "", ".hidden", "a/b", "x" * 65):
        with pytest.raises(ValueError):
            store.body_path(bad)
        with pytest.raises(ValueError):
            store.load(bad)


async def test_unreadable_envelope_is_set_aside_with_one_line(
        store: AnyStore, caplog: pytest.LogCaptureFixture) -> None:
    qid = await commit_bytes(store, b"body")
    corrupt_envelope(store, qid, b'{"v": 99}')
    with caplog.at_level(logging.INFO, logger="pymta.queue"):
        assert store.load(qid) is None
        assert store.load(qid) is None              # the second look finds nothing
    assert store.ids() == []
    lines = [r.getMessage() for r in caplog.records if qid in r.getMessage()]
    assert len(lines) == 1 and "v99" in lines[0], lines


async def test_admission_with_room_is_none(store: AnyStore) -> None:
    assert store.admission(1000, 0) is None
    reply = store.write_fault(OSError(errno.ENOSPC, "full")).reply
    assert (reply.code, reply.enhanced) == (452, "4.3.1")
    reply = store.write_fault(OSError(errno.EIO, "io")).reply
    assert (reply.code, reply.enhanced) == (451, "4.3.0")


# ------------------------------------------------------------------ claims


async def test_claim_excludes_a_second_claim_in_process(store: AnyStore) -> None:
    w = store.new_spool()
    w.write(b"x")
    assert store.try_lock(w.qid) is None            # still being received
    qid = await store.commit(w, envelope())
    lk = await store.claim(qid)
    assert lk is not None and lk.held
    assert store.try_lock(qid) is None
    lk.release()
    lk.release()
    assert not lk.held
    with store.try_lock(qid) as lk2:
        assert lk2.held and store.try_lock(qid) is None
    assert not lk2.held
    assert store.try_lock("1K13NOSUCHMSG001") is None


LOCK_CHILD = r"""
import sys, time
from pymta.queue.store import QueueStore
from pymta.queue.sqlstore import SqliteQueueStore
s = {"files": QueueStore, "sqlite": SqliteQueueStore}[sys.argv[1]](sys.argv[2])
s.open()
lk = s.try_lock(sys.argv[3])
print("locked" if lk else "busy", flush=True)
if lk and len(sys.argv) > 4:
    time.sleep(60)
if lk:
    lk.release()
"""


async def test_claim_excludes_other_processes_and_dies_with_its_holder(
        store: AnyStore, kind: str) -> None:
    qid = await commit_bytes(store, b"x")
    lk = store.try_lock(qid)
    assert lk is not None
    out, _ = run_child(LOCK_CHILD, kind, store.root, qid).communicate(timeout=30)
    assert out.strip() == "busy"
    lk.release()
    await asyncio.sleep(0.05)                       # a batched release is written
    out, _ = run_child(LOCK_CHILD, kind, store.root, qid).communicate(timeout=30)
    assert out.strip() == "locked"

    holder = run_child(LOCK_CHILD, kind, store.root, qid, "hold")
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    assert store.try_lock(qid) is None
    holder.kill()
    holder.wait(30)
    holder.stdout.close()
    lk = store.try_lock(qid)                        # the dead holder's claim is taken over
    assert lk is not None
    lk.release()


async def test_hand_over_keeps_the_fresh_message_claimed(make: Callable[..., AnyStore],
                                                         kind: str) -> None:
    s = make(hand_over_locks=True)
    await s.start()
    w = s.new_spool()
    w.write(b"Subject: fresh\r\n\r\n")
    qid = await s.commit(w, envelope())
    assert w.lock is not None and w.lock.held and w.lock.qid == qid
    out, _ = run_child(LOCK_CHILD, kind, s.root, qid).communicate(timeout=30)
    assert out.strip() == "busy"
    w.lock.release()
    await asyncio.sleep(0.05)
    out, _ = run_child(LOCK_CHILD, kind, s.root, qid).communicate(timeout=30)
    assert out.strip() == "locked"


async def test_lock_waits_with_timeout(store: AnyStore) -> None:
    qid = await commit_bytes(store, b"x")
    lk = store.try_lock(qid)
    assert lk is not None
    t0 = time.monotonic()
    assert store.lock(qid, 0.2) is None
    assert time.monotonic() - t0 >= 0.2
    threading.Timer(0.2, lk.release).start()
    lk2 = await asyncio.to_thread(store.lock, qid, 10)
    assert lk2 is not None
    await store.remove(qid)                         # the claim goes with it
    assert not lk2.held or store.try_lock(qid) is None
    lk2.release()
    assert store.lock(qid, 5) is None               # gone: no waiting


# ------------------------------------------------------------------ faults


@pytest.fixture
def file_size_limit() -> Iterator[Callable[[int], None]]:
    """A real kernel write error (EFBIG) that even root gets: RLIMIT_FSIZE."""
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def limit(n: int) -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (n, old_limit[1]))

    try:
        yield limit
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


async def test_body_write_error_at_commit_is_451_and_nothing_queued(
        store: AnyStore, file_size_limit: Callable[[int], None]) -> None:
    w = store.new_spool()
    file_size_limit(4096)
    w.write(b"x" * 10_000)                          # still in the 64 KiB buffer
    try:
        with pytest.raises(TemporaryFailure) as exc:
            await store.commit(w, envelope())
    finally:
        file_size_limit(resource.RLIM_INFINITY)
    assert (exc.value.reply.code, exc.value.reply.enhanced) == (451, "4.3.0")
    assert store.ids() == []
    qid = await commit_bytes(store, b"the next one works")
    assert store.ids() == [qid]


async def test_body_write_error_while_receiving_is_oserror(
        store: AnyStore, file_size_limit: Callable[[int], None]) -> None:
    w = store.new_spool()
    file_size_limit(4096)
    try:
        with pytest.raises(OSError) as exc:
            w.write(b"x" * 100_000)                 # larger than the buffer
    finally:
        file_size_limit(resource.RLIM_INFINITY)
    assert exc.value.errno == errno.EFBIG
    w.abort()
    assert store.ids() == []


# ------------------------------------------------------------------ crash


CRASH_CHILD = r"""
import asyncio, itertools, sys, time
from pymta.queue.store import QueueStore
from pymta.queue.sqlstore import SqliteQueueStore
from pymta.types import Envelope, Recipient

def body(i):
    return b"Subject: %d\r\n\r\n" % i + bytes([65 + i % 26]) * (100 + 9973 * (i % 40))

async def main():
    s = {"files": QueueStore, "sqlite": SqliteQueueStore}[sys.argv[1]](sys.argv[2])
    await s.start()
    counter = itertools.count()
    async def session():           # 16 concurrent "sessions", until the SIGKILL
        while True:
            i = next(counter)
            w = s.new_spool()
            data = body(i)
            for k in range(0, len(data), 4096):
                w.write(data[k:k + 4096])
                await asyncio.sleep(0)
            env = Envelope("a@example.com", [Recipient("b@example.com", "b@example.com")],
                           time.time(), time.time(), extra={"i": str(i)})
            qid = await s.commit(w, env)
            sys.stdout.write(f"{qid} {i}\n")
            sys.stdout.flush()
    await asyncio.gather(*(session() for _ in range(16)))

asyncio.run(main())
"""


def crash_body(i: int) -> bytes:
    return b"Subject: %d\r\n\r\n" % i + bytes([65 + i % 26]) * (100 + 9973 * (i % 40))


def kill_mid_commits(kind: str, root: Path, acks: int) -> dict[str, int]:
    """Run CRASH_CHILD until ``acks`` commits are acknowledged, SIGKILL it; qid -> i of
    every acknowledged commit."""
    proc = run_child(CRASH_CHILD, kind, str(root))
    assert proc.stdout is not None
    acked: dict[str, int] = {}
    try:
        while len(acked) < acks:
            line = proc.stdout.readline()
            assert line, f"child exited early with {proc.poll()}"
            qid, i = line.split()
            acked[qid] = int(i)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    for line in proc.stdout.read().splitlines():
        if len(line.split()) == 2:
            qid, i = line.split()
            acked[qid] = int(i)
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    return acked


@pytest.mark.slow
async def test_sigkill_mid_commit_loses_nothing_acknowledged(
        make: Callable[..., AnyStore], kind: str, tmp_path: Path) -> None:
    acked = kill_mid_commits(kind, tmp_path / "queue", 300)
    s = make()
    s.open()
    present = set(s.ids())
    assert set(acked) <= present
    for qid in present:     # acknowledged or not, every message there is whole
        env = s.load(qid)
        assert env is not None
        i = int(env.extra["i"])
        assert acked.get(qid, i) == i
        assert body_of(s, qid) == crash_body(i)
        assert env.size == len(crash_body(i))
    # at most one batch in flight was committed without its acknowledgement being printed
    assert len(present - set(acked)) <= 16


# ------------------------------------------------------------------ the queue manager


async def test_manager_defers_delivers_and_bounces_over_the_store(
        make: Callable[..., AnyStore]) -> None:
    from pymta.types import Reply
    from tests.unit.test_hardening_queue_logic import TwoClocks, manager
    from tests.unit.test_manager import BODY, DEFER, OK, Agent, always

    s = make(hand_over_locks=True)
    await s.start()
    clocks = TwoClocks()
    bodies: list[bytes] = []

    def script(r: Recipient, n: int) -> Reply:
        return DEFER if n == 1 else OK

    remote = Agent(script)
    real_deliver = remote.deliver

    async def deliver(msg: Any, rcpts: Any) -> Any:
        with open(msg.body_path, "rb") as f:
            bodies.append(f.read())
        return await real_deliver(msg, rcpts)

    remote.deliver = deliver  # type: ignore[method-assign]
    local = Agent(always(OK))
    mgr = manager(s, remote, local, clocks=clocks)
    env = Envelope("alice@example.org", [Recipient("bob@example.net", "bob@example.net",
                                                   local=False)],
                   clocks.wall, clocks.wall, size=len(BODY))
    qid = await s.enqueue_bytes(env, BODY)
    await mgr.run_once_due()
    assert bodies == [BODY]
    left = s.load(qid)
    assert left is not None and left.recipients[0].attempts == 1      # saved, deferred
    clocks.advance(4000)
    await mgr.run_once_due()
    assert bodies == [BODY, BODY]
    assert s.ids() == []                                               # delivered: removed


async def test_a_second_store_on_the_queue_is_another_worker(
        make: Callable[..., AnyStore]) -> None:
    a = make(hand_over_locks=True)
    await a.start()
    b = make()
    b.open()
    w = a.new_spool()
    w.write(b"Subject: x\r\n\r\n")
    qid = await a.commit(w, envelope())
    assert w.lock is not None
    assert b.try_lock(qid) is None                  # the fresh message is a's
    w.lock.release()
    await asyncio.sleep(0.05)
    lk = b.try_lock(qid)
    assert lk is not None
    assert a.try_lock(qid) is None
    lk.release()
