"""Maildir delivery (https://cr.yp.to/proto/maildir.html).

A reader (Dovecot, a MUA) must only ever see complete messages in ``new/``, and a message must
be durable before we report it delivered, because the queue deletes its copy once we return:
returning before the data is durable could lose mail on a crash.

Where the file system allows it, a message is written straight into ``new/`` as an *unnamed*
file (``open(new/, O_TMPFILE)``), made durable, and only then given its name there with
``linkat`` (through ``/proc/self/fd/N`` with ``AT_SYMLINK_FOLLOW``; the ``AT_EMPTY_PATH``
form needs ``CAP_DAC_READ_SEARCH``). Nothing is visible until the file is whole, and a crash
before the link leaves nothing behind: the unnamed file vanishes with the process. It also
saves the ``tmp/`` directory entry and its removal, per message. A file system that refuses
``O_TMPFILE`` (EOPNOTSUPP, or EISDIR/EINVAL from a kernel that predates it), a system without
``/proc``, or a platform without ``os.O_TMPFILE``, gets the classic way: a unique name in
``tmp/``, made durable, renamed into ``new/``. That is decided once per file system (device)
and logged once (``_UnnamedFiles``).

``deliver_maildir`` does all of it for one message. ``MaildirCommitter`` does it for many
concurrent deliveries at once, as the queue's group commit does: ``write_maildir_tmp`` writes
a message (unnamed in ``new/``, or to ``tmp/``) without flushing it, then one batch
(``commit_batch``) makes every file durable with one ``syncfs(2)`` per file system (or
``fdatasync`` per file for a batch of one, or where ``syncfs`` is unavailable), names each in
``new/`` (link or rename) and fsyncs every distinct ``new/`` once. An error is charged to the
deliveries it may have affected; they are temporary failures and their files are removed.

A new maildir (the first delivery to a mailbox) is made durable as it is created: each new
directory's parent is fsynced (``pymta.files.makedirs_durable``), and the maildir itself once its
``tmp/new/cur`` exist, so a delivery is never reported done while a crash could still take
the mailbox, and the message in it, away.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import itertools
import logging
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pymta.files import fsync_dir, makedirs_durable, open_dir, write_all
from pymta.queue.committer import SYNCFS

from ._crlf import BodySource, crlf_to_lf, open_body, with_prefix

log = logging.getLogger(__name__)

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


# O_TMPFILE refused: the file system cannot (EOPNOTSUPP), or the kernel predates it and sees
# O_DIRECTORY|O_WRONLY (EISDIR) or an unknown flag (EINVAL).
_TMPFILE_REFUSED = frozenset({errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL})
# linkat of /proc/self/fd/N refused for a reason that will not go away by retrying (a
# security module, a /proc that is not the real one, or gone: ENOENT with no /proc/self/fd/N):
# the next delivery goes through tmp/.
_LINK_REFUSED = frozenset({errno.EOPNOTSUPP, errno.EPERM, errno.EXDEV})
_PROC_FD = "/proc/self/fd"


class _UnnamedFiles:
    """Where unnamed files (``O_TMPFILE`` + ``linkat``) are used: decided once, cached.

    Tried first on every file system; one that refuses has its device remembered (and logged,
    once), and every maildir on it is written through ``tmp/`` from then on. The common case,
    no file system refused, costs nothing per delivery; otherwise one ``stat`` of ``new/``.
    Without ``os.O_TMPFILE`` (not Linux) or ``/proc`` (the link needs ``/proc/self/fd``),
    never used, logged once.
    """

    def __init__(self) -> None:
        self._available: bool | None = None
        self.refused: set[int] = set()
        self._lock = threading.Lock()

    def usable(self, new_dir: str) -> bool:
        if self._available is None:
            with self._lock:
                if self._available is None:
                    self._available = self._probe()
        if not self._available:
            return False
        if not self.refused:
            return True
        return _device(new_dir) not in self.refused

    @staticmethod
    def _probe() -> bool:
        if not hasattr(os, "O_TMPFILE"):
            return False        # not Linux: the classic way, nothing to say
        if not os.path.isdir(_PROC_FD):
            log.warning("maildir: /proc is not mounted (no %s): writing through tmp/ and "
                        "rename (no O_TMPFILE + linkat)", _PROC_FD)
            return False
        return True

    def refuse(self, new_dir: str, exc: OSError) -> None:
        """The file system of ``new_dir`` refused an unnamed file or its link: tmp/ there."""
        dev = _device(new_dir)
        if dev is None:
            return              # nothing there: the next delivery will try (and tell) again
        with self._lock:
            if dev in self.refused:
                return
            self.refused.add(dev)
        log.warning("maildir: the file system of %s refused O_TMPFILE + linkat (%s): "
                    "writing through tmp/ and rename there", new_dir, exc.strerror or exc)


UNNAMED = _UnnamedFiles()


def _device(path: str) -> int | None:
    """The device of ``path``, or of its nearest existing parent (a maildir being made)."""
    while True:
        try:
            return os.stat(path).st_dev
        except FileNotFoundError:
            parent = os.path.dirname(path)
            if parent == path:
                return None
            path = parent
        except OSError:
            return None


@dataclass(eq=False)
class PendingMaildirFile:
    """A message written and not yet durable; ``fd`` is open until the batch ends.

    ``tmp_path`` is None for an unnamed file in ``new_dir`` (``O_TMPFILE``): it gets ``name``
    there by a link, and vanishes if it never does. Otherwise the file is ``tmp_path`` in
    ``tmp/``, renamed to ``name`` in ``new_dir``.
    """

    fd: int
    tmp_path: str | None
    new_dir: str
    name: str
    future: asyncio.Future[str] | None = field(default=None, repr=False)
    hostname: str = ""      # for another name, should ``name`` be taken already
    size: int = 0


@dataclass(eq=False)
class MaildirWrite:
    """A delivery whose file the batch's thread writes too (``MaildirCommitter.submit_write``):
    for a body in memory, so that a batch costs one hand-over to a thread, not one per
    message. Nothing exists on disk until its batch runs."""

    mail_dir: str
    mailbox: str
    prefix: bytes
    body: BodySource
    hostname: str
    future: asyncio.Future[str] | None = field(default=None, repr=False)


def deliver_maildir(mail_dir: str, mailbox: str, prefix: bytes, body: BodySource,
                    hostname: str) -> str:
    """Deliver ``prefix`` + the spooled body into the maildir; return the name in ``new/``.

    ``mailbox`` is relative to ``mail_dir`` (the caller checked it stays inside). Raises
    OSError on any failure, leaving nothing behind in ``new/`` or ``tmp/``.
    """
    item = write_maildir_tmp(mail_dir, mailbox, prefix, body, hostname)
    [result] = commit_batch([item])
    if isinstance(result, BaseException):
        raise result
    return result


def write_maildir_tmp(mail_dir: str, mailbox: str, prefix: bytes, body: BodySource,
                      hostname: str) -> PendingMaildirFile:
    """First half of a batched delivery: ``prefix`` + the body into an unnamed file in
    ``new/`` (or a file in ``tmp/``), not flushed, not visible to readers.

    Raises OSError, leaving nothing behind.
    """
    root = os.path.join(mail_dir, mailbox)
    new_dir = os.path.join(root, "new")
    base = unique_name(hostname)
    fd, tmp_path = _open_pending(root, new_dir, base)
    try:
        size = 0
        with open_body(body, raw=True) as reader:
            for piece in crlf_to_lf(with_prefix(prefix, reader)):
                write_all(fd, piece)
                size += len(piece)
    except BaseException:
        os.close(fd)            # an unnamed file vanishes now
        if tmp_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp_path)
        raise
    return PendingMaildirFile(fd, tmp_path, new_dir, f"{base},S={size}",
                              hostname=hostname, size=size)


def _open_unnamed(new_dir: str) -> int:
    """An unnamed file in ``new_dir``, private, linkable (no ``O_EXCL``)."""
    return os.open(new_dir, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600)


def _open_pending(root: str, new_dir: str, base: str) -> tuple[int, str | None]:
    """The descriptor to write a message to, and its ``tmp/`` path (None: unnamed)."""
    if UNNAMED.usable(new_dir):
        if not os.path.isdir(new_dir):
            # a new maildir: made outside the refusal test below, so that an error of its
            # own (an fsync's EINVAL) is not taken for the file system refusing O_TMPFILE
            _make_maildir(root)
        try:
            return _open_unnamed(new_dir), None
        except OSError as e:
            if e.errno not in _TMPFILE_REFUSED:
                raise
            UNNAMED.refuse(new_dir, e)
    tmp_path = os.path.join(root, "tmp", base)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        return os.open(tmp_path, flags, 0o600), tmp_path
    except FileNotFoundError:       # a new maildir (a missing new/ is made at the rename)
        _make_maildir(root)
        return os.open(tmp_path, flags, 0o600), tmp_path


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


# ---------------------------------------------------------------------- the second half


def commit_batch(batch: list[PendingMaildirFile],
                 fsync: bool = True) -> list[str | BaseException]:
    """Second half, in a worker thread: make every file durable, name it in ``new/``, make
    each ``new/`` durable. One result per item: its name in ``new/``, or the OSError that
    may have affected it (its file is gone then). Every descriptor is closed."""
    results: list[str | BaseException] = [item.name for item in batch]
    try:
        if fsync:
            _make_durable(batch, results)
        groups: dict[str, list[int]] = {}
        for i, item in enumerate(batch):
            if not isinstance(results[i], BaseException):
                groups.setdefault(item.new_dir, []).append(i)
        for new_dir, idx in groups.items():
            _name_in(new_dir, batch, idx, results, fsync)
    finally:
        for i, item in enumerate(batch):
            with contextlib.suppress(OSError):
                os.close(item.fd)           # an unnamed file never linked vanishes now
            if item.tmp_path is not None and isinstance(results[i], BaseException):
                with contextlib.suppress(OSError):
                    os.unlink(item.tmp_path)
    return results


def _make_durable(batch: list[PendingMaildirFile], results: list[str | BaseException]) -> None:
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


def _name_in(new_dir: str, batch: list[PendingMaildirFile], idx: list[int],
             results: list[str | BaseException], fsync: bool) -> None:
    """Name the (durable) files ``batch[i] for i in idx`` in ``new_dir``, then fsync it once."""
    try:
        try:
            dir_fd = open_dir(new_dir)
        except FileNotFoundError:   # the maildir was removed meanwhile: made again
            _make_maildir(os.path.dirname(new_dir))
            dir_fd = open_dir(new_dir)
    except OSError as e:
        for i in idx:
            results[i] = e
        return
    try:
        named: list[tuple[int, str]] = []
        for i in idx:
            try:
                name = _name(batch[i], dir_fd)
            except OSError as e:
                results[i] = e
            else:
                results[i] = name
                named.append((i, name))
        if fsync and named:
            try:
                os.fsync(dir_fd)
            except OSError as e:
                for i, name in named:   # named but maybe not durable: not delivered
                    results[i] = e
                    with contextlib.suppress(OSError):
                        os.unlink(name, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


def _name(item: PendingMaildirFile, dir_fd: int) -> str:
    """Give ``item`` its name in ``new/`` (``dir_fd``): rename from ``tmp/``, or link the
    unnamed file. Python's ``os.link`` passes ``AT_SYMLINK_FOLLOW`` to ``linkat`` only with a
    directory descriptor (3.11: plain ``link(2)`` otherwise, which links the /proc symlink
    itself: EXDEV), hence ``dst_dir_fd``. A link never replaces a file: a name taken already
    (another host of the same name, in the same microsecond) gets a new one. From ``tmp/``
    too (qmail's way, and what NFS needs): link, then unlink the ``tmp/`` name; ``rename``
    (which would replace a message of the same name) only where hard links are refused."""
    if item.tmp_path is not None:
        return _name_from_tmp(item, dir_fd)
    for _ in range(3):
        try:
            os.link(f"{_PROC_FD}/{item.fd}", item.name, dst_dir_fd=dir_fd,
                    follow_symlinks=True)
            return item.name
        except FileExistsError:
            item.name = f"{unique_name(item.hostname)},S={item.size}"
        except OSError as e:
            if e.errno in _LINK_REFUSED or (
                    e.errno == errno.ENOENT and not os.path.exists(f"{_PROC_FD}/{item.fd}")):
                UNNAMED.refuse(item.new_dir, e)     # this delivery fails; its retry uses tmp/
            raise
    raise FileExistsError(errno.EEXIST, "no free name in the maildir", item.new_dir)


def _name_from_tmp(item: PendingMaildirFile, dir_fd: int) -> str:
    assert item.tmp_path is not None
    for _ in range(3):
        try:
            os.link(item.tmp_path, item.name, dst_dir_fd=dir_fd)
        except FileExistsError:
            item.name = f"{unique_name(item.hostname)},S={item.size}"
            continue
        except OSError as e:
            if e.errno not in _LINK_REFUSED:
                raise
            os.rename(item.tmp_path, item.name, dst_dir_fd=dir_fd)  # no hard links here
            return item.name
        with contextlib.suppress(OSError):
            os.unlink(item.tmp_path)
        return item.name
    raise FileExistsError(errno.EEXIST, "no free name in the maildir", item.new_dir)


class MaildirCommitter:
    """Makes concurrent maildir deliveries durable together; see the module docstring.

    ``commit`` takes a ``PendingMaildirFile`` (and its descriptor) and returns its name in
    ``new/`` once it is durable there, or raises OSError (the file is gone). One asyncio task
    and one thread: while a batch is flushed the next one gathers.
    """

    def __init__(self, fsync: bool = True) -> None:
        self.fsync = fsync
        self._pending: list[PendingMaildirFile | MaildirWrite] = []
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self.batches = 0
        self.max_batch = 0

    async def commit(self, item: PendingMaildirFile) -> str:
        return await asyncio.shield(self.submit(item))

    def submit_write(self, write: MaildirWrite) -> asyncio.Future[str]:
        """As ``submit`` for a message not written yet: the batch's thread writes it first."""
        return self.submit(write)

    def submit(self, item: PendingMaildirFile | MaildirWrite) -> asyncio.Future[str]:
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

    def withdraw(self, item: PendingMaildirFile | MaildirWrite) -> bool:
        """Take back an item that is still waiting for its batch (a delivery cancelled): its
        file is removed and its future cancelled. False when its batch has begun:
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
    def discard(item: PendingMaildirFile | MaildirWrite) -> None:
        """A file that will never be delivered: closed (an unnamed one vanishes) and removed."""
        if isinstance(item, MaildirWrite):
            return      # never written
        with contextlib.suppress(OSError):
            os.close(item.fd)
        if item.tmp_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(item.tmp_path)

    @classmethod
    def _abandon(cls, item: PendingMaildirFile | MaildirWrite) -> None:
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

    def _resolve(self, batch: list[PendingMaildirFile | MaildirWrite],
                 fut: asyncio.Future[list[str | BaseException]]) -> None:
        results: list[str | BaseException]
        if fut.cancelled() or fut.exception() is not None:
            results = [OSError("maildir group commit failed")] * len(batch)
        else:
            results = fut.result()
        self._resolve_results(batch, results)

    @staticmethod
    def _resolve_results(batch: list[PendingMaildirFile | MaildirWrite],
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

    def _flush(self, batch: list[PendingMaildirFile | MaildirWrite]
               ) -> list[str | BaseException]:
        results: list[str | BaseException] = [""] * len(batch)
        files: list[PendingMaildirFile] = []
        where: list[int] = []
        for i, item in enumerate(batch):
            if isinstance(item, MaildirWrite):
                try:
                    item = write_maildir_tmp(item.mail_dir, item.mailbox, item.prefix,
                                             item.body, item.hostname)
                except OSError as e:
                    results[i] = e
                    continue
            files.append(item)
            where.append(i)
        for i, res in zip(where, commit_batch(files, self.fsync), strict=True):
            results[i] = res
        self.batches += 1
        self.max_batch = max(self.max_batch, len(batch))
        return results
