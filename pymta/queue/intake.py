"""The receiving side's one door into the queue: take a complete message, make it durable,
hand it to the scheduler.

The session talks SMTP and builds the envelope from what the client said; this module does
everything that touches the store after that, so that the session never sees a lock or a
store's internals. :meth:`Intake.accept` applies the pipeline's
:class:`~pymta.types.Decision` to the envelope (the new sender, the header fields to put above
the message, a quarantine, ``PYMTA_HOLD_INCOMING``), removes the header fields the decision
drops from the spooled message (a rare rewrite of the spool file's header section, crash-safe,
same queue id), commits (``QueueStore.commit``: durable on return, group commit), logs
Postfix's ``client=…, from=<…>, size=…, nrcpt=…`` line, and submits the message to the
queue manager. A store that hands claims over leaves the committed message's claim on the
spool (``Spool.lock``), still held: it goes to the manager with the message, so the first
delivery attempt need not claim it again or re-read its envelope.

Faults: every local fault is a TemporaryFailure carrying the client's reply (``452 4.3.1``
for a full disk, ``451 4.3.0`` otherwise) and nothing is queued. ``SpoolClosedError`` means
the spool was aborted before the commit took it (the client went away): nothing is queued
and nothing is logged here; the session says "lost connection".
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable

from pymta import metrics
from pymta.contracts import MessageLock, QueueStore, Spool
from pymta.pipeline.headers import copy_without
from pymta.queue import quarantine
from pymta.queue.space import reserve_for
from pymta.types import Decision, Envelope, QueueId, Reply, TemporaryFailure

log = logging.getLogger("pymta.smtpd")

# (qid, envelope[, claim]): QueueManager.submit. The claim is passed only when there is one,
# so a plain ``submit(qid, envelope)`` callable works too.
Submit = Callable[..., None]

# (qid, envelope, reply): QueueManager.notify_blocked -- queue the failure notice about a
# blocked message (``D_BOUNCE``); False when it could not be queued.
BlockedNotice = Callable[[QueueId, Envelope, Reply], Awaitable[bool]]


class Intake:
    """Takes complete messages from the sessions of one server (see the module docstring).

    ``hold_incoming`` puts every message on hold (``PYMTA_HOLD_INCOMING``); ``size_limit``
    and ``minfree`` make the free-space reserve ``admission`` keeps (Postfix's
    ``queue_minfree``, never less than 1.5 × the message size limit).
    """

    __slots__ = ("store", "submit", "notify", "hold_incoming", "_size_limit", "_minfree",
                 "_reserve")

    def __init__(self, store: QueueStore, submit: Submit, *, hold_incoming: bool = False,
                 size_limit: int = 10240000, minfree: int = 0,
                 notify: BlockedNotice | None = None) -> None:
        self.store = store
        self.submit = submit
        self.notify = notify
        self.hold_incoming = hold_incoming
        self._size_limit = size_limit
        self._minfree = minfree
        self._reserve = reserve_for(size_limit, minfree)

    @property
    def size_limit(self) -> int:
        return self._size_limit

    @size_limit.setter
    def size_limit(self, value: int) -> None:
        self._size_limit = value
        self._reserve = reserve_for(value, self._minfree)

    def admission(self, size: int) -> TemporaryFailure | None:
        """Why a message of ``size`` declared bytes cannot be taken now, or None (checked at
        ``MAIL FROM``; a cached free-space sample, no syscall per command)."""
        return self.store.admission(size, self._reserve)

    def new_spool(self) -> Spool:
        """A new spool for the message about to be sent; raises OSError on a local fault
        (answer with :meth:`write_fault`)."""
        return self.store.new_spool()

    def write_fault(self, err: BaseException) -> TemporaryFailure:
        return self.store.write_fault(err)

    async def accept(self, spool: Spool, envelope: Envelope,
                     decision: Decision | None = None) -> QueueId:
        """Queue the message in ``spool`` (see the module docstring); on return it may be
        acknowledged with ``250``. ``decision`` None: no pipeline ran (nothing to apply)."""
        envelope.held = envelope.held or self.hold_incoming
        if decision is not None:
            if decision.sender is not None:
                envelope.sender = decision.sender
            envelope.prepend = "".join(decision.prepend)
            if decision.quarantine_kind:
                # Blocked content: in the quarantine (`pymta quarantine`), never delivered
                # unless released.
                quarantine.mark(envelope, spool.qid, decision.quarantine or "",
                                decision.quarantine_kind)
            elif decision.quarantine is not None:
                # Held in the queue: `pymta queue list` shows it, `queue release` delivers it.
                envelope.held = True
                envelope.extra["quarantine"] = decision.quarantine
            if decision.drops:
                # A stage removes fields of the message as received (a forged
                # Authentication-Results): rare, so the spool file is rewritten only then.
                try:
                    await self.store.rewrite_spool(
                        spool, functools.partial(copy_without, predicates=decision.drops))
                except OSError as exc:
                    log.error("%s: queue file rewrite failed: %s", spool.qid, exc)
                    raise self.store.write_fault(exc) from exc
        try:
            qid = await self.store.commit(spool, envelope)
        except TemporaryFailure as exc:
            log.error("%s: queue commit failed: %s", spool.qid, exc.reply)
            metrics.error("queue_write")
            raise
        except OSError as exc:
            log.error("%s: queue commit failed: %s", spool.qid, exc)
            metrics.error("queue_write")
            spool.abort()
            raise self.store.write_fault(exc) from exc
        # the Postfix lines of a received message (client=, message-id=) are the session's
        # (pymta.receiving.smtpdlog), the queue's from=/size= line the queue manager's
        if decision is not None and decision.quarantine_kind:
            log.log(25, "%s: quarantine: %s: %s", qid, decision.quarantine_kind,
                    decision.quarantine)
            if decision.bounce is not None:
                try:
                    await self._bounce(qid, envelope, decision.bounce)
                except TemporaryFailure:
                    if spool.lock is not None:      # nobody else will release it
                        spool.lock.release()
                        spool.lock = None
                    raise
        lock: MessageLock | None = spool.lock     # still held: see QueueStore.hand_over_locks
        if lock is not None:
            spool.lock = None
            self.submit(qid, envelope, lock)
        else:
            self.submit(qid, envelope)
        return qid

    async def _bounce(self, qid: QueueId, envelope: Envelope, reply: Reply) -> None:
        """The sender's failure notice about a blocked message, queued before the ``250``;
        when it cannot be, the quarantined copy goes too and the client is told to retry
        (the copy and the notice are one outcome: neither without the other)."""
        queued = False
        if self.notify is not None:
            try:
                queued = await self.notify(qid, envelope, reply)
            except Exception:   # a fault of ours: the client retries
                log.exception("%s: failure notice for a blocked message", qid)
        if queued:
            return
        log.error("%s: failure notice not queued; message removed, client told to retry", qid)
        try:
            await self.store.remove(qid)
        except OSError as exc:
            log.error("%s: cannot remove the quarantined copy: %s", qid, exc)
        raise TemporaryFailure("Temporary failure queueing a notification; try again later")
