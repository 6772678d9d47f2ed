"""Issue 10, file-system faults and the session's hand-off to the queue, without sockets.

Faults are injected where the kernel would report them (a write, an fsync, a rename, an
unlink) and the test checks what a client or the queue manager would see: the reply (``452
4.3.1`` for a full disk, ``451 4.3.0`` for any other fault, never a 250 or a 5xx), the files
left behind (none of a refused message), the old envelope intact after a failed rewrite,
and descriptors closed. The integration twins against a real ``pymta serve`` (tmpfs state
dir, read-only mount, raw-socket disconnects) are in ``tests/integration/test_faults_fs.py``
and ``tests/integration/test_local_faults.py``.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from pymta.backends.chain import LookupChain
from pymta.pipeline import Action, Pipeline, SpooledBody, Transaction, Verdict
from pymta.queue import store as store_module
from pymta.queue.committer import CommitItem, GroupCommitter
from pymta.queue.intake import Intake
from pymta.queue.space import FreeSpace, Sample, reserve_for, shortage
from pymta.queue.store import QueueStore, SpoolClosedError
from pymta.receiving.session import ReceiveContext, Session
from pymta.smtp import events as ev
from pymta.smtp.params import MailParams
from pymta.types import Envelope, Recipient, TemporaryFailure

ENOSPC = OSError(errno.ENOSPC, "No space left on device")
EIO = OSError(errno.EIO, "Input/output error")
EROFS = OSError(errno.EROFS, "Read-only file system")


def envelope(n: int = 0) -> Envelope:
    now = time.time()
    return Envelope(sender="sender@example.com",
                    recipients=[Recipient(f"rcpt{n}@example.com", f"rcpt{n}@example.com")],
                    received_at=now, next_attempt=now, extra={"n": str(n)})


def listing(store: QueueStore) -> dict[str, list[str]]:
    return {d: sorted(os.listdir(os.path.join(store.root, d)))
            for d in ("tmp", "data", "env", "corrupt")}


def open_queue_fds(store: QueueStore) -> list[str]:
    """Files of the queue this process still has open (directories aside)."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(store.root + "/") and not os.path.isdir(target):
            out.append(target)
    return out


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[QueueStore]:
    s = QueueStore(tmp_path / "queue")
    s.open()
    await s.start()
    yield s
    await s.aclose()


async def committed(store: QueueStore, data: bytes = b"Subject: x\r\n\r\nbody\r\n") -> str:
    w = store.new_spool()
    w.write(data)
    return await store.commit(w, envelope())


# ------------------------------------------------------------------ free space (MAIL FROM)


class FakeStatvfs:
    def __init__(self, free: int, read_only: bool = False) -> None:
        self.free = free
        self.read_only = read_only
        self.calls = 0

    def __call__(self, path: str) -> Any:
        self.calls += 1

        class R:
            f_bavail = self.free // 4096
            f_frsize = 4096
            f_flag = os.ST_RDONLY if self.read_only else 0
        return R()


def test_shortage_follows_postfix_queue_minfree_rule() -> None:
    reserve = reserve_for(10_240_000)                   # 1.5 x the default size limit
    assert reserve == 15_360_000
    assert reserve_for(1000, queue_minfree=50_000_000) == 50_000_000
    assert shortage(Sample(15_000_000, False), 0, reserve)          # below the reserve
    assert not shortage(Sample(16_000_000, False), 0, reserve)
    assert shortage(Sample(16_000_000, False), 700_000, reserve)    # SIZE does not fit
    assert shortage(Sample(40_000_000, False), 20_000_001, reserve)  # SIZE > half the free
    assert not shortage(None, 10**9, reserve)           # statvfs failed: the writes will tell


def test_free_space_is_cached_and_invalidated() -> None:
    clock = [100.0]
    fake = FakeStatvfs(8 * 2**20)
    space = FreeSpace("/q", ttl=1.0, clock=lambda: clock[0], statvfs=fake)
    for _ in range(1000):                               # a burst of MAIL FROMs: one statvfs
        assert space.sample() == Sample(8 * 2**20, False)
    assert fake.calls == 1
    fake.free = 0
    clock[0] += 0.5
    assert space.sample().free == 8 * 2**20             # still cached
    space.invalidate()                                  # a write failed with ENOSPC
    assert space.sample().free == 0
    assert fake.calls == 2
    fake.free = 10**9
    clock[0] += 1.01                                    # space returns: seen after the ttl
    assert space.sample().free == fake.free // 4096 * 4096


async def test_admission_refuses_full_and_read_only(tmp_path: Path) -> None:
    s = QueueStore(tmp_path / "queue")
    s.open()
    fake = FakeStatvfs(8 * 2**20)
    s.space = FreeSpace(s.root, ttl=0.0, statvfs=fake)
    refusal = s.admission(0, reserve_for(10_240_000))
    assert refusal is not None
    assert (refusal.reply.code, refusal.reply.enhanced, refusal.reply.text) == (
        452, "4.3.1", "Insufficient system storage")
    fake.free = 10**9
    assert s.admission(0, reserve_for(10_240_000)) is None
    fake.read_only = True
    refusal = s.admission(0, reserve_for(10_240_000))
    assert refusal is not None
    assert (refusal.reply.code, refusal.reply.enhanced) == (451, "4.3.0")
    await s.aclose()


# ------------------------------------------------------------------ write faults


@pytest.mark.parametrize(("err", "reply"), [(ENOSPC, (452, "4.3.1")),
                                            (OSError(errno.EDQUOT, "Disk quota exceeded"),
                                             (452, "4.3.1")),
                                            (EIO, (451, "4.3.0"))])
async def test_fsync_fault_at_commit_is_temporary_and_leaves_nothing(
        tmp_path: Path, err: OSError, reply: tuple[int, str]) -> None:
    class Failing(GroupCommitter):
        def _sync_item(self, item: CommitItem) -> None:
            raise err

    class FailingStore(QueueStore):
        committer_class = Failing

    s = FailingStore(tmp_path / "queue")
    await s.start()
    w = s.new_spool()
    w.write(b"x" * 1000)
    with pytest.raises(TemporaryFailure) as exc:
        await s.commit(w, envelope())
    assert (exc.value.reply.code, exc.value.reply.enhanced) == reply
    assert listing(s) == {"tmp": [], "data": [], "env": [], "corrupt": []}
    assert open_queue_fds(s) == []
    await s.aclose()


async def test_enqueue_bytes_on_a_full_disk_is_452_and_leaves_nothing(
        store: QueueStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A DSN queued by the queue manager while the disk is full: a TemporaryFailure it can
    retry, no half message."""
    real_open_body = store_module.open_body

    class FullFile:
        def __init__(self, f: Any) -> None:
            self._f = f

        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name: str) -> Any:
            return getattr(self._f, name)

    monkeypatch.setattr(store_module, "open_body", lambda fd: FullFile(real_open_body(fd)))
    with pytest.raises(TemporaryFailure) as exc:
        await store.enqueue_bytes(envelope(), b"Subject: DSN\r\n\r\n" + b"x" * 100_000)
    assert (exc.value.reply.code, exc.value.reply.enhanced) == (452, "4.3.1")
    assert listing(store) == {"tmp": [], "data": [], "env": [], "corrupt": []}


@pytest.mark.parametrize("step", ["write", "fdatasync", "rename"])
async def test_save_under_a_fault_keeps_the_old_envelope(store: QueueStore,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         step: str) -> None:
    """The queue manager's envelope update is write-new, fsync, rename: a fault at any step
    leaves the old envelope readable and no temporary file."""
    qid = await committed(store)
    old = store.load(qid)
    assert old is not None
    new = store.load(qid)
    assert new is not None
    new.recipients[0].attempts = 7

    def fail(*args: Any, **kw: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    target = {"write": (store_module, "write_all"), "fdatasync": (os, "fdatasync"),
              "rename": (os, "rename")}[step]
    monkeypatch.setattr(*target, fail)
    with pytest.raises(OSError):
        store.save_sync(qid, new)
    monkeypatch.undo()
    assert os.listdir(store.tmp_dir) == []
    again = store.load(qid)
    assert again is not None and again.recipients[0].attempts == 0
    store.save_sync(qid, new)                           # and it works once space returns
    assert store.load(qid).recipients[0].attempts == 7  # type: ignore[union-attr]


async def test_read_only_file_system_during_commit_cleanup_is_no_traceback(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Issue 10 (found with the read-only mount): a commit failing on a read-only file
    system could not unlink its own files either, and ``commit clean-up failed`` with a
    traceback left the body's descriptor open. Now: 451 4.3.0, a warning, nothing open."""
    class Failing(GroupCommitter):
        def _rename(self, item: CommitItem) -> None:
            raise OSError(errno.EROFS, "Read-only file system")

    class FailingStore(QueueStore):
        committer_class = Failing

    s = FailingStore(tmp_path / "queue")
    await s.start()
    w = s.new_spool()
    w.write(b"x" * 1000)
    real_unlink = os.unlink

    def unlink(path: Any, *a: Any, **kw: Any) -> None:
        if str(path).startswith(s.root):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        real_unlink(path, *a, **kw)

    monkeypatch.setattr(os, "unlink", unlink)
    with pytest.raises(TemporaryFailure) as exc:
        await s.commit(w, envelope())
    monkeypatch.undo()
    assert (exc.value.reply.code, exc.value.reply.enhanced) == (451, "4.3.0")
    assert open_queue_fds(s) == []
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    await s.aclose()
    # the files the read-only file system kept are removed by the next start's clean-up
    s2 = QueueStore(tmp_path / "queue")
    s2.open()
    assert listing(s2) == {"tmp": [], "data": [], "env": [], "corrupt": []}
    await s2.aclose()


# ------------------------------------------------------------------ rewrite racing an abort


async def test_issue10_rewrite_racing_abort_leaves_no_file(store: QueueStore) -> None:
    """Issue 10, "a rewrite of the spool racing a disconnect": the client disconnects (the
    session calls ``abort``) while a thread rewrites the spool file. Before the fix the
    abort unlinked and closed the file under the thread, whose rename then recreated
    ``data/<qid>`` -- a body nobody would ever commit or remove, with its descriptor (and
    lock) leaked -- or the thread failed with FileNotFoundError / "not open"."""
    w = store.new_spool()
    w.write(b"Authentication-Results: forged\r\nSubject: x\r\n\r\n" + b"b" * 100_000)
    entered, release = threading.Event(), threading.Event()

    def transform(src: Any, dst: Any) -> None:
        entered.set()
        assert release.wait(10)
        dst.write(src.read())

    task = asyncio.create_task(store.rewrite_spool(w, transform))
    assert await asyncio.to_thread(entered.wait, 10)
    w.abort()                                           # the disconnect, mid-rewrite
    release.set()
    outcome = (await asyncio.gather(task, return_exceptions=True))[0]
    assert listing(store) == {"tmp": [], "data": [], "env": [], "corrupt": []}
    assert os.listdir(store.ready_dir) == []
    assert open_queue_fds(store) == []
    assert isinstance(outcome, SpoolClosedError), outcome
    assert w.closed
    with pytest.raises(SpoolClosedError):
        await store.commit(w, envelope())               # never acknowledged


async def test_cancelled_rewrite_cleans_up_when_the_thread_ends(store: QueueStore) -> None:
    w = store.new_spool()
    w.write(b"Subject: x\r\n\r\nbody\r\n")
    entered, release = threading.Event(), threading.Event()

    def transform(src: Any, dst: Any) -> None:
        entered.set()
        assert release.wait(10)
        dst.write(src.read())

    task = asyncio.create_task(store.rewrite_spool(w, transform))
    assert await asyncio.to_thread(entered.wait, 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    release.set()
    for _ in range(200):
        if w.closed and w._state == w._ABORTED:
            break
        await asyncio.sleep(0.01)
    assert w._state == w._ABORTED
    assert listing(store) == {"tmp": [], "data": [], "env": [], "corrupt": []}
    assert open_queue_fds(store) == []


async def test_rewrite_of_a_closed_writer_is_spool_closed(store: QueueStore) -> None:
    w = store.new_spool()
    w.abort()
    with pytest.raises(SpoolClosedError):
        await store.rewrite_spool(w, lambda src, dst: None)


# ------------------------------------------------------------------ corrupt queue files


def plant(store: QueueStore, qid: str, env: bytes | None, body: bytes | None) -> None:
    if env is not None:
        Path(store.env_dir, qid).write_bytes(env)
    if body is not None:
        Path(store.data_dir, qid).write_bytes(body)


async def good_envelope(store: QueueStore) -> tuple[bytes, bytes]:
    qid = await committed(store)
    env = Path(store.env_dir, qid).read_bytes()
    body = Path(store.body_path(qid)).read_bytes()
    await store.remove(qid)
    return env, body


CORRUPT_CASES = {
    "garbage": lambda env, body: (b"\x00\xff\xfe garbage", body),
    "truncated": lambda env, body: (env[: len(env) // 2], body),
    "zero_length_envelope": lambda env, body: (b"", body),
    "newer_version": lambda env, body: (env.replace(b'"v":1', b'"v":7'), body),
    "nested_too_deep": lambda env, body: (b"[" * 200_000 + b"]" * 200_000, body),
    "number_out_of_range": lambda env, body: (
        env.replace(b'"received_at":', b'"received_at":1' + b"0" * 400 + b',"x":'), body),
    "envelope_without_body": lambda env, body: (env, None),
    "zero_length_body": lambda env, body: (env, b""),
    "truncated_body": lambda env, body: (env, body[:-3]),
}


@pytest.mark.parametrize("case", sorted(CORRUPT_CASES))
async def test_corrupt_record_is_moved_aside_with_one_log_line(
        store: QueueStore, caplog: pytest.LogCaptureFixture, case: str) -> None:
    env, body = await good_envelope(store)
    bad_env, bad_body = CORRUPT_CASES[case](env, body)
    qid = "0000000000CASE0"
    plant(store, qid, bad_env, bad_body)
    caplog.clear()
    for _ in range(3):                                  # three queue scans
        assert store.load(qid) is None
    assert store.ids() == []
    assert qid in os.listdir(store.corrupt_dir)
    assert (qid + ".body" in os.listdir(store.corrupt_dir)) == (bad_body is not None)
    lines = [r for r in caplog.records if qid in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert lines[0].levelno == logging.ERROR and not lines[0].exc_info
    assert "corrupt" in lines[0].getMessage()


async def test_envelope_without_body_is_moved_aside_by_try_lock(
        store: QueueStore, caplog: pytest.LogCaptureFixture) -> None:
    """The queue manager locks before it loads: a lost body must not make the message an
    invisible, never-ending "someone else is delivering it"."""
    qid = await committed(store)
    os.unlink(store.body_path(qid))
    assert store.try_lock(qid) is None
    assert store.ids() == []
    assert os.listdir(store.corrupt_dir) == [qid]
    assert sum(qid in r.getMessage() for r in caplog.records) == 1


async def test_envelope_that_is_a_directory_or_a_link_is_moved_aside(store: QueueStore) -> None:
    env, body = await good_envelope(store)
    os.mkdir(Path(store.env_dir, "0000000000ADIR0"))
    plant(store, "0000000000ADIR0", None, body)
    os.symlink("/etc/passwd", Path(store.env_dir, "0000000000LINK0"))
    plant(store, "0000000000LINK0", None, body)
    assert store.load("0000000000ADIR0") is None
    assert store.load("0000000000LINK0") is None
    assert store.ids() == []
    assert sorted(os.listdir(store.corrupt_dir)) == [
        "0000000000ADIR0", "0000000000ADIR0.body", "0000000000LINK0", "0000000000LINK0.body"]


async def test_oversized_envelope_is_not_read_into_memory(
        store: QueueStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "MAX_ENVELOPE_BYTES", 1000)
    env, body = await good_envelope(store)
    doc = json.loads(env)
    doc["extra"] = {"pad": "x" * 5000}
    plant(store, "0000000000HUGE0", json.dumps(doc).encode(), body)
    assert store.load("0000000000HUGE0") is None
    assert "0000000000HUGE0" in os.listdir(store.corrupt_dir)


async def test_start_sets_aside_stray_files_and_keeps_the_rest(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Files that do not belong where they are (a bad name, a directory, a symlink) are
    moved to corrupt/ at start with one line each; the good message stays, and a body
    without envelope (an unfinished commit) is removed as before."""
    s = QueueStore(tmp_path / "queue")
    await s.start()
    good = await committed(s)
    await s.aclose()
    root = Path(s.root)
    (root / "env" / "bad.name").write_bytes(b"{}")
    (root / "env" / "line\nbreak").write_bytes(b"{}")
    (root / "data" / "..hidden").write_bytes(b"x")
    (root / "env" / "0000000000ADIR0").mkdir()
    (root / "data" / "0000000000DDIR0").mkdir()
    (root / "tmp" / "somedir").mkdir()
    os.symlink("/etc/passwd", root / "data" / "0000000000LINK0")
    (root / "data" / "0000000000NOENV").write_bytes(b"unfinished")
    caplog.clear()
    s2 = QueueStore(root)
    s2.open()
    assert s2.ids() == [good]
    assert os.listdir(root / "data") == [good]
    assert os.listdir(root / "tmp") == []
    moved = sorted(os.listdir(root / "corrupt"))
    assert moved == sorted(["stray-env-bad.name", "stray-env-line\nbreak", "stray-data-..hidden",
                            "stray-env-0000000000ADIR0", "stray-data-0000000000DDIR0",
                            "stray-tmp-somedir", "stray-data-0000000000LINK0"])
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 7, errors
    assert not any("\n" in m for m in errors), "a file name broke a log line"
    assert s2.load(good) is not None
    s3 = QueueStore(root)           # a second start: nothing more to report
    caplog.clear()
    s3.open()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    await s2.aclose()
    await s3.aclose()


# ------------------------------------------------------------------ the session's hand-off


class SlowCheck:
    """A pre-queue check that waits (slow DNS) until the test lets it go."""

    name = "slow"

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def check(self, txn: Transaction, body: SpooledBody) -> Verdict:
        self.entered.set()
        await self.release.wait()
        return Verdict(Action.PASS)


def make_session(store: QueueStore, pipeline: Pipeline | None = None
                 ) -> tuple[Session, list[str]]:
    submitted: list[str] = []
    ctx = ReceiveContext(hostname="mx.example.com", local_domains=frozenset({"example.com"}),
                         first_domain="example.com", lookup=LookupChain([]),
                         intake=Intake(store, lambda qid, env, lock=None: (
                             submitted.append(qid), lock and lock.release())),
                         pipeline=pipeline)
    return Session(ctx, "192.0.2.7", 40000), submitted


async def start_message(session: Session, body: bytes) -> None:
    assert session.on_mail(ev.MailFrom("a@remote.test", MailParams())).code == 250
    session._targets["b@example.com"] = Recipient("b@example.com", "b@example.com")
    assert session.on_data_start(ev.DataStart(False)).code == 354
    session.on_data_chunk(body)


async def test_issue10_disconnect_during_prequeue_checks_is_one_notice_line(
        store: QueueStore, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 10 (related defect): a client that disconnects while pre-queue checks run made
    the session commit a closed spool writer: an ERROR traceback ("spool writer is not
    open"). Now: nothing queued, the spool removed, one NOTICE line."""
    caplog.set_level(logging.DEBUG)
    check = SlowCheck()
    session, submitted = make_session(store, Pipeline([check]))
    await start_message(session, b"Subject: x\r\n\r\nbody\r\n")
    end = asyncio.create_task(session.on_data_end(ev.DataEnd(None, 20)))
    await check.entered.wait()
    session.abort()                                     # connection_lost
    check.release.set()
    reply = await end
    assert reply.code != 250
    assert submitted == []
    assert listing(store) == {"tmp": [], "data": [], "env": [], "corrupt": []}
    assert open_queue_fds(store) == []
    lines = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert [(r.levelno, r.getMessage()) for r in lines] == [
        (25, "lost connection after END-OF-MESSAGE from unknown[192.0.2.7]")]


async def test_issue11_disconnect_during_checks_is_one_notice_line(
        store: QueueStore, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 11 lists the defect again (a disconnect while pre-queue checks run gave an ERROR
    traceback, "spool writer is not open" / FileNotFoundError): issue 10's fix holds after
    the end of data moved to the queue's intake. Same assertions: nothing queued, a clean
    spool, no open files, one NOTICE line."""
    await test_issue10_disconnect_during_prequeue_checks_is_one_notice_line(store, caplog)


async def test_issue10_disconnect_during_spool_rewrite_is_clean(
        store: QueueStore, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The same with the disconnect while the forged-header rewrite runs in its thread."""
    caplog.set_level(logging.DEBUG)
    session, submitted = make_session(store, Pipeline([], []))
    entered, release = threading.Event(), threading.Event()
    real = store.rewrite_spool_sync

    def slow_rewrite(writer: Any, transform: Any) -> None:
        entered.set()
        assert release.wait(10)
        real(writer, transform)

    async def rewrite_spool(writer: Any, transform: Any) -> None:
        await asyncio.to_thread(slow_rewrite, writer, transform)

    monkeypatch.setattr(store, "rewrite_spool", rewrite_spool)

    class Dropper:
        name = "dropper"

        async def check(self, txn: Transaction, body: SpooledBody) -> Verdict:
            txn.drop_header(lambda field: field.lower().startswith(b"x-drop:"))
            return Verdict(Action.PASS)

    session.ctx.pipeline = Pipeline([Dropper()])
    await start_message(session, b"X-Drop: me\r\nSubject: x\r\n\r\nbody\r\n")
    end = asyncio.create_task(session.on_data_end(ev.DataEnd(None, 30)))
    assert await asyncio.to_thread(entered.wait, 10)
    session.abort()
    release.set()
    reply = await end
    assert reply.code != 250 and submitted == []
    assert listing(store) == {"tmp": [], "data": [], "env": [], "corrupt": []}
    assert open_queue_fds(store) == []
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert sum("lost connection after END-OF-MESSAGE" in r.getMessage()
               for r in caplog.records) == 1


@pytest.mark.parametrize(("err", "reply"), [(ENOSPC, (452, "4.3.1")), (EIO, (451, "4.3.0")),
                                            (EROFS, (451, "4.3.0"))])
async def test_spool_write_fault_maps_to_4xx_and_removes_the_spool(
        store: QueueStore, err: OSError, reply: tuple[int, str]) -> None:
    session, submitted = make_session(store)
    await start_message(session, b"Subject: x\r\n\r\n")
    spool = session._spool
    assert spool is not None

    class Broken:
        def write(self, data: bytes) -> int:
            raise err

        def close(self) -> None:
            pass

        def flush(self) -> None:
            pass

    real_file, spool._file = spool._file, Broken()
    session.on_data_chunk(b"x" * 100_000)
    spool._file = real_file
    r = await session.on_data_end(ev.DataEnd(None, 100_020))
    assert (r.code, r.enhanced) == reply
    assert submitted == []
    assert listing(store) == {"tmp": [], "data": [], "env": [], "corrupt": []}


@pytest.mark.parametrize(("err", "reply"), [(ENOSPC, (452, "4.3.1")), (EIO, (451, "4.3.0"))])
async def test_spool_create_fault_at_data_is_4xx(store: QueueStore,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 err: OSError, reply: tuple[int, str]) -> None:
    session, _ = make_session(store)
    assert session.on_mail(ev.MailFrom("a@remote.test", MailParams())).code == 250

    def fail() -> None:
        raise err

    monkeypatch.setattr(store, "new_spool", fail)
    r = session.on_data_start(ev.DataStart(False))
    assert (r.code, r.enhanced) == reply


async def test_a_stage_bug_is_451_not_a_dropped_session(store: QueueStore) -> None:
    session, submitted = make_session(store)

    class Buggy:
        checks: list[Any] = []

        async def run(self, txn: Any, body: Any) -> Any:
            raise RuntimeError("bug")

    session.ctx.pipeline = Buggy()  # type: ignore[assignment]
    await start_message(session, b"Subject: x\r\n\r\nbody\r\n")
    r = await session.on_data_end(ev.DataEnd(None, 20))
    assert (r.code, r.enhanced) == (451, "4.3.0")
    assert submitted == []
    assert listing(store) == {"tmp": [], "data": [], "env": [], "corrupt": []}


async def test_250_only_after_the_commit_is_durable(store: QueueStore,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The session's reply waits for the group commit's fsyncs: while the commit thread is
    held inside its flush, end of data has not answered."""
    committer = store.committer
    assert committer is not None
    inside, release = threading.Event(), threading.Event()
    real = committer._sync_dir

    def held_sync_dir(fd: int) -> None:
        inside.set()
        assert release.wait(10)
        real(fd)

    monkeypatch.setattr(committer, "_sync_dir", held_sync_dir)
    monkeypatch.setattr(committer, "_syncfs_fn", None)      # per-file path: _sync_dir
    session, submitted = make_session(store)
    await start_message(session, b"Subject: x\r\n\r\nbody\r\n")
    end = asyncio.create_task(session.on_data_end(ev.DataEnd(None, 20)))
    assert await asyncio.to_thread(inside.wait, 10)
    await asyncio.sleep(0.05)
    assert not end.done() and submitted == []
    release.set()
    r = await end
    assert r.code == 250 and len(submitted) == 1
    assert store.ids() == submitted


async def test_mail_from_is_refused_when_the_queue_is_full(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    s = QueueStore(tmp_path / "queue")
    await s.start()
    fake = FakeStatvfs(4 * 2**20)
    s.space = FreeSpace(s.root, ttl=60.0, statvfs=fake)
    session, _ = make_session(s)
    r = session.on_mail(ev.MailFrom("a@remote.test", MailParams()))
    assert (r.code, r.enhanced, r.text) == (452, "4.3.1", "Insufficient system storage")
    assert session._mail is None
    session.ctx.intake.size_limit = 1_000_000           # a smaller limit: 1.5 MB reserve
    r = session.on_mail(ev.MailFrom("a@remote.test", MailParams(size=100_000)))
    assert r.code == 250
    r = session.on_mail(ev.MailFrom("a@remote.test", MailParams(size=2_900_000)))
    assert (r.code, r.enhanced) == (452, "4.3.1")       # the declared size does not fit
    assert fake.calls == 1                              # one statvfs for all three
    warnings = [r.getMessage() for r in caplog.records if "free space" in r.getMessage()]
    assert len(warnings) == 1, warnings                 # one per measurement, not per MAIL
    await s.aclose()


async def test_issue10_failed_removal_gives_the_lock_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A removal whose envelope unlink fails (read-only disk) leaves the message queued: its
    lock must stay with the holder, not be closed with the files, or another worker could
    take the message and deliver it again before the holder locks it anew."""
    s = QueueStore(tmp_path / "queue")
    s.open()
    await s.start()
    other = QueueStore(tmp_path / "queue")          # another worker process, in effect
    other.open()
    try:
        qid = await committed(s)
        lock = s.try_lock(qid)
        assert lock is not None
        real_unlink = os.unlink

        def unlink(path: Any, *args: Any, **kwargs: Any) -> None:
            if str(path).startswith(s.env_dir + os.sep):
                raise OSError(errno.EROFS, "Read-only file system", str(path))
            real_unlink(path, *args, **kwargs)

        monkeypatch.setattr(os, "unlink", unlink)
        with pytest.raises(OSError):
            await s.remove(qid)
        monkeypatch.undo()
        assert lock.held and s.ids() == [qid]
        assert other.try_lock(qid) is None
        lock.release()
        taken = other.try_lock(qid)
        assert taken is not None
        taken.release()
    finally:
        await s.aclose()
        await other.aclose()
