"""Issue 10, faults of the queue's own disk after a delivery: a save or removal that fails
must never make the manager deliver the same recipients again (the outcomes wait in memory
and only the write is retried), and disk faults are one log line each, not a traceback per
message per scan.

Over the in-memory fake store of ``test_manager`` with injected faults, and over the real
``QueueStore`` with a committer whose removals fail the way they do on a read-only disk.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import pytest

from pymta.queue import manager as manager_mod
from pymta.queue.committer import GroupCommitter
from pymta.queue.retry import RetryPolicy
from pymta.queue.store import QueueStore, queue_write_error
from pymta.types import Envelope, RcptState, Recipient, TemporaryFailure
from tests.unit.test_hardening_queue_logic import TwoClocks, manager
from tests.unit.test_manager import (
    BODY,
    DEFER,
    OK,
    REJECT,
    Agent,
    FakeLock,
    FakeStore,
    always,
)

EROFS = OSError(errno.EROFS, os.strerror(errno.EROFS))

BOB = "bob@example.net"
CAROL = "carol@example.net"


class HeldLock(FakeLock):
    """A fake lock that knows whether it is still held (the real ``MessageLock.held``)."""

    def __init__(self, store: FakeStore, qid: str) -> None:
        super().__init__(store, qid)
        self.released = False

    @property
    def held(self) -> bool:
        return not self.released

    def release(self) -> None:
        if not self.released:
            self.released = True
            super().release()


class FaultyStore(FakeStore):
    """The fake store with switchable faults. As in the real store, a removal that fails
    has taken the message's lock with it (the committer closes it with the files)."""

    def __init__(self, tmp_path: Path) -> None:
        super().__init__(tmp_path)
        self.save_fault: OSError | None = None
        self.save_faults_left = -1          # -1: as long as save_fault is set
        self.remove_fault: OSError | None = None
        self.enqueue_fault: Exception | None = None
        self.load_faults: dict[str, OSError] = {}
        self.ids_fault: OSError | None = None
        self.saves = 0
        self.locks: dict[str, HeldLock] = {}

    def ids(self) -> list[str]:
        if self.ids_fault is not None:
            raise self.ids_fault
        return super().ids()

    def load(self, qid: str) -> Envelope | None:
        if qid in self.load_faults:
            raise self.load_faults[qid]
        return super().load(qid)

    async def save(self, qid: str, envelope: Envelope) -> None:
        if self.save_fault is not None and self.save_faults_left != 0:
            self.save_faults_left -= 1
            raise self.save_fault
        self.saves += 1
        await super().save(qid, envelope)

    async def remove(self, qid: str) -> None:
        lock = self.locks.get(qid)
        if lock is not None and lock.held:
            lock.release()          # handed to the removal, closed whatever happens
        if self.remove_fault is not None:
            raise self.remove_fault
        await super().remove(qid)

    async def enqueue_bytes(self, envelope: Envelope, data: bytes) -> str:
        if self.enqueue_fault is not None:
            raise self.enqueue_fault
        return await super().enqueue_bytes(envelope, data)

    def try_lock(self, qid: str) -> HeldLock | None:
        if qid in self.locked or qid not in self.envs:
            return None
        self.locked.add(qid)
        self.locks[qid] = HeldLock(self, qid)
        return self.locks[qid]


async def put_message(store: FakeStore, clocks: TwoClocks, *rcpts: str,
                      sender: str = "alice@example.org") -> str:
    env = Envelope(sender, [Recipient(a, a, local=False) for a in rcpts], clocks.wall,
                   clocks.wall)
    return await store.enqueue_bytes(env, BODY)


def delivered_to(agent: Agent) -> list[str]:
    return [a for _, rcpts in agent.calls for a in rcpts]


def errors(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    """Records containing ``text``; every one of them must be one line, no traceback."""
    found = [r for r in caplog.records if text in r.getMessage()]
    for r in found:
        assert r.exc_info is None and "\n" not in r.getMessage(), r.getMessage()
    return found


def script(replies: dict[str, object]):
    return lambda r, n: replies[r.address]


# ------------------------------------------------------------------ outcomes kept in memory


async def test_issue10_save_failure_after_delivery_does_not_redeliver(tmp_path, caplog):
    """bob delivered, carol deferred, and the save that records it fails (read-only disk):
    however often the manager (or another worker) comes back to the message while the disk
    is broken, bob is not handed to an agent again; when the disk is back the state is
    written, and the retry goes to carol alone."""
    caplog.set_level(logging.INFO, logger="pymta.queue")
    store = FaultyStore(tmp_path)
    clocks = TwoClocks()
    remote = Agent(script({BOB: OK, CAROL: DEFER}))
    mgr = manager(store, remote, clocks=clocks)
    qid = await put_message(store, clocks, BOB, CAROL)
    store.save_fault = EROFS

    await mgr.run_once_due()
    assert delivered_to(remote) == [BOB, CAROL]
    assert qid in store.locked                  # kept: no other worker may take it
    other = Agent(always(OK))                   # another worker on the same queue
    await manager(store, other, clocks=clocks).run_once_due()
    assert other.calls == []
    for _ in range(5):                          # the disk stays read-only for a while
        clocks.advance(manager_mod.WRITE_RETRY_MAX)
        await mgr.run_once_due()
    assert delivered_to(remote) == [BOB, CAROL]
    failures = errors(caplog, f"{qid}: cannot update the queue file: Read-only file system")
    assert len(failures) == 6                   # one line per failed write
    assert store.load(qid).recipients[0].state is RcptState.PENDING   # the disk is behind

    store.save_fault = None                     # the disk is back
    clocks.advance(manager_mod.WRITE_RETRY_MAX)
    await mgr.run_once_due()
    env = store.load(qid)
    assert [r.state for r in env.recipients] == [RcptState.DELIVERED, RcptState.PENDING]
    assert env.recipients[1].attempts == 1
    assert qid not in store.locked
    assert delivered_to(remote) == [BOB, CAROL]

    clocks.advance(RetryPolicy().first)         # carol's retry: carol only
    await mgr.run_once_due()
    assert delivered_to(remote) == [BOB, CAROL, CAROL]


async def test_issue10_remove_failure_after_delivery_does_not_redeliver(tmp_path, caplog):
    """Everything delivered, and the removal fails -- having taken the lock with it, as the
    real store's removal does: the manager locks the message again at once, so neither it
    nor another worker delivers it again, and removes it once the disk is back."""
    store = FaultyStore(tmp_path)
    clocks = TwoClocks()
    remote = Agent(always(OK))
    mgr = manager(store, remote, clocks=clocks)
    qid = await put_message(store, clocks, BOB)
    store.remove_fault = EROFS
    await mgr.run_once_due()
    assert qid in store.locked and store.locks[qid].held
    other = Agent(always(OK))
    await manager(store, other, clocks=clocks).run_once_due()
    clocks.advance(manager_mod.WRITE_RETRY_MAX)
    await mgr.run_once_due()
    assert other.calls == [] and delivered_to(remote) == [BOB]
    assert len(errors(caplog, f"{qid}: cannot update the queue file")) == 2
    store.remove_fault = None
    clocks.advance(manager_mod.WRITE_RETRY_MAX)
    await mgr.run_once_due()
    assert store.ids() == [] and store.locked == set()
    assert delivered_to(remote) == [BOB]


class ReadOnlyRemovals(GroupCommitter):
    """The real committer, except that unlinking an envelope fails as on a read-only disk;
    the message's lock is left open for the store to give back, as the real one does."""

    read_only = True

    def _flush(self, batch, removals=None):
        if not self.read_only or not removals:
            return super()._flush(batch, removals)
        errors = super()._flush(batch, [])
        return errors + [OSError(errno.EROFS, "Read-only file system", rm.env)
                         for rm in removals]


async def test_issue10_real_store_failed_removal_keeps_the_message_locked(tmp_path):
    store = QueueStore(tmp_path / "queue")
    store.committer_class = ReadOnlyRemovals
    await store.start()
    other_store = QueueStore(tmp_path / "queue")    # another worker process, in effect
    other_store.open()
    try:
        clocks = TwoClocks()
        remote = Agent(always(OK))
        mgr = manager(store, remote, clocks=clocks)
        env = Envelope("alice@example.org", [Recipient(BOB, BOB, local=False)], clocks.wall,
                       clocks.wall, size=len(BODY))
        qid = await store.enqueue_bytes(env, BODY)
        await mgr.run_once_due()
        assert delivered_to(remote) == [BOB]
        assert store.ids() == [qid]
        assert other_store.try_lock(qid) is None    # still ours: nobody delivers it again
        other = Agent(always(OK))
        await manager(other_store, other, clocks=clocks).run_once_due()
        assert other.calls == []

        assert isinstance(store.committer, ReadOnlyRemovals)
        store.committer.read_only = False
        clocks.advance(manager_mod.WRITE_RETRY_MAX)
        await mgr.run_once_due()
        assert store.ids() == [] and not os.path.exists(store.body_path(qid))
        assert delivered_to(remote) == [BOB]
    finally:
        await store.aclose()
        await other_store.aclose()


async def test_issue10_failed_group_save_is_carried_by_the_final_write(tmp_path, caplog):
    """Two transport groups; the save after the first one fails, the attempt's final save
    works: the disk has both outcomes, and nothing is kept or retried."""
    store = FaultyStore(tmp_path)
    store.save_fault, store.save_faults_left = EROFS, 1
    clocks = TwoClocks()
    remote = Agent(always(DEFER))
    local = Agent(always(OK))
    mgr = manager(store, remote, local, clocks=clocks)
    env = Envelope("alice@example.org",
                   [Recipient("al@example.org", "al@example.org", local=True, mailbox="al/"),
                    Recipient(BOB, BOB, local=False)], clocks.wall, clocks.wall)
    qid = await store.enqueue_bytes(env, BODY)
    await mgr.run_once_due()
    assert [r.state for r in store.load(qid).recipients] == [RcptState.DELIVERED,
                                                             RcptState.PENDING]
    assert store.locked == set() and mgr._unwritten == {}
    assert len(errors(caplog, f"{qid}: cannot save the outcomes so far")) == 1


async def test_issue10_unwritten_outcomes_bound_pauses_new_deliveries(tmp_path, caplog,
                                                                     monkeypatch):
    """At ``MAX_UNWRITTEN`` messages waiting for the disk, no new delivery starts (it could
    not be recorded either); once the disk takes writes, the paused one goes at once."""
    monkeypatch.setattr(manager_mod, "MAX_UNWRITTEN", 1)
    store = FaultyStore(tmp_path)
    clocks = TwoClocks()
    remote = Agent(always(OK))
    mgr = manager(store, remote, clocks=clocks, concurrency=1)
    first = await put_message(store, clocks, BOB)
    second = await put_message(store, clocks, CAROL)
    store.remove_fault = EROFS
    await mgr.run_once_due()
    assert delivered_to(remote) == [BOB]
    assert store.ids() == [first, second]
    assert len(errors(caplog, "no new delivery starts")) == 1
    store.remove_fault = None
    clocks.advance(manager_mod.WRITE_RETRY_FIRST)
    await mgr.run_once_due()                    # the write; the paused message is due now
    await mgr.run_once_due()
    assert delivered_to(remote) == [BOB, CAROL]
    assert store.ids() == []


async def test_issue10_stop_gives_up_unwritten_outcomes_with_one_line(tmp_path, caplog):
    store = FaultyStore(tmp_path)
    clocks = TwoClocks()
    mgr = manager(store, Agent(always(OK)), clocks=clocks)
    qid = await put_message(store, clocks, BOB)
    store.remove_fault = EROFS
    await mgr.run_once_due()
    await mgr.stop()
    assert store.locked == set()                # a restart may take it (and repeat it)
    [line] = errors(caplog, "could not be updated on disk")
    assert qid in line.getMessage() and "repeated after a restart" in line.getMessage()


# ------------------------------------------------------------------ one line per fault


async def test_issue10_dsn_on_full_disk_is_one_log_line(tmp_path, caplog):
    """The failure notice cannot be queued (disk full): one line with the system's reason,
    and the notice stays owed."""
    store = FaultyStore(tmp_path)
    clocks = TwoClocks()
    mgr = manager(store, Agent(always(REJECT)), clocks=clocks)
    qid = await put_message(store, clocks, BOB)
    try:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except OSError as e:
        try:
            raise queue_write_error(e) from e
        except TemporaryFailure as full:
            store.enqueue_fault = full
    await mgr.run_once_due()
    [line] = errors(caplog, f"{qid}: cannot queue failed notification")
    assert "No space left on device (ENOSPC)" in line.getMessage()
    assert store.load(qid).recipients[0].state is RcptState.NOTICE_OWED


async def test_issue10_scan_io_error_logged_once_per_file_and_fault(tmp_path, caplog):
    store = FaultyStore(tmp_path)
    clocks = TwoClocks()
    remote = Agent(always(OK))
    mgr = manager(store, remote, clocks=clocks)
    qid = await put_message(store, clocks, BOB)
    store.load_faults[qid] = OSError(errno.EIO, os.strerror(errno.EIO))
    for _ in range(3):
        await mgr.run_once_due()
    assert len(errors(caplog, f"{qid}: cannot read queue file")) == 1
    assert "Input/output error (EIO)" in caplog.text
    store.load_faults[qid] = OSError(errno.ESTALE, os.strerror(errno.ESTALE))
    for _ in range(3):
        await mgr.run_once_due()
    assert len(errors(caplog, f"{qid}: cannot read queue file")) == 2   # a new fault
    assert remote.calls == []

    store.ids_fault = OSError(errno.EIO, os.strerror(errno.EIO))
    for _ in range(3):
        await mgr.run_once_due()
    assert len(errors(caplog, "queue scan failed")) == 1

    store.ids_fault = None
    del store.load_faults[qid]
    await mgr.run_once_due()
    assert delivered_to(remote) == [BOB] and store.ids() == []


async def test_issue10_removal_failure_with_nothing_pending_is_one_line(tmp_path, caplog):
    """A message whose recipients are all done on disk, and whose removal fails: one line,
    retried later; no agent call."""
    store = FaultyStore(tmp_path)
    clocks = TwoClocks()
    remote = Agent(always(OK))
    mgr = manager(store, remote, clocks=clocks)
    qid = await put_message(store, clocks, BOB)
    env = store.envs[qid]
    env.recipients[0].state = RcptState.DELIVERED
    store.remove_fault = EROFS
    await mgr.run_once_due()
    assert len(errors(caplog, f"{qid}: queue file error: Read-only file system")) == 1
    store.remove_fault = None
    clocks.advance(RetryPolicy().first)
    await mgr.run_once_due()
    assert store.ids() == [] and remote.calls == []

