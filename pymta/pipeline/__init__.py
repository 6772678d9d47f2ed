"""The pre-queue pipeline: checks that judge a complete message and modifiers that rewrite it,
run between the end of DATA and the ``250``.

Implementation summary. When the last byte of a message is spooled, the session builds a
:class:`Transaction` (envelope facts, connection facts, a handle on the spooled body) and
hands it to :meth:`Pipeline.run`. Every :class:`Check` runs in order, each under the
framework's timeout; a check that times out or raises is a *temporary* result, never a silent
pass and never a 5xx (Haraka's plugin timeout, the architecture notes' rule 5). Checks record
``auth_results`` fragments and may ask for header fields; the strongest verdict wins
(REJECT > TEMPFAIL > DISCARD > QUARANTINE > PASS). Unless the message is refused, every
:class:`Modifier` then runs in order (SRS rewrites the sender, DKIM/ARC add signatures, the
Authentication-Results modifier renders what the checks recorded). What modifiers add goes to
``Envelope.prepend`` (the spooled body is never rewritten for it), so delivery agents write
those fields above the spooled message. A modifier that must *remove* a field of the
message as received (an ``Authentication-Results`` forged with our authserv-id) calls
:meth:`Transaction.drop_header`: later stages see the message without it at once (the
:class:`SpooledBody` view filters), and the queue's intake rewrites the spool file's header
section before the commit (``QueueStore.rewrite_spool``: a rare, crash-safe copy under the
same id).

The result is one :class:`~pymta.types.Decision` (action, reply, header fields to prepend and
to drop, the new envelope sender, a quarantine reason, the reasons for the log line): the
session answers the client with it and ``pymta.queue.intake`` applies it; nobody reads the
Transaction's fields after the run to find out what the stages wanted.

Checks are read-only on the message; modifiers must not change the body (maddy's reason:
it would break DKIM signatures).

A message a stage cannot parse is still mail (Postfix accepts it): the stage records its
"cannot evaluate" result (``dkim=permerror``, no seal, no signature) or raises
:class:`CannotEvaluate`, which the pipeline logs and treats as "no opinion". Only a fault of
ours (a spool file we cannot read, a key we cannot load, a timeout) is a temporary failure.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pymta import metrics
from pymta.contracts import Check, Modifier
from pymta.pipeline.headers import filter_bytes
from pymta.types import Action, Decision, DropPredicate, Recipient, Reply, Verdict

__all__ = ["PASS", "TEMPFAIL_REPLY", "Action", "CannotEvaluate", "Check", "Decision",
           "Modifier", "Pipeline", "SpooledBody", "Transaction", "Verdict"]

log = logging.getLogger("pymta.pipeline")

PASS = Verdict()


class CannotEvaluate(Exception):
    """Raised by a stage that cannot judge or change *this message* because of the message
    itself (its header section does not parse): a result, not a fault. A check raising it
    counts as PASS with the reason logged; a modifier raising it (before it changed anything)
    leaves the message as it is. Never raise it for a local fault (those stay temporary
    failures)."""


class SpooledBody:
    """Read access to the message as spooled (CRLF, our Received: first, no dot-stuffing).

    Messages are bounded by MESSAGE_SIZE_LIMIT, so reading one whole is allowed for stages
    that need it (DKIM); ``header_bytes`` reads only the header section.

    ``head`` is a prefix of the spooled file the session kept in memory while it streamed
    the message (see ``Session.on_data_chunk``); when it holds the whole header section,
    ``header_bytes`` answers from it instead of opening the file, which is all most messages
    need. ``flush`` (the spool writer's) runs once before the file is first read, so a
    reader sees the whole message; when no stage reads the file, the commit thread does
    that write instead of the event loop.
    """

    __slots__ = ("path", "size", "_cache", "_drops", "_head", "_flush", "_memory")

    def __init__(self, path: str, size: int, head: bytes | None = None,
                 flush: Callable[[], None] | None = None,
                 memory: Callable[[], bytes | None] | None = None) -> None:
        self.path = path
        self.size = size
        self._cache: bytes | None = None
        self._drops: tuple[DropPredicate, ...] = ()
        self._head = head
        self._flush = flush
        self._memory = memory       # the spool's ``in_memory``: the whole body, or None

    def drop_headers(self, predicates: Sequence[DropPredicate]) -> None:
        """From now on, show the message without the header fields ``predicates`` match
        (what ``Transaction.drop_header`` asked for; the file itself is rewritten later)."""
        if tuple(predicates) != self._drops:
            self._drops = tuple(predicates)
            if self._cache is not None:
                self._cache = filter_bytes(self._cache, self._drops)
                self.size = len(self._cache)

    def _flushed(self) -> None:
        flush, self._flush = self._flush, None
        if flush is not None:
            flush()

    def on_disk(self) -> str:
        """The spool file's path, every byte of the message written to it first: for stages
        that stream the file themselves (the content scanners), never reading it whole.
        The file is the message as received (``drop_headers`` does not apply to it)."""
        self._flushed()
        return self.path

    def _from_memory(self) -> bytes | None:
        """The whole message from the spool's memory (None: it is in the file)."""
        if self._cache is None and self._memory is not None:
            data = self._memory()
            if data is not None:
                self._cache = filter_bytes(data, self._drops) if self._drops else data
                self.size = len(self._cache)
        return self._cache

    def read(self) -> bytes:
        if self._cache is None and self._from_memory() is None:
            self._flushed()
            with open(self.path, "rb") as f:
                data = f.read()
            self._cache = filter_bytes(data, self._drops) if self._drops else data
            self.size = len(self._cache)
        assert self._cache is not None
        return self._cache

    async def read_async(self) -> bytes:
        if self._cache is None and self._from_memory() is None:
            self._flushed()     # here, not in the thread: the writer belongs to the loop
            self._cache = await asyncio.to_thread(self.read)
        assert self._cache is not None
        return self._cache

    def header_bytes(self, limit: int = 1 << 20) -> bytes:
        if self._cache is not None:
            data = self._cache
        else:
            head = self._head
            if head is not None and not self._drops:
                # ``head`` is a prefix of the file: a blank line found in it is the file's
                # first one, and the answer is what reading the file would give.
                end = head.find(b"\r\n\r\n", 0, limit)
                if end >= 0:
                    return head[: end + 2]
            whole = self._from_memory()
            if whole is not None:
                data = whole
            else:
                self._flushed()
                with open(self.path, "rb") as f:
                    data = f.read(limit)
                if self._drops:
                    data = filter_bytes(data, self._drops)
        end = data.find(b"\r\n\r\n")
        return data[: end + 2] if end >= 0 else data


@dataclass(slots=True)
class Transaction:
    """One message between end of data and ``250``; what stages read and what they change.

    ``trusted`` is true for authenticated clients and MYNETWORKS (no SPF/DMARC on them;
    their mail is signed). ``results`` lets later stages read earlier ones (DMARC reads the
    SPF and DKIM outcomes) keyed by stage name. ``prepend`` collects header fields (with
    CRLF) that will stand above the spooled message, newest first. ``header_drops`` are
    predicates over raw header fields of the message as received (see ``drop_header``).
    """

    qid: str
    sender: str
    recipients: list[Recipient]
    peer_ip: str
    helo: str
    hostname: str
    local_domains: frozenset[str]
    auth_user: str | None = None
    trusted: bool = False
    tls: bool = False
    smtputf8: bool = False
    results: dict[str, object] = field(default_factory=dict)
    auth_results: list[str] = field(default_factory=list)
    prepend: list[str] = field(default_factory=list)
    header_drops: list[DropPredicate] = field(default_factory=list)

    def drop_header(self, predicate: DropPredicate) -> None:
        """Remove every header field of the received message that ``predicate`` (called with
        the raw field: name, folded value, CRLF) matches. Only for fields that are there: each
        call costs the intake a rewrite of the spool file's header section before commit."""
        self.header_drops.append(predicate)

    def add_header(self, line: str) -> None:
        """Put a header field above everything added so far (trace fields stack upwards)."""
        self.prepend.insert(0, line if line.endswith("\r\n") else line + "\r\n")


TEMPFAIL_REPLY = Reply(451, "4.7.0", "Temporary failure in message checks; try again later")


class Pipeline:
    """The configured checks and modifiers, run in order under the framework's timeout
    (``timeout`` seconds per stage); see the module docstring."""

    def __init__(self, checks: Sequence[Check] = (), modifiers: Sequence[Modifier] = (),
                 timeout: float = 30.0) -> None:
        self.checks = list(checks)
        self.modifiers = list(modifiers)
        self.timeout = timeout

    def __bool__(self) -> bool:
        return bool(self.checks or self.modifiers)

    async def run(self, txn: Transaction, body: SpooledBody) -> Decision:
        """The decision for one message: what the client is told and, unless it is refused,
        what the queue side applies (header fields to add and to drop, the new sender, a
        quarantine). ``txn`` keeps every stage's results for the caller's log."""
        original = txn.sender
        action = Action.PASS
        reply: Reply | None = None
        reasons: list[str] = []
        kept = Verdict()        # the verdict that asks for a quarantine, if any
        for check in self.checks:
            verdict = await self._run_check(check, txn, body)
            txn.results[check.name] = verdict
            if verdict.auth_result:
                txn.auth_results.append(verdict.auth_result)
            for header in verdict.headers:
                txn.add_header(header)
            if verdict.action > action:
                action, reply = verdict.action, verdict.reply
            if verdict.quarantine_kind and verdict.action >= kept.action:
                kept = verdict
            if verdict.reason:
                reasons.append(f"{check.name}: {verdict.reason}")
        if action is Action.REJECT and kept.action is Action.REJECT:
            # refused, and kept in the quarantine all the same (the content filter's REJECT)
            return Decision(action, reply, reasons=tuple(reasons),
                            quarantine="; ".join(reasons) or "quarantined",
                            quarantine_kind=kept.quarantine_kind)
        if action in (Action.REJECT, Action.TEMPFAIL):
            return Decision(action, reply or TEMPFAIL_REPLY, reasons=tuple(reasons))
        for modifier in self.modifiers:
            try:
                # asyncio.timeout, not wait_for: no task per stage and message
                async with asyncio.timeout(self.timeout):
                    await modifier.modify(txn, body)
                if txn.header_drops:
                    body.drop_headers(txn.header_drops)
            except CannotEvaluate as exc:
                log.warning("%s: %s: message not changed: %s", txn.qid, modifier.name, exc)
                reasons.append(f"{modifier.name}: {exc}")
            except Exception as exc:  # noqa: BLE001 - any stage fault is temporary
                log.error("%s: %s failed: %r", txn.qid, modifier.name, exc)
                metrics.error("pipeline")
                return Decision(Action.TEMPFAIL, TEMPFAIL_REPLY,
                                reasons=(*reasons, f"{modifier.name}: {exc!r}"))
        decision = _decision(txn, original, action, reply, reasons)
        if action is Action.QUARANTINE and kept.action is Action.QUARANTINE:
            decision.quarantine_kind = kept.quarantine_kind
            decision.bounce = kept.bounce
        return decision

    async def _run_check(self, check: Check, txn: Transaction, body: SpooledBody) -> Verdict:
        try:
            async with asyncio.timeout(self.timeout):
                return await check.check(txn, body)
        except CannotEvaluate as exc:
            log.info("%s: %s cannot evaluate the message: %s", txn.qid, check.name, exc)
            return Verdict(reason=f"cannot evaluate: {exc}")
        except TimeoutError:
            log.warning("%s: %s timed out after %.0fs", txn.qid, check.name, self.timeout)
            metrics.error("pipeline")
            return Verdict(Action.TEMPFAIL, TEMPFAIL_REPLY, reason="timeout")
        except Exception as exc:  # noqa: BLE001 - any stage fault is temporary
            log.error("%s: %s failed: %r", txn.qid, check.name, exc)
            metrics.error("pipeline")
            return Verdict(Action.TEMPFAIL, TEMPFAIL_REPLY, reason=repr(exc))


def _decision(txn: Transaction, original_sender: str, action: Action, reply: Reply | None,
              reasons: Sequence[str]) -> Decision:
    """The Decision for a message the checks let through (PASS, QUARANTINE, DISCARD): what
    the stages left in ``txn``, as the queue side applies it."""
    why = tuple(reasons)
    return Decision(
        action, reply, prepend=tuple(txn.prepend), drops=tuple(txn.header_drops),
        sender=txn.sender if txn.sender != original_sender else None,
        quarantine=("; ".join(why) or "quarantined") if action is Action.QUARANTINE else None,
        reasons=why)
