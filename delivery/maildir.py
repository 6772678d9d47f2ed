"""Maildir delivery (https://cr.yp.to/proto/maildir.html).

Maildir needs no locking: a message is written under a unique name in ``tmp/``, made durable,
and renamed into ``new/`` -- readers only ever see complete messages. The file is durable
before the rename and ``new/`` after it, because the queue deletes its copy once we return:
returning before the data is durable could lose mail on a crash.

``deliver_maildir`` does all of it for one message (fsync, rename, fsync ``new/``).
``MaildirCommitter`` does the same for many concurrent deliveries at once, as the queue's
group commit does: ``write_maildir_tmp`` writes a message to ``tmp/`` without flushing it,
then one batch makes every file durable with one ``syncfs(2)`` per file system (or
``fdatasync`` per file for a batch of one, or where ``syncfs`` is unavailable), renames each
into ``new/`` and fsyncs every distinct ``new/`` once. An error is charged to the deliveries it
may have affected; they are temporary failures and their ``tmp/`` files are removed.

A new maildir (the first delivery to a mailbox) is made durable as it is created: each new
directory's parent is fsynced (``pymta.files.makedirs_durable``), and the maildir itself once its
``tmp/new/cur`` exist, so a delivery is never reported done while a crash could still take
the mailbox, and the message in it, away.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pymta.files import fsync_dir, makedirs_durable, write_all
from pymta.queue.committer import SYNCFS

from ._crlf import crlf_to_lf, with_prefix

_counter = itertools.count(1)  # next() on a count is atomic under the GIL: thread-safe


def _safe_hostname(hostname: str) -> str:
    """The maildir spec escapes '/' and ':' in the host part so names stay parseable."""
    host = hostname or socket.gethostname() or "localhost"
    return host.replace("/", "\\057").replace(":", "\\072")


def unique_name(hostname: str) -> str:
    """``<time>.M<usec>P<pid>Q<counter>.<host>``: unique per host, process and delivery."""
    now = time.time()
    sec = int(now)
    usec = int((now - sec) * 1_000_000)
    return f"{sec}.M{usec}P{os.getpid()}Q{next(_counter)}.{_safe_hostname(hostname)}"


def deliver_maildir(mail_dir: str, mailbox: str, prefix: bytes, body_path: str,
                    hostname: str) -> str:
    """Deliver ``prefix`` + the spooled body into the maildir; return the name in ``new/``.

    ``mailbox`` is relative to ``mail_dir`` (the caller checked it stays inside). Raises
    OSError on any failure, leaving nothing behind in ``new/``.
    """
    root = os.path.join(mail_dir, mailbox)
    _make_maildir(root)
    base = unique_name(hostname)
    tmp_path = os.path.join(root, "tmp", base)
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        size = 0
        try:
            with open(body_path, "rb", buffering=0) as body:
                for piece in crlf_to_lf(with_prefix(prefix, body)):
                    write_all(fd, piece)
                    size += len(piece)
            os.fsync(fd)
        finally:
            os.close(fd)
        name = f"{base},S={size}"
        os.rename(tmp_path, os.path.join(root, "new", name))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_path)
        raise
    fsync_dir(os.path.join(root, "new"))
    return name


@dataclass(eq=False)
class PendingMaildirFile:
    """A message written to ``tmp/`` and not yet durable; ``fd`` is open until the batch ends."""

    fd: int
    tmp_path: str
    new_dir: str
    name: str
    future: asyncio.Future[str] | None = field(default=None, repr=False)


def write_maildir_tmp(mail_dir: str, mailbox: str, prefix: bytes, body_path: str,
                      hostname: str) -> PendingMaildirFile:
    """First half of a batched delivery: ``prefix`` + the body into ``tmp/``, not flushed.

    Raises OSError, leaving nothing behind.
    """
    root = os.path.join(mail_dir, mailbox)
    base = unique_name(hostname)
    tmp_path = os.path.join(root, "tmp", base)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        fd = os.open(tmp_path, flags, 0o600)
    except FileNotFoundError:       # a new maildir (a missing new/ is made at the rename)
        _make_maildir(root)
        fd = os.open(tmp_path, flags, 0o600)
    try:
        size = 0
        # Unbuffered: whole chunks are read anyway, and a buffered reader costs system calls
        with open(body_path, "rb", buffering=0) as body:
            for piece in crlf_to_lf(with_prefix(prefix, body)):
                write_all(fd, piece)
                size += len(piece)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp_path)
        raise
    return PendingMaildirFile(fd, tmp_path, os.path.join(root, "new"), f"{base},S={size}")


def _make_maildir(root: str) -> None:
    """Create what is missing of the maildir ``root`` (private, 0700) and make it durable."""
    makedirs_durable(root, 0o700)
    made = False
    for sub in ("tmp", "new", "cur"):
        try:
            os.mkdir(os.path.join(root, sub), 0o700)
            made = True
        except FileExistsError:
            continue
    if made:
        fsync_dir(root)


log = logging.getLogger(__name__)


class MaildirCommitter:
    """Makes concurrent maildir deliveries durable together; see the module docstring.

    ``commit`` takes a ``PendingMaildirFile`` (and its descriptor) and returns its name in
    ``new/`` once it is durable there, or raises OSError (the ``tmp/`` file is gone). One
    asyncio task and one thread: while a batch is flushed the next one gathers.
    """

    def __init__(self, fsync: bool = True) -> None:
        self.fsync = fsync
        self._pending: list[PendingMaildirFile] = []
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self.batches = 0
        self.max_batch = 0

    async def commit(self, item: PendingMaildirFile) -> str:
        return await asyncio.shield(self.submit(item))

    def submit(self, item: PendingMaildirFile) -> asyncio.Future[str]:
        """Put ``item`` in the next batch; the future is its name in ``new/`` once durable
        there (or OSError). Cancelling the future does not take the item back: ``withdraw``
        does, while the item is still waiting for its batch."""
        if self._task is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="pymta-maildir")
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(),
                                                                name="pymta-maildir")
        item.future = asyncio.get_running_loop().create_future()
        self._pending.append(item)
        assert self._wakeup is not None
        self._wakeup.set()
        return item.future

    def withdraw(self, item: PendingMaildirFile) -> bool:
        """Take back an item that is still waiting for its batch (a delivery cancelled): its
        ``tmp/`` file is removed and its future cancelled. False when its batch has begun:
        the file may be in ``new/`` already, and only the future will tell."""
        try:
            self._pending.remove(item)
        except ValueError:
            return False
        self.discard(item)
        if item.future is not None and not item.future.done():
            item.future.cancel()
        return True

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for item in self._pending:
            self._abandon(item)
        self._pending.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    @staticmethod
    def discard(item: PendingMaildirFile) -> None:
        """A ``tmp/`` file that will never be delivered: closed and removed."""
        with contextlib.suppress(OSError):
            os.close(item.fd)
        with contextlib.suppress(OSError):
            os.unlink(item.tmp_path)

    @classmethod
    def _abandon(cls, item: PendingMaildirFile) -> None:
        cls.discard(item)
        if item.future is not None and not item.future.done():
            item.future.set_exception(OSError("maildir delivery stopped"))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wakeup is not None
        while True:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch, self._pending = self._pending, []
            work = loop.run_in_executor(self._executor, self._flush, batch)
            try:
                results = await asyncio.shield(work)
            except asyncio.CancelledError:
                work.add_done_callback(functools.partial(self._resolve, batch))
                raise
            except Exception as e:   # a bug in _flush: report every delivery as failed
                log.exception("maildir group commit failed")
                results = [e] * len(batch)
            self._resolve_results(batch, results)

    def _resolve(self, batch: list[PendingMaildirFile],
                 fut: asyncio.Future[list[str | BaseException]]) -> None:
        results: list[str | BaseException]
        if fut.cancelled() or fut.exception() is not None:
            results = [OSError("maildir group commit failed")] * len(batch)
        else:
            results = fut.result()
        self._resolve_results(batch, results)

    @staticmethod
    def _resolve_results(batch: list[PendingMaildirFile],
                         results: list[str | BaseException]) -> None:
        for item, res in zip(batch, results, strict=True):
            fut = item.future
            if fut is None or fut.done():
                continue
            if isinstance(res, BaseException):
                fut.set_exception(res)
            else:
                fut.set_result(res)

    # ------------------------------------------------------------------ the thread

    def _flush(self, batch: list[PendingMaildirFile]) -> list[str | BaseException]:
        results: list[str | BaseException] = [item.name for item in batch]
        try:
            if self.fsync:
                self._make_durable(batch, results)
            dirs: dict[str, list[int]] = {}
            for i, item in enumerate(batch):
                if isinstance(results[i], BaseException):
                    continue
                try:
                    try:
                        os.rename(item.tmp_path, os.path.join(item.new_dir, item.name))
                    except FileNotFoundError:
                        _make_maildir(os.path.dirname(item.new_dir))
                        os.rename(item.tmp_path, os.path.join(item.new_dir, item.name))
                except OSError as e:
                    results[i] = e
                else:
                    dirs.setdefault(item.new_dir, []).append(i)
            if self.fsync:
                for new_dir, idx in dirs.items():
                    try:
                        fsync_dir(new_dir)
                    except OSError as e:
                        for i in idx:   # renamed but maybe not durable: not delivered
                            results[i] = e
                            with contextlib.suppress(OSError):
                                os.unlink(os.path.join(new_dir, batch[i].name))
        finally:
            for i, item in enumerate(batch):
                with contextlib.suppress(OSError):
                    os.close(item.fd)
                if isinstance(results[i], BaseException):
                    with contextlib.suppress(OSError):
                        os.unlink(item.tmp_path)
        self.batches += 1
        self.max_batch = max(self.max_batch, len(batch))
        return results

    def _make_durable(self, batch: list[PendingMaildirFile],
                      results: list[str | BaseException]) -> None:
        if len(batch) > 1 and SYNCFS is not None:
            devices: dict[int, int] = {}
            try:
                for item in batch:
                    devices.setdefault(os.fstat(item.fd).st_dev, item.fd)
                for fd in devices.values():
                    SYNCFS(fd)
                return
            except OSError as e:
                log.warning("syncfs on mail directory failed (%s); fsync per file", e)
        for i, item in enumerate(batch):
            try:
                os.fdatasync(item.fd)
            except OSError as e:
                results[i] = e
