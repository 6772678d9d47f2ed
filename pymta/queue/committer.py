"""Group commit: make many concurrent queue commits durable with one flush.

A message may be acknowledged with ``250`` only once its body and envelope survive a power
cut. One fsync per message caps throughput at the disk's flush rate (~3,700/s here, less on
real disks); but sessions commit concurrently, so their flushes can be shared.

Implementation: commits are appended to a pending list and a single asyncio task drains it.
Each turn takes *everything* pending as one batch and runs the blocking part in one dedicated
thread (not the default executor, where it would queue behind unrelated work and could run
twice at once). While that thread flushes, new commits pile up and become the next batch, so
batches grow exactly as fast as the disk is slow: no timers, no added latency when idle.

For one batch, in this order (the order is the crash-safety argument):

0. run each item's ``prepare`` (the store's: flush the body's last bytes, write the envelope
   to ``tmp/``), so that creating files -- which waits for the journal while a flush runs --
   happens here and not on the event loop;
1. make every item's data durable: ``syncfs(2)`` on the spool's filesystem when the batch has
   more than one item (one journal flush for all of it), otherwise, or if ``syncfs`` fails,
   ``fdatasync`` each file and then fsync ``data/`` once, so a body's directory entry is on disk
   before anything can point at it;
2. rename each ``tmp/<qid>`` envelope into ``env/`` (the commit point);
3. fsync ``env/`` once, then resolve the batch's futures.

Removals (``RemoveItem``, a delivered message leaving the queue) ride on the same batches:
their envelopes are unlinked before the ``env/`` fsync of step 3 (one fsync for commits and
removals alike), their bodies after it, and the message's lock is closed last, here too: the
last close of an unlinked file frees its blocks, which waits for the journal.

A crash before 3 completes loses only commits that were never acknowledged; their leftovers are
removed when the store is next opened. An ``OSError`` is charged to the item that caused it
(per-file fsync, rename); an error that cannot be attributed (the ``env/`` fsync) fails every
item it may have affected. ``syncfs`` is used only on Linux >= 5.8: older kernels do not
report writeback errors from it, and a flush that can fail silently is worse than a slow one.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import os
import platform
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pymta import metrics
from pymta.types import QueueId

log = logging.getLogger("pymta.queue")


@dataclass(eq=False)
class CommitItem:
    """One commit handed to the committer.

    ``done`` runs on the event loop after the batch and before the commit's future resolves;
    the store uses it to close (or, on error, delete) the item's files. The committer never
    closes the descriptors itself: the thread may still be using them until the batch ends.
    """

    qid: QueueId
    fds: tuple[int, ...]                # files whose contents must be durable (body, envelope)
    src: str                            # tmp/<qid>
    dst: str                            # env/<qid>
    done: Callable[[CommitItem, BaseException | None], None]
    renamed: bool = False
    future: asyncio.Future[None] | None = field(default=None, repr=False)
    # Runs first, on the commit thread: writes the item's files (and sets ``fds``), so the
    # event loop never waits for the file system's journal. An OSError fails only this item.
    prepare: Callable[[CommitItem], None] | None = field(default=None, repr=False)


@dataclass(eq=False)
class RemoveItem:
    """A message leaving the queue: ``env`` is unlinked, ``env/`` fsynced (shared with the
    batch's commits), then ``body`` is unlinked and ``lock_fd`` (the message's lock, if the
    caller held it) closed -- on the commit thread, where the inode's release may wait for the
    journal without holding up the event loop. When the removal fails, ``lock_fd`` is left
    open (the message is still queued and still locked) for the caller to take back."""

    env: str
    body: str
    lock_fd: int = -1
    future: asyncio.Future[None] | None = field(default=None, repr=False)


def _load_syncfs() -> Callable[[int], None] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        major, minor = (int(x) for x in platform.release().split("-")[0].split(".")[:2])
    except ValueError:
        return None
    if (major, minor) < (5, 8):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int

    def syncfs(fd: int) -> None:
        if fn(fd) != 0:   # ctypes releases the GIL for the call
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs: {os.strerror(err)}")

    return syncfs


_SYNCFS = _load_syncfs()
SYNCFS = _SYNCFS    # ``syncfs(fd)`` raising OSError, or None: for other batched flushes


class GroupCommitter:
    """Batches commits into shared flushes; see the module docstring for the protocol.

    ``fs_fd`` is any descriptor on the spool's filesystem (for ``syncfs``); ``data_dir_fd``
    and ``env_dir_fd`` are the two directories whose entries a commit creates. The counters
    are for tests, benchmarks and metrics.
    """

    def __init__(self, *, fs_fd: int, data_dir_fd: int, env_dir_fd: int,
                 fsync: bool = True) -> None:
        self.fsync = fsync
        self._fs_fd = fs_fd
        self._data_dir_fd = data_dir_fd
        self._env_dir_fd = env_dir_fd
        self._syncfs_fn = _SYNCFS
        self._pending: list[CommitItem] = []
        self._removals: list[RemoveItem] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closing = False
        self.batches = 0        # batches processed (= flush rounds)
        self.commits = 0        # items processed
        self.max_batch = 0
        self.syncfs_calls = 0
        self.file_syncs = 0
        self.dir_syncs = 0
        self.removals = 0

    @property
    def running(self) -> bool:
        return self._task is not None and not self._closing

    async def start(self) -> None:
        if self._task is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pymta-commit")
        self._task = asyncio.get_running_loop().create_task(self._run(), name="pymta-commit")

    def submit(self, item: CommitItem) -> asyncio.Future[None]:
        """Queue ``item``; the future resolves once it is durable, or fails with its OSError."""
        if not self.running:
            raise RuntimeError("group committer is not running")
        item.future = asyncio.get_running_loop().create_future()
        self._pending.append(item)
        self._wakeup.set()
        return item.future

    def submit_removal(self, item: RemoveItem) -> asyncio.Future[None]:
        """Queue a removal; the future resolves once the envelope's unlink is durable."""
        if not self.running:
            raise RuntimeError("group committer is not running")
        item.future = asyncio.get_running_loop().create_future()
        self._removals.append(item)
        self._wakeup.set()
        return item.future

    async def close(self) -> None:
        """Stop accepting commits, finish every one already queued, stop the thread."""
        if self._task is None:
            return
        self._closing = True
        self._wakeup.set()
        await self._task
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    # ------------------------------------------------------------------ event loop side

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending and not self._removals:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch, self._pending = self._pending, []
            removals, self._removals = self._removals, []
            work = loop.run_in_executor(self._executor, self._flush, batch, removals)
            try:
                errors = await asyncio.shield(work)
            except asyncio.CancelledError:
                # The thread still owns these descriptors; finish the batch when it is done.
                work.add_done_callback(functools.partial(self._finish_late, batch + removals))
                raise
            except Exception as e:   # a bug in _flush: every item is in doubt
                log.exception("group commit failed")
                errors = [e] * (len(batch) + len(removals))
            self._finish(batch + removals, errors)
            if batch:
                metrics.commit_batch(len(batch))

    def _finish_late(self, batch: list[CommitItem | RemoveItem],
                     work: asyncio.Future[list[BaseException | None]]) -> None:
        """Finish a batch whose waiter was cancelled, once its thread is done with it."""
        self._finish(batch, _errors_of(work, batch))

    def _finish(self, batch: list[CommitItem | RemoveItem],
                errors: list[BaseException | None]) -> None:
        for item, err in zip(batch, errors, strict=True):
            if isinstance(item, CommitItem):
                try:
                    item.done(item, err)
                except Exception:
                    log.exception("%s: commit clean-up failed", item.qid)
            fut = item.future
            if fut is not None and not fut.done():
                if err is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(err)

    # ------------------------------------------------------------------ commit thread side

    def _flush(self, batch: list[CommitItem], removals: list[RemoveItem] | None = None,
               ) -> list[BaseException | None]:
        """One group commit, the error (or None) of each item then each removal. The order
        is what makes it crash-safe: the items' files durable before any of them is renamed
        into ``env/``; ``env/`` synced once for those renames and the removals' unlinks; a
        removed message's body and lock let go only after that."""
        removals = removals or []
        errors = _prepare_all(batch)
        if self.fsync and any(e is None for e in errors):
            self._make_durable(batch, errors)
        rm_errors = _unlink_envelopes(removals)
        renamed = self._rename_all(batch, errors) or bool(removals)
        if self.fsync and renamed:
            try:
                self._sync_dir(self._env_dir_fd)
            except OSError as e:
                _fail_remaining(errors, e)
                _fail_remaining(rm_errors, e)
        _release_removed(removals, rm_errors)
        if batch:
            self.batches += 1
            self.commits += len(batch)
            self.max_batch = max(self.max_batch, len(batch))
        self.removals += len(removals)
        return errors + rm_errors

    def _rename_all(self, batch: list[CommitItem], errors: list[BaseException | None]) -> bool:
        """Rename each item without an error yet into ``env/``; whether any was."""
        renamed = False
        for i, item in enumerate(batch):
            if errors[i] is None:
                try:
                    self._rename(item)
                except OSError as e:
                    errors[i] = e
                else:
                    item.renamed = True
                    renamed = True
        return renamed

    def _make_durable(self, batch: list[CommitItem], errors: list[BaseException | None]) -> None:
        if len(batch) > 1 and self._syncfs_fn is not None:
            try:
                self._syncfs()
                return
            except OSError as e:
                # Cannot tell whose data failed; per-file fsync below reports each file's error.
                log.warning("syncfs on queue failed (%s); falling back to fsync per file", e)
        for i, item in enumerate(batch):
            if errors[i] is not None:
                continue        # its prepare step failed: nothing of it will be renamed
            try:
                self._sync_item(item)
            except OSError as e:
                errors[i] = e
        if any(e is None for e in errors):
            try:
                self._sync_dir(self._data_dir_fd)
            except OSError as e:
                _fail_remaining(errors, e)

    # The four primitives below are methods so a test can inject a fault in one of them.

    def _syncfs(self) -> None:
        assert self._syncfs_fn is not None
        self._syncfs_fn(self._fs_fd)
        self.syncfs_calls += 1

    def _sync_item(self, item: CommitItem) -> None:
        for fd in item.fds:
            os.fdatasync(fd)   # includes the size change; the inode's times do not matter
            self.file_syncs += 1

    def _sync_dir(self, fd: int) -> None:
        os.fsync(fd)
        self.dir_syncs += 1

    def _rename(self, item: CommitItem) -> None:
        os.rename(item.src, item.dst)


def _prepare_all(batch: list[CommitItem]) -> list[BaseException | None]:
    """Run each item's ``prepare`` (its files written); the error of each, or None."""
    errors: list[BaseException | None] = [None] * len(batch)
    for i, item in enumerate(batch):
        if item.prepare is not None:
            try:
                item.prepare(item)
            except OSError as e:
                errors[i] = e
    return errors


def _unlink_envelopes(removals: list[RemoveItem]) -> list[BaseException | None]:
    """Unlink each removal's envelope (already gone is fine); the error of each, or None."""
    errors: list[BaseException | None] = [None] * len(removals)
    for i, rm in enumerate(removals):
        try:
            os.unlink(rm.env)
        except FileNotFoundError:
            pass
        except OSError as e:
            errors[i] = e
    return errors


def _release_removed(removals: list[RemoveItem], errors: list[BaseException | None]) -> None:
    """Let go of what the removed messages still hold: the body, then the lock. After a
    failed removal the message is still queued: its lock stays open for the caller to keep
    (QueueStore.remove gives it back to its holder)."""
    for rm, err in zip(removals, errors, strict=True):
        if err is not None:
            continue
        try:
            os.unlink(rm.body)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("cannot remove %s: %s", rm.body, e)   # clean-up removes it
        if rm.lock_fd >= 0:
            try:
                os.close(rm.lock_fd)
            except OSError as e:
                log.warning("closing %s: %s", rm.body, e)
            rm.lock_fd = -1


def _fail_remaining(errors: list[BaseException | None], err: BaseException) -> None:
    for i, e in enumerate(errors):
        if e is None:
            errors[i] = err


def _errors_of(fut: asyncio.Future[list[BaseException | None]],
               batch: list[CommitItem | RemoveItem]) -> list[BaseException | None]:
    if fut.cancelled():
        return [RuntimeError("group commit cancelled")] * len(batch)
    exc = fut.exception()
    return [exc] * len(batch) if exc is not None else fut.result()
