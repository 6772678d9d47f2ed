"""The on-disk queue: durability, group commit, clean-up after crashes, faults, locking."""

from __future__ import annotations

import asyncio
import errno
import os
import resource
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pymta.queue import ids
from pymta.queue.committer import CommitItem, GroupCommitter
from pymta.queue.store import QueueStore
from pymta.types import Envelope, RcptState, Recipient, TemporaryFailure

REPO = Path(__file__).resolve().parents[2]


def envelope(n: int = 0) -> Envelope:
    now = time.time()
    return Envelope(sender="sender@example.com",
                    recipients=[Recipient(f"rcpt{n}@example.com", f"rcpt{n}@example.com"),
                                Recipient("ext@remote.example", "ext@remote.example",
                                          local=False)],
                    received_at=now, next_attempt=now, client_ip="192.0.2.1",
                    extra={"n": str(n)})


def listing(store: QueueStore) -> dict[str, list[str]]:
    return {d: sorted(os.listdir(os.path.join(store.root, d)))
            for d in ("tmp", "data", "env", "corrupt")}


def body_of(store: QueueStore, qid: str) -> bytes:
    with open(store.body_path(qid), "rb") as f:
        return f.read()


def run_child(code: str, *args: str, **kw: object) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, text=True,
                            stdout=subprocess.PIPE, **kw)  # type: ignore[call-overload]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[QueueStore]:
    s = QueueStore(tmp_path / "queue")
    s.open()
    await s.start()
    yield s
    await s.aclose()


async def commit_bytes(store: QueueStore, data: bytes, env: Envelope | None = None) -> str:
    w = store.new_spool()
    for i in range(0, len(data), 1000):
        w.write(data[i:i + 1000])
    return await store.commit(w, env or envelope())


# ------------------------------------------------------------------ basics


async def test_commit_roundtrip(store: QueueStore) -> None:
    data = b"Subject: hi\r\n\r\n" + b"x" * 200_000
    env = envelope(1)
    w = store.new_spool()
    assert os.path.exists(store.body_path(w.qid))      # written in place while receiving
    for i in range(0, len(data), 3000):
        w.write(data[i:i + 3000])
    assert w.size == len(data)
    qid = await store.commit(w, env)
    assert qid == w.qid
    assert env.size == len(data)
    assert store.load(qid) == env
    assert body_of(store, qid) == data
    assert store.ids() == [qid]
    assert listing(store) == {"tmp": [], "data": [qid], "env": [qid], "corrupt": []}
    for d in ("", "tmp", "data", "env", "corrupt"):
        assert stat.S_IMODE(os.stat(os.path.join(store.root, d)).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(store.body_path(qid)).st_mode) == 0o600
    w.abort()                                           # no-op after commit
    assert body_of(store, qid) == data


async def test_enqueue_bytes(store: QueueStore) -> None:
    qid = await store.enqueue_bytes(envelope(), b"generated DSN\r\n")
    assert body_of(store, qid) == b"generated DSN\r\n"
    assert store.load(qid).size == 15  # type: ignore[union-attr]


async def test_200_concurrent_commits_share_flushes(store: QueueStore) -> None:
    async def one(i: int) -> tuple[str, bytes]:
        data = f"message {i}\r\n".encode() * (i + 1)
        await asyncio.sleep(0.0005 * (i % 20))           # arrivals spread out a little
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
    assert listing(store)["tmp"] == []


async def test_abort_leaves_nothing(store: QueueStore) -> None:
    w = store.new_spool()
    w.write(b"partial")
    w.abort()
    w.abort()
    assert listing(store) == {"tmp": [], "data": [], "env": [], "corrupt": []}
    with pytest.raises(ValueError):
        w.write(b"more")
    with pytest.raises(ValueError):
        await store.commit(w, envelope())


async def test_commit_after_close_is_temporary(tmp_path: Path) -> None:
    s = QueueStore(tmp_path / "q")
    await s.start()
    w = s.new_spool()
    await s.aclose()
    with pytest.raises(TemporaryFailure):
        await s.commit(w, envelope())
    assert not os.listdir(tmp_path / "q" / "data")


async def test_cancelled_commit_still_completes_cleanly(store: QueueStore) -> None:
    """A session dropped mid-commit must not close files under the commit thread."""
    w = store.new_spool()
    w.write(b"body")
    task = asyncio.ensure_future(store.commit(w, envelope()))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await store.aclose()                                  # drains the committer
    assert store.ids() == [w.qid]
    assert body_of(store, w.qid) == b"body"
    assert w.closed
    store.open()
    lk = store.try_lock(w.qid)                          # the writer's lock was released
    assert lk is not None
    lk.release()


# ------------------------------------------------------------------ recovery


async def test_orphans_cleaned_on_open(tmp_path: Path) -> None:
    root = tmp_path / "queue"
    s = QueueStore(root)
    await s.start()
    kept = await commit_bytes(s, b"committed")
    receiving = s.new_spool()                            # a live writer: must survive
    receiving.write(b"in progress")
    receiving._file.flush()
    # What a crash leaves behind: a body never committed, temp files, and (corruption) an
    # envelope whose body is gone.
    (root / "data" / "1K13ORPHAN00001").write_bytes(b"never acknowledged")
    (root / "tmp" / "1K13ORPHAN00002").write_bytes(b"{}")
    (root / "tmp" / "1K13ORPHAN00003.body").write_bytes(b"half")
    (root / "env" / "1K13NOBODY00004").write_bytes(b'{"v": 1}')

    # Another process starting up on the same spool (as a second worker would).
    child = run_child("import sys; from pymta.queue.store import QueueStore;"
                      "QueueStore(sys.argv[1]).open()", str(root))
    assert child.wait(30) == 0

    assert sorted(os.listdir(root / "data")) == sorted([kept, receiving.qid])
    assert os.listdir(root / "tmp") == []
    assert sorted(os.listdir(root / "env")) == [kept]
    assert os.listdir(root / "corrupt") == ["1K13NOBODY00004"]
    # the live writer is unharmed and commits normally
    receiving.write(b" and done")
    assert await s.commit(receiving, envelope()) == receiving.qid
    assert body_of(s, receiving.qid) == b"in progress and done"
    await s.aclose()

    # Once nobody holds it, a body without an envelope is garbage.
    (root / "data" / "1K13ORPHAN00005").write_bytes(b"x")
    s2 = QueueStore(root)
    s2.open()
    assert sorted(os.listdir(root / "data")) == sorted([kept, receiving.qid])
    assert s2.ids() == sorted([kept, receiving.qid])
    await s2.aclose()


@pytest.mark.parametrize("nameless", [True, False], ids=["O_TMPFILE", "tmp-link"])
async def test_startup_cleanup_never_takes_a_prepared_body(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          nameless: bool) -> None:
    """A second worker starting up runs its clean-up in the instant between the creation of a
    prepared (``prealloc``) body and its lock; the body must still be there to receive mail.
    Both ways of making a body: nameless until locked, and (file systems without O_TMPFILE)
    through a locked ``tmp/`` name."""
    import fcntl

    from pymta.queue import store as store_module

    root = tmp_path / "queue"
    other = QueueStore(root)
    real_flock = fcntl.flock
    raced: list[str] = []

    def flock_after_cleanup(fd: int, op: int) -> None:
        if op & fcntl.LOCK_EX and not raced:
            raced.append(os.readlink(f"/proc/self/fd/{fd}"))
            other._recover()            # what another process's open() does, at the worst time
        real_flock(fd, op)

    s = QueueStore(root, prealloc=4)
    s._tmpfile_ok = nameless
    s.open()
    other.open()
    monkeypatch.setattr(store_module.fcntl, "flock", flock_after_cleanup)
    await s.start()
    for _ in range(100):
        if len(s._ready) == 4:
            break
        await asyncio.sleep(0.01)
    monkeypatch.setattr(store_module.fcntl, "flock", real_flock)
    assert raced, "the clean-up never ran between create and lock"
    writers = [s.new_spool() for _ in range(4)]
    for w in writers:
        w.write(b"Subject: t\r\n\r\nbody\r\n")
    qids = [await s.commit(w, envelope()) for w in writers]
    assert sorted(s.ids()) == sorted(qids)
    assert all(body_of(s, q) == b"Subject: t\r\n\r\nbody\r\n" for q in qids)
    assert s._tmpfile_ok is nameless
    await s.aclose()
    await other.aclose()
    assert os.listdir(root / "tmp") == [] and os.listdir(root / "ready") == []


async def test_corrupt_envelope_is_quarantined(store: QueueStore) -> None:
    qid = await commit_bytes(store, b"body")
    with open(os.path.join(store.env_dir, qid), "wb") as f:
        f.write(b'{"v": 1, "sender": ')
    assert store.load(qid) is None
    assert store.ids() == []
    assert sorted(os.listdir(store.corrupt_dir)) == [qid, qid + ".body"]
    assert store.load(qid) is None                        # gone now, not an error


async def test_newer_format_is_moved_aside_once(store: QueueStore,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """Issue 10: an envelope of an unknown (newer) version used to stay in env/ and be logged
    again at every queue scan; it goes to corrupt/ with one line saying what it is."""
    qid = await commit_bytes(store, b"body")
    with open(os.path.join(store.env_dir, qid), "wb") as f:
        f.write(b'{"v": 99}')
    assert store.load(qid) is None
    assert store.load(qid) is None                        # the second look finds nothing
    assert store.ids() == []
    assert sorted(os.listdir(store.corrupt_dir)) == [qid, qid + ".body"]
    lines = [r.getMessage() for r in caplog.records if qid in r.getMessage()]
    assert len(lines) == 1 and "v99" in lines[0] and "corrupt" in lines[0], lines


CRASH_CHILD = r"""
import asyncio, itertools, sys, time
from pymta.queue.store import QueueStore
from pymta.types import Envelope, Recipient

def body(i):
    return b"Subject: %d\r\n\r\n" % i + bytes([65 + i % 26]) * (100 + 997 * (i % 50))

async def main():
    s = QueueStore(sys.argv[1])
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
    return b"Subject: %d\r\n\r\n" % i + bytes([65 + i % 26]) * (100 + 997 * (i % 50))


@pytest.mark.slow
def test_sigkill_mid_commit_loses_nothing_acknowledged(tmp_path: Path) -> None:
    root = tmp_path / "queue"
    proc = run_child(CRASH_CHILD, str(root))
    assert proc.stdout is not None
    acked: dict[str, int] = {}
    try:
        while len(acked) < 300:
            line = proc.stdout.readline()
            assert line, f"child exited early with {proc.poll()}"
            qid, i = line.split()
            acked[qid] = int(i)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    for line in proc.stdout.read().splitlines():         # printed before it died: acked too
        if len(line.split()) == 2:
            qid, i = line.split()
            acked[qid] = int(i)
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL

    s = QueueStore(root)
    s.open()
    present = set(s.ids())
    assert set(acked) <= present
    for qid, i in acked.items():
        env = s.load(qid)
        assert env is not None and env.extra == {"i": str(i)}
        assert body_of(s, qid) == crash_body(i)
        assert env.size == len(crash_body(i))
    # the crash's leftovers are gone; nothing was judged corrupt
    assert os.listdir(s.tmp_dir) == []
    assert set(os.listdir(s.data_dir)) == present
    assert os.listdir(s.corrupt_dir) == []


# ------------------------------------------------------------------ faults


@pytest.fixture
def file_size_limit():
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


async def test_body_write_error_at_commit_is_temporary(store: QueueStore,
                                                       file_size_limit) -> None:
    w = store.new_spool()
    file_size_limit(4096)
    w.write(b"x" * 10_000)                                # still in the 64 KiB buffer
    with pytest.raises(TemporaryFailure) as exc:
        await store.commit(w, envelope())
    file_size_limit(resource.RLIM_INFINITY)
    assert (exc.value.reply.code, exc.value.reply.enhanced) == (451, "4.3.0")
    assert "queue file write error" in exc.value.reply.text
    assert listing(store) == {"tmp": [], "data": [], "env": [], "corrupt": []}


async def test_body_write_error_while_receiving_is_oserror(store: QueueStore,
                                                          file_size_limit) -> None:
    w = store.new_spool()
    file_size_limit(4096)
    with pytest.raises(OSError) as exc:
        w.write(b"x" * 100_000)                           # larger than the buffer
    file_size_limit(resource.RLIM_INFINITY)
    assert exc.value.errno == errno.EFBIG
    w.abort()
    assert listing(store) == {"tmp": [], "data": [], "env": [], "corrupt": []}


class FaultyCommitter(GroupCommitter):
    """Fails one step of the commit protocol for the qids in ``poisoned`` (or for all)."""

    fault = ""
    poisoned: set[str] = set()

    def _syncfs(self) -> None:
        if self.fault == "sync":
            raise OSError(errno.EIO, "injected syncfs error")   # forces the per-file path
        super()._syncfs()

    def _sync_item(self, item: CommitItem) -> None:
        if self.fault == "sync" and item.qid in self.poisoned:
            raise OSError(errno.EIO, "injected fsync error")
        super()._sync_item(item)

    def _rename(self, item: CommitItem) -> None:
        if self.fault == "rename" and item.qid in self.poisoned:
            raise OSError(errno.ENOSPC, "injected rename error")
        super()._rename(item)

    def _sync_dir(self, fd: int) -> None:
        if self.fault == "envdir" and fd == self._env_dir_fd:
            raise OSError(errno.EIO, "injected directory fsync error")
        super()._sync_dir(fd)


class FaultyStore(QueueStore):
    committer_class = FaultyCommitter


@pytest.mark.parametrize("fault", ["sync", "rename", "envdir"])
async def test_commit_fault_fails_only_affected_items(tmp_path: Path, fault: str) -> None:
    s = FaultyStore(tmp_path / "queue")
    await s.start()
    writers = []
    for i in range(6):
        w = s.new_spool()
        w.write(b"message %d" % i)
        writers.append(w)
    FaultyCommitter.fault = fault
    FaultyCommitter.poisoned = {writers[2].qid, writers[4].qid}
    try:
        results = await asyncio.gather(*(s.commit(w, envelope()) for w in writers),
                                       return_exceptions=True)
    finally:
        FaultyCommitter.fault = ""
    # the env/ fsync cannot be charged to one item: every renamed item of the batch fails
    failed = {w.qid for w in writers} if fault == "envdir" else FaultyCommitter.poisoned
    # the rename fault is ENOSPC: a full disk is 452 4.3.1, anything else 451 4.3.0
    expected = (452, "4.3.1") if fault == "rename" else (451, "4.3.0")
    for w, r in zip(writers, results, strict=True):
        if w.qid in failed:
            assert isinstance(r, TemporaryFailure)
            assert (r.reply.code, r.reply.enhanced) == expected
        else:
            assert r == w.qid
    ok = sorted({w.qid for w in writers} - failed)
    assert listing(s) == {"tmp": [], "data": ok, "env": ok, "corrupt": []}
    assert s.committer is not None and s.committer.batches >= 1
    await s.aclose()


# ------------------------------------------------------------------ updates


async def test_save_and_load_recipient_state(store: QueueStore) -> None:
    qid = await commit_bytes(store, b"body")
    env = store.load(qid)
    assert env is not None and [r.state for r in env.pending()] == [RcptState.PENDING] * 2
    r0, r1 = env.recipients
    r0.state, r0.attempts, r0.last_reply, r0.next_hop = (
        RcptState.DELIVERED, 1, "250 2.0.0 Ok", "maildir")
    r1.attempts, r1.last_reply, r1.last_attempt = 1, "451 4.4.1 timeout", 1700000000.5
    env.next_attempt += 300
    await store.save(qid, env)
    again = store.load(qid)
    assert again == env
    assert again is not None and again.pending() == [r1]
    assert listing(store)["tmp"] == []
    store.save_sync(qid, again)
    assert store.load(qid) == env

    await store.remove(qid)
    assert store.load(qid) is None and store.ids() == []
    assert listing(store) == {"tmp": [], "data": [], "env": [], "corrupt": []}
    with pytest.raises(FileNotFoundError):                 # never resurrect half a message
        await store.save(qid, env)
    store.remove_sync(qid)                                 # idempotent


def test_bad_ids_are_refused(tmp_path: Path) -> None:
    s = QueueStore(tmp_path / "q")
    s.open()
    for bad in ("../env/x", "", ".hidden", "a/b", "x" * 65):
        with pytest.raises(ValueError):
            s.body_path(bad)
        with pytest.raises(ValueError):
            s.load(bad)


# ------------------------------------------------------------------ locking


async def test_try_lock_excludes_second_lock_in_process(store: QueueStore) -> None:
    w = store.new_spool()
    w.write(b"x")
    assert store.try_lock(w.qid) is None                  # still being received
    qid = await store.commit(w, envelope())
    lk = store.try_lock(qid)
    assert lk is not None and lk.held
    assert store.try_lock(qid) is None
    lk.release()
    lk.release()
    with store.try_lock(qid) as lk2:  # type: ignore[union-attr]
        assert lk2.held and store.try_lock(qid) is None
    assert not lk2.held
    assert store.try_lock("1K13NOSUCHMSG001") is None


LOCK_CHILD = r"""
import sys, time
from pymta.queue.store import QueueStore
s = QueueStore(sys.argv[1])
s.open()
lk = s.try_lock(sys.argv[2])
print("locked" if lk else "busy", flush=True)
if lk and len(sys.argv) > 3:
    time.sleep(60)
"""


async def test_try_lock_excludes_other_processes(store: QueueStore) -> None:
    qid = await commit_bytes(store, b"x")
    lk = store.try_lock(qid)
    assert lk is not None
    out, _ = run_child(LOCK_CHILD, store.root, qid).communicate(timeout=30)
    assert out.strip() == "busy"
    lk.release()
    out, _ = run_child(LOCK_CHILD, store.root, qid).communicate(timeout=30)
    assert out.strip() == "locked"

    # A lock held by a process that dies is released with it.
    holder = run_child(LOCK_CHILD, store.root, qid, "hold")
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    assert store.try_lock(qid) is None
    holder.kill()
    holder.wait(30)
    holder.stdout.close()
    lk = store.try_lock(qid)
    assert lk is not None
    lk.release()


async def test_lock_waits_with_timeout(store: QueueStore) -> None:
    qid = await commit_bytes(store, b"x")
    lk = store.try_lock(qid)
    assert lk is not None
    t0 = time.monotonic()
    assert store.lock(qid, 0.2) is None
    assert time.monotonic() - t0 >= 0.2
    threading.Timer(0.2, lk.release).start()
    lk2 = await asyncio.to_thread(store.lock, qid, 10)
    assert lk2 is not None
    lk2.release()
    await store.remove(qid)
    assert store.lock(qid, 5) is None                      # gone: no waiting


async def test_lock_after_removal_by_holder_is_none(store: QueueStore) -> None:
    qid = await commit_bytes(store, b"x")
    lk = store.try_lock(qid)
    assert lk is not None
    fd = os.open(store.body_path(qid), os.O_RDONLY)        # a waiter that opened the body
    store.remove_sync(qid)
    lk.release()
    os.close(fd)
    assert store.try_lock(qid) is None


# ------------------------------------------------------------------ ids


def test_qids_unique_sortable_and_safe() -> None:
    made = [ids.new_qid() for _ in range(20_000)]
    assert len(set(made)) == len(made)
    assert sorted(made) == made
    assert all(len(q) == 16 and q.isalnum() and q.isupper() and ids.is_valid(q) for q in made)
    t = ids.qid_time(made[0])
    assert t is not None and abs(t - time.time()) < 60


def test_forked_child_gets_its_own_pid_part() -> None:
    parent = ids.new_qid()          # the pid part is now cached in this process
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                    # pragma: no cover - child
        os.write(w, ids.new_qid().encode())
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r, "rb") as f:
        child = f.read().decode()
    assert child[ids.TIME_CHARS:] != parent[ids.TIME_CHARS:]
    assert ids.new_qid()[ids.TIME_CHARS:] == parent[ids.TIME_CHARS:]


def test_qids_unique_across_processes() -> None:
    code = "from pymta.queue.ids import new_qid\nfor _ in range(5000): print(new_qid())"
    procs = [run_child(code) for _ in range(4)]
    seen: list[str] = []
    for p in procs:
        out, _ = p.communicate(timeout=60)
        seen += out.split()
    assert len(seen) == 20_000 and len(set(seen)) == 20_000
