"""The queue manager: decides when each queued message is tried, and what happens after.

It is Postfix's ``qmgr`` plus the ``bounce`` daemon. Messages reach it two ways: ``submit()``
from the receiving side right after a durable commit (deliver at once, no directory scan), and
scans of the store (at start, every ``scan_interval`` and on ``wake()``), which pick up
messages left by crashed or other worker processes and changes the CLI made on disk.

Implementation summary:

- A heap of ``(due, qid)`` plus a dict ``qid -> due`` (later entries make earlier ones stale)
  and an ``asyncio.Event`` that wakes the scheduler loop when something new is due.
- At most ``concurrency`` attempts run at once (a semaphore): the bounded active queue.
  Messages stay on disk; only queue ids and due times live in memory.
- One attempt holds the store's per-message lock (exactly one attempt per message across all
  worker processes), re-reads the envelope from disk (it is authoritative: the CLI or another
  worker may have changed it) -- except for the first attempt of a message this process has
  just received, whose lock the receiving side hands over still held since the commit: then
  nobody can have changed it and the envelope in memory is the one on disk --
  groups the pending recipients by the router's transport key
  and calls the agents concurrently. Any exception from an agent, or a missing outcome, is a
  temporary ``451 4.3.0`` for the recipients concerned: our own bug never loses or bounces
  mail.
- Outcomes are applied per recipient; DSNs are queued *before* the envelope is saved or
  removed, so a crash in between can duplicate a notice but never lose one. A failure DSN
  that cannot be queued leaves its recipients pending (the notice is still owed).
- Never a bounce of a bounce: a failure of a null-sender message (or of a DSN) is reported
  to the postmaster as a double bounce; a failed double bounce is logged and dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from ..types import (
    DeliveryAgent,
    Envelope,
    Notify,
    Outcome,
    OutcomeKind,
    QueuedMessage,
    QueueId,
    RcptState,
    Recipient,
    Reply,
    Router,
)
from . import deliverylog
from .dsn import DsnEntry, build_dsn
from .retry import RetryPolicy

log = logging.getLogger("pymta.queue")

MAX_HANDED_OVER = 1024   # locks of just-committed messages kept for their first attempt
LOCAL_ERROR = Reply(451, "4.3.0", "Local error in processing")
TIMEOUT_ERROR = Reply(451, "4.4.2", "Delivery attempt timed out")
EXPIRED_STATUS = "4.4.7"


class MessageLock(Protocol):
    def release(self) -> None: ...


class QueueStoreLike(Protocol):
    """The part of ``pymta.queue.store`` the manager uses (see that module for semantics)."""

    def ids(self) -> list[QueueId]: ...
    def load(self, qid: QueueId) -> Envelope | None: ...
    async def save(self, qid: QueueId, envelope: Envelope) -> None: ...
    async def remove(self, qid: QueueId) -> None: ...
    def body_path(self, qid: QueueId) -> str: ...
    async def enqueue_bytes(self, envelope: Envelope, data: bytes) -> QueueId: ...
    def try_lock(self, qid: QueueId) -> MessageLock | None: ...


Resolver = Callable[[str], Awaitable[Recipient | None]]


def _remote_mta(rcpt: Recipient, relay: str) -> str | None:
    """``mx.example[192.0.2.1]:25`` → ``mx.example``; local deliveries have no Remote-MTA."""
    if rcpt.local or not relay:
        return None
    host = relay.split("[", 1)[0].strip()
    return host or None


class QueueManager:
    """Schedules delivery attempts for the messages in ``store`` and handles their outcomes."""

    def __init__(self, store: QueueStoreLike, router: Router, *, policy: RetryPolicy,
                 hostname: str, postmaster: str, resolve: Resolver, concurrency: int = 20,
                 scan_interval: float = 60.0, clock: Callable[[], float] = time.time,
                 agent_timeout: float | None = 3600.0, stop_grace: float = 10.0) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._store = store
        self._router = router
        self._policy = policy
        self._hostname = hostname
        self._postmaster = postmaster
        self._resolve = resolve
        self._concurrency = concurrency
        self._scan_interval = scan_interval
        self._clock = clock
        self._agent_timeout = agent_timeout
        self._stop_grace = stop_grace

        self._heap: list[tuple[float, QueueId]] = []
        self._due: dict[QueueId, float] = {}
        self._forced: set[QueueId] = set()       # submitted/flushed: ignore next_attempt
        self._not_before: dict[QueueId, float] = {}  # back-off after an attempt that crashed
        self._inflight: set[QueueId] = set()
        # Just committed and still locked by us: envelope and lock, handed over by submit()
        self._fresh: dict[QueueId, tuple[Envelope, MessageLock]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._sem: asyncio.Semaphore | None = None
        self._event: asyncio.Event | None = None
        self._rescan = False
        self._runner: asyncio.Task[None] | None = None
        self._running = False

    # ------------------------------------------------------------------ public API

    async def start(self) -> None:
        """Scan the store, schedule every non-held message and start the scheduler loop."""
        if self._running:
            return
        self._ensure_primitives()
        await self._scan()
        self._running = True
        self._runner = asyncio.create_task(self._run(), name="pymta-qmgr")

    async def stop(self, grace: float | None = None) -> None:
        """Stop scheduling; let running attempts finish for ``grace`` seconds, then cancel.

        A cancelled attempt persists nothing, so its message is simply tried again after a
        restart (a possible duplicate delivery, never a loss).
        """
        self._running = False
        for _, lock in self._fresh.values():
            lock.release()
        self._fresh.clear()
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None
        tasks = set(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self._stop_grace
                                            if grace is None else grace)
            for t in pending:
                t.cancel()
            if pending:
                log.warning("queue manager stop: cancelled %d running attempts", len(pending))
                await asyncio.gather(*pending, return_exceptions=True)

    def submit(self, qid: QueueId, envelope: Envelope, lock: MessageLock | None = None
               ) -> None:
        """A message was just committed: try it as soon as a slot is free.

        ``lock``: the message's lock, held continuously since the commit (the receiving side
        hands it over). Then nobody can have changed the message on disk, so the attempt uses
        ``envelope`` as it is instead of locking and reading the envelope again. At most
        ``MAX_HANDED_OVER`` such locks are kept; beyond that they are released and the
        attempt reads the disk as usual.
        """
        if envelope.held:
            if lock is not None:
                lock.release()
            return
        if lock is not None:
            old = self._fresh.pop(qid, None)
            if old is not None:
                old[1].release()
            if len(self._fresh) < MAX_HANDED_OVER and self._running:
                self._fresh[qid] = (envelope, lock)
            else:
                lock.release()
        self._forced.add(qid)
        self._not_before.pop(qid, None)
        self._schedule(qid, self._clock(), force=True)
        self._poke()

    def wake(self) -> None:
        """Rescan the store now (the CLI flushed, released or deleted messages on disk)."""
        self._rescan = True
        self._poke()

    async def run_once_due(self) -> list[QueueId]:
        """Rescan, then run one attempt for every message due now and wait for them all.

        Meant for tests and one-shot tools; it does not need
        ``start()``. Messages queued during the run (DSNs) wait for the next call.
        """
        self._ensure_primitives()
        await self._scan()
        due = self._pop_due(self._clock())
        started = []
        for qid in due:
            started.append(await self._launch(qid))
        tasks = [t for t in started if t is not None]
        if tasks:
            await asyncio.gather(*tasks)
        return due

    # ------------------------------------------------------------------ scheduling

    def _ensure_primitives(self) -> None:
        if self._sem is None:
            self._sem = asyncio.Semaphore(self._concurrency)
        if self._event is None:
            self._event = asyncio.Event()

    def _poke(self) -> None:
        if self._event is not None:
            self._event.set()

    def _schedule(self, qid: QueueId, due: float, *, force: bool = False) -> None:
        if not force:
            due = max(due, self._not_before.get(qid, 0.0))
        if self._due.get(qid) == due:
            return
        self._due[qid] = due
        heapq.heappush(self._heap, (due, qid))

    def _pop_due(self, now: float) -> list[QueueId]:
        out = []
        while self._heap and self._heap[0][0] <= now:
            due, qid = heapq.heappop(self._heap)
            if self._due.get(qid) != due:
                continue  # superseded by a later _schedule()
            del self._due[qid]
            if qid not in self._inflight:
                out.append(qid)
        return out

    async def _scan(self) -> None:
        """Schedule every queued, non-held message by the ``next_attempt`` on disk."""
        try:
            ids = self._store.ids()
        except Exception:
            log.exception("queue scan failed")
            return
        for i, qid in enumerate(ids):
            if i % 256 == 255:
                await asyncio.sleep(0)  # a large queue must not stall the event loop
            if qid in self._inflight:
                continue
            try:
                env = self._store.load(qid)
            except Exception:
                log.exception("%s: cannot read queue file; skipped", qid)
                continue
            if env is None or env.held:
                self._due.pop(qid, None)
                continue
            self._schedule(qid, env.next_attempt)

    async def _launch(self, qid: QueueId) -> asyncio.Task[None] | None:
        assert self._sem is not None
        await self._sem.acquire()
        if qid in self._inflight:
            self._sem.release()
            return None
        self._inflight.add(qid)
        task = asyncio.create_task(self._attempt_guarded(qid), name=f"pymta-attempt-{qid}")
        self._tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            self._inflight.discard(qid)
            assert self._sem is not None
            self._sem.release()
            self._poke()

        task.add_done_callback(done)
        return task

    async def _run(self) -> None:
        assert self._event is not None
        loop = asyncio.get_running_loop()
        next_scan = loop.time() + self._scan_interval
        while self._running:
            self._event.clear()
            if self._rescan or loop.time() >= next_scan:
                self._rescan = False
                next_scan = loop.time() + self._scan_interval
                await self._scan()
            for qid in self._pop_due(self._clock()):
                await self._launch(qid)  # blocks while `concurrency` attempts are running
            timeout = max(next_scan - loop.time(), 0.0)
            if self._heap:
                timeout = min(timeout, max(self._heap[0][0] - self._clock(), 0.0))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):    # unlike wait_for, makes no task
                    await self._event.wait()

    # ------------------------------------------------------------------ one attempt

    async def _attempt_guarded(self, qid: QueueId) -> None:
        forced = qid in self._forced
        self._forced.discard(qid)
        try:
            await self._attempt(qid, forced=forced)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Our own bug after the agents ran: nothing was persisted, the message stays
            # queued as it was. Back off in memory so a persistent bug is not a busy loop.
            retry_at = self._clock() + self._policy.delay(1)
            log.exception("%s: delivery attempt failed; retrying after %.0fs", qid,
                          retry_at - self._clock())
            self._not_before[qid] = retry_at
            self._schedule(qid, retry_at)
            self._poke()

    async def _attempt(self, qid: QueueId, *, forced: bool) -> None:
        fresh = self._fresh.pop(qid, None)
        env: Envelope | None
        if fresh is not None:
            env, lock = fresh   # locked since its commit: the disk holds exactly this envelope
        else:
            lock = self._store.try_lock(qid)
            if lock is None:
                return  # another worker is delivering it, or it is gone
            env = None
        try:
            if env is None:
                env = self._store.load(qid)
            if env is None or env.held:
                return
            start = self._clock()
            if env.next_attempt > start and not forced:
                self._schedule(qid, env.next_attempt)  # another worker already tried it
                return
            self._not_before.pop(qid, None)
            pending = env.pending()
            if not pending:
                await self._store.remove(qid)
                deliverylog.log_removed(qid)
                return
            deliverylog.log_active(qid, env)
            msg = QueuedMessage(qid, env, self._store.body_path(qid))
            results = await self._deliver_all(qid, msg, pending)
            await self._finish(qid, env, msg, results, start)
        finally:
            lock.release()

    async def _deliver_all(self, qid: QueueId, msg: QueuedMessage,
                           pending: list[Recipient]) -> list[tuple[Recipient, Outcome]]:
        groups: dict[str, tuple[DeliveryAgent, list[Recipient]]] = {}
        results: list[tuple[Recipient, Outcome]] = []
        for rcpt in pending:
            try:
                key, agent = self._router.route(rcpt)
            except Exception:
                log.exception("%s: routing <%s> failed", qid, rcpt.address)
                results.append((rcpt, Outcome(rcpt.address, OutcomeKind.TEMPORARY,
                                              LOCAL_ERROR, "none")))
                continue
            groups.setdefault(key, (agent, []))[1].append(rcpt)
        calls = [self._deliver_group(qid, key, agent, msg, rcpts)
                 for key, (agent, rcpts) in groups.items()]
        if len(calls) == 1:     # the usual case: no task and gather for a single call
            results.extend(await calls[0])
            return results
        for group in await asyncio.gather(*calls):
            results.extend(group)
        return results

    async def _deliver_group(self, qid: QueueId, key: str, agent: DeliveryAgent,
                             msg: QueuedMessage, rcpts: list[Recipient],
                             ) -> list[tuple[Recipient, Outcome]]:
        """One agent call; exceptions and missing outcomes become temporary failures."""
        try:
            async with asyncio.timeout(self._agent_timeout):    # None: no limit
                outcomes = await agent.deliver(msg, rcpts)
        except TimeoutError:
            log.error("%s: transport %s timed out after %ss", qid, key, self._agent_timeout)
            return [(r, Outcome(r.address, OutcomeKind.TEMPORARY, TIMEOUT_ERROR, key))
                    for r in rcpts]
        except Exception:
            log.exception("%s: transport %s raised; recipients deferred", qid, key)
            return [(r, Outcome(r.address, OutcomeKind.TEMPORARY, LOCAL_ERROR, key))
                    for r in rcpts]
        return self._match(qid, key, rcpts, outcomes)

    @staticmethod
    def _match(qid: QueueId, key: str, rcpts: Sequence[Recipient],
               outcomes: Sequence[Outcome]) -> list[tuple[Recipient, Outcome]]:
        """Pair outcomes with recipients by address (duplicates pair in order)."""
        waiting: dict[str, deque[Recipient]] = defaultdict(deque)
        for r in rcpts:
            waiting[r.address.lower()].append(r)
        out: list[tuple[Recipient, Outcome]] = []
        for o in outcomes:
            queue = waiting.get(o.recipient.lower())
            if not queue:
                log.error("%s: transport %s returned an outcome for unknown recipient <%s>",
                          qid, key, o.recipient)
                continue
            out.append((queue.popleft(), o))
        for queue in waiting.values():
            for r in queue:
                log.error("%s: transport %s returned no outcome for <%s>; deferred",
                          qid, key, r.address)
                out.append((r, Outcome(r.address, OutcomeKind.TEMPORARY, LOCAL_ERROR, key)))
        return out

    async def _finish(self, qid: QueueId, env: Envelope, msg: QueuedMessage,
                      results: list[tuple[Recipient, Outcome]], start: float) -> None:
        now = self._clock()
        expired = self._policy.expired(env.received_at, now)
        failed: list[DsnEntry] = []
        delivered: list[DsnEntry] = []
        for rcpt, o in results:
            rcpt.attempts += 1
            rcpt.last_reply = str(o.reply)
            rcpt.last_attempt = now
            rcpt.next_hop = o.relay
            remote = _remote_mta(rcpt, o.relay)
            flags = rcpt.notify_flags
            if o.kind is OutcomeKind.DELIVERED:
                rcpt.state = RcptState.DELIVERED
                status = "sent"
                if Notify.SUCCESS in flags:
                    delivered.append(DsnEntry(rcpt, "delivered", o.reply.enhanced, o.reply,
                                              remote))
            elif o.kind is OutcomeKind.PERMANENT:
                rcpt.state = RcptState.FAILED
                status = "bounced"
                if Notify.FAILURE in flags:
                    failed.append(DsnEntry(rcpt, "failed", _final_status(o.reply), o.reply,
                                           remote))
            elif expired:
                rcpt.state = RcptState.FAILED
                status = "expired"
                if Notify.FAILURE in flags:
                    failed.append(DsnEntry(rcpt, "failed", EXPIRED_STATUS, o.reply, remote))
            else:
                status = "deferred"
            deliverylog.log_recipient(qid, rcpt, status=status, reply=o.reply,
                                      relay=o.relay, delay=now - env.received_at,
                                      delays=(max(start - env.received_at, 0.0), 0.0, 0.0,
                                              max(now - start, 0.0)))

        # Notices first, state second: a crash in between duplicates a DSN, never loses one.
        if failed and not await self._notify(qid, env, msg, failed, "failed", now):
            for e in failed:  # the notice is still owed: keep them queued and try again
                e.recipient.state = RcptState.PENDING
        if delivered:
            await self._notify(qid, env, msg, delivered, "delivered", now)

        pending = env.pending()
        if not pending:
            await self._store.remove(qid)
            self._due.pop(qid, None)
            deliverylog.log_removed(qid)
            return
        env.next_attempt = now + self._policy.delay(max(r.attempts for r in pending))
        await self._store.save(qid, env)
        self._schedule(qid, env.next_attempt)

    # ------------------------------------------------------------------ notices

    async def _notify(self, qid: QueueId, env: Envelope, msg: QueuedMessage,
                      entries: list[DsnEntry], kind: str, now: float) -> bool:
        """Queue one DSN about ``entries``. False means "could not queue it; try again later".

        True is also returned when the notice is deliberately dropped (no recipient can take
        it: a failed double bounce, or an address ``resolve`` does not know).
        """
        double = False
        to = env.sender
        if env.sender == "" or env.is_bounce:
            if kind != "failed":
                return True  # success/delay reports to <> would go nowhere
            if env.extra.get("double_bounce") == "1":
                addrs = ", ".join(f"<{e.recipient.address}>" for e in entries)
                log.error("%s: undeliverable postmaster notification to %s discarded", qid,
                          addrs)
                return True
            to, double = self._postmaster, True
        try:
            rcpt = await self._resolve(to)
        except Exception:
            log.exception("%s: cannot resolve DSN recipient <%s>; will retry", qid, to)
            return False
        if rcpt is None:
            log.error("%s: DSN recipient <%s> is unknown; %s notification dropped", qid, to,
                      kind)
            return True
        try:
            data = build_dsn(reporting_mta=self._hostname, qid=qid, envelope=env,
                             entries=entries, body_path=msg.body_path, now=now,
                             action_kind=kind, to=to)
            dsn_env = Envelope(
                sender="", recipients=[rcpt], received_at=now, next_attempt=now,
                body_type="7BIT" if data.isascii() else "8BITMIME",
                smtputf8=env.smtputf8 and not data.isascii(), size=len(data),
                is_bounce=True, protocol="DSN",
                extra={"double_bounce": "1"} if double else {})
            dsn_qid = await self._store.enqueue_bytes(dsn_env, data)
        except Exception:
            log.exception("%s: cannot queue %s notification; will retry", qid, kind)
            return False
        deliverylog.log_notice(qid, kind, dsn_qid)
        self.submit(dsn_qid, dsn_env)
        return True


def _final_status(reply: Reply) -> str:
    """The DSN Status for a permanent failure: the reply's own code when it is a 5.x.x."""
    return reply.enhanced if reply.enhanced.startswith("5.") else "5.0.0"
