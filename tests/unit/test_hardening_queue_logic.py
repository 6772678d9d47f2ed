"""Issue 10 (hardening), the queue side: DSN content (defect 3), outcomes recorded per
transport group and the owed-notice state (defect 4), envelope screening before delivery
(defect 6), flush, clock jumps, and durable mailbox directories.

The queue manager runs over the in-memory fake store of ``test_manager`` (disk semantics:
envelopes deep-copied on load/save), with injected wall and monotonic clocks.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import io
import os
import re
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from pymta.delivery import maildir as maildir_mod
from pymta.delivery._client import rcpt_options, screen
from pymta.delivery.local import LocalDeliveryAgent
from pymta.delivery.mbox import deliver_mbox
from pymta.delivery.relay import SMTPRelayAgent
from pymta.delivery.router import StaticRouter
from pymta.queue import codec
from pymta.queue.dsn import DsnEntry, build_dsn, parse_reply_text, sendable_address
from pymta.queue.manager import QueueManager
from pymta.queue.retry import RetryPolicy
from pymta.types import (
    Envelope,
    Outcome,
    OutcomeKind,
    QueuedMessage,
    RcptState,
    Recipient,
    Reply,
)
from tests.unit.test_manager import (
    BODY,
    DEFER,
    OK,
    REJECT,
    Agent,
    Clock,
    FakeStore,
    Router,
    always,
    parse,
    put,
    resolve,
)

MARKER = b"SECRET-BODY-LINE-0123456789"
FULL_BODY = (b"From: victim@foreign.test\r\nTo: alice@example.org\r\nSubject: payload\r\n\r\n"
             + (MARKER + b"\r\n") * 50)


class CountingStore(FakeStore):
    """The fake store, counting saves; ``save_delay`` makes each save take that long."""

    def __init__(self, tmp_path: Path, save_delay: float = 0.0) -> None:
        super().__init__(tmp_path)
        self.saves = 0
        self.save_delay = save_delay

    async def save(self, qid: str, envelope: Envelope) -> None:
        if self.save_delay:
            await asyncio.sleep(self.save_delay)
        self.saves += 1
        await super().save(qid, envelope)


class TwoClocks:
    """A wall clock and a monotonic clock that tests move separately."""

    def __init__(self) -> None:
        self.wall = 1_700_000_000.0
        self.mono = 1000.0

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


def manager(store: FakeStore, remote, local=None, *, policy=None, clocks=None,
            concurrency: int = 20) -> QueueManager:
    clocks = clocks or TwoClocks()
    return QueueManager(store, Router(remote, local or Agent(always(OK))),
                        policy=policy or RetryPolicy(jitter=0),
                        hostname="mta.example.org", postmaster="postmaster@example.org",
                        resolve=resolve, clock=lambda: clocks.wall,
                        monotonic=lambda: clocks.mono, concurrency=concurrency)


def dsn_parts(data: bytes):
    msg = email.message_from_bytes(data, policy=email.policy.default)
    return msg, msg.get_payload()


# --------------------------------------------------------------------- defect 3: DSN content


def entry(rcpt: Recipient, action="delivered", status="2.0.0", reply=OK, remote=None):
    return DsnEntry(rcpt, action, status, reply, remote)


def test_issue10_defect3_success_dsn_returns_headers_only(tmp_path):
    body = tmp_path / "body"
    body.write_bytes(FULL_BODY)
    env = Envelope("victim@foreign.test", [], 1.0, 1.0, ret="FULL")
    rcpt = Recipient("alice@example.org", "alice@example.org", notify="SUCCESS")
    for kind in ("delivered", "delayed"):
        data = build_dsn(reporting_mta="mx.example.org", qid="Q1", envelope=env,
                         entries=[entry(rcpt, kind)], body_path=str(body), now=2.0,
                         action_kind=kind)
        assert MARKER not in data, kind
        msg, parts = dsn_parts(data)
        assert parts[2].get_content_type() == "text/rfc822-headers"
        assert b"Subject: payload" in data          # the header section is returned
    # RET=FULL still returns the whole message in a failure report
    data = build_dsn(reporting_mta="mx.example.org", qid="Q1", envelope=env,
                     entries=[entry(rcpt, "failed", "5.1.1", REJECT)], body_path=str(body),
                     now=2.0, action_kind="failed")
    assert data.count(MARKER) == 50
    assert dsn_parts(data)[1][2].get_content_type() == "message/rfc822"


async def test_issue10_defect3_notify_success_through_the_manager_is_headers_only(tmp_path):
    store = FakeStore(tmp_path)
    mgr = manager(store, Agent(always(OK)))
    env = Envelope("victim@foreign.test",
                   [Recipient("alice@example.org", "alice@example.org", local=True,
                              notify="SUCCESS")], 1.7e9, 1.7e9, ret="FULL")
    qid = await store.enqueue_bytes(env, FULL_BODY)
    await mgr.run_once_due()
    [dsn_qid] = [q for q in store.ids() if q != qid]
    data = store.body(dsn_qid)
    assert MARKER not in data
    assert b"Content-Type: text/rfc822-headers" in data


NASTY = [
    "a\r\nX-Injected: yes@example.org",
    "a\u2028b@example.org",
    "a\u0085b@example.org",
    "\udcff\udcfe@sender.test",
    "a\x00b@example.org",
]


@pytest.mark.parametrize("nasty", NASTY)
def test_issue10_defect3_dsn_fields_are_checked(tmp_path, nasty):
    body = tmp_path / "body"
    body.write_bytes(BODY)
    env = Envelope(nasty, [], 1.0, 1.0, envid="ab\r\nX-Env: 1+0D+0A" + nasty)
    rcpt = Recipient(nasty, nasty, local=False, orcpt="rfc822;" + nasty,
                     last_reply=str(REJECT), last_attempt=1.0)
    diag = Reply(550, "5.1.1", "no\r\nX-Diag: 1 such user\x1b[31m " + nasty)
    data = build_dsn(reporting_mta="mx.example.org", qid="Q1", envelope=env,
                     entries=[DsnEntry(rcpt, "failed", "5.1.1", diag,
                                       "evil.example\r\nX-Remote: 1")],
                     body_path=str(body), now=2.0, action_kind="failed", to=nasty)
    head, _, rest = data.partition(b"\r\n\r\n")
    # the DSN's own header: no field but ours, every line printable
    names = [line.split(b":", 1)[0] for line in head.split(b"\r\n")
             if line and line[:1] not in (b" ", b"\t")]
    assert names == [b"From", b"To", b"Subject", b"Date", b"Message-ID", b"Auto-Submitted",
                     b"MIME-Version", b"Content-Type", b"Content-Transfer-Encoding"]
    # nothing but printable ASCII and CRLF in the whole report apart from the original
    report = data[:data.index(b"Content-Description: Undelivered Message")]
    assert re.fullmatch(rb"[\x20-\x7e\r\n\t]*", report), report
    assert b"\r\n" not in report.replace(b"\r\n", b"")           # no bare CR or LF
    assert b"X-Injected" not in report or b"\\x{D}" in report
    for injected in (b"\r\nX-Injected:", b"\r\nX-Env:", b"\r\nX-Diag:", b"\r\nX-Remote:"):
        assert injected not in data
    msg, parts = dsn_parts(data)
    per_msg, per_rcpt = parts[1].get_payload()
    assert per_rcpt["Status"] == "5.1.1"
    assert per_rcpt["Final-Recipient"].startswith("utf-8; ")
    assert "Remote-MTA" not in per_rcpt                   # not a host name: left out
    assert per_rcpt["Diagnostic-Code"].startswith("smtp; 550 5.1.1 no X-Diag: 1 such user")
    assert per_msg["Original-Envelope-Id"].isprintable()


def test_issue10_defect3_dsn_field_syntax_for_good_values(tmp_path):
    body = tmp_path / "body"
    body.write_bytes(BODY)
    env = Envelope("alice@example.org", [], 1.0, 1.0, envid="QQ+2B1", smtputf8=False)
    rcpt = Recipient("bob@example.net", "info@example.org", local=False,
                     orcpt="rfc822;info+2Bx@example.org")
    data = build_dsn(reporting_mta="mx.example.org", qid="Q1", envelope=env,
                     entries=[entry(rcpt, "failed", "bogus", REJECT, "mx.example.net")],
                     body_path=str(body), now=2.0, action_kind="failed")
    per_msg, per_rcpt = dsn_parts(data)[1][1].get_payload()
    assert per_msg["Original-Envelope-Id"] == "QQ+1"
    assert per_rcpt["Original-Recipient"] == "rfc822; info+x@example.org"
    assert per_rcpt["Final-Recipient"] == "rfc822; bob@example.net"
    assert per_rcpt["Status"] == "5.0.0"                 # a malformed status: class default
    assert per_rcpt["Remote-MTA"] == "dns; mx.example.net"


def test_issue10_defect3_utf8_addresses_in_global_dsn(tmp_path):
    body = tmp_path / "body"
    body.write_bytes(BODY)
    env = Envelope("jörg@example.org", [], 1.0, 1.0, smtputf8=True)
    rcpt = Recipient("ñandú@example.net", "ñandú@example.net", local=False,
                     orcpt="utf-8;\\x{F1}and\\x{FA}@example.net")
    data = build_dsn(reporting_mta="mx.example.org", qid="Q1", envelope=env,
                     entries=[entry(rcpt, "failed", "5.1.1", REJECT)], body_path=str(body),
                     now=2.0, action_kind="failed")
    text = data.decode("utf-8")
    assert "Final-Recipient: utf-8; ñandú@example.net" in text
    assert "Original-Recipient: utf-8; ñandú@example.net" in text
    assert "To: jörg@example.org" in text


def test_issue10_sendable_address_and_reply_parsing():
    assert sendable_address("alice@example.org", False)
    assert not sendable_address("jörg@example.org", False)
    assert sendable_address("jörg@example.org", True)
    for nasty in NASTY:
        assert not sendable_address(nasty, True), nasty
    assert parse_reply_text("550 5.1.1 User unknown") == Reply(550, "5.1.1", "User unknown")
    assert parse_reply_text("451 no code") == Reply(451, "4.0.0", "no code")
    assert parse_reply_text("garbage").code == 550


# ------------------------------------------------- defect 4: outcomes recorded as they come


class Hang:
    """An agent that never returns (a next hop stalled before answering DATA)."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.calls = 0

    async def deliver(self, msg, rcpts):
        self.calls += 1
        self.started.set()
        await asyncio.sleep(3600)


LOCAL = Recipient("alice@example.org", "alice@example.org", local=True, mailbox="alice/")
REMOTE = Recipient("bob@example.net", "bob@example.net", local=False)


async def test_issue10_defect4_local_outcome_saved_before_slow_group_ends(tmp_path):
    """A stop cancels the stalled relay group; the local delivery that already happened is on
    disk, so the next attempt hands only the relay recipient to an agent."""
    store = CountingStore(tmp_path)
    hang = Hang()
    local = Agent(always(OK))
    mgr = QueueManager(store, Router(hang, local), policy=RetryPolicy(jitter=0),
                       hostname="h", postmaster="postmaster@h", resolve=resolve)
    now = mgr._clock()
    qid = await store.enqueue_bytes(
        Envelope("a@example.org", [Recipient(**_fields(LOCAL)), Recipient(**_fields(REMOTE))],
                 now, now), BODY)
    await mgr.start()
    await asyncio.wait_for(hang.started.wait(), 2)
    for _ in range(100):
        if store.saves:
            break
        await asyncio.sleep(0.01)
    await mgr.stop(grace=0.05)
    env = store.load(qid)
    assert [r.state for r in env.recipients] == [RcptState.DELIVERED, RcptState.PENDING]
    assert env.recipients[1].attempts == 0
    assert store.locked == set()
    # after a "restart": only the relay recipient is tried
    remote = Agent(always(OK))
    mgr2 = QueueManager(store, Router(remote, local), policy=RetryPolicy(jitter=0),
                        hostname="h", postmaster="postmaster@h", resolve=resolve)
    await mgr2.run_once_due()
    assert [c[1] for c in local.calls] == [["alice@example.org"]]
    assert [c[1] for c in remote.calls] == [["bob@example.net"]]
    assert store.ids() == []


def _fields(r: Recipient) -> dict:
    return {k: getattr(r, k) for k in ("address", "original", "local", "mailbox", "notify",
                                       "orcpt")}


async def test_issue10_defect4_cancel_during_recording_keeps_the_outcome(tmp_path):
    """The stop comes while the local group's outcome is being saved (a slow disk): the save
    completes, and the lock is released only after it."""
    store = CountingStore(tmp_path, save_delay=1.0)
    hang = Hang()
    local = Agent(always(OK))
    mgr = QueueManager(store, Router(hang, local), policy=RetryPolicy(jitter=0),
                       hostname="h", postmaster="postmaster@h", resolve=resolve)
    now = mgr._clock()
    qid = await store.enqueue_bytes(
        Envelope("a@example.org", [Recipient(**_fields(LOCAL)), Recipient(**_fields(REMOTE))],
                 now, now), BODY)
    await mgr.start()
    await asyncio.wait_for(hang.started.wait(), 2)
    while not local.calls:
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.05)            # the local outcome is being saved now
    assert store.saves == 0
    await mgr.stop(grace=0.0)
    assert store.saves == 1
    assert store.load(qid).recipients[0].state is RcptState.DELIVERED
    assert store.locked == set()


async def test_issue10_defect4_one_save_per_group_and_one_for_a_single_group(tmp_path):
    store = CountingStore(tmp_path)
    clocks = TwoClocks()
    remote = Agent(always(DEFER))
    mgr = manager(store, remote, Agent(always(OK)), clocks=clocks)
    await put(store, Clock(clocks.wall), rcpts=[REMOTE])
    await mgr.run_once_due()
    assert store.saves == 1                  # the hot path: one save per attempt
    store.envs.clear()
    store.saves = 0
    await put(store, Clock(clocks.wall),
              rcpts=[Recipient(**_fields(LOCAL)), Recipient(**_fields(REMOTE)),
                     Recipient("c@other.example", "c@other.example", local=False)])
    await mgr.run_once_due()
    assert store.saves == 3                  # three groups: one save as each returns


async def test_issue10_defect4_permanent_failure_is_never_redelivered_while_notice_owed(
        tmp_path):
    store = FakeStore(tmp_path)
    clocks = TwoClocks()
    remote = Agent(always(REJECT), relay="mx.example.net[192.0.2.1]:25")
    mgr = manager(store, remote, clocks=clocks, policy=RetryPolicy(first=10, jitter=0))
    qid = await put(store, Clock(clocks.wall))
    real_enqueue = store.enqueue_bytes

    async def broken(envelope, data):
        raise OSError("disk full")

    store.enqueue_bytes = broken
    await mgr.run_once_due()
    env = store.load(qid)
    assert env.recipients[0].state is RcptState.NOTICE_OWED
    assert codec.decode(codec.encode(env)).recipients[0].state is RcptState.NOTICE_OWED
    clocks.advance(10)
    await mgr.run_once_due()                 # still broken: no second delivery attempt
    assert len(remote.calls) == 1
    assert store.load(qid).recipients[0].state is RcptState.NOTICE_OWED
    store.enqueue_bytes = real_enqueue
    clocks.advance(20)
    await mgr.run_once_due()
    assert len(remote.calls) == 1            # the recipient was never handed over again
    assert qid not in store.ids()
    [dsn_qid] = store.ids()
    per_rcpt = parse(store.body(dsn_qid)).get_payload()[1].get_payload()[1]
    assert per_rcpt["Status"] == "5.1.1"
    assert per_rcpt["Remote-MTA"] == "dns; mx.example.net"
    assert per_rcpt["Diagnostic-Code"] == f"smtp; {REJECT}"


async def test_failure_notices_stay_one_per_attempt_across_groups(tmp_path):
    store = FakeStore(tmp_path)
    remote = Agent(always(REJECT))
    local = Agent(always(Reply(550, "5.2.1", "Mailbox disabled")))
    mgr = manager(store, remote, local)
    qid = await put(store, Clock(TwoClocks().wall),
                    rcpts=[Recipient(**_fields(LOCAL)), Recipient(**_fields(REMOTE))])
    await mgr.run_once_due()
    [dsn_qid] = [q for q in store.ids() if q != qid]
    report = parse(store.body(dsn_qid)).get_payload()[1].get_payload()
    assert sorted(p["Final-Recipient"] for p in report[1:]) == [
        "rfc822; alice@example.org", "rfc822; bob@example.net"]


# --------------------------------------------------------------- item 7: raising agents


class Raises:
    def __init__(self) -> None:
        self.calls = 0

    async def deliver(self, msg, rcpts):
        self.calls += 1
        raise RuntimeError("agent bug")


class RaisingRouter:
    def route(self, rcpt):
        raise RuntimeError("router bug")


@pytest.mark.parametrize("where", ["local", "remote", "router"])
async def test_issue10_raising_agent_or_router_defers_and_retries(tmp_path, where):
    store = FakeStore(tmp_path)
    clocks = TwoClocks()
    raiser = Raises()
    router = (RaisingRouter() if where == "router" else
              Router(raiser, Agent(always(OK))) if where == "remote" else
              Router(Agent(always(OK)), raiser))
    mgr = QueueManager(store, router, policy=RetryPolicy(first=60, jitter=0),
                       hostname="h", postmaster="postmaster@h", resolve=resolve,
                       clock=lambda: clocks.wall, monotonic=lambda: clocks.mono)
    rcpt = Recipient(**_fields(LOCAL if where == "local" else REMOTE))
    qid = await put(store, Clock(clocks.wall), rcpts=[rcpt])
    await mgr.run_once_due()
    r = store.load(qid).recipients[0]
    assert r.state is RcptState.PENDING and r.last_reply.startswith("451 4.3.0")
    assert store.ids() == [qid]              # no bounce, nothing lost
    clocks.advance(60)
    await mgr.run_once_due()
    assert store.load(qid).recipients[0].attempts == 2   # retried later


# --------------------------------------------------------------------------- clock jumps


async def test_issue10_clock_jump_back_does_not_stall_retries(tmp_path):
    store = FakeStore(tmp_path)
    clocks = TwoClocks()
    remote = Agent(lambda r, n: DEFER if n == 1 else OK)
    mgr = manager(store, remote, clocks=clocks,
                  policy=RetryPolicy(first=300, maximum=4000, jitter=0))
    qid = await put(store, Clock(clocks.wall))
    await mgr.run_once_due()
    assert len(remote.calls) == 1
    clocks.wall -= 86400                     # the wall clock goes back a day
    clocks.advance(299)
    assert await mgr.run_once_due() == []
    clocks.advance(1)
    assert await mgr.run_once_due() == [qid]  # on time by the monotonic clock
    assert store.ids() == []


async def test_issue10_clock_jump_back_before_a_restart_is_bounded(tmp_path):
    """A new process reads a next_attempt that lies a day ahead (written before the clock
    went back): it waits at most the interval the last attempt set, not a day."""
    store = FakeStore(tmp_path)
    clocks = TwoClocks()
    wall = clocks.wall
    rcpt = Recipient(**_fields(REMOTE))
    rcpt.attempts, rcpt.last_attempt = 1, wall
    await put(store, Clock(wall), rcpts=[rcpt], next_attempt=wall + 300)
    clocks.wall -= 86400
    remote = Agent(always(OK))
    mgr = manager(store, remote, clocks=clocks,
                  policy=RetryPolicy(first=300, maximum=4000, jitter=0))
    assert await mgr.run_once_due() == []
    clocks.advance(300)
    assert len(await mgr.run_once_due()) == 1
    assert store.ids() == []


async def test_issue10_clock_jump_forward_is_no_storm(tmp_path):
    """A day forward: the messages this process scheduled keep their monotonic due times
    (none is launched early), and when they are due, never more than the concurrency bound
    run at once."""
    store = FakeStore(tmp_path)
    clocks = TwoClocks()
    running = peak = 0

    class Slowish:
        def __init__(self) -> None:
            self.calls = 0

        async def deliver(self, msg, rcpts: Sequence[Recipient]):
            nonlocal running, peak
            self.calls += 1
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.01)
            running -= 1
            reply = DEFER if self.calls <= 40 else OK
            return [Outcome(r.address, OutcomeKind.TEMPORARY if reply is DEFER else
                            OutcomeKind.DELIVERED, reply, "x") for r in rcpts]

    agent = Slowish()
    mgr = manager(store, agent, clocks=clocks, concurrency=5,
                  policy=RetryPolicy(first=300, maximum=4000, lifetime=5 * 86400, jitter=0))
    for _ in range(40):
        await put(store, Clock(clocks.wall))
    await mgr.run_once_due()
    assert agent.calls == 40 and peak <= 5
    clocks.wall += 86400                      # a day forward; monotonic time barely moves
    clocks.mono += 1
    assert await mgr.run_once_due() == []     # nothing launched early
    assert agent.calls == 40
    clocks.advance(300)
    due = await mgr.run_once_due()
    assert len(due) == 40 and peak <= 5
    assert store.ids() == []


async def test_issue10_expiry_follows_the_wall_clock_only_after_a_failed_attempt(tmp_path):
    """Lifetime is wall-clock age (as Postfix): a message whose next hop works is delivered
    after a jump forward, not expired; one that fails again expires (4.4.7)."""
    store = FakeStore(tmp_path)
    clocks = TwoClocks()
    remote = Agent(lambda r, n: DEFER if r.address.startswith("bob") else OK)
    mgr = manager(store, remote, clocks=clocks,
                  policy=RetryPolicy(first=300, maximum=300, lifetime=86400, jitter=0))
    ok_qid = await put(store, Clock(clocks.wall),
                       rcpts=[Recipient("carol@example.net", "carol@example.net", local=False)],
                       next_attempt=clocks.wall + 100)
    bad_qid = await put(store, Clock(clocks.wall), rcpts=[Recipient(**_fields(REMOTE))],
                        next_attempt=clocks.wall + 100)
    clocks.wall += 2 * 86400
    await mgr.run_once_due()
    assert ok_qid not in store.ids() and bad_qid not in store.ids()
    [dsn_qid] = store.ids()
    per_rcpt = parse(store.body(dsn_qid)).get_payload()[1].get_payload()[1]
    assert per_rcpt["Status"] == "4.4.7" and "bob@example.net" in per_rcpt["Final-Recipient"]


# --------------------------------------------------------------------------------- flush


async def test_issue10_flush_forgets_dead_hosts_and_reruns_in_flight(tmp_path):
    """A new flush token + wake (SIGUSR1): the router's agents forget their dead hosts, and a
    message whose attempt was in flight at the flush is tried once more as soon as it ends
    (that attempt may have met the dead-host memory); the same token again is no flush."""
    store = FakeStore(tmp_path)
    store.root = str(tmp_path)               # type: ignore[attr-defined]
    relay = SMTPRelayAgent(hostname="h", dead_host_time=60)
    gate = asyncio.Event()

    class Gated:
        """The relay's dead-host memory, with deliveries a test can hold."""

        def __init__(self) -> None:
            self.calls = 0

        def flush(self) -> None:
            relay.flush()

        async def deliver(self, msg, rcpts):
            self.calls += 1
            if self.calls == 1:
                await gate.wait()
                return [Outcome(r.address, OutcomeKind.TEMPORARY, DEFER, "x") for r in rcpts]
            return [Outcome(r.address, OutcomeKind.DELIVERED, OK, "x") for r in rcpts]

    agent = Gated()
    mgr = QueueManager(store, StaticRouter(Agent(always(OK)), agent),
                       policy=RetryPolicy(first=300, jitter=0), hostname="h",
                       postmaster="postmaster@h", resolve=resolve)
    qid = await put(store, Clock(mgr._clock()), rcpts=[Recipient(**_fields(REMOTE))])
    await mgr.start()
    try:
        await wait_until_true(lambda: agent.calls == 1)
        relay._mark_dead("192.0.2.1", 25, DEFER)
        (tmp_path / "flush").write_text(f"{time.time_ns()}.1\n")
        mgr.wake()                           # SIGUSR1
        assert relay._is_dead("192.0.2.1", 25) is None
        gate.set()                           # the in-flight attempt ends deferred ...
        await wait_until_true(lambda: qid not in store.ids())   # ... and is retried at once
        assert agent.calls == 2
        relay._mark_dead("192.0.2.1", 25, DEFER)
        mgr.wake()                           # the same token: no new flush
        assert relay._is_dead("192.0.2.1", 25) is not None
    finally:
        await mgr.stop()


async def test_issue10_flush_during_worker_start_up_is_not_lost(tmp_path):
    """``pymta queue flush`` while a worker starts: the token is written before the worker's
    manager reads it, and the SIGUSR1 is replayed once the worker has started (see
    ``pymta.workers``) -- so the manager's start must honour that token itself: a deferred
    message not tried since the flush is tried now, not at its next_attempt."""
    store = FakeStore(tmp_path)
    store.root = str(tmp_path)               # type: ignore[attr-defined]
    remote = Agent(always(OK))
    mgr = QueueManager(store, Router(remote, Agent(always(OK))),
                       policy=RetryPolicy(first=300, jitter=0), hostname="h",
                       postmaster="postmaster@h", resolve=resolve)
    now = time.time()
    rcpt = Recipient(**_fields(REMOTE))
    rcpt.attempts, rcpt.last_attempt, rcpt.last_reply = 1, now - 100, str(DEFER)
    qid = await store.enqueue_bytes(Envelope("a@example.org", [rcpt], now - 200, now + 3000),
                                    BODY)
    (tmp_path / "flush").write_text(f"{time.time_ns()}.1\n")
    await mgr.start()
    try:
        await wait_until_true(lambda: qid not in store.ids())
        assert [c[1] for c in remote.calls] == [["bob@example.net"]]
    finally:
        await mgr.stop()


async def wait_until_true(predicate, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# ---------------------------------------------------------- defect 6: envelope screening


def qmsg(sender: str, smtputf8: bool = False) -> QueuedMessage:
    return QueuedMessage("Q1", Envelope(sender, [], 1.0, 1.0, smtputf8=smtputf8), "/nonexistent")


def test_issue10_defect6_screen_refuses_unsendable_envelopes():
    good = Recipient("bob@example.net", "bob@example.net", local=False)
    refused, keep = screen(qmsg("\udcff\udcfe@sender.test", True), [good], "none")
    assert keep == [] and refused[0].kind is OutcomeKind.PERMANENT
    assert refused[0].reply.code == 550 and refused[0].reply.enhanced == "5.1.7"
    bad = Recipient("x\r\ny@example.net", "x", local=False)
    refused, keep = screen(qmsg("a@example.org"), [good, bad], "none")
    assert keep == [good] and refused[0].reply.enhanced == "5.1.3"
    refused, keep = screen(qmsg("jörg@example.org", smtputf8=False), [good], "none")
    assert keep == [] and refused[0].reply.enhanced == "5.6.7"
    refused, keep = screen(qmsg("jörg@example.org", smtputf8=True), [good], "none")
    assert keep == [good] and refused == []
    refused, keep = screen(qmsg("jörg@example.org", smtputf8=False), [good], "local",
                           local=True)
    assert keep == [good]                     # a mailbox on disk needs no SMTPUTF8


def test_issue10_defect6_dsn_parameters_passed_on_only_when_well_formed():
    ext = {"dsn": ""}
    r = Recipient("bob@example.net", "info@example.org", local=False,
                  notify="success,failure", orcpt="\udcff\udcfe;x")
    assert rcpt_options(r, ext) == ["NOTIFY=SUCCESS,FAILURE",
                                    "ORCPT=rfc822;info@example.org"]
    r = Recipient("bob@example.net", "\udcffx@example.org", local=False, notify="SUCCESS,BOGUS",
                  orcpt="rfc822;ok+2Bx@example.org")
    assert rcpt_options(r, ext) == ["ORCPT=rfc822;ok+2Bx@example.org"]
    r = Recipient("bob@example.net", "\udcffx@example.org", local=False, orcpt="x;\r\n")
    assert rcpt_options(r, ext) == []       # neither the ORCPT nor the original is sendable


async def test_issue10_defect6_local_delivery_refuses_header_breaking_sender(tmp_path):
    body = tmp_path / "body"
    body.write_bytes(BODY)
    agent = LocalDeliveryAgent(str(tmp_path / "mail"), "mx.example.org")
    try:
        env = Envelope("evil@x\r\nX-Injected: 1", [], 1.0, 1.0)
        out = await agent.deliver(QueuedMessage("Q1", env, str(body)),
                                  [Recipient(**_fields(LOCAL))])
        assert out[0].kind is OutcomeKind.PERMANENT and out[0].reply.enhanced == "5.1.7"
        assert not (tmp_path / "mail" / "alice").exists()
    finally:
        await agent.aclose()


# ------------------------------------------------- durable new maildir/mbox directories


@pytest.fixture
def fsynced(monkeypatch):
    """Every path os.fsync was called on, in order."""
    paths: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return paths


async def test_issue10_new_maildir_parents_are_fsynced(tmp_path, fsynced):
    body = tmp_path / "body"
    body.write_bytes(BODY)
    mail = tmp_path / "mail"
    mail.mkdir()
    agent = LocalDeliveryAgent(str(mail), "mx.example.org")
    try:
        rcpt = Recipient("alice@example.org", "alice@example.org", mailbox="example.org/alice/")
        out = await agent.deliver(QueuedMessage("Q1", Envelope("a@b.example", [], 1.0, 1.0),
                                                str(body)), [rcpt])
        assert out[0].kind is OutcomeKind.DELIVERED
    finally:
        await agent.aclose()
    root = mail / "example.org" / "alice"
    for directory in (mail, mail / "example.org", root, root / "new"):
        assert str(directory) in fsynced, (directory, fsynced)
    # the parents were flushed before the message's directory entry was
    assert fsynced.index(str(root)) < fsynced.index(str(root / "new"))
    assert len(list((root / "new").iterdir())) == 1
    fsynced.clear()
    maildir_mod.deliver_maildir(str(mail), "example.org/bob/", b"", str(body), "h")
    assert {str(mail / "example.org"), str(mail / "example.org" / "bob")} <= set(fsynced)


def test_issue10_new_mbox_directory_is_fsynced(tmp_path, fsynced):
    body = tmp_path / "body"
    body.write_bytes(BODY)
    mail = tmp_path / "mail"
    mail.mkdir()
    deliver_mbox(str(mail), "example.org/bob", "a@b.example", b"", str(body), 1.0)
    assert str(mail) in fsynced                      # the new example.org/ entry
    assert str(mail / "example.org") in fsynced      # the new bob file's entry
    # an existing mailbox costs no directory fsync
    fsynced.clear()
    deliver_mbox(str(mail), "example.org/bob", "a@b.example", b"", str(body), 2.0)
    assert fsynced == [str(mail / "example.org" / "bob")]


async def test_issue10_flush_under_load_mbox_waiters_give_up_their_slot(tmp_path, monkeypatch):
    """Found while chasing the slow flush: with a burst to one mbox that a MUA holds locked,
    every delivery queued behind the first held a delivery slot for the whole lock timeout,
    so nothing else (a flushed message) could be delivered meanwhile. Now only the first
    waits for the lock; the others are deferred after a short wait and free their slots."""
    from pymta.delivery import local as local_mod

    monkeypatch.setattr(local_mod, "LOCK_TIMEOUT", 3.0)
    monkeypatch.setattr(local_mod, "MBOX_QUEUE_WAIT", 0.2)
    body = tmp_path / "body"
    body.write_bytes(BODY)
    mail = tmp_path / "mail"
    mail.mkdir()
    (mail / "bob").write_bytes(b"")
    (mail / "bob.lock").write_bytes(f"{os.getppid()}\n".encode())   # a live holder
    agent = LocalDeliveryAgent(str(mail), "mx.example.org")
    finished: list[int] = []

    async def one(i: int) -> Outcome:
        rcpt = Recipient("bob@example.org", "bob@example.org", mailbox="bob")
        [out] = await agent.deliver(
            QueuedMessage(f"Q{i}", Envelope("a@b.example", [], 1.0, 1.0), str(body)), [rcpt])
        finished.append(i)
        return out

    try:
        first = asyncio.create_task(one(0))
        await asyncio.sleep(0.05)            # the first is waiting for the file's lock
        outs = await asyncio.gather(*(one(i) for i in range(1, 5)))
        assert all(o.kind is OutcomeKind.TEMPORARY and "busy" in o.reply.text for o in outs)
        assert not first.done()              # the waiters did not wait for the first
        assert (await first).kind is OutcomeKind.TEMPORARY
        assert finished[-1] == 0
    finally:
        await agent.aclose()


async def test_issue10_flush_with_a_running_server_rewrites_nothing(tmp_path, monkeypatch):
    """``queue flush`` with a server running only leaves a token and signals: no envelope
    rewrite (two fsyncs each) and no wait for busy locks, however large the queue."""
    from pymta.cli import queue as cli_queue
    from pymta.queue.manager import read_flush_token
    from pymta.queue.store import QueueStore

    root = tmp_path / "queue"
    store = QueueStore(str(root))
    await store.start()
    qids = [await store.enqueue_bytes(Envelope("a@example.org", [Recipient(**_fields(REMOTE))],
                                               1.0, 9e9), BODY) for _ in range(3)]
    held = store.try_lock(qids[0])               # one is being delivered right now
    saves: list[str] = []
    monkeypatch.setattr(store, "save_sync", lambda qid, env: saves.append(qid))
    monkeypatch.setattr(cli_queue, "signal_server", lambda state_dir, err: True)
    try:
        out, err = io.StringIO(), io.StringIO()
        assert cli_queue.cmd_flush(store, str(tmp_path), out, err) == 0
        assert out.getvalue() == "3 message(s) due now\n"
        assert saves == []
        token = read_flush_token(str(root / "flush"))
        assert token and token != read_flush_token(None)
        # without a server: made due on disk (the busy one is reported, not waited for)
        monkeypatch.setattr(cli_queue, "signal_server", lambda state_dir, err: False)
        out = io.StringIO()
        assert cli_queue.cmd_flush(store, str(tmp_path), out, err) == 0
        assert sorted(saves) == sorted(qids[1:])
        assert out.getvalue() == "2 message(s) due now, 1 busy (no running server)\n"
    finally:
        assert held is not None
        held.release()
        await store.aclose()


# ------------------------------------------- issue 10 review: a stop never loses an outcome


class ReportsThenHangs:
    """A local agent that has written the first recipient's mailbox, reports it, and is then
    stuck (an mbox lock held by a MUA, a slow disk) until the stop cancels it."""

    reports_progress = True

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.reported = asyncio.Event()

    async def deliver(self, msg, rcpts, report=None):
        self.calls.append([r.address for r in rcpts])
        if report is not None:
            report(Outcome(rcpts[0].address, OutcomeKind.DELIVERED, OK, "local"))
        self.reported.set()
        await asyncio.sleep(3600)


CAROL = Recipient("carol@example.org", "carol@example.org", local=True, mailbox="carol")


@pytest.mark.parametrize("groups", ["local only", "local and relay"])
async def test_issue10_review_stop_records_local_recipients_already_written(tmp_path, groups):
    """alice written, carol's delivery stuck, the stop cancels the call: alice is recorded as
    delivered (her success notice queued), carol is untouched, and the next attempt hands
    only carol (and the relay recipient) to an agent."""
    store = CountingStore(tmp_path)
    local = ReportsThenHangs()
    mgr = QueueManager(store, Router(Hang(), local), policy=RetryPolicy(jitter=0),
                       hostname="h", postmaster="postmaster@h", resolve=resolve)
    now = mgr._clock()
    rcpts = [Recipient(**{**_fields(LOCAL), "notify": "SUCCESS"}), Recipient(**_fields(CAROL))]
    if groups != "local only":
        rcpts.append(Recipient(**_fields(REMOTE)))
    qid = await store.enqueue_bytes(Envelope("a@example.org", rcpts, now, now), BODY)
    await mgr.start()
    await asyncio.wait_for(local.reported.wait(), 2)
    await mgr.stop(grace=0.05)
    env = store.load(qid)
    assert [(r.state, r.attempts) for r in env.recipients[:2]] == [
        (RcptState.DELIVERED, 1), (RcptState.PENDING, 0)]
    assert store.locked == set()
    [dsn_qid] = [q for q in store.ids() if q != qid]
    assert b"Action: delivered" in store.body(dsn_qid)
    local2, remote2 = Agent(always(OK)), Agent(always(OK))
    mgr2 = QueueManager(store, Router(remote2, local2), policy=RetryPolicy(jitter=0),
                        hostname="h", postmaster="postmaster@h", resolve=resolve)
    await mgr2.run_once_due()
    assert [c[1] for c in local2.calls if c[0].qid == qid] == [["carol@example.org"]]
    assert qid not in store.ids()


async def test_issue10_review_cancelled_local_call_reports_mailboxes_written(tmp_path):
    """The real local agent, stopped without ``begin_stop`` (a library user's manager): alice
    (maildir) is written, bob's mbox is dot-locked by a live process. The stop cancels the
    call; the cancellation ends bob's lock wait, alice is recorded, and after the lock is gone
    the next attempt delivers bob only: alice has one copy."""
    mail = tmp_path / "mail"
    mail.mkdir()
    (mail / "bob.lock").write_text(f"{os.getpid()}\n")
    agent = LocalDeliveryAgent(str(mail), "h")
    store = CountingStore(tmp_path)
    mgr = QueueManager(store, StaticRouter(agent), policy=RetryPolicy(jitter=0),
                       hostname="h", postmaster="postmaster@h", resolve=resolve)
    now = mgr._clock()
    bob = Recipient("bob@example.org", "bob@example.org", local=True, mailbox="bob")
    qid = await store.enqueue_bytes(
        Envelope("a@example.org", [Recipient(**_fields(LOCAL)), bob], now, now), BODY)
    alice_new = mail / "alice" / "new"
    try:
        await mgr.start()
        await wait_until_true(lambda: alice_new.is_dir() and any(alice_new.iterdir()))
        await asyncio.wait_for(mgr.stop(grace=0.1), 8)
        env = store.load(qid)
        assert env.recipients[0].state is RcptState.DELIVERED
        assert env.recipients[1].state is RcptState.PENDING
    finally:
        await agent.aclose()
    (mail / "bob.lock").unlink()
    agent2 = LocalDeliveryAgent(str(mail), "h")
    try:
        mgr2 = QueueManager(store, StaticRouter(agent2), policy=RetryPolicy(jitter=0),
                            hostname="h", postmaster="postmaster@h", resolve=resolve)
        await mgr2.run_once_due()
    finally:
        await agent2.aclose()
    assert qid not in store.ids()
    assert len(list(alice_new.iterdir())) == 1, "alice got a duplicate"
    assert (mail / "bob").read_bytes().count(b"Subject: hi") == 1


def _qmsg(body: Path) -> QueuedMessage:
    return QueuedMessage("Q1", Envelope("a@example.org", [], 1.0, 1.0), str(body))


async def test_issue10_review_cancel_waits_for_an_mbox_append_under_way(tmp_path, monkeypatch):
    """Cancelled while bob's append runs in its thread: the append cannot be called back, so
    the call waits for it, reports it, and only then raises the cancellation."""
    from pymta.delivery import local as local_mod

    started, go = threading.Event(), threading.Event()
    stops: list[threading.Event] = []

    def appending(mail_dir, mailbox, sender, prefix, body_path, now, timeout, stop):
        stops.append(stop)
        started.set()
        go.wait(10)

    monkeypatch.setattr(local_mod, "deliver_mbox", appending)
    body = tmp_path / "body"
    body.write_bytes(BODY)
    agent = LocalDeliveryAgent(str(tmp_path), "h")
    reported: list[Outcome] = []
    bob = Recipient("bob@example.org", "bob@example.org", local=True, mailbox="bob")
    try:
        task = asyncio.create_task(agent.deliver(_qmsg(body), [bob], report=reported.append))
        await asyncio.to_thread(started.wait, 5)
        task.cancel()
        await asyncio.sleep(0.05)
        assert not task.done()              # waiting for the append ...
        assert stops[0].is_set()            # ... whose lock waits, if any, end now
        go.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert [(o.recipient, o.kind) for o in reported] == [
            ("bob@example.org", OutcomeKind.DELIVERED)]
    finally:
        go.set()
        await agent.aclose()


async def test_issue10_review_cancel_waits_for_a_maildir_batch_under_way(tmp_path, monkeypatch):
    """Cancelled while alice's file is in a commit batch (it may be in new/ already): the call
    waits for the batch and reports the delivery. Cancelled while a file is still being
    written to tmp/: nothing is waited for, and the file is removed when the write ends."""
    from pymta.delivery import local as local_mod
    from pymta.delivery.maildir import MaildirCommitter

    in_batch, go = threading.Event(), threading.Event()
    flush = MaildirCommitter._flush

    def slow_flush(self, batch):
        in_batch.set()
        go.wait(10)
        return flush(self, batch)

    monkeypatch.setattr(MaildirCommitter, "_flush", slow_flush)
    body = tmp_path / "body"
    body.write_bytes(BODY)
    mail = tmp_path / "mail"
    agent = LocalDeliveryAgent(str(mail), "h")
    reported: list[Outcome] = []
    try:
        task = asyncio.create_task(agent.deliver(_qmsg(body), [Recipient(**_fields(LOCAL))],
                                                 report=reported.append))
        await asyncio.to_thread(in_batch.wait, 5)
        task.cancel()
        await asyncio.sleep(0.05)
        assert not task.done()
        go.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert [o.kind for o in reported] == [OutcomeKind.DELIVERED]
        assert len(list((mail / "alice" / "new").iterdir())) == 1

        writing, go2 = threading.Event(), threading.Event()
        write = local_mod.write_maildir_tmp

        def slow_write(*args):
            writing.set()
            go2.wait(10)
            return write(*args)

        monkeypatch.setattr(local_mod, "write_maildir_tmp", slow_write)
        reported.clear()
        task = asyncio.create_task(agent.deliver(_qmsg(body), [Recipient(**_fields(LOCAL))],
                                                 report=reported.append))
        await asyncio.to_thread(writing.wait, 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task                      # at once: nothing can be in new/ yet
        go2.set()
        await wait_until_true(lambda: not any((mail / "alice" / "tmp").iterdir()))
        assert reported == []
        assert len(list((mail / "alice" / "new").iterdir())) == 1
    finally:
        go.set()
        await agent.aclose()


async def test_issue10_review_lmtp_replies_read_before_a_stop_are_recorded(tmp_path):
    """LMTP answers per recipient after DATA: alice's 250 is read, bob's is slow when the
    stop cancels the call. alice's outcome was reported as it came; the call then waits for
    bob's reply (the server delivers whether we listen or not) and reports it too."""
    from pymta.delivery.lmtp import LMTPDeliveryAgent

    second = asyncio.Event()

    async def serve(reader, writer):
        writer.write(b"220 lmtp.test LMTP\r\n")
        rcpts = 0
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"LHLO":
                writer.write(b"250-lmtp.test\r\n250 8BITMIME\r\n")
            elif verb == b"RCPT":
                rcpts += 1
                writer.write(b"250 2.1.5 Ok\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go ahead\r\n")
                while await reader.readline() not in (b".\r\n", b""):
                    pass
                writer.write(b"250 2.0.0 alice delivered\r\n")
                await writer.drain()
                await second.wait()
                writer.write(b"250 2.0.0 bob delivered\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                break
            else:
                writer.write(b"250 Ok\r\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    body = tmp_path / "body"
    body.write_bytes(BODY)
    agent = LMTPDeliveryAgent(f"lmtp:127.0.0.1:{port}", "h", timeout=10)
    reported: list[Outcome] = []
    rcpts = [Recipient(**_fields(LOCAL)),
             Recipient("bob@example.org", "bob@example.org", local=True, mailbox="bob/")]
    try:
        task = asyncio.create_task(agent.deliver(_qmsg(body), rcpts, report=reported.append))
        await wait_until_true(lambda: len(reported) == 1)
        assert reported[0].recipient == "alice@example.org"
        assert reported[0].kind is OutcomeKind.DELIVERED
        task.cancel()
        await asyncio.sleep(0.05)
        assert not task.done()
        second.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert [(o.recipient, o.kind) for o in reported] == [
            ("alice@example.org", OutcomeKind.DELIVERED),
            ("bob@example.org", OutcomeKind.DELIVERED)]
    finally:
        second.set()
        server.close()
        await server.wait_closed()


# ---------------------------------------------- issue 10 review: a stop always comes back


class HungSaveStore(CountingStore):
    """Saves never return once ``hang`` is set (a disk that stopped answering)."""

    hang = False

    async def save(self, qid: str, envelope: Envelope) -> None:
        if self.hang:
            await asyncio.Event().wait()
        await super().save(qid, envelope)


async def test_issue10_review_stop_with_a_hung_recording_returns(tmp_path, monkeypatch):
    """Two groups: the local one returns and its outcome is being saved on a disk that hangs,
    the relay one is stuck. The stop cancels the relay call, waits RECORD_GRACE for the
    recording, then gives up on it and returns (before: it waited forever in _settle)."""
    from pymta.queue import manager as manager_mod

    monkeypatch.setattr(manager_mod, "RECORD_GRACE", 0.2)
    monkeypatch.setattr(manager_mod, "CANCEL_GRACE", 0.2, raising=False)
    store = HungSaveStore(tmp_path)
    store.hang = True
    hang, local = Hang(), Agent(always(OK))
    mgr = QueueManager(store, Router(hang, local), policy=RetryPolicy(jitter=0),
                       hostname="h", postmaster="postmaster@h", resolve=resolve)
    now = mgr._clock()
    await store.enqueue_bytes(
        Envelope("a@example.org", [Recipient(**_fields(LOCAL)), Recipient(**_fields(REMOTE))],
                 now, now), BODY)
    await mgr.start()
    await asyncio.wait_for(hang.started.wait(), 2)
    await wait_until_true(lambda: local.calls)
    await asyncio.wait_for(mgr.stop(grace=0.05), 5)
    assert store.locked == set()
    assert mgr._tasks == set()


# ------------------------------------- issue 10 review: a flush and a notice that must wait


async def test_issue10_review_flush_then_owed_notice_retries_by_back_off(tmp_path):
    """A flush makes a message whose failure notice cannot be queued (the disk is full) due
    at once, and it is tried once; after that it waits for its back-off again. Before, the
    attempt left the recipients' last_attempt alone, so every later scan saw the message as
    "not tried since the flush" and tried it again: once per scan interval."""
    store = FakeStore(tmp_path)
    store.root = str(tmp_path)               # type: ignore[attr-defined]
    clocks = TwoClocks()
    tries = 0

    async def full(envelope, data):
        nonlocal tries
        tries += 1
        raise OSError(28, "No space left on device")

    store.enqueue_bytes = full               # type: ignore[method-assign]
    rcpt = Recipient(**_fields(REMOTE))
    rcpt.state, rcpt.attempts = RcptState.NOTICE_OWED, 1
    rcpt.last_reply, rcpt.last_attempt = str(REJECT), clocks.wall - 1000
    env = Envelope("alice@example.org", [rcpt], clocks.wall - 1000, clocks.wall + 3000)
    store.envs["Q0001"] = env
    (tmp_path / "Q0001").write_bytes(BODY)
    remote = Agent(always(OK))
    mgr = manager(store, remote, clocks=clocks,
                  policy=RetryPolicy(first=300, maximum=4000, jitter=0))
    assert await mgr.run_once_due() == []    # backing off: not due
    (tmp_path / "flush").write_text(f"{int(clocks.wall * 1e9)}.1\n")
    assert await mgr.run_once_due() == ["Q0001"]   # the flush: tried at once
    assert tries == 1
    for _ in range(4):                       # four scan intervals later: still backing off
        clocks.advance(60)
        assert await mgr.run_once_due() == []
    assert tries == 1
    clocks.advance(300)
    assert await mgr.run_once_due() == ["Q0001"]
    assert tries == 2 and remote.calls == []
