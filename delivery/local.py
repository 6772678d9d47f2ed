"""The local delivery agent: maildir or mbox under the mail directory.

Disk writes (and fsyncs, and lock waits) run in a worker thread so the event loop keeps
serving SMTP while a slow disk or a locked mbox holds one delivery up. Every local fault --
disk full, I/O error, lock timeout, a bad path from a misconfigured source -- is *temporary*:
the message stays queued until the administrator fixes it, instead of bouncing mail that was
addressed correctly. Only a recipient with no mailbox at all is permanent -- and an address
that cannot be written into ``Return-Path:``/``Delivered-To:`` (controls, undecodable bytes:
an old queue file; the receiving side refuses them now), which would otherwise forge header
fields in the mailbox: ``5.1.7``/``5.1.3`` as for the relay (``_client.screen``).

A message for several local mailboxes is one call, written one mailbox after the other, and
the queue manager must learn of each mailbox written even when the call does not finish (the
server stopping), or a restart writes it again. So the agent ``reports_progress``: each
recipient's outcome goes to ``report`` as soon as it is final. A stop first calls
``begin_stop()``, which ends lock waits at once (a temporary failure: the message stays
queued for that mailbox), so the call normally returns in time. If it is cancelled anyway,
a write that may already have reached the mailbox is waited for (a maildir file in a commit
batch, an mbox append under way) and reported before the cancellation goes on; a write that
cannot have reached it yet (a maildir file not yet in a batch: unnamed, or in ``tmp/``; an
mbox lock not taken) is dropped at once. A second cancellation (the manager giving up on a
hung disk) waits for nothing.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from pymta.backends.table import check_mailbox_path
from pymta.types import Outcome, OutcomeKind, QueuedMessage, Recipient, Reply

from ._client import screen
from .maildir import MaildirCommitter, MaildirWrite, PendingMaildirFile, write_maildir_tmp
from .mbox import LOCK_TIMEOUT, MailboxLockTimeout, deliver_mbox

log = logging.getLogger(__name__)

_FULL = (errno.ENOSPC, errno.EDQUOT)
T = TypeVar("T")
Report = Callable[[Outcome], None]


class _Deferred:
    """A cancellation put off until the write under way has ended (see the module docstring)."""

    __slots__ = ("cancelled",)

    def __init__(self) -> None:
        self.cancelled = False


async def _outlast(work: Awaitable[T], deferred: _Deferred,
                   on_cancel: Callable[[], None] | None = None) -> T:
    """Await ``work`` (shielded: it goes on whatever happens to us); a first cancellation
    calls ``on_cancel``, waits for the work to end and is remembered in ``deferred``; a
    second one is raised."""
    fut = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        if deferred.cancelled or fut.cancelled():
            raise
        deferred.cancelled = True
        if on_cancel is not None:
            on_cancel()
    return await asyncio.shield(fut)


def _drop_written(fut: asyncio.Future[PendingMaildirFile]) -> None:
    """A maildir file written (unnamed, or in ``tmp/``) for a delivery that was cancelled:
    removed."""
    if not fut.cancelled() and fut.exception() is None:
        MaildirCommitter.discard(fut.result())


def delivery_prefix(sender: str, recipient: str) -> bytes:
    """Headers local delivery adds, as Postfix ``local``/``virtual`` do (CRLF; converted later)."""
    text = f"Return-Path: <{sender}>\r\nDelivered-To: {recipient}\r\n"
    return text.encode("utf-8", "surrogateescape")


def _failure_reply(exc: BaseException, kind: str, mailbox: str) -> Reply:
    if isinstance(exc, MailboxLockTimeout):
        return Reply(451, "4.3.0", f"cannot lock {kind} {mailbox}: mailbox busy")
    if isinstance(exc, OSError):
        reason = exc.strerror or type(exc).__name__
        if exc.errno in _FULL:
            return Reply(452, "4.2.2", f"mailbox full: cannot write {kind} {mailbox}: {reason}")
        return Reply(451, "4.3.0", f"cannot write {kind} {mailbox}: {reason}")
    return Reply(451, "4.3.0", f"local delivery to {kind} {mailbox} failed: "
                               f"{type(exc).__name__}")


BUSY_BACKOFF = 30.0  # seconds an mbox that stayed locked is deferred without waiting again
# Seconds a delivery waits behind other deliveries to the same mbox. Ours take milliseconds
# each; a longer wait means the file is locked from outside (a MUA), and every delivery
# queued behind it would hold one of the queue's delivery slots for the whole lock timeout:
# with a burst to one mailbox, all of them, so nothing else (a flushed message included) is
# delivered for 20 s. Postfix caps this with local_destination_concurrency_limit (2).
MBOX_QUEUE_WAIT = 3.0


class LocalDeliveryAgent:
    """A :class:`~pymta.contracts.DeliveryAgent` writing to ``<mail_dir>/<rcpt.mailbox>``.

    A mailbox ending in ``/`` is a maildir, anything else an mbox file.
    """

    reports_progress = True     # deliver() takes report= (see the module docstring)

    def __init__(self, mail_dir: str, hostname: str, threads: int = 8) -> None:
        self.mail_dir = mail_dir
        self.hostname = hostname
        # Own threads: a mailbox that stays locked must not starve the queue store's disk work
        # in the default executor, and shutdown need not wait for a blocked delivery.
        self._executor = ThreadPoolExecutor(max_workers=threads,
                                            thread_name_prefix="pymta-local")
        self._stopping = threading.Event()
        self._lock_waits: set[threading.Event] = set()  # one per mbox delivery in a thread
        # Maildir deliveries are written in those threads, then made durable in batches.
        self._maildir = MaildirCommitter()
        self._busy_until: dict[str, float] = {}
        # One waiting thread per mbox at most: other deliveries to it wait here, in the loop.
        self._mbox_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary())

    @classmethod
    def from_config(cls, config: Any) -> LocalDeliveryAgent:
        """Maildir/mbox delivery under ``PYMTA_MAIL_DIR``."""
        return cls(config.mail_dir, config.hostname)

    def begin_stop(self) -> None:
        """The server is stopping: every lock wait ends now, as a temporary failure (the
        message stays queued for that mailbox); writes under way finish."""
        self._stopping.set()
        for stop in self._lock_waits:
            stop.set()

    async def aclose(self) -> None:
        """Stop taking work; a delivery blocked on a lock is not waited for (it stays queued)."""
        self.begin_stop()
        self._executor.shutdown(wait=False, cancel_futures=True)
        await self._maildir.aclose()

    async def deliver(self, msg: QueuedMessage, rcpts: Sequence[Recipient],
                      report: Report | None = None) -> list[Outcome]:
        """One Outcome per recipient; never raises for a recipient's own problem. Each
        outcome also goes to ``report`` as soon as it is final."""
        refused, rcpts = screen(msg, rcpts, "local", local=True)
        if report is not None:
            for outcome in refused:
                report(outcome)
        out = refused
        for rcpt in rcpts:
            outcome, deferred = await self._deliver_one(msg, rcpt)
            out.append(outcome)
            if report is not None:
                report(outcome)
            if deferred.cancelled:      # reported: now the cancellation goes on
                raise asyncio.CancelledError
        return out

    async def _to_maildir(self, msg: QueuedMessage, mailbox: str, prefix: bytes,
                          deferred: _Deferred) -> None:
        """Write the message into the maildir and wait until it is durable there (OSError
        otherwise)."""
        pending: PendingMaildirFile | MaildirWrite
        if msg.body is not None:
            # in memory: the batch's thread writes it (no hand-over to a thread of its own)
            pending = MaildirWrite(self.mail_dir, mailbox, prefix, msg.open, self.hostname)
        else:
            written = asyncio.get_running_loop().run_in_executor(
                self._executor, write_maildir_tmp, self.mail_dir, mailbox, prefix,
                msg.open, self.hostname)
            try:
                pending = await asyncio.shield(written)
            except asyncio.CancelledError:  # not named in new/: not delivered, nothing to wait
                written.add_done_callback(_drop_written)
                raise
        durable = self._maildir.submit(pending)
        try:
            await asyncio.shield(durable)
        except asyncio.CancelledError:
            if self._maildir.withdraw(pending):    # not in a batch yet: not delivered
                raise
            # in a batch: it may be in new/ already, so the outcome must be known
            deferred.cancelled = True
            await _outlast(durable, deferred)       # a second cancellation: raised

    async def _deliver_one(self, msg: QueuedMessage,
                           rcpt: Recipient) -> tuple[Outcome, _Deferred]:
        deferred = _Deferred()
        mailbox = rcpt.mailbox
        if not mailbox:
            return Outcome(rcpt.address, OutcomeKind.PERMANENT,
                           Reply(550, "5.1.1", "no mailbox"), "local"), deferred
        problem = check_mailbox_path(mailbox)
        if problem:
            log.error("%s: refusing mailbox for %s: %s", msg.qid, rcpt.address, problem)
            return Outcome(rcpt.address, OutcomeKind.TEMPORARY,
                           Reply(451, "4.3.5", f"mailbox configuration error: {problem}"),
                           "local"), deferred
        kind = "maildir" if mailbox.endswith("/") else "mbox"
        sender = msg.envelope.sender
        prefix = delivery_prefix(sender, rcpt.address)
        if msg.envelope.prepend:
            prefix += msg.envelope.prepend.encode("utf-8", "surrogateescape")
        try:
            loop = asyncio.get_running_loop()
            if kind == "maildir":
                await self._to_maildir(msg, mailbox, prefix, deferred)
            else:
                if self._busy_until.get(mailbox, 0.0) > time.monotonic():
                    raise MailboxLockTimeout(errno.ETIMEDOUT, "mailbox recently busy", mailbox)
                lock = self._mbox_locks.get(mailbox)
                if lock is None:
                    lock = self._mbox_locks[mailbox] = asyncio.Lock()
                try:
                    async with asyncio.timeout(MBOX_QUEUE_WAIT):
                        await lock.acquire()
                except TimeoutError:
                    raise MailboxLockTimeout(errno.ETIMEDOUT, "mailbox busy",
                                             mailbox) from None
                stop = threading.Event()     # ends this delivery's lock waits
                if self._stopping.is_set():
                    stop.set()
                self._lock_waits.add(stop)
                try:
                    try:
                        # cancelled: the lock wait ends, but an append under way is waited for
                        await _outlast(loop.run_in_executor(
                            self._executor, deliver_mbox, self.mail_dir, mailbox, sender,
                            prefix, msg.open, time.time(), LOCK_TIMEOUT, stop),
                            deferred, stop.set)
                    except MailboxLockTimeout:
                        # Others queued behind us would each wait the whole timeout too:
                        # defer them at once for a while instead of holding delivery slots.
                        self._busy_until[mailbox] = time.monotonic() + BUSY_BACKOFF
                        if len(self._busy_until) > 10000:
                            self._busy_until.clear()
                        raise
                finally:
                    self._lock_waits.discard(stop)
                    lock.release()
        except Exception as exc:  # noqa: BLE001 - any local fault must stay temporary (logged)
            reply = _failure_reply(exc, kind, mailbox)
            log.warning("%s: to=<%s> %s: %s (%r)", msg.qid, rcpt.address, kind, reply, exc)
            return Outcome(rcpt.address, OutcomeKind.TEMPORARY, reply, "local"), deferred
        return Outcome(rcpt.address, OutcomeKind.DELIVERED,
                       Reply(250, "2.0.0", f"delivered to {kind}"), "local"), deferred
