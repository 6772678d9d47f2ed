"""The queue manager: decides when each queued message is tried, and what happens after.

It is Postfix's ``qmgr`` plus the ``bounce`` daemon. Messages reach it two ways: ``submit()``
from the receiving side right after a durable commit (deliver at once, no directory scan), and
scans of the store (at start, every ``scan_interval`` and on ``wake()``), which pick up
messages left by crashed or other worker processes and changes the CLI made on disk.

Implementation summary:

- A heap of ``(due, qid)`` plus a dict ``qid -> due`` (later entries make earlier ones stale)
  and an ``asyncio.Event`` that wakes the scheduler loop when something new is due.
- **Two clocks.** ``next_attempt`` on disk is wall-clock time (it must survive a restart),
  but the schedule in memory runs on a monotonic clock (``CLOCK_BOOTTIME``: it also counts a
  suspend), so a wall-clock jump cannot stall or storm the messages this process scheduled.
  A disk value is turned into a delay once, when it is read, and that delay is bounded: never
  longer than the longest retry interval the policy can produce, and never longer than the
  interval the message's own last attempt set (a last attempt "in the future" means the clock
  went back). A jump forward makes the messages this process did not schedule itself due at
  once, as Postfix's deferred-queue scan would; the concurrency bound still holds. Lifetime is
  wall-clock age, as in Postfix (the only clock that survives restarts, and a forward jump
  usually means real time passed: a suspend, NTP stepping a slow clock), and it is judged only
  after a failed attempt, never on a scan.
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
- **Outcomes are recorded as soon as they are known** (Postfix marks recipients done one by
  one): with several transport groups in flight, each group's outcomes are saved when that
  group returns (saves serialised under the attempt's lock); the last group's save is the
  attempt's final one, so a message with one group costs one save as before. Within one
  agent call (a local agent writing several mailboxes, an LMTP transaction answering per
  recipient), an agent that has ``reports_progress`` reports each recipient's outcome as
  soon as it is final; those reports cost nothing while the call goes on, and are recorded
  (one save) only when the call does not return normally -- cancelled by a stop, raising,
  timing out -- so a mailbox already written is never written again after a restart. A
  stop cancels agent calls only, never the recording of outcomes already known (it waits
  for that, up to ``RECORD_GRACE``: then it gives up, against a disk that hangs, and the
  stop still ends), and the message lock is held until the recording is done. The server
  also tells the agents to stop waiting (``begin_stop()``: an mbox lock wait ends as a
  temporary failure) before the stop's grace starts, so a call is rarely cancelled at all.
- **Notices first, state second**: DSNs are queued *before* the envelope is saved or
  removed, so a crash in between can duplicate a notice but never lose one. A recipient that
  failed for good becomes ``NOTICE_OWED`` (never handed to an agent again) until its failure
  DSN is queued, then ``FAILED``: Postfix keeps its bounce logs apart from the recipients'
  delivery state in the same way. Failure notices are sent once per attempt, when the last
  group has returned; success notices per group, before that group's save.
- **Delay notices** (RFC 3461 NOTIFY=DELAY; Postfix's ``delay_warning_time``): when an
  attempt ends with recipients still pending and the message has been queued for at least
  the threshold, one "delayed" report about them goes to the sender, with the same notices
  first, state second order. The threshold is ``delay_warning`` (``PYMTA_DELAY_WARNING_TIME``)
  for recipients without NOTIFY and those with DELAY; while it is 0 (off, Postfix's
  default), the default NOTIFY gets none and an explicit NOTIFY=DELAY gets one after
  ``DSN_DELAY_DEFAULT``. NOTIFY=NEVER and a NOTIFY without DELAY never do, nor a null
  sender or a bounce. Each recipient gets one at most: the indices of those reported are
  kept in the envelope (``DELAY_NOTIFIED``), so neither a retry nor a restart repeats it; a
  notice that cannot be queued is tried again after the next failed attempt. Judged after
  an attempt only, like Postfix's: the warning can come up to one retry interval after the
  threshold, and an attempt that expires the message sends the failure notice instead.
- **A queue update that fails is retried alone, never the delivery.** When the envelope
  cannot be saved or removed after an attempt (a full, read-only or failing file system:
  ``OSError``), the attempt's outcomes stay in memory with the message's lock still held
  (no other worker can take the message and deliver it again from the stale envelope on
  disk), and only that write is tried again, with back-off (``WRITE_RETRY_FIRST`` doubling
  to ``WRITE_RETRY_MAX``), one log line per failure; a flush tries at once. When the disk
  is back, the state is written and the message goes on as if nothing had happened. At
  most ``MAX_UNWRITTEN`` messages wait like this (each costs its envelope and one open
  file); beyond that no new delivery starts until some are written, since every one of
  them would only add to what a restart could repeat. The memory lasts as long as the
  process: ``stop()`` tries each write once more, and what still fails is logged. A
  restart with the disk still broken repeats those deliveries -- unavoidable, since the
  outcome exists nowhere else, and Postfix has the same window between a delivery and
  the queue file update that records it. A save after one of several transport groups
  that fails is not retried on its own: the attempt's final write carries it.
- Faults reading the queue are logged once per message and fault, not once per scan (a
  file with an I/O error would otherwise log every ``scan_interval``); local faults are one
  line with the system's error text, tracebacks are kept for our own bugs.
- Never a bounce of a bounce: a failure of a null-sender message (or of a DSN) is reported
  to the postmaster as a double bounce; a failed double bounce is logged and dropped. A
  sender that cannot be written as an address (controls, undecodable bytes) is treated the
  same way: its notice goes to the postmaster.
- **Signed notices** (issue 15): a DSN is queued with ``enqueue_bytes`` and never passes
  through the pipeline, whose last stage DKIM-signs our users' mail; so the ``signer``
  given by the wiring (a :class:`~pymta.contracts.NoticeSigner`: DKIM for the notice's
  From domain when we sign for it) puts its ``DKIM-Signature`` on top of the notice
  before it is queued, in the same worker thread that builds it. When it cannot sign (an
  unreadable key), the notice is queued unsigned and a warning logged: never lost, never
  held back. Without a signer (``PYMTA_DKIM_SIGN`` off) notices are as they always were.
- **Flush** (``pymta queue flush``): the CLI writes a new token (its time) into
  ``<queue>/flush`` and sends SIGUSR1; every worker that sees a new token forgets its dead
  hosts (the router's ``flush()``) and in-memory back-offs, and makes due every message that
  nobody has tried since the flush (so of several workers only the first to lock a message
  tries it); a message that was in flight at the flush gets one more attempt as soon as that
  one ends (it may have met the dead-host memory). A token, not a flag that is consumed, so
  every worker sees it; nothing is rewritten on disk. A token found at ``start()`` counts
  too: a worker that was starting when the flush came replays the signal only once started.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import heapq
import logging
import os
import re
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from .. import metrics
from ..contracts import (
    DeliveryAgent,
    FlushableAgent,
    MessageLock,
    NoticeSigner,
    ProgressReportingAgent,
    QueueStore,
    Router,
)
from ..types import (
    Envelope,
    Notify,
    Outcome,
    OutcomeKind,
    QueuedMessage,
    QueueId,
    RcptState,
    Recipient,
    Reply,
    SMTPError,
)
from . import deliverylog
from .dsn import DsnEntry, build_dsn, parse_reply_text, sendable_address
from .retry import RetryPolicy

log = logging.getLogger("pymta.queue")

MAX_HANDED_OVER = 1024   # locks of just-committed messages kept for their first attempt
RECORD_GRACE = 10.0      # a stop waits this long for outcomes being recorded (local work)
CANCEL_GRACE = 1.0       # ... and this long for what it then cancelled to end
LOCAL_ERROR = Reply(451, "4.3.0", "Local error in processing")
TIMEOUT_ERROR = Reply(451, "4.4.2", "Delivery attempt timed out")
EXPIRED_STATUS = "4.4.7"
FLUSH_FILE = "flush"     # under the store root; the CLI writes a new token into it
WRITE_RETRY_FIRST = 1.0  # a failed queue update is tried again after this, doubling ...
WRITE_RETRY_MAX = 60.0   # ... up to this (seconds)
MAX_UNWRITTEN = 256      # messages whose outcomes wait in memory for the disk
_WAITING = (RcptState.PENDING, RcptState.NOTICE_OWED)
# Envelope.extra key: when owed failure notices were last tried and could not be queued
# (the recipients' last_attempt is their last delivery attempt, for the DSN).
NOTICES_TRIED = "notices_tried"
# Envelope.extra key: the recipients (their indices, space-separated) a delay notice was
# queued for, so that each gets one at most, across attempts and restarts.
DELAY_NOTIFIED = "delay_notified"
# The delay threshold of a recipient that asked with NOTIFY=DELAY while
# PYMTA_DELAY_WARNING_TIME is 0 (off): 4 hours, sendmail's Timeout.queuewarn.
DSN_DELAY_DEFAULT = 4 * 3600.0


def boottime() -> float:
    """Seconds on a clock that never jumps and keeps counting through a suspend."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


Resolver = Callable[[str], Awaitable[Recipient | None]]
Results = list[tuple[Recipient, Outcome]]


def _remote_mta(rcpt: Recipient, relay: str) -> str | None:
    """``mx.example[192.0.2.1]:25`` → ``mx.example``; local deliveries have no Remote-MTA."""
    if rcpt.local or not relay:
        return None
    host = relay.split("[", 1)[0].strip()
    return host or None


def read_flush_token(path: str | None) -> str:
    """The current flush token ("" when there is none or it cannot be read)."""
    if path is None:
        return ""
    try:
        with open(path, "rb") as f:
            return f.read(256).decode("ascii", "replace").strip()
    except OSError:
        return ""


def flush_token_time(token: str, default: float) -> float:
    """When the flush was asked for: the token starts with ``time.time_ns()``."""
    head = token.split(".", 1)[0].split(None, 1)[0] if token else ""
    return int(head) / 1e9 if head.isdigit() else default


def fault_text(exc: BaseException) -> str:
    """A local fault as one log line: the system's error text and errno name (``Read-only
    file system (EROFS)``) of the ``OSError`` behind ``exc``, else ``exc`` itself."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            name = errno.errorcode.get(seen.errno or 0)
            return f"{seen.strerror} ({name})" if name else seen.strerror
        seen = seen.__cause__ or seen.__context__
    return deliverylog.printable(str(exc)) or type(exc).__name__


def _last_tried(env: Envelope) -> float:
    """When the message was last tried: a delivery attempt, or queueing owed notices."""
    last = max((r.last_attempt for r in env.recipients), default=0.0)
    notices = env.extra.get(NOTICES_TRIED)
    if notices:
        with contextlib.suppress(ValueError):
            last = max(last, float(notices))
    return last


class _Interrupted(Exception):
    """An agent call was cancelled (a stop) after it had reported ``results``."""

    def __init__(self, results: Results) -> None:
        super().__init__("delivery interrupted")
        self.results = results


@dataclass(eq=False)
class _Attempt:
    """One delivery attempt of one message: what its groups share while they run."""

    qid: QueueId
    env: Envelope
    msg: QueuedMessage
    start: float
    extra: Results = field(default_factory=list)   # outcomes decided without an agent
    groups_left: int = 1
    lock: asyncio.Lock | None = None
    # Tasks inside an agent call right now: the only thing a stop may cancel.
    calls: set[asyncio.Task[Any]] = field(default_factory=set)
    groups: list[asyncio.Task[None]] = field(default_factory=list)   # with several groups
    # The message's lock: released when the attempt ends, unless ``kept`` (its outcomes
    # wait in memory for the disk: ``QueueManager._unwritten``).
    message_lock: MessageLock | None = None
    kept: bool = False
    remove: bool = False        # the write the attempt ends with: removal, else save
    dirty: bool = False         # a group's save failed; the final write carries it
    write_failures: int = 0


class QueueManager:
    """Schedules delivery attempts for the messages in ``store`` and handles their outcomes."""

    def __init__(self, store: QueueStore, router: Router, *, policy: RetryPolicy,
                 hostname: str, postmaster: str, resolve: Resolver, concurrency: int = 20,
                 scan_interval: float = 60.0, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] | None = None,
                 agent_timeout: float | None = 3600.0, stop_grace: float = 10.0,
                 flush_file: str | None = None, delay_warning: float = 0.0,
                 signer: NoticeSigner | None = None) -> None:
        """``clock`` is wall-clock time (``next_attempt``, ``received_at``); ``monotonic``
        runs the schedule in memory (default: boot time; a test that injects only ``clock``
        gets it for both). ``flush_file`` is where ``pymta queue flush`` leaves its token
        (default ``<store.root>/flush`` when the store has a root). ``delay_warning`` is
        ``PYMTA_DELAY_WARNING_TIME`` in seconds (see "Delay notices" in the module
        docstring); 0 is off. ``signer`` DKIM-signs the notices queued here (see "Signed
        notices" in the module docstring); None: they go out unsigned."""
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if not 0.0 <= delay_warning < float("inf"):
            raise ValueError("delay_warning must be a finite number of seconds, at least 0")
        self._store = store
        self._router = router
        # the Postfix daemon named in the to= lines of local recipients (remote ones: smtp)
        self._local_service = "lmtp" if getattr(router, "local_key", "") == "lmtp" else "local"
        self._policy = policy
        self._hostname = hostname
        self._postmaster = postmaster
        self._resolve = resolve
        self._concurrency = concurrency
        self._scan_interval = scan_interval
        self._clock = clock
        if monotonic is None:
            monotonic = boottime if clock is time.time else clock
        self._mono = monotonic
        self._agent_timeout = agent_timeout
        self._stop_grace = stop_grace
        self._delay_warning = float(delay_warning)
        self._signer = signer
        # No retry interval the policy makes is longer: a disk value further out than this
        # was written by a clock that has since gone back.
        self._max_wait = policy.maximum * (1.0 + policy.jitter)
        root = getattr(store, "root", None)
        if flush_file is None and isinstance(root, str):
            flush_file = os.path.join(root, FLUSH_FILE)
        self._flush_file = flush_file
        self._flush_token = ""
        self._flushed_at = 0.0      # wall time of the last flush: attempted since, or due

        self._heap: list[tuple[float, QueueId]] = []   # (monotonic due, qid)
        self._due: dict[QueueId, float] = {}
        self._basis: dict[QueueId, float] = {}   # the disk next_attempt a due came from
        self._forced: set[QueueId] = set()       # submitted/flushed: ignore next_attempt
        self._not_before: dict[QueueId, float] = {}  # back-off after an attempt that crashed
        self._inflight: set[QueueId] = set()
        self._reflush: set[QueueId] = set()      # in flight at a flush: once more at its end
        # Just committed and still locked by us: envelope and lock, handed over by submit()
        self._fresh: dict[QueueId, tuple[Envelope, MessageLock]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._active: set[_Attempt] = set()     # attempts past their lock and load
        # Attempts whose final queue update failed: outcomes and lock kept until written.
        self._unwritten: dict[QueueId, _Attempt] = {}
        self._paused: set[QueueId] = set()       # put off by that bound: due when below it
        self._paused_logged = False             # "no new deliveries" said once per episode
        self._read_faults: dict[QueueId, str] = {}  # load faults logged (once each)
        self._ids_fault = ""                    # listing fault logged ("" when none)
        self._cancelling = False                # stop: no agent call may start
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
        self._cancelling = False
        # A token already there may be a flush asked for while this process was starting
        # (its SIGUSR1 is replayed only once it has started, and finds this token seen):
        # it applies to the messages not tried since. That is harmless for an old token,
        # since every message waiting is tried at least every retry interval.
        self._flush_token = read_flush_token(self._flush_file)
        if self._flush_token:
            self._flushed_at = min(flush_token_time(self._flush_token, self._clock()),
                                   self._clock())
        await self._scan()
        self._running = True
        self._runner = asyncio.create_task(self._run(), name="pymta-qmgr")

    async def stop(self, grace: float | None = None) -> None:
        """Stop scheduling; let running attempts finish for ``grace`` seconds, then cancel
        the agent calls still running.

        Only agent calls are cancelled: their recipients' outcomes are unknown and they are
        tried again after a restart -- except those the agent reported before (an agent
        that ``reports_progress``), which are recorded like any other. Outcomes already
        known are being recorded, and that is not interrupted for up to ``RECORD_GRACE``,
        so a delivery that was made is never made again (see the module docstring). A
        recording that takes longer (a disk that hangs) is then cancelled too, and the stop
        waits ``CANCEL_GRACE`` more at most: it always returns.
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
            if pending:
                self._cancelling = True
                calls = [t for att in self._active for t in att.calls]
                for t in calls:
                    t.cancel()
                log.warning("queue manager stop: cancelled %d running delivery calls of %d "
                            "attempts", len(calls), len(pending))
                _, pending = await asyncio.wait(pending, timeout=RECORD_GRACE)
                if pending:     # recording hangs (a dead disk): give up on it
                    for att in self._active:
                        for t in att.groups:
                            t.cancel()
                    for t in pending:
                        t.cancel()
                    _, pending = await asyncio.wait(pending, timeout=CANCEL_GRACE)
                    if pending:
                        log.error("queue manager stop: %d delivery attempts did not end; "
                                  "their outcomes may be lost", len(pending))
        await self._write_back_all()

    async def _write_back_all(self) -> None:
        """At a stop: each queue update still owed is tried once more (bounded by
        ``RECORD_GRACE`` in all); what still fails is given up, with one line saying what a
        restart may repeat (see "A queue update that fails" in the module docstring)."""
        if not self._unwritten:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(RECORD_GRACE):
                for att in list(self._unwritten.values()):
                    await self._write_back(att)
        left = list(self._unwritten.values())
        self._unwritten.clear()
        for att in left:
            att.kept = False
            if att.message_lock is not None:
                att.message_lock.release()
        if left:
            log.error("queue manager stop: %d message(s) could not be updated on disk (%s); "
                      "deliveries made for them may be repeated after a restart", len(left),
                      " ".join(att.qid for att in left[:20]) + (" ..." if len(left) > 20
                                                                else ""))

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
        self._schedule(qid, self._mono(), force=True)
        self._poke()

    def wake(self) -> None:
        """Rescan the store now (the CLI flushed, released or deleted messages on disk).

        A flush takes effect here and now (dead hosts forgotten), not after the scheduler
        has worked through its backlog; the rescan follows as soon as the loop gets to it.
        """
        self._check_flush()
        self._rescan = True
        self._poke()

    async def run_once_due(self) -> list[QueueId]:
        """Rescan, then run one attempt for every message due now and wait for them all.

        Meant for tests and one-shot tools; it does not need
        ``start()``. Messages queued during the run (DSNs) wait for the next call.
        """
        self._ensure_primitives()
        self._check_flush()
        await self._scan()
        due = self._pop_due(self._mono())
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
        """Due at ``due`` on the monotonic clock (after a crash back-off unless ``force``)."""
        if not force:
            due = max(due, self._not_before.get(qid, 0.0))
        if self._due.get(qid) == due:
            return
        self._due[qid] = due
        heapq.heappush(self._heap, (due, qid))

    def _wait_for(self, env: Envelope, now: float) -> float:
        """Seconds until ``env.next_attempt`` (wall clock), bounded against clock jumps.

        Never negative (a jump forward: due now), never more than the longest retry interval
        and never more than the interval the last attempt set, when that attempt (or the
        arrival) lies in the future: the clock has gone back since it was written.
        """
        wait = env.next_attempt - now
        if not wait > 0.0:          # also NaN: due now rather than never
            return 0.0
        written = max(_last_tried(env), env.received_at)
        if written > now:
            wait = min(wait, max(env.next_attempt - written, 0.0))
        return min(wait, self._max_wait)

    def _schedule_env(self, qid: QueueId, env: Envelope, *, rescan: bool = False) -> None:
        """Schedule by the envelope's ``next_attempt``; a rescan leaves a due time alone that
        was made from the same disk value (so a clock jump does not move it). A message
        nobody has tried since the last flush is due now."""
        if self._flush_pending(env):
            self._basis[qid] = env.next_attempt
            self._schedule(qid, self._mono())   # a crash back-off since the flush still holds
            return
        if rescan and qid in self._due and self._basis.get(qid) == env.next_attempt:
            return
        self._basis[qid] = env.next_attempt
        self._schedule(qid, self._mono() + self._wait_for(env, self._clock()))

    def _flush_pending(self, env: Envelope) -> bool:
        """Was this message flushed, and has no attempt (here or in another worker) been
        made since? Then it is due regardless of its ``next_attempt``. An attempt that only
        tried to queue owed notices counts (``NOTICES_TRIED``), or a notice that cannot be
        queued yet would be retried at every scan instead of by back-off."""
        return bool(self._flushed_at) and _last_tried(env) < self._flushed_at

    def _forget(self, qid: QueueId) -> None:
        self._due.pop(qid, None)
        self._basis.pop(qid, None)
        self._not_before.pop(qid, None)

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
        ids = await self._queued_ids()
        if ids is None:
            return
        for i, qid in enumerate(ids):
            if i % 256 == 255:
                await asyncio.sleep(0)  # a large queue must not stall the event loop
            if qid in self._inflight or qid in self._unwritten:
                continue    # the disk is behind for the latter: its schedule is ours
            await self._scan_one(qid)
        self._forget_removed(ids)

    async def _queued_ids(self) -> list[QueueId] | None:
        """The store's queued messages; None when it cannot list them (logged once per
        fault, not once per scan: the scan runs every few seconds)."""
        try:
            ids = await self._store.list_queued()
        except OSError as e:
            text = fault_text(e)
            if text != self._ids_fault:
                log.error("queue scan failed: %s", text)
                self._ids_fault = text
            return None
        except Exception:
            log.exception("queue scan failed")
            return None
        if self._ids_fault:
            log.info("queue scan works again")
            self._ids_fault = ""
        return ids

    async def _scan_one(self, qid: QueueId) -> None:
        """Schedule ``qid`` by its envelope on disk, or forget it when it is gone or held;
        a file that cannot be read is skipped until it can (logged once per fault)."""
        try:
            env = await self._store.load_envelope(qid)
        except OSError as e:
            text = fault_text(e)
            if self._read_faults.get(qid) != text:
                log.error("%s: cannot read queue file: %s; skipped", qid, text)
                self._read_faults[qid] = text
            return
        except Exception:
            log.exception("%s: cannot read queue file; skipped", qid)
            return
        if self._read_faults.pop(qid, None) is not None:
            log.info("%s: queue file readable again", qid)
        if env is None or env.held:
            self._forget(qid)
            return
        self._schedule_env(qid, env, rescan=True)

    def _forget_removed(self, ids: list[QueueId]) -> None:
        """Drop what the scan keeps about messages no longer queued (other workers or the
        CLI removed them), once that is worth a pass over ``ids``."""
        if len(self._basis) > 2 * len(ids) + 1024 or self._read_faults:
            known = set(ids)    # forget what other workers or the CLI removed
            if len(self._basis) > 2 * len(ids) + 1024:
                for qid in [q for q in self._basis if q not in known]:
                    self._basis.pop(qid, None)
            for qid in [q for q in self._read_faults if q not in known]:
                del self._read_faults[qid]

    def _check_flush(self) -> bool:
        """Act on a new ``pymta queue flush`` token: forget dead hosts and back-offs, and
        make every message not tried since the flush due now (the next scan schedules them;
        ``_attempt`` lets them through). Nothing is written to disk: like Postfix's flush,
        a trigger, and cheap with a large queue under load."""
        token = read_flush_token(self._flush_file)
        if not token or token == self._flush_token:
            return False
        self._flush_token = token
        self._flushed_at = min(flush_token_time(token, self._clock()), self._clock())
        if isinstance(self._router, FlushableAgent):
            try:
                self._router.flush()
            except Exception:
                log.exception("router flush failed")
        self._not_before.clear()
        self._reflush |= self._inflight
        for qid in self._unwritten:     # the disk may be back: try those writes now
            self._schedule(qid, self._mono(), force=True)
        log.info("queue flush: dead hosts forgotten, queue rescanned")
        return True

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
            if qid in self._reflush:
                self._reflush.discard(qid)
                if self._running:   # flushed while in flight: once more, at once
                    self._forced.add(qid)
                    self._schedule(qid, self._mono(), force=True)
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
                self._check_flush()
                await self._scan()
            due = self._pop_due(self._mono())
            for i, qid in enumerate(due):
                if self._rescan:    # a flush or release need not wait for the backlog
                    for rest in due[i:]:
                        self._schedule(rest, self._mono())   # still due, after the rescan
                    break
                await self._launch(qid)  # blocks while `concurrency` attempts are running
            timeout = max(next_scan - loop.time(), 0.0)
            if self._heap:
                timeout = min(timeout, max(self._heap[0][0] - self._mono(), 0.0))
            if self._rescan:
                timeout = 0.0
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
        except Exception as e:
            # A local fault (reading the envelope, removing a finished message) or our own
            # bug: the disk holds what was saved (whole outcomes or nothing; outcomes not
            # saved are kept by _keep_unwritten, never here); try again later. Back off in
            # memory so a persistent fault is not a busy loop.
            delay = self._policy.delay(1)
            if isinstance(e, OSError):
                log.error("%s: queue file error: %s; retrying after %.0fs", qid,
                          fault_text(e), delay)
            else:
                log.exception("%s: delivery attempt failed; retrying after %.0fs", qid, delay)
            self._not_before[qid] = self._mono() + delay
            self._schedule(qid, self._mono() + delay)
            self._poke()

    async def _attempt(self, qid: QueueId, *, forced: bool) -> None:
        kept = self._unwritten.get(qid)
        if kept is not None:    # delivered already: only the queue update is owed
            await self._write_back(kept)
            return
        fresh = self._fresh.pop(qid, None)
        env: Envelope | None
        lock: MessageLock | None
        if fresh is not None:
            env, lock = fresh   # locked since its commit: the disk holds exactly this envelope
        else:
            lock = await self._store.claim(qid)
            if lock is None:
                return  # another worker is delivering it, or it is gone
            env = None
        att: _Attempt | None = None
        try:
            if env is None:
                env = await self._store.load_envelope(qid)
            if env is None or env.held:
                self._forget(qid)
                return
            start = self._clock()
            if (not forced and env.next_attempt != self._basis.get(qid)
                    and self._wait_for(env, start) > 0.0 and not self._flush_pending(env)):
                self._schedule_env(qid, env)  # another worker tried it meanwhile
                return
            if self._writes_paused(qid):
                return
            self._not_before.pop(qid, None)
            pending = env.pending()
            if not pending and not any(r.state is RcptState.NOTICE_OWED
                                       for r in env.recipients):
                await self._store.remove(qid)
                self._forget(qid)
                deliverylog.log_removed(qid)
                return
            att = _Attempt(qid, env, await self._open_message(qid, env),
                           start, message_lock=lock)
            if pending:
                deliverylog.log_active(qid, env)
            self._active.add(att)
            try:
                await self._deliver_all(att, pending)
            finally:
                self._active.discard(att)
        finally:
            if att is None or not att.kept:
                lock.release()

    def _writes_paused(self, qid: QueueId) -> bool:
        """True (and ``qid`` put off) while ``MAX_UNWRITTEN`` messages already wait for the
        disk: a delivery made now could not be recorded either."""
        if len(self._unwritten) < MAX_UNWRITTEN:
            self._paused_logged = False
            return False
        if not self._paused_logged:
            log.error("queue: %d messages wait for their queue files to be updated; no new "
                      "delivery starts until the disk takes writes again", len(self._unwritten))
            self._paused_logged = True
        self._paused.add(qid)
        self._schedule(qid, self._mono() + WRITE_RETRY_MAX)
        return True

    async def _open_message(self, qid: QueueId, env: Envelope) -> QueuedMessage:
        """The store's ``open_message``; a store of a library user written before it had
        one gives the body by ``open_body``."""
        opener = getattr(self._store, "open_message", None)
        if opener is None:
            return QueuedMessage(qid, env, await self._store.open_body(qid))
        message: QueuedMessage = await opener(qid, env)
        return message

    async def _deliver_all(self, att: _Attempt, pending: list[Recipient]) -> None:
        """Route, deliver, and record; see "Outcomes are recorded as soon as they are known"."""
        groups: dict[str, tuple[DeliveryAgent, list[Recipient]]] = {}
        for rcpt in pending:
            try:
                key, agent = self._router.route(rcpt)
            except Exception:
                log.exception("%s: routing <%s> failed", att.qid,
                              deliverylog.printable(rcpt.address))
                att.extra.append((rcpt, Outcome(rcpt.address, OutcomeKind.TEMPORARY,
                                                LOCAL_ERROR, "none")))
                continue
            groups.setdefault(key, (agent, []))[1].append(rcpt)
        if len(groups) <= 1:    # the usual case: no extra task, one save
            results: Results = []
            for key, (agent, rcpts) in groups.items():
                try:
                    results = await self._deliver_group(att, key, agent, rcpts)
                except _Interrupted as stopped:
                    await self._record_interrupted(att, stopped.results)
                    raise asyncio.CancelledError from None
            await self._record(att, results)
            return
        att.groups_left = len(groups)
        att.lock = asyncio.Lock()
        tasks = [asyncio.create_task(self._run_group(att, key, agent, rcpts),
                                     name=f"pymta-group-{att.qid}-{key}")
                 for key, (agent, rcpts) in groups.items()]
        att.groups = tasks
        try:
            await asyncio.wait(tasks)
        except asyncio.CancelledError:
            # Not by stop()'s first step, which cancels agent calls only: its last (the
            # recording did not end within RECORD_GRACE), or the loop shutting down. Agents
            # still working are cancelled; outcomes being recorded get RECORD_GRACE, then
            # they are given up too, as in the single-group path: a stop always ends.
            for t in att.calls:
                t.cancel()
            if not await _settle(tasks, RECORD_GRACE):
                for t in tasks:
                    t.cancel()
                await _settle(tasks, CANCEL_GRACE)
            raise
        for t in tasks:
            if t.cancelled():   # a stop cancelled that agent call: its outcome is unknown
                if att.dirty:   # what the other groups did is only in memory: write it
                    await self._write_outcome(att)
                raise asyncio.CancelledError
            exc = t.exception()
            if exc is not None:
                raise exc

    async def _run_group(self, att: _Attempt, key: str, agent: DeliveryAgent,
                         rcpts: list[Recipient]) -> None:
        try:
            results = await self._deliver_group(att, key, agent, rcpts)
        except _Interrupted as stopped:
            await self._record_interrupted(att, stopped.results)
            raise asyncio.CancelledError from None
        await self._record(att, results)

    async def _deliver_group(self, att: _Attempt, key: str, agent: DeliveryAgent,
                             rcpts: list[Recipient]) -> Results:
        """One agent call (:meth:`_call_agent`), counted in the metrics."""
        started = metrics.clock()
        results = await self._call_agent(att, key, agent, rcpts)
        metrics.delivered(key, (o.kind.value for _, o in results), started, att.env.received_at)
        return results

    async def _call_agent(self, att: _Attempt, key: str, agent: DeliveryAgent,
                          rcpts: list[Recipient]) -> Results:
        """One agent call; exceptions and missing outcomes become temporary failures.

        While the call runs, its task is in ``att.calls``, where a stop finds what it may
        cancel. Once the agent has returned, the task leaves that set in the same step
        (no await in between), so a stop can never cancel the recording that follows: a
        cancellation requested while the result is on its way is raised at the agent's
        await, before the outcome was taken.

        A :class:`~pymta.contracts.ProgressReportingAgent` is given ``report=``, which it
        calls with each recipient's outcome as soon as that is final (see "Outcomes are
        recorded as soon as they are known"). What it reported counts even when the call
        then raises, times out or is cancelled: those recipients keep their outcomes (only
        the rest are deferred), and a cancelled call raises :class:`_Interrupted` with them.
        """
        qid, msg = att.qid, att.msg
        if self._cancelling:
            raise asyncio.CancelledError   # stopping: start no new delivery
        task = asyncio.current_task()
        assert task is not None
        att.calls.add(task)
        reported: list[Outcome] = []
        try:
            async with asyncio.timeout(self._agent_timeout):    # None: no limit
                # the attribute, not isinstance: a runtime Protocol check costs ~10 µs a call
                if bool(getattr(agent, "reports_progress", False)):
                    outcomes = await cast(ProgressReportingAgent, agent).deliver(
                        msg, rcpts, report=reported.append)
                else:
                    outcomes = await agent.deliver(msg, rcpts)
        except TimeoutError:
            log.error("%s: transport %s timed out after %ss", qid, key, self._agent_timeout)
            metrics.error("delivery")
            return self._so_far(qid, key, rcpts, reported, TIMEOUT_ERROR)
        except asyncio.CancelledError:
            if reported:    # a stop: what the agent did before it is recorded all the same
                raise _Interrupted(self._pair(qid, key, rcpts, reported)[0]) from None
            raise
        except Exception:
            log.exception("%s: transport %s raised; recipients deferred", qid, key)
            metrics.error("delivery")
            return self._so_far(qid, key, rcpts, reported, LOCAL_ERROR)
        finally:
            att.calls.discard(task)
        return self._match(qid, key, rcpts, outcomes)

    @staticmethod
    def _pair(qid: QueueId, key: str, rcpts: Sequence[Recipient],
              outcomes: Sequence[Outcome]) -> tuple[Results, list[Recipient]]:
        """Pair outcomes with recipients by address (duplicates pair in order); also the
        recipients left without one."""
        waiting: dict[str, deque[Recipient]] = defaultdict(deque)
        for r in rcpts:
            waiting[r.address.lower()].append(r)
        out: Results = []
        for o in outcomes:
            queue = waiting.get(o.recipient.lower())
            if not queue:
                log.error("%s: transport %s returned an outcome for unknown recipient <%s>",
                          qid, key, deliverylog.printable(o.recipient))
                continue
            out.append((queue.popleft(), o))
        return out, [r for queue in waiting.values() for r in queue]

    @classmethod
    def _match(cls, qid: QueueId, key: str, rcpts: Sequence[Recipient],
               outcomes: Sequence[Outcome]) -> Results:
        """Pair outcomes with recipients; a recipient without one is deferred."""
        out, missing = cls._pair(qid, key, rcpts, outcomes)
        for r in missing:
            log.error("%s: transport %s returned no outcome for <%s>; deferred",
                      qid, key, deliverylog.printable(r.address))
            out.append((r, Outcome(r.address, OutcomeKind.TEMPORARY, LOCAL_ERROR, key)))
        return out

    @classmethod
    def _so_far(cls, qid: QueueId, key: str, rcpts: Sequence[Recipient],
                reported: Sequence[Outcome], reply: Reply) -> Results:
        """A call that failed: the outcomes it reported, ``reply`` (temporary) for the rest."""
        out, rest = cls._pair(qid, key, rcpts, reported)
        out += [(r, Outcome(r.address, OutcomeKind.TEMPORARY, reply, key)) for r in rest]
        return out

    # ------------------------------------------------------------------ recording

    async def _record(self, att: _Attempt, results: Results) -> None:
        """Record one group's outcomes; the last group to return concludes the attempt."""
        if att.lock is None:
            await self._conclude(att, results + att.extra)
            return
        async with att.lock:
            att.groups_left -= 1
            if att.groups_left <= 0:
                await self._conclude(att, results + att.extra)
                return
            await self._save_so_far(att, results)

    async def _save_so_far(self, att: _Attempt, results: Results) -> None:
        """Outcomes known before the attempt ends: applied, success notices queued, and the
        envelope saved as it is (``next_attempt`` is the attempt's final write's business)."""
        delivered = self._apply(att, results)
        if delivered:       # notices first, state second
            await self._notify(att, delivered, "delivered", self._clock())
        try:
            await self._store.save(att.qid, att.env)
        except OSError as e:
            # Not retried on its own: the attempt's final write saves the same envelope
            # (or keeps it in memory until it can).
            log.error("%s: cannot save the outcomes so far: %s; kept for the end of "
                      "the attempt", att.qid, fault_text(e))
            att.dirty = True
        else:
            att.dirty = False

    async def _record_interrupted(self, att: _Attempt, results: Results) -> None:
        """A stop cancelled an agent call after it had reported some outcomes: record those
        (the rest of its recipients are untouched, tried again after the restart). The
        attempt ends here, so a failed save is kept in memory like a final write's."""
        if att.lock is None:
            await self._save_so_far(att, results)
            if att.dirty:
                await self._write_outcome(att)
            return
        async with att.lock:    # the attempt's end writes it when this save fails
            await self._save_so_far(att, results)

    def _apply(self, att: _Attempt, results: Results) -> list[DsnEntry]:
        """Put outcomes into the recipients (in memory) and log them; the success-notice
        entries they call for. A failure becomes NOTICE_OWED when a notice is wanted."""
        env = att.env
        now = self._clock()
        expired = self._policy.expired(env.received_at, now)
        delivered: list[DsnEntry] = []
        for rcpt, o in results:
            rcpt.attempts += 1
            rcpt.last_reply = str(o.reply)
            rcpt.last_attempt = now
            rcpt.next_hop = o.relay
            flags = rcpt.notify_flags
            if o.kind is OutcomeKind.DELIVERED:
                rcpt.state = RcptState.DELIVERED
                status = "sent"
                if Notify.SUCCESS in flags and not o.dsn_passed:
                    # RFC 3464 §2.3.3: "relayed" when the next hop does not speak DSN; a
                    # hop that does reports the delivery itself (RFC 3461 §4.1)
                    delivered.append(DsnEntry(rcpt, "delivered" if rcpt.local else "relayed",
                                              o.reply.enhanced, o.reply,
                                              _remote_mta(rcpt, o.relay)))
            elif o.kind is OutcomeKind.PERMANENT or expired:
                status = "bounced" if o.kind is OutcomeKind.PERMANENT else "expired"
                rcpt.state = (RcptState.NOTICE_OWED if Notify.FAILURE in flags
                              else RcptState.FAILED)
            else:
                status = "deferred"
            deliverylog.log_recipient(att.qid, rcpt, status=status, reply=o.reply,
                                      relay=o.relay, delay=now - env.received_at,
                                      delays=(max(att.start - env.received_at, 0.0), 0.0,
                                              0.0, max(now - att.start, 0.0)),
                                      service=self._local_service if rcpt.local else "smtp")
        return delivered

    async def _conclude(self, att: _Attempt, results: Results) -> None:
        """The attempt's last step: notices (success, then every failure owed), then the
        envelope saved with its next attempt, or removed when nothing is left to do."""
        env = att.env
        delivered = self._apply(att, results)
        now = self._clock()
        if delivered:
            await self._notify(att, delivered, "delivered", now)
        owed = [r for r in env.recipients if r.state is RcptState.NOTICE_OWED]
        if owed and await self._notify(att, [_owed_entry(r) for r in owed], "failed", now):
            for r in owed:
                r.state = RcptState.FAILED
            env.extra.pop(NOTICES_TRIED, None)
        elif owed:
            env.extra[NOTICES_TRIED] = repr(now)    # tried: a flush is answered (_last_tried)
        delayed = self._delay_entries(env, now)
        if delayed and await self._notify(att, [e for _, e in delayed], "delayed", now):
            _mark_delay_notified(env, [i for i, _ in delayed])
        waiting = [r for r in env.recipients if r.state in _WAITING]
        if waiting:
            env.next_attempt = now + self._policy.delay(max(r.attempts for r in waiting))
        att.remove = not waiting
        await self._write_outcome(att)

    # ------------------------------------------------------------------ queue updates

    async def _write_outcome(self, att: _Attempt) -> bool:
        """The attempt's queue update: the message removed, or its envelope saved and the
        next attempt scheduled. On a local fault the attempt is kept in memory with its lock
        and the write tried again later (``_keep_unwritten``); False then."""
        qid = att.qid
        try:
            if att.remove:
                await self._store.remove(qid)
            else:
                await self._store.save(qid, att.env)
        except FileNotFoundError as e:
            if att.remove or await self._store.exists(qid):
                await self._keep_unwritten(att, e)
                return False
            # (nobody removes a message whose lock we hold; an admin deleting files might)
            log.error("%s: message files are gone; its state is not saved", qid)
            self._unwritten.pop(qid, None)
            att.kept = False
            self._forget(qid)
            return True
        except OSError as e:
            await self._keep_unwritten(att, e)
            return False
        if att.remove:
            self._forget(qid)
            deliverylog.log_removed(qid)
        else:
            self._basis[qid] = att.env.next_attempt
            self._schedule(qid, self._mono() + self._wait_for(att.env, self._clock()))
        att.dirty = False
        return True

    async def _keep_unwritten(self, att: _Attempt, err: OSError) -> None:
        """The write failed: keep the outcomes and the lock, try the write again later."""
        qid = att.qid
        att.write_failures += 1
        delay = min(WRITE_RETRY_FIRST * 2.0 ** min(att.write_failures - 1, 16), WRITE_RETRY_MAX)
        lock = att.message_lock
        if lock is None or not lock.held:
            # A store may close the lock with a failed removal (ours gives it back; another
            # implementation may not): take it again before anyone else can.
            lock = await self._relock(att, err)
            if lock is None:
                return
        att.message_lock = lock
        if not att.kept:
            att.kept = True
            self._unwritten[qid] = att
        what = "removal" if att.remove else "outcomes"
        log.error("%s: cannot update the queue file: %s; %s kept in memory, trying again "
                  "in %.0fs", qid, fault_text(err), what, delay)
        self._schedule(qid, self._mono() + delay, force=True)

    async def _relock(self, att: _Attempt, err: OSError) -> MessageLock | None:
        """The message's lock again after a removal that failed and took it along; None
        (and the attempt no longer kept) when the message is gone after all -- the removal
        got as far as the envelope -- or another process was quicker."""
        qid = att.qid
        try:
            lock = await self._store.claim(qid)
            gone = lock is None and await self._store.load_envelope(qid) is None
        except OSError:
            lock, gone = None, False
        if lock is not None:
            return lock
        self._unwritten.pop(qid, None)
        att.kept = False
        if gone:
            log.warning("%s: removed, although the file system reported: %s", qid,
                        fault_text(err))
            self._forget(qid)
            deliverylog.log_removed(qid)
        else:
            log.error("%s: cannot update the queue file: %s; the message could not be locked "
                      "again, another process may deliver it again", qid, fault_text(err))
            self._not_before[qid] = self._mono() + WRITE_RETRY_MAX
        return None

    async def _write_back(self, att: _Attempt) -> None:
        """Try a queue update that failed once more; the lock goes when it is done."""
        failures = att.write_failures
        if not await self._write_outcome(att):
            return
        self._unwritten.pop(att.qid, None)
        att.kept = False
        if att.message_lock is not None:
            att.message_lock.release()
        log.info("%s: queue file updated after %d failed attempt(s)", att.qid, failures)
        if self._paused and len(self._unwritten) < MAX_UNWRITTEN:
            for qid in self._paused:    # the disk takes writes again: deliver what waited
                self._schedule(qid, self._mono())
            self._paused.clear()
            self._poke()

    # ------------------------------------------------------------------ notices

    def _delay_after(self, rcpt: Recipient) -> float | None:
        """Seconds after arrival from which ``rcpt`` is owed a delay notice; None: never.

        The default NOTIFY (none given) is warned only with ``PYMTA_DELAY_WARNING_TIME``
        set, as Postfix's ``delay_warning_time``; an explicit NOTIFY is warned only when it
        has DELAY, at that time too, or at ``DSN_DELAY_DEFAULT`` while the setting is off.
        """
        if rcpt.notify is None:
            return self._delay_warning or None
        if Notify.DELAY not in rcpt.notify_flags:
            return None
        return self._delay_warning or DSN_DELAY_DEFAULT

    def _delay_entries(self, env: Envelope, now: float) -> list[tuple[int, DsnEntry]]:
        """The delay-report entries an attempt that just ended owes, with the recipients'
        indices: every recipient still pending after it (so it failed at this attempt) that
        wants delay notices, has none yet, and whose message is older than its threshold.
        Never for a null sender or a bounce (the notice would have nobody to go to)."""
        if env.sender == "" or env.is_bounce:
            return []
        age = now - env.received_at
        done = _delay_notified(env)
        until = env.received_at + self._policy.lifetime
        out: list[tuple[int, DsnEntry]] = []
        for i, r in enumerate(env.recipients):
            if r.state is not RcptState.PENDING or not r.attempts or i in done:
                continue
            after = self._delay_after(r)
            if after is None or not age >= after:
                continue
            reply = parse_reply_text(r.last_reply)
            diagnostic = reply if 400 <= reply.code < 500 else None
            status = reply.enhanced if diagnostic is not None else "4.0.0"
            out.append((i, DsnEntry(r, "delayed", status, diagnostic,
                                    _remote_mta(r, r.next_hop), will_retry_until=until)))
        return out

    async def _notify(self, att: _Attempt, entries: list[DsnEntry], kind: str,
                      now: float) -> bool:
        """Queue one DSN about ``entries``. False means "could not queue it; try again later".

        True is also returned when the notice is deliberately dropped (no recipient can take
        it: a failed double bounce, or an address ``resolve`` does not know).
        """
        return await self._queue_notice(att.qid, att.env, att.msg.body_path, entries, kind, now)

    async def notify_blocked(self, qid: QueueId, env: Envelope, reply: Reply) -> bool:
        """Queue the failure notice about a message the content filter blocked with
        ``D_BOUNCE`` (it stays in the quarantine): one entry per blocked recipient that asked
        for failure notices (NOTIFY), none for a null or unusable sender, the original's
        header section only. True when queued or not owed; False: try again later.
        """
        if not env.sender or env.is_bounce or not sendable_address(env.sender, env.smtputf8):
            return True     # nobody to tell (amavis sends nothing to <>), not the postmaster
        entries = [DsnEntry(r, "failed", reply.enhanced or "5.7.0", reply)
                   for r in env.recipients if r.notify_flags & Notify.FAILURE]
        if not entries:
            return True
        body_path = await self._store.open_body(qid)
        # the header section only: the blocked content (a banned attachment, the spam) is
        # not mailed back to a sender who is often forged
        quoted = dataclasses.replace(env, ret="HDRS")
        return await self._queue_notice(qid, quoted, body_path, entries, "failed", time.time())

    async def _queue_notice(self, qid: QueueId, env: Envelope, body_path: str,
                            entries: list[DsnEntry], kind: str, now: float) -> bool:
        """:meth:`_notify` for any message: ``body_path`` is the original to quote."""
        double = False
        to = env.sender
        if env.sender == "" or env.is_bounce or not sendable_address(env.sender,
                                                                     env.smtputf8):
            if kind != "failed":
                return True  # success/delay reports to <> (or to no address) go nowhere
            if env.extra.get("double_bounce") == "1":
                addrs = ", ".join(f"<{deliverylog.printable(e.recipient.address)}>"
                                  for e in entries)
                log.error("%s: undeliverable postmaster notification to %s discarded", qid,
                          addrs)
                return True
            if env.sender and not env.is_bounce:
                log.warning("%s: sender <%s> is not a valid address; notification to the "
                            "postmaster", qid, deliverylog.printable(env.sender))
            to, double = self._postmaster, True
        try:
            rcpt = await self._resolve(to)
        except (SMTPError, OSError) as e:   # a lookup source down: one line, not our bug
            log.error("%s: cannot resolve DSN recipient <%s>: %s; will retry", qid,
                      deliverylog.printable(to), fault_text(e))
            return False
        except Exception:
            log.exception("%s: cannot resolve DSN recipient <%s>; will retry", qid,
                          deliverylog.printable(to))
            return False
        if rcpt is None:
            log.error("%s: DSN recipient <%s> is unknown; %s notification dropped", qid,
                      deliverylog.printable(to), kind)
            return True
        try:
            data, signature = await asyncio.to_thread(
                self._compose, qid, kind, reporting_mta=self._hostname, qid=qid,
                envelope=env, entries=entries, body_path=body_path, now=now,
                action_kind=kind, to=to)
            dsn_env = Envelope(
                sender="", recipients=[rcpt], received_at=now, next_attempt=now,
                body_type="7BIT" if data.isascii() else "8BITMIME",
                smtputf8=env.smtputf8 and not data.isascii(), size=len(data),
                is_bounce=True, protocol="DSN",
                extra={"double_bounce": "1"} if double else {},
                # RFC 8689 §5: a REQUIRETLS message's report goes back with REQUIRETLS
                # (its null sender lets it go on where a next hop lacks it, §4.2.1)
                requiretls=env.requiretls)
            dsn_qid = await self._store.enqueue_bytes(dsn_env, data)
        except (SMTPError, OSError) as e:   # disk full, read-only, unreadable original
            log.error("%s: cannot queue %s notification: %s; will retry", qid, kind,
                      fault_text(e))
            return False
        except Exception:
            log.exception("%s: cannot queue %s notification; will retry", qid, kind)
            return False
        deliverylog.log_notice(qid, kind, dsn_qid)
        if signature:
            log.info("%s: DKIM-signed %s", dsn_qid, _signature_tags(signature))
        self.submit(dsn_qid, dsn_env)
        return True

    def _compose(self, about: QueueId, kind: str, **dsn: Any) -> tuple[bytes, bytes]:
        """The notice (:func:`build_dsn` with ``dsn``) and the signature put on top of it
        (b"" when unsigned), in a worker thread: both read files and the signature costs an
        RSA operation. A signing fault leaves the notice unsigned, logged: a DSN is never
        lost or held back for want of a signature."""
        data = build_dsn(**dsn)
        if self._signer is None:
            return data, b""
        try:
            signature = self._signer(data)
        except Exception as e:  # noqa: BLE001 -- any signer fault: queue the notice unsigned
            where = f" ({e.filename})" if isinstance(e, OSError) and e.filename else ""
            log.warning("%s: %s notification not DKIM-signed: %s%s; it goes out unsigned",
                        about, kind, fault_text(e), deliverylog.printable(where))
            return data, b""
        return signature + data, signature


def _signature_tags(signature: bytes) -> str:
    """``d=... s=... a=...`` of a DKIM-Signature field, for the log line (as the pipeline's
    signing stage writes it)."""
    text = b" ".join(signature.split()).decode("ascii", "replace")
    tags = dict(re.findall(r"(?:^|;)\s*([a-z]+)=\s*([^;]*?)\s*(?=;|$)", text.partition(":")[2]))
    return " ".join(f"{t}={tags[t]}" for t in ("d", "s", "a") if t in tags)


def _delay_notified(env: Envelope) -> set[int]:
    """The indices of the recipients a delay notice was queued for (``DELAY_NOTIFIED``)."""
    words = env.extra.get(DELAY_NOTIFIED, "").split()
    return {int(w) for w in words if w.isascii() and w.isdigit()}


def _mark_delay_notified(env: Envelope, indices: Iterable[int]) -> None:
    done = _delay_notified(env) | set(indices)
    env.extra[DELAY_NOTIFIED] = " ".join(str(i) for i in sorted(done))


def _final_status(reply: Reply) -> str:
    """The DSN Status for a permanent failure: the reply's own code when it is a 5.x.x."""
    return reply.enhanced if reply.enhanced.startswith("5.") else "5.0.0"


def _owed_entry(rcpt: Recipient) -> DsnEntry:
    """The failure report for a NOTICE_OWED recipient, from what its state records: a 5xx
    last reply is a permanent failure, anything else an expiry (4.4.7)."""
    reply = parse_reply_text(rcpt.last_reply)
    status = _final_status(reply) if reply.is_permanent else EXPIRED_STATUS
    return DsnEntry(rcpt, "failed", status, reply, _remote_mta(rcpt, rcpt.next_hop))


async def _settle(tasks: Iterable[asyncio.Future[Any]], timeout: float) -> bool:
    """Wait until every task is done, through cancellations, for at most ``timeout``
    seconds; log their exceptions. False when some are still running then."""
    tasks = list(tasks)
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        pending = [t for t in tasks if not t.done()]
        left = deadline - asyncio.get_running_loop().time()
        if not pending or left <= 0:
            break
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait(pending, timeout=left)
    for t in tasks:
        if t.done() and not t.cancelled() and t.exception() is not None:
            log.error("recording delivery outcomes failed", exc_info=t.exception())
    return not pending
