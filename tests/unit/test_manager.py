"""Queue manager: scheduling, outcomes, retries, expiry and DSN generation.

The store here is an in-memory fake with the same methods as ``pymta.queue.store``; it
deep-copies envelopes on load/save so the manager sees "disk" semantics.
"""

from __future__ import annotations

import asyncio
import copy
import email
import email.policy
import logging
from collections.abc import Callable, Sequence

import pytest

from pymta.queue import deliverylog
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

BODY = (b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: hi\r\n\r\n"
        b"hello\r\n")
OK = Reply(250, "2.0.0", "Ok")
DEFER = Reply(451, "4.7.1", "Try again later")
REJECT = Reply(550, "5.1.1", "<bob@example.net>: Recipient address rejected: User unknown")


class FakeLock:
    def __init__(self, store: FakeStore, qid: str) -> None:
        self.store, self.qid = store, qid

    def release(self) -> None:
        self.store.locked.discard(self.qid)

    @property
    def held(self) -> bool:
        return self.qid in self.store.locked


class FakeStore:
    def __init__(self, tmp_path) -> None:
        self.dir = tmp_path
        self.envs: dict[str, Envelope] = {}
        self.locked: set[str] = set()
        self.n = 0

    def ids(self) -> list[str]:
        return sorted(self.envs)

    def load(self, qid: str) -> Envelope | None:
        env = self.envs.get(qid)
        return copy.deepcopy(env) if env is not None else None

    async def save(self, qid: str, envelope: Envelope) -> None:
        self.envs[qid] = copy.deepcopy(envelope)

    async def remove(self, qid: str) -> None:
        self.envs.pop(qid, None)

    def body_path(self, qid: str) -> str:
        return str(self.dir / qid)

    async def enqueue_bytes(self, envelope: Envelope, data: bytes) -> str:
        self.n += 1
        qid = f"Q{self.n:04d}"
        (self.dir / qid).write_bytes(data)
        self.envs[qid] = copy.deepcopy(envelope)
        return qid

    def try_lock(self, qid: str) -> FakeLock | None:
        if qid in self.locked or qid not in self.envs:
            return None
        self.locked.add(qid)
        return FakeLock(self, qid)

    def body(self, qid: str) -> bytes:
        return (self.dir / qid).read_bytes()

    # pymta.contracts.QueueStore's delivery side, over the synchronous fakes above
    async def list_queued(self) -> list[str]:
        return self.ids()

    async def claim(self, qid: str) -> FakeLock | None:
        return self.try_lock(qid)

    async def load_envelope(self, qid: str) -> Envelope | None:
        return self.load(qid)

    async def open_body(self, qid: str) -> str:
        return self.body_path(qid)

    async def open_message(self, qid: str, envelope: Envelope) -> QueuedMessage:
        return QueuedMessage(qid, envelope, self.body_path(qid))

    async def exists(self, qid: str) -> bool:
        return (self.dir / qid).exists()


Script = Callable[[Recipient, int], Reply | None]


class Agent:
    """Answers each recipient with ``script(rcpt, call_no)``; None = omit its outcome."""

    def __init__(self, script: Script, relay: str = "local", exc: BaseException | None = None,
                 dsn_passed: bool = False):
        self.script, self.relay, self.exc = script, relay, exc
        self.dsn_passed = dsn_passed
        self.calls: list[tuple[QueuedMessage, list[str]]] = []

    async def deliver(self, msg: QueuedMessage, rcpts: Sequence[Recipient]) -> list[Outcome]:
        self.calls.append((msg, [r.address for r in rcpts]))
        if self.exc is not None:
            raise self.exc
        out = []
        for r in rcpts:
            reply = self.script(r, len(self.calls))
            if reply is None:
                continue
            kind = (OutcomeKind.DELIVERED if reply.code < 400 else
                    OutcomeKind.TEMPORARY if reply.code < 500 else OutcomeKind.PERMANENT)
            out.append(Outcome(r.address, kind, reply, self.relay,
                               dsn_passed=self.dsn_passed and kind is OutcomeKind.DELIVERED))
        return out


class Router:
    """Remote recipients go to ``remote``; mail to the sender/postmaster goes to ``local``."""

    def __init__(self, remote: Agent, local: Agent) -> None:
        self.remote, self.local = remote, local

    def route(self, rcpt: Recipient):
        if rcpt.local:
            return "local", self.local
        return "relay:" + rcpt.address.rpartition("@")[2], self.remote


class Clock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def always(reply: Reply) -> Script:
    return lambda r, n: reply


async def resolve(address: str) -> Recipient | None:
    if address.endswith("@unknown.example"):
        return None
    return Recipient(address, address, local=True, mailbox=address.split("@")[0] + "/")


def make(tmp_path, remote: Agent, local: Agent | None = None, *, policy=None, clock=None):
    store = FakeStore(tmp_path)
    local = local or Agent(always(OK))
    clock = clock or Clock()
    mgr = QueueManager(store, Router(remote, local),
                       policy=policy or RetryPolicy(jitter=0),
                       hostname="mta.example.org", postmaster="postmaster@example.org",
                       resolve=resolve, clock=clock)
    return mgr, store, clock


async def put(store: FakeStore, clock: Clock, *, sender="alice@example.org", rcpts=None,
              **kw) -> str:
    rcpts = rcpts or [Recipient("bob@example.net", "bob@example.net", local=False)]
    env = Envelope(sender=sender, recipients=rcpts, received_at=kw.pop("received_at", clock.t),
                   next_attempt=kw.pop("next_attempt", clock.t), size=len(BODY), **kw)
    return await store.enqueue_bytes(env, BODY)


def parse(data: bytes):
    return email.message_from_bytes(data, policy=email.policy.default)


def dsns(store: FakeStore, exclude: str) -> list[str]:
    return [q for q in store.ids() if q != exclude]


# ------------------------------------------------------------------------------- tests


async def test_delivered_message_is_removed(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pymta.delivery")
    remote = Agent(always(OK), relay="mx.example.net[192.0.2.1]:25")
    mgr, store, _ = make(tmp_path, remote)
    qid = await put(store, mgr._clock)
    assert await mgr.run_once_due() == [qid]
    assert store.ids() == []
    msg, addrs = remote.calls[0]
    assert msg.qid == qid and msg.body_path == store.body_path(qid)
    assert addrs == ["bob@example.net"]
    text = caplog.text
    assert f"{qid}: from=<alice@example.org>, size={len(BODY)}, nrcpt=1 (queue active)" in text
    assert (f"{qid}: to=<bob@example.net>, relay=mx.example.net[192.0.2.1]:25, delay=0, "
            "delays=0/0/0/0, dsn=2.0.0, status=sent (250 2.0.0 Ok)") in text
    assert f"{qid}: removed" in text


async def test_groups_recipients_by_transport_key(tmp_path):
    remote = Agent(always(OK))
    local = Agent(always(OK))
    mgr, store, clock = make(tmp_path, remote, local)
    rcpts = [Recipient("a@x.example", "a@x.example", local=True),
             Recipient("b@x.example", "b@x.example", local=True),
             Recipient("c@y.example", "c@y.example", local=False)]
    await put(store, clock, rcpts=rcpts)
    await mgr.run_once_due()
    assert [c[1] for c in local.calls] == [["a@x.example", "b@x.example"]]
    assert [c[1] for c in remote.calls] == [["c@y.example"]]
    assert store.ids() == []


async def test_temporary_failure_then_success_with_scheduler(tmp_path):
    remote = Agent(lambda r, n: DEFER if n == 1 else OK)
    store = FakeStore(tmp_path)
    mgr = QueueManager(store, Router(remote, Agent(always(OK))),
                       policy=RetryPolicy(first=0.05, maximum=0.1, jitter=0),
                       hostname="h", postmaster="postmaster@h", resolve=resolve)
    await mgr.start()
    try:
        env = Envelope("alice@example.org",
                       [Recipient("bob@example.net", "bob@example.net", local=False)],
                       received_at=mgr._clock(), next_attempt=mgr._clock())
        qid = await store.enqueue_bytes(env, BODY)
        mgr.submit(qid, env)
        for _ in range(200):
            if not store.ids():
                break
            await asyncio.sleep(0.01)
        assert store.ids() == []
        assert len(remote.calls) == 2
    finally:
        await mgr.stop()


async def test_deferred_state_is_saved(tmp_path):
    remote = Agent(always(DEFER), relay="mx.example.net[192.0.2.1]:25")
    mgr, store, clock = make(tmp_path, remote)
    qid = await put(store, clock)
    await mgr.run_once_due()
    env = store.load(qid)
    r = env.recipients[0]
    assert r.state is RcptState.PENDING and r.attempts == 1
    assert r.last_reply == str(DEFER) and r.next_hop == "mx.example.net[192.0.2.1]:25"
    assert r.last_attempt == clock.t
    assert env.next_attempt == clock.t + 300
    # not due yet: nothing happens
    assert await mgr.run_once_due() == []
    clock.t += 300
    await mgr.run_once_due()
    env = store.load(qid)
    assert env.recipients[0].attempts == 2 and env.next_attempt == clock.t + 600


async def test_partial_delivery_retries_only_pending(tmp_path):
    remote = Agent(lambda r, n: OK if r.address.startswith("a") or n > 1 else DEFER)
    mgr, store, clock = make(tmp_path, remote)
    rcpts = [Recipient("a@y.example", "a@y.example", local=False),
             Recipient("b@y.example", "b@y.example", local=False)]
    qid = await put(store, clock, rcpts=rcpts)
    await mgr.run_once_due()
    env = store.load(qid)
    assert [r.state for r in env.recipients] == [RcptState.DELIVERED, RcptState.PENDING]
    clock.t += 300
    await mgr.run_once_due()
    assert remote.calls[-1][1] == ["b@y.example"]
    assert store.ids() == []


async def test_permanent_failure_bounces_to_sender(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    remote = Agent(always(REJECT), relay="mx.example.net[192.0.2.1]:25")
    local = Agent(always(OK))
    mgr, store, clock = make(tmp_path, remote, local)
    qid = await put(store, clock)
    await mgr.run_once_due()
    assert "status=bounced (550 5.1.1" in caplog.text
    assert qid not in store.ids()
    [dsn_qid] = store.ids()
    denv = store.load(dsn_qid)
    assert denv.sender == "" and denv.is_bounce
    assert "double_bounce" not in denv.extra
    assert [r.address for r in denv.recipients] == ["alice@example.org"]
    msg = parse(store.body(dsn_qid))
    assert msg["To"] == "alice@example.org"
    per_rcpt = msg.get_payload()[1].get_payload()[1]
    assert per_rcpt["Status"] == "5.1.1"
    assert per_rcpt["Remote-MTA"] == "dns; mx.example.net"
    assert per_rcpt["Diagnostic-Code"] == f"smtp; {REJECT}"
    assert str(REJECT) in msg.get_payload()[0].get_content()
    assert f"{qid}: sender non-delivery notification: {dsn_qid}" in caplog.text
    # the DSN was submitted: the next pass delivers it locally to the sender
    assert await mgr.run_once_due() == [dsn_qid]
    assert local.calls[0][1] == ["alice@example.org"]
    assert store.ids() == []


async def test_null_sender_bounce_goes_to_postmaster_and_double_bounce_is_dropped(
        tmp_path, caplog):
    caplog.set_level(logging.INFO)
    remote = Agent(always(REJECT))
    local = Agent(always(Reply(550, "5.2.1", "Mailbox disabled")))  # postmaster is broken
    mgr, store, clock = make(tmp_path, remote, local)
    qid = await put(store, clock, sender="")
    await mgr.run_once_due()
    [dsn_qid] = dsns(store, qid)
    denv = store.load(dsn_qid)
    assert denv.sender == "" and denv.extra.get("double_bounce") == "1"
    assert [r.address for r in denv.recipients] == ["postmaster@example.org"]
    assert parse(store.body(dsn_qid))["To"] == "postmaster@example.org"
    for _ in range(5):  # no loop: the failed double bounce is dropped
        await mgr.run_once_due()
    assert store.ids() == []
    assert len(local.calls) == 1
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert any("discarded" in r.getMessage() for r in errors)


async def test_failed_bounce_goes_to_postmaster(tmp_path):
    remote = Agent(always(REJECT))
    mgr, store, clock = make(tmp_path, remote)
    rcpt = Recipient("alice@example.net", "alice@example.net", local=False)
    qid = await put(store, clock, sender="", rcpts=[rcpt], is_bounce=True)
    await mgr.run_once_due()
    [dsn_qid] = dsns(store, qid)
    assert store.load(dsn_qid).recipients[0].address == "postmaster@example.org"
    assert store.load(dsn_qid).extra["double_bounce"] == "1"


async def test_agent_exception_defers_and_never_loses(tmp_path, caplog):
    remote = Agent(always(OK), exc=RuntimeError("boom"))
    mgr, store, clock = make(tmp_path, remote)
    qid = await put(store, clock)
    await mgr.run_once_due()
    env = store.load(qid)
    r = env.recipients[0]
    assert r.state is RcptState.PENDING and r.attempts == 1
    assert r.last_reply == "451 4.3.0 Local error in processing"
    assert store.ids() == [qid]  # no DSN
    err = [rec for rec in caplog.records if rec.levelno == logging.ERROR]
    assert err and err[0].exc_info is not None


async def test_missing_outcome_is_temporary(tmp_path):
    remote = Agent(lambda r, n: OK if r.address.startswith("a") else None)
    mgr, store, clock = make(tmp_path, remote)
    rcpts = [Recipient("a@y.example", "a@y.example", local=False),
             Recipient("b@y.example", "b@y.example", local=False)]
    qid = await put(store, clock, rcpts=rcpts)
    await mgr.run_once_due()
    b = store.load(qid).recipients[1]
    assert b.state is RcptState.PENDING and "4.3.0" in b.last_reply


async def test_expiry_bounces_with_4_4_7(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pymta.delivery")
    remote = Agent(always(DEFER))
    clock = Clock()
    mgr, store, _ = make(tmp_path, remote, policy=RetryPolicy(lifetime=100, jitter=0),
                         clock=clock)
    qid = await put(store, clock, received_at=clock.t - 200)
    await mgr.run_once_due()
    assert qid not in store.ids()
    [dsn_qid] = store.ids()
    per_rcpt = parse(store.body(dsn_qid)).get_payload()[1].get_payload()[1]
    assert per_rcpt["Action"] == "failed"
    assert per_rcpt["Status"] == "4.4.7"
    assert per_rcpt["Diagnostic-Code"] == f"smtp; {DEFER}"
    assert "status=expired (451 4.7.1 Try again later)" in caplog.text


async def test_held_message_is_not_delivered(tmp_path):
    remote = Agent(always(OK))
    mgr, store, clock = make(tmp_path, remote)
    qid = await put(store, clock, held=True)
    mgr.submit(qid, store.load(qid))
    assert await mgr.run_once_due() == []
    assert remote.calls == [] and store.ids() == [qid]
    # the CLI releases it on disk, then wakes the manager: the rescan picks it up
    env = store.load(qid)
    env.held = False
    await store.save(qid, env)
    mgr.wake()
    assert await mgr.run_once_due() == [qid]
    assert store.ids() == []


async def test_message_locked_elsewhere_is_skipped(tmp_path):
    remote = Agent(always(OK))
    mgr, store, clock = make(tmp_path, remote)
    qid = await put(store, clock)
    store.locked.add(qid)
    await mgr.run_once_due()
    assert remote.calls == [] and store.ids() == [qid]


async def test_notify_never_sends_no_dsn(tmp_path):
    remote = Agent(always(REJECT))
    mgr, store, clock = make(tmp_path, remote)
    rcpt = Recipient("bob@example.net", "bob@example.net", local=False, notify="NEVER")
    await put(store, clock, rcpts=[rcpt])
    await mgr.run_once_due()
    assert store.ids() == []


async def test_notify_success_sends_relayed_dsn_for_a_remote_delivery(tmp_path):
    """A next hop without DSN: our success notice says ``relayed`` (RFC 3464 §2.3.3)."""
    remote = Agent(always(OK), relay="mx.example.net[192.0.2.1]:25")
    mgr, store, clock = make(tmp_path, remote)
    rcpt = Recipient("bob@example.net", "bob@example.net", local=False,
                     notify="SUCCESS,FAILURE", orcpt="rfc822;bob@example.net")
    qid = await put(store, clock, rcpts=[rcpt], envid="XYZ")
    await mgr.run_once_due()
    [dsn_qid] = dsns(store, qid)
    msg = parse(store.body(dsn_qid))
    assert msg["Subject"] == "Successful Mail Delivery Report"
    per_msg, per_rcpt = msg.get_payload()[1].get_payload()
    assert per_msg["Original-Envelope-Id"] == "XYZ"
    assert per_rcpt["Action"] == "relayed"
    assert per_rcpt["Original-Recipient"] == "rfc822; bob@example.net"


async def test_issue15_no_success_dsn_when_the_next_hop_took_the_notify(tmp_path):
    """A next hop that speaks DSN was given NOTIFY=SUCCESS: the notice is its to send."""
    remote = Agent(always(OK), relay="mx.example.net[192.0.2.1]:25", dsn_passed=True)
    mgr, store, clock = make(tmp_path, remote)
    rcpt = Recipient("bob@example.net", "bob@example.net", local=False,
                     notify="SUCCESS,FAILURE", orcpt="rfc822;bob@example.net")
    await put(store, clock, rcpts=[rcpt], envid="XYZ")
    await mgr.run_once_due()
    assert store.ids() == []


async def test_unknown_dsn_recipient_is_logged_and_dropped(tmp_path, caplog):
    remote = Agent(always(REJECT))
    mgr, store, clock = make(tmp_path, remote)
    await put(store, clock, sender="someone@unknown.example")
    await mgr.run_once_due()
    assert store.ids() == []
    assert any(r.levelno == logging.ERROR and "unknown" in r.getMessage()
               for r in caplog.records)


async def test_dsn_enqueue_failure_keeps_the_notice_owed(tmp_path, caplog):
    remote = Agent(always(REJECT))
    mgr, store, clock = make(tmp_path, remote)
    qid = await put(store, clock)

    async def broken(envelope, data):
        raise OSError("disk full")

    store.enqueue_bytes = broken
    await mgr.run_once_due()
    env = store.load(qid)
    assert env.recipients[0].state is RcptState.NOTICE_OWED  # the notice is still owed
    assert store.ids() == [qid]


async def test_stop_cancels_hung_attempt_after_grace(tmp_path):
    started = asyncio.Event()

    class Hung:
        async def deliver(self, msg, rcpts):
            started.set()
            await asyncio.sleep(3600)

    store = FakeStore(tmp_path)
    mgr = QueueManager(store, Router(Hung(), Hung()), policy=RetryPolicy(jitter=0),
                       hostname="h", postmaster="postmaster@h", resolve=resolve)
    clock = Clock(mgr._clock())
    qid = await put(store, clock)
    await mgr.start()
    await asyncio.wait_for(started.wait(), 2)
    await mgr.stop(grace=0.05)
    env = store.load(qid)
    assert env.recipients[0].state is RcptState.PENDING and env.recipients[0].attempts == 0
    assert store.locked == set()


def test_log_line_orig_to():
    r = Recipient("bob@example.net", "info@example.org", local=False)
    line = deliverylog.format_recipient(
        "ABC", r, status="deferred", reply=DEFER, relay="mx[192.0.2.1]:25", delay=12.345,
        delays=(0.1, 0, 0, 1.25))
    assert line == ("ABC: to=<bob@example.net>, orig_to=<info@example.org>, "
                    "relay=mx[192.0.2.1]:25, delay=12, delays=0.1/0/0/1.25, dsn=4.7.1, "
                    "status=deferred (451 4.7.1 Try again later)")
    with pytest.raises(ValueError):
        deliverylog.format_recipient("ABC", r, status="weird", reply=DEFER, relay="",
                                     delay=0, delays=(0, 0, 0, 0))


async def test_review_a_store_without_open_message_still_delivers(tmp_path):
    """A store written for the contract before ``open_message`` (a library user's) hands
    the body over by ``open_body``, as before."""
    remote = Agent(always(OK))
    mgr, store, _ = make(tmp_path, remote)
    store.open_message = None       # as if the class had no such method
    qid = await put(store, mgr._clock)
    assert await mgr.run_once_due() == [qid]
    msg, _ = remote.calls[0]
    assert msg.body_path == store.body_path(qid) and msg.body is None
    assert store.ids() == []


def test_review_queued_message_pickles_and_compares_by_value(tmp_path):
    """Agents that hand a message to a process pool pickle it: it travels with its body as
    a file (made on the way), and equal messages compare equal, as the dataclass did."""
    import pickle

    env = Envelope(sender="a@example.org", recipients=[], received_at=1.0, next_attempt=1.0)
    path = tmp_path / "copy"

    def materialize() -> str:
        path.write_bytes(BODY)
        return str(path)

    msg = QueuedMessage("Q1", env, body=BODY, materialize=materialize)
    back = pickle.loads(pickle.dumps(msg))
    assert back.body is None and back.body_path == str(path)
    with back.open() as f:
        assert f.read() == BODY
    assert QueuedMessage("Q1", env, str(path)) == back
    assert QueuedMessage("Q2", env, str(path)) != back
